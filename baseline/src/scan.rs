//! The scan: walks the roots a policy names (`walk`: through directory descriptors, never
//! following a symlink, not crossing file systems) and turns every entry into a
//! [`FileRecord`] on all cores (rayon), a batch at a time, handing the records to a
//! [`ScanSink`] in the walk's order, which is `Path`'s order, so the caller can store or merge
//! them while the walk goes on and hold a window of them, never the tree. The roots' walks
//! are merged into that one order (a nested root on another file system is walked beside
//! its parent's). Text content kept for diffs goes to the sink from the thread that read it
//! and travels no further. Every entry is read by name
//! from its directory's descriptor ([`crate::beneath`]): regular files are opened once
//! (`O_NOFOLLOW | O_NONBLOCK | O_NOATIME`), `fstat`ed, hashed and `fstat`ed again; FIFOs,
//! sockets and devices are never opened. Problems with one entry (unreadable, vanished,
//! changed while read) are warnings, never fatal.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Seek};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustix::fs::Stat;

use crate::beneath;
use crate::hash::{self, Hash};
use crate::mapped::{self, Mapped};
use crate::policy::{Attribute, MAX_DIFF_CONTENT, Policy, Rule};
use crate::record::{FLAGS_RECORDED, FileKind, FileRecord};
use crate::root::HostRoot;
use crate::walk::{self, Entry, Walked};

/// How many times a file that changes while it is read is read again before it is recorded
/// as unstable.
const READ_ATTEMPTS: usize = 3;

/// The read buffer of each thread: 16 subtrees, so large files are hashed on every core.
const READ_BUFFER: usize = 1 << 20;

/// Files at least this large are hashed through a read-only mapping (no copy into a buffer);
/// smaller ones are cheaper to read.
const MAP_THRESHOLD: u64 = 64 << 10;

/// Batches of listed entries a walk may be ahead of the recording (each entry holds its
/// directory open).
const WALK_QUEUE: usize = 8;

/// Entries recorded at once, on every core, before they are handed on in order: the
/// window between the walk and the sink.
const RECORD_BATCH: usize = 512;

/// Directories whose entries one recorded batch may hold (each held open).
const RECORD_BATCH_DIRS: usize = 4 * walk::BATCH_DIRS;

/// One scanned entry.
#[derive(Debug)]
pub struct ScannedEntry {
    /// Its path.
    pub path: PathBuf,
    /// What was recorded.
    pub record: FileRecord,
}

/// Receives what the scan finds.
pub trait ScanSink: Sync {
    /// A recorded entry. Entries come one call at a time, in `Path`'s order (component by
    /// component: `/a`, `/a/b`, `/a.txt`), each path once.
    fn entry(&self, entry: ScannedEntry);

    /// The text of a file whose rule keeps content for diffs, with its hash, before the
    /// entry itself comes; called on the thread that read it, from many at once. A sink that
    /// stores content stores it here, so that no text waits in the scan's queues: the
    /// content goes nowhere else. By default it is dropped.
    fn content(&self, hash: &Hash, text: &[u8]) {
        let _ = (hash, text);
    }
}

/// What a warning is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarningKind {
    /// The entry disappeared between listing and reading (not an error of the scan).
    Vanished,
    /// The entry or its content could not be read; what was readable is recorded.
    Unreadable,
    /// The file kept changing while it was read; its hash is not recorded.
    Unstable,
}

/// A non-fatal problem with one path.
#[derive(Debug, Clone)]
pub struct ScanWarning {
    /// The path.
    pub path: PathBuf,
    /// The kind of problem.
    pub kind: WarningKind,
    /// What happened.
    pub message: String,
}

/// Live counters, for progress displays.
#[derive(Debug, Default)]
pub struct ScanProgress {
    /// Entries recorded so far.
    pub entries: AtomicU64,
    /// Content bytes hashed so far.
    pub bytes: AtomicU64,
}

/// The outcome of a scan, besides the entries handed to the sink.
#[derive(Debug, Default)]
pub struct ScanSummary {
    /// Entries recorded.
    pub entries: u64,
    /// Content bytes hashed.
    pub bytes: u64,
    /// Non-fatal problems, sorted by path.
    pub warnings: Vec<ScanWarning>,
}

impl ScanSummary {
    /// Warnings that leave the scan's picture of the tree incomplete (all but vanished).
    pub fn incomplete(&self) -> impl Iterator<Item = &ScanWarning> {
        self.warnings.iter().filter(|w| w.kind != WarningKind::Vanished)
    }
}

/// A scan of some paths under a policy.
pub struct Scan<'a> {
    policy: &'a Policy,
    roots: Vec<PathBuf>,
    skip: Vec<PathBuf>,
    host: HostRoot,
}

impl<'a> Scan<'a> {
    /// A scan of every rule of the policy. Nested rule roots are walked as part of their
    /// enclosing root; they are walked on their own only if they are another file system.
    pub fn whole_policy(policy: &'a Policy) -> Self {
        let roots = policy.rules.iter().map(|r| r.path.clone()).collect();
        Scan { policy, roots, skip: Vec::new(), host: HostRoot::identity() }
    }

    /// A scan of the given paths only (each governed by the policy's rule for it).
    pub fn paths(policy: &'a Policy, roots: Vec<PathBuf>) -> Self {
        Scan { policy, roots, skip: Vec::new(), host: HostRoot::identity() }
    }

    /// Reads the policy's paths under `host` (entries keep their policy paths).
    pub fn under(mut self, host: &HostRoot) -> Self {
        self.host = host.clone();
        self
    }

    /// Paths never recorded, whatever the policy says (the baseline database itself),
    /// relative ones taken from the current directory as the walk's paths are absolute.
    pub fn skip(mut self, path: &Path) -> Self {
        // Every path starts with the empty path: never let one skip everything.
        if !path.as_os_str().is_empty() {
            self.skip.push(std::path::absolute(path).unwrap_or_else(|_| path.to_owned()));
        }
        self
    }

    /// Runs the scan, handing every entry to `sink` in path order.
    pub fn run(&self, sink: &dyn ScanSink, progress: &ScanProgress) -> ScanSummary {
        let warnings = Mutex::new(Vec::new());
        let warn = |path: &Path, kind, message: String| {
            warnings.lock().expect("no panics while holding").push(ScanWarning {
                path: path.to_owned(),
                kind,
                message,
            });
        };
        let mut roots: Vec<&Path> = (0..self.roots.len())
            .filter(|&i| !self.is_covered_by_other_root(i))
            .map(|i| self.roots[i].as_path())
            .collect();
        roots.sort();
        roots.dedup();
        // The paths to skip are on disk; the walk's are policy paths.
        let skip: Vec<PathBuf> =
            self.skip.iter().filter_map(|s| self.host.logical(s).map(|p| p.into_owned())).collect();
        let policy = self.policy;
        let keep = |p: &Path| {
            policy.rule_index_for(p).is_some_and(|i| !policy.rules[i].excludes(p))
                && !skip.iter().any(|s| p.starts_with(s))
        };
        std::thread::scope(|s| {
            let start = starter(|root| self.start_walk(s, root, &keep, &warn));
            let walks = Walks { pending: roots.into_iter().collect(), active: Vec::new(), start, warn: &warn };
            self.record_in_order(walks, sink, progress, &warn);
        });
        let mut warnings = warnings.into_inner().expect("no panics while holding");
        warnings.sort_by(|a, b| a.path.cmp(&b.path));
        ScanSummary {
            entries: progress.entries.load(Ordering::Relaxed),
            bytes: progress.bytes.load(Ordering::Relaxed),
            warnings,
        }
    }

    /// A root inside another root on the same file system is walked as part of it.
    fn is_covered_by_other_root(&self, i: usize) -> bool {
        let root = &self.roots[i];
        self.roots.iter().enumerate().any(|(j, other)| {
            j != i && root.starts_with(other) && (root != other || j < i) && self.same_device(root, other)
        })
    }

    fn same_device(&self, a: &Path, b: &Path) -> bool {
        let dev = |p: &Path| beneath::lstat(self.policy, &self.host, p).map(|st| st.st_dev);
        match (dev(a), dev(b)) {
            (Ok(a), Ok(b)) => a == b,
            _ => true,
        }
    }

    /// Starts walking `root` (a policy path) on a thread of its own, which only lists:
    /// hashing runs on rayon's threads. `None` when there is nothing to walk there.
    fn start_walk<'s>(
        &'s self,
        s: &'s std::thread::Scope<'s, '_>,
        root: &'s Path,
        keep: &'s (dyn Fn(&Path) -> bool + Sync),
        warn: &(dyn Fn(&Path, WarningKind, String) + Sync),
    ) -> Option<Receiver<Vec<Walked>>> {
        if !keep(root) {
            return None;
        }
        let at = match beneath::locate(self.policy, &self.host, root) {
            Ok(at) => at,
            // A root that does not exist is simply absent (verify reports it if it appears).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                warn(root, WarningKind::Unreadable, format!("cannot list directory: {e}"));
                return None;
            }
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(WALK_QUEUE);
        s.spawn(move || walk::walk(at, root, keep, &tx));
        Some(rx)
    }

    /// Records what the walks list on every core, a batch at a time, and hands the records
    /// to `sink` in the order the walks listed them: path order. The walks wait while the
    /// batches they sent are not taken, so what is held is a window, not the tree.
    fn record_in_order<'w>(
        &self,
        mut walks: Walks<'w, impl FnMut(&'w Path) -> Option<Receiver<Vec<Walked>>>>,
        sink: &dyn ScanSink,
        progress: &ScanProgress,
        warn: &(dyn Fn(&Path, WarningKind, String) + Sync),
    ) {
        let policy = self.policy;
        let mut batch = Vec::with_capacity(RECORD_BATCH);
        loop {
            let mut dirs = 0;
            while batch.len() < RECORD_BATCH && dirs < RECORD_BATCH_DIRS {
                let Some(entry) = walks.next() else { break };
                if !batch.last().is_some_and(|last: &Entry| Arc::ptr_eq(&last.dir, &entry.dir)) {
                    dirs += 1;
                }
                batch.push(entry);
            }
            if batch.is_empty() {
                return;
            }
            // An indexed parallel iterator collects in order: rayon keeps the sequence.
            let recorded: Vec<Option<ScannedEntry>> = batch
                .par_drain(..)
                .map(|entry| {
                    let path = entry.path;
                    let rule_index = policy.rule_index_for(&path)?;
                    let rule = &policy.rules[rule_index];
                    match record_entry(entry.dir.as_fd(), &entry.name, entry.is_file, rule, rule_index, true) {
                        Ok(Recorded { record, content, warning }) => {
                            if let Some((kind, message)) = warning {
                                warn(&path, kind, message);
                            }
                            if let (Some(text), Some(hash)) = (&content, record.hash()) {
                                sink.content(hash, text);
                            }
                            progress.entries.fetch_add(1, Ordering::Relaxed);
                            progress
                                .bytes
                                .fetch_add(record.digest.as_ref().map_or(0, |_| record.size), Ordering::Relaxed);
                            Some(ScannedEntry { path, record })
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {
                            warn(&path, WarningKind::Vanished, "vanished during the scan".into());
                            None
                        }
                        Err(e) => {
                            warn(&path, WarningKind::Unreadable, format!("cannot read metadata: {e}"));
                            None
                        }
                    }
                })
                .collect();
            for entry in recorded.into_iter().flatten() {
                sink.entry(entry);
            }
        }
    }
}

/// `start`, as a closure over the roots' own lifetime (which closure signatures cannot name).
fn starter<'w, F: FnMut(&'w Path) -> Option<Receiver<Vec<Walked>>>>(start: F) -> F {
    start
}

/// The walks of a scan's roots, merged into one sequence in path order. A root's walk starts
/// when the sequence reaches the root, so roots side by side are walked one after the other;
/// a root nested in another (another file system, which the outer walk does not enter) is
/// walked beside it, and the mount point both list is taken once.
struct Walks<'w, F> {
    /// Roots not started yet, sorted.
    pending: VecDeque<&'w Path>,
    /// The walks running, each with the entry it offers next.
    active: Vec<Cursor>,
    /// Starts a root's walk.
    start: F,
    warn: &'w (dyn Fn(&Path, WarningKind, String) + Sync),
}

/// One running walk.
struct Cursor {
    rx: Receiver<Vec<Walked>>,
    batch: std::vec::IntoIter<Walked>,
    head: Option<Entry>,
}

impl Cursor {
    /// Moves to the walk's next entry (`head` is `None` at its end); problems on the way are
    /// warnings, which need no order.
    fn advance(&mut self, warn: &(dyn Fn(&Path, WarningKind, String) + Sync)) {
        self.head = loop {
            match self.batch.next() {
                Some(Walked::Entry(e)) => break Some(e),
                Some(Walked::Problem { path, kind, message }) => warn(&path, kind, message),
                None => match self.rx.recv() {
                    Ok(batch) => self.batch = batch.into_iter(),
                    Err(_) => break None,
                },
            }
        };
    }
}

impl<'w, F: FnMut(&'w Path) -> Option<Receiver<Vec<Walked>>>> Iterator for Walks<'w, F> {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        loop {
            let best = (0..self.active.len())
                .filter(|&i| self.active[i].head.is_some())
                .min_by(|&a, &b| self.head_path(a).cmp(self.head_path(b)));
            if let Some(&root) = self.pending.front()
                && best.is_none_or(|i| root <= self.head_path(i))
            {
                self.pending.pop_front();
                if let Some(rx) = (self.start)(root) {
                    let mut cursor = Cursor { rx, batch: Vec::new().into_iter(), head: None };
                    cursor.advance(self.warn);
                    self.active.push(cursor);
                }
                continue;
            }
            let entry = self.active[best?].head.take().expect("the best has a head");
            self.active[best?].advance(self.warn);
            for c in &mut self.active {
                // The same path from another walk: the mount point of a nested root, listed
                // by the outer walk and started by its own.
                while c.head.as_ref().is_some_and(|h| h.path == entry.path) {
                    c.advance(self.warn);
                }
            }
            self.active.retain(|c| c.head.is_some());
            return Some(entry);
        }
    }
}

impl<F> Walks<'_, F> {
    fn head_path(&self, i: usize) -> &Path {
        &self.active[i].head.as_ref().expect("a head").path
    }
}

/// What recording one entry produced.
#[derive(Debug)]
pub struct Recorded {
    /// The record.
    pub record: FileRecord,
    /// The content, when the rule keeps it and it is text.
    pub content: Option<Vec<u8>>,
    /// A problem met while recording, if any.
    pub warning: Option<(WarningKind, String)>,
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(READ_BUFFER));
}

/// Records the entry `name` in the directory `dir` under `rule`. `looks_like_file` comes from
/// the directory listing; it is checked again on the opened descriptor, so a file swapped
/// for a FIFO is never read. `may_map` lets large files be hashed through a mapping (the
/// scan) or not (the watcher, whose files are the ones being changed: a truncation under a
/// mapping is a SIGBUS, a read is just a short read).
pub(crate) fn record_entry(
    dir: BorrowedFd<'_>,
    name: &CStr,
    looks_like_file: bool,
    rule: &Rule,
    rule_index: usize,
    may_map: bool,
) -> io::Result<Recorded> {
    let r = if looks_like_file && rule.attributes.contains(Attribute::Content) {
        match beneath::open_file_at(dir, name) {
            Ok(file) => record_open_file(&file, rule, rule_index, may_map)?,
            // Became a symlink since the listing: record what it is now.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => record_by_name(dir, name, rule, rule_index)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(e) => {
                let mut r = record_by_name(dir, name, rule, rule_index)?;
                let message = format!("cannot read content: {e}");
                r.record.error = Some(message.clone());
                r.warning = Some((WarningKind::Unreadable, message));
                r
            }
        }
    } else {
        record_by_name(dir, name, rule, rule_index)?
    };
    Ok(r)
}

/// Records what is not read for content (directories, symlinks, special files, files whose
/// content is not monitored) from its directory, never following it.
fn record_by_name(dir: BorrowedFd<'_>, name: &CStr, rule: &Rule, rule_index: usize) -> io::Result<Recorded> {
    let meta = beneath::lstat_at(dir, name)?;
    let mut record = base_record(&meta, rule_index);
    if record.kind == FileKind::Symlink && rule.attributes.contains(Attribute::LinkTarget) {
        record.link_target = Some(beneath::read_link_at(dir, name)?);
    }
    let xattrs = rule.attributes.contains(Attribute::Xattrs);
    if record.kind == FileKind::Dir {
        // The walk reports a directory it cannot list as a warning of its own; the record
        // says it too, so a baseline never looks complete where it is not.
        match beneath::open_dir_at(dir, name) {
            Ok(fd) => {
                let d = File::from(fd);
                if xattrs {
                    use xattr::FileExt;
                    record.xattrs = read_xattrs(d.list_xattr(), |n| d.get_xattr(n));
                }
                if rule.attributes.contains(Attribute::Flags) {
                    record.flags = inode_flags(&d, &meta);
                }
            }
            Err(e) => record.error = Some(format!("cannot list directory: {e}")),
        }
    } else {
        if record.kind == FileKind::File && rule.attributes.contains(Attribute::Flags) {
            // Content not monitored: opened for the flags alone, as for hashing (never
            // following a link, never blocking on a FIFO swapped in).
            record.flags = beneath::open_file_at(dir, name).ok().and_then(|file| inode_flags(&file, &meta));
        }
        if xattrs {
            // Never opened (a symlink, a device, a FIFO...): read by a path that reaches the
            // directory through its descriptor and does not follow the entry.
            let path = beneath::path_at(dir, name);
            record.xattrs = read_xattrs(xattr::list(&path), |n| xattr::get(&path, n));
        }
    }
    Ok(Recorded { record, content: None, warning: None })
}

fn record_open_file(file: &File, rule: &Rule, rule_index: usize, may_map: bool) -> io::Result<Recorded> {
    let mut meta = rustix::fs::fstat(file)?;
    let mut record = base_record(&meta, rule_index);
    if rule.attributes.contains(Attribute::Xattrs) {
        use xattr::FileExt;
        record.xattrs = read_xattrs(file.list_xattr(), |name| file.get_xattr(name));
    }
    if rule.attributes.contains(Attribute::Flags) {
        record.flags = flags_of(file);
    }
    if record.kind != FileKind::File {
        // Swapped for something else since the listing; never read it.
        return Ok(Recorded { record, content: None, warning: None });
    }
    for attempt in 1..=READ_ATTEMPTS {
        let keep = rule.keeps_content(size(&meta)).then_some(MAX_DIFF_CONTENT);
        let mapped = if may_map && keep.is_none() && size(&meta) >= MAP_THRESHOLD {
            mapped::digest_mapped(file, size(&meta))
        } else {
            Mapped::Unavailable
        };
        let read = match mapped {
            Mapped::Digest(d) => Some(d),
            // Shrank under the mapping: changed while read, like a size mismatch below.
            Mapped::Truncated => None,
            Mapped::Unavailable => match BUFFER
                .with(|buf| hash::digest_reader(&mut &*file, &mut buf.borrow_mut(), keep))
            {
                Ok(read) => Some(read),
                Err(e) => {
                    let message = format!("cannot read content: {e}");
                    record.error = Some(message.clone());
                    return Ok(Recorded { record, content: None, warning: Some((WarningKind::Unreadable, message)) });
                }
            },
        };
        let after = rustix::fs::fstat(file)?;
        if let Some(read) = read
            && stable(&meta, &after)
            && read.len == size(&after)
        {
            let content = read.content.filter(|c| is_text(c));
            record.content_stored = content.is_some();
            record.digest = Some(read.digest);
            return Ok(Recorded { record, content, warning: None });
        }
        meta = after;
        let (xattrs, flags) = (std::mem::take(&mut record.xattrs), record.flags);
        record = FileRecord { xattrs, flags, ..base_record(&meta, rule_index) };
        if attempt < READ_ATTEMPTS {
            (&mut &*file).rewind()?;
        }
    }
    let message = format!("changed while being read ({READ_ATTEMPTS} attempts); content not recorded");
    record.error = Some(message.clone());
    Ok(Recorded { record, content: None, warning: Some((WarningKind::Unstable, message)) })
}

fn stable(before: &Stat, after: &Stat) -> bool {
    before.st_size == after.st_size
        && before.st_mtime == after.st_mtime
        && before.st_mtime_nsec == after.st_mtime_nsec
        && before.st_ctime == after.st_ctime
        && before.st_ctime_nsec == after.st_ctime_nsec
}

fn size(meta: &Stat) -> u64 {
    u64::try_from(meta.st_size).unwrap_or(0)
}

/// Text worth diffing: UTF-8 without NUL bytes.
pub fn is_text(content: &[u8]) -> bool {
    !content.contains(&0) && std::str::from_utf8(content).is_ok()
}

/// Nanoseconds since the epoch from `stat`'s seconds and nanoseconds (whose integer types
/// differ between architectures).
fn nanos(secs: impl Into<i64>, nsec: impl TryInto<i64>) -> i64 {
    secs.into().saturating_mul(1_000_000_000).saturating_add(nsec.try_into().unwrap_or(0))
}

#[allow(clippy::useless_conversion, reason = "st_nlink is u64 on x86_64, u32 on other architectures")]
fn base_record(meta: &Stat, rule_index: usize) -> FileRecord {
    FileRecord {
        kind: FileKind::from_mode(meta.st_mode),
        size: size(meta),
        mode: meta.st_mode & 0o7777,
        uid: meta.st_uid,
        gid: meta.st_gid,
        mtime_ns: nanos(meta.st_mtime, meta.st_mtime_nsec),
        ctime_ns: nanos(meta.st_ctime, meta.st_ctime_nsec),
        dev: meta.st_dev,
        inode: meta.st_ino,
        nlink: u64::from(meta.st_nlink),
        link_target: None,
        xattrs: Vec::new(),
        digest: None,
        content_stored: false,
        rule: u32::try_from(rule_index).expect("fewer than 2^32 rules"),
        error: None,
        flags: None,
    }
}

/// The inode flags of an open file or directory (`FS_IOC_GETFLAGS`), the bits of
/// [`FLAGS_RECORDED`]; `None` on a file system without them (ENOTTY, EOPNOTSUPP).
fn flags_of(file: &File) -> Option<u32> {
    rustix::fs::ioctl_getflags(file).ok().map(|f| f.bits() & FLAGS_RECORDED)
}

/// [`flags_of`] a file opened by name after `meta` was read from the name: `None` when what
/// was opened is not the inode `meta` describes (swapped since).
fn inode_flags(file: &File, meta: &rustix::fs::Stat) -> Option<u32> {
    let now = rustix::fs::fstat(file).ok()?;
    ((now.st_dev, now.st_ino) == (meta.st_dev, meta.st_ino)).then(|| flags_of(file)).flatten()
}

/// Lists and reads extended attributes, sorted by name. A file system without xattr
/// support has none; an attribute that vanishes between list and get is skipped.
fn read_xattrs(
    list: io::Result<xattr::XAttrs>,
    get: impl Fn(&std::ffi::OsStr) -> io::Result<Option<Vec<u8>>>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(names) = list else { return Vec::new() };
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names
        .filter_map(|name| match get(&name) {
            Ok(Some(value)) => Some((name.as_bytes().to_vec(), value)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// Records one path as it is now under the policy's rule for it (the watcher's targeted
/// rehash): reached beneath its rule root without following any symlink (a path below a
/// symlink is `NotFound`), content read from one descriptor, never mapped. `None` when no
/// rule covers it or its rule excludes it.
pub fn rehash(path: &Path, policy: &Policy, host: &HostRoot) -> Option<io::Result<Recorded>> {
    let rule_index = policy.rule_index_for(path)?;
    let rule = &policy.rules[rule_index];
    if rule.excludes(path) {
        return None;
    }
    let record = || {
        let at = beneath::locate(policy, host, path)?;
        let looks_like_file = at.lstat().is_ok_and(|st| FileKind::from_mode(st.st_mode) == FileKind::File);
        record_entry(at.parent(), at.name(), looks_like_file, rule, rule_index, false)
    };
    Some(record())
}

#[cfg(test)]
mod tests {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn rule_over(path: &Path) -> Policy {
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n",
            path.display()
        );
        Policy::from_yaml(&yaml, "test").unwrap()
    }

    /// Records `path` as the scan does, from its directory's descriptor.
    fn record_path(path: &Path, looks_like_file: bool, rule: &Rule) -> io::Result<Recorded> {
        let dir = File::open(path.parent().unwrap()).unwrap();
        let name = CString::new(path.file_name().unwrap().as_bytes()).unwrap();
        record_entry(dir.as_fd(), &name, looks_like_file, rule, 0, true)
    }

    #[test]
    fn a_file_whose_size_never_matches_what_is_read_is_unstable_not_hashed() {
        // procfs reports size 0 for files that read as text: to the scanner that is a file
        // that changed while it was read, every time.
        let path = Path::new("/proc/self/status");
        let policy = rule_over(Path::new("/proc"));
        let r = record_path(path, true, &policy.rules[0]).unwrap();
        assert!(r.record.digest.is_none(), "an unstable read must not be recorded as a hash");
        assert_eq!(r.warning.as_ref().map(|w| w.0), Some(WarningKind::Unstable), "{:?}", r.warning);
        assert!(r.record.error.as_deref().unwrap().contains("changed while being read"));
    }

    #[test]
    fn a_vanished_entry_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let policy = rule_over(dir.path());
        let gone = dir.path().join("gone");
        for looks_like_file in [true, false] {
            let err = record_path(&gone, looks_like_file, &policy.rules[0]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::NotFound);
        }
    }

    #[test]
    fn fifo_is_recorded_without_being_opened_even_if_listed_as_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, rustix::fs::Mode::from(0o644), 0)
            .unwrap();
        let policy = rule_over(dir.path());
        // As if the listing had said "regular file" and it was swapped for a FIFO since.
        let r = record_path(&fifo, true, &policy.rules[0]).unwrap();
        assert_eq!(r.record.kind, FileKind::Fifo);
        assert!(r.record.digest.is_none());
    }

    #[test]
    fn a_rehash_below_a_symlinked_directory_is_absent_and_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, outside) = (dir.path().join("tree"), dir.path().join("outside"));
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("shadow"), "secret\n").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("d")).unwrap();
        let policy = rule_over(&tree);
        let host = HostRoot::identity();
        let e = rehash(&tree.join("d/shadow"), &policy, &host).unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let d = rehash(&tree.join("d"), &policy, &host).unwrap().unwrap();
        assert_eq!(d.record.kind, FileKind::Symlink);
        assert_eq!(d.record.link_target.as_deref(), Some(outside.as_os_str().as_bytes()));
    }

    #[test]
    fn a_file_deeper_than_path_max_is_rehashed() {
        use rustix::fs::{Mode, OFlags};
        let dir = tempfile::tempdir().unwrap();
        let name = "n".repeat(250);
        let mut fd = rustix::fs::open(dir.path(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut path = dir.path().to_owned();
        for _ in 0..20 {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, name.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
            path.push(&name);
        }
        let leaf = rustix::fs::openat(&fd, "leaf", OFlags::WRONLY | OFlags::CREATE, Mode::from(0o644)).unwrap();
        rustix::io::write(&leaf, b"deep\n").unwrap();
        let path = path.join("leaf");
        assert!(path.as_os_str().len() > 4096);
        let policy = rule_over(dir.path());
        let r = rehash(&path, &policy, &HostRoot::identity()).unwrap().unwrap();
        assert!(r.record.error.is_none(), "{:?}", r.record.error);
        assert_eq!(r.record.digest.map(|d| d.hex()), Some(blake3::hash(b"deep\n").to_hex().to_string()));
    }
}
