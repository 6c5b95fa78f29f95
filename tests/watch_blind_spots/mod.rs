//! Watch mode against what an attacker on the node does to go unseen (issue 10, findings 3
//! and 6): O_DIRECT writes through Linux AIO and through io_uring fixed files by a writer
//! that never calls close(2), `chattr +i`, and an unprivileged flood of failing syscalls
//! meant to delay every other report. The writers are this test binary run again as a child
//! ([`child_process`]): raw syscalls, and an exit that closes nothing by syscall.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::Fixture;
use crate::common::watch::{REPORT_WITHIN, Watcher, names, run_child, s};
use crate::{assert_change, root_or_skip};

/// The variable that makes [`child_process`] a writer (`<role>:<path>`).
const CHILD: &str = "KUBEFIM_TEST_CHILD";

/// One page: O_DIRECT wants aligned buffers, offsets and lengths.
const PAGE: usize = 4096;
/// [`PAGE`] as the kernel's interfaces count it.
const PAGE_BYTES: u32 = 4096;

/// This test binary, run again to do one `role` on `path` as a child process.
fn child(role: &str, path: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args(["--exact", "watch_blind_spots::child_process", "--nocapture", "--test-threads=1"])
        .env(CHILD, format!("{role}:{}", s(path)));
    cmd
}

/// A page-aligned page of `byte`, for O_DIRECT.
fn aligned_page(byte: u8) -> &'static mut [u8] {
    let layout = std::alloc::Layout::from_size_align(PAGE, PAGE).expect("a page layout");
    // SAFETY: a non-zero size; the page is leaked on purpose (the child exits right after).
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null(), "out of memory");
    // SAFETY: PAGE bytes just allocated.
    let page = unsafe { std::slice::from_raw_parts_mut(ptr, PAGE) };
    page.fill(byte);
    page
}

/// `struct iocb` (include/uapi/linux/aio_abi.h, little-endian).
#[repr(C)]
#[derive(Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

#[track_caller]
fn check(what: &str, ret: libc::c_long) -> libc::c_long {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
    ret
}

/// One page of `B` written over the start of `path` with O_DIRECT through Linux AIO
/// (io_setup, io_submit, io_getevents); the descriptor is never closed by a syscall.
fn aio_write(path: &str) {
    let file = fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).expect("open O_DIRECT");
    // The open for writing is rehashed on its own first (nothing changed yet): the write
    // comes well after, so only an event of its own can report it.
    thread::sleep(Duration::from_millis(600));
    let page = aligned_page(b'B');
    let mut ctx: u64 = 0;
    // SAFETY: raw AIO syscalls on buffers that live until the process exits.
    unsafe {
        check("io_setup", libc::syscall(libc::SYS_io_setup, 1, &mut ctx));
        let iocb = Iocb {
            aio_lio_opcode: 1, // IOCB_CMD_PWRITE
            aio_fildes: u32::try_from(file.as_raw_fd()).expect("an fd"),
            aio_buf: page.as_ptr() as u64,
            aio_nbytes: PAGE_BYTES.into(),
            ..Iocb::default()
        };
        let list = [&iocb as *const Iocb];
        assert_eq!(check("io_submit", libc::syscall(libc::SYS_io_submit, ctx, 1, list.as_ptr())), 1);
        let mut event = IoEvent::default();
        check("io_getevents", libc::syscall(libc::SYS_io_getevents, ctx, 1, 1, &mut event, 0));
        assert_eq!(event.res, i64::from(PAGE_BYTES), "the AIO write");
    }
    std::mem::forget(file);
}

/// One page of `U` written over the start of `path` with O_DIRECT through io_uring, on a
/// registered (fixed) file whose descriptor was closed before the write.
fn uring_fixed_write(path: &str) {
    use io_uring::{IoUring, opcode, types};
    let file = fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).expect("open O_DIRECT");
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    ring.submitter().register_files(&[file.as_raw_fd()]).expect("register the file");
    // The close of the writer is reported and rehashed first: the write comes well after.
    drop(file);
    thread::sleep(Duration::from_millis(600));
    let page = aligned_page(b'U');
    let sqe = opcode::Write::new(types::Fixed(0), page.as_ptr(), PAGE_BYTES).offset(0).build();
    // SAFETY: the buffer lives until the process exits; the call waits for the completion.
    unsafe { ring.submission().push(&sqe) }.expect("room in the queue");
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!(i64::from(cqe.result()), i64::from(PAGE_BYTES), "the fixed-file write");
    std::mem::forget(ring);
}

/// As uid and gid 65534: failing unlinks of `path` (not permitted), of a 400-byte path
/// ending in its name, and of a 400-byte path ending elsewhere, without pause, until killed.
fn flood(path: &str) {
    // SAFETY: plain credential syscalls on this single-purpose process.
    unsafe {
        check("setgroups", libc::setgroups(0, std::ptr::null()).into());
        check("setgid", libc::setgid(65534).into());
        check("setuid", libc::setuid(65534).into());
    }
    let name = Path::new(path).file_name().expect("a name").to_str().expect("UTF-8");
    let long = format!("/nonexistent/{}", "x".repeat(400));
    let paths = [
        std::ffi::CString::new(path).expect("no NUL"),
        std::ffi::CString::new(format!("{long}/{name}")).expect("no NUL"),
        std::ffi::CString::new(format!("{long}/other")).expect("no NUL"),
    ];
    loop {
        for p in &paths {
            // SAFETY: a NUL-terminated path; the call fails (EACCES, ENOENT) by design.
            let ret = unsafe { libc::unlink(p.as_ptr()) };
            assert!(ret < 0, "unlink of {p:?} as nobody succeeded");
        }
    }
}

/// Not a test by itself: the body of the child processes the tests start (a no-op unless
/// [`CHILD`] is set). It exits with `_exit`, so nothing it opened is closed by a syscall.
#[test]
fn child_process() {
    let Ok(spec) = std::env::var(CHILD) else { return };
    let (role, path) = spec.split_once(':').expect("<role>:<path>");
    match role {
        "aio" => aio_write(path),
        "uring-fixed" => uring_fixed_write(path),
        "flood" => flood(path),
        other => panic!("unknown child role {other}"),
    }
    // SAFETY: ends the process at once, as a writer that never closes would.
    unsafe { libc::_exit(0) };
}

/// A fixture whose tree holds `name` with one page of `a`, flushed, and a watcher on it.
fn one_page(name: &str) -> (Fixture, Watcher, std::path::PathBuf) {
    let fx = Fixture::on_disk();
    let path = fx.t(name);
    fs::write(&path, [b'a'; PAGE]).expect("write the page");
    fs::File::open(&path).and_then(|f| f.sync_all()).expect("sync");
    let w = Watcher::start(&fx, None);
    (fx, w, path)
}

#[test]
fn an_o_direct_write_through_linux_aio_by_a_writer_that_never_closes_is_reported() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, path) = one_page("aio.data");
    let pid = run_child(child("aio", &path));
    let line = w.change_for(&path);
    assert_change(&line, "modified", &["content", "mtime", "ctime"], &["aio"]);
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!(fs::read(&path).expect("read back")[..4], *b"BBBB");
    assert!(w.stop().success());
}

#[test]
fn an_o_direct_write_to_an_io_uring_fixed_file_after_its_close_is_reported() {
    if !root_or_skip() {
        return;
    }
    let (_fx, w, path) = one_page("fixed.data");
    let pid = run_child(child("uring-fixed", &path));
    assert_eq!(fs::read(&path).expect("read back")[..4], *b"UUUU");
    let want = s(&path);
    let line = w.wait_for("the fixed-file write", REPORT_WITHIN, |l| {
        l["path"] == want.as_str() && names(l, "changed").contains(&"content".to_owned())
    });
    assert_eq!(line["kind"], "modified", "{line:#}");
    assert!(names(&line, "ops").contains(&"io_uring".to_owned()), "{line:#}");
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert!(w.stop().success());
}

/// Clears the immutable and append-only flags on drop, so the fixture can be removed even
/// when the test fails.
struct Unchattr<'a>(&'a Path);

impl Drop for Unchattr<'_> {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-ia").arg(self.0).status();
    }
}

#[test]
fn chattr_immutable_is_reported_as_a_change_of_flags_and_verify_sees_it() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let path = fx.t("immutable.conf");
    fs::write(&path, b"alpha\n").expect("write");
    let w = Watcher::start(&fx, None);
    let _unchattr = Unchattr(&path);
    let mut chattr = Command::new("chattr");
    chattr.arg("+i").arg(&path);
    let pid = run_child(chattr);
    let line = w.change_for(&path);
    assert_change(&line, "modified", &["ctime", "flags"], &["setflags"]);
    assert_eq!(line["process"]["pid"], pid, "{line:#}");
    assert_eq!((&line["old"]["flags"], &line["new"]["flags"]), (&0.into(), &0x10.into()), "{line:#}");
    assert!(w.stop().success());
    let report = fx.verify(1);
    let change = report["changes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["path"] == s(&path).as_str()))
        .unwrap_or_else(|| panic!("verify does not report {}: {report:#}", path.display()));
    assert_eq!(names(change, "changed"), ["ctime", "flags"], "{change:#}");
}

/// Kills the child on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unprivileged_flood_of_failing_calls_does_not_delay_another_report() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    let target = fx.t("flooded.conf");
    let other = fx.t("changed.conf");
    fs::write(&target, b"alpha\n").expect("write");
    fs::write(&other, b"alpha\n").expect("write");
    let w = Watcher::start(&fx, None);
    let _flood = Killed(child("flood", &target).spawn().expect("spawn the flood"));
    // Let the flood fill whatever it can fill.
    thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    fs::write(&other, b"changed by root\n").expect("root's change");
    let line = w.change_for(&other);
    assert_eq!(line["kind"], "modified", "{line:#}");
    eprintln!("reported {:?} after the change", started.elapsed());
    // Nothing the flood did changed anything, and none of it was reported.
    assert!(w.changes_for(&target).is_empty(), "{}", w.dump());
    assert!(w.stop().success());
}
