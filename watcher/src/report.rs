//! From observations to reports: each kernel event is mapped to what it may have changed
//! (`targets`) and noted in the debounce queue (`pending`); what is due is rehashed, compared
//! with what was known, and reported as a typed line naming each process that changed that
//! path; the state, the journal and the kernel filter are then kept in step. A rename,
//! removal or mount that may have put other inodes at monitored paths is held for a moment
//! (the syscall was seen on entry), then says what is mounted there now (`mounted-over`) and
//! has its subtrees rescanned, attributed to its process.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use kubefim_baseline::beneath;
use kubefim_baseline::mounts::MountTable;
use kubefim_baseline::policy::{Attribute, AttributeSet, Policy, path_bytes};
use kubefim_baseline::record::{FileKind, FileRecord};
use kubefim_baseline::report::{EscapedField, EscapedPath, RecordView, display_path, escape_bytes};
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::{WarningKind, rehash};
use kubefim_baseline::verify::{Change as Difference, ChangeKind, compare_with};
use kubefim_common::{EVENT_IO_WORKER, InodeKey, Op};

use crate::actor::Actor;
use crate::ancestors::Ancestors;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::filter::KernelFilter;
use crate::metrics::Metrics;
use crate::model::{
    Change, Degraded, DegradedReason, DetectedBy, Deviation, DeviationKind, Event, FileOp, Line, MountedOver,
    PathError, Reference, RescanReason, Verify, VerifyReason, VerifyResult, time_string,
};
use crate::output::Printer;
use crate::pending::{Note, Pending, Queue};
use crate::reader::Observation;
use crate::rescan::{Request, Rescans, Scope};
use crate::state::{Deviation as StateDeviation, Known, State, key_of};
use crate::targets::{View, covered, targets};

/// How many deviating paths a `verify` line names (the counts are always complete).
const VERIFY_LISTED: usize = 100;

/// What the loop acts on besides the queue: a rescan to ask for.
pub(crate) enum Follow {
    /// Nothing.
    Nothing,
    /// A rescan now.
    Rescan(Request),
    /// A rescan of everything once an io_uring path operation has had time to complete.
    RescanSoon,
    /// A rename, removal or mount that may have put other inodes at monitored paths: once it
    /// has had time to complete, [`Reporter::reroot`].
    Reroot(Reroot),
}

/// A rename, removal or mount at, above or below monitored paths (`targets::Targets::reroot`).
#[derive(Debug)]
pub(crate) struct Reroot {
    /// The subtrees to rescan.
    pub scope: BTreeSet<PathBuf>,
    /// Who.
    pub actor: Arc<Actor>,
    /// What.
    pub op: Option<FileOp>,
    /// A mount's target.
    pub mount: Option<PathBuf>,
}

/// The state, the queue, the kernel filter and the output, kept consistent.
pub(crate) struct Reporter {
    pub state: State,
    pub filter: KernelFilter,
    pub queue: Queue,
    printer: Printer,
    metrics: Arc<Metrics>,
    host: HostRoot,
    pub ancestors: Ancestors,
    /// What the cluster is told of the lines (`--kubernetes`).
    cluster: Option<Cluster>,
}

/// The mapping's view of the state and the queue.
struct Lookup<'a> {
    state: &'a State,
    queue: &'a Queue,
    ancestors: &'a Ancestors,
}

impl View for Lookup<'_> {
    fn policy(&self) -> &Policy {
        self.state.policy()
    }

    fn dir_of_inode(&self, key: InodeKey) -> Option<PathBuf> {
        self.state.dir_of_inode(key)
    }

    fn paths_of_inode(&self, key: InodeKey) -> Vec<PathBuf> {
        self.state.paths_of_inode(key)
    }

    fn paths_named(&self, name: &[u8]) -> Vec<PathBuf> {
        self.state.paths_named(name)
    }

    fn is_dir(&self, path: &Path) -> bool {
        self.state.is_dir(path)
    }

    fn unnamed_dir(&self, key: InodeKey) -> Option<PathBuf> {
        self.queue.unnamed_dir(&key).map(Path::to_owned)
    }

    fn ancestor_of_inode(&self, key: InodeKey) -> Option<PathBuf> {
        self.ancestors.path_of(key)
    }
}

/// Whether an error opening or statting a path says nothing is there (as opposed to "cannot
/// tell": no descriptor left, EIO, EACCES).
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP))
}

/// A directory's entries (their paths) with the kernel key of each (`d_ino` and the
/// directory's device: no stat per entry; an entry that is a mount point has another device,
/// which costs a mismatch, never a wrong match). The directory is opened beneath its rule
/// root: one that is now a symlink or no directory at all has no entries (its own record says
/// what it is, and what was known below it is gone from that path). Any other error (no
/// descriptor left, EIO) is an error, not an empty directory: its known entries must not be
/// concluded removed.
fn listed(policy: &Policy, host: &HostRoot, dir: &Path) -> std::io::Result<Vec<(PathBuf, InodeKey)>> {
    let (stat, entries) = match beneath::list(policy, host, dir) {
        Ok(listed) => listed,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let dev = InodeKey::from_stat(stat.st_dev, 0).dev;
    Ok(entries
        .into_iter()
        .map(|e| (dir.join(OsStr::from_bytes(e.name.to_bytes())), InodeKey { dev, ino: e.ino }))
        .collect())
}

impl Reporter {
    /// A reporter over `state`, printing with `printer`; `ancestors` are in `filter` already.
    pub fn new(
        state: State,
        filter: KernelFilter,
        ancestors: Ancestors,
        printer: Printer,
        metrics: Arc<Metrics>,
        host: HostRoot,
    ) -> Self {
        Reporter { state, filter, queue: Queue::default(), printer, metrics, host, ancestors, cluster: None }
    }

    /// Prints one line.
    pub fn print(&mut self, line: Line) -> Result<()> {
        self.print_event(&Event::now(line))
    }

    /// Prints one line made elsewhere (a container's check).
    pub fn print_event(&mut self, event: &Event) -> Result<()> {
        crate::cluster::observe(&self.metrics, self.cluster.as_ref(), event);
        self.printer.print(event).map_err(|e| Error::io("writing to stdout", e))
    }

    /// Tells the cluster what is printed from now on (`--kubernetes`).
    pub fn set_cluster(&mut self, cluster: Option<Cluster>) {
        self.cluster = cluster;
    }

    /// The printer, for lines printed elsewhere (the baseline's lifecycle).
    pub fn printer(&mut self) -> &mut Printer {
        &mut self.printer
    }

    /// Flushes what was printed.
    pub fn flush(&mut self) -> Result<()> {
        self.printer.flush().map_err(|e| Error::io("writing to stdout", e))
    }

    /// Notes one kernel event in the queue; says what else it calls for.
    pub fn observe(&mut self, obs: &Observation) -> Follow {
        let ev = &obs.event;
        let lookup = Lookup { state: &self.state, queue: &self.queue, ancestors: &self.ancestors };
        let t = targets(ev, &obs.seen, &lookup);
        let note = Note {
            op: FileOp::of_kernel(ev.op),
            close: ev.op == Op::Close,
            syscall: !matches!(ev.op, Op::Dirty | Op::Mmap | Op::IoUring),
            inferred: t.inferred,
        };
        let io_worker = ev.header.flags & EVENT_IO_WORKER != 0;
        let (actor, time) = (&obs.actor, obs.time);
        for path in &t.paths {
            // The inode must still be the path's: once it is unlinked, its number may be
            // reused at once by a file anywhere on the file system. A stat says so once a
            // window; after that only an unlink or a rename of the path (an event on it) can
            // change it, so a storm of writes costs one stat, not one an event.
            // A stat that cannot tell (no descriptor left, EIO) concludes nothing either way:
            // the path is noted unconfirmed, and its rehash says what it can.
            let confirm = match t.inode {
                Some(key) if !self.queue.inode_confirmed(path, key) => {
                    match beneath::lstat(self.state.policy(), &self.host, path) {
                        Ok(m) if InodeKey::from_stat(m.st_dev, m.st_ino) == key => Some(key),
                        Ok(_) => continue,
                        Err(e) if gone(&e) => continue,
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if ev.op == Op::Dirty {
                self.queue.dirty(path, actor, io_worker, time);
            } else {
                self.queue.note(path, actor, note, time);
            }
            if let Some(key) = confirm {
                self.queue.confirm_inode(path, key);
            }
        }
        for dir in &t.dirs {
            self.queue.list_entries(dir);
        }
        if let Some((key, dir)) = &t.unnamed {
            if ev.op == Op::Create {
                // The kernel side watches the new inode from now on.
                self.filter.watched_by_kernel();
            }
            if ev.op == Op::Dirty {
                self.queue.dirty_unnamed(*key, actor, io_worker, time);
            } else {
                self.queue.note_unnamed(*key, dir, actor, note, time);
            }
        }
        if let Some((from, to)) = &t.renamed {
            self.queue.renamed(to, from);
        }
        if let Some(reason) = t.full_rescan {
            debug_assert_eq!(reason, RescanReason::IoUring);
            return Follow::RescanSoon;
        }
        if !t.reroot.is_empty() {
            // A cut path beside it (the other path of a rename) is rescanned with it.
            let mut scope = t.reroot;
            scope.extend(t.rescan);
            return Follow::Reroot(Reroot { scope, actor: actor.clone(), op: note.op, mount: t.mount });
        }
        if !t.rescan.is_empty() {
            let writers = t.rescan.iter().map(|root| (root.clone(), actor.clone(), note.op)).collect();
            return Follow::Rescan(Request {
                reason: RescanReason::TruncatedPath,
                scope: Scope::Under(t.rescan),
                verify: None,
                writers,
            });
        }
        Follow::Nothing
    }

    /// After renames, removals or mounts at, above or below monitored paths (`due`): reads
    /// the ancestors' inodes again into the kernel filter, says what is mounted at each mount's
    /// target now, and rescans their subtrees, whose findings are attributed to their
    /// processes (inferred) and whose new inodes the rehashes put in the filter.
    pub fn reroot(&mut self, due: Vec<Reroot>, rescans: &mut Rescans) -> Result<()> {
        let refreshed = self.ancestors.refresh(&self.host);
        for key in refreshed.added {
            self.filter.watch_ancestor(key);
        }
        for key in refreshed.removed {
            self.filter.unwatch_ancestor(key);
        }
        self.metrics.set_watched_inodes(self.filter.inodes());
        let table = if due.iter().any(|r| r.mount.is_some()) {
            MountTable::read().map_err(|e| tracing::warn!("reading /proc/self/mountinfo: {e}")).ok()
        } else {
            None
        };
        for r in &due {
            let (Some(target), Some(op)) = (&r.mount, r.op) else { continue };
            let now = table.as_ref().and_then(|t| t.at(&self.host.disk(target)));
            let actor = &r.actor;
            self.print(Line::MountedOver(MountedOver {
                op,
                target: EscapedField::of_path(target),
                mounted: now.is_some(),
                fs_type: now.map(|m| escape_bytes(m.fs_type.as_bytes()).0),
                source: now.map(|m| escape_bytes(m.source.as_bytes()).0),
                rescanned: r.scope.iter().map(|p| display_path(p)).collect(),
                process: actor.process.clone(),
                container: actor.container.clone(),
                pod: actor.pod.clone(),
                origin: actor.origin(),
            }))?;
        }
        let scope: BTreeSet<PathBuf> = due.iter().flat_map(|r| r.scope.iter().cloned()).collect();
        let writers =
            due.iter().flat_map(|r| r.scope.iter().map(|root| (root.clone(), r.actor.clone(), r.op))).collect();
        rescans.request(Request { reason: RescanReason::Moved, scope: Scope::Under(scope), verify: None, writers });
        self.say_if_filter_full()
    }

    /// Rehashes what is due (with `all`, everything pending) and reports what changed.
    pub fn process_due(&mut self, all: bool, rescans: &mut Rescans) -> Result<()> {
        let now = SystemTime::now();
        let mut batch: HashMap<PathBuf, Pending> = self.queue.take_due(all).into_iter().collect();
        // New inodes: their changes go to the name they have now.
        for (key, dir, gathered) in self.queue.take_due_unnamed(all) {
            let Some(path) = self.name_of(&dir, key) else { continue };
            let mut target = match batch.remove(&path) {
                Some(p) => p,
                None => self.queue.take(&path).unwrap_or_else(|| Pending::unseen(now)),
            };
            target.absorb(gathered);
            batch.insert(path, target);
        }
        // Directories whose entries changed: entries with no event of their own are found
        // by listing (no process is known to have made them).
        let listed: Vec<PathBuf> = batch.iter().filter(|(_, p)| p.list_entries).map(|(d, _)| d.clone()).collect();
        for dir in listed {
            let changes = match self.dir_changes(&dir) {
                Ok(changes) => changes,
                // Gone: its own rehash reports it. Anything else: nothing is concluded about
                // its entries (the next event or rescan looks again).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => {
                    let error = format!("cannot list the directory: {e}; its entries are looked at again later");
                    self.print(Line::Error(PathError { path: EscapedPath::of_path(&dir), error }))?;
                    Vec::new()
                }
            };
            for entry in changes {
                if !batch.contains_key(&entry) && !self.queue.contains(&entry) {
                    batch.insert(entry, Pending::unseen(now));
                }
            }
        }
        let mut work: Vec<(PathBuf, Pending)> = batch.into_iter().collect();
        // Destinations of renames first: they may account for their source.
        work.sort_by(|(a, p), (b, q)| (p.renamed_from.is_none(), a).cmp(&(q.renamed_from.is_none(), b)));
        // Sources of renames reported with their destination (few: a rename is two paths).
        let mut moved: Vec<PathBuf> = Vec::new();
        for (path, pending) in work {
            if moved.contains(&path) {
                continue;
            }
            if let Some(from) = pending.renamed_from.clone()
                && !moved.contains(&from)
                && self.report_rename(&from, &path, &pending)?
            {
                // A rescan's finding counts as its change only when no event explained it.
                rescans.processed(&from, !pending.by_event);
                rescans.processed(&path, !pending.by_event);
                moved.push(from);
                continue;
            }
            let reported = self.rehash_and_report(&path, &pending)?;
            rescans.processed(&path, reported && !pending.by_event);
        }
        Ok(())
    }

    /// The name an inode has in `dir` now (listing it: `d_ino` needs no stat per entry).
    fn name_of(&self, dir: &Path, key: InodeKey) -> Option<PathBuf> {
        let (found, _) = listed(self.state.policy(), &self.host, dir).ok()?.into_iter().find(|(_, k)| *k == key)?;
        Some(found)
    }

    /// The entries of `dir` that differ from the state's: new on disk, or known and gone.
    /// New ones that are a pending new inode are left to it (it knows who made them).
    fn dir_changes(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let policy = self.state.policy();
        // Sorted, searched by halves: a directory may hold a hundred thousand entries.
        let known = self.state.children(dir);
        let mut on_disk = Vec::new();
        let mut out = Vec::new();
        for (path, key) in listed(policy, &self.host, dir)? {
            if known.binary_search(&path).is_err() && self.queue.unnamed_dir(&key).is_none() && covered(policy, &path) {
                out.push(path.clone());
            }
            on_disk.push(path);
        }
        on_disk.sort_unstable();
        out.extend(known.into_iter().filter(|p| on_disk.binary_search(p).is_err() && covered(policy, p)));
        Ok(out)
    }

    /// Rehashes `path` now; `None` when the policy does not cover it or it could not be read
    /// (an `error` line says why).
    ///
    /// A file whose content could not be read (no descriptor left, EIO, EACCES...) is recorded
    /// by the scan without a hash, which would compare as a change of content: when its known
    /// record has a hash, nothing is concluded instead (an `error` line; the state keeps the
    /// last known record, so the next event or rescan looks again).
    fn rehash_now(&mut self, path: &Path) -> Result<Option<Option<Known>>> {
        let started = std::time::Instant::now();
        let Some(rehashed) = rehash(path, self.state.policy(), &self.host) else { return Ok(None) };
        self.metrics.rehash_seconds(started.elapsed());
        match rehashed {
            Ok(r) => {
                if let Some((WarningKind::Unreadable, why)) = &r.warning
                    && self.state.get(path)?.is_some_and(|known| known.record.hash().is_some())
                {
                    let error = format!("{why}; nothing is concluded until it can be read");
                    self.print(Line::Error(PathError { path: EscapedPath::of_path(path), error }))?;
                    return Ok(None);
                }
                Ok(Some(Some(Known { record: r.record, content: r.content })))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(None)),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(Some(None)),
            Err(e) => {
                let path = EscapedPath::of_path(path);
                self.print(Line::Error(PathError { path, error: kubefim_baseline::error::chain(&e) }))?;
                Ok(None)
            }
        }
    }

    fn diff(&self, path: &Path, old: Option<&Known>, now: Option<&Known>) -> Result<Option<Difference>> {
        Ok(match (old, now) {
            (None, None) => None,
            (Some(o), None) => Some(Difference {
                path: path.to_owned(),
                kind: ChangeKind::Removed,
                changed: Vec::new(),
                old: Some(o.record.clone()),
                new: None,
                diff: None,
                changed_ranges: None,
                mount: None,
            }),
            (o, Some(n)) => {
                let old_content = |hash: &kubefim_baseline::hash::Hash| match o {
                    Some(k) if k.content.is_some() => Ok(k.content.clone()),
                    _ => self.state.content(path, hash),
                };
                compare_with(
                    self.state.policy(),
                    path.to_owned(),
                    o.map(|k| &k.record),
                    n.record.clone(),
                    n.content.as_deref(),
                    old_content,
                )?
            }
        })
    }

    /// The line for a difference found for `pending`.
    fn change_line(&self, difference: &Difference, renamed_to: Option<&Path>, pending: &Pending) -> Result<Line> {
        let policy = self.state.policy();
        // Asked before the state takes the change: the journal still holds what it had.
        let already_known = self.state.journal_had(renamed_to.unwrap_or(&difference.path), difference.new.as_ref())?;
        let now = if renamed_to.is_some() { None } else { difference.new.as_ref() };
        let writers = pending.writers();
        let latest = pending.latest_writer();
        let last = latest.as_ref().map(|w| &w.actor);
        let change = Change {
            path: EscapedPath::of_path(&difference.path),
            to: renamed_to.map(EscapedField::of_path),
            changed: difference.changed.clone(),
            ops: pending.ops(),
            old: difference.old.as_ref().map(|r| RecordView::new(r, policy)),
            new: difference.new.as_ref().map(|r| RecordView::new(r, policy)),
            diff: difference.diff.clone(),
            changed_ranges: difference.changed_ranges.clone(),
            baseline_match: self.baseline_match(&difference.path, now)?,
            process: last.map(|a| a.process.clone()),
            container: last.and_then(|a| a.container.clone()),
            pod: last.and_then(|a| a.pod.clone()),
            origin: last.map(|a| a.origin()),
            processes: writers.iter().map(|w| w.actor.writer(w.ops.clone())).collect(),
            attribution: pending.attribution(),
            detected_by: if pending.by_event { DetectedBy::Event } else { DetectedBy::Rescan },
            baseline: Reference::Signed,
            policy: None,
            already_known,
        };
        Ok(match (renamed_to, difference.kind) {
            (Some(_), _) => Line::Renamed(change),
            (None, ChangeKind::Added) => Line::Added(change),
            // `hidden` is verify's word (it reads the mount table); the watcher's comparison
            // of one path never makes it, and a hidden path is gone from where it was.
            (None, ChangeKind::Removed | ChangeKind::Hidden) => Line::Removed(change),
            (None, ChangeKind::Modified) => Line::Modified(change),
        })
    }

    /// Rehashes one path and reports it if it changed; true when a change was reported.
    fn rehash_and_report(&mut self, path: &Path, pending: &Pending) -> Result<bool> {
        let Some(now) = self.rehash_now(path)? else { return Ok(false) };
        let old = self.state.get(path)?;
        let difference = self.diff(path, old.as_ref(), now.as_ref())?;
        let new_dir = old.is_none() && now.as_ref().is_some_and(|k| k.record.kind == FileKind::Dir);
        let mut reported = false;
        if let Some(difference) = difference {
            let line = self.change_line(&difference, None, pending)?;
            self.print_event(&Event { time: time_string(pending.time), line })?;
            self.metrics.change(difference.kind.name());
            reported = true;
        }
        self.update(path, now)?;
        if new_dir {
            // A new directory may have been filled before the kernel's filter knew it (tar -x,
            // mkdir -p): its entries are compared with the state in a moment.
            let policy = self.state.policy();
            let entries: Vec<PathBuf> = match listed(policy, &self.host, path) {
                Ok(entries) => entries.into_iter().map(|(p, _)| p).collect(),
                Err(e) => {
                    let error = format!("cannot list the new directory: {e}; its entries are looked at again later");
                    self.print(Line::Error(PathError { path: EscapedPath::of_path(path), error }))?;
                    Vec::new()
                }
            };
            let policy = self.state.policy();
            let time = SystemTime::now();
            for entry in entries.into_iter().filter(|e| covered(policy, e) && !self.state.exists(e)) {
                self.queue.found(&entry, time);
            }
        }
        Ok(reported)
    }

    /// Reports `from` renamed to `to` when that is what happened: `from` is gone, `to` is new
    /// and is the inode `from` was. False when it is something else (then each is reported
    /// on its own).
    fn report_rename(&mut self, from: &Path, to: &Path, pending: &Pending) -> Result<bool> {
        let Some(source) = self.state.get(from)?.map(|k| k.record) else { return Ok(false) };
        if self.state.exists(to) || beneath::lstat(self.state.policy(), &self.host, from).is_ok() {
            return Ok(false);
        }
        let Some(Some(now)) = self.rehash_now(to)? else { return Ok(false) };
        if now.record.inode != source.inode || now.record.dev != source.dev {
            return Ok(false);
        }
        let mut pending = pending.clone();
        if let Some(p) = self.queue.take(from) {
            pending.absorb(p);
        }
        let rule = usize::try_from(now.record.rule).ok().and_then(|i| self.state.policy().rules.get(i));
        let attributes = rule.map_or_else(AttributeSet::all, |r| r.attributes);
        let difference = Difference {
            path: from.to_owned(),
            kind: ChangeKind::Modified,
            changed: source.changed_attributes(&now.record, attributes),
            old: Some(source),
            new: Some(now.record.clone()),
            diff: None,
            changed_ranges: None,
            mount: None,
        };
        let line = self.change_line(&difference, Some(to), &pending)?;
        self.print_event(&Event { time: time_string(pending.time), line })?;
        self.metrics.change("renamed");
        self.update(from, None)?;
        self.update(to, Some(now))?;
        Ok(true)
    }

    /// Whether `now` equals the signed baseline's record of `path` in every monitored
    /// attribute but the ones a restore cannot bring back (times, inode number).
    fn baseline_match(&self, path: &Path, now: Option<&FileRecord>) -> Result<bool> {
        Ok(match (self.state.signed(path)?, now) {
            (None, None) => true,
            (Some(signed), Some(now)) => {
                let rule = usize::try_from(now.rule).ok().and_then(|i| self.state.policy().rules.get(i));
                let attrs: AttributeSet = rule
                    .map(|r| r.attributes)
                    .unwrap_or_else(AttributeSet::all)
                    .iter()
                    .filter(|a| !matches!(a, Attribute::Mtime | Attribute::Ctime | Attribute::Inode))
                    .collect();
                signed.changed_attributes(now, attrs).is_empty()
            }
            _ => false,
        })
    }

    /// Takes `now` as the state of `path`: state, journal, kernel filter.
    fn update(&mut self, path: &Path, now: Option<Known>) -> Result<()> {
        let watch = now.as_ref().map(|k| (key_of(&k.record), k.record.kind == FileKind::Dir));
        let update = self.state.set(path, now)?;
        if let Some((key, is_dir)) = watch {
            let name = path.file_name().map_or(&[][..], |n| path_bytes(Path::new(n)));
            self.filter.watch(key, is_dir, name);
        }
        // A key no path has any more leaves the kernel's filter: its number may be reused.
        if let Some(old) = update.old_key
            && self.state.paths_of_inode(old).is_empty()
        {
            self.filter.unwatch(old);
        }
        self.metrics.set_watched_inodes(self.filter.inodes());
        self.say_if_filter_full()
    }

    /// The `degraded` line, once, when the kernel filter refused an entry.
    pub fn say_if_filter_full(&mut self) -> Result<()> {
        if !self.filter.newly_full() {
            return Ok(());
        }
        let capacity = self.filter.capacity();
        self.print(Line::Degraded(Degraded {
            reason: DegradedReason::FilterFull,
            message: "the in-kernel filter is full; changes to paths beyond it are found by rescans only".into(),
            missing: Vec::new(),
            capacity: Some(capacity),
            error: None,
        }))
    }

    /// Everything compared with the signed baseline, as the `verify` line says it.
    pub fn verify_line(&self, reason: VerifyReason, errors: u64, started: std::time::Instant) -> Verify {
        let (mut added, mut removed, mut modified) = (0u64, 0u64, 0u64);
        let mut deviations = Vec::new();
        for (id, how) in self.state.deviations() {
            let (count, kind) = match how {
                StateDeviation::Added => (&mut added, DeviationKind::Added),
                StateDeviation::Removed => (&mut removed, DeviationKind::Removed),
                StateDeviation::Modified => (&mut modified, DeviationKind::Modified),
            };
            *count += 1;
            if deviations.len() < VERIFY_LISTED {
                deviations.push(Deviation { path: EscapedPath::of_path(&self.state.path(id)), kind });
            }
        }
        let total = added + removed + modified;
        let result = match (errors, total) {
            (0, 0) => VerifyResult::Clean,
            (0, _) => VerifyResult::Changed,
            _ => VerifyResult::Error,
        };
        deviations.sort_by(|a, b| a.path.bytes.text.cmp(&b.path.bytes.text));
        Verify {
            reason,
            result,
            added,
            removed,
            modified,
            errors,
            deviations,
            deviations_truncated: total > VERIFY_LISTED as u64,
            baseline_entries: self.state.signed_len(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}
