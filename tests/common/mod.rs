//! Helpers for the CLI integration tests: a per-test fixture (temp tree, keys, policy, db),
//! a runner for the real `kubefim` binary with a hard timeout, and small file-system tools
//! (deterministic random bytes, recursive copy, sled-file tampering).
//!
//! Every helper panics with a message that carries the command's output, so a failing test
//! says what the binary printed; nothing here returns `Result`.

#![allow(dead_code, reason = "each helper is used by some tests; the test binary sees them all as one module")]

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub mod api;
pub mod deploy;
pub mod podman;
pub mod watch;

/// How long any single invocation of the binary may take before the test calls it a hang.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_kubefim");

/// The uid/gid tests drop to when they need a process that root's DAC override does not help.
pub const NOBODY: u32 = 65534;

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Run {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The exit code; panics (with the output) if the process died from a signal.
    #[track_caller]
    pub fn code(&self) -> i32 {
        match self.status.code() {
            Some(code) => code,
            None => panic!("{} was killed by a signal: {:?}\n{}", self.cmdline, self.status, self.dump()),
        }
    }

    /// Panics unless the process exited with `want`.
    #[track_caller]
    pub fn expect_code(&self, want: i32) -> &Self {
        let got = self.status.code();
        assert_eq!(got, Some(want), "{} exited {:?}, want {want}\n{}", self.cmdline, got, self.dump());
        self
    }

    /// stdout and stderr, for failure messages.
    pub fn dump(&self) -> String {
        format!("--- stdout ---\n{}\n--- stderr ---\n{}", self.stdout, self.stderr)
    }

    /// stdout parsed as one JSON document.
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("{}: stdout is not one JSON document ({err})\n{}", self.cmdline, self.dump()))
    }

    /// stdout parsed as JSON lines (empty lines are skipped).
    #[track_caller]
    pub fn jsonl(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|err| {
                    panic!("{}: line {line:?} is not JSON ({err})\n{}", self.cmdline, self.dump())
                })
            })
            .collect()
    }
}

/// Runs `cmd` to completion, killing it and panicking if it takes longer than `timeout`.
#[track_caller]
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Run {
    let cmdline = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|err| panic!("cannot spawn {cmdline}: {err}"));
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = wait_or_kill(&mut child, timeout);
    let stdout = stdout.join().expect("stdout reader thread");
    let stderr = stderr.join().expect("stderr reader thread");
    match status {
        Some(status) => Run { cmdline, status, stdout, stderr },
        None => panic!(
            "{cmdline} did not finish within {timeout:?} (hang?); killed it\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ),
    }
}

/// Waits for `child` up to `timeout`; on timeout kills it, reaps it and returns `None`.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait().expect("try_wait on child") {
            Some(status) => return Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            None => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs the binary with `args`.
#[track_caller]
pub fn kubefim<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    run_with_timeout(cmd, TIMEOUT)
}

/// Runs the binary with `args` as uid/gid 65534 with no supplementary groups (and so no
/// capabilities), through util-linux `setpriv`.
#[track_caller]
pub fn kubefim_as_nobody<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}")).arg(format!("--regid={NOBODY}")).arg("--clear-groups").arg(BIN).args(args);
    run_with_timeout(cmd, TIMEOUT)
}

/// Runs an ordinary tool (b3sum, setfattr, mknod, ...) and panics unless it succeeds.
#[track_caller]
pub fn tool<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let run = run_with_timeout(cmd, TIMEOUT);
    assert!(run.status.success(), "{} failed: {:?}\n{}", run.cmdline, run.status, run.dump());
    run
}

/// Whether this process runs as root (the owner of `/proc/self` is our effective uid).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// One policy rule, rendered into YAML by [`policy_yaml`].
#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub path: PathBuf,
    pub exclude: Vec<String>,
    pub attributes: Option<Vec<&'static str>>,
    pub diff: bool,
    pub secret: bool,
}

impl Rule {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Rule { path: path.into(), ..Rule::default() }
    }
    pub fn exclude(mut self, glob: impl Into<String>) -> Self {
        self.exclude.push(glob.into());
        self
    }
    pub fn attributes(mut self, attrs: &[&'static str]) -> Self {
        self.attributes = Some(attrs.to_vec());
        self
    }
    pub fn diff(mut self) -> Self {
        self.diff = true;
        self
    }
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }
}

/// A YAML double-quoted scalar (a JSON string is one).
fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

/// Renders a `FimPolicy` document with `rules`.
pub fn policy_yaml(rules: &[Rule]) -> String {
    let mut yaml = String::from("apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: test}\nspec:\n");
    if rules.is_empty() {
        yaml.push_str("  rules: []\n");
        return yaml;
    }
    yaml.push_str("  rules:\n");
    for rule in rules {
        let path = rule.path.to_str().expect("policy paths in tests are UTF-8");
        yaml.push_str(&format!("    - path: {}\n", quote(path)));
        if !rule.exclude.is_empty() {
            let globs: Vec<String> = rule.exclude.iter().map(|g| quote(g)).collect();
            yaml.push_str(&format!("      exclude: [{}]\n", globs.join(", ")));
        }
        if let Some(attrs) = &rule.attributes {
            yaml.push_str(&format!("      attributes: [{}]\n", attrs.join(", ")));
        }
        if rule.diff {
            yaml.push_str("      diff: true\n");
        }
        if rule.secret {
            yaml.push_str("      secret: true\n");
        }
    }
    yaml
}

/// A test's private world: `root/tree` (what the policy watches), `root/keys`, `root/db`.
pub struct Fixture {
    pub root: TempDir,
}

impl Fixture {
    /// A fresh temp dir with an empty `tree/` and a key pair in `keys/`.
    #[track_caller]
    pub fn new() -> Self {
        let fx = Self::bare();
        fs::create_dir(fx.tree()).expect("create tree dir");
        fx.keygen_into(&fx.keys());
        fx
    }

    /// Like [`Fixture::new`], under cargo's target directory: a disk-backed file system even
    /// where /tmp is tmpfs (which does not dirty inodes, so mmap stores would go unseen).
    #[track_caller]
    pub fn on_disk() -> Self {
        let root = tempfile::Builder::new()
            .prefix("kubefim-watch-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create temp dir under CARGO_TARGET_TMPDIR");
        let fx = Fixture { root };
        fs::create_dir(fx.tree()).expect("create tree dir");
        fx.keygen_into(&fx.keys());
        fx
    }

    /// A fresh temp dir, nothing in it.
    #[track_caller]
    pub fn bare() -> Self {
        let root = tempfile::Builder::new().prefix("kubefim-cli-").tempdir().expect("create temp dir");
        Fixture { root }
    }

    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.path().join(rel)
    }
    pub fn tree(&self) -> PathBuf {
        self.path("tree")
    }
    /// A path inside the watched tree.
    pub fn t(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.tree().join(rel)
    }
    pub fn keys(&self) -> PathBuf {
        self.path("keys")
    }
    pub fn key(&self) -> PathBuf {
        self.keys().join("kubefim.key")
    }
    pub fn pubkey(&self) -> PathBuf {
        self.keys().join("kubefim.pub")
    }
    pub fn db(&self) -> PathBuf {
        self.path("db")
    }

    /// `kubefim keygen --out dir`, expected to succeed.
    #[track_caller]
    pub fn keygen_into(&self, dir: &Path) {
        kubefim([OsStr::new("keygen"), OsStr::new("--out"), dir.as_os_str()]).expect_code(0);
    }

    /// Writes `rules` as `policy.yaml` and returns its path.
    #[track_caller]
    pub fn write_policy(&self, rules: &[Rule]) -> PathBuf {
        self.write_policy_text(&policy_yaml(rules))
    }

    #[track_caller]
    pub fn write_policy_text(&self, yaml: &str) -> PathBuf {
        let path = self.path("policy.yaml");
        fs::write(&path, yaml).expect("write policy");
        path
    }

    /// A policy with one default rule over `tree/`.
    #[track_caller]
    pub fn default_policy(&self) -> PathBuf {
        self.write_policy(&[Rule::new(self.tree())])
    }

    /// `baseline create` into [`Self::db`] with the fixture's key, returning the run.
    #[track_caller]
    pub fn create_run(&self, policy: &Path, db: &Path) -> Run {
        kubefim(args(&[
            "baseline".as_ref(),
            "create".as_ref(),
            "--policy".as_ref(),
            policy.as_os_str(),
            "--db".as_ref(),
            db.as_os_str(),
            "--key".as_ref(),
            self.key().as_os_str(),
        ]))
    }

    /// `baseline create` of `policy` into the fixture db; must exit 0.
    #[track_caller]
    pub fn create(&self, policy: &Path) {
        self.create_run(policy, &self.db()).expect_code(0);
    }

    /// Writes the default policy over `tree/` and creates the baseline.
    #[track_caller]
    pub fn create_default(&self) {
        let policy = self.default_policy();
        self.create(&policy);
    }

    /// `verify --format json` of `db` with `pubkey`.
    #[track_caller]
    pub fn verify_with(&self, db: &Path, pubkey: &Path) -> Run {
        kubefim(args(&[
            "verify".as_ref(),
            "--db".as_ref(),
            db.as_os_str(),
            "--pubkey".as_ref(),
            pubkey.as_os_str(),
            "--format".as_ref(),
            "json".as_ref(),
        ]))
    }

    /// `verify --format json` of the fixture db.
    #[track_caller]
    pub fn verify_run(&self) -> Run {
        self.verify_with(&self.db(), &self.pubkey())
    }

    /// Verify, expect exit `code`, return the parsed report.
    #[track_caller]
    pub fn verify(&self, code: i32) -> Value {
        let run = self.verify_run();
        run.expect_code(code);
        let report = run.json();
        check_report_shape(&report, &run);
        report
    }

    /// `kubefim COMMAND... --db DB --pubkey PUB --format FORMAT` on the fixture's db.
    #[track_caller]
    fn on_db(&self, command: &[&str], format: &str) -> Run {
        let mut argv: Vec<OsString> = command.iter().map(OsString::from).collect();
        argv.extend([
            "--db".into(),
            self.db().into(),
            "--pubkey".into(),
            self.pubkey().into(),
            "--format".into(),
            format.into(),
        ]);
        kubefim(argv)
    }

    /// `verify --format human` of the fixture's db.
    #[track_caller]
    pub fn verify_human(&self) -> Run {
        self.on_db(&["verify"], "human")
    }

    /// `baseline show --format human` of the fixture's db.
    #[track_caller]
    pub fn show_human(&self) -> Run {
        self.on_db(&["baseline", "show"], "human")
    }

    /// `baseline show --format jsonl` of `db` with `pubkey`.
    #[track_caller]
    pub fn show_with(&self, db: &Path, pubkey: &Path) -> Run {
        kubefim(args(&[
            "baseline".as_ref(),
            "show".as_ref(),
            "--db".as_ref(),
            db.as_os_str(),
            "--pubkey".as_ref(),
            pubkey.as_os_str(),
            "--format".as_ref(),
            "jsonl".as_ref(),
        ]))
    }

    /// The fixture baseline's records; show must exit 0.
    #[track_caller]
    pub fn show(&self) -> Vec<Value> {
        let run = self.show_with(&self.db(), &self.pubkey());
        run.expect_code(0);
        run.jsonl()
    }

    /// `baseline accept` of `paths` (all when empty) with the fixture's keys.
    #[track_caller]
    pub fn accept(&self, paths: &[&Path]) -> Run {
        let mut a: Vec<OsString> = ["baseline", "accept", "--db"].iter().map(OsString::from).collect();
        a.push(self.db().into());
        a.push("--key".into());
        a.push(self.key().into());
        a.push("--pubkey".into());
        a.push(self.pubkey().into());
        a.extend(paths.iter().map(|p| p.as_os_str().to_owned()));
        kubefim(a)
    }
}

/// Collects heterogeneous `&OsStr` arguments.
pub fn args(parts: &[&OsStr]) -> Vec<OsString> {
    parts.iter().map(|p| (*p).to_owned()).collect()
}

/// Panics unless `report` has the documented top-level shape.
#[track_caller]
pub fn check_report_shape(report: &Value, run: &Run) {
    let summary = &report["summary"];
    for key in ["added", "removed", "modified", "unverified", "scanned"] {
        assert!(summary[key].is_u64(), "summary.{key} is not a number in {report:#}\n{}", run.dump());
    }
    assert!(summary["clean"].is_boolean(), "summary.clean is not a bool in {report:#}");
    assert!(report["changes"].is_array(), "changes is not an array in {report:#}");
}

/// The change for `path` in a verify report; panics listing the changed paths if missing.
#[track_caller]
pub fn change_for<'a>(report: &'a Value, path: &Path) -> &'a Value {
    let want = path.to_str().expect("UTF-8 path");
    changes(report).iter().find(|c| c["path"] == want).unwrap_or_else(|| {
        panic!("no change for {want} in report; changed paths: {:?}\n{report:#}", changed_paths(report))
    })
}

/// Whether the report has any change for `path`.
pub fn has_change(report: &Value, path: &Path) -> bool {
    let want = path.to_str().expect("UTF-8 path");
    changes(report).iter().any(|c| c["path"] == want)
}

#[track_caller]
pub fn changes(report: &Value) -> &Vec<Value> {
    report["changes"].as_array().unwrap_or_else(|| panic!("changes is not an array: {report:#}"))
}

pub fn changed_paths(report: &Value) -> Vec<String> {
    report["changes"]
        .as_array()
        .map(|cs| cs.iter().map(|c| c["path"].as_str().unwrap_or("<non-string>").to_owned()).collect())
        .unwrap_or_default()
}

/// The attribute names in a change's `changed`.
#[track_caller]
pub fn changed_attrs(change: &Value) -> Vec<&str> {
    change["changed"]
        .as_array()
        .unwrap_or_else(|| panic!("changed is not an array: {change:#}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_else(|| panic!("changed holds a non-string: {change:#}")))
        .collect()
}

/// The record for `path` in `baseline show` output; panics listing recorded paths if missing.
#[track_caller]
pub fn record_for<'a>(records: &'a [Value], path: &Path) -> &'a Value {
    let want = path.to_str().expect("UTF-8 path");
    records
        .iter()
        .find(|r| r["path"] == want)
        .unwrap_or_else(|| panic!("no record for {want}; recorded: {:?}", recorded_paths(records)))
}

pub fn recorded_paths(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["path"].as_str().unwrap_or("<non-string>").to_owned()).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sets a file's permission bits.
#[track_caller]
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|err| panic!("chmod {mode:o} {}: {err}", path.display()));
}

/// Copies a directory tree (regular files and dirs only: a sled db has nothing else).
#[track_caller]
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap_or_else(|err| panic!("mkdir {}: {err}", to.display()));
    for entry in fs::read_dir(from).unwrap_or_else(|err| panic!("read_dir {}: {err}", from.display())) {
        let entry = entry.expect("dir entry");
        let kind = entry.file_type().expect("file type");
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest)
                .unwrap_or_else(|err| panic!("copy {} -> {}: {err}", entry.path().display(), dest.display()));
        }
    }
}

/// The largest regular file anywhere under `dir` (for a sled db: its log file `db`).
#[track_caller]
pub fn largest_file(dir: &Path) -> PathBuf {
    fn walk(dir: &Path, best: &mut Option<(u64, PathBuf)>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display())) {
            let entry = entry.expect("dir entry");
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                walk(&entry.path(), best);
            } else if meta.is_file() && best.as_ref().is_none_or(|(len, _)| meta.len() > *len) {
                *best = Some((meta.len(), entry.path()));
            }
        }
    }
    let mut best = None;
    walk(dir, &mut best);
    let (len, path) = best.unwrap_or_else(|| panic!("no file inside db dir {}", dir.display()));
    assert!(len > 0, "largest file in {} is empty", dir.display());
    path
}

/// One past the last non-zero byte: the part of a preallocated log file that holds data.
pub fn used_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// Index of the first occurrence of `needle` in `haystack`.
pub fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
