//! The directories above the rule roots. None of them is monitored, yet one rename of any of
//! them (`renameat2(RENAME_EXCHANGE)` with a prepared copy) or one mount over it puts other
//! inodes at every monitored path below: the kernel filter, which knows inodes, would see
//! nothing of them ever after. So their names go into the name filter (a rename, removal or
//! mount whose last component is one of them is sent) and their inodes into the inode filter
//! (a mount through a descriptor of one is sent); an event on one names the rule roots below
//! it, which the loop then rescans and refills. What it owns: which directories those are and
//! their inodes now. Reading them is the loop's business, at start and after such an event.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kubefim_baseline::policy::{Policy, path_bytes};
use kubefim_baseline::root::HostRoot;
use kubefim_common::InodeKey;

/// The rule roots' ancestors (not `/`, which no rename can move) and their inodes now.
#[derive(Debug, Default)]
pub(crate) struct Ancestors {
    dirs: BTreeMap<PathBuf, Option<InodeKey>>,
}

/// What a refresh changed in the inodes.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Refreshed {
    /// Inodes now at an ancestor's path.
    pub added: Vec<InodeKey>,
    /// Inodes no ancestor's path has any more.
    pub removed: Vec<InodeKey>,
}

impl Ancestors {
    /// The ancestors of `policy`'s rule roots, with no inode read yet.
    pub fn of(policy: &Policy) -> Ancestors {
        let mut dirs = BTreeMap::new();
        for rule in &policy.rules {
            for dir in rule.path.ancestors().skip(1) {
                if dir.parent().is_some() {
                    dirs.insert(dir.to_owned(), None);
                }
            }
        }
        Ancestors { dirs }
    }

    /// Reads each ancestor's inode under `host` (without following a symlink at the last
    /// component: what the kernel would watch is the link, and a link put in an ancestor's
    /// place is itself the change). Says which inodes came and went.
    pub fn refresh(&mut self, host: &HostRoot) -> Refreshed {
        let before: BTreeSet<InodeKey> = self.dirs.values().flatten().copied().collect();
        for (dir, key) in &mut self.dirs {
            *key = std::fs::symlink_metadata(host.disk(dir)).ok().map(|m| InodeKey::from_stat(m.dev(), m.ino()));
        }
        let after: BTreeSet<InodeKey> = self.dirs.values().flatten().copied().collect();
        Refreshed {
            added: after.difference(&before).copied().collect(),
            removed: before.difference(&after).copied().collect(),
        }
    }

    /// The ancestor whose inode is `key` now.
    pub fn path_of(&self, key: InodeKey) -> Option<PathBuf> {
        self.dirs.iter().find(|(_, k)| **k == Some(key)).map(|(p, _)| p.clone())
    }

    /// Their file names (each once).
    pub fn names(&self) -> BTreeSet<&[u8]> {
        self.dirs.keys().filter_map(|d| d.file_name()).map(|n| path_bytes(Path::new(n))).collect()
    }

    /// Their inodes now.
    pub fn keys(&self) -> impl Iterator<Item = InodeKey> + '_ {
        self.dirs.values().flatten().copied()
    }
}

/// What a rename, removal or mount at `path` may have put elsewhere: the rule roots at or
/// below it; for a mount inside a monitored tree (`in_tree`: the path is covered), the
/// directory it was made in, whose walk shows what it covers as the full rescans will see it
/// (they do not cross into another file system); empty when it touches nothing monitored.
pub(crate) fn affected(policy: &Policy, path: &Path, in_tree: bool) -> BTreeSet<PathBuf> {
    let roots: BTreeSet<PathBuf> =
        policy.rules.iter().filter(|r| r.path.starts_with(path)).map(|r| r.path.clone()).collect();
    if !roots.is_empty() || !in_tree {
        return roots;
    }
    let place = match path.parent() {
        Some(parent) if crate::targets::covered(policy, parent) => parent,
        _ => path,
    };
    BTreeSet::from([place.to_owned()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let yaml = "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - path: /a/b/root\n    - path: /a/other\n    - path: /etc/kubernetes\n";
        Policy::from_yaml(yaml, "test").unwrap()
    }

    #[test]
    fn every_directory_above_a_rule_root_but_slash_is_an_ancestor() {
        let a = Ancestors::of(&policy());
        let dirs: Vec<&Path> = a.dirs.keys().map(PathBuf::as_path).collect();
        assert_eq!(dirs, [Path::new("/a"), Path::new("/a/b"), Path::new("/etc")]);
        let names: Vec<&[u8]> = a.names().into_iter().collect();
        assert_eq!(names, [&b"a"[..], b"b", b"etc"]);
    }

    #[test]
    fn a_path_affects_the_roots_below_it_or_for_a_mount_in_a_tree_its_directory() {
        let p = policy();
        let set = |v: &[&str]| v.iter().map(PathBuf::from).collect::<BTreeSet<_>>();
        assert_eq!(affected(&p, Path::new("/a"), false), set(&["/a/b/root", "/a/other"]));
        assert_eq!(affected(&p, Path::new("/a/b"), false), set(&["/a/b/root"]));
        assert_eq!(affected(&p, Path::new("/a/b/root"), true), set(&["/a/b/root"]));
        assert_eq!(affected(&p, Path::new("/etc/kubernetes/kubelet.conf"), true), set(&["/etc/kubernetes"]));
        assert_eq!(affected(&p, Path::new("/etc/kubernetes/manifests/x"), true), set(&["/etc/kubernetes/manifests"]));
        assert!(affected(&p, Path::new("/a/c"), false).is_empty());
        assert!(affected(&p, Path::new("/etc/kubernetes/kubelet.conf"), false).is_empty());
    }
}
