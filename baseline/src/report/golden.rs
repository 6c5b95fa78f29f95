//! The JSON kubefim printed before its shapes became types, byte for byte: records (UTF-8 and
//! non-UTF-8 paths, a symlink, xattrs, an unknown rule), changes (one with a diff and changed
//! ranges) and a whole verify report. The literals were captured from the hand-assembled
//! `serde_json::Map` code that the types replaced; any change to key order, to a key that is
//! omitted or null, or to the escaping of bytes shows up here. The same literals read back
//! into the types.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::*;
use crate::hash::digest_bytes;
use crate::policy::Attribute;
use crate::record::FileKind;
use crate::verify::{ChangeKind, VerifyError};

fn policy() -> Policy {
    Policy::from_yaml(
        "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: golden}\nspec:\n  rules:\n    - path: /etc\n      diff: true\n    - path: /usr/bin\n",
        "golden",
    )
    .expect("the golden policy is valid")
}

fn path(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(bytes))
}

/// A regular file under rule 0, with a valid and an invalid UTF-8 xattr.
fn file(content: &[u8]) -> FileRecord {
    FileRecord {
        kind: FileKind::File,
        size: content.len() as u64,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_700_000_000_123_456_789,
        ctime_ns: 1_700_000_001_000_000_007,
        dev: 2049,
        inode: 1234,
        nlink: 1,
        link_target: None,
        xattrs: vec![
            (b"security.selinux".to_vec(), b"system_u:object_r:etc_t:s0\0".to_vec()),
            (b"user.bad\xff".to_vec(), b"v\xfe\\x".to_vec()),
        ],
        digest: Some(digest_bytes(content)),
        content_stored: true,
        rule: 0,
        error: None,
        flags: None,
    }
}

/// A symlink under rule 1.
fn symlink(target: &[u8]) -> FileRecord {
    FileRecord {
        kind: FileKind::Symlink,
        size: target.len() as u64,
        mode: 0o777,
        uid: 1000,
        gid: 100,
        mtime_ns: -5,
        ctime_ns: 0,
        dev: 2049,
        inode: 99,
        nlink: 1,
        link_target: Some(target.to_vec()),
        xattrs: Vec::new(),
        digest: None,
        content_stored: false,
        rule: 1,
        error: None,
        flags: None,
    }
}

/// A directory that could not be read, with a rule index the policy does not have.
fn unreadable() -> FileRecord {
    FileRecord {
        kind: FileKind::Dir,
        size: 4096,
        mode: 0o700,
        uid: 65534,
        gid: 65534,
        mtime_ns: 1,
        ctime_ns: 2,
        dev: 1,
        inode: 2,
        nlink: 3,
        link_target: None,
        xattrs: Vec::new(),
        digest: None,
        content_stored: false,
        rule: 7,
        error: Some("cannot read directory: Permission denied (os error 13)".into()),
        flags: None,
    }
}

fn modified_with_diff() -> Change {
    let mut new = file(b"header\nnew \"line\"\tend\nfooter\n");
    new.mtime_ns += 10;
    new.ctime_ns += 10;
    Change {
        path: path(b"/etc/hosts"),
        kind: ChangeKind::Modified,
        changed: vec![Attribute::Content, Attribute::Size, Attribute::Mtime, Attribute::Ctime],
        old: Some(file(b"header\nold line\nfooter\n")),
        new: Some(new),
        diff: Some(
            "--- /etc/hosts (baseline)\n+++ /etc/hosts (now)\n@@ -1,3 +1,3 @@\n header\n-old line\n+new \"line\"\tend\n footer\n"
                .into(),
        ),
        changed_ranges: Some(vec![[0, 65536], [131072, 131080]]),
        mount: None,
    }
}

fn report() -> VerifyReport {
    VerifyReport {
        changes: vec![
            modified_with_diff(),
            Change {
                path: path(b"/etc/new\xff\\name"),
                kind: ChangeKind::Added,
                changed: Vec::new(),
                old: None,
                new: Some(symlink(b"tgt\xfe")),
                diff: None,
                changed_ranges: None,
                mount: None,
            },
            Change {
                path: path(b"/usr/bin/gone"),
                kind: ChangeKind::Removed,
                changed: Vec::new(),
                old: Some(symlink(b"/usr/bin/real")),
                new: None,
                diff: None,
                changed_ranges: None,
                mount: None,
            },
            Change {
                path: path(b"/etc/ssh"),
                kind: ChangeKind::Modified,
                changed: vec![Attribute::Mode],
                old: Some(unreadable()),
                new: Some(unreadable()),
                diff: None,
                changed_ranges: None,
                mount: None,
            },
        ],
        errors: vec![
            VerifyError { path: path(b"/etc/shadow"), message: "cannot read: Permission denied (os error 13)".into() },
            VerifyError { path: path(b"/etc/\xe9t\xe9"), message: "vanished".into() },
        ],
        scanned: 42,
    }
}

const RECORD_FILE: &str = r#"{"type":"file","size":3,"mode":420,"uid":0,"gid":0,"mtime":1700000000123456789,"ctime":1700000001000000007,"inode":1234,"nlink":1,"link_target":null,"xattrs":{"security.selinux":"system_u:object_r:etc_t:s0\u0000","user.bad\\xff":"v\\xfe\\\\x"},"flags":null,"hash":"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85","error":null,"rule":"/etc"}"#;
const LINE_FILE: &str = r#"{"path":"/etc/hosts","type":"file","size":3,"mode":420,"uid":0,"gid":0,"mtime":1700000000123456789,"ctime":1700000001000000007,"inode":1234,"nlink":1,"link_target":null,"xattrs":{"security.selinux":"system_u:object_r:etc_t:s0\u0000","user.bad\\xff":"v\\xfe\\\\x"},"flags":null,"hash":"6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85","error":null,"rule":"/etc"}"#;
const LINE_SYMLINK: &str = r#"{"path":"/usr/bin/odd\\xfe\\\\link","path_hex":"2f7573722f62696e2f6f6464fe5c6c696e6b","type":"symlink","size":4,"mode":511,"uid":1000,"gid":100,"mtime":-5,"ctime":0,"inode":99,"nlink":1,"link_target":"tgt\\xfe","link_target_hex":"746774fe","xattrs":{},"flags":null,"hash":null,"error":null,"rule":"/usr/bin"}"#;
const LINE_UNREADABLE: &str = r#"{"path":"/etc/ssh","type":"dir","size":4096,"mode":448,"uid":65534,"gid":65534,"mtime":1,"ctime":2,"inode":2,"nlink":3,"link_target":null,"xattrs":{},"flags":null,"hash":null,"error":"cannot read directory: Permission denied (os error 13)","rule":null}"#;

const CHANGE_MODIFIED_WITH_DIFF: &str = r#"{"path":"/etc/hosts","kind":"modified","changed":["content","size","mtime","ctime"],"old":{"type":"file","size":23,"mode":420,"uid":0,"gid":0,"mtime":1700000000123456789,"ctime":1700000001000000007,"inode":1234,"nlink":1,"link_target":null,"xattrs":{"security.selinux":"system_u:object_r:etc_t:s0\u0000","user.bad\\xff":"v\\xfe\\\\x"},"flags":null,"hash":"4498c7c010197b814b54506400c4a9e0c5ea7f5a22ef02bea9a2d6a9b63f530a","error":null,"rule":"/etc"},"new":{"type":"file","size":29,"mode":420,"uid":0,"gid":0,"mtime":1700000000123456799,"ctime":1700000001000000017,"inode":1234,"nlink":1,"link_target":null,"xattrs":{"security.selinux":"system_u:object_r:etc_t:s0\u0000","user.bad\\xff":"v\\xfe\\\\x"},"flags":null,"hash":"31bc107d7bb0192db61ac46207e04b6fb0fdf3033df6ac1e2019a1acc553db87","error":null,"rule":"/etc"},"diff":"--- /etc/hosts (baseline)\n+++ /etc/hosts (now)\n@@ -1,3 +1,3 @@\n header\n-old line\n+new \"line\"\tend\n footer\n","changed_ranges":[[0,65536],[131072,131080]]}"#;
const CHANGE_ADDED_NON_UTF8: &str = r#"{"path":"/etc/new\\xff\\\\name","path_hex":"2f6574632f6e6577ff5c6e616d65","kind":"added","changed":[],"old":null,"new":{"type":"symlink","size":4,"mode":511,"uid":1000,"gid":100,"mtime":-5,"ctime":0,"inode":99,"nlink":1,"link_target":"tgt\\xfe","link_target_hex":"746774fe","xattrs":{},"flags":null,"hash":null,"error":null,"rule":"/usr/bin"}}"#;
const CHANGE_REMOVED: &str = r#"{"path":"/usr/bin/gone","kind":"removed","changed":[],"old":{"type":"symlink","size":13,"mode":511,"uid":1000,"gid":100,"mtime":-5,"ctime":0,"inode":99,"nlink":1,"link_target":"/usr/bin/real","xattrs":{},"flags":null,"hash":null,"error":null,"rule":"/usr/bin"},"new":null}"#;
const CHANGE_MODIFIED_UNREADABLE: &str = r#"{"path":"/etc/ssh","kind":"modified","changed":["mode"],"old":{"type":"dir","size":4096,"mode":448,"uid":65534,"gid":65534,"mtime":1,"ctime":2,"inode":2,"nlink":3,"link_target":null,"xattrs":{},"flags":null,"hash":null,"error":"cannot read directory: Permission denied (os error 13)","rule":null},"new":{"type":"dir","size":4096,"mode":448,"uid":65534,"gid":65534,"mtime":1,"ctime":2,"inode":2,"nlink":3,"link_target":null,"xattrs":{},"flags":null,"hash":null,"error":"cannot read directory: Permission denied (os error 13)","rule":null}}"#;

const SUMMARY: &str = r#"{"summary":{"added":1,"removed":1,"modified":2,"hidden":0,"unverified":2,"scanned":42,"clean":false},"changes":["#;
const ERRORS: &str = r#"],"errors":[{"path":"/etc/shadow","error":"cannot read: Permission denied (os error 13)"},{"path":"/etc/\\xe9t\\xe9","path_hex":"2f6574632fe974e9","error":"vanished"}]}"#;
const CLEAN: &str = r#"{"summary":{"added":0,"removed":0,"modified":0,"hidden":0,"unverified":0,"scanned":3,"clean":true},"changes":[],"errors":[]}"#;

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("serialises")
}

#[test]
fn record_line_of_a_file_with_xattrs() {
    assert_eq!(json(&RecordLine::new(&path(b"/etc/hosts"), &file(b"abc"), &policy())), LINE_FILE);
}

#[test]
fn record_line_of_a_non_utf8_symlink_has_path_hex_and_link_target_hex() {
    assert_eq!(json(&RecordLine::new(&path(b"/usr/bin/odd\xfe\\link"), &symlink(b"tgt\xfe"), &policy())), LINE_SYMLINK);
}

#[test]
fn record_line_of_an_unreadable_entry_has_its_error_and_a_null_unknown_rule() {
    assert_eq!(json(&RecordLine::new(&path(b"/etc/ssh"), &unreadable(), &policy())), LINE_UNREADABLE);
}

#[test]
fn the_literals_read_back_into_the_views() {
    let policy = policy();
    let line: RecordLine = serde_json::from_str(LINE_SYMLINK).expect("a record line");
    assert_eq!(line, RecordLine::new(&path(b"/usr/bin/odd\xfe\\link"), &symlink(b"tgt\xfe"), &policy));
    let changes = [CHANGE_MODIFIED_WITH_DIFF, CHANGE_ADDED_NON_UTF8, CHANGE_REMOVED, CHANGE_MODIFIED_UNREADABLE];
    let read: VerifyReportView =
        serde_json::from_str(&[SUMMARY, &changes.join(","), ERRORS].concat()).expect("a report");
    assert_eq!(read, VerifyReportView::new(&report(), &policy));
}

#[test]
fn enum_names_are_their_serde_names() {
    let name = |v: Value| v.as_str().expect("a unit variant is a string").to_owned();
    for a in Attribute::ALL {
        assert_eq!(name(serde_json::to_value(a).unwrap()), a.name());
    }
    use FileKind::*;
    for k in [File, Dir, Symlink, Fifo, Socket, Char, Block] {
        assert_eq!(name(serde_json::to_value(k).unwrap()), k.name());
    }
    for k in [ChangeKind::Added, ChangeKind::Removed, ChangeKind::Modified] {
        assert_eq!(name(serde_json::to_value(k).unwrap()), k.name());
    }
}

#[test]
fn record_json_is_the_line_without_its_path() {
    assert_eq!(json(&record_json(&file(b"abc"), &policy())), RECORD_FILE);
}

#[test]
fn change_json_of_a_modification_with_diff_and_ranges() {
    assert_eq!(json(&change_json(&modified_with_diff(), &policy())), CHANGE_MODIFIED_WITH_DIFF);
}

#[test]
fn verify_report_with_every_kind_of_change_and_errors() {
    let changes = [CHANGE_MODIFIED_WITH_DIFF, CHANGE_ADDED_NON_UTF8, CHANGE_REMOVED, CHANGE_MODIFIED_UNREADABLE];
    let want = [SUMMARY, &changes.join(","), ERRORS].concat();
    assert_eq!(json(&VerifyReportView::new(&report(), &policy())), want);
}

#[test]
fn clean_verify_report() {
    assert_eq!(json(&VerifyReportView::new(&VerifyReport { scanned: 3, ..VerifyReport::default() }, &policy())), CLEAN);
}

/// Panics unless `json` conforms to the schema `kubefim schema` prints for `T`.
#[track_caller]
fn assert_conforms<T: JsonSchema>(json: &str) {
    let schema = serde_json::to_value(output_schema::<T>()).expect("a schema is JSON");
    let validator = jsonschema::draft202012::new(&schema).expect("the generated schema is a valid schema");
    let instance: Value = serde_json::from_str(json).expect("the literal is JSON");
    let errors: Vec<String> =
        validator.iter_errors(&instance).map(|e| format!("{e} at {}", e.instance_path())).collect();
    assert!(errors.is_empty(), "{json}\ndoes not conform to its schema: {errors:#?}\n{schema:#}");
}

#[test]
fn the_literals_conform_to_the_schemas() {
    for line in [LINE_FILE, LINE_SYMLINK, LINE_UNREADABLE] {
        assert_conforms::<RecordLine>(line);
    }
    assert_conforms::<RecordView>(RECORD_FILE);
    let changes = [CHANGE_MODIFIED_WITH_DIFF, CHANGE_ADDED_NON_UTF8, CHANGE_REMOVED, CHANGE_MODIFIED_UNREADABLE];
    for change in changes {
        assert_conforms::<ChangeView>(change);
    }
    assert_conforms::<VerifyReportView>(&[SUMMARY, &changes.join(","), ERRORS].concat());
    assert_conforms::<VerifyReportView>(CLEAN);
}
