//! The scan: walks the roots a policy names (walkdir, never following symlinks, not crossing
//! file systems) and turns every entry into a [`FileRecord`] on all cores (rayon), handing
//! each to a [`ScanSink`] as soon as it is ready so the caller can store or compare while
//! the walk goes on. Regular files are opened once (`O_NOFOLLOW | O_NONBLOCK | O_NOATIME`),
//! `fstat`ed, hashed and `fstat`ed again; FIFOs, sockets and devices are never opened.
//! Problems with one entry (unreadable, vanished, changed while read) are warnings, never
//! fatal.

use std::cell::RefCell;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use walkdir::WalkDir;

use crate::hash;
use crate::mapped::{self, Mapped};
use crate::policy::{Attribute, MAX_DIFF_CONTENT, Policy, Rule};
use crate::record::{FLAGS_RECORDED, FileKind, FileRecord};
use crate::root::HostRoot;

/// How many times a file that changes while it is read is read again before it is recorded
/// as unstable.
const READ_ATTEMPTS: usize = 3;

/// The read buffer of each thread: 16 subtrees, so large files are hashed on every core.
const READ_BUFFER: usize = 1 << 20;

/// Files at least this large are hashed through a read-only mapping (no copy into a buffer);
/// smaller ones are cheaper to read.
const MAP_THRESHOLD: u64 = 64 << 10;

/// Listed entries waiting to be recorded.
const WALK_QUEUE: usize = 8192;

/// One scanned entry.
#[derive(Debug)]
pub struct ScannedEntry {
    /// Its path.
    pub path: PathBuf,
    /// What was recorded.
    pub record: FileRecord,
    /// The content, for files whose rule keeps content for diffs and that are text.
    pub content: Option<Vec<u8>>,
}

/// Receives what the scan finds, from many threads at once.
pub trait ScanSink: Sync {
    /// A recorded entry.
    fn entry(&self, entry: ScannedEntry);
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

    /// Runs the scan, handing every entry to `sink`.
    pub fn run(&self, sink: &dyn ScanSink, progress: &ScanProgress) -> ScanSummary {
        let warnings = Mutex::new(Vec::new());
        let warn = |path: &Path, kind, message: String| {
            warnings.lock().expect("no panics while holding").push(ScanWarning {
                path: path.to_owned(),
                kind,
                message,
            });
        };
        for (i, root) in self.roots.iter().enumerate() {
            if self.is_covered_by_other_root(i) {
                continue;
            }
            self.walk(&self.host.disk(root), sink, progress, &warn);
        }
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
            j != i
                && root.starts_with(other)
                && (root != other || j < i)
                && same_device(&self.host.disk(root), &self.host.disk(other))
        })
    }

    /// Walks `root`, an on-disk path.
    fn walk(
        &self,
        root: &Path,
        sink: &dyn ScanSink,
        progress: &ScanProgress,
        warn: &(dyn Fn(&Path, WarningKind, String) + Sync),
    ) {
        let policy = self.policy;
        let skipped = |p: &Path| self.skip.iter().any(|s| p.starts_with(s));
        let excluded = |disk: &Path| match self.host.logical(disk) {
            Some(p) => policy.rule_index_for(&p).is_none_or(|i| policy.rules[i].excludes(&p)),
            None => true,
        };
        // The walk runs on its own thread and only lists; hashing runs on rayon's threads.
        // (Pulling the walker straight through `par_bridge` would make every worker wait on
        // the walker's lock while it is in getdents.)
        let (tx, rx) = std::sync::mpsc::sync_channel(WALK_QUEUE);
        std::thread::scope(|s| {
            s.spawn(move || {
                let walker = WalkDir::new(root)
                    .follow_links(false)
                    .follow_root_links(false)
                    .same_file_system(true)
                    .into_iter()
                    .filter_entry(|e| !excluded(e.path()) && !skipped(e.path()));
                for item in walker {
                    if tx.send(item).is_err() {
                        break;
                    }
                }
            });
            self.record_all(rx, root, sink, progress, warn);
        });
    }

    fn record_all(
        &self,
        rx: std::sync::mpsc::Receiver<walkdir::Result<walkdir::DirEntry>>,
        root: &Path,
        sink: &dyn ScanSink,
        progress: &ScanProgress,
        warn: &(dyn Fn(&Path, WarningKind, String) + Sync),
    ) {
        let policy = self.policy;
        // Warnings and entries name policy paths; the file system is read at on-disk ones.
        let logical = |disk: &Path| self.host.logical(disk).map_or_else(|| disk.to_owned(), |p| p.into_owned());
        rx.into_iter().par_bridge().for_each(|item| match item {
            Ok(entry) => {
                let disk = entry.path();
                let path = logical(disk);
                let Some(rule_index) = policy.rule_index_for(&path) else { return };
                let rule = &policy.rules[rule_index];
                match record_entry(disk, entry.file_type().is_file(), rule, rule_index) {
                    Ok(Recorded { record, content, warning }) => {
                        if let Some((kind, message)) = warning {
                            warn(&path, kind, message);
                        }
                        progress.entries.fetch_add(1, Ordering::Relaxed);
                        progress.bytes.fetch_add(record.digest.as_ref().map_or(0, |_| record.size), Ordering::Relaxed);
                        sink.entry(ScannedEntry { path, record, content });
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        warn(&path, WarningKind::Vanished, "vanished during the scan".into());
                    }
                    Err(e) => warn(&path, WarningKind::Unreadable, format!("cannot read metadata: {e}")),
                }
            }
            Err(e) => {
                let disk = e.path().map(Path::to_owned).unwrap_or_else(|| root.to_owned());
                let path = logical(&disk);
                match e.io_error().map(io::Error::kind) {
                    // A root that does not exist is simply absent (verify reports it if it appears).
                    Some(io::ErrorKind::NotFound) if disk == root => {}
                    Some(io::ErrorKind::NotFound) => {
                        warn(&path, WarningKind::Vanished, "vanished during the scan".into())
                    }
                    _ => warn(&path, WarningKind::Unreadable, format!("cannot list directory: {}", io_message(&e))),
                }
            }
        });
    }
}

fn io_message(e: &walkdir::Error) -> String {
    e.io_error().map_or_else(|| e.to_string(), ToString::to_string)
}

fn same_device(a: &Path, b: &Path) -> bool {
    match (std::fs::symlink_metadata(a), std::fs::symlink_metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => true,
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

/// Records one entry under `rule`. `looks_like_file` comes from the directory listing; it is
/// checked again on the opened descriptor, so a file swapped for a FIFO is never read.
pub fn record_entry(path: &Path, looks_like_file: bool, rule: &Rule, rule_index: usize) -> io::Result<Recorded> {
    record_entry_with(path, looks_like_file, rule, rule_index, true)
}

/// [`record_entry`]; `may_map` lets large files be hashed through a mapping (the scan) or
/// not (the watcher, whose files are the ones being changed: a truncation under a mapping
/// is a SIGBUS, a read is just a short read).
fn record_entry_with(
    path: &Path,
    looks_like_file: bool,
    rule: &Rule,
    rule_index: usize,
    may_map: bool,
) -> io::Result<Recorded> {
    let r = if looks_like_file && rule.attributes.contains(Attribute::Content) {
        match open_for_hash(path) {
            Ok(file) => record_open_file(&file, rule, rule_index, may_map)?,
            // Became a symlink since the listing: record what it is now.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => record_by_path(path, rule, rule_index)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
            Err(e) => {
                let mut r = record_by_path(path, rule, rule_index)?;
                let message = format!("cannot read content: {e}");
                r.record.error = Some(message.clone());
                r.warning = Some((WarningKind::Unreadable, message));
                r
            }
        }
    } else {
        record_by_path(path, rule, rule_index)?
    };
    Ok(r)
}

fn open_for_hash(path: &Path) -> io::Result<File> {
    let flags = libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    match OpenOptions::new().read(true).custom_flags(flags | libc::O_NOATIME).open(path) {
        // O_NOATIME needs ownership or CAP_FOWNER; without it, open normally.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => OpenOptions::new().read(true).custom_flags(flags).open(path),
        other => other,
    }
}

fn record_by_path(path: &Path, rule: &Rule, rule_index: usize) -> io::Result<Recorded> {
    let meta = std::fs::symlink_metadata(path)?;
    let mut record = base_record(&meta, rule_index);
    if record.kind == FileKind::Symlink && rule.attributes.contains(Attribute::LinkTarget) {
        record.link_target =
            Some(std::os::unix::ffi::OsStrExt::as_bytes(std::fs::read_link(path)?.as_os_str()).to_vec());
    }
    if rule.attributes.contains(Attribute::Xattrs) {
        record.xattrs = read_xattrs(xattr::list(path), |name| xattr::get(path, name));
    }
    if record.kind == FileKind::Dir {
        // The walk reports a directory it cannot list as a warning of its own; the record
        // says it too, so a baseline never looks complete where it is not.
        let listable = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        match listable {
            Ok(dir) if rule.attributes.contains(Attribute::Flags) => record.flags = inode_flags(&dir, &meta),
            Ok(_) => {}
            Err(e) => record.error = Some(format!("cannot list directory: {e}")),
        }
    } else if record.kind == FileKind::File && rule.attributes.contains(Attribute::Flags) {
        // Content not monitored: opened for the flags alone, as for hashing (never following
        // a link, never blocking on a FIFO swapped in).
        record.flags = open_for_hash(path).ok().and_then(|file| inode_flags(&file, &meta));
    }
    Ok(Recorded { record, content: None, warning: None })
}

fn record_open_file(file: &File, rule: &Rule, rule_index: usize, may_map: bool) -> io::Result<Recorded> {
    let mut meta = file.metadata()?;
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
        let keep = rule.keeps_content(meta.size()).then_some(MAX_DIFF_CONTENT);
        let mapped = if may_map && keep.is_none() && meta.size() >= MAP_THRESHOLD {
            mapped::digest_mapped(file, meta.size())
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
        let after = file.metadata()?;
        if let Some(read) = read
            && stable(&meta, &after)
            && read.len == after.size()
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

fn stable(before: &Metadata, after: &Metadata) -> bool {
    before.size() == after.size()
        && before.mtime() == after.mtime()
        && before.mtime_nsec() == after.mtime_nsec()
        && before.ctime() == after.ctime()
        && before.ctime_nsec() == after.ctime_nsec()
}

/// Text worth diffing: UTF-8 without NUL bytes.
pub fn is_text(content: &[u8]) -> bool {
    !content.contains(&0) && std::str::from_utf8(content).is_ok()
}

fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

fn base_record(meta: &Metadata, rule_index: usize) -> FileRecord {
    FileRecord {
        kind: FileKind::from_mode(meta.mode()),
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: nanos(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
        dev: meta.dev(),
        inode: meta.ino(),
        nlink: meta.nlink(),
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

/// [`flags_of`] a file opened by path after `meta` was read from the path: `None` when what
/// was opened is not the inode `meta` describes (swapped since).
fn inode_flags(file: &File, meta: &Metadata) -> Option<u32> {
    let now = file.metadata().ok()?;
    ((now.dev(), now.ino()) == (meta.dev(), meta.ino())).then(|| flags_of(file)).flatten()
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
/// rehash): content is read from one descriptor, never mapped. `None` when no rule covers
/// it or its rule excludes it.
pub fn rehash(path: &Path, policy: &Policy, host: &HostRoot) -> Option<io::Result<Recorded>> {
    let rule_index = policy.rule_index_for(path)?;
    let rule = &policy.rules[rule_index];
    if rule.excludes(path) {
        return None;
    }
    let disk = host.disk(path);
    let looks_like_file = std::fs::symlink_metadata(&disk).map(|m| m.is_file()).unwrap_or(false);
    Some(record_entry_with(&disk, looks_like_file, rule, rule_index, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_over(path: &Path) -> Policy {
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n",
            path.display()
        );
        Policy::from_yaml(&yaml, "test").unwrap()
    }

    #[test]
    fn a_file_whose_size_never_matches_what_is_read_is_unstable_not_hashed() {
        // procfs reports size 0 for files that read as text: to the scanner that is a file
        // that changed while it was read, every time.
        let path = Path::new("/proc/self/status");
        let policy = rule_over(Path::new("/proc"));
        let r = record_entry(path, true, &policy.rules[0], 0).unwrap();
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
            let err = record_entry(&gone, looks_like_file, &policy.rules[0], 0).unwrap_err();
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
        let r = record_entry(&fifo, true, &policy.rules[0], 0).unwrap();
        assert_eq!(r.record.kind, FileKind::Fifo);
        assert!(r.record.digest.is_none());
    }
}
