//! A running container's monitored entries as its processes see them: its merged root
//! (`/proc/PID/root`), walked under the rules of the workload policies that select it, each
//! entry's path inside the container and its inode. This is what the watcher's kernel filter
//! watches, so a write in the container is seen as it happens. Only the container's overlay is
//! walked: a bind mount inside it (`/etc/hosts`, a volume) is not its layer, and its image
//! says nothing of it. Paths are resolved inside the container's root, so a tenant's absolute
//! symlink can never lead the walk into the host.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::beneath;
use crate::policy::Policy;

/// One monitored entry of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedEntry {
    /// Its path inside the container.
    pub path: PathBuf,
    /// `st_dev` (the container's overlay).
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// A directory (its new entries are watched too).
    pub is_dir: bool,
}

/// What [`monitored`] found.
#[derive(Debug, Default)]
pub struct Merged {
    /// The root's `st_dev`: the container's overlay. Events on this device are the
    /// container's.
    pub dev: u64,
    /// The root's `st_ino`: where its processes' absolute paths start.
    pub root_ino: u64,
    /// The entries, rule roots first, at most the limit asked for.
    pub entries: Vec<MergedEntry>,
    /// Whether the limit cut the walk short (the rest is found by the container's checks only).
    pub cut: bool,
}

const PATH: OFlags = OFlags::PATH.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// The entries under `policies`' rules in the container whose root is `root`
/// (`/proc/PID/root`), at most `limit` of them. An absent rule root is no error; anything
/// else that cannot be read is.
pub fn monitored<'p>(root: &Path, policies: impl IntoIterator<Item = &'p Policy>, limit: usize) -> io::Result<Merged> {
    let root_fd = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let stat = rustix::fs::fstat(&root_fd)?;
    let mut merged = Merged { dev: stat.st_dev, root_ino: stat.st_ino, entries: Vec::new(), cut: false };
    for policy in policies {
        for rule in &policy.rules {
            let rel = rule.path.strip_prefix("/").unwrap_or(&rule.path);
            let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
            let flags = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
            let fd = match rustix::fs::openat2(&root_fd, rel, PATH, Mode::empty(), flags) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR | rustix::io::Errno::LOOP) => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", rule.path.display()))),
            };
            walk(&mut merged, policy, fd, rule.path.clone(), limit)?;
        }
    }
    merged.entries.sort_by(|a, b| a.path.cmp(&b.path));
    merged.entries.dedup_by(|a, b| a.path == b.path);
    Ok(merged)
}

/// Adds `fd` (at `path`) and, for a directory, everything below it on the same device.
fn walk(merged: &mut Merged, policy: &Policy, fd: OwnedFd, path: PathBuf, limit: usize) -> io::Result<()> {
    let mut stack = vec![(fd, path)];
    while let Some((fd, path)) = stack.pop() {
        let stat = rustix::fs::fstat(&fd)?;
        if stat.st_dev != merged.dev {
            continue;
        }
        if merged.entries.len() >= limit {
            merged.cut = true;
            return Ok(());
        }
        let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
        merged.entries.push(MergedEntry { path: path.clone(), dev: stat.st_dev, ino: stat.st_ino, is_dir });
        if !is_dir {
            continue;
        }
        let dir =
            match rustix::fs::openat(&fd, c".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
                Ok(dir) => dir,
                // Gone or unreadable since: its entries are the checks' to find.
                Err(_) => continue,
            };
        for entry in beneath::read_dir(dir.as_fd())? {
            let child = path.join(OsStr::from_bytes(entry.name.to_bytes()));
            let excluded = policy.rule_index_for(&child).is_none_or(|i| policy.rules[i].excludes(&child));
            if excluded {
                continue;
            }
            match rustix::fs::openat(&dir, entry.name.as_c_str(), PATH, Mode::empty()) {
                Ok(fd) => stack.push((fd, child)),
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", child.display()))),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml_rules: &str) -> Policy {
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata:\n  name: t\nspec:\n  rules:\n{yaml_rules}"
        );
        Policy::from_yaml(&yaml, "test").unwrap()
    }

    #[test]
    fn walks_the_rules_inside_the_root_and_never_out_of_it() {
        let root = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/app/conf.d")).unwrap();
        std::fs::write(root.path().join("etc/app/app.conf"), "x").unwrap();
        std::fs::write(root.path().join("etc/app/conf.d/a.conf"), "x").unwrap();
        std::fs::write(root.path().join("etc/app/skip.log"), "x").unwrap();
        std::fs::write(host.path().join("secret"), "x").unwrap();
        // An absolute symlink on the way to a rule root resolves inside the root, where it
        // names nothing.
        std::os::unix::fs::symlink(host.path(), root.path().join("link")).unwrap();
        let p =
            policy("    - path: /etc/app\n      exclude: ['*.log']\n    - path: /link/secret\n    - path: /absent\n");
        let merged = monitored(root.path(), [&p], 100).unwrap();
        let paths: Vec<_> = merged.entries.iter().map(|e| e.path.to_str().unwrap()).collect();
        assert_eq!(paths, ["/etc/app", "/etc/app/app.conf", "/etc/app/conf.d", "/etc/app/conf.d/a.conf"]);
        assert!(merged.entries[0].is_dir && !merged.entries[1].is_dir);
        assert!(!merged.cut);
        let cut = monitored(root.path(), [&p], 2).unwrap();
        assert_eq!(cut.entries.len(), 2);
        assert!(cut.cut);
    }
}
