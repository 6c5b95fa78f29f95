//! Verify: rescan what a trusted baseline's policy names and compare each entry with its
//! record, attribute by attribute, producing [`Change`]s with content diffs (where the rule
//! keeps content) and changed byte ranges. Anything that could not be checked is an error
//! entry that keeps the report from being clean.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::baseline::TrustedBaseline;
use crate::error::Result;
use crate::hash::changed_ranges;
use crate::policy::{Attribute, path_bytes, path_from_bytes};
use crate::record::FileRecord;
use crate::scan::{Scan, ScanProgress, ScanSink, ScannedEntry};

/// What kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Not in the baseline, present now.
    Added,
    /// In the baseline, gone now.
    Removed,
    /// Present in both, some monitored attribute differs.
    Modified,
}

impl ChangeKind {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
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

/// Compares one current entry with its baseline record; `None` when they match.
pub fn compare(
    baseline: &TrustedBaseline,
    path: PathBuf,
    old: Option<&FileRecord>,
    new: FileRecord,
    new_content: Option<&[u8]>,
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
        }));
    };
    let rule = &baseline.policy.rules[usize::try_from(new.rule).expect("rule index fits")];
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
    };
    if change.changed.contains(&Attribute::Content) {
        if let (Some(a), Some(b)) = (&old.digest, &new.digest) {
            change.changed_ranges = Some(changed_ranges(a, old.size, b, new.size));
        }
        if let (true, Some(hash), Some(now)) = (old.content_stored && !rule.secret, old.hash(), new_content)
            && let Ok(now) = std::str::from_utf8(now)
            && let Some(before) = baseline.content(hash)?
            && let Ok(before) = std::str::from_utf8(&before)
        {
            change.diff = Some(unified_diff(&change.path, before, now));
        }
    }
    change.new = Some(new);
    Ok(Some(change))
}

struct VerifySink<'a> {
    baseline: &'a TrustedBaseline,
    seen: Mutex<HashSet<Vec<u8>>>,
    changes: Mutex<Vec<Change>>,
    failure: Mutex<Option<crate::Error>>,
}

impl ScanSink for VerifySink<'_> {
    fn entry(&self, entry: ScannedEntry) {
        let key = path_bytes(&entry.path).to_vec();
        let old = self.baseline.records.get(&key);
        self.seen.lock().expect("no panics while holding").insert(key);
        match compare(self.baseline, entry.path, old, entry.record, entry.content.as_deref()) {
            Ok(Some(change)) => self.changes.lock().expect("no panics while holding").push(change),
            Ok(None) => {}
            Err(e) => {
                self.failure.lock().expect("no panics while holding").get_or_insert(e);
            }
        }
    }
}

/// Rescans everything the baseline's policy names and reports every difference.
pub fn verify(baseline: &TrustedBaseline, progress: &ScanProgress) -> Result<VerifyReport> {
    let sink = VerifySink { baseline, seen: Mutex::default(), changes: Mutex::default(), failure: Mutex::default() };
    let summary = Scan::whole_policy(&baseline.policy)
        .skip(std::path::absolute(baseline.path()).unwrap_or_default())
        .run(&sink, progress);
    if let Some(e) = sink.failure.into_inner().expect("no panics while holding") {
        return Err(e);
    }
    let seen = sink.seen.into_inner().expect("no panics while holding");
    let mut changes = sink.changes.into_inner().expect("no panics while holding");
    for (k, old) in &baseline.records {
        if !seen.contains(k) {
            changes.push(Change {
                path: path_from_bytes(k).to_owned(),
                kind: ChangeKind::Removed,
                changed: Vec::new(),
                old: Some(old.clone()),
                new: None,
                diff: None,
                changed_ranges: None,
            });
        }
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    let errors =
        summary.incomplete().map(|w| VerifyError { path: w.path.clone(), message: w.message.clone() }).collect();
    Ok(VerifyReport { changes, errors, scanned: summary.entries })
}
