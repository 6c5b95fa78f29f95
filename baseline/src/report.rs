//! JSON shapes of records and changes (the contract in docs/output-formats.md), shared by
//! `baseline show`, `verify` and the watcher's event stream. Paths that are not UTF-8 are
//! escaped reversibly and also given as hex, so no byte is lost.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::policy::{Policy, path_bytes};
use crate::record::FileRecord;
use crate::verify::{Change, VerifyReport};

/// Bytes as a JSON string: UTF-8 as is; otherwise invalid bytes as `\xNN` and backslashes
/// doubled. The bool says whether escaping was needed.
pub fn escape_bytes(bytes: &[u8]) -> (String, bool) {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return (s.to_owned(), false);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    (out, true)
}

/// Inserts `key` (and `key_hex` when the bytes are not UTF-8) into `obj`.
fn put_bytes(obj: &mut Map<String, Value>, key: &str, bytes: &[u8]) {
    let (s, escaped) = escape_bytes(bytes);
    obj.insert(key.to_owned(), Value::String(s));
    if escaped {
        obj.insert(format!("{key}_hex"), Value::String(hex::encode(bytes)));
    }
}

/// A path for human output: lossless escape of non-UTF-8 bytes.
pub fn display_path(path: &Path) -> String {
    escape_bytes(path_bytes(path)).0
}

/// A record's attributes as a JSON object (without the path), with the root of the rule
/// that governs it.
pub fn record_json(record: &FileRecord, policy: &Policy) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("type".into(), json!(record.kind.name()));
    o.insert("size".into(), json!(record.size));
    o.insert("mode".into(), json!(record.mode));
    o.insert("uid".into(), json!(record.uid));
    o.insert("gid".into(), json!(record.gid));
    o.insert("mtime".into(), json!(record.mtime_ns));
    o.insert("ctime".into(), json!(record.ctime_ns));
    o.insert("inode".into(), json!(record.inode));
    o.insert("nlink".into(), json!(record.nlink));
    match &record.link_target {
        Some(t) => put_bytes(&mut o, "link_target", t),
        None => {
            o.insert("link_target".into(), Value::Null);
        }
    }
    let xattrs: Map<String, Value> =
        record.xattrs.iter().map(|(k, v)| (escape_bytes(k).0, Value::String(escape_bytes(v).0))).collect();
    o.insert("xattrs".into(), Value::Object(xattrs));
    o.insert("hash".into(), record.digest.as_ref().map_or(Value::Null, |d| json!(d.hex())));
    o.insert("error".into(), record.error.as_ref().map_or(Value::Null, |e| json!(e)));
    let rule = usize::try_from(record.rule).ok().and_then(|i| policy.rules.get(i));
    o.insert("rule".into(), rule.map_or(Value::Null, |r| json!(r.path.display().to_string())));
    o
}

/// A record with its path, as `baseline show --format jsonl` prints it.
pub fn record_line(path: &Path, record: &FileRecord, policy: &Policy) -> Value {
    let mut o = Map::new();
    put_bytes(&mut o, "path", path_bytes(path));
    o.extend(record_json(record, policy));
    Value::Object(o)
}

/// One change as a JSON object.
pub fn change_json(change: &Change, policy: &Policy) -> Map<String, Value> {
    let mut o = Map::new();
    put_bytes(&mut o, "path", path_bytes(&change.path));
    o.insert("kind".into(), json!(change.kind.name()));
    o.insert("changed".into(), json!(change.changed.iter().map(|a| a.name()).collect::<Vec<_>>()));
    let side = |r: &Option<FileRecord>| r.as_ref().map_or(Value::Null, |r| Value::Object(record_json(r, policy)));
    o.insert("old".into(), side(&change.old));
    o.insert("new".into(), side(&change.new));
    if let Some(diff) = &change.diff {
        o.insert("diff".into(), json!(diff));
    }
    if let Some(ranges) = &change.changed_ranges {
        o.insert("changed_ranges".into(), json!(ranges));
    }
    o
}

/// The whole verify report, as `verify --format json` prints it.
pub fn verify_json(report: &VerifyReport, policy: &Policy) -> Value {
    use crate::verify::ChangeKind::{Added, Modified, Removed};
    let errors: Vec<Value> = report
        .errors
        .iter()
        .map(|e| {
            let mut o = Map::new();
            put_bytes(&mut o, "path", path_bytes(&e.path));
            o.insert("error".into(), json!(e.message));
            Value::Object(o)
        })
        .collect();
    json!({
        "summary": {
            "added": report.count(Added),
            "removed": report.count(Removed),
            "modified": report.count(Modified),
            "unverified": report.errors.len(),
            "scanned": report.scanned,
            "clean": report.is_clean(),
        },
        "changes": report.changes.iter().map(|c| Value::Object(change_json(c, policy))).collect::<Vec<_>>(),
        "errors": errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_only_what_is_not_utf8() {
        assert_eq!(escape_bytes(b"/etc/a\\b"), ("/etc/a\\b".into(), false));
        assert_eq!(escape_bytes(b"bad\xffname\\x"), ("bad\\xffname\\\\x".into(), true));
    }
}

#[cfg(test)]
mod golden;
