//! Verify: rescan what a trusted baseline's policy names and compare each entry with its
//! record, attribute by attribute, producing [`Change`]s with content diffs (where the rule
//! keeps content) and changed byte ranges. An entry a mount made since covers is `hidden`,
//! not `removed` (`mounts`). Anything that could not be checked is an error entry that keeps
//! the report from being clean.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, mpsc};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::baseline::TrustedBaseline;
use crate::error::Result;
use crate::hash::changed_ranges;
use crate::lock::lock_path;
use crate::mounts::{Mount, MountTable, hiding};
use crate::policy::{Attribute, Policy, path_from_bytes};
use crate::record::{FileRecord, PathRecord};
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

/// How many entries go to the comparison at a time.
const BATCH: usize = 1024;

/// Batches the rescan may be ahead of the comparison: while the baseline is still being
/// copied and checked, the rescan runs this far before it waits (about 10 MB of records).
const AHEAD: usize = 32;

/// Hands the rescan's entries, in path order, to the comparison on another thread.
struct Ahead {
    tx: mpsc::SyncSender<Vec<ScannedEntry>>,
    batch: Mutex<Vec<ScannedEntry>>,
}

impl ScanSink for Ahead {
    fn entry(&self, entry: ScannedEntry) {
        let mut batch = self.batch.lock().unwrap_or_else(PoisonError::into_inner);
        batch.push(entry);
        if batch.len() == BATCH {
            // The comparison gone (it failed, and says why): the rest is wasted, not wrong.
            let _ = self.tx.send(std::mem::replace(&mut *batch, Vec::with_capacity(BATCH)));
        }
    }
}

/// Rescans what `policy` names, sending the entries in path order to `tx`.
fn rescan(
    policy: &Policy,
    host: &HostRoot,
    db: &Path,
    progress: &ScanProgress,
    tx: mpsc::SyncSender<Vec<ScannedEntry>>,
) -> ScanSummary {
    let sink = Ahead { tx, batch: Mutex::new(Vec::with_capacity(BATCH)) };
    let summary = Scan::whole_policy(policy).under(host).skip(db).skip(&lock_path(db)).run(&sink, progress);
    let rest = sink.batch.into_inner().unwrap_or_else(PoisonError::into_inner);
    if !rest.is_empty() {
        let _ = sink.tx.send(rest);
    }
    summary
}

/// Rescans everything a trusted baseline's policy names and reports every difference.
pub fn verify(baseline: &TrustedBaseline, host: &HostRoot, progress: &ScanProgress) -> Result<VerifyReport> {
    let records = baseline.records_in_order("verified")?;
    let (tx, rx) = mpsc::sync_channel(AHEAD);
    std::thread::scope(|s| {
        let scanner = s.spawn(|| rescan(&baseline.policy, host, baseline.path(), progress, tx));
        let changes = merge(baseline, host, records, rx);
        let summary = scanner.join().expect("the scan does not panic");
        Ok(report(baseline, host, changes?, &summary))
    })
}

/// Opens the baseline at `db` and verifies the machine against it. The rescan starts as
/// soon as the seal's signature has vouched for the policy, while the database itself is
/// still being copied and checked (it runs [`AHEAD`] batches ahead, then waits); nothing is
/// compared, and no result is given, unless every check of the baseline passes.
pub fn verify_db(
    db: &Path,
    key: &PublicKey,
    host: &HostRoot,
    progress: &ScanProgress,
) -> Result<(TrustedBaseline, VerifyReport)> {
    let seal = Seal::read_verified(db, key)?;
    let policy = Policy::from_yaml(&seal.policy, "the baseline's policy")
        .map_err(|e| crate::Error::Untrusted { path: db.to_owned(), reason: crate::error::chain(&e) })?;
    let (tx, rx) = mpsc::sync_channel(AHEAD);
    let (baseline, changes, summary) = std::thread::scope(|s| {
        let scanner = s.spawn(|| rescan(&policy, host, db, progress, tx));
        let baseline = TrustedBaseline::open_sealed(db, key, &seal);
        // On any failure the receiver goes with it, and the rescan runs to its end unheard.
        let changes = match &baseline {
            Ok(b) => b.records_in_order("verified").and_then(|records| merge(b, host, records, rx)),
            Err(_) => {
                drop(rx);
                Ok(Vec::new())
            }
        };
        (baseline, changes, scanner.join().expect("the scan does not panic"))
    });
    let baseline = baseline?;
    let report = report(&baseline, host, changes?, &summary);
    Ok((baseline, report))
}

/// Compares the rescan's entries with the baseline's records, both in path order, in one
/// pass: a path only the rescan has is added, one only the baseline has is removed, one
/// both have is compared. What is held is a chunk of records and the batches in flight.
fn merge(
    baseline: &TrustedBaseline,
    host: &HostRoot,
    records: impl Iterator<Item = Result<PathRecord>>,
    scanned: mpsc::Receiver<Vec<ScannedEntry>>,
) -> Result<Vec<Change>> {
    let mut records = records.peekable();
    let mut scanned = scanned.into_iter().flatten().peekable();
    let mut changes = Vec::new();
    loop {
        let order = match (records.peek(), scanned.peek()) {
            (None, None) => return Ok(changes),
            (Some(Err(_)), _) => return Err(records.next().expect("peeked").expect_err("peeked an error")),
            (Some(Ok((path, _))), Some(entry)) => path_from_bytes(path).cmp(&entry.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
        };
        let change = match order {
            std::cmp::Ordering::Less => {
                let (path, old) = records.next().expect("peeked")?;
                Some(removed(path_from_bytes(&path).to_owned(), old))
            }
            std::cmp::Ordering::Greater => {
                let entry = scanned.next().expect("peeked");
                compare(baseline, entry.path, None, entry.record, None)?
            }
            std::cmp::Ordering::Equal => {
                let (_, old) = records.next().expect("peeked")?;
                let entry = scanned.next().expect("peeked");
                let text =
                    diffable(&old, &entry.record).then(|| reread(&baseline.policy, host, &entry.path, &entry.record));
                compare(baseline, entry.path, Some(&old), entry.record, text.flatten().as_deref())?
            }
        };
        changes.extend(change);
    }
}

fn removed(path: PathBuf, old: FileRecord) -> Change {
    Change {
        path,
        kind: ChangeKind::Removed,
        changed: Vec::new(),
        old: Some(old),
        new: None,
        diff: None,
        changed_ranges: None,
        mount: None,
    }
}

/// Whether a diff may be shown: both sides text kept for diffs, and different.
fn diffable(old: &FileRecord, new: &FileRecord) -> bool {
    old.content_stored && new.content_stored && old.hash() != new.hash()
}

/// The text of `path` for a diff, read again (the rescan keeps no content: a text file is
/// held only while it is hashed), only if it still hashes to what the rescan recorded. If
/// it changed again since, a diff of it would not be of the change reported: none is shown.
fn reread(policy: &Policy, host: &HostRoot, path: &Path, recorded: &FileRecord) -> Option<Vec<u8>> {
    let now = crate::scan::rehash(path, policy, host)?.ok()?;
    if now.record.hash().is_some() && now.record.hash() == recorded.hash() {
        now.content
    } else {
        tracing::warn!(path = %path.display(), "changed again after it was verified; its diff is not shown");
        None
    }
}

/// The report: the changes (mounts said), and as errors whatever could not be checked.
fn report(
    baseline: &TrustedBaseline,
    host: &HostRoot,
    mut changes: Vec<Change>,
    summary: &ScanSummary,
) -> VerifyReport {
    mark_mounts(&mut changes, baseline, host);
    let errors =
        summary.incomplete().map(|w| VerifyError { path: w.path.clone(), message: w.message.clone() }).collect();
    VerifyReport { changes, errors, scanned: summary.entries }
}

/// Says which removed entries a mount made since the baseline hides (then `hidden`, not
/// `removed`: a tmpfs over a directory is not the directory's files deleted) and which
/// modified entries are a mount's target now (a bind mount over a file). Without a readable
/// mount table, nothing is said.
fn mark_mounts(changes: &mut [Change], baseline: &TrustedBaseline, host: &HostRoot) {
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
                    baseline.find(&logical).ok().flatten().map(|r| (r.dev, r.inode))
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
