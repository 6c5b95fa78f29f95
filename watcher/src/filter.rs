//! The in-kernel filter as user space keeps it: which inodes the programs watch (`WATCHED`,
//! with a directory's entries watched too, and the rule roots' ancestors for mounts) and which
//! file names a path event must carry to be sent (`NAMES`: monitored entries' names, and the
//! ancestors' names for renames, removals and mounts of them). Filled once from the state at start, then kept in step with every
//! rehash; it counts what it holds, so `kubefim_watched_inodes` is what the map holds, and
//! says once when a map is full (changes beyond it are then found by rescans only).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData};
use kubefim_common::{InodeKey, NAME_ANCESTOR, NAME_ENTRY, WATCH_ANCESTOR, WATCH_DIR, WATCH_FILE, name_hash};

use crate::ancestors::Ancestors;

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

/// Entries per `BPF_MAP_UPDATE_BATCH` of the fill.
const FILL_BATCH: usize = 4096;
/// Tries of a batch that found the kernel short of memory for new elements.
const FILL_ATTEMPTS: u64 = 5;

/// Puts `keys[i] -> values[i]` in `map`; how many went in. `BPF_MAP_UPDATE_BATCH` (kernel
/// 5.6) by hand, because aya 0.14 has no batch operations and one syscall an entry made the
/// fill of a million-entry filter take 2.5 s; an entry at a time where batches are refused.
fn fill_batch<K: aya::Pod, V: aya::Pod>(map: &mut BpfHashMap<MapData, K, V>, keys: &[K], values: &[V]) -> usize {
    debug_assert_eq!(keys.len(), values.len());
    let mut done = 0;
    for attempt in 1..=FILL_ATTEMPTS {
        match update_batch(map.map().fd().as_fd(), &keys[done..], &values[done..]) {
            Ok(n) => return done + n,
            Err((n, e)) => {
                done += n;
                tracing::debug!(done, of = keys.len(), attempt, "batch update of the kernel filter: {e}");
                // A map that is not preallocated takes its elements from per-CPU caches the
                // kernel refills in the background: a fast fill can drain them (ENOMEM). A
                // moment lets them refill; anything else will not get better.
                if e.raw_os_error() != Some(libc::ENOMEM) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(attempt * 10));
            }
        }
    }
    // Full, or no batch support: one at a time says which fit.
    let mut failed = None;
    let rest = keys[done..]
        .iter()
        .zip(&values[done..])
        .filter(|(k, v)| match map.insert(*k, *v, 0) {
            Ok(()) => true,
            Err(e) => {
                failed.get_or_insert(e);
                false
            }
        })
        .count();
    if let Some(e) = failed {
        tracing::warn!("the kernel filter refused entries: {e}");
    }
    done + rest
}

/// `bpf(BPF_MAP_UPDATE_BATCH)`: `Ok(n)` when all `n` went in, else how many did and why not.
fn update_batch<K, V>(fd: BorrowedFd<'_>, keys: &[K], values: &[V]) -> Result<usize, (usize, std::io::Error)> {
    /// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h, 6.18).
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let Ok(count) = u32::try_from(keys.len()) else { return Err((0, std::io::ErrorKind::InvalidInput.into())) };
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX),
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: `attr` is the kernel's batch layout, its pointers name `count` keys and values
    // of the map's sizes (the map's K and V) that outlive the call, and the kernel writes
    // only `attr.count` back.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &raw mut attr, size_of::<BatchAttr>() as libc::c_long)
    };
    let error = std::io::Error::last_os_error();
    match (rc, attr.count) {
        (0, n) => Ok(n as usize),
        // An error found before any entry leaves the count as given: nothing is known to be
        // in (inserting an entry again is harmless).
        (_, n) if n == count => Err((0, error)),
        (_, n) => Err(((n as usize).min(keys.len()), error)),
    }
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

    /// Puts every existing entry of `index` in the maps, the names of `roots` (rule roots
    /// that may not exist yet: their creation by path must pass the name filter), and the
    /// rule roots' `ancestors`. Each inode and each name is sent once, thousands to a syscall.
    pub fn fill<'a>(&mut self, index: &Index, roots: impl IntoIterator<Item = &'a [u8]>, ancestors: &Ancestors) {
        let mut keys: Vec<InodeKey> = Vec::with_capacity(FILL_BATCH);
        let mut values: Vec<u32> = Vec::with_capacity(FILL_BATCH);
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
                keys.push(key);
                values.push(b);
            }
            if keys.len() == FILL_BATCH || at == sorted.len() {
                let sent = fill_batch(&mut self.watched, &keys, &values);
                self.inodes += sent as u64;
                ok &= sent == keys.len();
                keys.clear();
                values.clear();
            }
        }
        // Names sorted, so each distinct one once; then the roots'.
        let mut hashes: Vec<u64> = Vec::with_capacity(FILL_BATCH);
        let mut last: Option<&[u8]> = None;
        let mut names =
            index.sorted_by_name().iter().filter(|&&id| index.entry(id).has(EXISTS)).map(|&id| index.name(id));
        loop {
            let next = names.next();
            if let Some(name) = next
                && last != Some(name)
            {
                last = Some(name);
                hashes.push(name_hash(name));
            }
            if hashes.len() == FILL_BATCH || (next.is_none() && !hashes.is_empty()) {
                let ones = vec![NAME_ENTRY; hashes.len()];
                ok &= fill_batch(&mut self.names, &hashes, &ones) == hashes.len();
                hashes.clear();
            }
            if next.is_none() {
                break;
            }
        }
        for name in roots {
            ok &= self.name(name, NAME_ENTRY);
        }
        for name in ancestors.names() {
            ok &= self.name(name, NAME_ANCESTOR);
        }
        for key in ancestors.keys() {
            ok &= self.watch_ancestor(key);
        }
        if !ok {
            self.full = true;
        }
    }

    /// Adds `bit` to a name's `NAME_*` bits (a name may be a monitored entry's and an
    /// ancestor's). False when the map is full.
    fn name(&mut self, name: &[u8], bit: u8) -> bool {
        let hash = name_hash(name);
        match self.names.get(&hash, 0) {
            Ok(b) if b & bit != 0 => true,
            Ok(b) => self.names.insert(hash, b | bit, 0).is_ok(),
            Err(_) => self.names.insert(hash, bit, 0).is_ok(),
        }
    }

    /// Watches a rule root's ancestor for mounts through a descriptor of it. False when the
    /// map is full.
    pub fn watch_ancestor(&mut self, key: InodeKey) -> bool {
        let ok = match self.watched.get(&key, 0).ok() {
            Some(b) if b & WATCH_ANCESTOR != 0 => true,
            Some(b) => self.watched.insert(key, b | WATCH_ANCESTOR, 0).is_ok(),
            None => self.insert(key, WATCH_ANCESTOR),
        };
        if !ok {
            self.full = true;
        }
        ok
    }

    /// An inode is no rule root's ancestor any more: it keeps only the bits monitored paths
    /// give it.
    pub fn unwatch_ancestor(&mut self, key: InodeKey) {
        match self.watched.get(&key, 0).ok() {
            Some(WATCH_ANCESTOR) => self.unwatch(key),
            Some(b) if b & WATCH_ANCESTOR != 0 => {
                let _ = self.watched.insert(key, b & !WATCH_ANCESTOR, 0);
            }
            _ => {}
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
        let named = name.is_empty() || self.name(name, NAME_ENTRY);
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

    /// The bits the kernel's map holds for `key` now (`None`: not there), for the self-check.
    pub fn bits_of(&self, key: &InodeKey) -> Option<u32> {
        self.watched.get(key, 0).ok()
    }

    /// Whether the kernel's name map holds `name`, for the self-check.
    pub fn has_name(&self, name: &[u8]) -> bool {
        self.names.get(&name_hash(name), 0).is_ok()
    }

    /// Watches an inode that is no monitored path's (the self-check's canary): not counted
    /// in [`KernelFilter::inodes`]. False when the map refused it.
    pub fn watch_uncounted(&mut self, key: InodeKey) -> bool {
        self.watched.insert(key, WATCH_FILE, 0).is_ok()
    }

    /// Puts everything back after the maps were found tampered with: every existing entry of
    /// `index` (those made since it was built too), the names of `roots` and the rule roots'
    /// `ancestors`, thousands to a syscall; inserting an entry that is there is harmless. The
    /// count starts afresh.
    pub fn refill<'a>(&mut self, index: &Index, roots: impl IntoIterator<Item = &'a [u8]>, ancestors: &Ancestors) {
        let mut wanted: Vec<(InodeKey, u32)> =
            index.with_flags(EXISTS).map(|(_, e)| (e.key, bits(e.is_dir()))).collect();
        wanted.sort_unstable_by_key(|w| w.0);
        // Hard links: one entry, every path's bits.
        wanted.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 |= later.1;
            }
            same
        });
        let (keys, values): (Vec<InodeKey>, Vec<u32>) = wanted.into_iter().unzip();
        let mut ok = true;
        let mut sent = 0;
        for (k, v) in keys.chunks(FILL_BATCH).zip(values.chunks(FILL_BATCH)) {
            let n = fill_batch(&mut self.watched, k, v);
            ok &= n == k.len();
            sent += n as u64;
        }
        self.inodes = sent;
        let mut names: Vec<u64> =
            index.with_flags(EXISTS).map(|(id, _)| index.name(id)).filter(|n| !n.is_empty()).map(name_hash).collect();
        names.extend(roots.into_iter().filter(|n| !n.is_empty()).map(name_hash));
        names.sort_unstable();
        names.dedup();
        for chunk in names.chunks(FILL_BATCH) {
            ok &= fill_batch(&mut self.names, chunk, &vec![NAME_ENTRY; chunk.len()]) == chunk.len();
        }
        // The ancestors' bits on top of what was just written (a name or an inode may be both
        // an entry's and an ancestor's); an ancestor that is no entry counts as one more inode.
        for name in ancestors.names() {
            ok &= self.name(name, NAME_ANCESTOR);
        }
        for key in ancestors.keys() {
            if keys.binary_search(&key).is_ok() {
                ok &= self.watched.insert(key, self.watched.get(&key, 0).unwrap_or(0) | WATCH_ANCESTOR, 0).is_ok();
            } else {
                ok &= self.insert(key, WATCH_ANCESTOR);
            }
        }
        if !ok {
            self.full = true;
        }
    }

    /// The bits an existing entry needs in the map.
    pub fn wanted_bits(is_dir: bool) -> u32 {
        bits(is_dir)
    }

    /// Whether a map ever refused an entry (then an entry missing from it may be one that
    /// never fit).
    pub fn was_full(&self) -> bool {
        self.full
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
