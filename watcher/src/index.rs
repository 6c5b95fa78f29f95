//! The watcher's map of every monitored path, compact by design: a path trie whose nodes
//! are fixed-size [`Entry`]s (parent, name, current inode, record fingerprint, where the
//! signed record is, a few flags), with the lookups a kernel event needs (a path, an inode,
//! a file name, a directory's entries). It holds no records and no content: those stay in
//! the signed baseline and the journal (`state`). A million entries cost about 56 bytes each:
//! the entry, its name, and three sorted `u32` indexes built once at start-up; paths added
//! later go to small hash maps beside them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use kubefim_baseline::record::FileKind;
use kubefim_common::{InodeKey, name_hash};
use rayon::slice::ParallelSliceMut;

/// An entry's number.
pub(crate) type Id = u32;

/// The root directory, `/`.
pub(crate) const ROOT: Id = 0;

/// No entry (the root's parent, a record that is not in the signed baseline).
const NONE: u32 = u32::MAX;

/// The path exists now (as far as the watcher knows).
pub(crate) const EXISTS: u8 = 1;
/// The signed baseline has a record of the path (`loc` says where).
pub(crate) const SIGNED: u8 = 1 << 1;
/// The journal holds the path's current state: it differs from the signed baseline's.
pub(crate) const OBSERVED: u8 = 1 << 2;
/// Observed, signed and existing, and a monitored attribute differs from the signed record.
pub(crate) const MODIFIED: u8 = 1 << 3;

/// One path the watcher knows: monitored (with a record, signed or observed), or a
/// directory above a rule's root that only holds the trie together.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    /// The inode of its current record.
    pub key: InodeKey,
    /// [`FileRecord::fingerprint`](kubefim_baseline::record::FileRecord::fingerprint) of
    /// its current record, 0 when there is none.
    pub fingerprint: u64,
    parent: Id,
    name_at: u32,
    /// Where its signed record is ([`RecordLoc`](kubefim_baseline::record::RecordLoc) bits).
    pub loc: u32,
    name_len: u16,
    is_dir: bool,
    flags: u8,
}

impl Entry {
    /// Whether every bit of `flags` is set.
    pub fn has(&self, flags: u8) -> bool {
        self.flags & flags == flags
    }

    /// Whether its current record is a directory.
    pub fn is_dir(&self) -> bool {
        self.is_dir && self.has(EXISTS)
    }
}

/// Paths, their inodes and names; see the module documentation.
pub(crate) struct Index {
    entries: Vec<Entry>,
    names: Vec<u8>,
    /// Ids below this are in the sorted indexes.
    sorted_len: u32,
    /// Ids `< sorted_len`, by (parent, name).
    by_child: Vec<Id>,
    /// Where each sorted entry's children start in `by_child` (one more than there are
    /// sorted entries): the children of `p` are `by_child[child_at[p]..child_at[p + 1]]`, so
    /// a lookup searches one directory, not the whole tree.
    child_at: Vec<u32>,
    /// Ids `< sorted_len`, by the inode they had when the index was built.
    by_inode: Vec<Id>,
    /// Ids `< sorted_len`, by name.
    by_name: Vec<Id>,
    /// What the sorted indexes do not hold: entries added since, inodes changed since.
    added_child: HashMap<(Id, Box<[u8]>), Id>,
    added_children: HashMap<Id, Vec<Id>>,
    added_inode: HashMap<InodeKey, Vec<Id>>,
    added_name: HashMap<u64, Vec<Id>>,
    /// Added entries no longer needed, to reuse.
    free: Vec<Id>,
}

/// The components of an absolute path, without empty ones.
fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

impl Index {
    /// An index holding only `/`.
    pub fn new() -> Index {
        let root = Entry {
            key: InodeKey::default(),
            fingerprint: 0,
            parent: NONE,
            name_at: 0,
            loc: NONE,
            name_len: 0,
            is_dir: true,
            flags: 0,
        };
        Index {
            entries: vec![root],
            names: Vec::new(),
            sorted_len: 0,
            by_child: Vec::new(),
            child_at: Vec::new(),
            by_inode: Vec::new(),
            by_name: Vec::new(),
            added_child: HashMap::new(),
            added_children: HashMap::new(),
            added_inode: HashMap::new(),
            added_name: HashMap::new(),
            free: Vec::new(),
        }
    }

    /// The entry `id`.
    pub fn entry(&self, id: Id) -> &Entry {
        &self.entries[id as usize]
    }

    /// How many entries there are (including `/` and the directories above rule roots).
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// The file name of `id`.
    pub fn name(&self, id: Id) -> &[u8] {
        let e = &self.entries[id as usize];
        &self.names[e.name_at as usize..e.name_at as usize + usize::from(e.name_len)]
    }

    /// The absolute path of `id`.
    pub fn path(&self, id: Id) -> PathBuf {
        let mut chain = Vec::new();
        let mut at = id;
        while at != ROOT {
            chain.push(at);
            at = self.entries[at as usize].parent;
        }
        let mut out = Vec::with_capacity(chain.len() * 16 + 1);
        for id in chain.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(self.name(*id));
        }
        if out.is_empty() {
            out.push(b'/');
        }
        PathBuf::from(OsStr::from_bytes(&out))
    }

    /// The sorted children of `parent`.
    fn sorted_children(&self, parent: Id) -> &[Id] {
        match (self.child_at.get(parent as usize), self.child_at.get(parent as usize + 1)) {
            (Some(&start), Some(&end)) => &self.by_child[start as usize..end as usize],
            _ => &[],
        }
    }

    /// The child of `parent` named `name`.
    pub fn child(&self, parent: Id, name: &[u8]) -> Option<Id> {
        let sorted = self.sorted_children(parent);
        match sorted.binary_search_by(|&id| self.name(id).cmp(name)) {
            Ok(at) => Some(sorted[at]),
            Err(_) if self.added_child.is_empty() => None,
            Err(_) => self.added_child.get(&(parent, Box::from(name))).copied(),
        }
    }

    /// The entry of an absolute path, if the index has one.
    pub fn lookup(&self, path: &Path) -> Option<Id> {
        components(path.as_os_str().as_bytes()).try_fold(ROOT, |at, name| self.child(at, name))
    }

    /// The entry of an absolute path, made (with its missing parents) if needed.
    pub fn lookup_or_insert(&mut self, path: &Path) -> Id {
        let mut at = ROOT;
        for name in components(path.as_os_str().as_bytes()) {
            at = match self.child(at, name) {
                Some(id) => id,
                None => self.insert_child(at, name),
            };
        }
        at
    }

    /// A new entry named `name` in `parent`, with its name stored (not yet in any index).
    fn new_entry(&mut self, parent: Id, name: &[u8]) -> Entry {
        let name_at = u32::try_from(self.names.len()).expect("names under 4 GiB");
        self.names.extend_from_slice(name);
        Entry {
            key: InodeKey::default(),
            fingerprint: 0,
            parent,
            name_at,
            loc: NONE,
            // File names are at most 255 bytes (NAME_MAX).
            name_len: u16::try_from(name.len()).unwrap_or(u16::MAX),
            is_dir: false,
            flags: 0,
        }
    }

    fn insert_child(&mut self, parent: Id, name: &[u8]) -> Id {
        let entry = self.new_entry(parent, name);
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = entry;
                id
            }
            None => {
                self.entries.push(entry);
                Id::try_from(self.entries.len() - 1).expect("fewer than 2^32 entries")
            }
        };
        self.added_child.insert((parent, Box::from(name)), id);
        self.added_children.entry(parent).or_default().push(id);
        self.added_name.entry(name_hash(name)).or_default().push(id);
        id
    }

    /// Sets what the index knows of `id`'s current record: `None` when the path is gone.
    pub fn set_current(&mut self, id: Id, now: Option<(InodeKey, FileKind, u64)>) {
        let e = &mut self.entries[id as usize];
        let old_key = e.key;
        match now {
            Some((key, kind, fingerprint)) => {
                e.key = key;
                e.is_dir = kind == FileKind::Dir;
                e.fingerprint = fingerprint;
                e.flags |= EXISTS;
            }
            None => {
                e.fingerprint = 0;
                e.flags &= !EXISTS;
            }
        }
        let new_key = e.key;
        if new_key != old_key {
            if let Some(ids) = self.added_inode.get_mut(&old_key) {
                ids.retain(|&i| i != id);
                if ids.is_empty() {
                    self.added_inode.remove(&old_key);
                }
            }
            let in_sorted = id < self.sorted_len && self.sorted_inode_has(new_key, id);
            if !in_sorted {
                self.added_inode.entry(new_key).or_default().push(id);
            }
        }
    }

    /// Sets or clears flags of `id` (not [`EXISTS`]: that is [`Index::set_current`]'s).
    pub fn set_flags(&mut self, id: Id, flags: u8, on: bool) {
        let e = &mut self.entries[id as usize];
        if on {
            e.flags |= flags;
        } else {
            e.flags &= !flags;
        }
    }

    /// Records where the signed record of `id` is.
    pub fn set_signed(&mut self, id: Id, loc: u32) {
        let e = &mut self.entries[id as usize];
        e.loc = loc;
        e.flags |= SIGNED;
    }

    /// Forgets an added entry that no longer means anything (not signed, not existing, not
    /// observed, no children): a storm of temporary files must not grow the index for good.
    pub fn release(&mut self, id: Id) {
        let e = self.entries[id as usize];
        if id < self.sorted_len || e.flags != 0 || self.children(id).next().is_some() {
            return;
        }
        let name: Box<[u8]> = Box::from(self.name(id));
        self.added_child.remove(&(e.parent, name.clone()));
        if let Some(ids) = self.added_children.get_mut(&e.parent) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.added_children.remove(&e.parent);
            }
        }
        let hash = name_hash(&name);
        if let Some(ids) = self.added_name.get_mut(&hash) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.added_name.remove(&hash);
            }
        }
        if let Some(ids) = self.added_inode.get_mut(&e.key) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.added_inode.remove(&e.key);
            }
        }
        self.entries[id as usize].flags = 0;
        self.free.push(id);
    }

    fn sorted_inode_range(&self, key: InodeKey) -> &[Id] {
        let start = self.by_inode.partition_point(|&id| self.entries[id as usize].key < key);
        let len = self.by_inode[start..].partition_point(|&id| self.entries[id as usize].key == key);
        &self.by_inode[start..start + len]
    }

    fn sorted_inode_has(&self, key: InodeKey, id: Id) -> bool {
        // The sorted index is ordered by the keys entries had when it was built; an entry
        // whose key changed and changed back is found there again.
        self.sorted_inode_range(key).contains(&id)
    }

    /// Existing entries whose current inode is `key`.
    pub fn ids_of_inode(&self, key: InodeKey) -> Vec<Id> {
        let mut out: Vec<Id> = self.sorted_inode_range(key).to_vec();
        if let Some(ids) = self.added_inode.get(&key) {
            for id in ids {
                if !out.contains(id) {
                    out.push(*id);
                }
            }
        }
        out.retain(|&id| {
            let e = &self.entries[id as usize];
            e.key == key && e.has(EXISTS)
        });
        out
    }

    /// Existing entries named `name`.
    pub fn ids_named(&self, name: &[u8]) -> Vec<Id> {
        let start = self.by_name.partition_point(|&id| self.name(id) < name);
        let len = self.by_name[start..].partition_point(|&id| self.name(id) == name);
        let mut out: Vec<Id> = self.by_name[start..start + len].to_vec();
        if let Some(ids) = self.added_name.get(&name_hash(name)) {
            out.extend(ids.iter().filter(|&&id| self.name(id) == name));
        }
        out.retain(|&id| self.entries[id as usize].has(EXISTS));
        out
    }

    /// The entries directly inside `id` (existing or not).
    pub fn children(&self, id: Id) -> impl Iterator<Item = Id> + '_ {
        let added = self.added_children.get(&id).map(Vec::as_slice).unwrap_or_default();
        self.sorted_children(id).iter().chain(added).copied()
    }

    /// Every entry with all of `flags`, with its id.
    pub fn with_flags(&self, flags: u8) -> impl Iterator<Item = (Id, &Entry)> + '_ {
        self.entries
            .iter()
            .enumerate()
            .filter(move |(_, e)| e.has(flags))
            .filter_map(|(i, e)| Some((Id::try_from(i).ok()?, e)))
    }

    /// Ids of the entries that existed when the index was built, in inode order: hard links
    /// are adjacent, so the kernel filter fill sends each inode once.
    pub fn sorted_by_inode(&self) -> &[Id] {
        &self.by_inode
    }

    /// How many existing entries and distinct names of existing entries there are: what the
    /// kernel filter needs room for.
    pub fn filter_sizes(&self) -> (usize, usize) {
        let (mut entries, mut names) = (0, 0);
        let mut last: Option<&[u8]> = None;
        for &id in &self.by_name {
            if !self.entries[id as usize].has(EXISTS) {
                continue;
            }
            entries += 1;
            let name = self.name(id);
            if last != Some(name) {
                names += 1;
                last = Some(name);
            }
        }
        (entries, names)
    }

    /// Ids, for the kernel filter fill, of existing entries in name order: equal names are
    /// adjacent, so each name is sent to the kernel once.
    pub fn sorted_by_name(&self) -> &[Id] {
        &self.by_name
    }

    /// Appends an entry without indexing it (the builder's; [`Index::seal`] indexes).
    fn push(&mut self, parent: Id, name: &[u8]) -> Id {
        let entry = self.new_entry(parent, name);
        self.entries.push(entry);
        Id::try_from(self.entries.len() - 1).expect("fewer than 2^32 entries")
    }

    /// Builds the sorted indexes over every entry made so far (called once, after the
    /// baseline's records are in). Sorting runs on every core.
    fn seal(&mut self) {
        let n = u32::try_from(self.entries.len()).expect("fewer than 2^32 entries");
        let all: Vec<Id> = (0..n).collect();
        let (entries, names) = (&self.entries, &self.names);
        let name = |id: Id| {
            let e = &entries[id as usize];
            &names[e.name_at as usize..e.name_at as usize + usize::from(e.name_len)]
        };
        let mut by_child = all.clone();
        by_child.par_sort_unstable_by(|&a, &b| {
            let (ea, eb) = (&entries[a as usize], &entries[b as usize]);
            ea.parent.cmp(&eb.parent).then_with(|| name(a).cmp(name(b)))
        });
        let mut by_inode: Vec<Id> = all.iter().copied().filter(|&id| entries[id as usize].has(EXISTS)).collect();
        by_inode.par_sort_unstable_by_key(|&id| entries[id as usize].key);
        let mut by_name: Vec<Id> = all.into_iter().filter(|&id| id != ROOT).collect();
        by_name.par_sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
        // Sorted by parent, `/` (whose parent is NONE) last: count each parent's children.
        let mut child_at = vec![0u32; n as usize + 1];
        for &id in &by_child {
            let parent = entries[id as usize].parent;
            if parent != NONE {
                child_at[parent as usize + 1] += 1;
            }
        }
        for i in 1..child_at.len() {
            child_at[i] += child_at[i - 1];
        }
        self.by_child = by_child;
        self.child_at = child_at;
        self.by_inode = by_inode;
        self.by_name = by_name;
        self.sorted_len = n;
        self.added_child = HashMap::new();
        self.added_children = HashMap::new();
        self.added_inode = HashMap::new();
        self.added_name = HashMap::new();
        self.entries.shrink_to_fit();
        self.names.shrink_to_fit();
    }

    /// The entry of an absolute path, with a one-directory memory for callers that look up
    /// many entries of the same directory in a row (a rescan's batches come in walk order).
    pub fn lookup_near(&self, path: &Path, last_dir: &mut Option<(PathBuf, Option<Id>)>) -> Option<Id> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else { return self.lookup(path) };
        let dir = match last_dir {
            Some((p, id)) if p == parent => *id,
            _ => {
                let id = self.lookup(parent);
                *last_dir = Some((parent.to_owned(), id));
                id
            }
        };
        self.child(dir?, name.as_bytes())
    }
}

/// Builds an [`Index`] from paths in any order (a baseline's records come in walk order,
/// a child now and then before its directory). Only directories are remembered by path, to
/// find the parent of what follows; everything is indexed once, in [`IndexBuilder::finish`].
pub(crate) struct IndexBuilder {
    index: Index,
    dirs: HashMap<Box<[u8]>, Id>,
}

impl IndexBuilder {
    /// A builder holding only `/`.
    pub fn new() -> IndexBuilder {
        IndexBuilder { index: Index::new(), dirs: HashMap::new() }
    }

    /// The entry of the absolute path `path` (made, with its missing parents, if needed).
    pub fn entry_for(&mut self, path: &[u8], is_dir: bool) -> Id {
        let path = match path.iter().rposition(|&b| b != b'/') {
            Some(end) => &path[..=end],
            None => return ROOT,
        };
        if let Some(&id) = self.dirs.get(path) {
            return id;
        }
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&b""[..], path),
        };
        let parent = self.entry_for(parent, true);
        let id = self.index.push(parent, name);
        if is_dir {
            self.dirs.insert(path.into(), id);
        }
        id
    }

    /// Sets what is known of an entry (indexed by [`IndexBuilder::finish`]).
    pub fn set(&mut self, id: Id, now: Option<(InodeKey, FileKind, u64)>, flags: u8) {
        let e = &mut self.index.entries[id as usize];
        e.flags = flags & !EXISTS;
        if let Some((key, kind, fingerprint)) = now {
            e.key = key;
            e.is_dir = kind == FileKind::Dir;
            e.fingerprint = fingerprint;
            e.flags |= EXISTS;
        }
    }

    /// Records where the signed record of an entry is.
    pub fn set_signed(&mut self, id: Id, loc: u32) {
        self.index.set_signed(id, loc);
    }

    /// The finished index, sorted.
    pub fn finish(self) -> Index {
        let mut index = self.index;
        index.seal();
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ino: u64) -> InodeKey {
        InodeKey { dev: 8, ino }
    }

    fn build(paths: &[(&str, u64, FileKind)]) -> Index {
        let mut builder = IndexBuilder::new();
        for (path, ino, kind) in paths {
            let id = builder.entry_for(path.as_bytes(), *kind == FileKind::Dir);
            builder.set(id, Some((key(*ino), *kind, *ino)), 0);
        }
        builder.finish()
    }

    #[test]
    fn finds_paths_inodes_names_and_children_before_and_after_changes() {
        use FileKind::{Dir, File};
        let mut index = build(&[
            ("/etc", 1, Dir),
            ("/etc/passwd", 2, File),
            ("/etc/ssh", 3, Dir),
            ("/etc/ssh/sshd_config", 4, File),
            ("/usr/bin/passwd", 5, File),
        ]);
        let passwd = index.lookup(Path::new("/etc/passwd")).unwrap();
        assert_eq!(index.path(passwd), Path::new("/etc/passwd"));
        assert_eq!(index.ids_of_inode(key(2)), [passwd]);
        assert_eq!(index.ids_named(b"passwd").len(), 2);
        let etc = index.lookup(Path::new("/etc")).unwrap();
        let names: Vec<&[u8]> = index.children(etc).map(|c| index.name(c)).collect();
        assert_eq!(names, [&b"passwd"[..], b"ssh"]);
        // `/usr` and `/usr/bin` hold the trie together; they are not monitored.
        let usr = index.lookup(Path::new("/usr")).unwrap();
        assert!(!index.entry(usr).has(EXISTS));

        // A new file, a replaced inode, a removed file.
        let new = index.lookup_or_insert(Path::new("/etc/new"));
        index.set_current(new, Some((key(9), File, 9)));
        index.set_current(passwd, Some((key(7), File, 7)));
        let ssh = index.lookup(Path::new("/etc/ssh/sshd_config")).unwrap();
        index.set_current(ssh, None);
        assert_eq!(index.lookup(Path::new("/etc/new")), Some(new));
        assert_eq!(index.ids_of_inode(key(9)), [new]);
        assert_eq!(index.ids_of_inode(key(7)), [passwd]);
        assert!(index.ids_of_inode(key(2)).is_empty(), "the old inode is no longer the path's");
        assert!(index.ids_of_inode(key(4)).is_empty(), "a removed path has no inode");
        assert_eq!(index.children(etc).count(), 3);
        assert_eq!(index.ids_named(b"new"), [new]);
        // Back to the inode it was built with: found through the sorted index again.
        index.set_current(passwd, Some((key(2), File, 2)));
        assert_eq!(index.ids_of_inode(key(2)), [passwd]);
        assert!(index.ids_of_inode(key(7)).is_empty());

        // An added path that is gone again is released and its id reused.
        index.set_current(new, None);
        index.release(new);
        assert_eq!(index.lookup(Path::new("/etc/new")), None);
        assert_eq!(index.children(etc).count(), 2);
        let again = index.lookup_or_insert(Path::new("/etc/other"));
        assert_eq!(again, new, "the released id is reused");
        assert_eq!(index.path(again), Path::new("/etc/other"));
    }

    #[test]
    fn a_child_before_its_directory_gets_one_entry_for_both() {
        use FileKind::{Dir, File};
        let index = build(&[("/t/d/f", 3, File), ("/t", 1, Dir), ("/t/d", 2, Dir), ("/t/d/g", 4, File)]);
        let d = index.lookup(Path::new("/t/d")).unwrap();
        assert_eq!(index.children(d).count(), 2);
        assert!(index.entry(d).is_dir());
        assert_eq!(index.len(), 5, "/, /t, /t/d and two files");
    }

    #[test]
    fn non_utf8_names_and_the_root() {
        let mut index = build(&[("/t/\u{e9}", 1, FileKind::File)]);
        let raw = PathBuf::from(OsStr::from_bytes(b"/t/bad\xff"));
        let id = index.lookup_or_insert(&raw);
        assert_eq!(index.path(id), raw);
        assert_eq!(index.path(ROOT), Path::new("/"));
        assert_eq!(index.lookup(Path::new("/")), Some(ROOT));
        assert_eq!(index.children(index.lookup(Path::new("/t")).unwrap()).count(), 2);
    }
}
