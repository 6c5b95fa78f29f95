//! The monitors the watch benchmark compares: `kubefim watch` (a signed baseline, its ready
//! file, a fresh journal for each run) and auditd with a watch rule on the tree. Each is a
//! guard: dropping it stops the monitor and takes its rule out, and [`Audit`] puts the
//! kernel's audit `enabled` flag and backlog limit back as they were.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kubefim_benches::fixture::{Binary, die_with_parent, remove, run};

/// How long a watcher may take to write its ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a monitor may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The end of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// SIGTERM, then up to [`STOP_TIMEOUT`] for the exit, then SIGKILL. The exit status; an
/// error when it had to be killed.
fn stop(child: &mut Child, name: &str) -> Result<std::process::ExitStatus> {
    let pid = rustix::process::Pid::from_child(child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).ok();
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().with_context(|| format!("waiting for {name}"))? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            bail!("{name} (pid {}) did not exit {} s after SIGTERM: killed", child.id(), STOP_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where kubefim's files for one baseline are.
pub struct KubefimSetup<'a> {
    pub kubefim: &'a Binary,
    pub key: &'a Path,
    pub pubkey: &'a Path,
    /// Scratch space for the ready file, the journal and stderr.
    pub scratch: &'a Path,
}

impl KubefimSetup<'_> {
    /// Writes a one-rule policy over `tree` (default attributes) to `policy`.
    pub fn policy(&self, policy: &Path, tree: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: bench}}\nspec:\n  rules:\n    - path: \"{}\"\n",
            tree.display()
        );
        fs::write(policy, text).with_context(|| format!("writing {}", policy.display()))
    }

    /// Makes the signed baseline `db` of `policy` anew.
    pub fn baseline(&self, policy: &Path, db: &Path) -> Result<()> {
        remove(db)?;
        run(self
            .kubefim
            .command()
            .args(["baseline", "create", "--policy"])
            .arg(policy)
            .arg("--db")
            .arg(db)
            .arg("--key")
            .arg(self.key)
            .stdout(Stdio::null()))
        .map(drop)
        .context("kubefim baseline create")
    }

    /// Starts `kubefim watch` on `db`, its JSON lines to `events`, a fresh journal; returns
    /// once its ready file is there.
    pub fn watch(&self, db: &Path, events: &Path) -> Result<Watcher> {
        let ready = self.scratch.join("ready");
        let journal = self.scratch.join("journal");
        let stderr = self.scratch.join("watch.err");
        remove(&ready)?;
        remove(&journal)?;
        let out = fs::File::create(events).with_context(|| format!("creating {}", events.display()))?;
        let err = fs::File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = self
            .kubefim
            .command()
            .arg("watch")
            .arg("--db")
            .arg(db)
            .arg("--pubkey")
            .arg(self.pubkey)
            .args(["--format", "jsonl", "--ready-file"])
            .arg(&ready)
            .arg("--journal")
            .arg(&journal)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("starting kubefim watch")?;
        let mut w = Watcher { child: Some(child), stderr, started: Instant::now(), ready_s: 0.0 };
        loop {
            if ready.exists() {
                w.ready_s = w.started.elapsed().as_secs_f64();
                return Ok(w);
            }
            let child = w.child.as_mut().context("the watcher runs")?;
            if let Some(status) = child.try_wait().context("waiting for kubefim watch")? {
                w.child = None;
                bail!(
                    "kubefim watch exited ({status}) before it was ready; its stderr ends with:\n{}",
                    tail(&w.stderr, 20)
                );
            }
            if w.started.elapsed() > READY_TIMEOUT {
                bail!(
                    "kubefim watch not ready after {} s; its stderr ends with:\n{}",
                    READY_TIMEOUT.as_secs(),
                    tail(&w.stderr, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A running `kubefim watch`, killed if dropped while running.
pub struct Watcher {
    child: Option<Child>,
    stderr: PathBuf,
    started: Instant,
    /// Spawn to the ready file, seconds.
    pub ready_s: f64,
}

impl Watcher {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGTERM; an error unless it exits 0.
    pub fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let status = stop(&mut child, "kubefim watch")?;
        if !status.success() {
            bail!("kubefim watch exited {status} on SIGTERM; its stderr ends with:\n{}", tail(&self.stderr, 20));
        }
        Ok(())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// The fields of `auditctl -s`.
fn audit_status() -> Result<Vec<(String, String)>> {
    let out = Command::new("auditctl").arg("-s").stdin(Stdio::null()).output().context("running auditctl -s")?;
    if !out.status.success() {
        bail!("`auditctl -s` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_owned(), v.trim().to_owned())))
        .collect())
}

fn audit_field(name: &str) -> Option<String> {
    audit_status().ok()?.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The kernel's `lost` counter (every process's records).
pub fn audit_lost() -> u64 {
    audit_field("lost").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The pid of the `kauditd` kernel thread, whose CPU is auditd's work too.
fn kauditd_pid() -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        (fs::read_to_string(e.path().join("comm")).ok()?.trim() == "kauditd").then_some(pid)
    })
}

/// auditd as a peer: what was there before, and how to run it with a watch rule on a tree.
pub struct Audit {
    /// `auditctl -s`'s enabled and backlog_limit before we touched them.
    orig_enabled: String,
    orig_backlog: String,
    /// An auditd that was already running (used as it is), else none: we start our own.
    existing: Option<u32>,
    kauditd: Option<u32>,
    conf_dir: PathBuf,
    /// The log the marker is looked for in (none when a running auditd's is not found).
    pub log: Option<PathBuf>,
    tree: PathBuf,
    key: String,
    backlog: u32,
    /// Its configuration, for the report (`log_format = ENRICHED, flush = ...`).
    pub conf_summary: String,
}

impl Audit {
    /// Whether auditd can be used here: `Err` says why not.
    pub fn detect(scratch: &Path, tree: &Path, backlog: u32) -> Result<Audit> {
        let has = |p: &str| kubefim_benches::host::has(p);
        if !has("auditctl") || !has("auditd") {
            bail!("auditctl/auditd not installed; scripts/setup.sh installs auditd");
        }
        let status = audit_status()?;
        let field = |name: &str| status.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
        if field("enabled") == "2" {
            bail!("audit rules are locked (`auditctl -s`: enabled 2) until reboot");
        }
        let existing =
            field("pid").parse::<u32>().ok().filter(|&p| p != 0 && Path::new(&format!("/proc/{p}")).exists());
        let conf_dir = scratch.join("audit");
        fs::create_dir_all(&conf_dir).with_context(|| format!("creating {}", conf_dir.display()))?;
        let own_log = conf_dir.join("audit.log");
        let system = fs::read_to_string("/etc/audit/auditd.conf").ok();
        let conf: String = match &system {
            Some(text) => text
                .lines()
                .map(|l| {
                    if l.split('=').next().is_some_and(|k| k.trim() == "log_file") {
                        format!("log_file = {}", own_log.display())
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n"),
            None => format!(
                "log_file = {}\nlog_format = ENRICHED\nflush = INCREMENTAL_ASYNC\nfreq = 50\nmax_log_file = 8\nnum_logs = 5\nmax_log_file_action = ROTATE",
                own_log.display()
            ),
        } + "\n";
        let conf_path = conf_dir.join("auditd.conf");
        fs::write(&conf_path, &conf).with_context(|| format!("writing {}", conf_path.display()))?;
        fs::set_permissions(&conf_path, fs::Permissions::from_mode(0o640))
            .with_context(|| format!("chmod {}", conf_path.display()))?;
        let value = |text: &str, key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().to_owned())
            })
        };
        let log = match existing {
            None => Some(own_log),
            Some(_) => system.as_deref().and_then(|t| value(t, "log_file")).map(PathBuf::from).filter(|p| p.is_file()),
        };
        let summary_of = if existing.is_some() { system.as_deref().unwrap_or("") } else { conf.as_str() };
        let conf_summary = ["log_format", "flush"]
            .iter()
            .filter_map(|k| value(summary_of, k).map(|v| format!("{k} = {v}")))
            .collect::<Vec<_>>()
            .join(", ");
        let audit = Audit {
            orig_enabled: field("enabled"),
            orig_backlog: field("backlog_limit"),
            existing,
            kauditd: kauditd_pid(),
            conf_dir,
            log,
            tree: tree.to_owned(),
            key: format!("kubefim-bench-{}", std::process::id()),
            backlog,
            conf_summary,
        };
        eprintln!(
            "auditd: if fimbench is interrupted, remove its rule with: auditctl -W {} -p wa -k {}",
            audit.tree.display(),
            audit.key
        );
        // It starts and takes the rule, or its rows say why not.
        audit.start().context("auditd did not start or take the watch rule")?.stop();
        Ok(audit)
    }

    /// Whether auditd was already running (its own configuration is used).
    pub fn preexisting(&self) -> bool {
        self.existing.is_some()
    }

    /// auditd running and registered with the kernel, the backlog limit set, the rule in.
    pub fn start(&self) -> Result<AuditRun<'_>> {
        let mut run_ = AuditRun { audit: self, child: None, rule: false, pids: Vec::new() };
        let pid = match self.existing {
            Some(pid) => pid,
            None => {
                // A fresh log for each run (it can grow by hundreds of MB in the loop).
                for e in fs::read_dir(&self.conf_dir).into_iter().flatten().flatten() {
                    if e.file_name().to_string_lossy().starts_with("audit.log") {
                        fs::remove_file(e.path()).ok();
                    }
                }
                let out = fs::File::create(self.conf_dir.join("auditd.out")).context("creating auditd.out")?;
                let mut cmd = Command::new("auditd");
                cmd.arg("-n").arg("-c").arg(&self.conf_dir).stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
                die_with_parent(&mut cmd);
                let child = cmd.spawn().context("starting auditd")?;
                let pid = child.id();
                run_.child = Some(child);
                let deadline = Instant::now() + Duration::from_secs(10);
                while audit_field("pid").as_deref() != Some(&pid.to_string()) {
                    if Instant::now() > deadline {
                        bail!(
                            "auditd (pid {pid}) did not register with the kernel in 10 s: {}",
                            tail(&self.conf_dir.join("auditd.out"), 5)
                        );
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                pid
            }
        };
        run_.pids.push(pid);
        run_.pids.extend(self.kauditd);
        run(Command::new("auditctl").arg("-b").arg(self.backlog.to_string()))?;
        run(Command::new("auditctl").arg("-w").arg(&self.tree).args(["-p", "wa", "-k", &self.key]))?;
        run_.rule = true;
        Ok(run_)
    }
}

impl Drop for Audit {
    fn drop(&mut self) {
        // auditd enables auditing when it starts: put back what was there.
        if !self.orig_backlog.is_empty() {
            Command::new("auditctl").args(["-b", &self.orig_backlog]).output().ok();
        }
        if !self.orig_enabled.is_empty() {
            Command::new("auditctl").args(["-e", &self.orig_enabled]).output().ok();
        }
    }
}

/// auditd watching the tree; dropping it removes the rule and stops an auditd we started.
pub struct AuditRun<'a> {
    audit: &'a Audit,
    child: Option<Child>,
    rule: bool,
    /// auditd and kauditd.
    pub pids: Vec<u32>,
}

impl AuditRun<'_> {
    pub fn stop(self) {}
}

impl Drop for AuditRun<'_> {
    fn drop(&mut self) {
        if self.rule {
            let a = self.audit;
            let removed = Command::new("auditctl").arg("-W").arg(&a.tree).args(["-p", "wa", "-k", &a.key]).output();
            if !removed.is_ok_and(|o| o.status.success()) {
                eprintln!(
                    "warning: could not remove the audit rule; remove it with: auditctl -W {} -p wa -k {}",
                    a.tree.display(),
                    a.key
                );
            }
        }
        if let Some(mut child) = self.child.take()
            && let Err(e) = stop(&mut child, "auditd")
        {
            eprintln!("warning: {e:#}");
        }
    }
}
