//! Watch mode on the real kernel: each test baselines a temp tree, starts `kubefim watch`
//! (which loads the real eBPF programs), performs one file operation from a real child
//! process, and asserts the exact report: path, kind, changed attributes, ops, the child's
//! pid and comm, the diff. Root only (CI runs as root); never skipped there.

mod common;

use std::fs;

use common::watch::{REPORT_WITHIN, Watcher, names, python, s, sh};
use common::{Fixture, is_root};

#[track_caller]
fn root_or_skip() -> bool {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "watch tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

#[test]
fn append_with_write_reports_content_diff_and_the_writer() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    fs::write(fx.t("conf.txt"), "alpha\nbeta\n").unwrap();
    let w = Watcher::start(&fx, None);
    let pid = python(&format!("f = open({:?}, 'a'); f.write('gamma\\n'); f.close()", s(&fx.t("conf.txt"))));
    let line = w.change_for(&fx.t("conf.txt"));
    assert_eq!(line["kind"], "modified");
    assert_eq!(names(&line, "changed"), ["content", "size", "mtime", "ctime"]);
    assert_eq!(names(&line, "ops"), ["write"]);
    assert_eq!(line["process"]["pid"], pid);
    assert_eq!(line["process"]["comm"], "python3");
    assert_eq!(line["baseline_match"], false);
    assert!(line["diff"].as_str().unwrap().contains("\n+gamma\n"), "{line:#}");
    assert!(line["container"].is_null());
    let _ = REPORT_WITHIN;
    let _ = sh;
    assert!(w.stop().success());
}
