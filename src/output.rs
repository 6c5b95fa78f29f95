//! Everything the binary prints: human output (colored on a terminal, plain otherwise),
//! JSON lines, warnings, the progress spinner on long scans (only when stderr is a
//! terminal), and the one place errors are printed.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anstyle::{AnsiColor, Style};
use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::error::chain;
use kubefim_baseline::record::FileRecord;
use kubefim_baseline::report::display_path;
use kubefim_baseline::scan::{ScanProgress, ScanWarning};
use kubefim_baseline::verify::{ChangeKind, VerifyReport};

const ADDED: Style = AnsiColor::Green.on_default();
const REMOVED: Style = AnsiColor::Red.on_default();
const MODIFIED: Style = AnsiColor::Yellow.on_default();
const WARN: Style = AnsiColor::Magenta.on_default();
const DIM: Style = Style::new().dimmed();

/// Logs go to stderr: human on a terminal, JSON otherwise; `KUBEFIM_LOG` sets the filter.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KUBEFIM_LOG").unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

/// Prints an error with its causes, each once (as the watcher's JSON `error` fields do, through
/// the same [`chain`]: a dependency's error that repeats its cause is said once there too).
pub fn error(e: &anyhow::Error) {
    let line = chain(&**e);
    let _ = writeln!(anstream::stderr(), "{}kubefim: error:{} {line}", REMOVED.bold(), REMOVED.bold().render_reset());
}

/// A status line on stderr.
pub fn status(msg: &str) {
    let _ = writeln!(anstream::stderr(), "{DIM}kubefim:{DIM:#} {msg}");
}

/// Scan warnings on stderr.
pub fn warnings(list: &[ScanWarning]) {
    let mut err = anstream::stderr().lock();
    for w in list {
        let _ = writeln!(err, "{WARN}warning:{WARN:#} {}: {}", display_path(&w.path), w.message);
    }
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// One JSON value per line.
pub fn json_line(out: &mut impl Write, value: &impl serde::Serialize) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

/// The line describing a trusted baseline.
pub fn baseline_header(b: &TrustedBaseline) -> String {
    let created = Duration::from_nanos(u64::try_from(b.manifest.created_unix_ns).unwrap_or(u64::MAX));
    format!(
        "baseline {} (policy {:?}, {} records, signed on host {} at unix time {}s): signature OK",
        b.path().display(),
        b.policy.name,
        b.len(),
        b.manifest.host,
        created.as_secs()
    )
}

/// One record for `baseline show`.
pub fn record_human(out: &mut impl Write, path: &Path, r: &FileRecord) -> std::io::Result<()> {
    let hash = r.digest.as_ref().map_or_else(|| "-".repeat(16), |d| d.hex()[..16].to_owned());
    writeln!(
        out,
        "{:<7} {:04o} {:>5}:{:<5} {:>12} {hash} {}{}",
        r.kind.name(),
        r.mode,
        r.uid,
        r.gid,
        r.size,
        display_path(path),
        r.error.as_ref().map(|e| format!("  ({e})")).unwrap_or_default()
    )
}

/// The verify report for people.
pub fn verify_human(report: &VerifyReport) -> std::io::Result<()> {
    let mut out = anstream::stdout().lock();
    for c in &report.changes {
        let (style, mark) = match c.kind {
            ChangeKind::Added => (ADDED, "added   "),
            ChangeKind::Removed => (REMOVED, "removed "),
            ChangeKind::Modified => (MODIFIED, "modified"),
            ChangeKind::Hidden => (REMOVED, "hidden  "),
        };
        let attrs: Vec<_> = c.changed.iter().map(|a| a.name()).collect();
        writeln!(out, "{style}{mark}{style:#} {} {DIM}{}{DIM:#}", display_path(&c.path), attrs.join(", "))?;
        if let Some(m) = &c.mount {
            let how = if c.kind == ChangeKind::Hidden { "hidden by a mount" } else { "mounted over" };
            writeln!(out, "         {how}: {} ({}, source {})", m.target, m.fs_type, m.source)?;
        }
        if let Some(ranges) = &c.changed_ranges {
            let shown: Vec<String> = ranges.iter().take(8).map(|[a, b]| format!("{a}..{b}")).collect();
            writeln!(out, "         bytes changed: {}{}", shown.join(" "), if ranges.len() > 8 { " ..." } else { "" })?;
        }
        if let Some(diff) = &c.diff {
            for line in diff.lines() {
                let style = match line.as_bytes().first() {
                    Some(b'+') => ADDED,
                    Some(b'-') => REMOVED,
                    _ => DIM,
                };
                writeln!(out, "         {style}{line}{style:#}")?;
            }
        }
    }
    for e in &report.errors {
        writeln!(out, "{WARN}unverified{WARN:#} {}: {}", display_path(&e.path), e.message)?;
    }
    let summary = format!(
        "{} added, {} removed, {} modified, {} hidden by mounts, {} unverified ({} entries scanned)",
        report.count(ChangeKind::Added),
        report.count(ChangeKind::Removed),
        report.count(ChangeKind::Modified),
        report.count(ChangeKind::Hidden),
        report.errors.len(),
        report.scanned
    );
    if report.is_clean() {
        writeln!(out, "{ADDED}clean:{ADDED:#} {summary}")
    } else {
        writeln!(out, "{MODIFIED}differences:{MODIFIED:#} {summary}")
    }
}

/// A spinner with live counts while `work` runs, when stderr is a terminal.
pub struct Progress;

impl Progress {
    pub fn show<T>(what: &str, progress: &ScanProgress, work: impl FnOnce() -> T) -> T {
        if !std::io::stderr().is_terminal() {
            return work();
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let entries = progress.entries.load(Ordering::Relaxed);
                    let hashed = progress.bytes.load(Ordering::Relaxed);
                    bar.set_message(format!("{what}: {entries} entries, {} hashed", bytes(hashed)));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let result = work();
            done.store(true, Ordering::Relaxed);
            bar.finish_and_clear();
            result
        })
    }
}
