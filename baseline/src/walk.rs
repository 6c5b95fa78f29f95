//! The scan's walk: lists a tree through directory descriptors only, in path order. The
//! start is located beneath its rule root ([`crate::beneath`]); every directory below is
//! opened by name from its parent's descriptor with `O_NOFOLLOW`, so no symlink is ever
//! followed (a directory swapped for one between listing and opening is simply not entered)
//! and no path is ever too long (a tree deeper than PATH_MAX is walked like any other).
//!
//! Order: each directory's listing is sorted by name and the tree is walked depth first,
//! each directory before its contents, so entries go out in `Path`'s order (component by
//! component: `/a`, `/a/b`, `/a.txt`), which is the order baselines store records in and
//! verify merges them in. A directory's listing is held while its subtree is walked, so
//! memory is the listings along the current path, not the tree.
//!
//! Entries go out in batches, each entry holding its directory open until it is recorded;
//! recording is the scan's. The walk does not cross file systems and holds a bounded number
//! of descriptors however deep the tree: at most [`HELD`] along its way down, and those of
//! the batches in the bounded channel (at most [`BATCH_DIRS`] directories a batch).

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use rustix::fs::{FileType, Mode, OFlags};

use crate::beneath::{self, Listed, Located};
use crate::scan::WarningKind;

/// Directories on the way down held open; deeper ones are reopened from the nearest held one
/// when the walk comes back up to them.
const HELD: usize = 32;

/// Entries per batch: enough to spread over every core, few enough to keep the scan's
/// window small.
const BATCH: usize = 256;

/// Directories per batch: every entry holds its directory open until it is recorded, so a
/// tree of small directories must not hold a descriptor for each of its entries in flight.
pub(crate) const BATCH_DIRS: usize = 16;

/// One listed entry, to record.
pub(crate) struct Entry {
    /// The directory it is in, open until it is recorded.
    pub dir: Arc<OwnedFd>,
    /// Its policy path.
    pub path: PathBuf,
    /// Its name in `dir`.
    pub name: CString,
    /// Whether the listing says it is a regular file (checked again when it is opened).
    pub is_file: bool,
}

/// What the walk sends, in batches.
pub(crate) enum Walked {
    /// An entry to record; entries come in path order.
    Entry(Entry),
    /// A path the walk could not go into or through.
    Problem {
        /// The path.
        path: PathBuf,
        /// What kind of problem.
        kind: WarningKind,
        /// What happened.
        message: String,
    },
}

/// A directory on the way down.
struct Frame {
    /// Its descriptor, unless it was closed to bound how many are held.
    dir: Option<Arc<OwnedFd>>,
    name: CString,
    path: PathBuf,
    /// Device and inode, to check a reopened directory is the one that was listed.
    id: (u64, u64),
    /// Its entries not walked yet, sorted by name.
    rest: std::vec::IntoIter<Listed>,
}

/// The receiver is gone: stop walking.
struct Stop;

/// The batch being filled, and where it goes.
struct Out<'a> {
    tx: &'a SyncSender<Vec<Walked>>,
    batch: Vec<Walked>,
    /// The directory of the last entry batched, and how many directories the batch holds.
    last_dir: Option<Arc<OwnedFd>>,
    dirs: usize,
}

impl Out<'_> {
    fn send(&mut self, walked: Walked) -> Result<(), Stop> {
        if let Walked::Entry(e) = &walked
            && !self.last_dir.as_ref().is_some_and(|d| Arc::ptr_eq(d, &e.dir))
        {
            self.last_dir = Some(e.dir.clone());
            self.dirs += 1;
        }
        self.batch.push(walked);
        if self.batch.len() >= BATCH || self.dirs >= BATCH_DIRS { self.flush() } else { Ok(()) }
    }

    fn problem(&mut self, path: &Path, kind: WarningKind, message: String) -> Result<(), Stop> {
        self.send(Walked::Problem { path: path.to_owned(), kind, message })
    }

    fn flush(&mut self) -> Result<(), Stop> {
        (self.last_dir, self.dirs) = (None, 0);
        if self.batch.is_empty() {
            return Ok(());
        }
        self.tx.send(std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH))).map_err(|_| Stop)
    }
}

/// Walks the tree at `root` (a policy path, located at `at`), sending every entry `keep`
/// accepts (the root included) to `tx`, in path order. Stops early if the receiver is gone.
pub(crate) fn walk(at: Located, root: &Path, keep: &(dyn Fn(&Path) -> bool + Sync), tx: &SyncSender<Vec<Walked>>) {
    let mut out = Out { tx, batch: Vec::with_capacity(BATCH), last_dir: None, dirs: 0 };
    if walk_into(at, root, keep, &mut out).is_ok() {
        let _ = out.flush();
    }
}

fn walk_into(at: Located, root: &Path, keep: &(dyn Fn(&Path) -> bool + Sync), out: &mut Out<'_>) -> Result<(), Stop> {
    let stat = match at.lstat() {
        Ok(st) => st,
        // A root that does not exist is simply absent (verify reports it if it appears).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return out.problem(root, WarningKind::Unreadable, format!("cannot read metadata: {e}")),
    };
    if !keep(root) {
        return Ok(());
    }
    let kind = FileType::from_raw_mode(stat.st_mode);
    let (parent, name) = at.into_parts();
    let parent = Arc::new(parent);
    let is_file = kind == FileType::RegularFile;
    out.send(Walked::Entry(Entry { dir: parent.clone(), path: root.to_owned(), name: name.clone(), is_file }))?;
    if kind != FileType::Directory {
        return Ok(());
    }
    let dev = stat.st_dev;
    let mut stack = Vec::new();
    match list(&parent, &name, root, dev, out)? {
        Some(frame) => stack.push(frame),
        None => return Ok(()),
    }
    drop(parent);
    while let Some(top) = stack.last_mut() {
        let Some(listed) = top.rest.next() else {
            stack.pop();
            continue;
        };
        let path = top.path.join(OsStr::from_bytes(listed.name.to_bytes()));
        if !keep(&path) {
            continue;
        }
        let dir = match reopen(&mut stack) {
            Ok(dir) => dir,
            Err(message) => {
                let top = stack.pop().expect("a frame");
                out.problem(&top.path, WarningKind::Unreadable, message)?;
                continue;
            }
        };
        let kind = match listed.kind {
            // Some file systems do not say in the listing.
            FileType::Unknown => beneath::lstat_at(dir.as_fd(), &listed.name)
                .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode)),
            kind => kind,
        };
        let is_file = kind == FileType::RegularFile;
        out.send(Walked::Entry(Entry { dir: dir.clone(), path: path.clone(), name: listed.name.clone(), is_file }))?;
        if kind != FileType::Directory {
            continue;
        }
        // Depth first: the directory's contents come right after it, before its next sibling.
        if let Some(frame) = list(&dir, &listed.name, &path, dev, out)? {
            stack.push(frame);
            // Bound the descriptors held on the way down (the start's is always held).
            if stack.len() > HELD {
                let i = stack.len() - HELD;
                stack[i].dir = None;
            }
        }
    }
    Ok(())
}

/// Opens and lists the directory `name` in `parent`, its entries sorted by name; `None`
/// when it cannot be entered (a problem is sent if that is one) or is another file system.
fn list(parent: &OwnedFd, name: &CStr, path: &Path, dev: u64, out: &mut Out<'_>) -> Result<Option<Frame>, Stop> {
    let fd = match beneath::open_dir_at(parent.as_fd(), name) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.problem(path, WarningKind::Vanished, "vanished during the scan".into())?;
            return Ok(None);
        }
        // No longer a directory (a symlink now: never followed): its record says what it is.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => return Ok(None),
        Err(e) => {
            out.problem(path, WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    let stat = match rustix::fs::fstat(&fd) {
        Ok(st) => st,
        Err(e) => {
            out.problem(path, WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    if stat.st_dev != dev {
        // Another file system: recorded as an entry, not entered.
        return Ok(None);
    }
    let mut listed = match beneath::read_dir(fd.as_fd()) {
        Ok(listed) => listed,
        Err(e) => {
            out.problem(path, WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    // By name, as bytes: with the walk depth first, that is `Path`'s order.
    listed.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(Frame {
        dir: Some(Arc::new(fd)),
        name: name.to_owned(),
        path: path.to_owned(),
        id: (stat.st_dev, stat.st_ino),
        rest: listed.into_iter(),
    }))
}

/// The top frame's directory, reopened (by name, from the nearest held directory above it,
/// each checked to be the directory that was listed) if it was closed.
fn reopen(stack: &mut [Frame]) -> Result<Arc<OwnedFd>, String> {
    let top = stack.len() - 1;
    if let Some(dir) = &stack[top].dir {
        return Ok(dir.clone());
    }
    let held = stack[..top].iter().rposition(|f| f.dir.is_some()).expect("the start is always held");
    let mut cur = stack[held].dir.clone().expect("held");
    for frame in &stack[held + 1..=top] {
        let moved = || "moved during the scan; what is below it was not scanned".to_owned();
        let fd = rustix::fs::openat(
            cur.as_fd(),
            frame.name.as_c_str(),
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| moved())?;
        let st = rustix::fs::fstat(&fd).map_err(|_| moved())?;
        if (st.st_dev, st.st_ino) != frame.id {
            return Err(moved());
        }
        cur = Arc::new(fd);
    }
    stack[top].dir = Some(cur.clone());
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use crate::policy::Policy;
    use crate::scan::{Scan, ScanProgress, ScanSink, ScannedEntry};

    #[derive(Default)]
    struct Paths(Mutex<Vec<std::path::PathBuf>>);

    impl ScanSink for Paths {
        fn entry(&self, entry: ScannedEntry) {
            self.0.lock().unwrap().push(entry.path);
        }
    }

    #[test]
    fn a_tree_deeper_than_the_descriptors_held_is_walked_whole() {
        // A chain deeper than HELD with a side directory and a file at every level: coming
        // back up, the walk reopens the levels it closed to walk their side directories.
        let dir = tempfile::tempdir().unwrap();
        let mut level = dir.path().to_owned();
        let depth = super::HELD + 8;
        for i in 0..depth {
            std::fs::create_dir_all(level.join(format!("side{i}"))).unwrap();
            std::fs::write(level.join(format!("side{i}/f")), "f\n").unwrap();
            level.push(format!("chain{i}"));
            std::fs::create_dir(&level).unwrap();
        }
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n",
            dir.path().display()
        );
        let policy = Policy::from_yaml(&yaml, "test").unwrap();
        let sink = Paths::default();
        let summary = Scan::whole_policy(&policy).run(&sink, &ScanProgress::default());
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
        let paths = sink.0.into_inner().unwrap();
        // The root, and per level a chain directory, a side directory and its file.
        assert_eq!(paths.len(), 1 + 3 * depth, "{paths:#?}");
        assert!(paths.contains(&level), "the deepest directory is missing");
    }
}
