//! One measured run of `kubefim watch`: spawn it, time the ready file, the end of the
//! startup rescan and the first event, sample its memory at each, stop it with SIGTERM.
//! The watcher is held by a guard that kills it on drop, so an error or a panic never
//! leaves one running.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use kubefim_benches::fixture::{Binary, Fixture, remove};
use kubefim_benches::procfs::{self, Memory};
use kubefim_benches::tree::ProbeRestore;

/// How long the change line of the probe may take once appended.
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the watcher may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the ready file is looked for (a stat: nothing next to the watcher's work).
const POLL: Duration = Duration::from_millis(2);
/// Stderr lines kept for error messages.
const STDERR_TAIL: usize = 20;
/// State lines kept in a sample's timeline.
const TIMELINE: usize = 30;

/// What the run should do.
pub struct RunOptions<'a> {
    pub kubefim: &'a Binary,
    pub fixture: &'a Fixture,
    pub probe: PathBuf,
    pub start_timeout: Duration,
    pub kernel_maps: bool,
    pub echo_stderr: bool,
}

/// The end of the startup rescan, as the watcher reported it.
#[derive(Debug, Clone)]
pub struct StartupDone {
    /// `rescan` or `verify`: the kind of the first line with reason `startup`.
    pub by: String,
    /// Seconds from spawn to the line's own `time` (when the watcher printed it).
    pub stamp_s: f64,
    /// Seconds from spawn to when the harness read it (later if the watcher buffers).
    pub read_s: f64,
    /// The line's `seconds` (the rescan's own duration), if it has one.
    pub own_s: Option<f64>,
    /// Memory when the harness read the line.
    pub memory: Memory,
}

/// One run's measurements.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ready_s: f64,
    pub at_ready: Memory,
    /// User + system CPU seconds of the watcher at ready.
    pub cpu_at_ready_s: f64,
    pub startup: StartupDone,
    pub first_event_ms: f64,
    /// Bytes of kernel memory per map name, when measured.
    pub kernel_maps: Option<BTreeMap<String, u64>>,
    /// `scanned` of the startup rescan line and `baseline_entries` of the verify line.
    pub scanned: Option<u64>,
    pub baseline_entries: Option<u64>,
    /// Reasons of `degraded` lines (e.g. a full in-kernel filter).
    pub degraded: Vec<String>,
    /// The watcher's own lines (not changes) as `kind[/reason]@seconds from spawn`, and
    /// the harness's append and ready as `append@`, `ready@`: what happened when.
    pub timeline: Vec<String>,
    pub memory_at_exit: Memory,
}

/// A running watcher: killed (SIGKILL) and reaped on drop unless it already exited.
struct Watcher {
    child: Child,
    pid: u32,
    lines: Receiver<(Instant, String)>,
    stderr: Arc<Mutex<VecDeque<String>>>,
}

impl Watcher {
    fn stderr_tail(&self) -> String {
        let tail = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if tail.is_empty() { "(nothing on stderr)".into() } else { tail.iter().cloned().collect::<Vec<_>>().join("\n") }
    }

    /// An error if the watcher has exited.
    fn check_alive(&mut self, what: &str) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("waiting for the watcher")? {
            bail!("the watcher exited ({status}) {what}; its stderr ends with:\n{}", self.stderr_tail());
        }
        Ok(())
    }

    /// SIGTERM, then the exit status within [`EXIT_TIMEOUT`].
    fn terminate(&mut self) -> Result<()> {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).context("sending SIGTERM to the watcher")?;
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the watcher")? {
                if !status.success() {
                    bail!(
                        "the watcher exited with {status} after SIGTERM; its stderr ends with:\n{}",
                        self.stderr_tail()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the watcher did not exit within {} s of SIGTERM (it is killed now); its stderr ends with:\n{}",
                    EXIT_TIMEOUT.as_secs(),
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn(opts: &RunOptions) -> Result<Watcher> {
    let f = opts.fixture;
    let mut cmd = opts.kubefim.command();
    cmd.arg("watch")
        .arg("--db")
        .arg(&f.db)
        .arg("--pubkey")
        .arg(&f.pubkey)
        .args(["--format", "jsonl", "--ready-file"])
        .arg(&f.ready)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {}", opts.kubefim.path.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("the watcher's stdout is piped")?;
    let stderr_pipe = child.stderr.take().context("the watcher's stderr is piped")?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // Lines, not `lines()`: a path in a diff need not be UTF-8.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if tx.send((Instant::now(), String::from_utf8_lossy(&line).into_owned())).is_err() {
                return;
            }
            line.clear();
        }
    });
    let stderr = Arc::new(Mutex::new(VecDeque::new()));
    let tail = stderr.clone();
    let echo = opts.echo_stderr;
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut reader = BufReader::new(stderr_pipe);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            text.clear();
            text.push_str(String::from_utf8_lossy(&line).trim_end());
            if echo {
                eprintln!("  watcher: {text}");
            }
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(text.clone());
            line.clear();
        }
    });
    Ok(Watcher { child, pid, lines, stderr })
}

/// What the lines read so far said.
#[derive(Default)]
struct Seen {
    startup: Option<StartupDone>,
    first_event_ms: Option<f64>,
    /// A rescan, not an event, reported the probe after the append.
    probe_by_rescan: bool,
    scanned: Option<u64>,
    baseline_entries: Option<u64>,
    degraded: Vec<String>,
    timeline: Vec<String>,
}

impl Seen {
    fn take(&mut self, w: &Watcher, at: Instant, line: &str, clock: &Clock, probe: &ProbeWatch) -> Result<()> {
        let Ok(v) = serde_json::from_str::<Value>(line) else { return Ok(()) };
        let kind = v["kind"].as_str().unwrap_or("");
        let startup = v["reason"].as_str() == Some("startup");
        if !matches!(kind, "added" | "removed" | "modified" | "renamed") && self.timeline.len() < TIMELINE {
            let reason = v["reason"].as_str().filter(|r| r.len() <= 24).map_or_else(String::new, |r| format!("/{r}"));
            self.timeline.push(format!("{kind}{reason}@{:.2}", at.duration_since(clock.spawned).as_secs_f64()));
        }
        match kind {
            "rescan" if startup => self.scanned = v["scanned"].as_u64(),
            "verify" if startup => self.baseline_entries = v["baseline_entries"].as_u64(),
            "degraded" => self.degraded.push(v["reason"].as_str().unwrap_or("?").to_owned()),
            "modified" if v["path"].as_str() == probe.path.to_str() => {
                // A rescan also reports the probe (it deviates from the baseline after the
                // first run, see ProbeRestore): only an event's line times the event.
                let by_rescan = v["detected_by"].as_str() == Some("rescan");
                if let Some(appended) = probe.appended
                    && at >= appended
                {
                    if by_rescan {
                        self.probe_by_rescan = true;
                    } else if self.first_event_ms.is_none() {
                        self.first_event_ms = Some(at.duration_since(appended).as_secs_f64() * 1e3);
                        self.timeline.push(format!("event@{:.2}", at.duration_since(clock.spawned).as_secs_f64()));
                    }
                }
            }
            _ => {}
        }
        if (kind == "rescan" || kind == "verify") && startup && self.startup.is_none() {
            let read_s = at.duration_since(clock.spawned).as_secs_f64();
            let stamp_s = v["time"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(clock.spawned_wall).ok())
                .map_or(read_s, |d| d.as_secs_f64());
            self.startup = Some(StartupDone {
                by: kind.to_owned(),
                stamp_s,
                read_s,
                own_s: v["seconds"].as_f64(),
                memory: procfs::memory(w.pid)?,
            });
        }
        Ok(())
    }
}

struct Clock {
    spawned: Instant,
    spawned_wall: SystemTime,
}

struct ProbeWatch<'a> {
    path: &'a Path,
    appended: Option<Instant>,
}

/// One run, from spawn to exit.
pub fn run_once(opts: &RunOptions) -> Result<Sample> {
    let f = opts.fixture;
    // A fresh journal: every run starts from the signed baseline alone.
    remove(&f.journal())?;
    remove(&f.ready)?;
    // Declared before the watcher so that it is dropped (the probe put back) after the
    // watcher is gone.
    let probe_restore = ProbeRestore::new(&opts.probe)?;
    let mut probe = ProbeWatch { path: &opts.probe, appended: None };
    let clock = Clock { spawned_wall: SystemTime::now(), spawned: Instant::now() };
    let mut w = spawn(opts)?;
    let mut seen = Seen::default();
    let start_deadline = clock.spawned + opts.start_timeout;
    let timeout = opts.start_timeout.as_secs();

    // Until the ready file.
    let ready_at = loop {
        if f.ready.exists() {
            break Instant::now();
        }
        while let Ok((at, line)) = w.lines.try_recv() {
            seen.take(&w, at, &line, &clock, &probe)?;
        }
        w.check_alive("before writing its ready file")?;
        if Instant::now() > start_deadline {
            bail!(
                "no ready file {} after {timeout} s (--start-timeout); the watcher's stderr ends with:\n{}",
                f.ready.display(),
                w.stderr_tail()
            );
        }
        std::thread::sleep(POLL);
    };
    let at_ready = procfs::memory(w.pid)?;
    let cpu_at_ready_s = procfs::cpu_seconds(w.pid)?;
    let ready_s = ready_at.duration_since(clock.spawned).as_secs_f64();
    eprintln!(
        "    ready after {ready_s:.2} s (RSS {:.0} MB, HWM {:.0} MB)",
        mib(at_ready.rss_kib),
        mib(at_ready.hwm_kib)
    );

    seen.timeline.push(format!("ready@{ready_s:.2}"));
    probe_restore.append()?;
    probe.appended = Some(Instant::now());
    seen.timeline.push(format!("append@{:.2}", clock.spawned.elapsed().as_secs_f64()));
    let event_deadline = Instant::now() + EVENT_TIMEOUT;
    while seen.startup.is_none() || seen.first_event_ms.is_none() {
        let now = Instant::now();
        if seen.first_event_ms.is_none() && now > event_deadline {
            let rescan_only = if seen.probe_by_rescan { " (only a rescan's, detected_by rescan)" } else { "" };
            bail!(
                "no `modified` line for {} from an event within {} s of appending to it{rescan_only}; the watcher's \
                 stderr ends with:\n{}",
                opts.probe.display(),
                EVENT_TIMEOUT.as_secs(),
                w.stderr_tail()
            );
        }
        if seen.startup.is_none() && now > start_deadline {
            bail!(
                "no `rescan` or `verify` line with reason startup after {timeout} s (--start-timeout); the watcher's stderr ends with:\n{}",
                w.stderr_tail()
            );
        }
        match w.lines.recv_timeout(Duration::from_millis(100)) {
            Ok((at, line)) => seen.take(&w, at, &line, &clock, &probe)?,
            Err(RecvTimeoutError::Timeout) => w.check_alive("while the harness waited for its lines")?,
            Err(RecvTimeoutError::Disconnected) => {
                w.check_alive("(its stdout closed)")?;
                bail!("the watcher closed its stdout but is still running");
            }
        }
    }
    let kernel_maps = if opts.kernel_maps { Some(procfs::kernel_maps(w.pid)?) } else { None };
    let memory_at_exit = procfs::memory(w.pid)?;
    w.terminate()?;
    // The rest of its output (the reader ends when the pipe closes), for the counts.
    while let Ok((at, line)) = w.lines.recv_timeout(Duration::from_secs(5)) {
        seen.take(&w, at, &line, &clock, &probe).ok();
    }
    drop(w);
    drop(probe_restore);
    remove(&f.ready)?;
    remove(&f.journal())?;
    let Seen { startup, first_event_ms, scanned, baseline_entries, degraded, mut timeline, .. } = seen;
    // In time order (the harness's own entries were added when it got to them).
    timeline.sort_by(|a, b| at_seconds(a).total_cmp(&at_seconds(b)));
    Ok(Sample {
        ready_s,
        at_ready,
        cpu_at_ready_s,
        startup: startup.context("the loop above waits for the startup line")?,
        first_event_ms: first_event_ms.context("the loop above waits for the event")?,
        kernel_maps,
        scanned,
        baseline_entries,
        degraded,
        timeline,
        memory_at_exit,
    })
}

fn at_seconds(entry: &str) -> f64 {
    entry.rsplit_once('@').and_then(|(_, s)| s.parse().ok()).unwrap_or(f64::MAX)
}

/// KiB to MiB.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
