//! Opening monitored paths beneath their rule's root, and nothing else: the one place that
//! turns a policy path into a descriptor. A path is resolved from the directory its outermost
//! rule root is in, held open, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`, or where that is unavailable (no openat2, or a path longer than
//! PATH_MAX) one `O_NOFOLLOW` component at a time from that directory. So a symlink anywhere
//! inside a rule's tree is never followed: a directory swapped for a symlink to /etc makes
//! the paths below it absent, never /etc's files, and a tree deeper than PATH_MAX is reached
//! like any other. What is returned is the entry's parent directory, held open, and its name:
//! callers stat, open or list the entry relative to it (see `scan` and the watcher).
//!
//! Above the rule roots, paths are the host's: with `--host-root` they are resolved inside
//! the host root (`RESOLVE_IN_ROOT`, so the host's absolute symlinks such as /var/run -> /run
//! land in the host's tree, never the agent's); without it, as the kernel resolves them for
//! any process. Swaps of those ancestors are the watcher's to notice, not this module's.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, Stat};

use crate::policy::Policy;
use crate::root::HostRoot;

/// The flags of every lookup below a rule root's parent.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// Directories on the way to an entry: looked up, never read.
const WAY: OFlags = OFlags::PATH.union(OFlags::DIRECTORY).union(OFlags::CLOEXEC);

/// A directory opened to be listed; never a symlink (`O_NOFOLLOW`), never a FIFO's wait.
const LISTING: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NONBLOCK)
    .union(OFlags::NOCTTY);

/// One entry of a monitored tree, reached without following a symlink: its parent directory,
/// held open, and its name there.
#[derive(Debug)]
pub struct Located {
    parent: OwnedFd,
    name: CString,
}

impl Located {
    /// The directory the entry is in.
    pub fn parent(&self) -> BorrowedFd<'_> {
        self.parent.as_fd()
    }

    /// The entry's name in [`Self::parent`] (`.` for the host's `/`).
    pub fn name(&self) -> &CStr {
        &self.name
    }

    /// The parent directory and the name, for holding the directory elsewhere.
    pub fn into_parts(self) -> (OwnedFd, CString) {
        (self.parent, self.name)
    }

    /// The entry's status, not following it if it is a symlink.
    pub fn lstat(&self) -> io::Result<Stat> {
        lstat_at(self.parent(), &self.name)
    }
}

/// The entry `path` (a policy path under some rule) names, reached beneath its outermost rule
/// root's parent without following any symlink. A parent on the way that is a symlink or not a
/// directory is `NotFound`: the path does not exist in the monitored tree (what is there
/// instead is the record of that parent: a symlink, a file).
pub fn locate(policy: &Policy, host: &HostRoot, path: &Path) -> io::Result<Located> {
    let outer = policy
        .rules
        .iter()
        .map(|r| r.path.as_path())
        .filter(|root| path.starts_with(root))
        .min_by_key(|root| root.as_os_str().len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} is under no rule", path.display())))?;
    let top = outer.parent().unwrap_or(outer);
    let anchor = open_host_dir(host, top)?;
    let rel = path.strip_prefix(top).expect("a rule root starts with its parent");
    let mut names = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => names.push(n),
            // Policy paths are absolute and normalised; anything else would climb out.
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{}: not a plain path", path.display()),
                ));
            }
        }
    }
    let Some((last, way)) = names.split_last() else {
        return Ok(Located { parent: anchor, name: c".".to_owned() });
    };
    let parent = if way.is_empty() { anchor } else { open_way(&anchor, way)? };
    Ok(Located { parent, name: c_name(last)? })
}

/// The status of `path` (not following a final symlink), reached like [`locate`].
pub fn lstat(policy: &Policy, host: &HostRoot, path: &Path) -> io::Result<Stat> {
    locate(policy, host, path)?.lstat()
}

/// One entry of a listed directory.
#[derive(Debug)]
pub struct Listed {
    /// Its name.
    pub name: CString,
    /// Its inode number (`d_ino`).
    pub ino: u64,
    /// Its type as the directory says it (`d_type`; `Unknown` on some file systems).
    pub kind: FileType,
}

/// The directory `dir` (a policy path) opened beneath its rule root for listing, with its
/// status and its entries.
pub fn list(policy: &Policy, host: &HostRoot, dir: &Path) -> io::Result<(Stat, Vec<Listed>)> {
    let located = locate(policy, host, dir)?;
    let fd = open_dir_at(located.parent(), located.name())?;
    let stat = rustix::fs::fstat(&fd)?;
    Ok((stat, read_dir(fd.as_fd())?))
}

/// Opens the directory `name` in `parent` for listing; a symlink there is `ELOOP` or
/// `ENOTDIR`, never followed.
pub fn open_dir_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(parent, name, LISTING, Mode::empty())?)
}

/// Opens the regular file `name` in `parent` for hashing: `O_NOFOLLOW` (a symlink is
/// `ELOOP`), `O_NONBLOCK` (a FIFO swapped in never blocks), `O_NOATIME` where allowed.
pub fn open_file_at(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = match rustix::fs::openat(parent, name, flags | OFlags::NOATIME, Mode::empty()) {
        // O_NOATIME needs ownership or CAP_FOWNER; without it, open normally.
        Err(rustix::io::Errno::PERM) => rustix::fs::openat(parent, name, flags, Mode::empty())?,
        other => other?,
    };
    Ok(File::from(fd))
}

/// The status of `name` in `dir`, not following a symlink.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    Ok(rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?)
}

/// The target of the symlink `name` in `dir`.
pub fn read_link_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

/// A path naming `name` in `dir` for the calls that only take paths (`llistxattr`,
/// `lgetxattr` on entries that are never opened: symlinks, devices, FIFOs, sockets): the
/// directory is reached through its descriptor (`/proc/self/fd/N`), and only the final name
/// is looked up, without following it.
pub fn path_at(dir: BorrowedFd<'_>, name: &CStr) -> PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(OsStr::from_bytes(name.to_bytes()));
    p
}

/// The entries of the open directory `dir`, without `.` and `..`.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<Listed>> {
    let mut buf = [MaybeUninit::<u8>::uninit(); 16 << 10];
    let mut raw = RawDir::new(dir, &mut buf);
    let mut out = Vec::new();
    while let Some(entry) = raw.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        out.push(Listed { name: name.to_owned(), ino: entry.ino(), kind: entry.file_type() });
    }
    Ok(out)
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
}

/// The directory `dir` (a policy path, above the rule roots) as the host sees it.
fn open_host_dir(host: &HostRoot, dir: &Path) -> io::Result<OwnedFd> {
    let Some(root) = host.dir() else {
        return Ok(rustix::fs::open(dir, WAY, Mode::empty())?);
    };
    let root = rustix::fs::open(root, WAY, Mode::empty())?;
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    match rustix::fs::openat2(&root, rel, WAY, Mode::empty(), ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS) {
        Ok(fd) => Ok(fd),
        // No openat2 (before Linux 5.6, or refused by a seccomp filter): no symlink is
        // followed at all, which is stricter, never looser.
        Err(e) if fallback(e) => {
            let names: Vec<&OsStr> = rel.iter().filter(|n| *n != ".").collect();
            if names.is_empty() { Ok(root) } else { open_way(&root, &names) }
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether an openat2 error asks for the component walk instead: no openat2, or a path
/// longer than it takes.
fn fallback(e: rustix::io::Errno) -> bool {
    matches!(e, rustix::io::Errno::NOSYS | rustix::io::Errno::PERM | rustix::io::Errno::NAMETOOLONG)
}

/// The directory `names` leads to from `from`, through directories only, following no
/// symlink and never climbing above `from`.
fn open_way(from: &OwnedFd, names: &[&OsStr]) -> io::Result<OwnedFd> {
    let joined: PathBuf = names.iter().collect();
    match rustix::fs::openat2(from, &joined, WAY, Mode::empty(), BENEATH) {
        Ok(fd) => return Ok(fd),
        Err(e) if fallback(e) => {}
        Err(e) => return Err(not_beneath(e)),
    }
    let mut cur: Option<OwnedFd> = None;
    for name in names {
        let at = cur.as_ref().unwrap_or(from);
        let next = rustix::fs::openat(at, c_name(name)?.as_c_str(), WAY | OFlags::NOFOLLOW, Mode::empty())
            .map_err(not_beneath)?;
        cur = Some(next);
    }
    Ok(cur.expect("at least one name"))
}

/// A parent that is a symlink (`ELOOP`; `ENOTDIR` from `O_NOFOLLOW | O_DIRECTORY`), not a
/// directory, or a way out (`EXDEV`): the path is not in the tree.
fn not_beneath(e: rustix::io::Errno) -> io::Error {
    match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV => {
            io::Error::new(io::ErrorKind::NotFound, "a parent directory is now a symlink or not a directory")
        }
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn rule_over(path: &Path) -> Policy {
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n",
            path.display()
        );
        Policy::from_yaml(&yaml, "test").unwrap()
    }

    #[test]
    fn a_symlink_in_the_middle_of_a_path_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (tree, outside) = (dir.path().join("tree"), dir.path().join("outside"));
        std::fs::create_dir_all(tree.join("real")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("shadow"), "secret\n").unwrap();
        symlink(&outside, tree.join("link")).unwrap();
        let policy = rule_over(&tree);
        let host = HostRoot::identity();
        let e = locate(&policy, &host, &tree.join("link/shadow")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(list(&policy, &host, &tree.join("link")).is_err(), "a symlink listed as a directory");
        // The symlink itself is an entry like any other.
        let link = lstat(&policy, &host, &tree.join("link")).unwrap();
        assert_eq!(FileType::from_raw_mode(link.st_mode), FileType::Symlink);
        let (_, entries) = list(&policy, &host, &tree).unwrap();
        let mut names: Vec<_> = entries.iter().map(|e| e.name.to_str().unwrap()).collect();
        names.sort_unstable();
        assert_eq!(names, ["link", "real"]);
    }

    #[test]
    fn a_path_longer_than_path_max_is_reached_one_directory_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let name = "n".repeat(250);
        let mut fd = rustix::fs::open(dir.path(), OFlags::DIRECTORY, Mode::empty()).unwrap();
        let mut path = dir.path().to_owned();
        for _ in 0..20 {
            rustix::fs::mkdirat(&fd, name.as_str(), Mode::from(0o755)).unwrap();
            fd = rustix::fs::openat(&fd, name.as_str(), OFlags::DIRECTORY, Mode::empty()).unwrap();
            path.push(&name);
        }
        assert!(path.as_os_str().len() > 4096);
        let policy = rule_over(dir.path());
        let here = rustix::fs::fstat(&fd).unwrap();
        let located = locate(&policy, &HostRoot::identity(), &path).unwrap();
        let st = located.lstat().unwrap();
        assert_eq!((st.st_dev, st.st_ino), (here.st_dev, here.st_ino));
    }

    #[test]
    fn host_paths_above_the_rule_roots_resolve_inside_the_host_root() {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join("host");
        std::fs::create_dir_all(host_dir.join("real/conf")).unwrap();
        std::fs::write(host_dir.join("real/conf/a"), "a\n").unwrap();
        // Absolute, as the host sees it.
        symlink("/real", host_dir.join("alias")).unwrap();
        let host = HostRoot::new(&host_dir).unwrap();
        let policy = rule_over(Path::new("/alias/conf"));
        let st = lstat(&policy, &host, Path::new("/alias/conf/a")).unwrap();
        let want = std::fs::metadata(host_dir.join("real/conf/a")).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&want));
    }
}
