//! The in-kernel filter as user space keeps it: which inodes the programs watch (`WATCHED`,
//! with a directory's entries watched too) and which file names a path event must carry to
//! be sent (`NAMES`). Filled once from the state at start, then kept in step with every
//! rehash; it counts what it holds, so `kubefim_watched_inodes` is what the map holds, and
//! says once when a map is full (changes beyond it are then found by rescans only).

use aya::maps::{HashMap as BpfHashMap, MapData};
use kubefim_common::{InodeKey, WATCH_DIR, WATCH_FILE, name_hash};

use crate::index::{EXISTS, Index};

/// The `WATCHED` and `NAMES` maps.
pub(crate) struct KernelFilter {
    watched: BpfHashMap<MapData, InodeKey, u32>,
    names: BpfHashMap<MapData, u64, u8>,
    capacity: u32,
    inodes: u64,
    full: bool,
    full_reported: bool,
}

fn bits(is_dir: bool) -> u32 {
    if is_dir { WATCH_FILE | WATCH_DIR } else { WATCH_FILE }
}

impl KernelFilter {
    pub(crate) fn new(
        watched: BpfHashMap<MapData, InodeKey, u32>,
        names: BpfHashMap<MapData, u64, u8>,
        capacity: u32,
    ) -> Self {
        KernelFilter { watched, names, capacity, inodes: 0, full: false, full_reported: false }
    }

    /// Puts every existing entry of `index` in the maps, and the names of `roots` (rule roots
    /// that may not exist yet: their creation by path must pass the name filter). Each inode
    /// and each name is sent once.
    pub fn fill<'a>(&mut self, index: &Index, roots: impl IntoIterator<Item = &'a [u8]>) {
        let mut ok = true;
        let sorted = index.sorted_by_inode();
        let mut at = 0;
        while at < sorted.len() {
            let key = index.entry(sorted[at]).key;
            let mut b = 0;
            while at < sorted.len() && index.entry(sorted[at]).key == key {
                let e = index.entry(sorted[at]);
                if e.has(EXISTS) {
                    b |= bits(e.is_dir());
                }
                at += 1;
            }
            if b != 0 {
                ok &= self.insert(key, b);
            }
        }
        let mut last: Option<&[u8]> = None;
        for &id in index.sorted_by_name() {
            let name = index.name(id);
            if last == Some(name) || !index.entry(id).has(EXISTS) {
                continue;
            }
            last = Some(name);
            ok &= self.names.insert(name_hash(name), 1, 0).is_ok();
        }
        for name in roots {
            ok &= self.names.insert(name_hash(name), 1, 0).is_ok();
        }
        if !ok {
            self.full = true;
        }
    }

    fn insert(&mut self, key: InodeKey, bits: u32) -> bool {
        let ok = self.watched.insert(key, bits, 0).is_ok();
        if ok {
            self.inodes += 1;
        }
        ok
    }

    /// Watches an entry's inode (a directory's entries too) and its name. False when a map
    /// is full.
    pub fn watch(&mut self, key: InodeKey, is_dir: bool, name: &[u8]) -> bool {
        let want = bits(is_dir);
        let now = self.watched.get(&key, 0).ok();
        let inode = match now {
            Some(b) if b | want == b => true,
            Some(b) => self.watched.insert(key, b | want, 0).is_ok(),
            None => self.insert(key, want),
        };
        // Both, even when the first fails: the name filter still helps.
        let named = name.is_empty() || self.names.insert(name_hash(name), 1, 0).is_ok();
        let ok = inode && named;
        if !ok {
            self.full = true;
        }
        ok
    }

    /// The kernel started watching a new inode itself (a file created in a watched
    /// directory).
    pub fn watched_by_kernel(&mut self) {
        self.inodes += 1;
    }

    /// Stops watching an inode (no monitored path has it any more: its number may be reused).
    pub fn unwatch(&mut self, key: InodeKey) {
        if self.watched.remove(&key).is_ok() {
            self.inodes = self.inodes.saturating_sub(1);
        }
    }

    /// How many inodes the map holds.
    pub fn inodes(&self) -> u64 {
        self.inodes
    }

    /// How many inodes the map can hold.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// True once: the first time it is asked after a map refused an entry.
    pub fn newly_full(&mut self) -> bool {
        let newly = self.full && !self.full_reported;
        self.full_reported |= self.full;
        newly
    }
}
