//! The watcher's check that its kernel side still sees what it should. Another root process
//! can delete or change entries of the kernel filter (`bpftool map delete` on `WATCHED`) or
//! detach programs, and nothing the kernel sends would say so: writes it no longer watches
//! are simply not sent. So, every [`CHECK_EVERY`]:
//!
//! - **a canary**: a file of the agent's own beside the journal, in the filter, is written by
//!   a short-lived child process (the kernel side ignores the agent's own pid, so the write
//!   must come from another process, and it passes the same hooks as any writer's). Its
//!   event must have arrived by the next check: a canary missing from the filter, a detached
//!   write hook or an emptied map fails it within two checks.
//! - **the filter's content**: a window of the index's existing entries is looked up in
//!   `WATCHED` (the inode, with the bits its path needs) and `NAMES` (its name), so that
//!   every entry is looked at within [`PASS_CHECKS`] checks, however many there are.
//!
//! This module only checks and says what failed; the loop acts on it (not ready, a `degraded`
//! line, the metrics, the maps refilled, a rescan) and is ready again once a canary written
//! after the refill is seen and a whole pass over the entries found nothing missing.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kubefim_common::{EVENT_HAS_TARGET, InodeKey};

use crate::event::KernelEvent;
use crate::filter::KernelFilter;
use crate::index::{EXISTS, Id, Index};

/// How often the checks run. A canary missed, or an entry found missing, is seen at the
/// latest two checks after the tampering (the canary's write, then its deadline): 4 s.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(2);
/// The canary's event is waited for at least this long before it counts as missed (a check
/// that comes early, after a turn of the loop that took long, waits for the next).
const CANARY_GRACE: Duration = Duration::from_secs(1);
/// Every entry of the filter is looked up within this many checks (10 s by default).
pub(crate) const PASS_CHECKS: usize = 5;
/// Entries looked up at each check at least (a few milliseconds of syscalls).
const MIN_WINDOW: usize = 4096;
/// What the helper writes (the content does not matter; it stays this long).
const CANARY_CONTENT: &[u8] = b"kubefim\n";

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// The canary's write produced no event in time.
    Canary,
    /// Inodes the watcher put in `WATCHED` are missing or lost their bits.
    Inodes,
    /// Names the watcher put in `NAMES` are missing.
    Names,
}

impl Check {
    /// Every check, for metrics that must exist at zero.
    pub const ALL: [Check; 3] = [Check::Canary, Check::Inodes, Check::Names];

    /// The name in metrics (`check` label).
    pub fn as_str(self) -> &'static str {
        match self {
            Check::Canary => "canary",
            Check::Inodes => "inodes",
            Check::Names => "names",
        }
    }
}

/// One failed check, with what was found, for people.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub check: Check,
    pub detail: String,
}

/// What a check run concluded.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Nothing new: all well, or recovering.
    Unchanged,
    /// Something failed.
    Failed(Failed),
    /// Failing before; a canary written after the refill was seen and a whole pass found
    /// every entry in place.
    Recovered,
}

/// What failed at one check.
#[derive(Debug)]
pub(crate) struct Failed {
    /// Every check that failed (each counts in the metrics).
    pub checks: Vec<Check>,
    /// The failures not said yet since the last recovery (one line each, not one a check).
    pub new: Vec<Failure>,
    /// The first failure since the last recovery.
    pub first: bool,
    /// Entries were missing: the maps need refilling (and what changed meanwhile, a rescan).
    pub refill: bool,
}

/// The canary file and its last write.
struct Canary {
    path: PathBuf,
    /// The path for the child, made before it is forked (it may not allocate).
    c_path: CString,
    key: InodeKey,
    /// When the last helper was started, if one was.
    written: Option<Instant>,
    /// Its event arrived.
    seen: bool,
    /// Events were lost since it was written: no event is no evidence.
    lost: bool,
}

/// The checks' state; see the module documentation.
pub(crate) struct SelfCheck {
    canary: Canary,
    /// The next index id the window starts at.
    cursor: usize,
    /// Failing since the last failure (not ready).
    failing: bool,
    /// Entries looked up since the last failure, with nothing missing.
    clean_since_failure: usize,
    /// The checks whose failure was said since the last recovery.
    said: Vec<Check>,
    /// Helper processes not reaped yet.
    helpers: Vec<rustix::process::Pid>,
}

impl SelfCheck {
    /// Makes the canary at `path` (a file of the agent's own, rewritten) and puts its inode
    /// in the filter.
    pub fn new(path: PathBuf, filter: &mut KernelFilter) -> std::io::Result<SelfCheck> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        std::io::Write::write_all(&mut file, CANARY_CONTENT)?;
        let meta = file.metadata()?;
        let key = InodeKey::from_stat(meta.dev(), meta.ino());
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
        if !filter.watch_uncounted(key) {
            return Err(std::io::Error::other("the kernel filter refused the canary's inode"));
        }
        let canary = Canary { path, c_path, key, written: None, seen: false, lost: false };
        Ok(SelfCheck {
            canary,
            cursor: 0,
            failing: false,
            clean_since_failure: 0,
            said: Vec::new(),
            helpers: Vec::new(),
        })
    }

    /// The canary file.
    pub fn canary_path(&self) -> &Path {
        &self.canary.path
    }

    /// Whether `event` is about the canary (then it is the check's, not a change to report).
    pub fn is_canary(&self, event: &KernelEvent) -> bool {
        event.header.flags & EVENT_HAS_TARGET != 0 && event.header.target == self.canary.key
    }

    /// The canary's event arrived.
    pub fn canary_seen(&mut self) {
        self.canary.seen = self.canary.written.is_some();
    }

    /// Events were lost: the canary's may be among them.
    pub fn events_lost(&mut self) {
        self.canary.lost = true;
    }

    /// Checks the canary's last write and a window of the filter against `index`.
    pub fn run(&mut self, filter: &KernelFilter, index: &Index) -> Outcome {
        self.reap(false);
        let mut failures = Vec::new();
        let c = &self.canary;
        if let Some(at) = c.written
            && !c.seen
            && !c.lost
            && at.elapsed() >= CANARY_GRACE
        {
            failures.push(Failure {
                check: Check::Canary,
                detail: format!(
                    "a write to the canary {} by a helper process {:.1} s ago produced no event (its inode in the \
                     filter: {})",
                    c.path.display(),
                    at.elapsed().as_secs_f64(),
                    if filter.bits_of(&c.key).is_some() { "present" } else { "missing" },
                ),
            });
        }
        let window = MIN_WINDOW.max(index.len().div_ceil(PASS_CHECKS));
        let found = self.check_window(filter, index, window);
        if !filter.was_full() {
            // A map that refused entries may lack some for that reason: no conclusion then.
            if found.inodes_missing + found.inodes_changed > 0 {
                failures.push(Failure {
                    check: Check::Inodes,
                    detail: format!(
                        "{} of {} monitored inodes looked up are missing from WATCHED and {} lost their bits{}",
                        found.inodes_missing,
                        found.inodes,
                        found.inodes_changed,
                        found.example.as_deref().map(|p| format!(" (first: {p})")).unwrap_or_default(),
                    ),
                });
            }
            if found.names_missing > 0 {
                failures.push(Failure {
                    check: Check::Names,
                    detail: format!(
                        "{} of {} monitored names looked up are missing from NAMES",
                        found.names_missing, found.names
                    ),
                });
            }
        }
        if !failures.is_empty() {
            let first = !self.failing;
            self.failing = true;
            self.clean_since_failure = 0;
            let checks: Vec<Check> = failures.iter().map(|f| f.check).collect();
            let refill = checks.iter().any(|c| *c != Check::Canary);
            let new: Vec<Failure> = failures.into_iter().filter(|f| !self.said.contains(&f.check)).collect();
            self.said.extend(new.iter().map(|f| f.check));
            return Outcome::Failed(Failed { checks, new, first, refill });
        }
        self.clean_since_failure = self.clean_since_failure.saturating_add(found.looked_at);
        let canary_passed = self.canary.written.is_some() && self.canary.seen;
        if self.failing && canary_passed && self.clean_since_failure >= index.len() {
            self.failing = false;
            self.said.clear();
            return Outcome::Recovered;
        }
        Outcome::Unchanged
    }

    /// Puts the canary back in the filter, after a refill (never before each write: a canary
    /// whose entry was deleted must go unseen, or the check could not fail).
    pub fn rewatch_canary(&self, filter: &mut KernelFilter) {
        filter.watch_uncounted(self.canary.key);
    }

    /// Has a helper process write the canary, unless the last write is still within its
    /// grace period.
    pub fn write_canary(&mut self) {
        let c = &mut self.canary;
        if c.written.is_some_and(|at| !c.seen && at.elapsed() < CANARY_GRACE) {
            return;
        }
        c.seen = false;
        c.lost = false;
        match spawn_writer(&c.c_path) {
            Ok(pid) => {
                c.written = Some(Instant::now());
                self.helpers.push(pid);
            }
            Err(e) => {
                // No helper, no deadline: the map checks go on; the next check tries again.
                c.written = None;
                tracing::warn!(canary = %c.path.display(), "cannot start the canary's helper process: {e}");
            }
        }
    }

    /// Reaps helpers that exited (all of them, waiting, with `wait`).
    fn reap(&mut self, wait: bool) {
        let options = if wait { rustix::process::WaitOptions::empty() } else { rustix::process::WaitOptions::NOHANG };
        self.helpers.retain(|&pid| !matches!(rustix::process::waitpid(Some(pid), options), Ok(Some(_)) | Err(_)));
    }

    /// Looks up the next window of existing entries.
    fn check_window(&mut self, filter: &KernelFilter, index: &Index, window: usize) -> WindowFound {
        let mut found = WindowFound::default();
        let len = index.len();
        if self.cursor >= len {
            self.cursor = 0;
        }
        let end = (self.cursor + window).min(len);
        for i in self.cursor..end {
            let Ok(id) = Id::try_from(i) else { break };
            found.looked_at += 1;
            let e = index.entry(id);
            if !e.has(EXISTS) {
                continue;
            }
            found.inodes += 1;
            let want = KernelFilter::wanted_bits(e.is_dir());
            let ok = match filter.bits_of(&e.key) {
                None => {
                    found.inodes_missing += 1;
                    false
                }
                Some(b) if b & want != want => {
                    found.inodes_changed += 1;
                    false
                }
                Some(_) => true,
            };
            if !ok && found.example.is_none() {
                found.example = Some(index.path(id).display().to_string());
            }
            let name = index.name(id);
            if !name.is_empty() {
                found.names += 1;
                if !filter.has_name(name) {
                    found.names_missing += 1;
                }
            }
        }
        self.cursor = if end >= len { 0 } else { end };
        found
    }
}

impl Drop for SelfCheck {
    fn drop(&mut self) {
        // A helper lives for one open, write and close: waiting for it is brief.
        self.reap(true);
    }
}

/// What one window found.
#[derive(Debug, Default)]
struct WindowFound {
    looked_at: usize,
    inodes: usize,
    inodes_missing: usize,
    inodes_changed: usize,
    names: usize,
    names_missing: usize,
    /// The path of the first inode found missing or changed.
    example: Option<String>,
}

/// Forks a child that opens `path` for writing, writes [`CANARY_CONTENT`] over its start and
/// exits. Not `Command`: the image has no program to run but kubefim, and a child that only
/// does three syscalls needs none.
fn spawn_writer(path: &std::ffi::CStr) -> std::io::Result<rustix::process::Pid> {
    // SAFETY: the watcher has other threads, so the child may only call async-signal-safe
    // functions: it calls open, write, close and _exit, on memory made before the fork, and
    // returns from none of them into Rust code.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(std::io::Error::last_os_error()),
        // SAFETY: as above; `path` outlives the child's use of it (the child never returns).
        0 => unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NOCTTY);
            let mut code = 1;
            if fd >= 0 {
                let n = libc::write(fd, CANARY_CONTENT.as_ptr().cast(), CANARY_CONTENT.len());
                if n == CANARY_CONTENT.len() as isize {
                    code = 0;
                }
                libc::close(fd);
            }
            libc::_exit(code)
        },
        pid => rustix::process::Pid::from_raw(pid).ok_or_else(|| std::io::Error::other("fork returned pid 0")),
    }
}
