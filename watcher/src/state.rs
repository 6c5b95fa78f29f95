//! What the watcher believes each monitored path is now: the signed baseline's records
//! overlaid with the journal, kept current after every rehash, with the indexes that map a
//! kernel event back to paths (by inode, by file name) and the directories that are watched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::journal::{Journal, Observed};
use kubefim_baseline::policy::{path_bytes, path_from_bytes};
use kubefim_baseline::record::{FileKind, FileRecord};
use kubefim_common::InodeKey;

/// The current belief about one path.
#[derive(Debug, Clone)]
pub struct Known {
    /// The record.
    pub record: FileRecord,
    /// The content, where the rule keeps content and it has been read since the baseline
    /// (the baseline's stored content is used otherwise).
    pub content: Option<Vec<u8>>,
}

/// All monitored paths and their indexes.
#[derive(Default)]
pub struct State {
    known: BTreeMap<Vec<u8>, Known>,
    by_inode: HashMap<InodeKey, Vec<Vec<u8>>>,
    by_name: HashMap<Vec<u8>, Vec<Vec<u8>>>,
}

/// The kernel key of a record.
pub fn key_of(record: &FileRecord) -> InodeKey {
    InodeKey::from_stat(record.dev, record.inode)
}

fn name_of(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

impl State {
    /// The baseline's records, overlaid with what the journal observed since.
    pub fn load(baseline: &TrustedBaseline, journal: &Journal) -> kubefim_baseline::Result<State> {
        let mut state = State::default();
        for (path, record) in &baseline.records {
            state.insert(path.clone(), Known { record: record.clone(), content: None });
        }
        for (path, observed) in journal.load()? {
            match observed.record {
                Some(record) => state.insert(path, Known { record, content: observed.content }),
                None => {
                    state.known.remove(&path);
                }
            }
        }
        Ok(state)
    }

    fn insert(&mut self, path: Vec<u8>, known: Known) {
        let key = key_of(&known.record);
        let paths = self.by_inode.entry(key).or_default();
        if !paths.contains(&path) {
            paths.push(path.clone());
        }
        let names = self.by_name.entry(name_of(&path).to_vec()).or_default();
        if !names.contains(&path) {
            names.push(path.clone());
        }
        self.known.insert(path, known);
    }

    /// Records what a rehash found (`None`: the path is gone).
    pub fn set(&mut self, path: &Path, now: Option<Known>) {
        let bytes = path_bytes(path).to_vec();
        match now {
            Some(known) => self.insert(bytes, known),
            None => {
                // The indexes keep stale entries; lookups re-check against `known`.
                self.known.remove(&bytes);
            }
        }
    }

    /// The belief about a path.
    pub fn get(&self, path: &Path) -> Option<&Known> {
        self.known.get(path_bytes(path))
    }

    /// Paths whose last known inode is `key`.
    pub fn paths_of_inode(&self, key: &InodeKey) -> Vec<PathBuf> {
        self.by_inode
            .get(key)
            .into_iter()
            .flatten()
            .filter(|p| self.known.get(*p).is_some_and(|k| key_of(&k.record) == *key))
            .map(|p| path_from_bytes(p).to_owned())
            .collect()
    }

    /// Known paths with this file name.
    pub fn paths_named(&self, name: &[u8]) -> Vec<PathBuf> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .filter(|p| self.known.contains_key(*p))
            .map(|p| path_from_bytes(p).to_owned())
            .collect()
    }

    /// Whether a known directory has this inode; its path if so.
    pub fn dir_of_inode(&self, key: &InodeKey) -> Option<PathBuf> {
        self.paths_of_inode(key).into_iter().find(|p| self.get(p).is_some_and(|k| k.record.kind == FileKind::Dir))
    }

    /// Known entries directly inside `dir`.
    pub fn children(&self, dir: &Path) -> Vec<PathBuf> {
        let mut prefix = path_bytes(dir).to_vec();
        if prefix.last() != Some(&b'/') {
            prefix.push(b'/');
        }
        self.known
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k[prefix.len()..].contains(&b'/'))
            .map(|(k, _)| path_from_bytes(k).to_owned())
            .collect()
    }

    /// Every known entry, for filling the kernel's maps.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Known)> {
        self.known.iter().map(|(k, v)| (path_from_bytes(k), v))
    }

    /// How many entries are known.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }
}

/// The journal entry for a path: what was observed, or `None` when it matches the baseline.
pub fn journal_entry(baseline: &TrustedBaseline, path: &Path, now: Option<&Known>) -> Option<Observed> {
    let signed = baseline.records.get(path_bytes(path));
    match (signed, now) {
        (None, None) => None,
        (Some(s), Some(n)) if *s == n.record => None,
        (_, n) => Some(Observed { record: n.map(|k| k.record.clone()), content: n.and_then(|k| k.content.clone()) }),
    }
}
