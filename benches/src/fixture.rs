//! What `kubefim watch` needs besides the tree, kept next to it under the root so that the
//! next invocation reuses it: the key pair (`keys/`), a one-rule policy (`p<size>.yaml`) and
//! a signed baseline (`db<size>`, with `db<size>.made-by` saying which binary, policy and key
//! made it). Also how the harnesses run tools: children that die with the harness, and
//! commands whose failure carries their stderr.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The kubefim binary under test.
pub struct Binary {
    pub path: PathBuf,
    /// `kubefim --version`.
    pub version: String,
    /// BLAKE3 of the file: `--version` does not change from one build to the next.
    pub blake3: String,
}

impl Binary {
    pub fn new(path: &Path) -> Result<Self> {
        let path = fs::canonicalize(path).with_context(|| {
            format!("no kubefim at {}: build it (cargo build --release -p kubefim) or pass --kubefim", path.display())
        })?;
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let blake3 = blake3::hash(&bytes).to_hex().to_string();
        let out = run(Command::new(&path).arg("--version"))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(Binary { path, version, blake3 })
    }

    /// `PATH (VERSION, built MTIME, blake3 0123456789abcdef)`, for a report's header.
    pub fn describe(&self) -> String {
        let modified = fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_or_else(|_| "?".into(), |t| humantime::format_rfc3339_seconds(t).to_string());
        format!("{} ({}, built {modified}, blake3 {})", self.path.display(), self.version, &self.blake3[..16])
    }

    /// A command running it, killed if the harness dies.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        die_with_parent(&mut cmd);
        cmd
    }
}

/// Makes the child get SIGKILL when the harness dies, however it dies (a panic unwinds
/// through the guards; a SIGKILL of the harness does not).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// The files of one size under the root.
pub struct Fixture {
    pub tree: PathBuf,
    pub policy: PathBuf,
    pub db: PathBuf,
    pub key: PathBuf,
    pub pubkey: PathBuf,
    /// The ready file of the watcher runs.
    pub ready: PathBuf,
}

impl Fixture {
    pub fn new(root: &Path, label: &str) -> Self {
        let keys = root.join("keys");
        Fixture {
            tree: root.join(format!("t{label}")),
            policy: root.join(format!("p{label}.yaml")),
            db: root.join(format!("db{label}")),
            key: keys.join("kubefim.key"),
            pubkey: keys.join("kubefim.pub"),
            ready: root.join(format!("ready{label}")),
        }
    }

    fn stamp(&self) -> PathBuf {
        with_suffix(&self.db, ".made-by")
    }

    /// The watcher's default journal (the database path + `.journal`).
    pub fn journal(&self) -> PathBuf {
        with_suffix(&self.db, ".journal")
    }

    /// Forgets who made the baseline: its tree is about to change.
    pub fn invalidate_baseline(&self) -> Result<()> {
        remove(&self.stamp())
    }

    /// Makes the key pair unless both files are there.
    pub fn ensure_keys(&self, kubefim: &Binary) -> Result<()> {
        if self.key.is_file() && self.pubkey.is_file() {
            return Ok(());
        }
        let dir = self.key.parent().context("the key path has a parent")?;
        eprintln!("  keys: kubefim keygen --out {}", dir.display());
        run(kubefim.command().arg("keygen").arg("--out").arg(dir))?;
        Ok(())
    }

    /// Writes the policy unless it already says exactly this.
    pub fn ensure_policy(&self) -> Result<()> {
        let text = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: scale}}\nspec:\n  rules:\n    - path: {}\n",
            self.tree.display()
        );
        if fs::read_to_string(&self.policy).is_ok_and(|t| t == text) {
            return Ok(());
        }
        fs::write(&self.policy, text).with_context(|| format!("writing {}", self.policy.display()))
    }

    /// Who would make the baseline now: the binary, the policy and the public key.
    fn wanted_stamp(&self, kubefim: &Binary) -> Result<String> {
        let hash = |p: &Path| -> Result<String> {
            Ok(blake3::hash(&fs::read(p).with_context(|| format!("reading {}", p.display()))?).to_hex().to_string())
        };
        Ok(format!(
            "binary {}\nversion {}\npolicy {}\npubkey {}\n",
            kubefim.blake3,
            kubefim.version,
            hash(&self.policy)?,
            hash(&self.pubkey)?
        ))
    }

    /// Reuses the baseline when the same binary, policy and key made it (or when `reuse_any`
    /// and it is sealed); makes it otherwise, or when `force`. Says what it did.
    pub fn ensure_baseline(&self, kubefim: &Binary, force: bool, reuse_any: bool) -> Result<String> {
        let wanted = self.wanted_stamp(kubefim)?;
        let sealed = self.db.join("kubefim.seal").is_file();
        if !force && sealed {
            let made_by = fs::read_to_string(self.stamp()).ok();
            if made_by.as_deref() == Some(wanted.as_str()) {
                return Ok("reused (made by this binary)".into());
            }
            if reuse_any {
                let by = if made_by.is_some() { "another binary or policy" } else { "an unknown binary" };
                return Ok(format!("reused (--reuse-baseline; made by {by})"));
            }
        }
        remove(&self.stamp())?;
        remove(&self.db)?;
        remove(&self.journal())?;
        eprintln!("  baseline: kubefim baseline create --db {}", self.db.display());
        let started = Instant::now();
        run(kubefim
            .command()
            .args(["baseline", "create", "--policy"])
            .arg(&self.policy)
            .arg("--db")
            .arg(&self.db)
            .arg("--key")
            .arg(&self.key))?;
        let seconds = started.elapsed().as_secs_f64();
        fs::write(self.stamp(), wanted).with_context(|| format!("writing {}", self.stamp().display()))?;
        Ok(format!("made in {seconds:.1} s"))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Removes a file or a directory tree; absent is fine.
pub fn remove(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.with_context(|| format!("removing {}", path.display()))
}
