//! The debounce queue: events gathered per monitored path until it is worth a rehash —
//! soon after the close of a writer, after a short quiet period otherwise, and at the latest
//! a fixed time after the first event, so a file written without pause is still reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::actor::Actor;

/// Quiet time after the last event before a rehash.
pub const QUIET: Duration = Duration::from_millis(50);
/// Delay after a writer's close (lets the same actor's close-time events land first).
pub const AFTER_CLOSE: Duration = Duration::from_millis(5);
/// Longest a path waits for quiet.
pub const MAX_WAIT: Duration = Duration::from_millis(500);

/// What is known of a path's changes since its last rehash.
#[derive(Debug)]
pub struct Pending {
    /// Op names, in the order first seen.
    pub ops: Vec<&'static str>,
    /// The actor of the latest event that named an op (or of any event, failing that).
    pub actor: Option<Arc<Actor>>,
    /// Whether `actor` came from an event that named an op.
    actor_did_op: bool,
    /// Pids that made a syscall on the path: their inode-dirtying is not a separate mmap.
    pub syscall_pids: Vec<u32>,
    /// Pids whose inode-dirtying was noted as `mmap`.
    pub dirty_pids: Vec<u32>,
    /// Wall time of the latest event.
    pub time: SystemTime,
    /// The path a rename moved here.
    pub renamed_from: Option<PathBuf>,
    /// A directory whose entries are to be compared with the state when it is due (an
    /// entry was created, removed or renamed in it; at the syscall's entry it was not yet).
    pub list_entries: bool,
    first: Instant,
    due: Instant,
}

/// Pending paths.
#[derive(Default)]
pub struct Queue {
    paths: HashMap<PathBuf, Pending>,
}

impl Queue {
    /// Notes an event on `path`: `op` for `ops` (none for opens and closes), `close` for a
    /// writer's close.
    pub fn note(&mut self, path: &Path, op: Option<&'static str>, actor: &Arc<Actor>, time: SystemTime, close: bool) {
        let now = Instant::now();
        let p = self.paths.entry(path.to_owned()).or_insert_with(|| Pending {
            ops: Vec::new(),
            actor: None,
            actor_did_op: false,
            syscall_pids: Vec::new(),
            dirty_pids: Vec::new(),
            time,
            renamed_from: None,
            list_entries: false,
            first: now,
            due: now + QUIET,
        });
        if let Some(op) = op
            && !p.ops.contains(&op)
        {
            p.ops.push(op);
        }
        if op.is_some() || !p.actor_did_op {
            p.actor = Some(actor.clone());
            p.actor_did_op = op.is_some();
        }
        p.time = time;
        let wait = if close { AFTER_CLOSE } else { QUIET };
        p.due = (now + wait).min(p.first + MAX_WAIT);
    }

    /// Notes that a syscall of `pid` touched `path`.
    pub fn syscall_by(&mut self, path: &Path, pid: u32) {
        if let Some(p) = self.paths.get_mut(path)
            && !p.syscall_pids.contains(&pid)
        {
            p.syscall_pids.push(pid);
        }
    }

    /// Notes that `pid` dirtied `path` with no syscall of its own on it (yet).
    pub fn dirty_by(&mut self, path: &Path, pid: u32) {
        if let Some(p) = self.paths.get_mut(path)
            && !p.dirty_pids.contains(&pid)
        {
            p.dirty_pids.push(pid);
        }
    }

    /// Whether `pid` made a syscall on `path` since its last rehash.
    pub fn had_syscall(&self, path: &Path, pid: u32) -> bool {
        self.paths.get(path).is_some_and(|p| p.syscall_pids.contains(&pid))
    }

    /// Records that `to` was renamed from `from`.
    pub fn renamed(&mut self, to: &Path, from: &Path) {
        if let Some(p) = self.paths.get_mut(to) {
            p.renamed_from = Some(from.to_owned());
        }
    }

    /// Marks a pending directory for an entry comparison.
    pub fn list_entries(&mut self, dir: &Path) {
        if let Some(p) = self.paths.get_mut(dir) {
            p.list_entries = true;
        }
    }

    /// Whether `path` has pending events.
    pub fn contains(&self, path: &Path) -> bool {
        self.paths.contains_key(path)
    }

    /// The paths due now.
    pub fn take_due(&mut self) -> Vec<(PathBuf, Pending)> {
        let now = Instant::now();
        let due: Vec<PathBuf> = self.paths.iter().filter(|(_, p)| p.due <= now).map(|(k, _)| k.clone()).collect();
        let mut out: Vec<(PathBuf, Pending)> =
            due.into_iter().filter_map(|k| self.paths.remove(&k).map(|p| (k, p))).collect();
        for (_, p) in &mut out {
            // Dirtying seen before the same process's syscall event (its write, truncate...)
            // was that syscall, not a store through a mapping.
            if !p.dirty_pids.is_empty() && p.dirty_pids.iter().all(|pid| p.syscall_pids.contains(pid)) {
                p.ops.retain(|op| *op != "mmap");
            }
        }
        out
    }

    /// Removes a path's pending events (handled with another path's report).
    pub fn take(&mut self, path: &Path) -> Option<Pending> {
        self.paths.remove(path)
    }

    /// When the next path is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.paths.values().map(|p| p.due).min()
    }

    /// How many paths are pending.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}
