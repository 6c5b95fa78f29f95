//! The watcher's journal: the last state it observed of every path whose state differs from
//! the signed baseline, and that state's content for the next diff. It is a sled database of
//! its own (the signed baseline is never written by the watcher), keyed by path bytes, tied
//! to one baseline by that baseline's creation stamp: a journal of another baseline is
//! cleared. It is unsigned, and anything with the public key can write it (a `kubefim watch`
//! of one's own), so it is never believed: a restarted watcher starts from the signed
//! baseline and reports every deviation again; the journal only marks those already seen.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::FileRecord;

const OBSERVED_TREE: &str = "observed";
const BASELINE_KEY: &[u8] = b"baseline";
/// The layout of [`Observed`]; a journal of another layout is cleared like one of another
/// baseline (it only ever makes the watcher report more, so nothing is lost). 3: records
/// carry inode flags.
const FORMAT: &str = "3";

/// What the watcher last saw of a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The record, or `None` when the path was gone.
    pub record: Option<FileRecord>,
    /// The content, where the rule keeps content (for the next diff).
    pub content: Option<Vec<u8>>,
    /// Whether `record` differs from the signed baseline's record of the path in an
    /// attribute the rule monitors (kept so a restart need not read the signed record).
    pub modified: bool,
}

/// An open journal.
pub struct Journal {
    db: sled::Db,
    observed: sled::Tree,
    path: PathBuf,
}

fn journal_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Store {
        path: path.to_owned(),
        message: format!("journal: {e} (delete it to start over; it only holds what the watcher observed)"),
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path` for the baseline identified by `baseline_id`.
    pub fn open(path: &Path, baseline_id: &str) -> Result<Journal> {
        // A small cache: the journal holds deviations only, written as they are seen.
        let db = sled::Config::new().path(path).cache_capacity(2 << 20).open().map_err(|e| journal_err(path, e))?;
        let observed = db.open_tree(OBSERVED_TREE).map_err(|e| journal_err(path, e))?;
        let journal = Journal { db, observed, path: path.to_owned() };
        let id = format!("{FORMAT}:{baseline_id}");
        let stored = journal.db.get(BASELINE_KEY).map_err(|e| journal_err(path, e))?;
        if stored.as_deref() != Some(id.as_bytes()) {
            journal.observed.clear().map_err(|e| journal_err(path, e))?;
            journal.db.insert(BASELINE_KEY, id.as_bytes()).map_err(|e| journal_err(path, e))?;
            journal.flush()?;
        }
        Ok(journal)
    }

    /// Everything observed, by path bytes, one entry in memory at a time. Unreadable entries
    /// are skipped: they only make the watcher fall back to the baseline, which it then
    /// rehashes against.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], Observed) -> Result<()>) -> Result<()> {
        for item in self.observed.iter() {
            let (k, v) = item.map_err(|e| journal_err(&self.path, e))?;
            if let Ok(observed) = postcard::from_bytes::<Observed>(&v) {
                f(&k, observed)?;
            }
        }
        Ok(())
    }

    /// What was observed of `path`, if it is in the journal and readable.
    pub fn get(&self, path: &[u8]) -> Result<Option<Observed>> {
        let value = self.observed.get(path).map_err(|e| journal_err(&self.path, e))?;
        Ok(value.and_then(|v| postcard::from_bytes(&v).ok()))
    }

    /// How many paths the journal holds.
    pub fn len(&self) -> usize {
        self.observed.len()
    }

    /// Whether the journal holds nothing.
    pub fn is_empty(&self) -> bool {
        self.observed.is_empty()
    }

    /// Records what was observed of `path` (`None`: it matches the baseline again).
    pub fn put(&self, path: &[u8], observed: Option<&Observed>) -> Result<()> {
        match observed {
            Some(o) => {
                let bytes = postcard::to_stdvec(o).map_err(|e| journal_err(&self.path, e))?;
                self.observed.insert(path, bytes).map_err(|e| journal_err(&self.path, e))?;
            }
            None => {
                self.observed.remove(path).map_err(|e| journal_err(&self.path, e))?;
            }
        }
        Ok(())
    }

    /// Makes everything recorded durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|e| journal_err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_is_cleared_for_another_baseline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal");
        let observed = Observed { record: None, content: Some(b"x".to_vec()), modified: true };
        {
            let j = Journal::open(&path, "a").unwrap();
            j.put(b"/etc/x", Some(&observed)).unwrap();
            j.put(b"/etc/y", Some(&observed)).unwrap();
            j.put(b"/etc/y", None).unwrap();
            j.flush().unwrap();
        }
        let all = |j: &Journal| {
            let mut out = Vec::new();
            j.for_each(|k, o| {
                out.push((k.to_vec(), o));
                Ok(())
            })
            .unwrap();
            out
        };
        let reopened = Journal::open(&path, "a").unwrap();
        assert_eq!(all(&reopened), vec![(b"/etc/x".to_vec(), observed.clone())]);
        assert_eq!(reopened.get(b"/etc/x").unwrap(), Some(observed));
        assert_eq!(reopened.get(b"/etc/y").unwrap(), None);
        drop(reopened);
        assert!(Journal::open(&path, "b").unwrap().is_empty());
    }
}
