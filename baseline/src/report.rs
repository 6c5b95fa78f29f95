//! The JSON shapes of records and changes (the contract in docs/output-formats.md) as types:
//! [`RecordView`] (one record's attributes), [`RecordLine`] (`baseline show --format jsonl`),
//! [`ChangeView`] and [`VerifyReportView`] (`verify --format json`), built from the library's
//! own [`FileRecord`], [`Change`] and [`VerifyReport`] and shared with the watcher's event
//! stream. They derive `Serialize` (what is printed), `Deserialize` (for readers, tests
//! among them) and `JsonSchema` (`kubefim schema ...`, from [`output_schema`]); their doc
//! comments are the schema's descriptions. Bytes that are not UTF-8 are escaped reversibly
//! and also given as hex ([`EscapedField`]), so no byte is lost.

mod containers;
mod escaped;

use std::path::Path;

use indexmap::IndexMap;
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use self::containers::{
    ContainerRefView, ContainerReportView, ContainersReportView, ContainersSummary, PodRefView,
};
pub use self::escaped::{
    EscapedBytes, EscapedField, EscapedPath, FieldKeys, PathKeys, display_path, escape_bytes, human_path, human_text,
};
use crate::policy::{Attribute, Policy};
use crate::record::{FileKind, FileRecord};
use crate::verify::{Change, ChangeKind, MountedAt, VerifyError, VerifyReport};

/// The attributes of one recorded entry, as `baseline show` prints them after the path and
/// as `old` and `new` of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Record", deny_unknown_fields)]
pub struct RecordView {
    /// The file type.
    #[serde(rename = "type")]
    pub kind: FileKind,
    /// The size in bytes (`st_size`).
    pub size: u64,
    /// The permission bits including setuid, setgid and sticky (`st_mode & 0o7777`), as a number.
    pub mode: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's group id.
    pub gid: u32,
    /// The modification time in nanoseconds since the Unix epoch.
    pub mtime: i64,
    /// The status change time in nanoseconds since the Unix epoch.
    pub ctime: i64,
    /// The inode number.
    pub inode: u64,
    /// The hard link count.
    pub nlink: u64,
    /// The target of a symbolic link (escaped like a path, with `link_target_hex` when it is not UTF-8); null for anything else.
    pub link_target: Option<String>,
    /// The bytes of `link_target` in lowercase hex; present only when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "String", regex(pattern = r"^([0-9a-f]{2})+$"))]
    pub link_target_hex: Option<String>,
    /// The extended attributes (security.* labels, capabilities, POSIX ACLs, user.*), name to value in name order, both escaped like paths (without hex).
    pub xattrs: IndexMap<String, String>,
    /// The inode flags set with chattr, as FS_IOC_GETFLAGS returns them (0x10 immutable `i`, 0x20 append-only `a`, 0x40 no-dump `d`, 0x80 no-atime `A`, 0x8 sync `S`, ...; only the bits a user sets or that change what the file guarantees); null when not monitored, not readable on this entry (a symlink, a device, a file system without them), or recorded by a kubefim that did not record them.
    pub flags: Option<u32>,
    /// The BLAKE3 hash of the content in lowercase hex (equal to b3sum's); null when the content is not monitored, not a regular file's, or could not be read.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub hash: Option<String>,
    /// Why the entry could not be fully recorded (for example an unreadable file: its metadata is recorded, its content is not); null when it was.
    pub error: Option<String>,
    /// The root path of the policy rule that governs the entry; null if the policy has no such rule.
    pub rule: Option<String>,
}

impl RecordView {
    /// The view of `record`, whose rule index points into `policy` (the baseline's).
    pub fn new(record: &FileRecord, policy: &Policy) -> Self {
        let link_target = record.link_target.as_deref().map(EscapedBytes::new);
        let rule = usize::try_from(record.rule).ok().and_then(|i| policy.rules.get(i));
        RecordView {
            kind: record.kind,
            size: record.size,
            mode: record.mode,
            uid: record.uid,
            gid: record.gid,
            mtime: record.mtime_ns,
            ctime: record.ctime_ns,
            inode: record.inode,
            nlink: record.nlink,
            link_target_hex: link_target.as_ref().and_then(|t| t.hex.clone()),
            link_target: link_target.map(|t| t.text),
            xattrs: record.xattrs.iter().map(|(k, v)| (escape_bytes(k).0, escape_bytes(v).0)).collect(),
            flags: record.flags,
            hash: record.digest.as_ref().map(|d| d.hex()),
            error: record.error.clone(),
            rule: rule.map(|r| r.path.display().to_string()),
        }
    }
}

/// One line of `kubefim baseline show --format jsonl`: a recorded entry, its path first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct RecordLine {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// The record.
    #[serde(flatten)]
    pub record: RecordView,
}

impl RecordLine {
    /// The line of `record` at `path`, under `policy` (the baseline's).
    pub fn new(path: &Path, record: &FileRecord, policy: &Policy) -> Self {
        RecordLine { path: EscapedPath::of_path(path), record: RecordView::new(record, policy) }
    }
}

/// One difference between the baseline and now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Change", deny_unknown_fields)]
pub struct ChangeView {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// Added, removed, modified, or hidden (in the baseline, covered now by a mount made since: see `mount`).
    pub kind: ChangeKind,
    /// The attributes that differ, only those the entry's rule monitors, in this order: type, content, size, mode, uid, gid, mtime, ctime, inode, nlink, link_target, xattrs, flags; empty for added, removed and hidden entries.
    pub changed: Vec<Attribute>,
    /// The baseline's record; null for an added entry.
    pub old: Option<RecordView>,
    /// The record now; null for a removed entry.
    pub new: Option<RecordView>,
    /// A unified diff of the content; present only when the rule has `diff: true` and not `secret: true`, and the file is text of at most 1 MiB on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// The byte ranges `[start, end)` whose content differs, at 64 KiB granularity; present only when the content changed and was read on both sides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed_ranges: Option<Vec<[u64; 2]>>,
    /// For a `hidden` entry, the mount made since the baseline that covers it; for a modified entry, the mount whose target it now is (a bind mount over a file). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<MountedAt>,
}

impl ChangeView {
    /// The view of `change`, whose records' rule indexes point into `policy` (the baseline's).
    pub fn new(change: &Change, policy: &Policy) -> Self {
        ChangeView {
            path: EscapedPath::of_path(&change.path),
            kind: change.kind,
            changed: change.changed.clone(),
            old: change.old.as_ref().map(|r| RecordView::new(r, policy)),
            new: change.new.as_ref().map(|r| RecordView::new(r, policy)),
            diff: change.diff.clone(),
            changed_ranges: change.changed_ranges.clone(),
            mount: change.mount.clone(),
        }
    }
}

/// The document `kubefim verify --format json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "VerifyReport", deny_unknown_fields)]
pub struct VerifyReportView {
    /// The counts.
    pub summary: VerifySummary,
    /// Every difference, in path order (component by component).
    pub changes: Vec<ChangeView>,
    /// Every entry that could not be verified, in path order.
    pub errors: Vec<UnverifiedView>,
}

/// The counts of a verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct VerifySummary {
    /// How many entries are new since the baseline.
    pub added: u64,
    /// How many entries of the baseline are gone.
    pub removed: u64,
    /// How many entries differ in a monitored attribute.
    pub modified: u64,
    /// How many entries of the baseline are covered by a mount made since (not counted as removed).
    pub hidden: u64,
    /// How many entries could not be verified (listed in `errors`; they keep the report from being clean).
    pub unverified: u64,
    /// How many entries were scanned now.
    pub scanned: u64,
    /// True only when nothing changed and everything could be verified (verify then exits 0).
    pub clean: bool,
}

/// An entry that could not be verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(rename = "Unverified", deny_unknown_fields)]
pub struct UnverifiedView {
    /// The path.
    #[serde(flatten)]
    pub path: EscapedPath,
    /// Why it could not be verified.
    pub error: String,
}

impl UnverifiedView {
    /// The view of `error`.
    pub fn new(error: &VerifyError) -> Self {
        UnverifiedView { path: EscapedPath::of_path(&error.path), error: error.message.clone() }
    }
}

impl VerifyReportView {
    /// The view of `report`, whose records' rule indexes point into `policy` (the baseline's).
    pub fn new(report: &VerifyReport, policy: &Policy) -> Self {
        let count = |kind| report.count(kind) as u64;
        VerifyReportView {
            summary: VerifySummary {
                added: count(ChangeKind::Added),
                removed: count(ChangeKind::Removed),
                modified: count(ChangeKind::Modified),
                hidden: count(ChangeKind::Hidden),
                unverified: report.errors.len() as u64,
                scanned: report.scanned,
                clean: report.is_clean(),
            },
            changes: report.changes.iter().map(|c| ChangeView::new(c, policy)).collect(),
            errors: report.errors.iter().map(UnverifiedView::new).collect(),
        }
    }
}

/// The JSON Schema (draft 2020-12) of what kubefim prints as `T`: for the serialising side,
/// so a key that is always printed is required even when its value may be null.
pub fn output_schema<T: JsonSchema>() -> Schema {
    SchemaSettings::draft2020_12().for_serialize().into_generator().into_root_schema_for::<T>()
}

/// [`RecordView::new`] as a JSON object. Kept, with the same signature, for the watcher
/// (watcher/src/output.rs) until it builds its event lines on the types.
pub fn record_json(record: &FileRecord, policy: &Policy) -> Map<String, Value> {
    json_object(&RecordView::new(record, policy))
}

/// [`ChangeView::new`] as a JSON object. Kept, with the same signature, for the watcher
/// (watcher/src/output.rs) until it builds its event lines on the types.
pub fn change_json(change: &Change, policy: &Policy) -> Map<String, Value> {
    json_object(&ChangeView::new(change, policy))
}

fn json_object(view: &impl Serialize) -> Map<String, Value> {
    match serde_json::to_value(view) {
        Ok(Value::Object(o)) => o,
        other => unreachable!("a view serialises to a JSON object, not {other:?}"),
    }
}

#[cfg(test)]
mod golden;
