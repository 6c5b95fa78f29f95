//! The debounce queue: what is known of each monitored path's changes since its last rehash
//! — the ops, and for each process that made one, its own ops — until it is worth a rehash:
//! soon after the close of a writer, after a short quiet period otherwise, and at the latest
//! a fixed time after the first event, so a file written without pause is still reported.
//!
//! A new inode whose name is not known yet (created in a monitored directory, then written)
//! gathers its changes under the inode, not under its directory: the directory's own events
//! (other entries created, removed, renamed) never leak onto it. Paths found by a rescan or a
//! directory listing wait here too, with no process: an event on the same path in the
//! meantime brings its writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::policy::{path_bytes, path_from_bytes};
use kubefim_common::InodeKey;

use crate::actor::Actor;
use crate::model::{Attribution, FileOp};

/// Quiet time after the last event before a rehash.
pub(crate) const QUIET: Duration = Duration::from_millis(50);
/// Delay after a writer's close (lets the same actor's close-time events land first).
pub(crate) const AFTER_CLOSE: Duration = Duration::from_millis(5);
/// Longest a path waits for quiet.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(500);

/// One process's part in a path's changes.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    /// Who.
    pub actor: Arc<Actor>,
    /// The ops it made on the path, in the order first seen.
    pub ops: Vec<FileOp>,
    /// Whether the path it acted on was inferred rather than resolved as it saw it.
    pub inferred: bool,
    /// It made a syscall on the path (its inode dirtying is that syscall, not a store).
    syscall: bool,
    /// Its inode dirtying was noted as a store through a mapping.
    dirtied: bool,
}

/// How an event is noted on a path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Note {
    /// The op, if the event names one.
    pub op: Option<FileOp>,
    /// The event is a writer's close: rehash soon.
    pub close: bool,
    /// The event is a syscall on the path (not inode dirtying or io_uring).
    pub syscall: bool,
    /// The path was inferred.
    pub inferred: bool,
}

/// What is known of a path's (or an unnamed inode's) changes since its last rehash.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Every process seen acting on it, in the order first seen (with no op yet: an open).
    writers: Vec<Writer>,
    /// The process of the latest op.
    latest: Option<u32>,
    /// Wall time of the latest event.
    pub time: SystemTime,
    /// The path a rename moved here.
    pub renamed_from: Option<PathBuf>,
    /// A directory whose entries are to be compared with the state when it is due.
    pub list_entries: bool,
    /// An event was seen on it (not only a rescan or a listing).
    pub by_event: bool,
    /// Its inode, as confirmed on disk for an inode event in this window (see
    /// [`Queue::inode_confirmed`]).
    inode: Option<InodeKey>,
    first: Instant,
    due: Instant,
}

impl Pending {
    fn new(time: SystemTime, wait: Duration) -> Pending {
        let now = Instant::now();
        Pending {
            writers: Vec::new(),
            latest: None,
            time,
            renamed_from: None,
            list_entries: false,
            by_event: false,
            inode: None,
            first: now,
            due: now + wait,
        }
    }

    fn note(&mut self, actor: &Arc<Actor>, note: Note, time: SystemTime) {
        let now = Instant::now();
        self.by_event = true;
        let w = match self.writers.iter_mut().position(|w| w.actor.pid() == actor.pid()) {
            Some(i) => &mut self.writers[i],
            None => {
                self.writers.push(Writer {
                    actor: actor.clone(),
                    ops: Vec::new(),
                    inferred: note.inferred,
                    syscall: false,
                    dirtied: false,
                });
                self.writers.last_mut().expect("just pushed")
            }
        };
        if matches!(
            note.op,
            Some(FileOp::Unlink | FileOp::Rename | FileOp::Rmdir | FileOp::Mount | FileOp::MoveMount | FileOp::Umount)
        ) {
            // The inode may be gone, and its number given to another file; a mount puts
            // another inode at the path.
            self.inode = None;
        }
        if let Some(op) = note.op {
            self.latest = Some(actor.pid());
            if !w.ops.contains(&op) {
                w.ops.push(op);
                // The details of the process as of its latest op (its exe may have changed).
                w.actor = actor.clone();
                w.inferred = note.inferred;
            }
        }
        w.syscall |= note.syscall;
        self.time = time;
        let wait = if note.close { AFTER_CLOSE } else { QUIET };
        self.due = (now + wait).min(self.first + MAX_WAIT);
    }

    /// Notes that `actor` dirtied the inode. A process that made a syscall on the path was
    /// that syscall's writeback; otherwise a store through a mapping (or io_uring's worker).
    fn dirty(&mut self, actor: &Arc<Actor>, io_worker: bool, time: SystemTime) {
        let had_syscall = self.writers.iter().any(|w| w.actor.pid() == actor.pid() && w.syscall);
        let op = (!had_syscall).then_some(if io_worker { FileOp::IoUring } else { FileOp::Mmap });
        self.note(actor, Note { op, close: false, syscall: false, inferred: false }, time);
        if op == Some(FileOp::Mmap)
            && let Some(w) = self.writers.iter_mut().find(|w| w.actor.pid() == actor.pid())
        {
            w.dirtied = true;
        }
    }

    /// Nothing noted yet: a path about to be rehashed with another's, or found by listing.
    pub fn unseen(time: SystemTime) -> Pending {
        Pending::new(time, Duration::ZERO)
    }

    /// Takes in what another pending (an inode's, before its name was found) gathered.
    pub fn absorb(&mut self, other: Pending) {
        for w in other.writers {
            match self.writers.iter_mut().find(|m| m.actor.pid() == w.actor.pid()) {
                Some(m) => {
                    for op in w.ops {
                        if !m.ops.contains(&op) {
                            m.ops.push(op);
                        }
                    }
                    m.syscall |= w.syscall;
                    m.dirtied |= w.dirtied;
                    m.inferred |= w.inferred;
                }
                None => self.writers.push(w),
            }
        }
        self.by_event |= other.by_event;
        if other.time >= self.time {
            self.latest = other.latest.or(self.latest);
        }
        self.time = self.time.max(other.time);
        self.first = self.first.min(other.first);
        self.due = self.due.min(other.due);
    }

    /// The processes that made an op on it, in order, each with its ops. Dirtying seen
    /// before the same process's syscall event (its write, truncate...) was that syscall,
    /// not a store through a mapping.
    ///
    /// When no process made an op the kernel reported (their events were lost), the
    /// processes that had it open for writing stand in, marked inferred: the opens and closes
    /// of writers are all that is left of who it was.
    pub fn writers(&self) -> Vec<Writer> {
        let writers: Vec<Writer> = self
            .writers
            .iter()
            .cloned()
            .map(|mut w| {
                if w.dirtied && w.syscall {
                    w.ops.retain(|op| *op != FileOp::Mmap);
                }
                w
            })
            .collect();
        if writers.iter().any(|w| !w.ops.is_empty()) {
            return writers.into_iter().filter(|w| !w.ops.is_empty()).collect();
        }
        writers.into_iter().map(|w| Writer { inferred: true, ..w }).collect()
    }

    /// The writer whose op was seen last (the one that made the state reported).
    pub fn latest_writer(&self) -> Option<Writer> {
        let writers = self.writers();
        let latest = self.latest.and_then(|pid| writers.iter().position(|w| w.actor.pid() == pid));
        match latest {
            Some(i) => writers.into_iter().nth(i),
            None => writers.into_iter().last(),
        }
    }

    /// Every op any process made on it, in the order first seen.
    pub fn ops(&self) -> Vec<FileOp> {
        let mut ops = Vec::new();
        for w in self.writers() {
            for op in w.ops {
                if !ops.contains(&op) {
                    ops.push(op);
                }
            }
        }
        ops
    }

    /// How sure the attribution of its writers is.
    pub fn attribution(&self) -> Attribution {
        let writers = self.writers();
        if writers.is_empty() {
            Attribution::None
        } else if writers.iter().any(|w| w.inferred) {
            Attribution::Inferred
        } else {
            Attribution::Exact
        }
    }
}

/// Pending paths and unnamed inodes.
#[derive(Default)]
pub(crate) struct Queue {
    /// By the path's bytes: `Path`'s own hash walks its components, which a storm of events
    /// pays for several times an event.
    paths: HashMap<Box<[u8]>, Pending>,
    /// New inodes, with the directory they were created in.
    unnamed: HashMap<InodeKey, (PathBuf, Pending)>,
    /// No due time is earlier than this (it may be earlier than the earliest: a note can put
    /// a due time later); recomputed when what is due is taken. Saves a walk over every
    /// pending path at each turn of the loop in a storm.
    earliest: Option<Instant>,
}

impl Queue {
    fn due_at(&mut self, due: Instant) {
        self.earliest = Some(self.earliest.map_or(due, |e| e.min(due)));
    }

    /// The pending entry of `path`, made (due after the quiet time) if there is none.
    fn entry(&mut self, path: &Path, time: SystemTime) -> &mut Pending {
        let key = path_bytes(path);
        if !self.paths.contains_key(key) {
            self.paths.insert(key.into(), Pending::new(time, QUIET));
        }
        self.paths.get_mut(key).expect("just made")
    }

    /// Notes an event of `actor` on `path`.
    pub fn note(&mut self, path: &Path, actor: &Arc<Actor>, note: Note, time: SystemTime) {
        let p = self.entry(path, time);
        p.note(actor, note, time);
        let due = p.due;
        self.due_at(due);
    }

    /// Notes that `actor` dirtied the inode of `path`.
    pub fn dirty(&mut self, path: &Path, actor: &Arc<Actor>, io_worker: bool, time: SystemTime) {
        let p = self.entry(path, time);
        p.dirty(actor, io_worker, time);
        let due = p.due;
        self.due_at(due);
    }

    /// Notes an event of `actor` on a new inode created in `dir` whose name is not known yet.
    pub fn note_unnamed(&mut self, key: InodeKey, dir: &Path, actor: &Arc<Actor>, note: Note, time: SystemTime) {
        let (_, p) = self.unnamed.entry(key).or_insert_with(|| (dir.to_owned(), Pending::new(time, QUIET)));
        p.note(actor, note, time);
        let due = p.due;
        self.due_at(due);
    }

    /// Notes that `actor` dirtied a new inode whose name is not known yet.
    pub fn dirty_unnamed(&mut self, key: InodeKey, actor: &Arc<Actor>, io_worker: bool, time: SystemTime) {
        if let Some((_, p)) = self.unnamed.get_mut(&key) {
            p.dirty(actor, io_worker, time);
            let due = p.due;
            self.due_at(due);
        }
    }

    /// The directory a new inode whose name is not known yet was created in.
    pub fn unnamed_dir(&self, key: &InodeKey) -> Option<&Path> {
        self.unnamed.get(key).map(|(dir, _)| dir.as_path())
    }

    /// Notes a path found different by a rescan or a listing (no process known). Nothing
    /// changes for a path already pending.
    pub fn found(&mut self, path: &Path, time: SystemTime) {
        let due = self.entry(path, time).due;
        self.due_at(due);
    }

    /// Records that `to` was renamed from `from`.
    pub fn renamed(&mut self, to: &Path, from: &Path) {
        if let Some(p) = self.paths.get_mut(path_bytes(to)) {
            p.renamed_from = Some(from.to_owned());
        }
    }

    /// Marks a pending directory for an entry comparison.
    pub fn list_entries(&mut self, dir: &Path) {
        if let Some(p) = self.paths.get_mut(path_bytes(dir)) {
            p.list_entries = true;
        }
    }

    /// Whether `path` has pending events.
    pub fn contains(&self, path: &Path) -> bool {
        self.paths.contains_key(path_bytes(path))
    }

    /// The paths due now; with `all`, every path whatever its due time (at shutdown).
    pub fn take_due(&mut self, all: bool) -> Vec<(PathBuf, Pending)> {
        let now = Instant::now();
        let due: Vec<Box<[u8]>> =
            self.paths.iter().filter(|(_, p)| all || p.due <= now).map(|(k, _)| k.clone()).collect();
        let taken = due
            .into_iter()
            .filter_map(|k| self.paths.remove(&k).map(|p| (path_from_bytes(&k).to_owned(), p)))
            .collect();
        self.recompute_earliest();
        taken
    }

    /// The unnamed inodes due now (or all), with their directory.
    pub fn take_due_unnamed(&mut self, all: bool) -> Vec<(InodeKey, PathBuf, Pending)> {
        let now = Instant::now();
        let due: Vec<InodeKey> =
            self.unnamed.iter().filter(|(_, (_, p))| all || p.due <= now).map(|(k, _)| *k).collect();
        let taken = due.into_iter().filter_map(|k| self.unnamed.remove(&k).map(|(dir, p)| (k, dir, p))).collect();
        self.recompute_earliest();
        taken
    }

    /// Removes a path's pending events (handled with another path's report).
    pub fn take(&mut self, path: &Path) -> Option<Pending> {
        self.paths.remove(path_bytes(path))
    }

    /// When the next path or inode is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.earliest
    }

    fn recompute_earliest(&mut self) {
        self.earliest = self.paths.values().chain(self.unnamed.values().map(|(_, p)| p)).map(|p| p.due).min();
    }

    /// Whether `key` was confirmed (on disk) to be `path`'s inode in this window, with no
    /// event since that could have taken it away (an unlink, a rename, an rmdir).
    pub fn inode_confirmed(&self, path: &Path, key: InodeKey) -> bool {
        self.paths.get(path_bytes(path)).is_some_and(|p| p.inode == Some(key))
    }

    /// Records that `key` is `path`'s inode (a stat said so), for the rest of its window.
    pub fn confirm_inode(&mut self, path: &Path, key: InodeKey) {
        if let Some(p) = self.paths.get_mut(path_bytes(path)) {
            p.inode = Some(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn actor(pid: u32, comm: &str) -> Arc<Actor> {
        Arc::new(Actor::for_tests(pid, comm))
    }

    fn op(op: FileOp) -> Note {
        Note { op: Some(op), close: false, syscall: true, inferred: false }
    }

    #[test]
    fn each_process_keeps_its_own_ops_in_order() {
        let mut q = Queue::default();
        let (sh, rm) = (actor(10, "sh"), actor(11, "rm"));
        let t = SystemTime::now();
        let path = Path::new("/etc/x");
        q.note(path, &sh, op(FileOp::Truncate), t);
        q.note(path, &sh, op(FileOp::Write), t);
        q.note(path, &rm, op(FileOp::Unlink), t);
        q.note(path, &sh, op(FileOp::Write), t);
        let (_, p) = q.take_due(true).pop().unwrap();
        let writers = p.writers();
        assert_eq!(writers.len(), 2);
        assert_eq!(
            (writers[0].actor.process.comm.as_str(), writers[0].ops.clone()),
            ("sh", vec![FileOp::Truncate, FileOp::Write])
        );
        assert_eq!((writers[1].actor.process.comm.as_str(), writers[1].ops.clone()), ("rm", vec![FileOp::Unlink]));
        assert_eq!(p.ops(), [FileOp::Truncate, FileOp::Write, FileOp::Unlink]);
        assert_eq!(p.attribution(), Attribution::Exact);
        assert_eq!(p.latest_writer().unwrap().actor.process.comm, "sh", "sh wrote last");
    }

    #[test]
    fn a_writer_whose_ops_were_lost_is_inferred_from_its_close_and_an_idle_opener_is_not_named() {
        let mut q = Queue::default();
        let (closer, opener, writer) = (actor(12, "closer"), actor(13, "opener"), actor(14, "writer"));
        let t = SystemTime::now();
        let close = Note { op: None, close: true, syscall: true, inferred: false };
        // Only the close of a writer is left (its writes were lost): it stands in, inferred.
        q.note(Path::new("/a"), &closer, close, t);
        // An opener that wrote nothing beside a writer whose write was seen: not named.
        q.note(Path::new("/c"), &opener, close, t);
        q.note(Path::new("/c"), &writer, op(FileOp::Write), t);
        q.found(Path::new("/b"), t);
        let mut due = q.take_due(true);
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let inferred = due[0].1.writers();
        assert_eq!((inferred.len(), inferred[0].actor.pid(), inferred[0].ops.len()), (1, 12, 0));
        assert_eq!(due[0].1.attribution(), Attribution::Inferred);
        assert_eq!(due[1].1.attribution(), Attribution::None);
        assert!(!due[1].1.by_event);
        let named: Vec<u32> = due[2].1.writers().iter().map(|w| w.actor.pid()).collect();
        assert_eq!(named, [14]);
        assert_eq!(due[2].1.attribution(), Attribution::Exact);
    }

    #[test]
    fn dirtying_by_a_syscall_writer_is_not_a_store_but_by_another_process_it_is() {
        let mut q = Queue::default();
        let (writer, mapper) = (actor(20, "python3"), actor(21, "mapper"));
        let t = SystemTime::now();
        let path = Path::new("/f");
        // Dirtying seen before the write event of the same process.
        q.dirty(path, &writer, false, t);
        q.note(path, &writer, op(FileOp::Write), t);
        q.dirty(path, &mapper, false, t);
        let (_, p) = q.take_due(true).pop().unwrap();
        let writers = p.writers();
        assert_eq!(writers[0].ops, [FileOp::Write]);
        assert_eq!(writers[1].ops, [FileOp::Mmap]);
    }

    #[test]
    fn an_unnamed_inode_keeps_its_changes_apart_from_its_directory() {
        let mut q = Queue::default();
        let (sh, rm) = (actor(30, "sh"), actor(31, "rm"));
        let t = SystemTime::now();
        let key = InodeKey { dev: 1, ino: 99 };
        let dir = Path::new("/etc");
        q.note(dir, &sh, op(FileOp::Create), t);
        q.note_unnamed(key, dir, &sh, op(FileOp::Create), t);
        q.note_unnamed(key, dir, &sh, op(FileOp::Write), t);
        q.note(dir, &rm, op(FileOp::Unlink), t);
        assert_eq!(q.unnamed_dir(&key), Some(dir));
        let (k, d, unnamed) = q.take_due_unnamed(true).pop().unwrap();
        assert_eq!((k, d.as_path()), (key, dir));
        let mut found = Pending::unseen(t);
        found.absorb(unnamed);
        assert_eq!(found.ops(), [FileOp::Create, FileOp::Write]);
        assert_eq!(found.writers().len(), 1);
        let (_, dir_pending) = q.take_due(true).pop().unwrap();
        assert_eq!(dir_pending.ops(), [FileOp::Create, FileOp::Unlink]);
    }
}
