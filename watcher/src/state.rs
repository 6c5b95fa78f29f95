//! What the watcher believes each monitored path is now, without holding records: the
//! [`Index`] (paths, inodes, fingerprints, flags) in memory, the signed baseline's records
//! read by location when needed, and what this run observed since (a record that differs from
//! the signed one, with its content) in the journal, kept in step: a path this run observed
//! is in the journal if and only if its current state differs from the signed baseline.
//!
//! A run starts believing the *signed* baseline, never the journal: the journal is unsigned,
//! and anyone with the public key can run a watcher that writes it, so believing it would let
//! a change be absorbed before the agent restarts. The startup rescan therefore reports every
//! deviation again; what an earlier run left in the journal only marks those it had seen in
//! the same state ([`State::journal_had`]), and is dropped once the startup rescan is done.

use std::path::{Path, PathBuf};

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::hash::Hash;
use kubefim_baseline::journal::{Journal, Observed};
use kubefim_baseline::policy::{Policy, path_bytes, path_from_bytes};
use kubefim_baseline::record::{FileKind, FileRecord, RecordLoc};
use kubefim_common::InodeKey;

use crate::index::{EXISTS, Id, Index, IndexBuilder, MODIFIED, OBSERVED, SIGNED};

/// An observed state of one path.
#[derive(Debug, Clone)]
pub(crate) struct Known {
    /// The record.
    pub record: FileRecord,
    /// The content, where the rule keeps content and it was read since the baseline (the
    /// baseline's content store has it otherwise).
    pub content: Option<Vec<u8>>,
}

/// The kernel key of a record.
pub(crate) fn key_of(record: &FileRecord) -> InodeKey {
    InodeKey::from_stat(record.dev, record.inode)
}

fn current_of(record: &FileRecord) -> (InodeKey, FileKind, u64) {
    (key_of(record), record.kind, record.fingerprint())
}

/// How a path differs from the signed baseline now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deviation {
    /// Not in the baseline, present now.
    Added,
    /// In the baseline, gone now.
    Removed,
    /// A monitored attribute differs.
    Modified,
}

/// The baseline, the journal and the index, kept consistent.
pub(crate) struct State {
    index: Index,
    baseline: TrustedBaseline,
    journal: Journal,
    journal_dirty: bool,
}

/// What [`State::set`] changed that the kernel filter must follow.
#[derive(Debug, Default)]
pub(crate) struct Update {
    /// The inode the path had before, if it was another one.
    pub old_key: Option<InodeKey>,
}

impl State {
    /// Indexes the baseline's records (one chunk in memory at a time). The journal is kept
    /// for [`State::journal_had`] and for this run's observations, not believed.
    pub fn load(baseline: TrustedBaseline, journal: Journal) -> kubefim_baseline::Result<State> {
        let mut builder = IndexBuilder::new();
        baseline.for_each_record(|loc, path, record| {
            let id = builder.entry_for(path, record.kind == FileKind::Dir);
            builder.set(id, Some(current_of(record)), SIGNED);
            builder.set_signed(id, loc.to_bits());
            Ok(())
        })?;
        let index = builder.finish();
        Ok(State { index, baseline, journal, journal_dirty: false })
    }

    /// Whether an earlier run's journal holds `path` in exactly the state `now` (`None`: gone),
    /// and this run has not taken the path over yet: a deviation reported again at start.
    pub fn journal_had(&self, path: &Path, now: Option<&FileRecord>) -> kubefim_baseline::Result<bool> {
        if self.index.lookup(path).is_some_and(|id| self.index.entry(id).has(OBSERVED)) {
            // This run's own entry: a change from it is news.
            return Ok(false);
        }
        Ok(self.journal.get(path_bytes(path))?.is_some_and(|o| o.record.as_ref() == now))
    }

    /// Drops what an earlier run left in the journal and this run has not observed (a path
    /// back to its signed state while no watcher ran), once the startup rescan has compared
    /// everything: the journal then holds this run's observations only.
    pub fn forget_earlier_runs(&mut self) -> kubefim_baseline::Result<()> {
        let mut stale = Vec::new();
        self.journal.for_each(|path, _| {
            let ours = self.index.lookup(path_from_bytes(path)).is_some_and(|id| self.index.entry(id).has(OBSERVED));
            if !ours {
                stale.push(path.to_vec());
            }
            Ok(())
        })?;
        for path in &stale {
            self.journal.put(path, None)?;
        }
        self.journal_dirty |= !stale.is_empty();
        Ok(())
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The policy of the baseline.
    pub fn policy(&self) -> &Policy {
        &self.baseline.policy
    }

    fn signed_of(&self, id: Id) -> kubefim_baseline::Result<Option<FileRecord>> {
        let e = self.index.entry(id);
        if !e.has(SIGNED) {
            return Ok(None);
        }
        Ok(Some(self.baseline.record(RecordLoc::from_bits(e.loc))?.1))
    }

    /// The signed baseline's record of a path.
    pub fn signed(&self, path: &Path) -> kubefim_baseline::Result<Option<FileRecord>> {
        match self.index.lookup(path) {
            Some(id) => self.signed_of(id),
            None => Ok(None),
        }
    }

    /// The current belief about a path.
    pub fn get(&self, path: &Path) -> kubefim_baseline::Result<Option<Known>> {
        let Some(id) = self.index.lookup(path) else { return Ok(None) };
        let e = self.index.entry(id);
        if !e.has(EXISTS) {
            return Ok(None);
        }
        if e.has(OBSERVED) {
            return Ok(self
                .journal
                .get(path_bytes(path))?
                .and_then(|o| o.record.map(|record| Known { record, content: o.content })));
        }
        Ok(self.signed_of(id)?.map(|record| Known { record, content: None }))
    }

    /// Whether the path exists as far as the watcher knows.
    pub fn exists(&self, path: &Path) -> bool {
        self.index.lookup(path).is_some_and(|id| self.index.entry(id).has(EXISTS))
    }

    /// The content of the path's current state by its hash, for a diff: what the journal
    /// kept, else the baseline's content store.
    pub fn content(&self, path: &Path, hash: &Hash) -> kubefim_baseline::Result<Option<Vec<u8>>> {
        if let Some(id) = self.index.lookup(path)
            && self.index.entry(id).has(OBSERVED)
            && let Some(observed) = self.journal.get(path_bytes(path))?
            && observed.record.as_ref().and_then(FileRecord::hash) == Some(hash)
        {
            return Ok(observed.content);
        }
        self.baseline.content(hash)
    }

    /// Takes `now` as the state of `path` (`None`: gone): index, journal.
    pub fn set(&mut self, path: &Path, now: Option<Known>) -> kubefim_baseline::Result<Update> {
        let id = match (self.index.lookup(path), &now) {
            (Some(id), _) => id,
            (None, Some(_)) => self.index.lookup_or_insert(path),
            (None, None) => return Ok(Update::default()),
        };
        let before = *self.index.entry(id);
        let signed = self.signed_of(id)?;
        let matches_signed = match (&signed, &now) {
            (Some(s), Some(k)) => *s == k.record,
            (None, None) => true,
            _ => false,
        };
        let old_key = before.has(EXISTS).then_some(before.key);
        self.index.set_current(id, now.as_ref().map(|k| current_of(&k.record)));
        let update = Update { old_key: old_key.filter(|k| now.as_ref().is_none_or(|n| key_of(&n.record) != *k)) };
        if matches_signed {
            if before.has(OBSERVED) {
                self.journal.put(path_bytes(path), None)?;
                self.journal_dirty = true;
            }
            self.index.set_flags(id, OBSERVED | MODIFIED, false);
        } else {
            let modified = match (&signed, &now) {
                (Some(s), Some(k)) => {
                    let rule = usize::try_from(k.record.rule).ok().and_then(|i| self.baseline.policy.rules.get(i));
                    rule.is_none_or(|r| !s.changed_attributes(&k.record, r.attributes).is_empty())
                }
                _ => false,
            };
            let (record, content) = match now {
                Some(k) => (Some(k.record), k.content),
                None => (None, None),
            };
            self.journal.put(path_bytes(path), Some(&Observed { record, content, modified }))?;
            self.journal_dirty = true;
            self.index.set_flags(id, OBSERVED, true);
            self.index.set_flags(id, MODIFIED, modified);
        }
        if !self.index.entry(id).has(EXISTS) {
            self.index.release(id);
        }
        Ok(update)
    }

    /// Makes the journal durable if anything was written since the last time.
    pub fn flush_journal(&mut self) -> kubefim_baseline::Result<()> {
        if self.journal_dirty {
            self.journal.flush()?;
            self.journal_dirty = false;
        }
        Ok(())
    }

    /// Paths whose current inode is `key`.
    pub fn paths_of_inode(&self, key: InodeKey) -> Vec<PathBuf> {
        self.index.ids_of_inode(key).into_iter().map(|id| self.index.path(id)).collect()
    }

    /// The known directory with this inode, if any.
    pub fn dir_of_inode(&self, key: InodeKey) -> Option<PathBuf> {
        let id = self.index.ids_of_inode(key).into_iter().find(|&id| self.index.entry(id).is_dir())?;
        Some(self.index.path(id))
    }

    /// Known, existing paths with this file name.
    pub fn paths_named(&self, name: &[u8]) -> Vec<PathBuf> {
        self.index.ids_named(name).into_iter().map(|id| self.index.path(id)).collect()
    }

    /// Whether the path is a known, existing directory.
    pub fn is_dir(&self, path: &Path) -> bool {
        self.index.lookup(path).is_some_and(|id| self.index.entry(id).is_dir())
    }

    /// Known, existing entries directly inside `dir`.
    pub fn children(&self, dir: &Path) -> Vec<PathBuf> {
        let Some(id) = self.index.lookup(dir) else { return Vec::new() };
        let mut out: Vec<PathBuf> =
            self.index.children(id).filter(|&c| self.index.entry(c).has(EXISTS)).map(|c| self.index.path(c)).collect();
        out.sort();
        out
    }

    /// How many records the signed baseline has.
    pub fn signed_len(&self) -> u64 {
        self.baseline.len()
    }

    /// Every path whose current state differs from the signed baseline in a monitored
    /// attribute, with how.
    pub fn deviations(&self) -> impl Iterator<Item = (Id, Deviation)> + '_ {
        self.index.with_flags(OBSERVED).filter_map(|(id, e)| match (e.has(SIGNED), e.has(EXISTS)) {
            (false, true) => Some((id, Deviation::Added)),
            (true, false) => Some((id, Deviation::Removed)),
            (true, true) if e.has(MODIFIED) => Some((id, Deviation::Modified)),
            _ => None,
        })
    }

    /// The path of an index entry.
    pub fn path(&self, id: Id) -> PathBuf {
        self.index.path(id)
    }
}

#[cfg(test)]
mod tests {
    use kubefim_baseline::root::HostRoot;
    use kubefim_baseline::scan::rehash;

    use super::*;
    use crate::fixture::Fixture;

    fn now(state: &State, path: &Path) -> Option<Known> {
        match rehash(path, state.policy(), &HostRoot::identity()) {
            Some(Ok(r)) => Some(Known { record: r.record, content: r.content }),
            _ => None,
        }
    }

    fn deviations(state: &State) -> Vec<(PathBuf, Deviation)> {
        let mut out: Vec<_> = state.deviations().map(|(id, d)| (state.path(id), d)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn what_differs_from_the_signed_baseline_lives_in_the_journal_and_survives_a_restart() {
        let fx = Fixture::new(&[("a.conf", "alpha\n"), ("sub/b.conf", "beta\n"), ("gone.conf", "x\n")]);
        let (a, b, gone, new) = (fx.path("a.conf"), fx.path("sub/b.conf"), fx.path("gone.conf"), fx.path("new"));
        let mut state = fx.state();
        assert_eq!(state.get(&a).unwrap().unwrap().record, state.signed(&a).unwrap().unwrap());
        assert!(deviations(&state).is_empty());

        std::fs::write(&a, "alpha 2\n").unwrap();
        std::fs::remove_file(&gone).unwrap();
        std::fs::write(&new, "new\n").unwrap();
        for p in [&a, &gone, &new] {
            state.set(p, now(&state, p)).unwrap();
        }
        let known = state.get(&a).unwrap().unwrap();
        assert_eq!(known.content.as_deref(), Some(&b"alpha 2\n"[..]), "the journal keeps the content for diffs");
        assert!(!state.exists(&gone) && state.exists(&new));
        let expected =
            vec![(a.clone(), Deviation::Modified), (gone.clone(), Deviation::Removed), (new.clone(), Deviation::Added)];
        assert_eq!(deviations(&state), expected);
        state.flush_journal().unwrap();
        drop(state);

        // A restart believes the signed baseline, not the journal (unsigned: any watcher run
        // with the public key writes it). Each deviation, found again, is one the journal had.
        let mut state = fx.state();
        assert!(deviations(&state).is_empty(), "the journal was believed");
        assert!(state.get(&new).unwrap().is_none() && state.get(&gone).unwrap().is_some());
        let b_now = now(&state, &b).map(|k| k.record);
        assert!(!state.journal_had(&b, b_now.as_ref()).unwrap(), "b was never in the journal");
        for p in [&a, &gone, &new] {
            let found = now(&state, p);
            assert!(state.journal_had(p, found.as_ref().map(|k| &k.record)).unwrap(), "{}", p.display());
            state.set(p, found).unwrap();
            let again = state.get(p).unwrap().map(|k| k.record);
            assert!(!state.journal_had(p, again.as_ref()).unwrap(), "this run's own entry is news: {}", p.display());
        }
        assert_eq!(deviations(&state), expected);
        assert_eq!(state.get(&a).unwrap().unwrap().content.as_deref(), Some(&b"alpha 2\n"[..]));
        assert_eq!(state.paths_of_inode(key_of(&state.get(&new).unwrap().unwrap().record)), std::slice::from_ref(&new));
        assert_eq!(state.children(&fx.tree()), [a.clone(), new.clone(), fx.path("sub")]);

        // Restored, and the new file gone again: nothing deviates, the journal is empty.
        std::fs::write(&a, "alpha\n").unwrap();
        std::fs::remove_file(&new).unwrap();
        let mut restored = now(&state, &a).unwrap();
        let signed = state.signed(&a).unwrap().unwrap();
        // A restore cannot bring back the times; only what the content and mode say is equal.
        restored.record.mtime_ns = signed.mtime_ns;
        restored.record.ctime_ns = signed.ctime_ns;
        state.set(&a, Some(restored)).unwrap();
        state.set(&new, None).unwrap();
        assert_eq!(deviations(&state), vec![(gone.clone(), Deviation::Removed)]);
        assert!(!state.exists(&new) && state.paths_named(b"new").is_empty());
        assert!(state.get(&b).unwrap().is_some());
    }

    #[test]
    fn a_journal_entry_in_another_state_is_no_known_deviation_and_earlier_runs_are_forgotten() {
        let fx = Fixture::new(&[("a.conf", "alpha\n"), ("b.conf", "beta\n")]);
        let (a, b) = (fx.path("a.conf"), fx.path("b.conf"));
        let mut state = fx.state();
        std::fs::write(&a, "alpha 2\n").unwrap();
        std::fs::write(&b, "beta 2\n").unwrap();
        for p in [&a, &b] {
            state.set(p, now(&state, p)).unwrap();
        }
        state.flush_journal().unwrap();
        drop(state);

        // While no watcher runs, a changes again and b is put back as signed (times too).
        std::fs::write(&a, "alpha 3\n").unwrap();
        let mut state = fx.state();
        let signed_b = state.signed(&b).unwrap().unwrap();
        std::fs::write(&b, "beta\n").unwrap();
        let a_now = now(&state, &a).unwrap();
        assert!(!state.journal_had(&a, Some(&a_now.record)).unwrap(), "a changed since the journal saw it");
        state.set(&a, Some(a_now)).unwrap();
        let mut b_now = now(&state, &b).unwrap();
        b_now.record.mtime_ns = signed_b.mtime_ns;
        b_now.record.ctime_ns = signed_b.ctime_ns;
        state.set(&b, Some(b_now)).unwrap();
        state.forget_earlier_runs().unwrap();
        state.flush_journal().unwrap();
        assert_eq!(state.journal.len(), 1, "only this run's deviation (a) is left");
        assert_eq!(deviations(&state), vec![(a.clone(), Deviation::Modified)]);
    }
}
