//! The one sampler: runs a measured command as a child, waits for it with `wait4` (its own
//! user and system time and peak RSS, with those of the children it reaped: a pipeline's
//! largest process, as GNU time's `%M`), and, when monitors watch it, keeps the window open
//! until they are done with what it caused. Over that window it reads the monitors' CPU
//! (`/proc/PID/stat`) and the whole machine's (`/proc/stat`). Nothing here knows kubefim.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::fixture::die_with_parent;
use crate::procfs::{self, Ticks};

/// How often the drain looks at the monitors.
const POLL: Duration = Duration::from_millis(50);
/// Polls a monitor's CPU is summed over to call it busy (200 ms).
const BUSY_WINDOW: usize = 4;
/// Ticks in [`BUSY_WINDOW`] that make a monitor busy: an idle daemon still gets a stray tick
/// now and then (the kernel charges ticks by sampling).
const BUSY_TICKS: u64 = 2;
/// Quiet time that ends the window after the last busy poll.
const QUIET: Duration = Duration::from_secs(1);
/// Quiet time before the workload starts.
const SETTLE: Duration = Duration::from_millis(500);
/// Longest the drain waits for a monitor.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// When the window ends after the measured command exits.
#[derive(Debug, Clone)]
pub enum Drain {
    /// At its exit (no monitor, or one that needs no waiting for).
    Exit,
    /// When the monitors have used no CPU (fewer than 2 ticks in 200 ms) and `output` (their
    /// report, if any) has not grown for a second; the end is the last busy poll.
    Idle { output: Option<PathBuf> },
    /// When the name of `marker`, a file appended to after the command in the watched
    /// tree, shows in `log` (the monitor writes its log in order: everything before it is
    /// in). Follows the log across rotations.
    Marker { log: PathBuf, marker: PathBuf },
}

/// One measured run.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The exit code (128 + signal when killed).
    pub code: i32,
    /// Spawn to exit, seconds.
    pub wall_s: f64,
    /// The command's own CPU (with its reaped children), seconds.
    pub user_s: f64,
    pub sys_s: f64,
    /// Peak RSS of the command or its largest reaped child, KiB. Never below the size of
    /// the process that spawned it (exec records the peak of the memory shared until then),
    /// so the harness that spawns measured commands stays small.
    pub max_rss_kib: u64,
    /// The monitors' CPU over the window, seconds.
    pub monitor_user_s: f64,
    pub monitor_sys_s: f64,
    /// Every CPU's time over the window (everyone's), seconds.
    pub machine_user_s: f64,
    pub machine_sys_s: f64,
    /// From the command's exit to the end of the window, seconds.
    pub drain_s: f64,
    /// The drain gave up after [`DRAIN_TIMEOUT`].
    pub timed_out: bool,
}

impl Sample {
    /// The monitors' user and system CPU.
    pub fn monitor_s(&self) -> f64 {
        self.monitor_user_s + self.monitor_sys_s
    }

    /// User CPU of others in the window: how busy the rest of the machine was.
    pub fn others_user_s(&self) -> f64 {
        (self.machine_user_s - self.user_s - self.monitor_user_s).max(0.0)
    }
}

/// What the sampler reads at one moment.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    at: Instant,
    machine: Ticks,
    monitors: Ticks,
    output_len: u64,
}

fn snapshot(monitors: &[u32], output: Option<&Path>) -> Result<Snapshot> {
    Ok(Snapshot {
        at: Instant::now(),
        machine: procfs::machine_ticks()?,
        monitors: procfs::cpu_ticks_of(monitors),
        output_len: output.and_then(|p| fs::metadata(p).ok()).map_or(0, |m| m.len()),
    })
}

/// Runs `cmd` (stdin from /dev/null; its stdout and stderr as the caller set them) and
/// measures it, with `monitors` (pids) watching it, ending the window as `drain` says.
pub fn sample(cmd: &mut Command, monitors: &[u32], drain: &Drain) -> Result<Sample> {
    let output = match drain {
        Drain::Idle { output } => output.as_deref(),
        _ => None,
    };
    if !monitors.is_empty() {
        // The monitors settle first: what came before is not charged to this command.
        wait_idle(monitors, None, SETTLE, Duration::from_secs(30))?;
    }
    let shown = format!("{cmd:?}");
    die_with_parent(cmd);
    let start = snapshot(monitors, output)?;
    let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("starting {shown}"))?;
    let (status, usage) = wait4(child.id()).with_context(|| format!("waiting for {shown}"))?;
    let exited = Instant::now();
    let (end, timed_out) = match drain {
        Drain::Exit => (snapshot(monitors, None)?, false),
        Drain::Idle { output } => wait_idle(monitors, output.as_deref(), QUIET, DRAIN_TIMEOUT)?,
        Drain::Marker { log, marker } => wait_marker(monitors, log, marker, DRAIN_TIMEOUT)?,
    };
    let (monitor_user_s, monitor_sys_s) = end.monitors.seconds_since(start.monitors);
    let (machine_user_s, machine_sys_s) = end.machine.seconds_since(start.machine);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    Ok(Sample {
        code,
        wall_s: exited.duration_since(start.at).as_secs_f64(),
        user_s: tv(usage.ru_utime),
        sys_s: tv(usage.ru_stime),
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        monitor_user_s,
        monitor_sys_s,
        machine_user_s,
        machine_sys_s,
        drain_s: end.at.saturating_duration_since(exited).as_secs_f64(),
        timed_out,
    })
}

/// Waits for the child `pid` and takes its resource usage.
fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let pid = libc::pid_t::try_from(pid).context("a pid fits pid_t")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and usage are valid for writes for the duration of the call; pid
        // is our own unreaped child (std's Child never waited for it).
        let got = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if got == pid {
            return Ok((status, usage));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
}

/// Polls until the monitors have been idle for `quiet`; returns the last busy snapshot
/// (the end of their work, to one poll) and whether `timeout` came first.
fn wait_idle(monitors: &[u32], output: Option<&Path>, quiet: Duration, timeout: Duration) -> Result<(Snapshot, bool)> {
    let first = snapshot(monitors, output)?;
    let mut recent = vec![first];
    let mut busy = first;
    loop {
        std::thread::sleep(POLL);
        let cur = snapshot(monitors, output)?;
        let prev = recent[recent.len() - 1];
        recent.push(cur);
        if recent.len() > BUSY_WINDOW + 1 {
            recent.remove(0);
        }
        let t = |s: &Snapshot| s.monitors.user + s.monitors.system;
        if cur.output_len != prev.output_len || t(&cur).saturating_sub(t(&recent[0])) >= BUSY_TICKS {
            busy = cur;
        } else if cur.at.duration_since(busy.at) >= quiet {
            return Ok((busy, false));
        }
        if cur.at.duration_since(first.at) > timeout {
            return Ok((busy, true));
        }
    }
}

/// Appends to `marker` and waits until its file name shows in `log`; returns the snapshot
/// then, and whether `timeout` came first.
fn wait_marker(monitors: &[u32], log: &Path, marker: &Path, timeout: Duration) -> Result<(Snapshot, bool)> {
    let name = marker.file_name().context("the marker has a file name")?.as_encoded_bytes().to_vec();
    let (mut ino, mut pos) = fs::metadata(log).map_or((0, 0), |m| (m.ino(), m.len()));
    let mut tail: Vec<u8> = Vec::new();
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(marker)
        .with_context(|| format!("appending to the marker {}", marker.display()))?;
    f.write_all(b"marker\n").with_context(|| format!("appending to the marker {}", marker.display()))?;
    drop(f);
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(mut f) = fs::File::open(log) {
            let meta = f.metadata().with_context(|| format!("reading {}", log.display()))?;
            if meta.ino() != ino {
                (ino, pos) = (meta.ino(), 0);
            }
            let mut data = Vec::new();
            f.seek(SeekFrom::Start(pos)).and_then(|_| f.read_to_end(&mut data)).ok();
            if !data.is_empty() {
                pos += data.len() as u64;
                tail.extend_from_slice(&data);
                if tail.windows(name.len()).any(|w| w == name) {
                    return Ok((snapshot(monitors, None)?, false));
                }
                tail.drain(..tail.len().saturating_sub(name.len()));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((snapshot(monitors, None)?, true))
}

/// Fails with the command's exit code and the end of its stderr file unless it exited 0.
pub fn check_exit(sample: &Sample, what: &str, stderr: &Path) -> Result<()> {
    if sample.code != 0 {
        let err = fs::read_to_string(stderr).unwrap_or_default();
        let tail: Vec<&str> = err.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} exited {}; its stderr ends with:\n{}", sample.code, tail.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]).stdout(Stdio::null());
        c
    }

    #[test]
    fn exit_code_wall_time_and_own_cpu() {
        let s = sample(&mut sh("exit 3"), &[], &Drain::Exit).unwrap();
        assert_eq!(s.code, 3);
        let s = sample(&mut sh("sleep 0.3"), &[], &Drain::Exit).unwrap();
        assert_eq!(s.code, 0);
        assert!(s.wall_s >= 0.3 && s.wall_s < 5.0, "wall {}", s.wall_s);
        assert!(s.user_s + s.sys_s < 0.2, "sleeping costs no CPU: {s:?}");
        assert_eq!((s.drain_s < 0.1, s.monitor_s(), s.timed_out), (true, 0.0, false));
        let s = sample(&mut sh("kill -9 $$"), &[], &Drain::Exit).unwrap();
        assert_eq!(s.code, 128 + 9);
    }

    #[test]
    fn cpu_and_peak_rss_include_the_reaped_children_of_a_pipeline() {
        // The shell's child (head | tr) runs the CPU; the shell holds 200 MB in a variable.
        // A child's peak starts at its parent's size when it was spawned (exec records the
        // peak of the memory it shared with the parent), and this test binary is tens of MB:
        // the command's own peak must stand well above that floor.
        let s = sample(
            &mut sh("x=$(head -c 200000000 /dev/zero | tr '\\0' a); test ${#x} -eq 200000000"),
            &[],
            &Drain::Exit,
        )
        .unwrap();
        assert_eq!(s.code, 0);
        assert!(s.max_rss_kib > 195_000, "peak RSS {} KiB", s.max_rss_kib);
        assert!(s.user_s + s.sys_s > 0.0);
        let small = sample(&mut sh("true"), &[], &Drain::Exit).unwrap();
        assert!(small.max_rss_kib + 100_000 < s.max_rss_kib, "{} vs {}", small.max_rss_kib, s.max_rss_kib);
    }

    #[test]
    fn the_window_stays_open_while_a_monitor_works() {
        // A "monitor" that starts burning CPU (about 0.7 s of it, no child processes) a
        // little after the command ended, then sleeps.
        let mut monitor = Command::new("sh")
            .args(["-c", "sleep 1; i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 30"])
            .spawn()
            .unwrap();
        let pid = monitor.id();
        let s = sample(&mut sh("true"), &[pid], &Drain::Idle { output: None });
        monitor.kill().unwrap();
        monitor.wait().unwrap();
        let s = s.unwrap();
        assert!(!s.timed_out);
        assert!(s.drain_s > 0.5, "the drain waited for the busy monitor: {s:?}");
        assert!(s.monitor_s() > 0.3, "the monitor's CPU is in the window: {s:?}");
    }

    #[test]
    fn a_marker_ends_the_window_when_it_shows_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (log, marker) = (dir.path().join("log"), dir.path().join("marker-1"));
        fs::write(&log, "before\n").unwrap();
        let (l, m) = (log.clone(), marker.clone());
        // The "monitor" logs the marker's name 300 ms after it is appended to.
        let writer = std::thread::spawn(move || {
            while !m.exists() {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(300));
            OpenOptions::new().append(true).open(&l).unwrap().write_all(b"name=marker-1\n").unwrap();
        });
        let s = sample(&mut sh("true"), &[], &Drain::Marker { log, marker }).unwrap();
        writer.join().unwrap();
        assert!(!s.timed_out);
        assert!(s.drain_s >= 0.3 && s.drain_s < 5.0, "drain {}", s.drain_s);
    }
}
