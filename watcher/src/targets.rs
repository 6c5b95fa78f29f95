//! From one kernel event to what it may have changed: the monitored paths to rehash, the
//! directories whose entries to compare, a new inode whose name is still to be found, or
//! what to rescan. A pure function of the event, of what the actor's paths named when the
//! reader looked (`resolve`), and of what the watcher knows ([`View`]): no I/O, so it is
//! tested on made-up events.
//!
//! Inode events name a watched (device, inode) and map through the index. Path events were
//! looked at in the actor's own root and cwd; when the actor was already gone, the kernel's
//! start-directory inode and the monitored names stand in, and the result is marked
//! inferred (it may hold more candidates than the one changed: a rehash each, never a miss).
//! A path too long to be sent whole names a subtree, which is rescanned. A rename, removal or
//! mount at or above a rule root, or a mount inside a monitored tree, names the subtrees whose
//! paths may now lead to other inodes (`ancestors::affected`), which are rescanned and refilled.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use kubefim_baseline::policy::Policy;
use kubefim_common::{EVENT_EXCHANGE, EVENT_HAS_PARENT, EVENT_URING_PATH_OP, InodeKey, Op};

use crate::ancestors::affected;
use crate::event::KernelEvent;
use crate::model::RescanReason;
use crate::resolve::{Seen, dir_part, split};

/// What the mapping needs to know of the watcher's state.
pub(crate) trait View {
    /// The policy.
    fn policy(&self) -> &Policy;
    /// The known directory with this inode.
    fn dir_of_inode(&self, key: InodeKey) -> Option<PathBuf>;
    /// Known paths whose current inode is `key`.
    fn paths_of_inode(&self, key: InodeKey) -> Vec<PathBuf>;
    /// Known paths with this file name.
    fn paths_named(&self, name: &[u8]) -> Vec<PathBuf>;
    /// Whether the path is a known directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// The directory a new inode whose name is not known yet was created in.
    fn unnamed_dir(&self, key: InodeKey) -> Option<PathBuf>;
    /// The rule roots' ancestor with this inode now.
    fn ancestor_of_inode(&self, key: InodeKey) -> Option<PathBuf>;
}

/// What one event may have changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Targets {
    /// Monitored paths the event acted on (directories whose entries changed included).
    pub paths: BTreeSet<PathBuf>,
    /// Monitored directories whose entries changed.
    pub dirs: BTreeSet<PathBuf>,
    /// For an inode event: the inode the paths must still have (an unlinked inode's number
    /// can be reused at once, anywhere on the file system).
    pub inode: Option<InodeKey>,
    /// A new inode no known path has, with the directory it was created in.
    pub unnamed: Option<(InodeKey, PathBuf)>,
    /// Subtrees to rescan: a path too long to be sent whole.
    pub rescan: BTreeSet<PathBuf>,
    /// A rescan of everything (an io_uring path operation: no event shows its paths).
    pub full_rescan: Option<RescanReason>,
    /// The paths were inferred, not resolved as the actor saw them.
    pub inferred: bool,
    /// A file renamed from the first path to the second.
    pub renamed: Option<(PathBuf, PathBuf)>,
    /// Subtrees whose paths may lead to other inodes now: a rename, removal or mount at or
    /// above their rule root, or a mount in them. Rescanned once the op has had time to
    /// complete, and the kernel filter refilled with what they hold then.
    pub reroot: BTreeSet<PathBuf>,
    /// A mount's target, as the policy names paths, when it touches a monitored path.
    pub mount: Option<PathBuf>,
}

impl Targets {
    /// Marks `dir` changed and due for an entry comparison, if monitored.
    fn mark_dir(&mut self, policy: &Policy, dir: &Path) {
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

    /// The monitored files (not directories whose entries changed) among the paths.
    fn files(&self) -> Vec<PathBuf> {
        self.paths.difference(&self.dirs).cloned().collect()
    }

    fn extend(&mut self, other: Targets) {
        self.paths.extend(other.paths);
        self.dirs.extend(other.dirs);
        self.rescan.extend(other.rescan);
        self.inferred |= other.inferred;
    }
}

/// Whether a rule covers `path` and does not exclude it.
pub(crate) fn covered(policy: &Policy, path: &Path) -> bool {
    policy.rule_index_for(path).is_some_and(|i| !policy.rules[i].excludes(path))
}

/// How a path event's op touches its path's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The op changes the entry only (chmod, chown, xattrs, utimes, truncate).
    Entry,
    /// The op adds, removes or renames an entry: the directory changes too.
    Namespace,
}

/// What `ev` may have changed; `seen[i]` is what path `i` named when the reader looked.
pub(crate) fn targets(ev: &KernelEvent, seen: &[Option<Seen>; 2], view: &dyn View) -> Targets {
    let policy = view.policy();
    let mut t = Targets::default();
    match ev.op {
        Op::IoUring if ev.header.flags & EVENT_URING_PATH_OP != 0 => t.full_rescan = Some(RescanReason::IoUring),
        Op::Create => {
            if ev.header.flags & EVENT_HAS_PARENT != 0
                && let Some(dir) = view.dir_of_inode(ev.header.parent)
                && covered(policy, &dir)
            {
                t.mark_dir(policy, &dir);
                if let Some(key) = ev.target() {
                    t.unnamed = Some((key, dir));
                }
            }
        }
        _ if ev.paths.is_empty() => {
            if let Some(key) = ev.target() {
                // What the index knows exists is covered: it was recorded under the policy.
                t.paths.extend(view.paths_of_inode(key));
                if !t.paths.is_empty() {
                    t.inode = Some(key);
                } else if let Some(dir) = view.unnamed_dir(key) {
                    t.unnamed = Some((key, dir));
                }
            }
        }
        _ => path_event(ev, seen, view, &mut t),
    }
    t
}

fn path_event(ev: &KernelEvent, seen: &[Option<Seen>; 2], view: &dyn View, t: &mut Targets) {
    let policy = view.policy();
    let scope = match ev.op {
        Op::Rename | Op::Unlink | Op::Rmdir | Op::Link | Op::Symlink | Op::Mkdir | Op::Mknod => Scope::Namespace,
        _ => Scope::Entry,
    };
    let mut slots: Vec<Targets> = Vec::new();
    for (i, path) in ev.paths.iter().enumerate() {
        let mut slot = Targets::default();
        // A mount's second path is its source: mounting a monitored file elsewhere changes
        // nothing of it.
        let source = ev.op.is_mount() && i == 1;
        if !path.is_empty() && !source {
            let start = ev.header.start[i];
            if ev.truncated[i] {
                cut_path(view, start, path, seen[i].as_ref(), &mut slot);
            } else {
                match &seen[i] {
                    Some(s) => resolved(view, s, split(path).1, scope, &mut slot),
                    None => gone(view, start, path, scope, &mut slot),
                }
            }
        }
        slots.push(slot);
    }
    if ev.op == Op::Rename && slots.len() == 2 {
        // A destination no name could place (the actor gone, a new name): in the same
        // directory as the source when the paths say so.
        let same_parent = |a: &[u8], b: &[u8]| {
            let parent = |p: &[u8]| p.iter().rposition(|&c| c == b'/').map(|i| p[..i].to_vec());
            parent(a) == parent(b)
        };
        if slots[1].files().is_empty()
            && same_parent(&ev.paths[0], &ev.paths[1])
            && let [from] = slots[0].files().as_slice()
            && let (Some(dir), Some(name)) = (from.parent(), Path::new(OsStr::from_bytes(&ev.paths[1])).file_name())
        {
            let to = dir.join(name);
            if covered(policy, &to) {
                slots[1].paths.insert(to);
                slots[1].inferred = true;
            }
        }
        if ev.header.flags & EVENT_EXCHANGE == 0
            && let ([from], [to]) = (slots[0].files().as_slice(), slots[1].files().as_slice())
        {
            t.renamed = Some((from.clone(), to.clone()));
        }
    }
    for slot in slots {
        t.extend(slot);
    }
    moved(ev, seen, view, t);
}

/// A rename, removal or mount at, above or below monitored paths: the subtrees whose paths
/// may lead elsewhere now, and a mount's target. Only a mount's first path (its target)
/// counts; its second is the source. A cut path is rescanned by `cut_path` already.
fn moved(ev: &KernelEvent, seen: &[Option<Seen>; 2], view: &dyn View, t: &mut Targets) {
    let mount = ev.op.is_mount();
    if !mount && !matches!(ev.op, Op::Rename | Op::Unlink | Op::Rmdir) {
        return;
    }
    let policy = view.policy();
    let slots = if mount { 1 } else { 2 };
    for (i, seen) in seen.iter().enumerate().take(slots.min(ev.paths.len())) {
        if ev.truncated[i] {
            continue;
        }
        let Some(path) = placed(view, ev, seen.as_ref(), i) else { continue };
        let scope = affected(policy, &path, mount && covered(policy, &path));
        if scope.is_empty() {
            continue;
        }
        if mount && t.mount.is_none() {
            t.mount = Some(path);
        }
        t.reroot.extend(scope);
    }
}

/// Where path `i` of a path event is, as the policy names paths: the directory it was seen in
/// (for an actor already gone, what the path and the start directory the kernel recorded
/// say), joined with its last component. An empty path is its descriptor's inode (a mount
/// through a descriptor).
fn placed(view: &dyn View, ev: &KernelEvent, seen: Option<&Seen>, i: usize) -> Option<PathBuf> {
    let path = &ev.paths[i];
    let known_dir = |key: InodeKey| view.dir_of_inode(key).or_else(|| view.ancestor_of_inode(key));
    let start = ev.header.start[i];
    if path.is_empty() {
        return known_dir(start).or_else(|| view.paths_of_inode(start).into_iter().next());
    }
    let (parent, name) = split(path);
    let parent = Path::new(OsStr::from_bytes(parent));
    let dir = match seen {
        Some(s) => known_dir(s.key).or_else(|| s.path.clone())?,
        None if path.first() == Some(&b'/') => parent.to_owned(),
        None => known_dir(start)?.join(parent),
    };
    lexical(&dir.join(OsStr::from_bytes(name)))
}

/// A path looked at as its actor saw it: exactly what it names. If its directory is not a
/// monitored one, the path is not monitored, whatever names match.
fn resolved(view: &dyn View, seen: &Seen, name: &[u8], scope: Scope, out: &mut Targets) {
    let policy = view.policy();
    if let Some(dir) = view.dir_of_inode(seen.key) {
        into(out, policy, &dir, name, scope);
    } else if let Some(dir) = &seen.path {
        // A rule whose root is a file in an unmonitored directory: the directory as the
        // watcher sees it, which is the actor's view when they share mounts.
        into(out, policy, dir, name, scope);
    }
}

/// A path whose actor was gone before it could be looked at: what the kernel recorded (the
/// start directory's inode) and the monitored names stand in.
fn gone(view: &dyn View, start: InodeKey, path: &[u8], scope: Scope, out: &mut Targets) {
    let policy = view.policy();
    out.inferred = true;
    let absolute = path.first() == Some(&b'/');
    let (parent, name) = split(path);
    if !absolute {
        // `name` or `./name`: directly in the start directory.
        let single = parent.is_empty() || parent == b".";
        match view.dir_of_inode(start) {
            Some(dir) => {
                if let Some(p) = lexical(&dir.join(Path::new(OsStr::from_bytes(path)))) {
                    let parent = p.parent().map(Path::to_owned);
                    out.add(policy, p);
                    if let (Scope::Namespace, Some(parent)) = (scope, parent) {
                        out.mark_dir(policy, &parent);
                    }
                }
                return;
            }
            // A name directly in a directory the kernel saw and the watcher does not know:
            // not monitored, whatever names match.
            None if single && start != InodeKey::default() => return,
            None => {}
        }
    }
    if absolute && let Some(p) = lexical(Path::new(OsStr::from_bytes(path))) {
        out.add(policy, p);
    }
    if !name.is_empty() {
        for p in view.paths_named(name) {
            if let (Scope::Namespace, Some(parent)) = (scope, p.parent()) {
                out.mark_dir(policy, parent);
            }
            out.add(policy, p);
        }
    }
    if let Some(parent_name) = Path::new(OsStr::from_bytes(parent)).file_name() {
        for dir in view.paths_named(parent_name.as_bytes()) {
            if view.is_dir(&dir) {
                into(out, policy, &dir, OsStr::from_bytes(name).as_bytes(), scope);
            }
        }
    }
}

/// A path cut at [`PATH_CAP`](kubefim_common::PATH_CAP) bytes: its last whole directory is
/// known (as the actor saw it, or inferred), what follows is not. Everything monitored
/// below that directory is rescanned: never the cut path taken as whole. (A symbolic link in
/// the unseen part may lead elsewhere; the interval rescan is the backstop for that.)
fn cut_path(view: &dyn View, start: InodeKey, path: &[u8], seen: Option<&Seen>, out: &mut Targets) {
    let policy = view.policy();
    out.inferred = true;
    let dir = Path::new(OsStr::from_bytes(dir_part(path, true)));
    let place = match seen {
        Some(s) => view.dir_of_inode(s.key).or_else(|| s.path.clone()),
        None if path.first() == Some(&b'/') => lexical(dir),
        None => view.dir_of_inode(start).and_then(|d| lexical(&d.join(dir))),
    };
    let Some(place) = place else { return };
    if covered(policy, &place) {
        out.rescan.insert(place);
    } else {
        // Above the rules: the rule roots below it.
        out.rescan.extend(policy.rules.iter().filter(|r| r.path.starts_with(&place)).map(|r| r.path.clone()));
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
fn into(out: &mut Targets, policy: &Policy, dir: &Path, name: &[u8], scope: Scope) {
    if name.is_empty() {
        out.add(policy, dir.to_owned());
        return;
    }
    let name = Path::new(OsStr::from_bytes(name));
    if name.components().any(|c| !matches!(c, Component::Normal(_))) {
        return;
    }
    out.add(policy, dir.join(name));
    if scope == Scope::Namespace {
        out.mark_dir(policy, dir);
    }
}

#[cfg(test)]
mod tests;
