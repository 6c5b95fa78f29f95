//! What the watcher believes each monitored path is now: the signed baseline's records (held
//! once, taken from the trusted baseline) under an overlay of what was observed since (from
//! the journal and every rehash), with the indexes that map a kernel event back to paths (by
//! inode, by file name). Paths are shared (`Arc<[u8]>`) between the maps and the indexes, so
//! a 100k-file baseline costs one copy of each path.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::journal::{Journal, Observed};
use kubefim_baseline::policy::{path_bytes, path_from_bytes};
use kubefim_baseline::record::{FileKind, FileRecord};
use kubefim_common::{InodeKey, name_hash};

type PathKey = Arc<[u8]>;

/// An observed state of one path.
#[derive(Debug, Clone)]
pub struct Known {
    /// The record.
    pub record: FileRecord,
    /// The content, where the rule keeps content and it was read since the baseline (the
    /// baseline's content store has it otherwise).
    pub content: Option<Vec<u8>>,
}

/// The current belief about one path, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct KnownRef<'a> {
    /// The record.
    pub record: &'a FileRecord,
    /// The content observed since the baseline, if any.
    pub content: Option<&'a Vec<u8>>,
}

/// All monitored paths and their indexes.
#[derive(Default)]
pub struct State {
    signed: BTreeMap<PathKey, FileRecord>,
    /// Paths whose state differs from `signed`: `None` when gone.
    overlay: BTreeMap<PathKey, Option<Known>>,
    /// Paths by inode; nearly every inode has one path, so that one is kept inline.
    by_inode: HashMap<InodeKey, Paths>,
    by_name: HashMap<u64, Vec<PathKey>>,
}

/// One path, or several (hard links), without a heap allocation for the common case.
#[derive(Debug, Clone)]
enum Paths {
    One(PathKey),
    Many(Vec<PathKey>),
}

impl Paths {
    fn add(&mut self, path: &PathKey) {
        match self {
            Paths::One(p) if p == path => {}
            Paths::One(p) => *self = Paths::Many(vec![p.clone(), path.clone()]),
            Paths::Many(v) if v.contains(path) => {}
            Paths::Many(v) => v.push(path.clone()),
        }
    }

    fn as_slice(&self) -> &[PathKey] {
        match self {
            Paths::One(p) => std::slice::from_ref(p),
            Paths::Many(v) => v,
        }
    }
}

/// The kernel key of a record.
pub fn key_of(record: &FileRecord) -> InodeKey {
    InodeKey::from_stat(record.dev, record.inode)
}

fn name_of(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

impl State {
    /// The baseline's records (moved out of it), under what the journal observed since.
    pub fn load(baseline: &mut TrustedBaseline, journal: &Journal) -> kubefim_baseline::Result<State> {
        let mut state = State::default();
        for (path, record) in std::mem::take(&mut baseline.records) {
            let key: PathKey = path.into();
            state.index(&key, &record);
            state.signed.insert(key, record);
        }
        for (path, observed) in journal.load()? {
            let now = observed.record.map(|record| Known { record, content: observed.content });
            state.set(path_from_bytes(&path), now);
        }
        Ok(state)
    }

    fn intern(&self, path: &[u8]) -> PathKey {
        match self.signed.get_key_value(path) {
            Some((k, _)) => k.clone(),
            None => match self.overlay.get_key_value(path) {
                Some((k, _)) => k.clone(),
                None => path.into(),
            },
        }
    }

    fn index(&mut self, path: &PathKey, record: &FileRecord) {
        self.by_inode.entry(key_of(record)).and_modify(|p| p.add(path)).or_insert_with(|| Paths::One(path.clone()));
        let names = self.by_name.entry(name_hash(name_of(path))).or_default();
        if !names.contains(path) {
            names.push(path.clone());
        }
    }

    /// Records what a rehash found (`None`: the path is gone).
    pub fn set(&mut self, path: &Path, now: Option<Known>) {
        let key = self.intern(path_bytes(path));
        if let Some(known) = &now {
            self.index(&key, &known.record);
        }
        // The indexes keep stale entries; lookups re-check against the current record.
        match (self.signed.get(&key), &now) {
            (Some(signed), Some(known)) if *signed == known.record => {
                self.overlay.remove(&key);
            }
            (None, None) => {
                self.overlay.remove(&key);
            }
            _ => {
                self.overlay.insert(key, now);
            }
        }
    }

    /// The belief about a path.
    pub fn get(&self, path: &Path) -> Option<KnownRef<'_>> {
        let bytes = path_bytes(path);
        match self.overlay.get(bytes) {
            Some(Some(k)) => Some(KnownRef { record: &k.record, content: k.content.as_ref() }),
            Some(None) => None,
            None => self.signed.get(bytes).map(|record| KnownRef { record, content: None }),
        }
    }

    /// The signed baseline's record of a path.
    pub fn signed(&self, path: &Path) -> Option<&FileRecord> {
        self.signed.get(path_bytes(path))
    }

    fn current(&self, paths: Option<&[PathKey]>, keep: impl Fn(&FileRecord) -> bool) -> Vec<PathBuf> {
        paths
            .into_iter()
            .flatten()
            .filter(|p| self.get(path_from_bytes(p)).is_some_and(|k| keep(k.record)))
            .map(|p| path_from_bytes(p).to_owned())
            .collect()
    }

    /// Paths whose current inode is `key`.
    pub fn paths_of_inode(&self, key: &InodeKey) -> Vec<PathBuf> {
        self.current(self.by_inode.get(key).map(Paths::as_slice), |r| key_of(r) == *key)
    }

    /// Known paths with this file name.
    pub fn paths_named(&self, name: &[u8]) -> Vec<PathBuf> {
        let mut out = self.current(self.by_name.get(&name_hash(name)).map(Vec::as_slice), |_| true);
        out.retain(|p| p.file_name().is_some_and(|n| path_bytes(Path::new(n)) == name));
        out
    }

    /// The known directory with this inode, if any.
    pub fn dir_of_inode(&self, key: &InodeKey) -> Option<PathBuf> {
        self.current(self.by_inode.get(key).map(Paths::as_slice), |r| key_of(r) == *key && r.kind == FileKind::Dir)
            .into_iter()
            .next()
    }

    /// Known entries directly inside `dir`.
    pub fn children(&self, dir: &Path) -> Vec<PathBuf> {
        let mut prefix = path_bytes(dir).to_vec();
        if prefix.last() != Some(&b'/') {
            prefix.push(b'/');
        }
        let direct = |k: &PathKey| k.starts_with(&prefix) && !k[prefix.len()..].contains(&b'/');
        let from = (Bound::Included(&prefix[..]), Bound::Unbounded);
        let from_signed = self.signed.range::<[u8], _>(from).map(|(k, _)| k).take_while(|k| k.starts_with(&prefix));
        let from_overlay = self.overlay.range::<[u8], _>(from).map(|(k, _)| k).take_while(|k| k.starts_with(&prefix));
        let mut out: Vec<PathBuf> = from_signed
            .chain(from_overlay)
            .filter(|k| direct(k))
            .map(|k| path_from_bytes(k).to_owned())
            .filter(|p| self.get(p).is_some())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every path that currently exists, with its record.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &FileRecord)> {
        let signed =
            self.signed.iter().filter(|(k, _)| !self.overlay.contains_key(*k)).map(|(k, r)| (path_from_bytes(k), r));
        let overlay =
            self.overlay.iter().filter_map(|(k, v)| v.as_ref().map(|known| (path_from_bytes(k), &known.record)));
        signed.chain(overlay)
    }

    /// How many paths the baseline and the overlay name.
    pub fn len(&self) -> usize {
        self.signed.len() + self.overlay.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.signed.is_empty() && self.overlay.is_empty()
    }

    /// Paths whose current state differs from the signed baseline in any way: (path, signed
    /// record, current record).
    pub fn deviations(&self) -> impl Iterator<Item = (&Path, Option<&FileRecord>, Option<&FileRecord>)> {
        self.overlay
            .iter()
            .map(|(k, now)| (path_from_bytes(k), self.signed.get(k), now.as_ref().map(|known| &known.record)))
    }

    /// How many records the signed baseline has.
    pub fn signed_len(&self) -> usize {
        self.signed.len()
    }

    /// The journal entry for a path: what was observed, or `None` when it matches the
    /// baseline.
    pub fn journal_entry(&self, path: &Path) -> Option<Observed> {
        let bytes = path_bytes(path);
        self.overlay.get(bytes).map(|now| Observed {
            record: now.as_ref().map(|k| k.record.clone()),
            content: now.as_ref().and_then(|k| k.content.clone()),
        })
    }
}
