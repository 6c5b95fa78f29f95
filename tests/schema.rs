//! The JSON Schemas `kubefim schema verify|record` prints, checked against the real binary's
//! output: `verify --format json` on a tree with an added, a removed, a modified (with a diff)
//! and a non-UTF-8-named file, and every line of `baseline show --format jsonl` (a non-UTF-8
//! name, a symlink to a non-UTF-8 target, xattrs). A second test proves the validation can
//! fail: lines a little wrong are rejected.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;

use common::*;
use serde_json::{Value, json};

/// `kubefim schema WHICH`, parsed.
#[track_caller]
fn schema(which: &str) -> Value {
    let run = kubefim(["schema", which]);
    run.expect_code(0);
    assert!(run.stdout.contains("\n  \""), "the schema is not pretty-printed:\n{}", run.dump());
    run.json()
}

#[track_caller]
fn validator(which: &str) -> jsonschema::Validator {
    let schema = schema(which);
    jsonschema::draft202012::new(&schema)
        .unwrap_or_else(|err| panic!("`kubefim schema {which}` is not a valid JSON Schema: {err}\n{schema:#}"))
}

/// Why `instance` does not conform (empty when it does).
fn violations(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator.iter_errors(instance).map(|e| format!("{e} (at {})", e.instance_path())).collect()
}

#[track_caller]
fn assert_conforms(validator: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors = violations(validator, instance);
    assert!(errors.is_empty(), "{what} does not conform to its schema: {errors:#?}\n{instance:#}");
}

#[track_caller]
fn assert_rejected(validator: &jsonschema::Validator, instance: &Value, what: &str) {
    assert!(!validator.is_valid(instance), "the schema accepts {what}:\n{instance:#}");
}

#[track_caller]
fn write(path: &std::path::Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

/// A baseline of a tree with every kind of path the JSON escapes; returns the fixture.
fn fixture() -> Fixture {
    let fx = Fixture::new();
    write(&fx.t("notes.txt"), "header\nold line\nfooter\n");
    write(&fx.t("gone.txt"), "soon gone\n");
    write(&fx.tree().join(OsStr::from_bytes(b"bad\xffname\\x")), "odd name\n");
    symlink(OsStr::from_bytes(b"tgt\xfe"), fx.t("odd-link")).expect("symlink to a non-UTF-8 target");
    tool(
        "setfattr",
        [
            OsStr::new("-n"),
            OsStr::new("user.kubefim"),
            OsStr::new("-v"),
            OsStr::new("hello"),
            fx.t("notes.txt").as_os_str(),
        ],
    );
    let policy = fx.write_policy(&[Rule::new(fx.tree()).diff()]);
    fx.create(&policy);
    fx
}

#[test]
fn show_and_verify_output_conform_to_the_printed_schemas() {
    let fx = fixture();
    let record = validator("record");
    let lines = fx.show();
    for line in &lines {
        assert_conforms(&record, line, "a `baseline show --format jsonl` line");
    }
    // The lines exercised the optional keys.
    assert!(lines.iter().any(|l| l.get("path_hex").is_some()), "no line has path_hex: {lines:#?}");
    assert!(lines.iter().any(|l| l.get("link_target_hex").is_some()), "no line has link_target_hex: {lines:#?}");
    assert!(lines.iter().any(|l| l["xattrs"]["user.kubefim"] == "hello"), "no line has the xattr: {lines:#?}");

    write(&fx.t("notes.txt"), "header\nnew line\nfooter\n");
    fs::remove_file(fx.t("gone.txt")).expect("remove gone.txt");
    write(&fx.tree().join(OsStr::from_bytes(b"added\xfe")), "new\n");
    let report = fx.verify(1);
    assert_conforms(&validator("verify"), &report, "the `verify --format json` report");
    let change = change_for(&report, &fx.t("notes.txt"));
    assert!(change["diff"].is_string() && change["changed_ranges"].is_array(), "no diff or ranges: {change:#}");
    let kinds: Vec<&Value> = changes(&report).iter().map(|c| &c["kind"]).collect();
    for kind in ["added", "removed", "modified"] {
        assert!(kinds.iter().any(|k| *k == kind), "no {kind} change: {report:#}");
    }
    let added = hex::encode(fx.tree().join(OsStr::from_bytes(b"added\xfe")).as_os_str().as_bytes());
    assert!(changes(&report).iter().any(|c| c["path_hex"] == added.as_str()), "no non-UTF-8 added path: {report:#}");
}

#[test]
fn the_schemas_reject_wrong_output() {
    let fx = fixture();
    let record = validator("record");
    let lines = fx.show();
    let line = record_for(&lines, &fx.t("notes.txt"));
    assert_conforms(&record, line, "the unchanged line");
    let wrong = |edit: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut line = line.as_object().expect("a line is an object").clone();
        edit(&mut line);
        Value::Object(line)
    };
    assert_rejected(&record, &wrong(&|l| drop(l.insert("mode".into(), json!("0644")))), "a mode as a string");
    assert_rejected(&record, &wrong(&|l| drop(l.insert("type".into(), json!("door")))), "an unknown type");
    assert_rejected(&record, &wrong(&|l| drop(l.remove("hash"))), "a line without hash");
    assert_rejected(&record, &wrong(&|l| drop(l.insert("colour".into(), json!("red")))), "an unknown key");
    assert_rejected(&record, &wrong(&|l| drop(l.insert("path_hex".into(), json!("xyz")))), "a path_hex not in hex");
    assert_rejected(&record, &wrong(&|l| drop(l.insert("hash".into(), json!("abc")))), "a short hash");

    let verify = validator("verify");
    write(&fx.t("notes.txt"), "changed\n");
    let report = fx.verify(1);
    assert_conforms(&verify, &report, "the report");
    let mut renamed = report.clone();
    renamed["changes"][0]["kind"] = json!("renamed");
    assert_rejected(&verify, &renamed, "a change kind verify never prints");
    let mut no_clean = report.clone();
    no_clean["summary"].as_object_mut().expect("summary is an object").remove("clean");
    assert_rejected(&verify, &no_clean, "a summary without clean");
    let mut odd_attribute = report;
    odd_attribute["changes"][0]["changed"] = json!(["colour"]);
    assert_rejected(&verify, &odd_attribute, "an unknown attribute in changed");
}
