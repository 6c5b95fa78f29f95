//! The agent as a DaemonSet runs it, on the real kernel with the real eBPF programs: the
//! baseline lifecycle without the private key on the node (first start with no baseline, a
//! signing request on stdout, not ready until the operator's signature arrives, accepting
//! changes by a new scan and signature, refusing foreign and stale signatures, reusing a
//! pending scan across a restart, never rescanning over a tampered database), a host root
//! mounted elsewhere (`--host-root`: policy paths in, policy paths out), the scheduled verify
//! and its metrics on `--listen`, and pod attribution through a stand-in Kubernetes API that
//! serves the pod of a real podman container. And the agent under attack from the node: its
//! kernel filter's entries deleted with bpftool (noticed, not ready, refilled, rescanned), its
//! descriptors exhausted for a rehash (an `error` line, not a change) and its port flooded
//! with idle half-sent requests (probes and reports go on). Every change is made by a real
//! child process.
//!
//! Root only (CI runs as root); never skipped there. The tests of this file may run in
//! parallel with each other: each has its own temp dirs, file names, ports and node name.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::api::ApiServer;
use common::podman::{IMAGE, ensure_image, podman};
use common::watch::{READY_WITHIN, REPORT_WITHIN, is_change, python, run_child, s, watch_cmd};
use common::{Fixture, Rule, chmod, copy_dir, kubefim, largest_file, run_with_timeout, used_len};
use serde_json::{Value, json};

#[track_caller]
fn root_or_skip() -> bool {
    if !common::is_root() {
        assert!(std::env::var_os("CI").is_none(), "agent tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

/// How long a signature may take to be picked up and installed (the agent looks every 2 s,
/// then loads the programs and rescans).
const INSTALL_WITHIN: Duration = Duration::from_secs(30);
/// How long a state line about a signature (rejected) may take: two polls and some slack.
const SIGNATURE_SEEN_WITHIN: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// A running agent
// ---------------------------------------------------------------------------------------------

/// A `kubefim watch` started by a test, its stdout parsed line by line as it comes (a line
/// that is not JSON is kept as a JSON string, and [`Agent::assert_only_json`] fails on it),
/// its stderr kept. Killed when dropped.
struct Agent {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    #[track_caller]
    fn spawn(mut cmd: Command) -> Agent {
        let cmdline = format!("{cmd:?}");
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot spawn {cmdline}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("piped stdout");
        let (l, r) = (Arc::clone(&lines), Arc::clone(&raw));
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let value = serde_json::from_str::<Value>(&line).unwrap_or_else(|_| Value::String(line.clone()));
                r.lock().unwrap().push(line);
                l.lock().unwrap().push(value);
            }
        });
        let err = child.stderr.take().expect("piped stderr");
        let e = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut text = e.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        Agent { child: Some(child), lines, raw, stderr }
    }

    /// Everything printed so far, for failure messages.
    fn dump(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.raw.lock().unwrap().join("\n"), self.stderr())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Every stdout line so far.
    fn raw(&self) -> Vec<String> {
        self.raw.lock().unwrap().clone()
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().unwrap().clone()
    }

    /// How many stdout lines so far: a mark for [`Agent::wait_from`].
    fn mark(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Panics (with the output) if the agent has exited.
    #[track_caller]
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("the agent was stopped");
        if let Some(status) = child.try_wait().expect("try_wait on the agent") {
            // Let the reader threads catch up with what it printed last.
            thread::sleep(Duration::from_millis(100));
            panic!("the agent exited unexpectedly ({status})\n{}", self.dump());
        }
    }

    /// Waits up to `timeout` for `check` to give something, polling; panics with the output
    /// when the deadline passes or the agent exits.
    #[track_caller]
    fn until<T>(&mut self, what: &str, timeout: Duration, mut check: impl FnMut(&Agent) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "no {what} within {timeout:?}\n{}", self.dump());
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The first stdout line at index `from` or later that matches `pred`, with its index.
    #[track_caller]
    fn wait_from(
        &mut self,
        what: &str,
        timeout: Duration,
        from: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        self.until(what, timeout, |a| {
            a.lines.lock().unwrap().iter().enumerate().skip(from).find(|(_, l)| pred(l)).map(|(i, l)| (i, l.clone()))
        })
    }

    /// The first stdout line at `from` or later of this `kind` (awaiting-signature, verify...).
    #[track_caller]
    fn wait_kind(&mut self, kind: &str, timeout: Duration, from: usize) -> (usize, Value) {
        self.wait_from(&format!("{kind:?} line"), timeout, from, |l| l["kind"] == kind)
    }

    /// The first change report of `path` at `from` or later.
    #[track_caller]
    fn change_from(&mut self, path: &str, timeout: Duration, from: usize) -> Value {
        self.wait_from(&format!("change of {path}"), timeout, from, |l| is_change(l) && l["path"] == path).1
    }

    /// Every line of this kind so far.
    fn of_kind(&self, kind: &str) -> Vec<Value> {
        self.lines().into_iter().filter(|l| l["kind"] == kind).collect()
    }

    /// Waits for the watch loop's ready: the ready file and "ready" on stderr.
    #[track_caller]
    fn wait_ready(&mut self, ready_file: &Path) {
        self.until("ready (ready file and \"ready\" on stderr)", READY_WITHIN, |a| {
            (ready_file.exists() && a.stderr().lines().any(|l| l.trim() == "ready")).then_some(())
        });
    }

    /// The address the agent says it serves its endpoint on.
    #[track_caller]
    fn endpoint(&mut self) -> SocketAddr {
        const SAYS: &str = "serving /metrics, /healthz and /readyz on http://";
        self.until("endpoint address on stderr", READY_WITHIN, |a| {
            a.stderr().lines().find_map(|l| l.split_once(SAYS).map(|(_, addr)| addr.trim().to_owned()))
        })
        .parse()
        .unwrap_or_else(|e| panic!("the endpoint address does not parse ({e})\n{}", self.dump()))
    }

    /// Waits for `GET path` to answer `status` with a body containing `body`; returns the body.
    #[track_caller]
    fn wait_http(&mut self, addr: SocketAddr, path: &str, status: u16, body: &str) -> String {
        let what = format!("{status} on {path} with {body:?} in the body");
        let deadline = Instant::now() + INSTALL_WITHIN;
        loop {
            let got = http_get(addr, path);
            if let Ok((code, text)) = &got
                && *code == status
                && text.contains(body)
            {
                return text.clone();
            }
            self.assert_running();
            assert!(Instant::now() < deadline, "no {what} within {INSTALL_WITHIN:?}; last: {got:?}\n{}", self.dump());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics unless every stdout line was one JSON object (the jsonl contract).
    #[track_caller]
    fn assert_only_json(&self) {
        let bad: Vec<Value> = self.lines().into_iter().filter(|l| !l.is_object()).collect();
        assert!(bad.is_empty(), "lines that are not JSON objects: {bad:#?}\n{}", self.dump());
        // And each one what `kubefim schema events` says (the awaiting-signature, install,
        // rejection, verify and degraded lines included).
        let broken: Vec<String> = self
            .raw()
            .iter()
            .zip(self.lines())
            .filter_map(|(line, value)| common::watch::event_line_problem(line, &value))
            .collect();
        assert!(broken.is_empty(), "lines that break the events schema: {broken:#?}\n{}", self.dump());
    }

    /// Sends SIGTERM and waits for the exit (and the readers to finish).
    #[track_caller]
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent was stopped already");
        let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM the agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not exit within 20 s of SIGTERM\n{}", self.dump());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: HTTP, metrics, signing
// ---------------------------------------------------------------------------------------------

/// `GET path` on the agent's endpoint: the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let bad = || std::io::Error::other(format!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let chunked = head.lines().any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    Ok((status, if chunked { dechunk(body) } else { body.to_owned() }))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The samples of a Prometheus/OpenMetrics text exposition, by series (`name{labels}`).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let split = l.rfind('}').map_or_else(|| l.find(' '), |end| Some(end + 1))?;
            let (series, rest) = l.split_at(split);
            Some((series.to_owned(), rest.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// The value of one series; panics with the exposition when it is missing.
#[track_caller]
fn sample(metrics: &HashMap<String, f64>, series: &str, text: &str) -> f64 {
    *metrics.get(series).unwrap_or_else(|| panic!("no series {series} in /metrics:\n{text}"))
}

/// `kubefim baseline sign --key KEY --expect-policy POLICY --out STAGING REQUESTS`, then the
/// signature moved into `signatures/<node>` in one rename, as a ConfigMap update lands (the
/// agent must not see a half-written file). Returns the signature.
#[track_caller]
fn sign_into(key: &Path, policy: &Path, requests: &str, staging: &Path, signatures: &Path, node: &str) -> Value {
    fs::create_dir_all(staging).unwrap();
    let input = staging.join("requests.log");
    fs::write(&input, requests).unwrap();
    let mut argv: Vec<OsString> = ["baseline", "sign", "--key"].map(OsString::from).to_vec();
    argv.extend([key.into(), "--expect-policy".into(), policy.into(), "--out".into(), staging.into(), input.into()]);
    let run = kubefim(argv);
    run.expect_code(0);
    let written = staging.join(node);
    let text = fs::read_to_string(&written)
        .unwrap_or_else(|e| panic!("baseline sign wrote no {} ({e})\n{}", written.display(), run.dump()));
    let signature: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("signature is not JSON ({e}): {text}"));
    assert_eq!(signature["kind"], "KubefimSignature", "{signature:#}");
    assert_eq!(signature["node"], node, "{signature:#}");
    fs::create_dir_all(signatures).unwrap();
    fs::rename(&written, signatures.join(node)).unwrap();
    signature
}

/// Puts `signature` (a file's content) in `signatures/<node>` in one rename.
fn deliver(signature: &str, staging: &Path, signatures: &Path, node: &str) {
    fs::create_dir_all(staging).unwrap();
    let tmp = staging.join(format!("{node}.tmp"));
    fs::write(&tmp, signature).unwrap();
    fs::rename(&tmp, signatures.join(node)).unwrap();
}

/// Appends `text` to `path` from a python3 child; returns its pid.
#[track_caller]
fn append(path: &Path, text: &str) -> u32 {
    python(&format!("f = open({:?}, 'a'); f.write({text:?}); f.close()", s(path)))
}

/// Asserts that `line` is a change made by a process on the host (not in a container).
#[track_caller]
fn assert_host_origin(line: &Value, pid: u32, agent: &Agent) {
    assert_eq!(line["origin"], "host", "{line:#}\n{}", agent.dump());
    assert_eq!(line["pod"], Value::Null, "{line:#}");
    assert_eq!(line["container"], Value::Null, "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!(line["detected_by"], "event", "{line:#}");
}

// ---------------------------------------------------------------------------------------------
// 1-2: the baseline lifecycle
// ---------------------------------------------------------------------------------------------

#[test]
fn first_start_waits_unready_for_a_signature_then_installs_accepts_and_refuses_signatures() {
    if !root_or_skip() {
        return;
    }
    const NODE: &str = "lifecycle-node";
    let fx = Fixture::on_disk();
    let conf = fx.t("lifecycle.conf");
    fs::write(&conf, "alpha\n").unwrap();
    let policy = fx.write_policy(&[Rule::new(fx.tree()).diff()]);
    let (signatures, staging, ready) = (fx.path("signatures"), fx.path("staging"), fx.path("ready"));
    fs::create_dir(&signatures).unwrap();
    let pending = fx.path("db.pending");
    let start = || {
        let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
        cmd.arg("--init-policy").arg(&policy).arg("--signatures").arg(&signatures).args([
            "--node-name",
            NODE,
            "--listen",
            "127.0.0.1:0",
        ]);
        Agent::spawn(cmd)
    };

    // No database: a scan into db.pending, its request on stdout, and not ready.
    let mut agent = start();
    let addr = agent.endpoint();
    let (_, awaiting) = agent.wait_kind("awaiting-signature", READY_WITHIN, 0);
    let request = awaiting["request"].clone();
    assert_eq!(awaiting["node"], NODE, "{awaiting:#}");
    assert_eq!(request["kind"], "KubefimSigningRequest", "{awaiting:#}");
    assert_eq!(request["node"], NODE, "{awaiting:#}");
    let digest = request["digest"].as_str().expect("the request names its digest").to_owned();
    assert_eq!(digest.len(), 64, "{awaiting:#}");
    agent.wait_http(addr, "/readyz", 503, "baseline awaiting signature");
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200, "not live while waiting\n{}", agent.dump());
    assert!(!fx.db().exists(), "a baseline was trusted before any signature");
    assert!(pending.is_dir(), "no pending baseline at {}", pending.display());
    assert!(!ready.exists(), "ready without a baseline\n{}", agent.dump());
    assert!(!agent.stderr().lines().any(|l| l.trim() == "ready"), "said ready\n{}", agent.dump());
    assert!(agent.stop().success(), "SIGTERM while waiting is not a clean exit\n{}", agent.dump());

    // Restarted while the request waits: the same scan, not a new one.
    let mut agent = start();
    let addr = agent.endpoint();
    let (_, again) = agent.wait_kind("awaiting-signature", READY_WITHIN, 0);
    assert_eq!(again["request"]["digest"], digest.as_str(), "rescanned instead of reusing the pending scan");
    assert_eq!(again["request"]["created_unix_ns"], request["created_unix_ns"], "{again:#}");
    agent.wait_http(addr, "/readyz", 503, "baseline awaiting signature");

    // The operator signs the agent's whole log elsewhere; the signature arrives.
    let log = agent.raw().join("\n");
    let first_signature = sign_into(&fx.key(), &policy, &log, &staging, &signatures, NODE);
    assert_eq!(first_signature["digest"], digest.as_str());
    let (installed_at, installed) = agent.wait_kind("baseline-installed", INSTALL_WITHIN, 0);
    assert_eq!(installed["digest"], digest.as_str(), "{installed:#}");
    assert_eq!(installed["node"], NODE, "{installed:#}");
    agent.wait_ready(&ready);
    agent.wait_http(addr, "/readyz", 200, "ready");
    let (_, verify) = agent.wait_kind("verify", REPORT_WITHIN, installed_at);
    assert_eq!((&verify["reason"], &verify["result"]), (&json!("startup"), &json!("clean")), "{verify:#}");
    assert!(fx.db().is_dir() && !pending.exists(), "not installed at --db\n{}", agent.dump());
    fx.show(); // The installed baseline verifies with the public key.
    let mark = agent.mark();
    let pid = append(&conf, "beta\n");
    let line = agent.change_from(&s(&conf), REPORT_WITHIN, mark);
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert_host_origin(&line, pid, &agent);

    // Accepting the change: a new pending scan and its signature replace the baseline.
    let mut scan: Vec<OsString> = ["baseline", "scan", "--policy"].map(OsString::from).to_vec();
    scan.extend([policy.clone().into(), "--db".into(), fx.db().into(), "--node-name".into(), NODE.into()]);
    let scanned = kubefim(scan.clone());
    scanned.expect_code(0);
    let accept_request = scanned.json();
    assert_eq!(accept_request["kind"], "KubefimSigningRequest", "{}", scanned.dump());
    let accept_digest = accept_request["digest"].as_str().unwrap().to_owned();
    assert_ne!(accept_digest, digest);
    let mark = agent.mark();
    sign_into(&fx.key(), &policy, &scanned.stdout, &staging, &signatures, NODE);
    let (at, installed) = agent.wait_kind("baseline-installed", INSTALL_WITHIN, mark);
    assert_eq!(installed["digest"], accept_digest.as_str(), "{installed:#}");
    // The watch restarts on it, and the accepted change is no deviation any more.
    let (_, verify) = agent.wait_kind("verify", INSTALL_WITHIN, at);
    assert_eq!(verify["reason"], "startup", "{verify:#}");
    assert_eq!(verify["result"], "clean", "the accepted baseline is not the one in use\n{}", agent.dump());
    agent.wait_http(addr, "/readyz", 200, "ready");
    let mark = agent.mark();
    let pid = append(&conf, "gamma\n");
    let line = agent.change_from(&s(&conf), REPORT_WITHIN, mark);
    assert_host_origin(&line, pid, &agent);
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("\n+gamma\n")), "{line:#}");

    // A stale signature (the first baseline's) and one made with another key change nothing.
    let scanned = kubefim(scan);
    scanned.expect_code(0);
    let refused_digest = scanned.json()["digest"].as_str().unwrap().to_owned();
    let mark = agent.mark();
    deliver(&first_signature.to_string(), &staging, &signatures, NODE);
    let (_, stale) = agent.wait_kind("signature-rejected", SIGNATURE_SEEN_WITHIN, mark);
    assert_eq!(stale["digest"], digest.as_str(), "{stale:#}");
    let other_keys = fx.path("other-keys");
    fx.keygen_into(&other_keys);
    let mark = agent.mark();
    let foreign = sign_into(&other_keys.join("kubefim.key"), &policy, &scanned.stdout, &staging, &signatures, NODE);
    assert_eq!(foreign["digest"], refused_digest.as_str());
    let (_, rejected) = agent.wait_kind("signature-rejected", SIGNATURE_SEEN_WITHIN, mark);
    assert!(
        rejected["error"].as_str().is_some_and(|e| e.contains("does not verify")),
        "not rejected for its key: {rejected:#}"
    );
    assert!(pending.is_dir(), "the refused pending baseline is gone");
    let mark = agent.mark();
    let pid = append(&conf, "delta\n");
    let line = agent.change_from(&s(&conf), REPORT_WITHIN, mark);
    assert_host_origin(&line, pid, &agent);
    assert_eq!(agent.of_kind("baseline-installed").len(), 2, "a refused signature was installed\n{}", agent.dump());
    agent.wait_http(addr, "/readyz", 200, "ready");
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

#[test]
fn tampered_database_exits_3_with_init_policy_and_is_never_rescanned() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    for i in 0..20 {
        fs::write(fx.t(format!("tamper-{i:02}.txt")), format!("content {i}\n")).unwrap();
    }
    let policy = fx.write_policy(&[Rule::new(fx.tree())]);
    fx.create(&policy);
    let signatures = fx.path("signatures");
    fs::create_dir(&signatures).unwrap();
    // One edit through the store (a record changed, the signature left), one byte flipped
    // in the middle of the database file.
    let edited = fx.path("db-edited");
    copy_dir(&fx.db(), &edited);
    kubefim([
        OsString::from("debug"),
        "tamper".into(),
        "--db".into(),
        edited.clone().into(),
        "--op".into(),
        "edit-record".into(),
    ])
    .expect_code(0);
    let flipped = fx.path("db-flipped");
    copy_dir(&fx.db(), &flipped);
    let file = largest_file(&flipped);
    let mut bytes = fs::read(&file).unwrap();
    let at = used_len(&bytes) / 2;
    bytes[at] ^= 0x01;
    fs::write(&file, bytes).unwrap();

    let ready = fx.path("ready");
    let watch = |db: &Path| {
        let mut cmd = watch_cmd(db, &fx.pubkey(), &ready);
        cmd.arg("--init-policy").arg(&policy).arg("--signatures").arg(&signatures).args(["--node-name", "tamper-node"]);
        cmd
    };
    for db in [&edited, &flipped] {
        let run = run_with_timeout(watch(db), Duration::from_secs(30));
        run.expect_code(3);
        assert!(
            !run.stdout.contains("awaiting-signature"),
            "asked to sign a rescan over a tampered db\n{}",
            run.dump()
        );
        assert!(run.stdout.trim().is_empty(), "printed lines though it never started\n{}", run.dump());
        assert!(
            !PathBuf::from(format!("{}.pending", s(db))).exists(),
            "scanned a pending baseline beside {}",
            db.display()
        );
        assert!(!ready.exists(), "wrote the ready file\n{}", run.dump());
        assert!(!run.stderr.contains("panicked"), "{}", run.dump());
        let lower = run.stderr.to_lowercase();
        assert!(
            ["signature", "trust", "tamper", "seal"].iter().any(|w| lower.contains(w)),
            "the message does not say why\n{}",
            run.dump()
        );
    }
    // The same flags on the untouched original: it starts, so the refusals were the tampering.
    let mut agent = Agent::spawn(watch(&fx.db()));
    agent.wait_ready(&ready);
    assert!(agent.of_kind("awaiting-signature").is_empty(), "{}", agent.dump());
    assert!(agent.stop().success(), "{}", agent.dump());
}

// ---------------------------------------------------------------------------------------------
// 3: a host root mounted elsewhere
// ---------------------------------------------------------------------------------------------

/// A policy path that exists only under the test's host root, never on this machine.
const HOST_APP: &str = "/srv/kubefim-agent-test/app";

#[test]
fn host_root_maps_policy_paths_in_and_reports_them_as_host_paths() {
    if !root_or_skip() {
        return;
    }
    assert!(!Path::new(HOST_APP).exists(), "{HOST_APP} exists on this machine: the test needs a path that does not");
    let fx = Fixture::on_disk();
    let host_root = fx.path("hostroot");
    let app = host_root.join(HOST_APP.trim_start_matches('/'));
    fs::create_dir_all(app.join("bin")).unwrap();
    fs::write(app.join("config"), "listen = 8080\n").unwrap();
    fs::write(app.join("bin/server"), "#!/bin/sh\nexec true\n").unwrap();
    chmod(&app.join("bin/server"), 0o755);
    let policy = fx.write_policy(&[Rule::new(HOST_APP).diff()]);
    let host = |args: &[&str]| {
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.extend(["--host-root".into(), host_root.clone().into()]);
        argv
    };
    let (db, key, pubkey) = (s(&fx.db()), s(&fx.key()), s(&fx.pubkey()));
    let policy_arg = s(&policy);
    kubefim(host(&["baseline", "create", "--policy", policy_arg.as_str(), "--db", db.as_str(), "--key", key.as_str()]))
        .expect_code(0);
    let recorded = common::recorded_paths(&fx.show());
    for want in [HOST_APP.to_owned(), format!("{HOST_APP}/config"), format!("{HOST_APP}/bin/server")] {
        assert!(recorded.contains(&want), "no record of {want}: {recorded:?}");
    }
    let verify_args = ["verify", "--db", db.as_str(), "--pubkey", pubkey.as_str(), "--format", "json"];
    let clean = kubefim(host(&verify_args));
    clean.expect_code(0);
    assert_eq!(clean.json()["summary"]["clean"], true, "{}", clean.dump());

    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    cmd.arg("--host-root").arg(&host_root);
    let mut agent = Agent::spawn(cmd);
    agent.wait_ready(&ready);
    // The children work in the mapped directory by relative names, so that nothing in their
    // command lines names the host root either: only the mapping can.
    let in_app = |program: &str, script: &str| {
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(script).current_dir(&app);
        run_child(cmd)
    };
    let config = format!("{HOST_APP}/config");
    let pid = in_app("python3", "f = open('config', 'a'); f.write('workers = 4\\n'); f.close()");
    let line = agent.change_from(&config, REPORT_WITHIN, 0);
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("\n+workers = 4\n")), "{line:#}");
    let new = format!("{HOST_APP}/new");
    let pid = in_app("sh", "echo fresh > new");
    let line = agent.change_from(&new, REPORT_WITHIN, 0);
    assert_eq!(line["kind"], "added", "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();

    let changed = kubefim(host(&verify_args));
    changed.expect_code(1);
    let report = changed.json();
    assert_eq!(common::change_for(&report, Path::new(&config))["kind"], "modified", "{report:#}");
    assert_eq!(common::change_for(&report, Path::new(&new))["kind"], "added", "{report:#}");
    let mapped = s(&host_root);
    for text in agent.raw().iter().chain([&changed.stdout, &clean.stdout]) {
        assert!(!text.contains(&mapped), "a report names the host root {mapped}: {text}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4: the scheduled verify and the metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn interval_verify_reports_a_deviation_and_its_end_in_lines_and_metrics() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let file = fx.t("metered.conf");
    fs::write(&file, "alpha\n").unwrap();
    chmod(&file, 0o644);
    // Content-only attributes: a restored file counts as clean whatever its times.
    let attrs = ["type", "content", "size", "mode", "uid", "gid"];
    let policy = fx.write_policy(&[Rule::new(fx.tree()).attributes(&attrs)]);
    fx.create(&policy);
    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    cmd.args(["--verify-interval", "2s", "--listen", "127.0.0.1:0"]);
    let mut agent = Agent::spawn(cmd);
    let addr = agent.endpoint();
    agent.wait_ready(&ready);
    let (_, startup) = agent.wait_kind("verify", REPORT_WITHIN, 0);
    assert_eq!(startup["reason"], "startup", "{startup:#}");
    assert_eq!(startup["result"], "clean", "{startup:#}");
    assert_eq!((&startup["added"], &startup["removed"], &startup["modified"]), (&json!(0), &json!(0), &json!(0)));
    agent.wait_http(addr, "/readyz", 200, "ready");
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_last_verify_success 1");
    let m = samples(&text);
    assert_eq!(sample(&m, "kubefim_baseline_trusted", &text), 1.0);
    assert_eq!(sample(&m, "kubefim_baseline_entries", &text), 2.0, "the tree and its file");

    // A change in content and mode: reported at once, then by the next interval verify.
    let mark = agent.mark();
    let pid = python(&format!(
        "import os; f = open({0:?}, 'w'); f.write('changed\\n'); f.close(); os.chmod({0:?}, 0o600)",
        s(&file)
    ));
    let line = agent.change_from(&s(&file), REPORT_WITHIN, mark);
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    let (_, verify) = agent.wait_from("an interval verify that found the change", Duration::from_secs(10), mark, |l| {
        l["kind"] == "verify" && l["reason"] == "interval" && l["result"] == "changed"
    });
    assert_eq!((&verify["added"], &verify["removed"], &verify["modified"]), (&json!(0), &json!(0), &json!(1)));
    assert_eq!(verify["errors"], 0, "{verify:#}");
    assert_eq!(verify["deviations"], json!([{"path": s(&file), "kind": "modified"}]), "{verify:#}");
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_last_verify_success 0");
    let m = samples(&text);
    assert_eq!(sample(&m, "kubefim_last_verify_changes{kind=\"modified\"}", &text), 1.0);
    assert_eq!(sample(&m, "kubefim_last_verify_changes{kind=\"added\"}", &text), 0.0);
    assert!(sample(&m, "kubefim_changes_total{kind=\"modified\"}", &text) >= 1.0, "{text}");
    assert!(sample(&m, "kubefim_events_total{op=\"write\"}", &text) >= 1.0, "{text}");
    assert!(sample(&m, "kubefim_verify_runs_total{result=\"changed\"}", &text) >= 1.0, "{text}");
    assert!(sample(&m, "kubefim_verify_runs_total{result=\"clean\"}", &text) >= 1.0, "{text}");
    assert!(sample(&m, "kubefim_rehash_duration_seconds_count", &text) >= 1.0, "{text}");
    assert_eq!(sample(&m, "kubefim_lost_events_total{dropped_by=\"kernel\"}", &text), 0.0);
    assert_eq!(sample(&m, "kubefim_baseline_trusted", &text), 1.0);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    let last = sample(&m, "kubefim_last_verify_timestamp_seconds", &text);
    assert!((now - last).abs() < 30.0, "last verify at {last}, now {now}");

    // Restored content and mode: a later verify is clean again.
    let mark = agent.mark();
    python(&format!(
        "import os; f = open({0:?}, 'w'); f.write('alpha\\n'); f.close(); os.chmod({0:?}, 0o644)",
        s(&file)
    ));
    // (One report or two: the write and the chmod may be rehashed apart.)
    let want = s(&file);
    agent.wait_from("the restore, matching the baseline", REPORT_WITHIN, mark, |l| {
        is_change(l) && l["path"] == want.as_str() && l["baseline_match"] == true
    });
    agent.wait_from("a clean interval verify after the restore", Duration::from_secs(10), mark, |l| {
        l["kind"] == "verify" && l["reason"] == "interval" && l["result"] == "clean"
    });
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_last_verify_success 1");
    let m = samples(&text);
    assert_eq!(sample(&m, "kubefim_last_verify_changes{kind=\"modified\"}", &text), 0.0);
    assert!(sample(&m, "kubefim_rescans_total{reason=\"verify\"}", &text) >= 2.0, "{text}");
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

/// The metric names a `/metrics` exposition declares (`# TYPE` lines), as their samples are
/// named: counters with `_total`, the info with `_info`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| match kind {
            "counter" => format!("{name}_total"),
            "info" => format!("{name}_info"),
            _ => name.to_owned(),
        })
        .collect()
}

/// The metric names the README's metrics table lists.
fn readme_metric_names() -> BTreeSet<String> {
    let readme = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let table = readme.split("<!-- metrics -->").nth(1).expect("the README marks its metrics table");
    table
        .lines()
        .filter_map(|l| l.strip_prefix("| `kubefim_"))
        .filter_map(|l| l.split('`').next())
        .map(|rest| format!("kubefim_{}", rest.split('{').next().unwrap_or(rest)))
        .collect()
}

#[test]
fn every_metric_follows_what_it_describes_with_labels_from_fixed_sets() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let files: Vec<PathBuf> = (0..40).map(|i| fx.t(format!("m{i:02}.txt"))).collect();
    for f in &files {
        fs::write(f, "a\n").unwrap();
    }
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));
    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    // One page of ring buffer: a burst overflows it.
    cmd.args(["--listen", "127.0.0.1:0", "--ring-buffer-kib", "4"]);
    let mut agent = Agent::spawn(cmd);
    let addr = agent.endpoint();
    agent.wait_ready(&ready);
    agent.wait_kind("verify", REPORT_WITHIN, 0);
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_last_verify_success 1");
    let m = samples(&text);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    assert_eq!(sample(&m, "kubefim_baseline_entries", &text), 41.0, "40 files and the tree");
    assert_eq!(sample(&m, "kubefim_baseline_trusted", &text), 1.0);
    let created = sample(&m, "kubefim_baseline_created_timestamp_seconds", &text);
    assert!(now - created < 600.0 && created <= now, "baseline created at {created}, now {now}");
    assert!(sample(&m, "kubefim_programs_attached", &text) >= 50.0, "{text}");
    assert_eq!(sample(&m, "kubefim_programs_degraded", &text), 0.0);
    // The rule root's ancestors (all but `/`) are in the map too: a swap of one must be seen.
    let ancestors = fx.tree().ancestors().skip(1).filter(|d| d.parent().is_some()).count() as f64;
    assert_eq!(
        sample(&m, "kubefim_watched_inodes", &text),
        41.0 + ancestors,
        "one inode a file, the tree's, and its {ancestors} ancestors'"
    );
    assert_eq!(sample(&m, "kubefim_rescans_total{reason=\"startup\"}", &text), 1.0);
    assert_eq!(sample(&m, "kubefim_verify_runs_total{result=\"clean\"}", &text), 1.0);
    assert_eq!(sample(&m, "kubefim_last_verify_errors", &text), 0.0);
    assert!(sample(&m, "kubefim_last_verify_duration_seconds", &text) > 0.0);
    assert!((now - sample(&m, "kubefim_last_verify_timestamp_seconds", &text)).abs() < 60.0);
    assert_eq!(sample(&m, "kubefim_pod_cache_entries", &text), 0.0, "no --kubernetes");
    assert_eq!(sample(&m, "kubefim_pod_cache_events_total", &text), 0.0);
    let version = format!("kubefim_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&m, &version, &text), 1.0);

    // A write, a new file, a removal and a rename, each reported; the counters and the
    // filter's inode count follow.
    let mark = agent.mark();
    append(&files[0], "b\n");
    agent.change_from(&s(&files[0]), REPORT_WITHIN, mark);
    let new = fx.t("new.txt");
    python(&format!("f = open({:?}, 'w'); f.write('n\\n'); f.close()", s(&new)));
    agent.change_from(&s(&new), REPORT_WITHIN, mark);
    fs::remove_file(&files[2]).unwrap();
    agent.change_from(&s(&files[2]), REPORT_WITHIN, mark);
    python(&format!("import os; os.rename({:?}, {:?})", s(&files[3]), s(&fx.t("m03.moved"))));
    agent.change_from(&s(&files[3]), REPORT_WITHIN, mark);
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_changes_total{kind=\"renamed\"} 1");
    let m = samples(&text);
    // The tree's own mtime changes are modifications too.
    assert!(sample(&m, "kubefim_changes_total{kind=\"modified\"}", &text) >= 1.0, "{text}");
    assert_eq!(sample(&m, "kubefim_changes_total{kind=\"added\"}", &text), 1.0);
    assert_eq!(sample(&m, "kubefim_changes_total{kind=\"removed\"}", &text), 1.0);
    for op in ["write", "close", "create", "unlink", "rename"] {
        assert!(sample(&m, &format!("kubefim_events_total{{op=\"{op}\"}}"), &text) >= 1.0, "{op}: {text}");
    }
    assert!(sample(&m, "kubefim_rehash_duration_seconds_count", &text) >= 4.0, "{text}");
    assert_eq!(sample(&m, "kubefim_watched_inodes", &text), 41.0 + ancestors, "one file added, one removed");

    // A burst the ring buffer cannot hold: what the kernel drops is counted as the lines say.
    let mark = agent.mark();
    let list: Vec<String> = files[4..].iter().map(|f| s(f)).collect();
    python(&format!(
        "import os\nfor r in range(20):\n    for f in {list:?}:\n        fd = os.open(f, os.O_WRONLY | os.O_APPEND)\n        os.write(fd, b'x')\n        os.close(fd)\n"
    ));
    agent.wait_from("the rescan after lost events", Duration::from_secs(30), mark, |l| {
        l["kind"] == "rescan" && l["reason"] == "lost_events"
    });
    // More `lost` lines may follow the first rescan: the metric is compared with the lines
    // printed by the time it was read, until the burst is over.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (text, m) = loop {
        let text = agent.wait_http(addr, "/metrics", 200, "kubefim_lost_events_total");
        let m = samples(&text);
        let counted = sample(&m, "kubefim_lost_events_total{dropped_by=\"kernel\"}", &text)
            + sample(&m, "kubefim_lost_events_total{dropped_by=\"watcher\"}", &text);
        let lost: f64 = agent.of_kind("lost").iter().filter_map(|l| l["events"].as_f64()).sum();
        assert!(lost > 0.0, "{}", agent.dump());
        if counted == lost {
            break (text, m);
        }
        assert!(Instant::now() < deadline, "the metric ({counted}) is not what the lost lines say ({lost})");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(sample(&m, "kubefim_rescans_total{reason=\"lost_events\"}", &text) >= 1.0, "{text}");

    // Label values come from fixed snake_case sets (never a path or a pid).
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, labels)) = line.split_once('{') else { continue };
        let labels = labels.split('}').next().unwrap_or("");
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').expect("name=value");
            if matches!(name, "version" | "le") {
                continue;
            }
            let value = value.trim_matches('"');
            assert!(
                !value.is_empty() && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "label {name}={value:?} is not snake_case: {line}"
            );
        }
    }
    // The README lists exactly the metrics there are.
    assert_eq!(readme_metric_names(), metric_names(&text), "the README's metrics table and /metrics");
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

// ---------------------------------------------------------------------------------------------
// 5: pod attribution through the Kubernetes API, with a real container
// ---------------------------------------------------------------------------------------------

/// A podman container removed when the test is done with it.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let mut rm = podman();
        rm.args(["rm", "--force", &self.0]).stdout(Stdio::null()).stderr(Stdio::null());
        let _ = rm.status();
    }
}

const NODE: &str = "test-node";
const POD_NAMESPACE: &str = "shop";
const POD_NAME: &str = "web-7d4b9c8f6d-x2k9p";
const POD_UID: &str = "3f9c2a1e-8b7d-4c6e-9a5f-1d2e3b4c5a6f";
const POD_CONTAINER: &str = "app";
/// Another pod of the node, whose container is not the test's.
const OTHER_CID: &str = "2f79cedcae0090d6f411ad248f908ecb890e004f5126208a26b997ce2b4665cc";

/// The node's pods as `GET /api/v1/pods?fieldSelector=spec.nodeName%3D<node>` serves them:
/// the test's pod, whose one container runs as the podman container `cid`, and another pod.
fn pod_list(cid: &str) -> Value {
    let image_id = "localhost/kubefim-test@sha256:76764265fffa3c1e5b0a4d9f8e7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c";
    let pod = |namespace: &str, name: &str, uid: &str, owner: Value, container: &str, image: &str, id: &str| {
        json!({
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": uid,
                "resourceVersion": "51990",
                "creationTimestamp": "2026-05-04T09:01:05Z",
                "labels": {"app": container},
                "ownerReferences": [owner],
            },
            "spec": {
                "nodeName": NODE,
                "containers": [{
                    "name": container,
                    "image": image,
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }],
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst",
                "serviceAccountName": "default",
                "schedulerName": "default-scheduler",
            },
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-05-04T09:01:09Z"}],
                "hostIP": "10.0.0.7",
                "podIP": "10.244.1.23",
                "startTime": "2026-05-04T09:01:05Z",
                "qosClass": "BestEffort",
                "containerStatuses": [{
                    "name": container,
                    "state": {"running": {"startedAt": "2026-05-04T09:01:09Z"}},
                    "lastState": {},
                    "ready": true,
                    "restartCount": 0,
                    "image": image,
                    "imageID": image_id,
                    "containerID": format!("containerd://{id}"),
                    "started": true,
                }],
            },
        })
    };
    let replica_set = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6d",
        "uid": "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d", "controller": true, "blockOwnerDeletion": true});
    let daemon_set = json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "node-exporter",
        "uid": "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b", "controller": true, "blockOwnerDeletion": true});
    json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": "52000"},
        "items": [
            pod(POD_NAMESPACE, POD_NAME, POD_UID, replica_set, POD_CONTAINER, IMAGE, cid),
            pod("monitoring", "node-exporter-x7q2m", "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d", daemon_set,
                "node-exporter", "quay.io/prometheus/node-exporter:v1.8.2", OTHER_CID),
        ],
    })
}

#[test]
fn change_from_a_pod_container_names_the_pod_and_a_host_change_names_none() {
    if !root_or_skip() {
        return;
    }
    ensure_image();
    let fx = Fixture::on_disk();
    let (in_pod, on_host) = (fx.t("pod.conf"), fx.t("host.conf"));
    fs::write(&in_pod, "alpha\n").unwrap();
    fs::write(&on_host, "alpha\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));

    // The container first: the pod's containerID must be its id.
    let mut create = podman();
    create
        .args(["create", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000", "-v"])
        .arg(format!("{}:/data", s(&fx.tree())))
        .args([IMAGE, "/bin/sh", "-c", "echo from-the-pod >> /data/pod.conf; sleep 1"]);
    let created = run_with_timeout(create, Duration::from_secs(60));
    assert!(created.status.success(), "podman create failed\n{}", created.dump());
    let container = Container(created.stdout.trim().to_owned());
    let cid = container.0.clone();
    assert!(cid.len() == 64 && cid.bytes().all(|b| b.is_ascii_hexdigit()), "podman create printed {cid:?}");

    let api = ApiServer::start(pod_list(&cid));
    let kubeconfig = fx.path("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    cmd.args(["--kubernetes", "--node-name", NODE])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("NODE_NAME");
    let mut agent = Agent::spawn(cmd);
    agent.wait_ready(&ready);
    // The watch is opened once the list is applied: from then on the index knows the pod.
    agent.until("a watch of the node's pods", READY_WITHIN, |_| {
        api.requests().iter().any(|r| r.query.get("watch").is_some_and(|w| w == "true")).then_some(())
    });
    assert!(agent.of_kind("degraded").is_empty(), "degraded with an API server\n{}", agent.dump());

    let mut start = podman();
    start.args(["start", "--attach", &cid]);
    run_child(start);
    let line = agent.change_from(&s(&in_pod), Duration::from_secs(5), 0);
    assert_eq!(line["kind"], "modified", "{line:#}\n{}", agent.dump());
    assert_eq!(line["container"]["id"], cid.as_str(), "{line:#}\n{}", agent.dump());
    assert_eq!(line["origin"], "pod", "{line:#}\n{}", agent.dump());
    assert_eq!(
        line["pod"],
        json!({"namespace": POD_NAMESPACE, "name": POD_NAME, "uid": POD_UID, "container": POD_CONTAINER, "image": IMAGE}),
        "{line:#}"
    );
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("\n+from-the-pod\n")), "{line:#}");

    let pid = append(&on_host, "from the host\n");
    let line = agent.change_from(&s(&on_host), REPORT_WITHIN, 0);
    assert_host_origin(&line, pid, &agent);
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();

    // Only this node's pods were ever asked for, by list and by watch (the agent's other
    // requests are about its node: the Node's uid, its Events and FimNodeStatus).
    let requests: Vec<_> = api.requests().into_iter().filter(|r| r.path.starts_with("/api/v1/pods")).collect();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r.path, "/api/v1/pods", "{requests:#?}");
        assert!(r.uri.contains(&format!("fieldSelector=spec.nodeName%3D{NODE}")), "no node selector: {}", r.uri);
        assert_eq!(r.query.get("fieldSelector").map(String::as_str), Some(&*format!("spec.nodeName={NODE}")));
    }
    assert!(requests.iter().any(|r| !r.query.contains_key("watch")), "no list: {requests:#?}");
    assert!(requests.iter().any(|r| r.query.get("watch").is_some_and(|w| w == "true")), "no watch: {requests:#?}");
}

#[test]
fn kubernetes_without_an_api_server_says_degraded_and_keeps_watching() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let file = fx.t("no-api.conf");
    fs::write(&file, "alpha\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree())]));
    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    // No kubeconfig anywhere, and not in a cluster.
    cmd.args(["--kubernetes", "--node-name", "no-api-node"])
        .env("KUBECONFIG", fx.path("no-such-kubeconfig"))
        .env("HOME", fx.path("no-home"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT");
    let mut agent = Agent::spawn(cmd);
    agent.wait_ready(&ready);
    let (_, degraded) = agent.wait_kind("degraded", REPORT_WITHIN, 0);
    assert_eq!(degraded["reason"], "no_kubernetes_api", "{degraded:#}");
    assert!(degraded["message"].as_str().is_some_and(|m| m.contains("Kubernetes")), "{degraded:#}");
    let pid = append(&file, "beta\n");
    let line = agent.change_from(&s(&file), REPORT_WITHIN, 0);
    assert_host_origin(&line, pid, &agent);
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

// ---------------------------------------------------------------------------------------------
// 6: the agent notices its kernel filter emptied, and a port flood leaves it its descriptors
// ---------------------------------------------------------------------------------------------

/// How long the agent may take to notice its kernel filter edited by another process: two
/// self-checks (2 s apart: the canary's write, then its deadline) and slack for a busy machine.
const TAMPER_SEEN_WITHIN: Duration = Duration::from_secs(10);

impl Agent {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent was stopped").id()
    }
}

/// `bpftool ARGS -j`, parsed.
#[track_caller]
fn bpftool_json(args: &[&str]) -> Value {
    let out = Command::new("bpftool").arg("-j").args(args).output().expect("bpftool (scripts/setup.sh installs it)");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("bpftool {args:?} printed no JSON ({e})"))
}

/// `bpftool ARGS`, which must succeed.
#[track_caller]
fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool").args(args).output().expect("bpftool (scripts/setup.sh installs it)");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The id of the BPF map named `name` that process `pid` holds (its descriptors' fdinfo give
/// the ids; bpftool gives their names): another agent's map of the same name is not it.
#[track_caller]
fn map_of(pid: u32, name: &str) -> String {
    let mut ids = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = fs::read_to_string(entry.unwrap().path()) else { continue };
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("map_id:")) {
            ids.push(id.trim().to_owned());
        }
    }
    ids.into_iter()
        .find(|id| bpftool_json(&["map", "show", "id", id.as_str()])["name"] == name)
        .unwrap_or_else(|| panic!("process {pid} holds no BPF map named {name}"))
}

/// The key of `path`'s inode in the WATCHED map, as bpftool takes it: the kernel's device
/// number (`MAJOR << 20 | MINOR`) and the inode number, little-endian u64s, in hex bytes.
fn inode_key_hex(path: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path).unwrap();
    let dev = (u64::from(rustix::fs::major(meta.dev())) << 20) | u64::from(rustix::fs::minor(meta.dev()));
    dev.to_le_bytes().iter().chain(meta.ino().to_le_bytes().iter()).map(|b| format!("{b:02x}")).collect()
}

/// Deletes `path`'s entry from the map `id` with bpftool, as another root process would.
#[track_caller]
fn delete_entry(id: &str, path: &Path) {
    let key = inode_key_hex(path);
    let mut args = vec!["map", "delete", "id", id, "key", "hex"];
    args.extend(key.iter().map(String::as_str));
    bpftool(&args);
}

/// A thread that asks `/readyz` every 20 ms and keeps every status it got, in order (a
/// not-ready spell between two polls of the test would otherwise go unseen).
struct ReadyzRecorder {
    seen: Arc<Mutex<Vec<(u16, String)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ReadyzRecorder {
    fn start(addr: SocketAddr) -> ReadyzRecorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (Arc::clone(&seen), Arc::clone(&stop));
        thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(got) = http_get(addr, "/readyz") {
                    s.lock().unwrap().push(got);
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        ReadyzRecorder { seen, stop }
    }

    /// The first not-ready answer seen, if any.
    fn not_ready(&self) -> Option<(u16, String)> {
        self.seen.lock().unwrap().iter().find(|(code, _)| *code != 200).cloned()
    }
}

impl Drop for ReadyzRecorder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn entries_deleted_from_the_kernel_filter_make_it_unready_refilled_and_rescanned() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let file = fx.t("guarded.conf");
    fs::write(&file, "alpha\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));
    let ready = fx.path("ready");
    let mut cmd = watch_cmd(&fx.db(), &fx.pubkey(), &ready);
    cmd.args(["--listen", "127.0.0.1:0"]);
    let mut agent = Agent::spawn(cmd);
    let addr = agent.endpoint();
    agent.wait_ready(&ready);
    agent.wait_kind("verify", REPORT_WITHIN, 0);
    agent.wait_http(addr, "/readyz", 200, "ready");
    let watched = map_of(agent.pid(), "WATCHED");

    // Another root process deletes the file's entry: the kernel no longer sends its writes.
    let recorder = ReadyzRecorder::start(addr);
    let mark = agent.mark();
    delete_entry(&watched, &file);
    let tampered = Instant::now();
    append(&file, "tampered\n");
    let (at, degraded) = agent.wait_from("a degraded line for the tampered filter", TAMPER_SEEN_WITHIN, mark, |l| {
        l["kind"] == "degraded" && l["reason"] == "filter_tampered"
    });
    assert!(tampered.elapsed() < TAMPER_SEEN_WITHIN, "{degraded:#}");
    assert!(degraded["error"].as_str().is_some_and(|e| e.contains("missing from WATCHED")), "{degraded:#}");
    // The write made meanwhile: found by the rescan that follows the refill.
    let line = agent.change_from(&s(&file), Duration::from_secs(10), at);
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert_eq!(line["detected_by"], "rescan", "{line:#}");
    assert!(line["diff"].as_str().is_some_and(|d| d.contains("+tampered")), "{line:#}");
    agent.wait_from("the self-check's rescan", Duration::from_secs(10), at, |l| {
        l["kind"] == "rescan" && l["reason"] == "self_check"
    });
    // Not ready meanwhile, ready again once its canary was seen.
    agent.wait_http(addr, "/readyz", 200, "ready");
    let (code, reason) = recorder.not_ready().unwrap_or_else(|| panic!("/readyz never failed\n{}", agent.dump()));
    assert_eq!(code, 503);
    assert!(reason.contains("self-check"), "{reason}");
    // The entry is back: a write is an event again.
    let mark = agent.mark();
    let pid = append(&file, "after\n");
    let line = agent.change_from(&s(&file), REPORT_WITHIN, mark);
    assert_host_origin(&line, pid, &agent);

    // The canary's own entry deleted: its next write goes unseen.
    drop(recorder);
    let recorder = ReadyzRecorder::start(addr);
    let mark = agent.mark();
    let mut canary = fx.db().into_os_string();
    canary.push(".journal.canary");
    delete_entry(&watched, Path::new(&canary));
    let (_, degraded) = agent.wait_from("a degraded line for the missed canary", TAMPER_SEEN_WITHIN, mark, |l| {
        l["kind"] == "degraded" && l["reason"] == "canary_missed"
    });
    assert!(degraded["error"].as_str().is_some_and(|e| e.contains("missing")), "{degraded:#}");
    agent.wait_http(addr, "/readyz", 200, "ready");
    assert!(recorder.not_ready().is_some(), "/readyz never failed\n{}", agent.dump());
    let text = agent.wait_http(addr, "/metrics", 200, "kubefim_self_check_ok 1");
    let m = samples(&text);
    assert!(sample(&m, "kubefim_self_check_failures_total{check=\"inodes\"}", &text) >= 1.0, "{text}");
    assert!(sample(&m, "kubefim_self_check_failures_total{check=\"canary\"}", &text) >= 1.0, "{text}");
    assert_eq!(sample(&m, "kubefim_self_check_failures_total{check=\"names\"}", &text), 0.0, "{text}");
    assert!(sample(&m, "kubefim_rescans_total{reason=\"self_check\"}", &text) >= 2.0, "{text}");
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

/// The lowest descriptor number process `pid` does not use: with its soft RLIMIT_NOFILE
/// there, its next open fails with EMFILE.
fn lowest_free_fd(pid: u32) -> u64 {
    let used: BTreeSet<u64> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).unwrap()
}

/// Process `pid`'s soft RLIMIT_NOFILE, from /proc/PID/limits.
fn soft_nofile(pid: u32) -> u64 {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("a Max open files line");
    line.trim_start_matches("Max open files").split_whitespace().next().unwrap().parse().unwrap()
}

/// `prlimit --pid PID --nofile=SOFT:` (the hard limit kept).
#[track_caller]
fn set_soft_nofile(pid: u32, soft: u64) {
    let run = run_with_timeout(
        {
            let mut cmd = Command::new("prlimit");
            cmd.arg("--pid").arg(pid.to_string()).arg(format!("--nofile={soft}:"));
            cmd
        },
        Duration::from_secs(10),
    );
    run.expect_code(0);
}

#[test]
fn a_rehash_that_cannot_open_the_file_is_an_error_line_not_a_change() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let file = fx.t("target.conf");
    fs::write(&file, "alpha\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));
    let ready = fx.path("ready");
    let mut agent = Agent::spawn(watch_cmd(&fx.db(), &fx.pubkey(), &ready));
    agent.wait_ready(&ready);
    agent.wait_kind("verify", REPORT_WITHIN, 0);

    // The agent out of descriptors (a real EMFILE on its rehash's open), for one write.
    let pid = agent.pid();
    let mark = agent.mark();
    let soft = soft_nofile(pid);
    set_soft_nofile(pid, lowest_free_fd(pid));
    append(&file, "beta\n");
    let want = s(&file);
    let (_, error) = agent.wait_from("an error line for the unreadable file", REPORT_WITHIN, mark, |l| {
        l["kind"] == "error" && l["path"] == want.as_str()
    });
    set_soft_nofile(pid, soft);
    assert!(error["error"].as_str().is_some_and(|e| e.contains("Too many open files")), "{error:#}");
    let changes: Vec<Value> = agent.lines().into_iter().skip(mark).filter(is_change).collect();
    assert!(changes.is_empty(), "a failed rehash reported as a change: {changes:#?}\n{}", agent.dump());

    // Descriptors back: the next write is reported, and with it the one that could not be
    // read (nothing was concluded about it; a self-check's rescan may report it first).
    append(&file, "gamma\n");
    let has = |l: &Value, text: &str| {
        is_change(l) && l["path"] == want.as_str() && l["diff"].as_str().is_some_and(|d| d.contains(text))
    };
    let (_, line) = agent.wait_from("the next write's report", REPORT_WITHIN, mark, |l| has(l, "+gamma"));
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert!(
        agent.lines().iter().skip(mark).any(|l| has(l, "+beta")),
        "the unread write never reported\n{}",
        agent.dump()
    );
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}

#[test]
fn idle_half_sent_requests_leave_the_probes_and_the_watcher_their_descriptors() {
    if !root_or_skip() {
        return;
    }
    // The test holds a thousand sockets: its own soft limit up to the hard one.
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum },
    )
    .unwrap();
    let fx = Fixture::on_disk();
    let untouched = fx.t("untouched.conf");
    fs::write(&untouched, "alpha\n").unwrap();
    // No times: a verify counts the tree as clean whatever its entries do to its mtime.
    let attrs = ["type", "content", "size", "mode", "uid", "gid"];
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).attributes(&attrs)]));
    let ready = fx.path("ready");
    // The agent with 1024 descriptors and no way to raise them (a container's usual ulimit),
    // verifying (reading every file) every 2 s.
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=1024:1024").arg("--").arg(common::BIN);
    cmd.args(watch_cmd(&fx.db(), &fx.pubkey(), &ready).get_args());
    cmd.args(["--listen", "127.0.0.1:0", "--verify-interval", "2s"]);
    let mut agent = Agent::spawn(cmd);
    let addr = agent.endpoint();
    agent.wait_ready(&ready);
    agent.wait_kind("verify", REPORT_WITHIN, 0);

    // 1100 clients, each sending half a request head and then nothing.
    let mut idle = Vec::new();
    for _ in 0..1100 {
        // An agent that stopped accepting leaves the rest in the listen backlog, then unanswered.
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else { break };
        let _ = stream.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n").as_bytes());
        idle.push(stream);
    }
    let mark = agent.mark();
    let flooded = Instant::now();
    // Probes are answered within a header timeout (the idle ones' slots free up by then).
    let deadline = flooded + Duration::from_secs(15);
    loop {
        if let Ok((200, _)) = http_get(addr, "/healthz") {
            break;
        }
        agent.assert_running();
        assert!(Instant::now() < deadline, "/healthz unanswered 15 s into the flood\n{}", agent.dump());
        thread::sleep(Duration::from_millis(100));
    }
    // The watcher still opens what it must: a new file is reported.
    let new = fx.t("new.conf");
    let pid = python(&format!("f = open({:?}, 'w'); f.write('n\\n'); f.close()", s(&new)));
    let line = agent.change_from(&s(&new), Duration::from_secs(5), mark);
    assert_eq!(line["kind"], "added", "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    // And a verify during the flood reads every file: the untouched one is not "modified".
    let (_, verify) = agent.wait_from("a verify during the flood", Duration::from_secs(15), mark, |l| {
        l["kind"] == "verify" && l["reason"] == "interval" && l["added"] == 1
    });
    assert_eq!((&verify["modified"], &verify["removed"], &verify["errors"]), (&json!(0), &json!(0), &json!(0)));
    let wrong: Vec<Value> = agent
        .lines()
        .into_iter()
        .skip(mark)
        .filter(|l| l["path"] == s(&untouched).as_str() || l["kind"] == "error")
        .collect();
    assert!(wrong.is_empty(), "an untouched file reported, or errors: {wrong:#?}\n{}", agent.dump());
    drop(idle);
    assert!(agent.stop().success(), "{}", agent.dump());
    agent.assert_only_json();
}
