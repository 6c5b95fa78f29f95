//! Rescans, off the loop: a thread of their own walks what the policy names (or some
//! subtrees of it) and sends each entry's path and record fingerprint back in batches. The
//! loop compares them with the index as they come: what differs, and at the end what was
//! not seen and is gone from disk, waits in the debounce queue as found (an event on the
//! same path meanwhile brings its writer) and is rehashed and reported like any change.
//! Once the last of them is reported, the `rescan` line, and for a verify the `verify`
//! line. One rescan runs at a time; requests meanwhile are merged into the next one.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use kubefim_baseline::policy::Policy;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::{Scan, ScanProgress, ScanSink, ScannedEntry};
use tokio::sync::mpsc;

use crate::actor::Actor;
use crate::index::{EXISTS, Id, ROOT};
use crate::metrics::Metrics;
use crate::model::{FileOp, RescanReason, Unverified, VerifyReason};
use crate::pending::{Note, Queue};
use crate::state::State;

/// Paths and fingerprints per message from the scanning thread.
const BATCH: usize = 1024;
/// Messages the scanning thread may be ahead of the loop.
const AHEAD: usize = 16;

/// What to rescan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    /// Everything the policy names.
    All,
    /// These subtrees (each within the policy's rules).
    Under(BTreeSet<PathBuf>),
}

/// A rescan to run.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    /// Why.
    pub reason: RescanReason,
    /// What.
    pub scope: Scope,
    /// Compare everything with the signed baseline afterwards (a `verify` line).
    pub verify: Option<VerifyReason>,
    /// Processes whose cut paths named these subtrees: what differs under a subtree is
    /// attributed to them, as inferred.
    pub writers: Vec<(PathBuf, Arc<Actor>, Option<FileOp>)>,
}

impl Request {
    /// A rescan of everything.
    pub fn all(reason: RescanReason, verify: Option<VerifyReason>) -> Request {
        Request { reason, scope: Scope::All, verify, writers: Vec::new() }
    }

    fn merge(&mut self, other: Request) {
        match (&mut self.scope, other.scope) {
            (Scope::All, _) => {}
            (_, Scope::All) => {
                self.scope = Scope::All;
                self.reason = other.reason;
            }
            (Scope::Under(a), Scope::Under(b)) => a.extend(b),
        }
        self.verify = self.verify.or(other.verify);
        self.writers.extend(other.writers);
    }
}

/// What the scanning thread sends.
pub(crate) enum Found {
    /// Scanned entries: path and record fingerprint.
    Batch(Vec<(PathBuf, u64)>),
    /// The scan ended.
    Done {
        /// Entries scanned.
        scanned: u64,
        /// Paths that could not be checked (their subtrees are not concluded gone).
        incomplete: Vec<(PathBuf, String)>,
    },
}

/// What a rescan needs besides the policy.
#[derive(Clone)]
pub(crate) struct Setup {
    /// Where the policy's paths are on disk.
    pub host: HostRoot,
    /// The watcher's own files (database, journal, ready file): never recorded.
    pub skip: Vec<PathBuf>,
}

struct Running {
    request: Request,
    started: Instant,
    seen: Vec<u64>,
    /// What it queued and is not reported yet.
    found: HashSet<PathBuf>,
    /// Changes reported of what it queued.
    changes: u64,
}

/// A rescan whose findings are being reported.
struct Finishing {
    request: Request,
    started: Instant,
    scanned: u64,
    unverified: Vec<Unverified>,
    waiting: HashSet<PathBuf>,
    changes: u64,
}

/// A finished rescan, for its lines.
pub(crate) struct Finished {
    /// What it was.
    pub request: Request,
    /// When it started.
    pub started: Instant,
    /// Entries scanned.
    pub scanned: u64,
    /// Changes it reported.
    pub changes: u64,
    /// What it could not check.
    pub unverified: Vec<Unverified>,
}

/// The rescans: the one running, the next, those being reported.
pub(crate) struct Rescans {
    metrics: Arc<Metrics>,
    policy: Policy,
    setup: Setup,
    tx: mpsc::Sender<Found>,
    rx: mpsc::Receiver<Found>,
    running: Option<Running>,
    next: Option<Request>,
    finishing: Vec<Finishing>,
}

struct Sink {
    tx: mpsc::Sender<Found>,
    batch: Mutex<Vec<(PathBuf, u64)>>,
}

impl ScanSink for Sink {
    fn entry(&self, entry: ScannedEntry) {
        let fingerprint = entry.record.fingerprint();
        let mut batch = self.batch.lock().unwrap_or_else(PoisonError::into_inner);
        batch.push((entry.path, fingerprint));
        if batch.len() >= BATCH {
            let full = std::mem::take(&mut *batch);
            drop(batch);
            // The loop gone (shutting down): the rest of the scan is wasted, not wrong.
            let _ = self.tx.blocking_send(Found::Batch(full));
        }
    }
}

fn set_bit(bits: &mut Vec<u64>, id: Id) {
    let (word, bit) = (id as usize / 64, id % 64);
    if bits.len() <= word {
        bits.resize(word + 1, 0);
    }
    bits[word] |= 1 << bit;
}

fn bit(bits: &[u64], id: Id) -> bool {
    bits.get(id as usize / 64).is_some_and(|w| w & (1 << (id % 64)) != 0)
}

impl Rescans {
    /// No rescan yet.
    pub fn new(policy: Policy, setup: Setup, metrics: Arc<Metrics>) -> Rescans {
        let (tx, rx) = mpsc::channel(AHEAD);
        Rescans { metrics, policy, setup, tx, rx, running: None, next: None, finishing: Vec::new() }
    }

    /// Asks for a rescan: now if none is running, else merged into the next one.
    pub fn request(&mut self, request: Request) {
        if self.running.is_some() {
            match &mut self.next {
                Some(next) => next.merge(request),
                None => self.next = Some(request),
            }
            return;
        }
        self.start(request);
    }

    fn start(&mut self, request: Request) {
        let policy = self.policy.clone();
        let setup = self.setup.clone();
        let scope = request.scope.clone();
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new().name("kubefim-rescan".into()).spawn(move || {
            let mut scan = match scope {
                Scope::All => Scan::whole_policy(&policy),
                Scope::Under(roots) => Scan::paths(&policy, roots.into_iter().collect()),
            }
            .under(&setup.host);
            for s in &setup.skip {
                scan = scan.skip(s);
            }
            let sink = Sink { tx: tx.clone(), batch: Mutex::new(Vec::with_capacity(BATCH)) };
            let summary = scan.run(&sink, &ScanProgress::default());
            let rest = std::mem::take(&mut *sink.batch.lock().unwrap_or_else(PoisonError::into_inner));
            if !rest.is_empty() {
                let _ = tx.blocking_send(Found::Batch(rest));
            }
            let incomplete = summary.incomplete().map(|w| (w.path.clone(), w.message.clone())).collect();
            let _ = tx.blocking_send(Found::Done { scanned: summary.entries, incomplete });
        });
        if let Err(e) = spawned {
            // No thread for it now: the next request (or the interval) tries again.
            tracing::error!("cannot start a rescan thread: {e}");
            return;
        }
        self.metrics.rescan(request.reason);
        self.running =
            Some(Running { request, started: Instant::now(), seen: Vec::new(), found: HashSet::new(), changes: 0 });
    }

    /// The next message of the running rescan's thread (pending forever when none runs).
    pub async fn recv(&mut self) -> Option<Found> {
        if self.running.is_none() {
            return std::future::pending().await;
        }
        self.rx.recv().await
    }

    /// Compares scanned entries with the state: what differs is queued as found.
    pub fn batch(&mut self, state: &State, queue: &mut Queue, entries: Vec<(PathBuf, u64)>) {
        let Some(running) = &mut self.running else { return };
        let index = state.index();
        let now = SystemTime::now();
        let mut last_dir = None;
        for (path, fingerprint) in entries {
            if let Some(id) = index.lookup_near(&path, &mut last_dir) {
                set_bit(&mut running.seen, id);
                let e = index.entry(id);
                if e.has(EXISTS) && e.fingerprint == fingerprint {
                    continue;
                }
            }
            found(running, queue, &path, now);
        }
    }

    /// The scan ended: what was not seen and is gone from disk is queued as found, and the
    /// rescan waits for its findings to be reported.
    pub fn done(&mut self, state: &State, queue: &mut Queue, scanned: u64, incomplete: Vec<(PathBuf, String)>) {
        let Some(mut running) = self.running.take() else { return };
        let index = state.index();
        let roots: Vec<Id> = match &running.request.scope {
            Scope::All => vec![ROOT],
            Scope::Under(paths) => paths.iter().filter_map(|p| index.lookup(p)).collect(),
        };
        let now = SystemTime::now();
        let mut stack = roots;
        let mut gone = Vec::new();
        while let Some(id) = stack.pop() {
            stack.extend(index.children(id));
            if index.entry(id).has(EXISTS) && !bit(&running.seen, id) {
                gone.push(index.path(id));
            }
        }
        for path in gone {
            let under_incomplete = incomplete.iter().any(|(p, _)| path.starts_with(p));
            // Beneath its rule root: a path below what is now a symlink is not on disk.
            let on_disk = kubefim_baseline::beneath::lstat(&self.policy, &self.setup.host, &path).is_ok();
            if !under_incomplete && !on_disk {
                found(&mut running, queue, &path, now);
            }
        }
        let unverified = incomplete
            .into_iter()
            .map(|(p, error)| Unverified { path: kubefim_baseline::report::display_path(&p), error })
            .collect();
        self.finishing.push(Finishing {
            request: running.request,
            started: running.started,
            scanned,
            unverified,
            waiting: running.found,
            changes: running.changes,
        });
        if let Some(next) = self.next.take() {
            self.start(next);
        }
    }

    /// A queued path was rehashed (`reported`: a change was printed for it), by the
    /// running rescan's findings as they come, or after it ended.
    pub fn processed(&mut self, path: &Path, reported: bool) {
        if let Some(r) = &mut self.running
            && r.found.remove(path)
            && reported
        {
            r.changes += 1;
        }
        for f in &mut self.finishing {
            if f.waiting.remove(path) && reported {
                f.changes += 1;
            }
        }
    }

    /// Rescans whose every finding has been reported, oldest first.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        let (done, going): (Vec<Finishing>, Vec<Finishing>) =
            std::mem::take(&mut self.finishing).into_iter().partition(|f| f.waiting.is_empty());
        self.finishing = going;
        done.into_iter()
            .map(|f| Finished {
                request: f.request,
                started: f.started,
                scanned: f.scanned,
                changes: f.changes,
                unverified: f.unverified,
            })
            .collect()
    }
}

/// Queues a path a rescan found different (with the processes whose cut paths named its
/// subtree, as inferred), unless events are already pending for it.
fn found(running: &mut Running, queue: &mut Queue, path: &Path, time: SystemTime) {
    if queue.contains(path) {
        return;
    }
    queue.found(path, time);
    for (root, actor, op) in &running.request.writers {
        if path.starts_with(root) {
            queue.note(path, actor, Note { op: *op, close: false, syscall: true, inferred: true }, time);
        }
    }
    running.found.insert(path.to_owned());
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kubefim_baseline::root::HostRoot;

    use super::*;
    use crate::fixture::Fixture;

    /// Runs a rescan of the fixture to its end, reporting (as the loop would) every finding
    /// as soon as it is queued; returns the finished rescan and the paths found.
    fn rescan(fx: &Fixture, state: &State, scope: Scope) -> (Finished, Vec<PathBuf>) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let setup = Setup { host: HostRoot::identity(), skip: Vec::new() };
        let mut rescans = Rescans::new(fx.policy(), setup, Arc::new(Metrics::new()));
        let mut queue = Queue::default();
        rescans.request(Request { reason: RescanReason::Interval, scope, verify: None, writers: Vec::new() });
        let mut found = Vec::new();
        runtime.block_on(async {
            loop {
                match rescans.recv().await.expect("the rescan thread") {
                    Found::Batch(entries) => rescans.batch(state, &mut queue, entries),
                    Found::Done { scanned, incomplete } => {
                        rescans.done(state, &mut queue, scanned, incomplete);
                        for (path, _) in queue.take_due(true) {
                            rescans.processed(&path, true);
                            found.push(path);
                        }
                        break;
                    }
                }
                // Findings reported while the scan still runs.
                for (path, _) in queue.take_due(true) {
                    rescans.processed(&path, true);
                    found.push(path);
                }
            }
        });
        let mut finished = rescans.take_finished();
        assert_eq!(finished.len(), 1, "the rescan is over once all it found is reported");
        found.sort();
        (finished.remove(0), found)
    }

    #[test]
    fn a_rescan_finds_what_differs_and_what_is_gone_and_counts_what_was_reported_while_it_ran() {
        // Enough entries for several batches, so findings are reported before the scan ends.
        let files: Vec<(String, String)> = (0..3000).map(|i| (format!("d{}/f{i}", i % 7), format!("{i}\n"))).collect();
        let refs: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
        let fx = Fixture::new(&refs);
        let state = fx.state();
        std::fs::write(fx.path("d0/f0"), "changed\n").unwrap();
        std::fs::remove_file(fx.path("d1/f1")).unwrap();
        std::fs::write(fx.path("d2/new"), "new\n").unwrap();
        let (finished, found) = rescan(&fx, &state, Scope::All);
        // d0/f0 changed, d1/f1 is gone, d2/new is new, and the directories whose entries
        // changed (d1, d2) differ too.
        let want: Vec<PathBuf> = ["d0/f0", "d1", "d1/f1", "d2", "d2/new"]
            .iter()
            .map(|r| fx.path(r))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(found, want);
        assert_eq!(finished.changes, want.len() as u64);
        assert_eq!(finished.scanned, 3000 + 7 + 1, "files, directories and the tree");
        assert!(finished.unverified.is_empty());
    }

    #[test]
    fn a_rescan_of_a_subtree_concludes_nothing_outside_it() {
        let fx = Fixture::new(&[("in/a", "a\n"), ("in/b", "b\n"), ("out/c", "c\n")]);
        let state = fx.state();
        std::fs::remove_file(fx.path("in/a")).unwrap();
        std::fs::remove_file(fx.path("out/c")).unwrap();
        let (finished, found) = rescan(&fx, &state, Scope::Under([fx.path("in")].into_iter().collect()));
        assert_eq!(found, [fx.path("in"), fx.path("in/a")]);
        assert_eq!(finished.scanned, 2, "in and in/b");
    }
}
