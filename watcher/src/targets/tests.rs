//! The mapping on made-up events: no kernel, no file system.

use std::collections::HashMap;

use kubefim_common::{EVENT_HAS_PATHS, EVENT_HAS_TARGET, EVENT_PATH_TRUNCATED, EventHeader};

use super::*;

const DIR: InodeKey = InodeKey { dev: 8, ino: 2 };
const CONF: InodeKey = InodeKey { dev: 8, ino: 3 };
const OTHER_DIR: InodeKey = InodeKey { dev: 8, ino: 40 };
const NEW: InodeKey = InodeKey { dev: 8, ino: 99 };
/// `/other/deep`: an ancestor of the rule root `/other/deep/rule`.
const OTHER_DEEP: InodeKey = InodeKey { dev: 8, ino: 41 };

/// A watcher that knows `/m` (a monitored directory, inode 2) holding `/m/conf` (inode 3)
/// and `/m/skip.swp` (excluded), under a policy with one rule over `/m`.
struct Fake {
    policy: Policy,
    unnamed: HashMap<InodeKey, PathBuf>,
}

impl Fake {
    fn new() -> Fake {
        let yaml = "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - path: /m\n      exclude: [\"*.swp\"]\n    - path: /other/deep/rule\n";
        Fake { policy: Policy::from_yaml(yaml, "test").unwrap(), unnamed: HashMap::new() }
    }
}

impl View for Fake {
    fn policy(&self) -> &Policy {
        &self.policy
    }

    fn dir_of_inode(&self, key: InodeKey) -> Option<PathBuf> {
        (key == DIR).then(|| PathBuf::from("/m"))
    }

    fn paths_of_inode(&self, key: InodeKey) -> Vec<PathBuf> {
        match key {
            DIR => vec![PathBuf::from("/m")],
            CONF => vec![PathBuf::from("/m/conf")],
            _ => Vec::new(),
        }
    }

    fn paths_named(&self, name: &[u8]) -> Vec<PathBuf> {
        match name {
            b"conf" => vec![PathBuf::from("/m/conf")],
            b"m" => vec![PathBuf::from("/m")],
            _ => Vec::new(),
        }
    }

    fn is_dir(&self, path: &Path) -> bool {
        path == Path::new("/m")
    }

    fn unnamed_dir(&self, key: InodeKey) -> Option<PathBuf> {
        self.unnamed.get(&key).cloned()
    }

    fn ancestor_of_inode(&self, key: InodeKey) -> Option<PathBuf> {
        (key == OTHER_DEEP).then(|| PathBuf::from("/other/deep"))
    }
}

fn header(op: Op, flags: u32) -> EventHeader {
    EventHeader {
        op: op as u32,
        flags,
        pid: 100,
        tid: 100,
        ppid: 1,
        uid: 0,
        gid: 0,
        arg: 0,
        cgroup_id: 0,
        time_ns: 0,
        target: InodeKey::default(),
        parent: InodeKey::default(),
        start: [InodeKey::default(); 2],
        dirfd: [-100; 2],
        comm: [0; 16],
        mnt_ns: 0,
        _reserved: 0,
    }
}

fn inode_event(op: Op, target: InodeKey) -> KernelEvent {
    let mut h = header(op, EVENT_HAS_TARGET);
    h.target = target;
    KernelEvent { op, header: h, paths: Vec::new(), truncated: [false; 2] }
}

fn path_event(op: Op, paths: [&[u8]; 2]) -> KernelEvent {
    KernelEvent {
        op,
        header: header(op, EVENT_HAS_PATHS),
        paths: paths.iter().map(|p| p.to_vec()).collect(),
        truncated: [false; 2],
    }
}

fn seen(key: InodeKey) -> Option<Seen> {
    Some(Seen { key, path: None })
}

fn set(paths: &[&str]) -> BTreeSet<PathBuf> {
    paths.iter().map(PathBuf::from).collect()
}

#[test]
fn a_write_to_a_known_inode_names_its_path_and_only_it() {
    let t = targets(&inode_event(Op::Write, CONF), &[None, None], &Fake::new());
    assert_eq!(t.paths, set(&["/m/conf"]));
    assert_eq!(t.inode, Some(CONF));
    assert!(t.dirs.is_empty() && !t.inferred && t.unnamed.is_none());
}

#[test]
fn an_aio_write_a_fixed_file_write_and_a_chattr_name_the_path_of_their_inode() {
    for op in [Op::Aio, Op::IoUring, Op::SetFlags] {
        let t = targets(&inode_event(op, CONF), &[None, None], &Fake::new());
        assert_eq!(t.paths, set(&["/m/conf"]), "{op:?}");
        assert_eq!(t.inode, Some(CONF), "{op:?}");
        assert!(t.full_rescan.is_none() && t.rescan.is_empty(), "{op:?}: {t:?}");
    }
    // file_setattr by path is a change of the entry, not of its directory.
    let t = targets(&path_event(Op::SetFlags, [b"/anything/conf", b""]), &[seen(DIR), None], &Fake::new());
    assert_eq!(t.paths, set(&["/m/conf"]));
    assert!(t.dirs.is_empty());
}

#[test]
fn a_create_marks_its_directory_and_keeps_the_new_inode_apart() {
    let mut ev = inode_event(Op::Create, NEW);
    ev.header.flags |= EVENT_HAS_PARENT;
    ev.header.parent = DIR;
    let t = targets(&ev, &[None, None], &Fake::new());
    assert_eq!(t.paths, set(&["/m"]));
    assert_eq!(t.dirs, set(&["/m"]));
    assert_eq!(t.unnamed, Some((NEW, PathBuf::from("/m"))));
}

#[test]
fn writes_to_a_new_inode_stay_on_it_not_on_its_directory() {
    let mut fake = Fake::new();
    fake.unnamed.insert(NEW, PathBuf::from("/m"));
    let t = targets(&inode_event(Op::Write, NEW), &[None, None], &fake);
    assert!(t.paths.is_empty(), "the directory must not get the new file's write: {t:?}");
    assert_eq!(t.unnamed, Some((NEW, PathBuf::from("/m"))));
}

#[test]
fn an_unlink_seen_by_its_actor_names_the_entry_and_its_directory() {
    let t = targets(&path_event(Op::Unlink, [b"/anything/conf", b""]), &[seen(DIR), None], &Fake::new());
    assert_eq!(t.paths, set(&["/m", "/m/conf"]));
    assert_eq!(t.dirs, set(&["/m"]));
    assert!(!t.inferred);
}

#[test]
fn a_chmod_changes_the_entry_only() {
    let t = targets(&path_event(Op::Chmod, [b"conf", b""]), &[seen(DIR), None], &Fake::new());
    assert_eq!(t.paths, set(&["/m/conf"]));
    assert!(t.dirs.is_empty());
}

#[test]
fn a_monitored_name_in_an_unmonitored_directory_is_nothing() {
    let t = targets(&path_event(Op::Unlink, [b"/tmp/conf", b""]), &[seen(OTHER_DIR), None], &Fake::new());
    assert_eq!(t, Targets::default());
}

#[test]
fn an_excluded_entry_is_not_a_target() {
    let t = targets(&path_event(Op::Chmod, [b"/m/skip.swp", b""]), &[seen(DIR), None], &Fake::new());
    assert!(t.paths.is_empty(), "{t:?}");
}

#[test]
fn an_actor_gone_is_resolved_from_its_start_directory_and_marked_inferred() {
    let mut ev = path_event(Op::Chmod, [b"conf", b""]);
    ev.header.start[0] = DIR;
    let t = targets(&ev, &[None, None], &Fake::new());
    assert_eq!(t.paths, set(&["/m/conf"]));
    assert!(t.inferred);
    // Relative to a directory the watcher does not know: not monitored.
    ev.header.start[0] = OTHER_DIR;
    assert!(targets(&ev, &[None, None], &Fake::new()).paths.is_empty());
}

#[test]
fn an_actor_gone_with_an_absolute_path_stands_in_the_monitored_names() {
    let t = targets(&path_event(Op::Chmod, [b"/elsewhere/view/conf", b""]), &[None, None], &Fake::new());
    assert_eq!(t.paths, set(&["/m/conf"]), "the monitored file of that name is a candidate");
    assert!(t.inferred);
}

#[test]
fn a_rename_of_a_file_is_one_rename_and_an_exchange_is_two_changes() {
    let ev = path_event(Op::Rename, [b"/m/conf", b"/m/conf.new"]);
    let t = targets(&ev, &[seen(DIR), seen(DIR)], &Fake::new());
    assert_eq!(t.paths, set(&["/m", "/m/conf", "/m/conf.new"]));
    assert_eq!(t.renamed, Some((PathBuf::from("/m/conf"), PathBuf::from("/m/conf.new"))));
    let mut exchange = ev;
    exchange.header.flags |= EVENT_EXCHANGE;
    assert_eq!(targets(&exchange, &[seen(DIR), seen(DIR)], &Fake::new()).renamed, None);
}

#[test]
fn a_cut_path_rescans_the_monitored_subtree_of_its_last_whole_directory() {
    let long = [b"/m/".to_vec(), vec![b'a'; 252]].concat();
    let mut ev = path_event(Op::Chmod, [&long, b""]);
    ev.header.flags |= EVENT_PATH_TRUNCATED;
    ev.truncated[0] = true;
    let t = targets(&ev, &[seen(DIR), None], &Fake::new());
    assert!(t.paths.is_empty(), "a cut path is never taken as whole: {t:?}");
    assert_eq!(t.rescan, set(&["/m"]));
    assert!(t.inferred);
    // Seen above the rules: the rule roots below it.
    let long = [b"/other/".to_vec(), vec![b'a'; 248]].concat();
    let mut ev = path_event(Op::Unlink, [&long, b""]);
    ev.truncated[0] = true;
    let above = Some(Seen { key: OTHER_DIR, path: Some(PathBuf::from("/other")) });
    let t = targets(&ev, &[above, None], &Fake::new());
    assert_eq!(t.rescan, set(&["/other/deep/rule"]));
    // The actor gone: the cut path's directory taken lexically.
    let t = targets(&ev, &[None, None], &Fake::new());
    assert_eq!(t.rescan, set(&["/other/deep/rule"]));
    // Nothing monitored below it: nothing to rescan.
    let long = [b"/tmp/".to_vec(), vec![b'a'; 250]].concat();
    let mut ev = path_event(Op::Unlink, [&long, b""]);
    ev.truncated[0] = true;
    assert_eq!(targets(&ev, &[None, None], &Fake::new()).rescan, BTreeSet::new());
}

#[test]
fn an_io_uring_path_operation_asks_for_a_rescan() {
    let mut ev = inode_event(Op::IoUring, InodeKey::default());
    ev.header.flags = EVENT_URING_PATH_OP;
    let t = targets(&ev, &[None, None], &Fake::new());
    assert_eq!(t.full_rescan, Some(RescanReason::IoUring));
    assert!(t.paths.is_empty());
}

#[test]
fn an_exchange_of_an_unmonitored_ancestor_rescans_the_rule_roots_below_it() {
    let mut ev = path_event(Op::Rename, [b"/other", b"/prepared"]);
    ev.header.flags |= EVENT_EXCHANGE;
    // Seen in `/` by its actor, in the watcher's mounts.
    let root = Some(Seen { key: InodeKey { dev: 8, ino: 1 }, path: Some(PathBuf::from("/")) });
    let t = targets(&ev, &[root.clone(), root], &Fake::new());
    assert_eq!(t.reroot, set(&["/other/deep/rule"]));
    assert!(t.paths.is_empty() && t.mount.is_none(), "{t:?}");
    // The actor gone: the absolute path says it. Relative to a known ancestor: the same.
    assert_eq!(targets(&ev, &[None, None], &Fake::new()).reroot, set(&["/other/deep/rule"]));
    let mut rel = path_event(Op::Rmdir, [b"rule", b""]);
    rel.header.start[0] = OTHER_DEEP;
    assert_eq!(targets(&rel, &[None, None], &Fake::new()).reroot, set(&["/other/deep/rule"]));
    // The rule root itself renamed away: it too.
    let t = targets(&path_event(Op::Rename, [b"/m", b"/m.old"]), &[None, None], &Fake::new());
    assert_eq!(t.reroot, set(&["/m"]));
}

#[test]
fn other_ops_on_an_ancestor_or_in_it_do_not_move_a_root() {
    let fake = Fake::new();
    let t = targets(&path_event(Op::Chmod, [b"/other/deep", b""]), &[None, None], &fake);
    assert!(t.reroot.is_empty(), "{t:?}");
    let t = targets(&path_event(Op::Rename, [b"/other/x", b"/other/y"]), &[None, None], &fake);
    assert!(t.reroot.is_empty(), "{t:?}");
}

#[test]
fn a_mount_over_a_monitored_file_names_it_and_rescans_its_directory() {
    let t = targets(&path_event(Op::Mount, [b"/m/conf", b"/srv/evil"]), &[seen(DIR), None], &Fake::new());
    assert_eq!(t.mount, Some(PathBuf::from("/m/conf")));
    assert_eq!(t.paths, set(&["/m/conf"]), "the file itself is rehashed with the mount as its op");
    assert_eq!(t.reroot, set(&["/m"]));
    // Over an ancestor: the roots below. Through a descriptor of the ancestor: the same.
    let t = targets(&path_event(Op::Mount, [b"/other/deep", b"tmpfs"]), &[None, None], &Fake::new());
    assert_eq!((t.mount, t.reroot), (Some(PathBuf::from("/other/deep")), set(&["/other/deep/rule"])));
    let mut by_fd = path_event(Op::MoveMount, [b"", b""]);
    by_fd.header.start[0] = OTHER_DEEP;
    let t = targets(&by_fd, &[None, None], &Fake::new());
    assert_eq!((t.mount, t.reroot), (Some(PathBuf::from("/other/deep")), set(&["/other/deep/rule"])));
    // A mount's source is never its target.
    let t = targets(&path_event(Op::Mount, [b"/srv/x", b"/m/conf"]), &[None, None], &Fake::new());
    assert!(t.mount.is_none() && t.reroot.is_empty(), "{t:?}");
}
