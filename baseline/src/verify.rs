//! Verify: rescan what a trusted baseline's policy names and compare each entry with its
//! record, attribute by attribute, producing [`Change`]s with content diffs (where the rule
//! keeps content) and changed byte ranges. An entry a mount made since covers is `hidden`,
//! not `removed` (`mounts`). Anything that could not be checked is an error entry that keeps
//! the report from being clean.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::baseline::TrustedBaseline;
use crate::error::Result;
use crate::hash::changed_ranges;
use crate::lock::lock_path;
use crate::mounts::{Mount, MountTable, hiding};
use crate::policy::{Attribute, Policy, path_bytes, path_from_bytes};
use crate::record::FileRecord;
use crate::report::{display_path, escape_bytes};
use crate::root::HostRoot;
use crate::scan::{Scan, ScanProgress, ScanSink, ScanSummary, ScannedEntry};
use crate::seal::Seal;
use crate::sign::PublicKey;

/// What kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Not in the baseline, present now.
    Added,
    /// In the baseline, gone now.
    Removed,
    /// Present in both, some monitored attribute differs.
    Modified,
    /// In the baseline, not visible now because a mount made since covers it (`mount` says
    /// which): the entry may still be there underneath, unchanged or not.
    Hidden,
}

impl ChangeKind {
    /// The name used in reports (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
            ChangeKind::Hidden => "hidden",
        }
    }
}

/// One difference between the baseline and now.
#[derive(Debug, Clone)]
pub struct Change {
    /// The path.
    pub path: PathBuf,
    /// Added, removed or modified.
    pub kind: ChangeKind,
    /// The monitored attributes that differ (empty for added and removed).
    pub changed: Vec<Attribute>,
    /// The baseline's record.
    pub old: Option<FileRecord>,
    /// The record now.
    pub new: Option<FileRecord>,
    /// A unified diff, when the rule keeps content and both sides are text.
    pub diff: Option<String>,
    /// Changed byte ranges, when the content changed.
    pub changed_ranges: Option<Vec<[u64; 2]>>,
    /// The mount that hides a [`ChangeKind::Hidden`] entry, or that a modified entry is now
    /// the target of (a bind mount over a file).
    pub mount: Option<MountedAt>,
}

/// A mount, as a change names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct MountedAt {
    /// Where it is mounted (as the policy names paths; escaped like every path).
    pub target: String,
    /// Its file system type (`tmpfs`, `ext4`, ...).
    pub fs_type: String,
    /// Its source as the kernel recorded it: a device, the bind mount's file system's device,
    /// or any word for a virtual file system.
    pub source: String,
}

/// A path that could not be checked.
#[derive(Debug, Clone)]
pub struct VerifyError {
    /// The path.
    pub path: PathBuf,
    /// Why.
    pub message: String,
}

/// The outcome of a verify.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Differences, sorted by path.
    pub changes: Vec<Change>,
    /// Paths that could not be verified, sorted by path.
    pub errors: Vec<VerifyError>,
    /// Entries scanned now.
    pub scanned: u64,
}

impl VerifyReport {
    /// How many changes of `kind`.
    pub fn count(&self, kind: ChangeKind) -> usize {
        self.changes.iter().filter(|c| c.kind == kind).count()
    }

    /// Clean only when nothing changed and everything could be checked.
    pub fn is_clean(&self) -> bool {
        self.changes.is_empty() && self.errors.is_empty()
    }
}

/// Unified diff of two texts, labelled with the path.
pub fn unified_diff(path: &std::path::Path, old: &str, new: &str) -> String {
    let label = path.display();
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("{label} (baseline)"), &format!("{label} (now)"))
        .to_string()
}

/// `diff` (made by [`unified_diff`]) with its old side called `label` instead of baseline.
pub fn relabel_old_side(diff: &str, label: &str) -> String {
    match diff.split_once('\n') {
        Some((first, rest)) if first.starts_with("--- ") && first.ends_with(" (baseline)") => {
            format!("{} ({label})\n{rest}", &first[..first.len() - " (baseline)".len()])
        }
        _ => diff.to_owned(),
    }
}

/// Compares one current entry with its baseline record; `None` when they match.
pub fn compare(
    baseline: &TrustedBaseline,
    path: PathBuf,
    old: Option<&FileRecord>,
    new: FileRecord,
    new_content: Option<&[u8]>,
) -> Result<Option<Change>> {
    compare_with(&baseline.policy, path, old, new, new_content, |hash| baseline.content(hash))
}

/// Compares an entry as it is now with an earlier record of it under `policy`;
/// `old_content` fetches the earlier content by hash, for the diff. `None` when they match.
pub fn compare_with(
    policy: &Policy,
    path: PathBuf,
    old: Option<&FileRecord>,
    new: FileRecord,
    new_content: Option<&[u8]>,
    old_content: impl FnOnce(&crate::hash::Hash) -> Result<Option<Vec<u8>>>,
) -> Result<Option<Change>> {
    let Some(old) = old else {
        return Ok(Some(Change {
            path,
            kind: ChangeKind::Added,
            changed: Vec::new(),
            old: None,
            new: Some(new),
            diff: None,
            changed_ranges: None,
            mount: None,
        }));
    };
    let rule = &policy.rules[usize::try_from(new.rule).expect("rule index fits")];
    let changed = old.changed_attributes(&new, rule.attributes);
    if changed.is_empty() {
        return Ok(None);
    }
    let mut change = Change {
        path,
        kind: ChangeKind::Modified,
        changed,
        old: Some(old.clone()),
        new: None,
        diff: None,
        changed_ranges: None,
        mount: None,
    };
    if change.changed.contains(&Attribute::Content) {
        if let (Some(a), Some(b)) = (&old.digest, &new.digest) {
            change.changed_ranges = Some(changed_ranges(a, old.size, b, new.size));
        }
        if let (true, Some(hash), Some(now)) = (old.content_stored && !rule.secret, old.hash(), new_content)
            && let Ok(now) = std::str::from_utf8(now)
            && let Some(before) = old_content(hash)?
            && let Ok(before) = std::str::from_utf8(&before)
        {
            change.diff = Some(unified_diff(&change.path, before, now));
        }
    }
    change.new = Some(new);
    Ok(Some(change))
}

/// Collects what a scan finds, for comparing once the baseline is trusted.
#[derive(Default)]
struct Collect(Mutex<Vec<ScannedEntry>>);

impl ScanSink for Collect {
    fn entry(&self, entry: ScannedEntry) {
        self.0.lock().expect("no panics while holding").push(entry);
    }
}

fn rescan(policy: &Policy, host: &HostRoot, db: &Path, progress: &ScanProgress) -> (Vec<ScannedEntry>, ScanSummary) {
    let sink = Collect::default();
    let summary = Scan::whole_policy(policy).under(host).skip(db).skip(&lock_path(db)).run(&sink, progress);
    (sink.0.into_inner().expect("no panics while holding"), summary)
}

/// Rescans everything a trusted baseline's policy names and reports every difference.
pub fn verify(baseline: &TrustedBaseline, host: &HostRoot, progress: &ScanProgress) -> Result<VerifyReport> {
    let (entries, summary) = rescan(&baseline.policy, host, baseline.path(), progress);
    report(baseline, host, entries, &summary)
}

/// Opens the baseline at `db` and verifies the machine against it. The rescan starts as
/// soon as the seal's signature has vouched for the policy, while the database itself is
/// still being copied and checked; nothing is compared, and no result is given, unless
/// every check of the baseline passes.
pub fn verify_db(
    db: &Path,
    key: &PublicKey,
    host: &HostRoot,
    progress: &ScanProgress,
) -> Result<(TrustedBaseline, VerifyReport)> {
    let seal = Seal::read_verified(db, key)?;
    let policy = Policy::from_yaml(&seal.policy, "the baseline's policy")
        .map_err(|e| crate::Error::Untrusted { path: db.to_owned(), reason: crate::error::chain(&e) })?;
    let (baseline, (entries, summary)) = std::thread::scope(|s| {
        let loader = s.spawn(|| TrustedBaseline::open_sealed(db, key, &seal));
        let scanned = rescan(&policy, host, db, progress);
        (loader.join().expect("loading the baseline does not panic"), scanned)
    });
    let baseline = baseline?;
    let report = report(&baseline, host, entries, &summary)?;
    Ok((baseline, report))
}

/// Compares scanned entries with the baseline: modified and added from the entries, removed
/// from the records no entry matched.
fn report(
    baseline: &TrustedBaseline,
    host: &HostRoot,
    entries: Vec<ScannedEntry>,
    summary: &ScanSummary,
) -> Result<VerifyReport> {
    let records = baseline.record_map()?;
    let seen: HashSet<&[u8]> = entries.iter().map(|e| path_bytes(&e.path)).collect();
    let mut changes: Vec<Change> = records
        .iter()
        .filter(|(k, _)| !seen.contains(k.as_slice()))
        .map(|(k, old)| Change {
            path: path_from_bytes(k).to_owned(),
            kind: ChangeKind::Removed,
            changed: Vec::new(),
            old: Some(old.clone()),
            new: None,
            diff: None,
            changed_ranges: None,
            mount: None,
        })
        .collect();
    drop(seen);
    let compared: Vec<Option<Change>> = entries
        .into_par_iter()
        .map(|e| {
            let old = records.get(path_bytes(&e.path));
            compare(baseline, e.path, old, e.record, e.content.as_deref())
        })
        .collect::<Result<_>>()?;
    changes.extend(compared.into_iter().flatten());
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    mark_mounts(&mut changes, &records, host);
    let errors =
        summary.incomplete().map(|w| VerifyError { path: w.path.clone(), message: w.message.clone() }).collect();
    Ok(VerifyReport { changes, errors, scanned: summary.entries })
}

/// Says which removed entries a mount made since the baseline hides (then `hidden`, not
/// `removed`: a tmpfs over a directory is not the directory's files deleted) and which
/// modified entries are a mount's target now (a bind mount over a file). Without a readable
/// mount table, nothing is said.
fn mark_mounts(changes: &mut [Change], records: &BTreeMap<Vec<u8>, FileRecord>, host: &HostRoot) {
    if !changes.iter().any(|c| matches!(c.kind, ChangeKind::Removed | ChangeKind::Modified)) {
        return;
    }
    let Ok(table) = MountTable::read() else { return };
    let named = |m: &Mount| MountedAt {
        target: host.logical(&m.target).map_or_else(|| display_path(&m.target), |p| display_path(&p)),
        fs_type: escape_bytes(m.fs_type.as_bytes()).0,
        source: escape_bytes(m.source.as_bytes()).0,
    };
    for c in changes.iter_mut() {
        let disk = host.disk(&c.path);
        match (c.kind, &c.old, &c.new) {
            (ChangeKind::Removed, Some(old), _) => {
                let recorded_dir = |target: &Path| {
                    let logical = host.logical(target)?;
                    records.get(path_bytes(&logical)).map(|r| (r.dev, r.inode))
                };
                if let Some(m) = hiding(&table, &disk, old.dev, recorded_dir) {
                    c.kind = ChangeKind::Hidden;
                    c.mount = Some(named(m));
                }
            }
            (ChangeKind::Modified, Some(old), Some(new)) if (old.dev, old.inode) != (new.dev, new.inode) => {
                c.mount = table.at(&disk).map(named);
            }
            _ => {}
        }
    }
}
