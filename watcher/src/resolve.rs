//! What a path event's path names, looked at as its actor sees it, as soon as the event is
//! read (the actor may exit any moment): the path's directory is opened in the actor's own
//! root and cwd (`/proc/PID/root`, `/proc/PID/cwd`, `/proc/PID/fd/N`, with
//! `RESOLVE_IN_ROOT`), so a bind-mount alias, a relative path, a chroot or another mount
//! namespace all land on the directory inode the state knows. Mapping that to monitored
//! paths is `targets`' job.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kubefim_baseline::root::HostRoot;
use kubefim_common::InodeKey;

use crate::event::KernelEvent;
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// `AT_FDCWD` as the kernel records it.
const AT_FDCWD: i32 = -100;

/// The key of what an fd refers to.
fn key_of_fd(fd: &OwnedFd) -> Option<InodeKey> {
    let st = rustix::fs::fstat(fd).ok()?;
    Some(InodeKey::from_stat(st.st_dev, st.st_ino))
}

/// Opens `rel` (a directory) below `base` without following the last component out of the
/// actor's root.
fn open_below(base: &Path, rel: &Path, in_root: bool) -> Option<OwnedFd> {
    let base = rustix::fs::open(base, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).ok()?;
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    let resolve = if in_root { ResolveFlags::IN_ROOT } else { ResolveFlags::empty() };
    rustix::fs::openat2(&base, rel, OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), resolve).ok()
}

/// Splits a path into (parent, file name), ignoring trailing slashes; the name is empty for
/// `/`, `.` and `..`, which are then resolved as directories.
pub(crate) fn split(path: &[u8]) -> (&[u8], &[u8]) {
    let mut end = path.len();
    while end > 1 && path[end - 1] == b'/' {
        end -= 1;
    }
    let path = &path[..end];
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => {
            let name = &path[i + 1..];
            let parent = if i == 0 { &path[..1] } else { &path[..i] };
            if name == b"." || name == b".." { (path, b"") } else { (parent, name) }
        }
        None if path == b"." || path == b".." => (path, b""),
        None => (b"", path),
    }
}

/// Whether `pid` shares the watcher's mount namespace (so a path it resolves reads the same
/// here).
fn same_mount_ns(pid: u32) -> bool {
    // The watcher's own namespace does not change: read it once.
    static OURS: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let ours = OURS.get_or_init(|| std::fs::read_link("/proc/self/ns/mnt").ok());
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    ours.is_some() && theirs == *ours
}

/// Whether the actor shares the watcher's mount namespace: by the namespace the kernel
/// recorded with its event, which an actor that exits at once cannot make unreadable (asking
/// /proc after the actor's directory was opened raced with its exit, and a path then went
/// unplaced); by /proc only for an event that carries none.
fn shares_our_mounts(recorded: u32, pid: u32) -> bool {
    static OURS: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    let ours =
        OURS.get_or_init(|| rustix::fs::stat("/proc/self/ns/mnt").ok().and_then(|s| u32::try_from(s.st_ino).ok()));
    match ours {
        Some(ours) if recorded != 0 => recorded == *ours,
        _ => same_mount_ns(pid),
    }
}

/// The directory a path event's path is in, as its actor saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The directory's inode.
    pub key: InodeKey,
    /// Its path as the policy names paths, when the actor shares the watcher's mounts (a
    /// rule whose root is a file in an unmonitored directory is found this way).
    pub path: Option<PathBuf>,
}

/// The directory part of a path event's path: the parent of the last component, or, for a
/// path that was cut ([`PATH_CAP`](kubefim_common::PATH_CAP)), the deepest directory whose
/// name is whole (what follows it is unknown).
pub(crate) fn dir_part(path: &[u8], truncated: bool) -> &[u8] {
    if !truncated {
        return split(path).0;
    }
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) => &path[..1],
        Some(i) => &path[..i],
        None => b"",
    }
}

/// How the watcher's view of the policy's paths resolves an absolute path: from the host's
/// root directory, in the mount namespace the watcher sees it through (its own; with
/// `--host-root`, in a pod, the host's, pid 1's, which the host root mount follows).
#[derive(Debug, Clone)]
pub(crate) struct HostView {
    root: InodeKey,
    mnt_ns: u32,
}

impl HostView {
    /// The host's view as this process can see it; `None` when /proc/1 cannot be read.
    pub fn new(host: &HostRoot) -> Option<HostView> {
        let root = rustix::fs::stat(host.disk(Path::new("/")).as_ref()).ok()?;
        let ns = rustix::fs::stat(if host.is_identity() { "/proc/self/ns/mnt" } else { "/proc/1/ns/mnt" }).ok()?;
        Some(HostView { root: InodeKey::from_stat(root.st_dev, root.st_ino), mnt_ns: u32::try_from(ns.st_ino).ok()? })
    }
}

/// Opens the directory part of path `i` of a path event as its actor saw it (its root, its
/// cwd, its fd), and says what it is. An actor already gone whose absolute paths meant what
/// the host's do (the event names its root directory and mount namespace) is stood in for by
/// the host's view. `None` when neither works: the caller then infers.
pub(crate) fn look(host: &HostRoot, host_view: Option<&HostView>, ev: &KernelEvent, i: usize) -> Option<Seen> {
    let h = &ev.header;
    let path = &ev.paths[i];
    let absolute = path.first() == Some(&b'/');
    let parent = dir_part(path, ev.truncated[i]);
    let parent_rel = Path::new(OsStr::from_bytes(parent.strip_prefix(b"/").unwrap_or(parent)));
    let pid = h.pid;
    let base = if absolute {
        PathBuf::from(format!("/proc/{pid}/root"))
    } else if h.dirfd[i] == AT_FDCWD {
        PathBuf::from(format!("/proc/{pid}/cwd"))
    } else {
        PathBuf::from(format!("/proc/{pid}/fd/{}", h.dirfd[i]))
    };
    let (dir_fd, ours) = match open_below(&base, parent_rel, absolute) {
        Some(fd) => (fd, shares_our_mounts(h.mnt_ns, pid)),
        None => {
            host_view.filter(|v| absolute && h.start[i] == v.root && h.mnt_ns == v.mnt_ns)?;
            (open_below(&host.disk(Path::new("/")), parent_rel, true)?, true)
        }
    };
    let key = key_of_fd(&dir_fd)?;
    let path = if ours
        && let Ok(seen) = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir_fd)))
        && seen.is_absolute()
    {
        host.logical(&seen).map(std::borrow::Cow::into_owned)
    } else {
        None
    };
    Some(Seen { key, path })
}

#[cfg(test)]
mod tests {
    use super::{dir_part, split};

    #[test]
    fn splits_paths_like_the_kernel_walks_them() {
        assert_eq!(split(b"/etc/passwd"), (&b"/etc"[..], &b"passwd"[..]));
        assert_eq!(split(b"/etc/dir/"), (&b"/etc"[..], &b"dir"[..]));
        assert_eq!(split(b"/passwd"), (&b"/"[..], &b"passwd"[..]));
        assert_eq!(split(b"passwd"), (&b""[..], &b"passwd"[..]));
        assert_eq!(split(b"a/b"), (&b"a"[..], &b"b"[..]));
        assert_eq!(split(b"/etc/.."), (&b"/etc/.."[..], &b""[..]));
        assert_eq!(split(b"."), (&b"."[..], &b""[..]));
    }

    #[test]
    fn a_cut_path_keeps_only_its_whole_directories() {
        assert_eq!(dir_part(b"/etc/aaaa/bbb", true), b"/etc/aaaa");
        assert_eq!(dir_part(b"/etc/aaaa/bbb", false), b"/etc/aaaa");
        assert_eq!(dir_part(b"/aaaa", true), b"/");
        assert_eq!(dir_part(b"aaaa", true), b"");
        // Not cut, the last component is a name even with a slash after it.
        assert_eq!(dir_part(b"/etc/dir/", false), b"/etc");
        assert_eq!(dir_part(b"/etc/dir/", true), b"/etc/dir");
    }
}
