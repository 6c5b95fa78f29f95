//! Changes made through a file descriptor: the write family, ftruncate, fallocate, fchmod,
//! fchown, f{set,remove}xattr, futimens, a shared writable mmap, and the close of a file open
//! for writing (the watcher's rehash trigger). The fd is resolved to its inode here, so a
//! file reached through a bind mount, a relative path, a chroot or another mount namespace is
//! the same watched (device, inode) as ever.
//!
//! Syscall tracepoint records (`/sys/kernel/tracing/events/syscalls/sys_enter_*/format`,
//! checked on 6.18): 8 bytes of common fields, `int __syscall_nr` padded to 8, then each
//! argument as 8 bytes from offset 16.

use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{Op, WATCH_FILE};

use crate::emit::{active, inode_event, watched};
use crate::kernel::{FMODE_WRITE, current_task, file_key, file_of_fd, read};

/// Argument `n` of a `sys_enter_*` record.
#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> i64 {
    // SAFETY: reading within the tracepoint record; a failed read is 0.
    unsafe { ctx.read_at::<i64>(16 + 8 * n).unwrap_or(0) }
}

/// Emits `op` if `fd` is a watched file. `need_write` limits it to files open for writing
/// (close: only the close of a writer is a rehash trigger).
#[inline(always)]
fn fd_event(op: Op, fd: i64, arg: u32, need_write: bool) {
    let Some((cfg, pid_tgid)) = active() else { return };
    let task = current_task();
    let Some(file) = file_of_fd(&cfg, task, fd) else { return };
    if need_write {
        let mode: u32 = read(file, cfg.offsets.file_mode).unwrap_or(0);
        if mode & FMODE_WRITE == 0 {
            return;
        }
    }
    let Some(key) = file_key(&cfg, file) else { return };
    if watched(&key) & WATCH_FILE == 0 {
        return;
    }
    inode_event(&cfg, task, pid_tgid, op as u32, 0, arg, key);
}

/// One program per syscall: `$fd` is the index of the fd argument.
macro_rules! fd_hook {
    ($name:ident, $op:expr, $fd:expr) => {
        fd_hook!($name, $op, $fd, false);
    };
    ($name:ident, $op:expr, $fd:expr, $need_write:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            fd_event($op, arg(&ctx, $fd), 0, $need_write);
            0
        }
    };
}

fd_hook!(sys_enter_write, Op::Write, 0);
fd_hook!(sys_enter_pwrite64, Op::Write, 0);
fd_hook!(sys_enter_writev, Op::Write, 0);
fd_hook!(sys_enter_pwritev, Op::Write, 0);
fd_hook!(sys_enter_pwritev2, Op::Write, 0);
fd_hook!(sys_enter_copy_file_range, Op::Write, 2);
fd_hook!(sys_enter_sendfile64, Op::Write, 0);
fd_hook!(sys_enter_splice, Op::Write, 2);
fd_hook!(sys_enter_ftruncate, Op::Truncate, 0);
fd_hook!(sys_enter_fallocate, Op::Fallocate, 0);
fd_hook!(sys_enter_fchmod, Op::Chmod, 0);
fd_hook!(sys_enter_fchown, Op::Chown, 0);
fd_hook!(sys_enter_fsetxattr, Op::Setxattr, 0);
fd_hook!(sys_enter_fremovexattr, Op::Removexattr, 0);
fd_hook!(sys_enter_close, Op::Close, 0, true);

/// `mmap(addr, len, prot, flags, fd, off)`: only a shared, writable mapping can change the
/// file (stores through it are seen later by `dirty`).
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    const PROT_WRITE: i64 = 0x2;
    const MAP_SHARED: i64 = 0x1;
    if arg(&ctx, 2) & PROT_WRITE != 0 && arg(&ctx, 3) & MAP_SHARED != 0 {
        fd_event(Op::Mmap, arg(&ctx, 4), 0, true);
    }
    0
}

/// `utimensat(dfd, filename, utimes, flags)` with a NULL filename is futimens(dfd); with a
/// filename it is a path operation (see `path_ops`).
#[tracepoint]
pub fn sys_enter_utimensat(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 1) == 0 {
        fd_event(Op::Utimes, arg(&ctx, 0), 0, false);
    } else {
        crate::path_ops::path_event(&ctx, Op::Utimes, [(arg(&ctx, 0), arg(&ctx, 1)), (0, 0)], 0);
    }
    0
}
