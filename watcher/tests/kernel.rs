//! The eBPF programs on the real kernel, below the watcher: each test loads them
//! (`kubefim_watcher::kernel::Programs`, its own maps and ring buffer), fills the in-kernel
//! filter, does file operations in this process with raw syscalls, and asserts every field of
//! the decoded event: op, flags, target and parent inodes, paths, directory fds and start
//! inodes, argument, pid, tid, ppid, uid, gid, comm, time. One family of hooks per group of
//! tests: fd syscalls, opens, path syscalls, io_uring, dirtied inodes, and the filter (what
//! must not be sent). Programs are loaded with `self_pid` 0 so that this process's own
//! operations are seen, except in the test of the watcher's own pid. Events are picked by
//! thread id and target, as other tests of this binary run beside them. Root only; CI runs
//! as root and never skips.

#[macro_use]
mod kernel_harness;
mod kernel_blind_spots;

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use io_uring::{IoUring, opcode, types};
use kernel_harness::{AT_FDCWD, Actor, DEADLINE, Expect, Kernel, c, key_of};
use kubefim_common::{EVENT_EXCHANGE, EVENT_IO_WORKER, Op};

/// `openat(AT_FDCWD, path, flags, 0o644)`.
fn open(path: &Path, flags: i32) -> OwnedFd {
    let path = c(path);
    let fd = sys!(SYS_openat, AT_FDCWD, path.as_ptr(), flags, 0o644);
    // SAFETY: a new descriptor this function owns.
    unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("an fd fits an int")) }
}

/// `close(fd)`, as a syscall the test makes (not a drop it forgets).
fn close(fd: OwnedFd) {
    sys!(SYS_close, fd.into_raw_fd());
}

/// A mapping of one page, unmapped on drop.
struct Mapping(*mut u8);

impl Mapping {
    fn new(fd: &OwnedFd, prot: i32, flags: i32) -> Mapping {
        let addr = sys!(SYS_mmap, 0, 4096, prot, flags, fd.as_raw_fd(), 0);
        Mapping(addr as *mut u8)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the page this value mapped.
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

const XATTR: &std::ffi::CStr = c"user.kubefim";

// ---- fd syscalls -------------------------------------------------------------------------

#[test]
fn write_pwrite64_and_writev_are_writes_to_the_inode_of_the_fd() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fd-write", b"alpha\n");
    // Opened before it is watched: no open event precedes the writes.
    let fd = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let data = b"beta\n";
    sys!(SYS_write, fd.as_raw_fd(), data.as_ptr(), data.len());
    k.expect("write", Expect::inode(Op::Write, key));
    sys!(SYS_pwrite64, fd.as_raw_fd(), data.as_ptr(), data.len(), 64);
    k.expect("pwrite64", Expect::inode(Op::Write, key));
    let iov = [libc::iovec { iov_base: data.as_ptr().cast_mut().cast(), iov_len: data.len() }];
    sys!(SYS_writev, fd.as_raw_fd(), iov.as_ptr(), iov.len());
    k.expect("writev", Expect::inode(Op::Write, key));
}

#[test]
fn ftruncate_and_fallocate_change_the_size_of_the_inode_of_the_fd() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fd-size", b"alpha\nbeta\n");
    let fd = open(&file, libc::O_RDWR | libc::O_CLOEXEC);
    let key = k.watch(&file);
    sys!(SYS_ftruncate, fd.as_raw_fd(), 3);
    k.expect("ftruncate", Expect::inode(Op::Truncate, key));
    sys!(SYS_fallocate, fd.as_raw_fd(), 0, 0, 8192);
    k.expect("fallocate", Expect::inode(Op::Fallocate, key));
}

#[test]
fn metadata_changes_through_a_read_only_fd_are_seen() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fd-meta", b"alpha\n");
    // Metadata changes need no writer: a read-only fd is enough for root.
    let fd = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    sys!(SYS_fchmod, fd.as_raw_fd(), 0o640);
    k.expect("fchmod", Expect::inode(Op::Chmod, key));
    sys!(SYS_fchown, fd.as_raw_fd(), 0, 0);
    k.expect("fchown", Expect::inode(Op::Chown, key));
    sys!(SYS_fsetxattr, fd.as_raw_fd(), XATTR.as_ptr(), b"v".as_ptr(), 1, 0);
    k.expect("fsetxattr", Expect::inode(Op::Setxattr, key));
    sys!(SYS_fremovexattr, fd.as_raw_fd(), XATTR.as_ptr());
    k.expect("fremovexattr", Expect::inode(Op::Removexattr, key));
    // futimens(fd, NULL) is utimensat(fd, NULL, NULL, 0).
    sys!(SYS_utimensat, fd.as_raw_fd(), 0, 0, 0);
    k.expect("futimens", Expect::inode(Op::Utimes, key));
}

#[test]
fn only_the_close_of_a_writer_is_reported() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fd-close", b"alpha\n");
    let reader = open(&file, libc::O_RDONLY | libc::O_CLOEXEC);
    let writer = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    close(reader);
    let mine = k.mine();
    k.assert_no_event("close of a reader", |ev| mine(ev) && ev.op == Op::Close);
    close(writer);
    k.expect("close of a writer", Expect::inode(Op::Close, key));
}

#[test]
fn only_a_shared_writable_mapping_is_reported() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("fd-mmap", &[b'a'; 4096]);
    let fd = open(&file, libc::O_RDWR | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let read_only = Mapping::new(&fd, libc::PROT_READ, libc::MAP_SHARED);
    let private = Mapping::new(&fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE);
    let mine = k.mine();
    k.assert_no_event("read-only and private mappings", |ev| mine(ev) && ev.op == Op::Mmap);
    let shared = Mapping::new(&fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    k.expect("shared writable mmap", Expect::inode(Op::Mmap, key));
    drop((read_only, private, shared));
}

// ---- dirtied inodes ----------------------------------------------------------------------

#[test]
fn a_store_through_a_mapping_after_close_dirties_the_inode() {
    let Some(mut k) = Kernel::load() else { return };
    // Flushed by `file`: its page is clean and write-protected, so the store faults.
    let file = k.file("dirty-mmap", &[b'a'; 4096]);
    let key = k.watch(&file);
    let flags = libc::O_RDWR | libc::O_CLOEXEC;
    let fd = open(&file, flags);
    k.expect("open", Expect::inode(Op::OpenWrite, key).arg(flags.unsigned_abs()));
    let mapping = Mapping::new(&fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    k.expect("mmap", Expect::inode(Op::Mmap, key));
    close(fd);
    k.expect("close", Expect::inode(Op::Close, key));
    // SAFETY: a live, writable, shared mapping of a 4096-byte file.
    unsafe { mapping.0.write_volatile(b'z') };
    // No syscall saw the store; the kernel dirtying the page did (arg: its I_DIRTY_* bits).
    k.expect("store after close", Expect::inode(Op::Dirty, key).any_arg());
}

// ---- opens -------------------------------------------------------------------------------

#[test]
fn opens_for_writing_are_noted_and_o_trunc_is_a_truncate() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("open-me", b"alpha\n");
    let key = k.watch(&file);
    close(open(&file, libc::O_RDONLY | libc::O_CLOEXEC));
    let mine = k.mine();
    k.assert_no_event("open for reading", move |ev| mine(ev) && ev.target() == Some(key));

    let flags = libc::O_WRONLY | libc::O_CLOEXEC;
    let _writer = open(&file, flags);
    k.expect("O_WRONLY", Expect::inode(Op::OpenWrite, key).arg(flags.unsigned_abs()));

    let flags = libc::O_RDWR | libc::O_TRUNC | libc::O_CLOEXEC;
    let _truncater = open(&file, flags);
    k.expect("O_TRUNC", Expect::inode(Op::Truncate, key).arg(flags.unsigned_abs()));

    // openat2(AT_FDCWD, path, &open_how { flags, mode, resolve }, sizeof open_how)
    let how: [u64; 3] = [(libc::O_WRONLY | libc::O_CLOEXEC).unsigned_abs().into(), 0, 0];
    let path = c(&file);
    let fd = sys!(SYS_openat2, AT_FDCWD, path.as_ptr(), how.as_ptr(), size_of_val(&how));
    // SAFETY: the descriptor openat2 just returned.
    drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("an fd fits an int")) });
    k.expect("openat2", Expect::inode(Op::OpenWrite, key).arg(flags_of(&how)));

    // creat(path, mode) is open(path, O_WRONLY | O_CREAT | O_TRUNC, mode).
    let fd = sys!(SYS_creat, path.as_ptr(), 0o644);
    // SAFETY: the descriptor creat just returned.
    drop(unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).expect("an fd fits an int")) });
    let creat_flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC).unsigned_abs();
    k.expect("creat", Expect::inode(Op::Truncate, key).arg(creat_flags));
}

fn flags_of(how: &[u64; 3]) -> u32 {
    u32::try_from(how[0]).expect("open flags fit 32 bits")
}

#[test]
fn a_create_in_a_watched_directory_is_reported_and_its_inode_watched() {
    let Some(mut k) = Kernel::load() else { return };
    let dir = k.subdir("create-dir");
    let existing = dir.join("create-existing");
    std::fs::write(&existing, b"alpha\n").expect("write the existing file");
    let dir_key = k.watch(&dir);

    // O_CREAT of a file that exists creates nothing.
    let _old = open(&existing, libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC);
    let mine = k.mine();
    k.assert_no_event("O_CREAT of an existing file", move |ev| mine(ev) && ev.op == Op::Create);

    let new = dir.join("create-new");
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    let fd = open(&new, flags);
    let key = key_of(&new);
    k.expect("create", Expect::inode(Op::Create, key).parent(dir_key).arg(flags.unsigned_abs()));
    // The kernel watched the new inode itself: the watcher has not caught up yet.
    sys!(SYS_write, fd.as_raw_fd(), b"x".as_ptr(), 1);
    k.expect("write to the new file", Expect::inode(Op::Write, key));
    close(fd);
    k.expect("close of the new file", Expect::inode(Op::Close, key));
}

// ---- path syscalls -----------------------------------------------------------------------

#[test]
fn renames_carry_both_paths_and_an_exchange_is_flagged() {
    let Some(mut k) = Kernel::load() else { return };
    let from = k.file("rename-from", b"alpha\n");
    let to = k.dir().join("rename-to");
    k.watch_name("rename-from");
    sys!(SYS_rename, c(&from).as_ptr(), c(&to).as_ptr());
    k.expect("rename", Expect::paths(Op::Rename, bytes(&from), bytes(&to)));

    // Only the second path's name is monitored: either path keeps the event.
    let a = k.file("exchange-a", b"a\n");
    let b = k.file("exchange-b", b"b\n");
    k.watch_name("exchange-b");
    sys!(SYS_renameat2, AT_FDCWD, c(&a).as_ptr(), AT_FDCWD, c(&b).as_ptr(), libc::RENAME_EXCHANGE);
    k.expect("RENAME_EXCHANGE", Expect::paths(Op::Rename, bytes(&a), bytes(&b)).with_flags(EVENT_EXCHANGE));
}

#[test]
fn unlink_and_both_ways_of_removing_a_directory() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("unlink-me", b"alpha\n");
    let dir_at = k.subdir("rmdir-at-me");
    let dir = k.subdir("rmdir-me");
    for name in ["unlink-me", "rmdir-at-me", "rmdir-me"] {
        k.watch_name(name);
    }
    sys!(SYS_unlink, c(&file).as_ptr());
    k.expect("unlink", Expect::path(Op::Unlink, bytes(&file)));
    sys!(SYS_unlinkat, AT_FDCWD, c(&dir_at).as_ptr(), libc::AT_REMOVEDIR);
    k.expect("unlinkat(AT_REMOVEDIR)", Expect::path(Op::Rmdir, bytes(&dir_at)));
    sys!(SYS_rmdir, c(&dir).as_ptr());
    k.expect("rmdir", Expect::path(Op::Rmdir, bytes(&dir)));
}

#[test]
fn new_entries_made_by_path_are_reported() {
    let Some(mut k) = Kernel::load() else { return };
    let src = k.file("link-src", b"alpha\n");
    let dst = k.dir().join("link-dst");
    k.watch_name("link-src");
    sys!(SYS_link, c(&src).as_ptr(), c(&dst).as_ptr());
    k.expect("link", Expect::paths(Op::Link, bytes(&src), bytes(&dst)));

    // symlink(target, linkpath): only where the link is made is sent.
    let link = k.dir().join("symlink-new");
    k.watch_name("symlink-new");
    sys!(SYS_symlink, c"elsewhere".as_ptr(), c(&link).as_ptr());
    k.expect("symlink", Expect::path(Op::Symlink, bytes(&link)));

    // Kept because the next-to-last component is a monitored name.
    let parent = k.subdir("mkdir-parent");
    let new_dir = parent.join("fresh");
    k.watch_name("mkdir-parent");
    sys!(SYS_mkdir, c(&new_dir).as_ptr(), 0o755);
    k.expect("mkdir", Expect::path(Op::Mkdir, bytes(&new_dir)));

    let fifo = k.dir().join("mknod-fifo");
    k.watch_name("mknod-fifo");
    sys!(SYS_mknod, c(&fifo).as_ptr(), libc::S_IFIFO | 0o600, 0);
    k.expect("mknod", Expect::path(Op::Mknod, bytes(&fifo)));
}

#[test]
fn attribute_changes_by_path_are_reported() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("by-path", b"alpha\nbeta\n");
    k.watch_name("by-path");
    let path = c(&file);
    sys!(SYS_truncate, path.as_ptr(), 2);
    k.expect("truncate", Expect::path(Op::Truncate, bytes(&file)));
    sys!(SYS_chmod, path.as_ptr(), 0o600);
    k.expect("chmod", Expect::path(Op::Chmod, bytes(&file)));
    sys!(SYS_chown, path.as_ptr(), 0, 0);
    k.expect("chown", Expect::path(Op::Chown, bytes(&file)));
    sys!(SYS_setxattr, path.as_ptr(), XATTR.as_ptr(), b"v".as_ptr(), 1, 0);
    k.expect("setxattr", Expect::path(Op::Setxattr, bytes(&file)));
    sys!(SYS_utimensat, AT_FDCWD, path.as_ptr(), 0, 0);
    k.expect("utimensat", Expect::path(Op::Utimes, bytes(&file)));
}

#[test]
fn metadata_changes_of_a_watched_inode_are_not_stores() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("meta-only", b"alpha\n");
    let key = k.watch(&file);
    let path = c(&file);
    // ext4 passes I_DIRTY_PAGES with the inode bits for these (mark_inode_dirty): not a store.
    sys!(SYS_chmod, path.as_ptr(), 0o600);
    sys!(SYS_chown, path.as_ptr(), 0, 0);
    sys!(SYS_utimensat, AT_FDCWD, path.as_ptr(), 0, 0);
    k.assert_no_event("a store for a metadata change", |e| e.op == Op::Dirty && e.target() == Some(key));
}

#[test]
fn relative_paths_carry_their_dirfd_and_start_directory() {
    let Some(mut k) = Kernel::load() else { return };
    // Names not monitored: the events are kept because they start in a watched directory.
    let dir = k.subdir("rel-dir");
    let other = k.subdir("rel-other");
    std::fs::write(dir.join("rel-file"), b"alpha\n").expect("write rel-file");
    std::fs::write(dir.join("rel-cwd-file"), b"alpha\n").expect("write rel-cwd-file");
    let dir_key = k.watch(&dir);
    let dfd = open(&dir, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
    let ofd = open(&other, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
    let (d, o) = (dfd.as_raw_fd(), ofd.as_raw_fd());

    sys!(SYS_fchmodat, d, c"rel-file".as_ptr(), 0o600);
    k.expect("fchmodat", Expect::path(Op::Chmod, "rel-file").start(0, d, dir_key));

    // The second start directory is reported though only the first is watched.
    sys!(SYS_renameat, d, c"rel-file".as_ptr(), o, c"rel-moved".as_ptr());
    let want = Expect::paths(Op::Rename, "rel-file", "rel-moved").start(0, d, dir_key).start(1, o, key_of(&other));
    k.expect("renameat", want);

    // Relative to the cwd: a thread of its own with its own cwd (unshare(CLONE_FS)), so the
    // other tests' threads keep theirs.
    let actor = std::thread::scope(|s| {
        s.spawn(|| {
            sys!(SYS_unshare, libc::CLONE_FS);
            sys!(SYS_chdir, c(&dir).as_ptr());
            sys!(SYS_chmod, c"rel-cwd-file".as_ptr(), 0o600);
            Actor::current()
        })
        .join()
        .expect("the cwd thread")
    });
    let want = Expect::path(Op::Chmod, "rel-cwd-file").start(0, AT_FDCWD, dir_key);
    let ev = k.next_event(DEADLINE, |ev| ev.header.tid == actor.tid && ev.op == Op::Chmod);
    k.check("chmod relative to the cwd", &ev, &want, &actor);
}

// ---- io_uring ----------------------------------------------------------------------------

/// Submits one request and waits for it; panics if it failed.
fn uring_run(ring: &mut IoUring, what: &str, sqe: io_uring::squeue::Entry) {
    // SAFETY: every buffer and path the request points at outlives this call, which waits
    // for its completion.
    unsafe { ring.submission().push(&sqe) }.expect("the submission queue has room");
    ring.submit_and_wait(1).unwrap_or_else(|e| panic!("{what}: io_uring_enter: {e}"));
    let cqe = ring.completion().next().expect("a completion");
    assert!(cqe.result() >= 0, "{what}: {}", std::io::Error::from_raw_os_error(-cqe.result()));
}

#[test]
fn an_io_uring_write_names_its_target() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("uring-write", b"alpha\n");
    let fd = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let data = b"beta\n";
    let len = u32::try_from(data.len()).expect("small");
    let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), data.as_ptr(), len).offset(0).build();
    uring_run(&mut ring, "IORING_OP_WRITE", sqe);
    k.expect("io_uring write", Expect::inode(Op::IoUring, key).arg(opcode::Write::CODE.into()));
}

#[test]
fn an_io_uring_write_punted_to_a_worker_is_seen_from_the_worker() {
    let Some(mut k) = Kernel::load() else { return };
    let file = k.file("uring-async", b"alpha\n");
    let fd = open(&file, libc::O_WRONLY | libc::O_CLOEXEC);
    let key = k.watch(&file);
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let data = b"beta\n";
    let len = u32::try_from(data.len()).expect("small");
    let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), data.as_ptr(), len)
        .offset(0)
        .build()
        .flags(io_uring::squeue::Flags::ASYNC);
    uring_run(&mut ring, "IORING_OP_WRITE with IOSQE_ASYNC", sqe);
    // IOSQE_ASYNC: the request runs on an io-wq worker of this thread ("iou-wrk-<tid>"),
    // which gets the file and dirties the page (checked on 6.18): both events say so.
    let mut worker = Actor { comm: format!("iou-wrk-{}", k.me.tid), ..k.me.clone() };
    worker.comm.truncate(15);
    let want = Expect::inode(Op::IoUring, key).arg(opcode::Write::CODE.into()).with_flags(EVENT_IO_WORKER);
    let pid = k.me.pid;
    let ev = k.next_event(DEADLINE, |ev| ev.header.pid == pid && want.selects(ev));
    worker.tid = ev.header.tid;
    k.check("io_uring write on a worker", &ev, &want, &worker);
    let want = Expect::inode(Op::Dirty, key).any_arg().with_flags(EVENT_IO_WORKER);
    let ev = k.next_event(DEADLINE, |ev| ev.header.pid == pid && want.selects(ev));
    k.check("the worker dirtying the page", &ev, &want, &worker);
}

#[test]
fn io_uring_operations_by_path_are_flagged_for_a_rescan() {
    let Some(mut k) = Kernel::load() else { return };
    let from = c(&k.file("uring-from", b"alpha\n"));
    let to = c(&k.dir().join("uring-to"));
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let cwd = types::Fd(AT_FDCWD);
    uring_run(&mut ring, "IORING_OP_RENAMEAT", opcode::RenameAt::new(cwd, from.as_ptr(), cwd, to.as_ptr()).build());
    k.expect("io_uring renameat", Expect::uring_path_op(opcode::RenameAt::CODE));
    uring_run(&mut ring, "IORING_OP_UNLINKAT", opcode::UnlinkAt::new(cwd, to.as_ptr()).build());
    k.expect("io_uring unlinkat", Expect::uring_path_op(opcode::UnlinkAt::CODE));
}

// ---- the filter --------------------------------------------------------------------------

#[test]
fn unwatched_files_and_unmonitored_names_yield_nothing() {
    let Some(mut k) = Kernel::load() else { return };
    // The filter holds something, just not what the operations touch.
    let watched = k.file("quiet-watched", b"alpha\n");
    k.watch(&watched);
    k.watch_name("quiet-watched");
    let file = k.file("quiet-file", &[b'a'; 4096]);
    let dir = k.subdir("quiet-dir");
    let dfd = open(&dir, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC);
    let path = c(&file);

    let fd = open(&file, libc::O_RDWR | libc::O_TRUNC | libc::O_CLOEXEC);
    let raw = fd.as_raw_fd();
    sys!(SYS_write, raw, [b'b'; 4096].as_ptr(), 4096);
    sys!(SYS_pwrite64, raw, b"c".as_ptr(), 1, 0);
    sys!(SYS_fallocate, raw, 0, 0, 8192);
    sys!(SYS_ftruncate, raw, 4096);
    sys!(SYS_fchmod, raw, 0o640);
    sys!(SYS_fchown, raw, 0, 0);
    sys!(SYS_fsetxattr, raw, XATTR.as_ptr(), b"v".as_ptr(), 1, 0);
    sys!(SYS_utimensat, raw, 0, 0, 0);
    sys!(SYS_fsync, raw);
    let mapping = Mapping::new(&fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    close(fd);
    // SAFETY: a live, writable, shared mapping of a 4096-byte file.
    unsafe { mapping.0.write_volatile(b'z') };
    drop(mapping);
    drop(open(&dir.join("quiet-new"), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC));

    sys!(SYS_truncate, path.as_ptr(), 2);
    sys!(SYS_chmod, path.as_ptr(), 0o600);
    sys!(SYS_chown, path.as_ptr(), 0, 0);
    sys!(SYS_setxattr, path.as_ptr(), XATTR.as_ptr(), b"v".as_ptr(), 1, 0);
    sys!(SYS_utimensat, AT_FDCWD, path.as_ptr(), 0, 0);
    sys!(SYS_fchmodat, dfd.as_raw_fd(), c"quiet-new".as_ptr(), 0o600);
    sys!(SYS_link, path.as_ptr(), c(&dir.join("quiet-link")).as_ptr());
    sys!(SYS_symlink, c"elsewhere".as_ptr(), c(&dir.join("quiet-symlink")).as_ptr());
    sys!(SYS_mkdir, c(&dir.join("quiet-subdir")).as_ptr(), 0o755);
    sys!(SYS_mknod, c(&dir.join("quiet-fifo")).as_ptr(), libc::S_IFIFO | 0o600, 0);
    sys!(SYS_rename, path.as_ptr(), c(&dir.join("quiet-renamed")).as_ptr());
    sys!(SYS_unlink, c(&dir.join("quiet-renamed")).as_ptr());
    sys!(SYS_rmdir, c(&dir.join("quiet-subdir")).as_ptr());
    let mine = k.mine();
    k.assert_no_event("operations outside the filter", mine);
}

#[test]
fn the_watchers_own_operations_are_ignored() {
    let Some(mut k) = Kernel::load_ignoring(std::process::id()) else { return };
    let file = k.file("self-file", &[b'a'; 4096]);
    let dir = k.subdir("self-dir");
    k.watch(&file);
    k.watch(&dir);
    k.watch_name("self-file");

    let fd = open(&file, libc::O_RDWR | libc::O_TRUNC | libc::O_CLOEXEC);
    sys!(SYS_write, fd.as_raw_fd(), [b'b'; 4096].as_ptr(), 4096);
    sys!(SYS_fchmod, fd.as_raw_fd(), 0o640);
    sys!(SYS_fsync, fd.as_raw_fd());
    let mapping = Mapping::new(&fd, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED);
    let mut ring = IoUring::new(4).expect("io_uring_setup");
    let sqe = opcode::Write::new(types::Fd(fd.as_raw_fd()), b"c".as_ptr(), 1).offset(0).build();
    uring_run(&mut ring, "IORING_OP_WRITE", sqe);
    close(fd);
    // SAFETY: a live, writable, shared mapping of a 4096-byte file.
    unsafe { mapping.0.write_volatile(b'z') };
    drop(mapping);
    close(open(&dir.join("self-new"), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC));
    sys!(SYS_chmod, c(&file).as_ptr(), 0o600);
    sys!(SYS_rename, c(&file).as_ptr(), c(&dir.join("self-file")).as_ptr());
    let pid = std::process::id();
    // The sentinel, written by a child, still comes through: the programs are live.
    k.assert_no_event("the watcher's own pid", |ev| ev.header.pid == pid);
}

#[test]
fn an_ancestors_name_keeps_its_renames_removals_and_mounts_only() {
    let Some(mut k) = Kernel::load() else { return };
    let ancestor = k.subdir("ancestor-dir");
    let inside = ancestor.join("ancestor-inside");
    std::fs::write(&inside, b"x\n").unwrap();
    let away = k.dir().join("ancestor-away");
    k.watch_ancestor_name("ancestor-dir");
    // An op on an entry in it, or one that changes it without moving it: not sent (an
    // ancestor's name is no monitored entry's).
    sys!(SYS_chmod, c(&ancestor).as_ptr(), 0o755);
    sys!(SYS_unlink, c(&inside).as_ptr());
    let mine = k.mine();
    k.assert_no_event("ops in or on an ancestor that move nothing", mine);
    sys!(SYS_rename, c(&ancestor).as_ptr(), c(&away).as_ptr());
    k.expect("rename of an ancestor", Expect::paths(Op::Rename, bytes(&ancestor), bytes(&away)));
    sys!(SYS_rename, c(&away).as_ptr(), c(&ancestor).as_ptr());
    k.expect("rename back into an ancestor's place", Expect::paths(Op::Rename, bytes(&away), bytes(&ancestor)));
    sys!(SYS_rmdir, c(&ancestor).as_ptr());
    k.expect("rmdir of an ancestor", Expect::path(Op::Rmdir, bytes(&ancestor)));
}

#[test]
fn a_mount_and_umount_over_a_monitored_name_are_sent_with_target_and_source() {
    let Some(mut k) = Kernel::load() else { return };
    let target = k.subdir("mount-target");
    k.watch_name("mount-target");
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc =
        unsafe { libc::mount(c"kubefim-test".as_ptr(), c(&target).as_ptr(), c"tmpfs".as_ptr(), 0, std::ptr::null()) };
    assert_eq!(rc, 0, "mount a tmpfs on {}: {}", target.display(), std::io::Error::last_os_error());
    sys!(SYS_umount2, c(&target).as_ptr(), 0);
    let cwd = key_of(&std::env::current_dir().unwrap());
    k.expect("mount", Expect::paths(Op::Mount, bytes(&target), b"kubefim-test").start(1, AT_FDCWD, cwd));
    k.expect("umount", Expect::path(Op::Umount, bytes(&target)));
}

// ---- execs: new containers ---------------------------------------------------------------

/// The cgroup v2 id of this process: the inode number of its cgroup's directory.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line");
    std::fs::metadata(format!("/sys/fs/cgroup{path}")).expect("stat the cgroup's directory").ino()
}

/// Runs `/bin/true` in a child process (in this process's cgroup); its pid.
fn exec_true() -> u32 {
    let mut child = std::process::Command::new("/bin/true").spawn().expect("spawn /bin/true");
    let pid = child.id();
    assert!(child.wait().expect("wait for /bin/true").success());
    pid
}

#[test]
fn an_exec_in_a_cgroup_not_known_is_sent_once_it_is_known_no_longer_and_every_one_when_it_sends_execs() {
    let Some(mut k) = Kernel::load_sending_execs() else { return };
    let pid = exec_true();
    let ev = k.next_event(DEADLINE, |ev| ev.op == Op::Exec && ev.header.pid == pid);
    assert_eq!(ev.header.cgroup_id, own_cgroup_id(), "{ev:?}");
    assert_eq!(ev.header.ppid, std::process::id(), "{ev:?}");
    assert_eq!(ev.comm(), "true", "{ev:?}");
    assert_eq!(ev.header.flags, 0, "an exec names no inode and no path: {ev:?}");
    k.know_cgroup(ev.header.cgroup_id);
    let pid = exec_true();
    k.assert_no_event("an exec in a known cgroup", move |ev| ev.op == Op::Exec && ev.header.pid == pid);
    // A container checked for drift execution: every exec is sent.
    k.send_cgroup_execs(ev.header.cgroup_id);
    for _ in 0..2 {
        let pid = exec_true();
        k.next_event(DEADLINE, |ev| ev.op == Op::Exec && ev.header.pid == pid);
    }
}

#[test]
fn no_exec_is_sent_unless_the_watcher_checks_containers() {
    let Some(mut k) = Kernel::load() else { return };
    let pid = exec_true();
    k.assert_no_event("an exec without container checks", move |ev| ev.op == Op::Exec && ev.header.pid == pid);
}

fn bytes(path: &Path) -> Vec<u8> {
    path.as_os_str().as_bytes().to_vec()
}
