//! Helpers for the watch-mode tests: a running `kubefim watch` over a fixture's tree (with
//! its stdout parsed line by line as it comes, each line checked against `kubefim schema
//! events` and read back into the watcher's own types), waits for the report of one path with a
//! deadline, a check that nothing is reported, and child processes whose pid the tests
//! compare with the report's. The watcher loads the real programs into the real kernel:
//! these tests need root, as CI has.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{BIN, Fixture, Rule, kubefim};

/// The validator of `kubefim schema events`, made once per test binary.
fn events_schema() -> &'static jsonschema::Validator {
    static SCHEMA: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    SCHEMA.get_or_init(|| {
        let run = kubefim(["schema", "events"]);
        run.expect_code(0);
        jsonschema::draft202012::new(&run.json()).expect("`kubefim schema events` is a valid JSON Schema")
    })
}

/// Why `line` is not what a consumer of the documented schema expects: it must conform to
/// `kubefim schema events` and read back into the watcher's line type. `None` when it is.
pub fn event_line_problem(line: &str, value: &Value) -> Option<String> {
    let errors: Vec<String> =
        events_schema().iter_errors(value).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    if !errors.is_empty() {
        return Some(format!("does not conform to `kubefim schema events`: {errors:?}: {line}"));
    }
    serde_json::from_str::<kubefim_watcher::model::Event>(line)
        .err()
        .map(|e| format!("does not read back into its type ({e}): {line}"))
}

/// How long a change may take to be reported (the contract).
pub const REPORT_WITHIN: Duration = Duration::from_secs(2);
/// How long the watcher may take to load, attach and rescan.
pub const READY_WITHIN: Duration = Duration::from_secs(60);

/// `kubefim watch --format jsonl --db DB --pubkey PUB --ready-file READY`, as a command.
pub fn watch_cmd(db: &Path, pubkey: &Path, ready: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("watch")
        .arg("--db")
        .arg(db)
        .arg("--pubkey")
        .arg(pubkey)
        .arg("--format")
        .arg("jsonl")
        .arg("--ready-file")
        .arg(ready);
    cmd
}

/// A running watcher.
pub struct Watcher {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    /// Lines that are not JSON, or not what the events schema says.
    bad: Arc<Mutex<Vec<String>>>,
    raw: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

/// The report kinds that are changes (the others are the watcher's own state).
pub fn is_change(line: &Value) -> bool {
    matches!(line["kind"].as_str(), Some("added" | "removed" | "modified" | "renamed"))
}

impl Watcher {
    /// Creates a baseline of `fx`'s tree under `rules` (default: one `diff: true` rule over
    /// the tree) and starts `kubefim watch --format jsonl` on it, waiting until it is ready.
    #[track_caller]
    pub fn start(fx: &Fixture, rules: Option<&[Rule]>) -> Watcher {
        let policy = match rules {
            Some(rules) => fx.write_policy(rules),
            None => fx.write_policy(&[Rule::new(fx.tree()).diff()]),
        };
        fx.create(&policy);
        Self::start_on(fx, &[])
    }

    /// Starts the watcher on the fixture's existing baseline, with extra flags.
    #[track_caller]
    pub fn start_on(fx: &Fixture, extra: &[&str]) -> Watcher {
        Self::start_on_env(fx, extra, &[])
    }

    /// [`Watcher::start_on`], with these environment variables set for it.
    #[track_caller]
    pub fn start_on_env(fx: &Fixture, extra: &[&str], env: &[(&str, &std::path::Path)]) -> Watcher {
        let ready = fx.path("ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
        cmd.args(extra).envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubefim watch");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let bad = Arc::new(Mutex::new(Vec::new()));
        let (l, r, b) = (lines.clone(), raw.clone(), bad.clone());
        // Made before the watcher prints, so a check of its lines never waits on the build of
        // the validator.
        events_schema();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                r.lock().unwrap().push(line.clone());
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if let Some(problem) = event_line_problem(&line, &v) {
                            b.lock().unwrap().push(problem);
                        }
                        l.lock().unwrap().push(v);
                    }
                    Err(e) => b.lock().unwrap().push(format!("not JSON ({e}): {line}")),
                }
            }
        });
        let err = child.stderr.take().expect("piped stderr");
        let e = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = e.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut w = Watcher { child: Some(child), lines, bad, raw, stderr };
        let deadline = Instant::now() + READY_WITHIN;
        // Both the file and the "ready" line on stderr (read by a thread that may lag).
        while !(ready.exists() && w.stderr.lock().unwrap().contains("ready")) {
            if let Some(status) = w.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("kubefim watch exited before it was ready: {status}\n{}", w.dump());
            }
            assert!(
                Instant::now() < deadline,
                "kubefim watch not ready (ready file and \"ready\" on stderr) within {READY_WITHIN:?}\n{}",
                w.dump()
            );
            thread::sleep(Duration::from_millis(20));
        }
        w
    }

    /// The watcher's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The value of a metric without labels on the watcher's endpoint (it must have been
    /// started with `--listen 127.0.0.1:0`).
    #[track_caller]
    pub fn metric(&self, name: &str) -> f64 {
        use std::io::Write;
        const SAYS: &str = "serving /metrics, /healthz and /readyz on http://";
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = loop {
            let said = self.stderr.lock().unwrap().lines().find_map(|l| Some(l.split_once(SAYS)?.1.trim().to_owned()));
            if let Some(addr) = said {
                break addr;
            }
            assert!(Instant::now() < deadline, "no endpoint address on stderr\n{}", self.dump());
            thread::sleep(Duration::from_millis(50));
        };
        let mut stream = std::net::TcpStream::connect(&addr).expect("connect to the metrics endpoint");
        stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
    }

    /// Everything printed so far, for failure messages.
    pub fn dump(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.raw.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap()
        )
    }

    /// All lines printed so far (each checked against the events schema).
    #[track_caller]
    pub fn lines(&self) -> Vec<Value> {
        self.assert_lines_conform();
        self.lines.lock().unwrap().clone()
    }

    /// Panics if a line printed so far is not what the events schema says.
    #[track_caller]
    pub fn assert_lines_conform(&self) {
        let bad = self.bad.lock().unwrap().clone();
        assert!(bad.is_empty(), "watch printed lines that break its schema: {bad:#?}\n{}", self.dump());
    }

    /// Waits up to `timeout` for a line matching `pred`; panics with the output otherwise.
    #[track_caller]
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_lines_conform();
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no report of {what} within {timeout:?}\n{}", self.dump());
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The change report for `path` (waiting up to [`REPORT_WITHIN`]).
    #[track_caller]
    pub fn change_for(&self, path: &Path) -> Value {
        let want = path.to_str().expect("UTF-8 test path").to_owned();
        self.wait_for(&want.clone(), REPORT_WITHIN, move |l| is_change(l) && l["path"] == want.as_str())
    }

    /// Every change report about `path` so far.
    pub fn changes_for(&self, path: &Path) -> Vec<Value> {
        let want = path.to_str().expect("UTF-8 test path");
        self.lines().into_iter().filter(|l| is_change(l) && l["path"] == want).collect()
    }

    /// Panics if any change under `prefix` is reported within `quiet`.
    #[track_caller]
    pub fn assert_nothing_under(&self, prefix: &Path, quiet: Duration) {
        thread::sleep(quiet);
        let prefix = prefix.to_str().expect("UTF-8 test path");
        let found: Vec<Value> = self
            .lines()
            .into_iter()
            .filter(|l| is_change(l) && l["path"].as_str().is_some_and(|p| p.starts_with(prefix)))
            .collect();
        assert!(found.is_empty(), "unexpected reports under {prefix}: {found:#?}\n{}", self.dump());
    }

    /// Sends SIGTERM and waits for the exit.
    #[track_caller]
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM the watcher");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // The lines printed while stopping are checked too (the reader thread may
                // still be reading them: give it a moment).
                thread::sleep(Duration::from_millis(100));
                self.assert_lines_conform();
                if !status.success() {
                    // Callers assert success: what the watcher said is what explains a failure.
                    eprintln!("kubefim watch exited with {status}\n{}", self.dump());
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kubefim watch did not exit within 20 s of SIGTERM\n{}", self.dump());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a child process to completion (it must succeed) and returns its pid.
#[track_caller]
pub fn run_child(mut cmd: Command) -> u32 {
    let cmdline = format!("{cmd:?}");
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let child = child.unwrap_or_else(|e| panic!("cannot spawn {cmdline}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmdline} failed: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// A shell command as a child (`sh -c`), run to completion; returns its pid.
#[track_caller]
pub fn sh(script: &str) -> u32 {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    run_child(cmd)
}

/// A python3 snippet as a child, run to completion; returns its pid (python3 is in every
/// Debian install and reaches the syscalls the shell tools do not: pwrite, writev, ...).
#[track_caller]
pub fn python(code: &str) -> u32 {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(code);
    run_child(cmd)
}

/// `path` as a `String`, for comparing with report fields.
pub fn s(path: &Path) -> String {
    path.to_str().expect("UTF-8 test path").to_owned()
}

/// The names in a report's array field.
pub fn names(line: &Value, field: &str) -> Vec<String> {
    line[field].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// A path for report assertions.
pub fn p(dir: &Path, rel: &str) -> PathBuf {
    dir.join(rel)
}
