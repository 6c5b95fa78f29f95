//! The programs against what issue 10 (findings 3 and 6) found unseen or too costly: writes
//! through Linux AIO and io_uring fixed files, the chattr ioctls and file_setattr, failing
//! syscalls (sent only once they succeed), descriptors not open for writing, and paths too
//! long for the event (filtered by their last components all the same).

use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{IoUring, opcode, types};
use kubefim_common::{EVENT_PATH_TRUNCATED, Op, PATH_CAP};

use super::kernel_harness::{AT_FDCWD, Actor, Expect, c};
use super::{Kernel, bytes, close, open, uring_run};

/// `FS_IOC_GETFLAGS` / `FS_IOC_SETFLAGS` (`_IOR/_IOW('f', 1/2, long)`).
const FS_IOC_GETFLAGS: u32 = 0x8008_6601;
const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
/// `FS_IOC_FSGETXATTR` / `FS_IOC_FSSETXATTR` (`_IOR/_IOW('X', 31/32, struct fsxattr)`).
const FS_IOC_FSGETXATTR: u32 = 0x801c_581f;
const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
/// `FS_NOATIME_FL` (`chattr +A`): a flag that is harmless to leave set.
const FS_NOATIME_FL: u32 = 0x80;
/// file_getattr / file_setattr on x86-64 (6.17+).
const SYS_FILE_GETATTR: libc::c_long = 468;
const SYS_FILE_SETATTR: libc::c_long = 469;

/// A raw syscall that must fail; yields its errno.
macro_rules! fails {
    ($nr:expr $(, $arg:expr)* $(,)?) => {{
        // SAFETY: each call site passes pointers to live, NUL-terminated or correctly sized
        // buffers owned by the test for the length of the call.
        let ret = unsafe { libc::syscall($nr $(, $arg as libc::c_long)*) };
        assert!(ret < 0, "{} succeeded", stringify!($nr));
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }};
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

const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// An AIO context, destroyed on drop.
struct Aio(u64);

impl Aio {
    fn new() -> Aio {
        let mut ctx = 0u64;
        sys!(SYS_io_setup, 8, &mut ctx as *mut u64);
        Aio(ctx)
    }

    /// Submits `iocbs` and waits for all of them; returns their results.
    fn run(&self, iocbs: &[Iocb]) -> Vec<i64> {
        let list: Vec<*const Iocb> = iocbs.iter().map(|i| i as *const Iocb).collect();
        let n = sys!(SYS_io_submit, self.0, list.len(), list.as_ptr());
        assert_eq!(n, i64::try_from(list.len()).expect("small"), "io_submit took only {n}");
        let mut events = vec![[0i64; 4]; list.len()];
        sys!(SYS_io_getevents, self.0, list.len(), list.len(), events.as_mut_ptr(), 0);
        events.iter().map(|e| e[2]).collect()
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: the context this value set up.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

fn iocb(opcode: u16, fd: &OwnedFd, buf: &[u8]) -> Iocb {
    Iocb {
        aio_lio_opcode: opcode,
        aio_fildes: u32::try_from(fd.as_raw_fd()).expect("an fd"),
        aio_buf: buf.as_ptr() as u64,
        aio_nbytes: buf.len() as u64,
        ..Iocb::default()
    }
}

#[test]
fn linux_aio_writes_name_their_target_and_reads_do_not() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("aio-file", b"alpha\nbeta\n");
    let other = k.file("aio-other", b"alpha\n");
    let writer = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let reader = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    let unwatched = open(&other, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let aio = Aio::new();
    let buf = [0u8; 6];
    // A read of the watched file, a write to an unwatched one, then the write: one event,
    // the write's, though it is the batch's last iocb.
    let results = aio.run(&[
        iocb(IOCB_CMD_PREAD, &reader, &buf),
        iocb(IOCB_CMD_PWRITE, &unwatched, b"other\n"),
        iocb(IOCB_CMD_PWRITE, &writer, b"ALPHA\n"),
    ]);
    assert!(results.iter().all(|&r| r == 6), "AIO results {results:?}");
    k.expect("io_submit of a write", Expect::inode(Op::Aio, key).arg(IOCB_CMD_PWRITE.into()));
    let mine = k.mine();
    k.assert_no_event("the read and the unwatched write", move |ev| mine(ev) && ev.op == Op::Aio);
    // A write iocb on a descriptor open for reading is refused at submission: no event.
    let refused = iocb(IOCB_CMD_PWRITE, &reader, b"x");
    let list = [&refused as *const Iocb];
    assert_eq!(fails!(libc::SYS_io_submit, aio.0, 1, list.as_ptr()), libc::EBADF);
    let mine = k.mine();
    k.assert_no_event("a write iocb on a reader", move |ev| mine(ev) && ev.op == Op::Aio);
}

#[test]
fn an_io_uring_write_to_a_fixed_file_names_its_target() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("uring-fixed", b"alpha\n");
    let fd = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    ring.submitter().register_files(&[fd.as_raw_fd()]).expect("register the file");
    // Registered, the descriptor is not needed any more: the write goes through slot 0.
    close(fd);
    k.expect("close of the writer", Expect::inode(Op::Close, key));
    let data = b"beta\n";
    let len = u32::try_from(data.len()).expect("small");
    let sqe = opcode::Write::new(types::Fixed(0), data.as_ptr(), len).offset(0).build();
    uring_run(&mut ring, "IORING_OP_WRITE on a fixed file", sqe);
    k.expect("io_uring write to a fixed file", Expect::inode(Op::IoUring, key).arg(opcode::Write::CODE.into()));
}

#[test]
fn chattr_ioctls_and_file_setattr_are_sent() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("chattr-file", b"alpha\n");
    let fd = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let mut flags: libc::c_long = 0;
    sys!(SYS_ioctl, fd.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags as *mut libc::c_long);
    flags |= libc::c_long::from(FS_NOATIME_FL);
    sys!(SYS_ioctl, fd.as_raw_fd(), FS_IOC_SETFLAGS, &flags as *const libc::c_long);
    k.expect("FS_IOC_SETFLAGS", Expect::inode(Op::SetFlags, key).arg(FS_IOC_SETFLAGS));
    let mut fsx = [0u8; 28];
    sys!(SYS_ioctl, fd.as_raw_fd(), FS_IOC_FSGETXATTR, fsx.as_mut_ptr());
    sys!(SYS_ioctl, fd.as_raw_fd(), FS_IOC_FSSETXATTR, fsx.as_ptr());
    k.expect("FS_IOC_FSSETXATTR", Expect::inode(Op::SetFlags, key).arg(FS_IOC_FSSETXATTR));
    // Any other ioctl is not looked at.
    sys!(SYS_ioctl, fd.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags as *mut libc::c_long);
    let mine = k.mine();
    k.assert_no_event("FS_IOC_GETFLAGS", move |ev| mine(ev) && ev.op == Op::SetFlags);

    // file_setattr(dfd, path, struct file_attr *, size, at_flags), by path.
    k.watch_name("chattr-file");
    let mut attr = [0u8; 24];
    let path = c(&file);
    // SAFETY: a NUL-terminated path and a buffer of the size passed.
    let got = unsafe { libc::syscall(SYS_FILE_GETATTR, AT_FDCWD, path.as_ptr(), attr.as_mut_ptr(), attr.len(), 0) };
    assert_eq!(got, 0, "file_getattr: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let set = unsafe { libc::syscall(SYS_FILE_SETATTR, AT_FDCWD, path.as_ptr(), attr.as_ptr(), attr.len(), 0) };
    assert_eq!(set, 0, "file_setattr: {}", std::io::Error::last_os_error());
    k.expect("file_setattr", Expect::path(Op::SetFlags, bytes(&file)));
}

#[test]
fn failing_calls_send_nothing_and_succeeding_ones_are_sent_at_their_exit() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fail-me", b"alpha\n");
    let key = k.watch(&file);
    k.watch_name("fail-me");
    let missing = c(&k.dir().join("no-such-dir").join("fail-me"));
    assert_eq!(fails!(libc::SYS_unlink, missing.as_ptr()), libc::ENOENT);
    assert_eq!(fails!(libc::SYS_chmod, missing.as_ptr(), 0o600), libc::ENOENT);
    assert_eq!(fails!(libc::SYS_rename, missing.as_ptr(), c(&file).as_ptr()), libc::ENOENT);
    // A write and a truncate through a descriptor open for reading fail (EBADF, EINVAL).
    let reader = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    assert_eq!(fails!(libc::SYS_write, reader.as_raw_fd(), b"x".as_ptr(), 1), libc::EBADF);
    assert_eq!(fails!(libc::SYS_ftruncate, reader.as_raw_fd(), 0), libc::EINVAL);
    // As nobody (this thread alone: a raw setresuid changes only the calling thread),
    // metadata changes of root's file fail: EPERM.
    let path = c(&file);
    let tid = std::thread::scope(|s| {
        s.spawn(|| {
            sys!(SYS_setresgid, 65534, 65534, 65534);
            sys!(SYS_setresuid, 65534, 65534, 65534);
            let fd = reader.as_raw_fd();
            assert_eq!(fails!(libc::SYS_fchmod, fd, 0o777), libc::EPERM);
            assert_eq!(fails!(libc::SYS_fchown, fd, 65534, 65534), libc::EPERM);
            let mut flags: libc::c_long = libc::c_long::from(FS_NOATIME_FL);
            assert_eq!(fails!(libc::SYS_ioctl, fd, FS_IOC_SETFLAGS, &mut flags as *mut libc::c_long), libc::EPERM);
            let errno = fails!(libc::SYS_chmod, path.as_ptr(), 0o777);
            assert!(errno == libc::EPERM || errno == libc::EACCES, "chmod as nobody: errno {errno}");
            Actor::current().tid
        })
        .join()
        .expect("the nobody thread")
    });
    let mine = k.mine();
    k.assert_no_event("failing calls", move |ev| mine(ev) || ev.header.tid == tid || ev.target() == Some(key));
    // The same calls, succeeding: sent (at their exit).
    sys!(SYS_chmod, path.as_ptr(), 0o600);
    k.expect("chmod", Expect::path(Op::Chmod, bytes(&file)));
    let fd = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    sys!(SYS_fchmod, fd.as_raw_fd(), 0o640);
    k.expect("fchmod", Expect::inode(Op::Chmod, key));
}

#[test]
fn a_path_too_long_for_the_event_is_filtered_by_its_last_components() {
    let Some(mut k) = Kernel::load() else { return };
    let deep = k.dir().join("d".repeat(200)).join("e".repeat(200)).join("long-parent");
    std::fs::create_dir_all(&deep).expect("create the deep dirs");
    let named = deep.join("long-named");
    let quiet = deep.join("long-quiet");
    let child = deep.join("long-child");
    for f in [&named, &quiet, &child] {
        std::fs::write(f, b"alpha\n").expect("write a deep file");
    }
    assert!(bytes(&named).len() >= PATH_CAP, "the path must not fit");
    k.watch_name("long-named");
    // Neither component monitored: nothing, though the path does not fit the event.
    sys!(SYS_chmod, c(&quiet).as_ptr(), 0o600);
    let mine = k.mine();
    k.assert_no_event("a long path of unmonitored names", mine);
    // The last component monitored: sent, cut to the event's slot.
    sys!(SYS_chmod, c(&named).as_ptr(), 0o600);
    let want = Expect::path(Op::Chmod, &bytes(&named)[..PATH_CAP - 1]).with_flags(EVENT_PATH_TRUNCATED);
    k.expect("chmod of a long path whose name is monitored", want);
    // The next-to-last component monitored.
    k.watch_name("long-parent");
    sys!(SYS_chmod, c(&child).as_ptr(), 0o600);
    let want = Expect::path(Op::Chmod, &bytes(&child)[..PATH_CAP - 1]).with_flags(EVENT_PATH_TRUNCATED);
    k.expect("chmod of a long path whose directory's name is monitored", want);
    // Longer than PATH_MAX: the kernel refuses it (ENAMETOOLONG), so it names nothing.
    let too_long = c(&k.dir().join("x/".repeat(2100)).join("long-named"));
    assert_eq!(fails!(libc::SYS_chmod, too_long.as_ptr(), 0o600), libc::ENAMETOOLONG);
    let mine = k.mine();
    k.assert_no_event("a path longer than PATH_MAX", mine);
}

#[test]
fn a_process_not_run_by_root_is_held_to_its_budget_and_the_excess_is_counted() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("budget-file", b"alpha\n");
    std::os::unix::fs::chown(&file, Some(65534), Some(65534)).expect("chown to nobody");
    let fd = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let (_, over_before) = k.lost();
    // As nobody, the file's owner: every fchmod succeeds, and each would be an event.
    const CALLS: usize = 20_000;
    let tid = std::thread::scope(|s| {
        s.spawn(|| {
            sys!(SYS_setresgid, 65534, 65534, 65534);
            sys!(SYS_setresuid, 65534, 65534, 65534);
            for i in 0..CALLS {
                sys!(SYS_fchmod, fd.as_raw_fd(), if i % 2 == 0 { 0o600 } else { 0o644 });
            }
            Actor::current().tid
        })
        .join()
        .expect("the nobody thread")
    });
    let sent = k.events_until_sentinel("the budget", |ev| ev.header.tid == tid && ev.target() == Some(key)).len();
    let (ring_full, over) = k.lost();
    let over = usize::try_from(over - over_before).expect("small");
    assert_eq!(ring_full, 0, "the ring buffer overflowed: the budget did not hold");
    // At least the burst went through, far from all of it, and what did not is counted.
    assert!((4000..CALLS / 2).contains(&sent), "{sent} of {CALLS} sent");
    assert_eq!(sent + over, CALLS, "{sent} sent and {over} counted over budget of {CALLS}");
}
