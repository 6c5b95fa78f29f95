//! The scan's walk: lists a tree through directory descriptors only. The start is located
//! beneath its rule root ([`crate::beneath`]); every directory below is opened by name from
//! its parent's descriptor with `O_NOFOLLOW`, so no symlink is ever followed (a directory
//! swapped for one between listing and opening is simply not entered) and no path is ever
//! too long (a tree deeper than PATH_MAX is walked like any other). Entries go out in
//! batches that hold their directory open until each entry is recorded; recording is the
//! scan's. The walk does not cross file systems and holds a bounded number of descriptors
//! however deep the tree: at most [`HELD`] along its way down, and those of the batches in
//! the bounded channel.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use rustix::fs::{FileType, Mode, OFlags};

use crate::beneath::{self, Located};
use crate::scan::WarningKind;

/// Directories on the way down held open; deeper ones are reopened from the nearest held one
/// when the walk comes back up to them.
const HELD: usize = 32;

/// Entries per batch: large directories are recorded on every core while they are listed.
const BATCH: usize = 512;

/// Entries of one directory, to record.
pub(crate) struct Batch {
    /// The directory they are in, open until every entry is recorded.
    pub dir: Arc<OwnedFd>,
    /// The entries.
    pub entries: Vec<Entry>,
}

/// One listed entry.
pub(crate) struct Entry {
    /// Its policy path.
    pub path: PathBuf,
    /// Its name in the batch's directory.
    pub name: CString,
    /// Whether the listing says it is a regular file (checked again when it is opened).
    pub is_file: bool,
}

/// What the walk sends.
pub(crate) enum Walked {
    /// Entries to record.
    Batch(Batch),
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
    /// Subdirectories not walked yet.
    subdirs: Vec<(CString, PathBuf)>,
}

/// Walks the tree at `root` (a policy path, located at `at`), sending every entry `keep`
/// accepts (the root included) to `tx`. Stops early if the receiver is gone.
pub(crate) fn walk(at: Located, root: &Path, keep: &(dyn Fn(&Path) -> bool + Sync), tx: &SyncSender<Walked>) {
    let problem = |path: &Path, kind, message: String| {
        let _ = tx.send(Walked::Problem { path: path.to_owned(), kind, message });
    };
    let stat = match at.lstat() {
        Ok(st) => st,
        // A root that does not exist is simply absent (verify reports it if it appears).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return problem(root, WarningKind::Unreadable, format!("cannot read metadata: {e}")),
    };
    if !keep(root) {
        return;
    }
    let kind = FileType::from_raw_mode(stat.st_mode);
    let (parent, name) = at.into_parts();
    let parent = Arc::new(parent);
    let entry = Entry { path: root.to_owned(), name: name.clone(), is_file: kind == FileType::RegularFile };
    if tx.send(Walked::Batch(Batch { dir: parent.clone(), entries: vec![entry] })).is_err()
        || kind != FileType::Directory
    {
        return;
    }
    let dev = stat.st_dev;
    let mut stack = Vec::new();
    match list(&parent, &name, root, dev, keep, tx) {
        Ok(Some(frame)) => stack.push(frame),
        Ok(None) => return,
        Err(Stop) => return,
    }
    drop(parent);
    while let Some(top) = stack.last_mut() {
        let Some((name, path)) = top.subdirs.pop() else {
            stack.pop();
            continue;
        };
        let dir = match reopen(&mut stack) {
            Ok(dir) => dir,
            Err(message) => {
                let top = stack.pop().expect("a frame");
                problem(&top.path, WarningKind::Unreadable, message);
                continue;
            }
        };
        match list(&dir, &name, &path, dev, keep, tx) {
            Ok(Some(frame)) => {
                stack.push(frame);
                // Bound the descriptors held on the way down (the start's is always held).
                if stack.len() > HELD {
                    let i = stack.len() - HELD;
                    stack[i].dir = None;
                }
            }
            Ok(None) => {}
            Err(Stop) => return,
        }
    }
}

/// The receiver is gone: stop walking.
struct Stop;

/// Opens and lists the directory `name` in `parent`, sending its entries; `None` when it
/// cannot be entered (a problem is sent if that is one) or is another file system.
fn list(
    parent: &OwnedFd,
    name: &CStr,
    path: &Path,
    dev: u64,
    keep: &(dyn Fn(&Path) -> bool + Sync),
    tx: &SyncSender<Walked>,
) -> Result<Option<Frame>, Stop> {
    let send = |w| tx.send(w).map_err(|_| Stop);
    let problem = |kind, message| send(Walked::Problem { path: path.to_owned(), kind, message });
    let fd = match beneath::open_dir_at(parent.as_fd(), name) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problem(WarningKind::Vanished, "vanished during the scan".into())?;
            return Ok(None);
        }
        // No longer a directory (a symlink now: never followed): its record says what it is.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => return Ok(None),
        Err(e) => {
            problem(WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    let stat = match rustix::fs::fstat(&fd) {
        Ok(st) => st,
        Err(e) => {
            problem(WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    if stat.st_dev != dev {
        // Another file system: recorded as an entry, not entered.
        return Ok(None);
    }
    let listed = match beneath::read_dir(fd.as_fd()) {
        Ok(listed) => listed,
        Err(e) => {
            problem(WarningKind::Unreadable, format!("cannot list directory: {e}"))?;
            return Ok(None);
        }
    };
    let dir = Arc::new(fd);
    let mut subdirs = Vec::new();
    let mut entries = Vec::with_capacity(listed.len().min(BATCH));
    for l in listed {
        let child = path.join(OsStr::from_bytes(l.name.to_bytes()));
        if !keep(&child) {
            continue;
        }
        let kind = match l.kind {
            // Some file systems do not say in the listing.
            FileType::Unknown => beneath::lstat_at(dir.as_fd(), &l.name)
                .map_or(FileType::Unknown, |st| FileType::from_raw_mode(st.st_mode)),
            kind => kind,
        };
        if kind == FileType::Directory {
            subdirs.push((l.name.clone(), child.clone()));
        }
        entries.push(Entry { path: child, name: l.name, is_file: kind == FileType::RegularFile });
        if entries.len() == BATCH {
            send(Walked::Batch(Batch { dir: dir.clone(), entries: std::mem::take(&mut entries) }))?;
        }
    }
    if !entries.is_empty() {
        send(Walked::Batch(Batch { dir: dir.clone(), entries }))?;
    }
    // Popped from the end: walked in listing order.
    subdirs.reverse();
    Ok(Some(Frame {
        dir: Some(dir),
        name: name.to_owned(),
        path: path.to_owned(),
        id: (stat.st_dev, stat.st_ino),
        subdirs,
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
