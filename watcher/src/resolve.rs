//! From what the kernel saw to the monitored paths to rehash. Inode events name a watched
//! (device, inode) and map through the state's index. Path events carry the path as the
//! actor passed it: it is resolved in the actor's own root and cwd (`/proc/PID/root`,
//! `/proc/PID/cwd`, `/proc/PID/fd/N`, with `RESOLVE_IN_ROOT`), so a bind-mount alias, a
//! relative path, a chroot or another mount namespace all land on the directory inode the
//! state knows. When the actor is already gone, the kernel's start-directory inode and the
//! monitored names stand in: the result may then hold more candidates than the one changed,
//! which costs a rehash each, never a miss.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kubefim_baseline::policy::Policy;
use kubefim_baseline::record::FileKind;
use kubefim_baseline::root::HostRoot;
use kubefim_common::InodeKey;
use rustix::fs::{Mode, OFlags, ResolveFlags};

use crate::state::State;

/// `AT_FDCWD` as the kernel records it.
const AT_FDCWD: i32 = -100;

/// Paths to rehash and directories whose entries to compare with the state.
#[derive(Debug, Default)]
pub struct Targets {
    /// Monitored paths that may have changed.
    pub paths: BTreeSet<PathBuf>,
    /// Monitored directories whose entries may have changed.
    pub dirs: BTreeSet<PathBuf>,
}

impl Targets {
    /// Marks `dir` changed and due for an entry comparison, if monitored.
    pub fn mark_dir(&mut self, policy: &Policy, dir: &Path) {
        if covered(policy, dir) {
            self.dirs.insert(dir.to_owned());
            self.paths.insert(dir.to_owned());
        }
    }

    /// Adds `path` if the policy monitors it.
    fn add(&mut self, policy: &Policy, path: PathBuf) {
        if covered(policy, &path) {
            self.paths.insert(path);
        }
    }
}

/// Whether a rule covers `path` and does not exclude it.
pub fn covered(policy: &Policy, path: &Path) -> bool {
    policy.rule_index_for(path).is_some_and(|i| !policy.rules[i].excludes(path))
}

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
fn split(path: &[u8]) -> (&[u8], &[u8]) {
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

/// How a path event's op touches its path's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The op changes the entry only (chmod, chown, xattrs, utimes, truncate).
    Entry,
    /// The op adds, removes or renames an entry: the directory changes too, and its
    /// entries are compared with the state when it is due.
    Namespace,
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

/// Resolves one path of a path event, passed by process `pid` relative to `dirfd` (whose
/// inode the kernel recorded as `start`), to the monitored paths and directories it may
/// touch.
pub fn resolve_path(
    state: &State,
    policy: &Policy,
    host: &HostRoot,
    (pid, dirfd, start): (u32, i32, InodeKey),
    path: &[u8],
    scope: Scope,
    out: &mut Targets,
) {
    let absolute = path.first() == Some(&b'/');
    let (parent, name) = split(path);
    let name = OsStr::from_bytes(name);
    let parent_rel = Path::new(OsStr::from_bytes(parent.strip_prefix(b"/").unwrap_or(parent)));
    let base = if absolute {
        PathBuf::from(format!("/proc/{pid}/root"))
    } else if dirfd == AT_FDCWD {
        PathBuf::from(format!("/proc/{pid}/cwd"))
    } else {
        PathBuf::from(format!("/proc/{pid}/fd/{dirfd}"))
    };
    if let Some(dir_fd) = open_below(&base, parent_rel, absolute) {
        // The actor's directory, as it sees it: exactly what the path names. If it is not a
        // monitored one, the path is not monitored, whatever names match.
        if let Some(key) = key_of_fd(&dir_fd)
            && let Some(dir) = state.dir_of_inode(&key)
        {
            into(out, policy, &dir, name, scope);
        } else if same_mount_ns(pid)
            && let Ok(seen) = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir_fd)))
            && seen.is_absolute()
            && let Some(seen) = host.logical(&seen)
        {
            // A rule whose root is a file in an unmonitored directory: the directory as
            // this process sees it, which is the actor's view when they share mounts.
            into(out, policy, &seen, name, scope);
        }
        return;
    }
    // The actor is gone: fall back on what the kernel recorded and on the monitored names.
    if !absolute {
        // `name` or `./name`: directly in the start directory.
        let single = parent.is_empty() || parent == b".";
        match state.dir_of_inode(&start) {
            Some(dir) => {
                let joined = dir.join(Path::new(OsStr::from_bytes(path)));
                if let Some(p) = lexical(&joined) {
                    let parent = p.parent().map(Path::to_owned);
                    out.add(policy, p);
                    if let (Scope::Namespace, Some(parent)) = (scope, parent) {
                        out.mark_dir(policy, &parent);
                    }
                }
                return;
            }
            // A name directly in a directory the kernel saw and the state does not know:
            // not monitored, whatever names match.
            None if single && start != InodeKey::default() => return,
            None => {}
        }
    }
    if absolute && let Some(p) = lexical(Path::new(OsStr::from_bytes(path))) {
        out.add(policy, p);
    }
    if !name.is_empty() {
        for p in state.paths_named(name.as_bytes()) {
            if let (Scope::Namespace, Some(parent)) = (scope, p.parent()) {
                out.mark_dir(policy, parent);
            }
            out.add(policy, p);
        }
    }
    if let Some(parent_name) = Path::new(OsStr::from_bytes(parent)).file_name() {
        for dir in state.paths_named(parent_name.as_bytes()) {
            if state.get(&dir).is_some_and(|k| k.record.kind == FileKind::Dir) {
                into(out, policy, &dir, name, scope);
            }
        }
    }
}

/// `path` with `.` and `..` taken lexically (the actor is gone, so its symlinks cannot be
/// followed any more; a `..` through a symlinked directory lands elsewhere, which costs a
/// candidate, and the names still stand in).
fn lexical(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Adds `dir/name` (or `dir` itself when `name` is empty); for namespace ops also `dir`.
fn into(out: &mut Targets, policy: &Policy, dir: &Path, name: &OsStr, scope: Scope) {
    if name.is_empty() {
        out.add(policy, dir.to_owned());
        return;
    }
    if Path::new(name).components().any(|c| !matches!(c, Component::Normal(_))) {
        return;
    }
    out.add(policy, dir.join(name));
    if scope == Scope::Namespace {
        out.mark_dir(policy, dir);
    }
}

/// The entries of `dir` that differ from the state's: new on disk, or known and gone.
pub fn dir_changes(state: &State, policy: &Policy, host: &HostRoot, dir: &Path, out: &mut Targets) {
    let known = state.children(dir);
    let on_disk: BTreeSet<PathBuf> = match std::fs::read_dir(host.disk(dir)) {
        Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| dir.join(e.file_name())).collect(),
        Err(_) => BTreeSet::new(),
    };
    for p in on_disk.iter().filter(|p| !known.contains(p)) {
        out.add(policy, p.clone());
    }
    for p in known.into_iter().filter(|p| !on_disk.contains(p)) {
        out.add(policy, p);
    }
}

#[cfg(test)]
mod tests {
    use super::split;

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
}
