//! Changes made through a file descriptor: the write family, ftruncate, fallocate, fchmod,
//! fchown, f{set,remove}xattr, futimens, the chattr ioctls, a shared writable mmap, and the
//! close of a file open for writing (the watcher's rehash trigger). The fd is resolved to its inode here, so a
//! file reached through a bind mount, a relative path, a chroot or another mount namespace is
//! the same watched (device, inode) as ever.
//!
//! Syscall tracepoint records (`/sys/kernel/tracing/events/syscalls/sys_enter_*/format`,
//! checked on 6.18): 8 bytes of common fields, `int __syscall_nr` padded to 8, then each
//! argument as 8 bytes from offset 16.

use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{Op, WATCH_FILE};

use crate::confirm::hold_inode;
use crate::emit::{active, inode_event, watched};
use crate::kernel::{FMODE_WRITE, current_task, file_mode_key, file_of_fd};

/// Argument `n` of a `sys_enter_*` record.
#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> i64 {
    // SAFETY: reading within the tracepoint record; a failed read is 0.
    unsafe { ctx.read_at::<i64>(16 + 8 * n).unwrap_or(0) }
}

/// How an fd event is sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Delivery {
    /// At once, and only for a file open for writing: the write family, ftruncate and
    /// fallocate fail on any other (EBADF, EINVAL), so another descriptor makes no event,
    /// and neither does a flood of such calls on a file any process can read. The close of a
    /// writer likewise (only it is a rehash trigger).
    Writer,
    /// When the syscall succeeded (`confirm`): metadata changes, which any process can
    /// attempt, and fail, on a file it can read.
    Confirmed,
}

/// Emits `op` if `fd` is a watched file.
#[inline(always)]
fn fd_event(ctx: &TracePointContext, op: Op, fd: i64, arg: u32, send: Delivery) {
    let Some((cfg, pid_tgid)) = active() else { return };
    let task = current_task();
    let Some(file) = file_of_fd(&cfg, task, fd) else { return };
    let Some((mode, key)) = file_mode_key(&cfg, file) else { return };
    if send == Delivery::Writer && mode & FMODE_WRITE == 0 {
        return;
    }
    if watched(&key) & WATCH_FILE == 0 {
        return;
    }
    if send == Delivery::Confirmed {
        hold_inode(ctx, op as u32, arg, key);
    } else {
        inode_event(&cfg, task, pid_tgid, op as u32, 0, arg, key);
    }
}

/// One program per syscall: `$fd` is the index of the fd argument.
macro_rules! fd_hook {
    ($name:ident, $op:expr, $fd:expr, $send:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            fd_event(&ctx, $op, arg(&ctx, $fd), 0, $send);
            0
        }
    };
}

fd_hook!(sys_enter_write, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_pwrite64, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_writev, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_pwritev, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_pwritev2, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_copy_file_range, Op::Write, 2, Delivery::Writer);
fd_hook!(sys_enter_sendfile64, Op::Write, 0, Delivery::Writer);
fd_hook!(sys_enter_splice, Op::Write, 2, Delivery::Writer);
fd_hook!(sys_enter_ftruncate, Op::Truncate, 0, Delivery::Writer);
fd_hook!(sys_enter_fallocate, Op::Fallocate, 0, Delivery::Writer);
fd_hook!(sys_enter_fchmod, Op::Chmod, 0, Delivery::Confirmed);
fd_hook!(sys_enter_fchown, Op::Chown, 0, Delivery::Confirmed);
fd_hook!(sys_enter_fsetxattr, Op::Setxattr, 0, Delivery::Confirmed);
fd_hook!(sys_enter_fremovexattr, Op::Removexattr, 0, Delivery::Confirmed);
fd_hook!(sys_enter_close, Op::Close, 0, Delivery::Writer);

/// `ioctl(fd, cmd, arg)`: the inode-flag setters (`chattr`), include/uapi/linux/fs.h (6.18):
/// FS_IOC_SETFLAGS `_IOW('f', 2, long)`, FS_IOC32_SETFLAGS `_IOW('f', 2, int)`,
/// FS_IOC_FSSETXATTR `_IOW('X', 32, struct fsxattr)`. Any other command returns at the first
/// compare: every ioctl on the node runs this.
#[tracepoint]
pub fn sys_enter_ioctl(ctx: TracePointContext) -> u32 {
    const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
    const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
    const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;
    // `unsigned int cmd` in a 64-bit slot.
    let cmd = arg(&ctx, 1) as u32;
    if cmd == FS_IOC_SETFLAGS || cmd == FS_IOC32_SETFLAGS || cmd == FS_IOC_FSSETXATTR {
        fd_event(&ctx, Op::SetFlags, arg(&ctx, 0), cmd, Delivery::Confirmed);
    }
    0
}

/// `file_setattr(dfd, filename, struct file_attr *ufattr, size_t usize, unsigned int
/// at_flags)` (6.17+): chattr by path, or on `dfd` itself with AT_EMPTY_PATH and an empty path.
#[tracepoint]
pub fn sys_enter_file_setattr(ctx: TracePointContext) -> u32 {
    const AT_EMPTY_PATH: i64 = 0x1000;
    let path = arg(&ctx, 1);
    // SAFETY: a user-memory read that fails cleanly on a bad pointer.
    let first = if path == 0 { 0 } else { unsafe { bpf_probe_read_user(path as *const u8) }.unwrap_or(0) };
    if first == 0 && arg(&ctx, 4) & AT_EMPTY_PATH != 0 {
        fd_event(&ctx, Op::SetFlags, arg(&ctx, 0), 0, Delivery::Confirmed);
    } else {
        crate::path_ops::path_event(&ctx, Op::SetFlags, [(arg(&ctx, 0), path), (0, 0)], 0);
    }
    0
}

/// `mmap(addr, len, prot, flags, fd, off)`: only a shared, writable mapping can change the
/// file (stores through it are seen later by `dirty`).
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    const PROT_WRITE: i64 = 0x2;
    const MAP_SHARED: i64 = 0x1;
    if arg(&ctx, 2) & PROT_WRITE != 0 && arg(&ctx, 3) & MAP_SHARED != 0 {
        fd_event(&ctx, Op::Mmap, arg(&ctx, 4), 0, Delivery::Writer);
    }
    0
}

/// `utimensat(dfd, filename, utimes, flags)` with a NULL filename is futimens(dfd); with a
/// filename it is a path operation (see `path_ops`).
#[tracepoint]
pub fn sys_enter_utimensat(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 1) == 0 {
        fd_event(&ctx, Op::Utimes, arg(&ctx, 0), 0, Delivery::Confirmed);
    } else {
        crate::path_ops::path_event(&ctx, Op::Utimes, [(arg(&ctx, 0), arg(&ctx, 1)), (0, 0)], 0);
    }
    0
}
