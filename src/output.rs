//! Everything the binary prints: human output (colored on a terminal, plain otherwise),
//! JSON lines, warnings, the progress spinner on long scans (only when stderr is a
//! terminal), and the one place errors are printed. Every path and field that reaches human
//! output goes through `human_path` / `human_text`: a control character in a file name, a
//! node name or an error would otherwise print raw and could forge a line.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anstyle::{AnsiColor, Style};
use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::error::chain;
use kubefim_baseline::record::FileRecord;
use kubefim_baseline::report::{ContainerReportView, human_path, human_text};
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
    // One line whatever the paths in it hold.
    let line = human_text(&chain(&**e)).into_owned();
    let _ = writeln!(anstream::stderr(), "{}kubefim: error:{} {line}", REMOVED.bold(), REMOVED.bold().render_reset());
}

/// A status line on stderr.
pub fn status(msg: &str) {
    let _ = writeln!(anstream::stderr(), "{DIM}kubefim:{DIM:#} {}", human_text(msg));
}

/// Scan warnings on stderr.
pub fn warnings(list: &[ScanWarning]) {
    let mut err = anstream::stderr().lock();
    for w in list {
        let _ = writeln!(err, "{WARN}warning:{WARN:#} {}: {}", human_path(&w.path), human_text(&w.message));
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
        human_path(b.path()),
        b.policy.name,
        b.len(),
        human_text(&b.manifest.host),
        created.as_secs()
    )
}

/// What `baseline sign` signed, as its signed body says it (never the request's own fields):
/// node, policy, record count, scan time, digest, and every incomplete path with why.
pub fn signed(signed: &kubefim_baseline::request::Signed) {
    let m = &signed.manifest;
    let created = Duration::from_nanos(u64::try_from(m.created_unix_ns).unwrap_or(u64::MAX));
    let created = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + created);
    status(&format!(
        "signed node {}: policy {:?}, {} entries, {} incomplete, scanned {created}, digest {}",
        human_text(&m.host),
        signed.policy_name,
        m.records,
        m.incomplete.len(),
        signed.signature.digest
    ));
    let mut err = anstream::stderr().lock();
    for (path, why) in &m.incomplete {
        let _ = writeln!(err, "{WARN}  incomplete:{WARN:#} {}: {}", human_text(path), human_text(why));
    }
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
        human_path(path),
        r.error.as_ref().map(|e| format!("  ({})", human_text(e))).unwrap_or_default()
    )
}

/// The verify report for people.
/// The line that opens a container's part of `verify --containers`.
pub fn container_header(view: &ContainerReportView) -> std::io::Result<()> {
    let c = &view.container;
    let mut line = format!("container {}", &c.id[..c.id.len().min(12)]);
    if let Some(name) = &c.name {
        line.push_str(&format!(" {}", human_text(name)));
    }
    if let Some(image) = &c.image {
        line.push_str(&format!(" image {}", human_text(image)));
    }
    if let Some(pod) = &view.pod {
        line.push_str(&format!(" pod {}/{}", human_text(&pod.namespace), human_text(&pod.name)));
    }
    line.push_str(&format!(" policy {}", human_text(&view.policy)));
    writeln!(anstream::stdout().lock(), "{DIM}{line}{DIM:#}")
}

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
        writeln!(out, "{style}{mark}{style:#} {} {DIM}{}{DIM:#}", human_path(&c.path), attrs.join(", "))?;
        if let Some(m) = &c.mount {
            let how = if c.kind == ChangeKind::Hidden { "hidden by a mount" } else { "mounted over" };
            let (target, fs_type, source) = (human_text(&m.target), human_text(&m.fs_type), human_text(&m.source));
            writeln!(out, "         {how}: {target} ({fs_type}, source {source})")?;
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
                writeln!(out, "         {style}{}{style:#}", human_content(line))?;
            }
        }
    }
    for e in &report.errors {
        writeln!(out, "{WARN}unverified{WARN:#} {}: {}", human_path(&e.path), human_text(&e.message))?;
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

/// A line of a diff (file content) for people: control characters escaped but tabs, which
/// text files hold and which cannot start a line.
fn human_content(line: &str) -> std::borrow::Cow<'_, str> {
    if line.contains('\t') {
        return std::borrow::Cow::Owned(line.split('\t').map(human_text).collect::<Vec<_>>().join("\t"));
    }
    human_text(line)
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
