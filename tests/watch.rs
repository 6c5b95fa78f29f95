//! Watch mode on the real kernel: each test baselines a temp tree, starts `kubefim watch`
//! (which loads the real eBPF programs), performs one file operation from a real child
//! process, and asserts the exact report: path, kind, changed attributes, ops, the child's
//! pid and comm, the diff. Root only (CI runs as root); never skipped there.

mod common;
mod watch_blind_spots;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::watch::{REPORT_WITHIN, Watcher, is_change, names, python, run_child, s, sh};
use common::{Fixture, Rule, is_root};
use serde_json::{Value, json};

#[track_caller]
fn root_or_skip() -> bool {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "watch tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

/// The content most tests start from (11 bytes).
const ORIGINAL: &str = "alpha\nbeta\n";

/// `path` as a Python string literal.
fn lit(path: &Path) -> String {
    format!("{:?}", s(path))
}

/// Writes a fixture file and makes it durable before the baseline: dirty pages left to the
/// kernel's flusher would be written back mid-test, by a kernel thread (see
/// [`writeback_by_the_kernel_flusher_is_not_reported_as_a_store`]).
#[track_caller]
fn put(path: &Path, content: &str) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(content.as_bytes()).unwrap();
    f.sync_all().unwrap();
}

/// A fixture whose tree holds `name` with [`ORIGINAL`], a watcher on it, and the file's path.
/// Each test uses a name of its own: a path event about a same-named file elsewhere (a
/// parallel test's cleanup) may have the watcher consider this one too, by design when the
/// actor is gone before its path is resolved.
#[track_caller]
fn one_file(name: &str) -> (Fixture, Watcher, PathBuf) {
    let fx = Fixture::on_disk();
    put(&fx.t(name), ORIGINAL);
    let w = Watcher::start(&fx, None);
    let path = fx.t(name);
    (fx, w, path)
}

/// Panics unless the report has this kind, these changed attributes and these ops.
#[track_caller]
fn assert_change(line: &Value, kind: &str, changed: &[&str], ops: &[&str]) {
    assert_eq!(line["kind"], kind, "kind of {line:#}");
    assert_eq!(names(line, "changed"), changed, "changed of {line:#}");
    assert_eq!(names(line, "ops"), ops, "ops of {line:#}");
}

/// Panics unless `line` is an event report of the child `pid` named `comm`, on the host.
#[track_caller]
fn assert_actor(line: &Value, pid: u32, comm: &str) {
    assert_eq!(line["process"]["pid"], pid, "not attributed to the child: {line:#}");
    assert_eq!(line["process"]["comm"], comm, "{line:#}");
    assert_eq!(line["detected_by"], "event", "{line:#}");
    assert!(line["container"].is_null(), "a host process has no container: {line:#}");
}

/// The report's diff text; panics if there is none.
#[track_caller]
fn diff_of(line: &Value) -> &str {
    line["diff"].as_str().unwrap_or_else(|| panic!("no diff in {line:#}"))
}

/// The `n`-th (from 0) change report for `path`, waiting up to [`REPORT_WITHIN`].
#[track_caller]
fn nth_change_for(w: &Watcher, path: &Path, n: usize) -> Value {
    let deadline = Instant::now() + REPORT_WITHIN;
    loop {
        let changes = w.changes_for(path);
        if let Some(line) = changes.get(n) {
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no report #{n} of {} within {REPORT_WITHIN:?}\n{}",
            path.display(),
            w.dump()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Panics if, within a second, the watcher reports any change at all or prints any line
/// that names `outside` (where the child worked, outside the monitored tree).
#[track_caller]
fn assert_quiet_about(w: &Watcher, outside: &Path) {
    w.assert_nothing_under(outside, Duration::from_secs(1));
    let changes: Vec<Value> = w.lines().into_iter().filter(is_change).collect();
    assert!(changes.is_empty(), "changes reported though nothing monitored changed: {changes:#?}\n{}", w.dump());
    let needle = s(outside);
    let mentions: Vec<Value> = w.lines().into_iter().filter(|l| l.to_string().contains(&needle)).collect();
    assert!(mentions.is_empty(), "lines that name {needle}: {mentions:#?}\n{}", w.dump());
}

/// Sets a file's mtime to `secs` after the epoch.
#[track_caller]
fn set_mtime(path: &Path, secs: u64) {
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    f.sync_all().unwrap();
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
    assert!(w.stop().success());
}

#[test]
fn overwrite_in_place_with_write_keeps_the_size() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("overwrite.conf");
    let pid =
        python(&format!("import os; fd = os.open({}, os.O_WRONLY); os.write(fd, b'ALPHA'); os.close(fd)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "mtime", "ctime"], &["write"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 11, "{line:#}");
    assert!(diff_of(&line).contains("\n-alpha\n+ALPHA\n"), "{line:#}");
    assert_eq!(line["changed_ranges"], json!([[0, 11]]), "{line:#}");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn pwrite_in_the_middle_reports_the_changed_line() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("pwrite.conf");
    let pid =
        python(&format!("import os; fd = os.open({}, os.O_WRONLY); os.pwrite(fd, b'BETA', 6); os.close(fd)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "mtime", "ctime"], &["write"]);
    assert_actor(&line, pid, "python3");
    assert!(diff_of(&line).contains("\n alpha\n-beta\n+BETA\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn writev_append_reports_the_new_line() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("writev.conf");
    let pid = python(&format!(
        "import os; fd = os.open({}, os.O_WRONLY | os.O_APPEND); os.writev(fd, [b'gam', b'ma\\n']); os.close(fd)",
        lit(&p)
    ));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["write"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 17, "{line:#}");
    assert!(diff_of(&line).contains("\n beta\n+gamma\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn open_with_o_trunc_then_write_reports_truncate_and_write() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("otrunc.conf");
    let pid = python(&format!("f = open({}, 'w'); f.write('fresh\\n'); f.close()", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate", "write"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 6, "{line:#}");
    assert!(diff_of(&line).contains("\n-alpha\n-beta\n+fresh\n"), "{line:#}");
    assert!(w.stop().success());
}

/// The raw open syscalls that libc wrappers never reach (open, creat, openat2), each from
/// one child: the watcher finds every open's flags, whichever syscall carried them.
#[test]
fn every_open_syscall_reports_its_truncate_and_its_create() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let names = ["open.conf", "creat.conf", "openat2.conf"];
    for name in names {
        put(&fx.t(name), ORIGINAL);
    }
    let w = Watcher::start(&fx, None);
    let [open, creat, openat2] = names.map(|n| fx.t(n));
    let created = fx.t("openat2-created.conf");
    let pid = python(&format!(
        "import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
class How(ctypes.Structure):
    _fields_ = [('flags', ctypes.c_uint64), ('mode', ctypes.c_uint64), ('resolve', ctypes.c_uint64)]
def done(fd):
    if fd < 0:
        raise OSError(ctypes.get_errno(), 'open')
    os.close(fd)
def openat2(path, flags, mode):
    how = How(flags, mode, 0)
    return libc.syscall(437, -100, path, ctypes.byref(how), ctypes.sizeof(how))
done(libc.syscall(2, b{open}, os.O_WRONLY | os.O_TRUNC, 0))
done(libc.syscall(85, b{creat}, 0o644))
done(openat2(b{openat2}, os.O_WRONLY | os.O_TRUNC, 0))
done(openat2(b{created}, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))",
        open = lit(&open),
        creat = lit(&creat),
        openat2 = lit(&openat2),
        created = lit(&created),
    ));
    for path in [&open, &creat, &openat2] {
        let line = w.change_for(path);
        assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate"]);
        assert_actor(&line, pid, "python3");
        assert_eq!(line["new"]["size"], 0, "{line:#}");
    }
    let line = w.change_for(&created);
    assert_change(&line, "added", &[], &["create"]);
    assert_actor(&line, pid, "python3");
    assert!(w.stop().success());
}

#[test]
fn truncate_by_path_reports_the_cut_line() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("truncate.conf");
    let pid = python(&format!("import os; os.truncate({}, 6)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 6, "{line:#}");
    assert!(diff_of(&line).contains("\n alpha\n-beta\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn ftruncate_reports_truncate() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("ftruncate.conf");
    let pid = python(&format!("import os; fd = os.open({}, os.O_WRONLY); os.ftruncate(fd, 6); os.close(fd)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 6, "{line:#}");
    assert!(diff_of(&line).contains("\n alpha\n-beta\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn fallocate_growing_the_file_reports_fallocate_and_no_diff_of_the_zeros() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("fallocate.conf");
    let pid = python(&format!(
        "import os; fd = os.open({}, os.O_WRONLY); os.posix_fallocate(fd, 0, 8192); os.close(fd)",
        lit(&p)
    ));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["fallocate"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 8192, "{line:#}");
    // NUL bytes are not text: no diff, but the changed range is there.
    assert!(line["diff"].is_null(), "{line:#}");
    assert_eq!(line["changed_ranges"], json!([[0, 8192]]), "{line:#}");
    assert!(w.stop().success());
}

/// Python: `libc` through ctypes with `mmap`, `msync` and `munmap` typed for 64-bit pointers.
const CTYPES_MMAP: &str = "import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
";

#[test]
fn store_through_a_shared_mapping_after_close_reports_mmap() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("mmap.conf");
    // ctypes, not Python's mmap module: that one keeps a dup of the fd open.
    let code = format!(
        "{CTYPES_MMAP}fd = os.open({}, os.O_RDWR)
addr = libc.mmap(None, 11, 3, 1, fd, 0)
assert addr is not None and addr != ctypes.c_void_p(-1).value, ctypes.get_errno()
os.close(fd)
time.sleep(0.3)
ctypes.memmove(addr, b'ALPHA', 5)
assert libc.msync(addr, 11, 4) == 0, ctypes.get_errno()
assert libc.munmap(addr, 11) == 0
",
        lit(&p)
    );
    let pid = python(&code);
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "mtime", "ctime"], &["mmap"]);
    assert_actor(&line, pid, "python3");
    assert!(diff_of(&line).contains("\n-alpha\n+ALPHA\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn io_uring_write_by_fio_reports_io_uring_and_the_job() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let p = fx.t("uring.data");
    let text: String = (0..5000).map(|i| format!("line {i:05} of text ok\n")).collect();
    put(&p, &text[..100 * 1024]);
    let w = Watcher::start(&fx, None);
    let mut fio = Command::new("fio");
    fio.args(["--name=w", "--ioengine=io_uring", "--rw=write", "--bs=4k", "--size=8k"])
        .arg(format!("--filename={}", s(&p)));
    let pid = run_child(fio);
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "mtime", "ctime"], &["io_uring"]);
    // fio runs its job in a process of its own, forked by the one we started.
    assert_eq!(line["process"]["ppid"], pid, "not fio's job: {line:#}");
    assert_eq!(line["process"]["comm"], "fio", "{line:#}");
    assert_eq!(line["detected_by"], "event", "{line:#}");
    assert_eq!(line["new"]["size"], 100 * 1024, "{line:#}");
    // fio's buffers are not text; its 8 KiB are in the first 64 KiB range.
    assert!(line["diff"].is_null(), "{line:#}");
    assert_eq!(line["changed_ranges"], json!([[0, 65536]]), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn rename_from_an_unmonitored_sibling_over_a_monitored_file_reports_a_new_inode() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    fs::create_dir(fx.path("outside")).unwrap();
    let p = fx.t("replaced.conf");
    put(&p, ORIGINAL);
    let w = Watcher::start(&fx, None);
    let incoming = fx.path("outside/incoming.conf");
    let pid = python(&format!(
        "import os\nwith open({src}, 'w') as f: f.write('replaced\\n')\nos.rename({src}, {dst})",
        src = lit(&incoming),
        dst = lit(&p)
    ));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime", "inode"], &["rename"]);
    assert_actor(&line, pid, "python3");
    assert!(diff_of(&line).contains("\n-alpha\n-beta\n+replaced\n"), "{line:#}");
    assert_eq!(w.changes_for(&incoming), Vec::<Value>::new(), "the source is not monitored\n{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn rename_exchange_of_two_monitored_files_reports_both() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let (a, b) = (fx.t("xchg-a.conf"), fx.t("xchg-b.conf"));
    put(&a, "apple\n");
    put(&b, "banana!\n");
    // Distinct mtimes whatever the timestamp granularity.
    set_mtime(&a, 1_000_000_000);
    set_mtime(&b, 1_100_000_000);
    let w = Watcher::start(&fx, None);
    let pid = python(&format!(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         r = libc.renameat2(-100, os.fsencode({a}), -100, os.fsencode({b}), 2)  # RENAME_EXCHANGE\n\
         assert r == 0, os.strerror(ctypes.get_errno())",
        a = lit(&a),
        b = lit(&b)
    ));
    let la = w.change_for(&a);
    let lb = w.change_for(&b);
    for (line, before, after) in [(&la, "apple", "banana!"), (&lb, "banana!", "apple")] {
        assert_change(line, "modified", &["content", "size", "mtime", "ctime", "inode"], &["rename"]);
        assert_actor(line, pid, "python3");
        assert!(diff_of(line).contains(&format!("\n-{before}\n+{after}\n")), "{line:#}");
    }
    assert_eq!(la["new"]["inode"], lb["old"]["inode"], "a is b's inode now:\n{la:#}\n{lb:#}");
    assert_eq!(lb["new"]["inode"], la["old"]["inode"], "b is a's inode now:\n{la:#}\n{lb:#}");
    assert!(w.stop().success());
}

#[test]
fn unlink_reports_removed() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("unlink.conf");
    let pid = python(&format!("import os; os.unlink({})", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "removed", &[], &["unlink"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["old"]["size"], 11, "{line:#}");
    assert!(line["new"].is_null(), "{line:#}");
    assert!(line["diff"].is_null(), "{line:#}");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn hardlink_from_outside_into_a_monitored_dir_reports_added() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    fs::create_dir(fx.path("outside")).unwrap();
    let src = fx.path("outside/hardlink-src.conf");
    put(&src, "shared\n");
    let w = Watcher::start(&fx, None);
    let linked = fx.t("hardlink.conf");
    let pid = python(&format!("import os; os.link({}, {})", lit(&src), lit(&linked)));
    let line = w.change_for(&linked);
    assert_change(&line, "added", &[], &["link"]);
    assert_actor(&line, pid, "python3");
    assert!(line["old"].is_null(), "{line:#}");
    assert_eq!(line["new"]["type"], "file", "{line:#}");
    assert_eq!(line["new"]["nlink"], 2, "{line:#}");
    assert_eq!(line["new"]["size"], 7, "{line:#}");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn symlink_swapped_by_rename_reports_the_new_target() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    put(&fx.t("swap-a.conf"), "apple\n");
    put(&fx.t("swap-b.conf"), "berry\n");
    let link = fx.t("swap.link");
    std::os::unix::fs::symlink("swap-a.conf", &link).unwrap();
    let w = Watcher::start(&fx, None);
    let tmp = fx.t("swap.link.tmp");
    let pid = python(&format!(
        "import os; os.symlink('swap-b.conf', {tmp}); os.rename({tmp}, {link})",
        tmp = lit(&tmp),
        link = lit(&link)
    ));
    let line = w.change_for(&link);
    // Both targets are 11 bytes: the size stays.
    assert_change(&line, "modified", &["mtime", "ctime", "inode", "link_target"], &["rename"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["old"]["link_target"], "swap-a.conf", "{line:#}");
    assert_eq!(line["new"]["link_target"], "swap-b.conf", "{line:#}");
    assert_eq!(line["new"]["type"], "symlink", "{line:#}");
    assert!(line["diff"].is_null(), "{line:#}");
    assert_eq!(w.changes_for(&tmp), Vec::<Value>::new(), "the temporary name came and went\n{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn chmod_reports_mode() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("chmod.conf");
    let pid = python(&format!("import os; os.chmod({}, 0o600)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["mode", "ctime"], &["chmod"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["old"]["mode"], 0o644, "{line:#}");
    assert_eq!(line["new"]["mode"], 0o600, "{line:#}");
    assert!(line["diff"].is_null(), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn chown_reports_uid_and_gid() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("chown.conf");
    let pid = python(&format!("import os; os.chown({}, 1, 1)", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["uid", "gid", "ctime"], &["chown"]);
    assert_actor(&line, pid, "python3");
    assert_eq!((&line["new"]["uid"], &line["new"]["gid"]), (&json!(1), &json!(1)), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn setxattr_reports_xattrs() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("setxattr.conf");
    let pid = python(&format!("import os; os.setxattr({}, 'user.test', b'on')", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["ctime", "xattrs"], &["setxattr"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["old"]["xattrs"], json!({}), "{line:#}");
    assert_eq!(line["new"]["xattrs"], json!({"user.test": "on"}), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn utimensat_with_explicit_times_reports_mtime() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("utime.conf");
    let when: u64 = 1_500_000_000_123_456_789;
    let pid = python(&format!("import os; os.utime({}, ns=({when}, {when}))", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["mtime", "ctime"], &["utimes"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["mtime"], when, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn new_file_in_a_monitored_dir_reports_added_with_create() {
    if !root_or_skip() {
        return;
    }
    let (fx, w, _) = one_file("create-other.conf");
    let p = fx.t("created.conf");
    let pid = python(&format!("f = open({}, 'w'); f.write('hello\\n'); f.close()", lit(&p)));
    let line = w.change_for(&p);
    assert_change(&line, "added", &[], &["create", "write"]);
    assert_actor(&line, pid, "python3");
    assert!(line["old"].is_null(), "{line:#}");
    assert_eq!(line["new"]["type"], "file", "{line:#}");
    assert_eq!(line["new"]["size"], 6, "{line:#}");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn a_directory_swapped_for_a_symlink_is_a_link_change_and_never_read_through() {
    if !root_or_skip() {
        return;
    }
    // Outside the tree, a file named like the probe, whose content must never be read.
    const MARKER: &str = "OUTSIDE-MARKER-watch-must-never-be-read";
    let fx = Fixture::on_disk();
    let dir = fx.t("swapdir");
    fs::create_dir(&dir).unwrap();
    put(&dir.join("shadow"), "root:x:monitored\n");
    let outside = fx.path("outside");
    fs::create_dir(&outside).unwrap();
    put(&outside.join("shadow"), &format!("root:{MARKER}:19000:0:99999:7:::\n"));
    let w = Watcher::start(&fx, None);
    let pid = python(&format!(
        "import os; os.rename({dir}, {old}); os.symlink({outside}, {dir})",
        dir = lit(&dir),
        old = lit(&fx.path("swapdir.old")),
        outside = lit(&outside)
    ));
    let want = s(&dir);
    let line = w.wait_for("swapdir as a symlink", REPORT_WITHIN, |l| {
        is_change(l) && l["path"] == want.as_str() && l["new"]["type"] == "symlink"
    });
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert!(names(&line, "changed").iter().any(|c| c == "type"), "{line:#}");
    assert_eq!(line["new"]["link_target"], s(&outside).as_str(), "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    // Short-lived processes (gone before the watcher can look at their cwd) make failing
    // by-path calls through the symlink (rmdir of a file) by a path relative to the tree:
    // the kernel's start directory and the monitored name `shadow` name the probe.
    let probe = dir.join("shadow");
    for _ in 0..5 {
        sh(&format!(
            "cd {} && for i in 1 2 3 4 5 6 7 8 9 10; do rmdir swapdir/shadow 2>/dev/null; done; true",
            lit(&fx.tree())
        ));
        thread::sleep(Duration::from_millis(100));
    }
    // Time for every rehash and for sled to write the journal out.
    thread::sleep(Duration::from_secs(1));
    for line in w.changes_for(&probe) {
        assert!(line["new"].is_null(), "the probe was read through the symlink: {line:#}\n{}", w.dump());
    }
    let printed = w.dump();
    assert!(w.stop().success());
    assert!(!printed.contains(MARKER), "content from outside the tree was printed:\n{printed}");
    let journal = fx.path("db.journal");
    assert!(journal.exists(), "no journal beside the database");
    for entry in fs::read_dir(&journal).unwrap().map(Result::unwrap) {
        if entry.file_type().unwrap().is_file() {
            let bytes = fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
                "content from outside the tree is in the journal ({})",
                entry.path().display()
            );
        }
    }
}

/// A fixture with `name` in the tree and, in the unmonitored sibling `outside/`, a file of
/// the same name (the kernel's name filter lets its path events through) and others.
#[track_caller]
fn outside_fixture(name: &str) -> (Fixture, Watcher, PathBuf) {
    let fx = Fixture::on_disk();
    put(&fx.t(name), ORIGINAL);
    let out = fx.path("outside");
    fs::create_dir(&out).unwrap();
    for file in [name, "data.txt", "gone.txt", "old.txt"] {
        put(&out.join(file), ORIGINAL);
    }
    let w = Watcher::start(&fx, None);
    (fx, w, out)
}

#[test]
fn fd_operations_outside_the_tree_report_nothing() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, out) = outside_fixture("outside-fd.conf");
    let code = format!(
        "{CTYPES_MMAP}same, data = {same}, {data}
fd = os.open(same, os.O_WRONLY | os.O_APPEND); os.write(fd, b'gamma\\n'); os.close(fd)
fd = os.open(same, os.O_WRONLY); os.pwrite(fd, b'BETA', 6); os.writev(fd, [b'AL', b'PHA']); os.close(fd)
f = open(data, 'w'); f.write('fresh\\n'); f.close()
fd = os.open(data, os.O_RDWR); os.ftruncate(fd, 2); os.posix_fallocate(fd, 0, 8192)
os.fchmod(fd, 0o600); os.fchown(fd, 1, 1); os.setxattr(fd, 'user.test', b'on'); os.utime(fd, ns=(1, 1))
addr = libc.mmap(None, 4096, 3, 1, fd, 0); os.close(fd)
time.sleep(0.3); ctypes.memmove(addr, b'stored', 6); assert libc.msync(addr, 4096, 4) == 0
f = open({new}, 'w'); f.write('new\\n'); f.close()
",
        same = lit(&out.join("outside-fd.conf")),
        data = lit(&out.join("data.txt")),
        new = lit(&out.join("new.txt")),
    );
    python(&code);
    assert_quiet_about(&w, &out);
    assert!(w.stop().success());
}

#[test]
fn path_operations_outside_the_tree_report_nothing() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, out) = outside_fixture("outside-path.conf");
    let code = format!(
        "import os
same, data = {same}, {data}
os.truncate(same, 6); os.chmod(same, 0o600); os.chown(same, 1, 1); os.setxattr(same, 'user.test', b'on')
os.utime(same, ns=(1, 1)); os.link(same, {hard}); os.symlink('data.txt', {sym})
os.rename({old}, data); os.unlink({gone}); os.mkdir({dir}); os.rmdir({dir})
",
        same = lit(&out.join("outside-path.conf")),
        data = lit(&out.join("data.txt")),
        hard = lit(&out.join("hard.txt")),
        sym = lit(&out.join("sym")),
        old = lit(&out.join("old.txt")),
        gone = lit(&out.join("gone.txt")),
        dir = lit(&out.join("dir")),
    );
    python(&code);
    assert_quiet_about(&w, &out);
    assert!(w.stop().success());
}

#[test]
fn a_same_named_file_outside_the_tree_adds_nothing_to_a_report() {
    if !root_or_skip() {
        return;
    }
    // The unlink's path names a directory the actor (alive) resolves, and it is not
    // monitored: the monitored file of the same name has nothing to do with it.
    let (fx, w, out) = outside_fixture("same-name.conf");
    let p = fx.t("same-name.conf");
    let pid =
        python(&format!("import os; os.chmod({}, 0o600); os.unlink({})", lit(&p), lit(&out.join("same-name.conf"))));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["mode", "ctime"], &["chmod"]);
    assert_actor(&line, pid, "python3");
    w.assert_nothing_under(&out, Duration::from_millis(500));
    assert!(w.stop().success());
}

#[test]
fn writeback_by_the_kernel_flusher_is_not_reported_as_a_store() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("writeback.conf");
    // The append needs a new block (delayed allocation); syncfs(2) has the flusher, a kernel
    // thread, write it back, and allocating the block dirties the inode in that thread: no
    // store through a mapping. Empty writes until syncfs returns keep the path's events
    // going, so the writeback lands in the same report whatever the load.
    let code = format!(
        "import ctypes, os, threading, time
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open({}, os.O_WRONLY | os.O_APPEND)
os.write(fd, b'gamma\\n' * 1000)
done = []
t = threading.Thread(target=lambda: done.append(libc.syncfs(fd)))
t.start()
while t.is_alive():
    os.write(fd, b'')
    time.sleep(0.01)
assert done == [0], done
os.close(fd)
",
        lit(&p)
    );
    let pid = python(&code);
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["write"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["new"]["size"], 6011, "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn writing_the_original_bytes_back_reports_baseline_match() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, p) = one_file("restore.conf");
    let first = python(&format!("f = open({}, 'w'); f.write('changed\\n'); f.close()", lit(&p)));
    let line = nth_change_for(&w, &p, 0);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate", "write"]);
    assert_actor(&line, first, "python3");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    let second = python(&format!("f = open({}, 'w'); f.write({ORIGINAL:?}); f.close()", lit(&p)));
    let line = nth_change_for(&w, &p, 1);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate", "write"]);
    assert_actor(&line, second, "python3");
    assert_eq!(line["baseline_match"], true, "{line:#}");
    assert_eq!((&line["old"]["size"], &line["new"]["size"]), (&json!(8), &json!(11)), "{line:#}");
    assert!(diff_of(&line).contains("\n-changed\n+alpha\n+beta\n"), "{line:#}");
    assert!(w.stop().success());
}

#[test]
fn secret_rule_reports_the_change_without_content() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let p = fx.t("secret.token");
    put(&p, "password=hunter2\n");
    // The new value comes from a file outside the tree, so the child's command line (which
    // the report carries) does not hold it either.
    let src = fx.path("new-token");
    put(&src, "password=correct-horse\n");
    let w = Watcher::start(&fx, Some(&[Rule::new(fx.tree()).diff().secret()]));
    let pid = python(&format!("f = open({}, 'w'); f.write(open({}).read()); f.close()", lit(&p), lit(&src)));
    let line = w.change_for(&p);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["truncate", "write"]);
    assert_actor(&line, pid, "python3");
    assert!(line["diff"].is_null(), "a secret's diff was printed: {line:#}");
    let out = w.dump();
    for word in ["hunter2", "correct-horse", "password"] {
        assert!(!out.contains(word), "{word:?} printed for a secret\n{out}");
    }
    assert!(w.stop().success());
}

/// The BLAKE3 of a file, as b3sum prints it.
fn b3(path: &Path) -> String {
    let out = Command::new("b3sum").arg("--no-names").arg(path).output().expect("run b3sum");
    assert!(out.status.success(), "b3sum {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn ring_buffer_overflow_is_reported_as_lost_and_a_rescan_finds_every_change() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let files: Vec<PathBuf> = (0..200).map(|i| fx.t(format!("lost-{i:03}.txt"))).collect();
    for f in &files {
        put(f, "original\n");
    }
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));
    // One page of ring buffer: a burst of writes cannot fit, so the kernel side counts
    // what it drops and the watcher must rescan.
    let w = Watcher::start_on(&fx, &["--ring-buffer-kib", "4"]);
    let list: Vec<String> = files.iter().map(|f| s(f)).collect();
    python(&format!(
        "import os\nfiles = {list:?}\nfor round in range(20):\n    for f in files:\n        fd = os.open(f, os.O_WRONLY | os.O_APPEND)\n        os.write(fd, b'round %d\\n' % round)\n        os.close(fd)\n"
    ));
    let lost = w.wait_for("a lost line", Duration::from_secs(10), |l| l["kind"] == "lost");
    assert!(lost["events"].as_u64().unwrap() > 0, "{lost:#}");
    assert_eq!(lost["dropped_by"], "kernel", "{lost:#}");
    w.wait_for("the rescan after lost events", Duration::from_secs(30), |l| {
        l["kind"] == "rescan" && l["reason"] == "lost_events"
    });
    // Settle: the rehashes of what did arrive, and any later rescan.
    thread::sleep(Duration::from_secs(2));
    let lines = w.lines();
    for f in &files {
        let now = b3(f);
        let reported = lines.iter().rfind(|l| is_change(l) && l["path"] == s(f).as_str());
        let reported =
            reported.unwrap_or_else(|| panic!("{} changed and was never reported\n{}", f.display(), w.dump()));
        assert_eq!(reported["new"]["hash"], now.as_str(), "last report of {} is not its final state", f.display());
    }
    assert!(w.stop().success());
}

/// Asserts that `line` names exactly these writers, in order, each with its own ops, and that
/// its `process` is the last of them (each of these made its ops in turn).
#[track_caller]
fn assert_writers(line: &Value, writers: &[(u32, &str, &[&str])]) {
    let got: Vec<(u64, String, Vec<String>)> = line["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes in {line:#}"))
        .iter()
        .map(|w| (w["pid"].as_u64().unwrap(), w["comm"].as_str().unwrap().to_owned(), names(w, "ops")))
        .collect();
    let want: Vec<(u64, String, Vec<String>)> = writers
        .iter()
        .map(|(pid, comm, ops)| (u64::from(*pid), (*comm).to_owned(), ops.iter().map(|o| (*o).to_owned()).collect()))
        .collect();
    assert_eq!(got, want, "writers of {line:#}");
    let last = writers.last().expect("at least one writer");
    assert_eq!(line["process"]["pid"], last.0, "process is the last writer: {line:#}");
    assert_eq!(line["attribution"], "exact", "{line:#}");
}

#[test]
fn a_new_file_and_a_removal_back_to_back_each_name_their_own_process_every_time() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let etc = fx.t("etc");
    fs::create_dir(&etc).unwrap();
    for i in 0..10 {
        put(&etc.join(format!("old{i}.conf")), ORIGINAL);
    }
    let w = Watcher::start(&fx, None);
    for i in 0..10 {
        let (new, old) = (etc.join(format!("new{i}")), etc.join(format!("old{i}.conf")));
        // The repro: a shell creates a file, then rm removes another, back to back.
        let sh = common::watch::sh(&format!("echo x > {}", s(&new)));
        let mut rm = Command::new("rm");
        rm.arg(&old);
        let rm = run_child(rm);
        let added = w.change_for(&new);
        assert_change(&added, "added", &[], &["create", "write"]);
        assert_writers(&added, &[(sh, "sh", &["create", "write"])]);
        let removed = w.change_for(&old);
        assert_change(&removed, "removed", &[], &["unlink"]);
        assert_writers(&removed, &[(rm, "rm", &["unlink"])]);
        // The directory's report carries the directory's own ops, each by its process.
        let deadline = Instant::now() + REPORT_WITHIN;
        loop {
            let dir_writers: Vec<(u64, Vec<String>)> = w
                .changes_for(&etc)
                .iter()
                .flat_map(|l| l["processes"].as_array().cloned().unwrap_or_default())
                .map(|p| (p["pid"].as_u64().unwrap(), names(&p, "ops")))
                .collect();
            if dir_writers.contains(&(u64::from(sh), vec!["create".to_owned()]))
                && dir_writers.contains(&(u64::from(rm), vec!["unlink".to_owned()]))
            {
                break;
            }
            assert!(Instant::now() < deadline, "round {i}: the directory's writers are {dir_writers:?}\n{}", w.dump());
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(w.changes_for(&new).len(), 1, "round {i}: one report of the new file\n{}", w.dump());
    }
    assert!(w.stop().success());
}

#[test]
fn two_writers_of_one_file_in_one_window_are_both_named_with_their_own_ops() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, path) = one_file("two-writers.txt");
    // The first writer holds the file open across the second's write (which exits without a
    // close(2), so nothing makes the path due early), writing every 10 ms meanwhile so the
    // quiet time never passes however slowly the second starts, then truncates and closes.
    let second = format!(
        "import os\nfd = os.open({p}, os.O_WRONLY | os.O_APPEND)\nos.write(fd, b'second\\n')\nos._exit(0)",
        p = lit(&path)
    );
    let first = python(&format!(
        "import os, subprocess, sys, threading, time\nfd = os.open({p}, os.O_WRONLY | os.O_APPEND)\n\
         os.write(fd, b'first\\n')\ndone = threading.Event()\n\
         def keep():\n    while not done.is_set():\n        os.write(fd, b'.')\n        time.sleep(0.01)\n\
         t = threading.Thread(target=keep)\nt.start()\n\
         subprocess.run([sys.executable, '-c', {second:?}])\ndone.set()\nt.join()\n\
         os.ftruncate(fd, 30)\nos.close(fd)",
        p = lit(&path)
    ));
    let line = w.change_for(&path);
    let writers = line["processes"].as_array().cloned().unwrap_or_default();
    assert_eq!(writers.len(), 2, "both writers in one report: {line:#}\n{}", w.dump());
    assert_eq!(writers[0]["pid"], first, "{line:#}");
    assert_eq!(names(&writers[0], "ops"), ["write", "truncate"], "the first writer's own ops: {line:#}");
    assert_eq!(names(&writers[1], "ops"), ["write"], "the second writer's own ops: {line:#}");
    assert_ne!(writers[1]["pid"], first, "{line:#}");
    assert_eq!(names(&line, "ops"), ["write", "truncate"], "every op on the path: {line:#}");
    assert_eq!(line["process"]["pid"], first, "process made the latest change (the truncate): {line:#}");
    assert!(w.stop().success());
}

#[test]
fn a_change_at_a_path_over_1000_bytes_is_found_by_a_rescan_of_what_the_cut_path_names() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    // Four components of 250 bytes: the kernel sends only the first 255 bytes of the path.
    let mut deep = fx.tree();
    for c in ['a', 'b', 'c', 'd'] {
        deep.push(c.to_string().repeat(250));
    }
    fs::create_dir_all(&deep).unwrap();
    let (file, gone) = (deep.join("conf.txt"), deep.join("gone.txt"));
    put(&file, ORIGINAL);
    put(&gone, ORIGINAL);
    assert!(s(&file).len() > 1000, "the path is {} bytes", s(&file).len());
    let w = Watcher::start(&fx, None);
    let pid = python(&format!("import os\nos.chmod({}, 0o600)\nos.unlink({})", lit(&file), lit(&gone)));
    let line = w.change_for(&file);
    assert_change(&line, "modified", &["mode", "ctime"], &["chmod"]);
    assert_eq!(line["new"]["mode"], 0o600, "{line:#}");
    // The cut path could not name the file whole: who made it is inferred, and said so.
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!(line["attribution"], "inferred", "{line:#}");
    let removed = w.change_for(&gone);
    assert_eq!(removed["kind"], "removed", "{removed:#}");
    let rescan = w.wait_for("the rescan of the cut path's subtree", REPORT_WITHIN, |l| {
        l["kind"] == "rescan" && l["reason"] == "truncated_path"
    });
    let scope: Vec<String> = names(&rescan, "scope");
    assert!(
        !scope.is_empty() && scope.iter().all(|root| s(&file).starts_with(root.as_str())),
        "a targeted rescan above the file, not of everything: {rescan:#}"
    );
    // A write through a descriptor needs no path: exact, whatever the path's length.
    let pid = python(&format!("f = open({}, 'a'); f.write('gamma\\n'); f.close()", lit(&file)));
    let line = nth_change_for(&w, &file, 1);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &["write"]);
    assert_actor(&line, pid, "python3");
    assert_eq!(line["attribution"], "exact", "{line:#}");
    assert!(w.stop().success());
}

// ---------------------------------------------------------------------------------------------
// The journal is unsigned: it never hides a deviation, and one watcher uses it at a time
// ---------------------------------------------------------------------------------------------

#[test]
fn a_change_absorbed_into_the_journal_by_another_watcher_is_reported_at_the_next_start() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let conf = fx.t("absorbed.conf");
    put(&conf, ORIGINAL);
    let agent = Watcher::start(&fx, None);
    assert!(agent.stop().success());

    // The attacker, with the agent down: change the file, then run a watcher of one's own on
    // the same database (the public key is all it needs) until it has journaled the change.
    fs::write(&conf, "alpha\nbeta\nbackdoor\n").unwrap();
    let attacker = Watcher::start_on(&fx, &[]);
    attacker.change_for(&conf);
    attacker.wait_for("the attacker's startup rescan", REPORT_WITHIN, |l| l["kind"] == "rescan");
    assert!(attacker.stop().success());

    // The agent restarts: the deviation from the signed baseline is reported all the same,
    // marked as one the journal already had.
    let agent = Watcher::start_on(&fx, &[]);
    let line = agent.change_for(&conf);
    assert_change(&line, "modified", &["content", "size", "mtime", "ctime"], &[]);
    assert_eq!(line["detected_by"], "rescan", "{line:#}");
    assert_eq!(line["baseline_match"], false, "{line:#}");
    assert_eq!(line["already_known"], true, "{line:#}");
    assert!(diff_of(&line).lines().any(|l| l == "+backdoor"), "diff against the signed content: {line:#}");
    let verify = agent.wait_for("the startup verify", REPORT_WITHIN, |l| l["kind"] == "verify");
    assert_eq!(verify["modified"], 1, "{verify:#}\n{}", agent.dump());
    assert!(agent.stop().success());
}

#[test]
fn a_second_watcher_on_the_same_journal_exits_4_naming_the_first_ones_pid() {
    if !root_or_skip() {
        return;
    }
    let (fx, first, path) = one_file("locked.conf");
    let mut second = common::watch::watch_cmd(&fx.db(), &fx.pubkey(), &fx.path("ready-2"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn a second kubefim watch");
    let deadline = Instant::now() + Duration::from_secs(60);
    while second.try_wait().unwrap().is_none() {
        if Instant::now() > deadline || fx.path("ready-2").exists() {
            let _ = second.kill();
            let out = second.wait_with_output().unwrap();
            panic!(
                "a second watcher ran on the same database and journal\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = second.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "exit code of the second watcher\n{stderr}");
    assert!(stderr.contains(&format!("kubefim watch (pid {})", first.pid())), "the holder is not named: {stderr}");
    assert!(stderr.contains(&s(&fx.path("db.journal.lock"))), "the lock file is not named: {stderr}");
    // The first one is untouched, and nothing of the second's lock shows as a change.
    let pid = python(&format!("f = open({}, 'a'); f.write('x\\n'); f.close()", lit(&path)));
    assert_actor(&first.change_for(&path), pid, "python3");
    assert!(first.stop().success());
}
