//! Changes made by path: rename, unlink, rmdir, link, symlink, mkdir, mknod, and the
//! by-path forms of truncate, chmod, chown, setxattr, removexattr and utimes. A path cannot be
//! resolved to an inode from a tracepoint, so the event carries the path as the syscall got
//! it, the inode of the directory a relative path starts from, and the actor; the filter here
//! keeps it when the path's last or next-to-last component is a monitored name (a path longer
//! than the event's slot is read whole for that), or when a relative path starts in a watched
//! directory; it is sent when the syscall succeeded (`confirm`). The watcher resolves it in
//! the actor's root and cwd and rehashes what it names.
//!
//! Argument layouts are the syscalls' (x86-64, 6.18), read as in `fd_ops`.

use aya_ebpf::helpers::bpf_probe_read_user_str_bytes;
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{
    EVENT_EXCHANGE, EVENT_HAS_PATHS, EVENT_PATH_TRUNCATED, Op, PATH_CAP, PathEvent, WATCH_ANCESTOR, WATCH_DIR,
    WATCH_FILE,
};

use crate::EVENTS;
use crate::confirm::{hold_path, syscall_nr};
use crate::emit::{active, fill_header, long_path_names_known, lost, path_names_known, watched, within_budget};
use crate::fd_ops::arg;
use crate::kernel::{AT_FDCWD, current_task, mnt_ns, root_dir_key, start_dir_key};

/// Sends a path event for up to two (dirfd, user path pointer) pairs (a zero pointer is no
/// path) if the filter keeps it.
#[inline(always)]
pub fn path_event(ctx: &TracePointContext, op: Op, paths: [(i64, i64); 2], flags: u32) {
    let Some((cfg, pid_tgid)) = active() else { return };
    let task = current_task();
    let Some(ev) = PATH_EVENT.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, used by this program alone while it runs (syscall tracepoint
    // programs run with preemption off); the header is filled below and each path slot is
    // NUL-terminated before it is read.
    let ev = unsafe { &mut *ev };
    fill_header(&mut ev.header, &cfg, task, pid_tgid, op as u32, flags | EVENT_HAS_PATHS, 0);
    // A rename, removal or mount of a rule root's ancestor can swap or cover the whole root:
    // those ops also pass on an ancestor's name, and a mount also on a target given as a
    // descriptor of anything watched (move_mount and mount_setattr with an empty path). A
    // mount's second path is its source: carried, never a reason to send.
    let mount = op.is_mount();
    let ancestors = mount || matches!(op, Op::Rename | Op::Unlink | Op::Rmdir);
    let start_bits = if mount { WATCH_FILE | WATCH_DIR | WATCH_ANCESTOR } else { WATCH_DIR };
    // What the turns of the loop decide, kept in per-CPU map memory rather than in locals:
    // the verifier does not follow values through map memory, so every turn of the loop and
    // every path through it reaches the name walks in one state, not one per combination of
    // what earlier turns found (with locals, the two-path programs took seconds to verify).
    let Some(decided) = PATH_DECIDED.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot, as for PATH_EVENT.
    let decided = unsafe { &mut *decided };
    decided.keep = 0;
    decided.long = [0; 2];
    let mut i = 0;
    while i < 2 {
        let (dirfd, ptr) = paths[i];
        let dirfd = dirfd as i32 as i64;
        let slot = &mut ev.paths[i];
        slot[0] = 0;
        if ptr != 0 {
            // SAFETY: the helper bounds the copy by the slot and NUL-terminates it.
            let len = match unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, slot) } {
                Ok(s) => s.len(),
                Err(_) => 0,
            };
            let decides = !mount || i == 0;
            let truncated = len >= PATH_CAP - 1;
            if truncated {
                ev.header.flags |= EVENT_PATH_TRUNCATED;
            }
            ev.header.dirfd[i] = dirfd as i32;
            if slot[0] != b'/'
                && let Some(key) = start_dir_key(&cfg, task, dirfd)
            {
                ev.header.start[i] = key;
                if decides && watched(&key) & start_bits != 0 {
                    decided.keep = 1;
                }
            }
            if decides {
                if truncated {
                    decided.long[i] = ptr as u64;
                } else if path_names_known(slot, ancestors) {
                    decided.keep = 1;
                }
            }
        }
        i += 1;
    }
    // Paths too long for their slot are read whole here, after the loop: one call site, so
    // the verifier checks the long walk once, not once per turn of the loop.
    let mut j = 0;
    while decided.keep == 0 && j < 2 {
        if decided.long[j] != 0 && long_path_names_known(decided.long[j], ancestors) {
            decided.keep = 1;
        }
        j += 1;
    }
    let keep = decided.keep != 0;
    if !keep {
        return;
    }
    // Where absolute paths start, and the mount namespace: with them the watcher can resolve
    // an absolute path as the actor did even after the actor is gone. Read only for an event
    // that is sent: every hooked path syscall on the node pays for what comes before.
    if ev.paths[0][0] == b'/' || ev.paths[1][0] == b'/' {
        let root = root_dir_key(&cfg, task).unwrap_or_default();
        let mut i = 0;
        while i < 2 {
            if ev.paths[i][0] == b'/' {
                ev.header.start[i] = root;
            }
            i += 1;
        }
    }
    ev.header.mnt_ns = mnt_ns(&cfg, task);
    // Sent when the syscall returns without an error (`confirm`), or now if it cannot wait;
    // the budget is charged when it is sent (a failed call costs none).
    if !hold_path(ev, pid_tgid as u32, syscall_nr(ctx))
        && within_budget(pid_tgid)
        && EVENTS.output::<PathEvent>(&*ev, 0).is_err()
    {
        lost();
    }
}

/// The path event being built, per CPU: it is sent, or held until its syscall's exit, only
/// when the filter keeps it (a reservation in the ring buffer for every hooked path syscall
/// on the node would make each one pay for it).
#[map(name = "PATH_EVENT")]
static PATH_EVENT: PerCpuArray<PathEvent> = PerCpuArray::with_max_entries(1, 0);

/// What [`path_event`]'s loop over the paths decided, per CPU (see there).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Decided {
    /// Non-zero: the event is kept.
    keep: u64,
    /// The user addresses of paths that did not fit in their slot, to be filtered whole.
    long: [u64; 2],
}

#[map(name = "PATH_DECIDED")]
static PATH_DECIDED: PerCpuArray<Decided> = PerCpuArray::with_max_entries(1, 0);

macro_rules! path_hook {
    // name, op, dirfd arg index (None = AT_FDCWD), path arg index
    ($name:ident, $op:expr, $dfd:expr, $path:expr) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            let dfd = match $dfd {
                Some(n) => arg(&ctx, n),
                None => AT_FDCWD,
            };
            path_event(&ctx, $op, [(dfd, arg(&ctx, $path)), (0, 0)], 0);
            0
        }
    };
}

path_hook!(sys_enter_truncate, Op::Truncate, None, 0);
path_hook!(sys_enter_chmod, Op::Chmod, None, 0);
path_hook!(sys_enter_fchmodat, Op::Chmod, Some(0), 1);
path_hook!(sys_enter_fchmodat2, Op::Chmod, Some(0), 1);
path_hook!(sys_enter_chown, Op::Chown, None, 0);
path_hook!(sys_enter_lchown, Op::Chown, None, 0);
path_hook!(sys_enter_fchownat, Op::Chown, Some(0), 1);
path_hook!(sys_enter_setxattr, Op::Setxattr, None, 0);
path_hook!(sys_enter_lsetxattr, Op::Setxattr, None, 0);
path_hook!(sys_enter_setxattrat, Op::Setxattr, Some(0), 1);
path_hook!(sys_enter_removexattr, Op::Removexattr, None, 0);
path_hook!(sys_enter_lremovexattr, Op::Removexattr, None, 0);
path_hook!(sys_enter_removexattrat, Op::Removexattr, Some(0), 1);
path_hook!(sys_enter_utimes, Op::Utimes, None, 0);
path_hook!(sys_enter_utime, Op::Utimes, None, 0);
path_hook!(sys_enter_futimesat, Op::Utimes, Some(0), 1);
path_hook!(sys_enter_unlink, Op::Unlink, None, 0);
path_hook!(sys_enter_rmdir, Op::Rmdir, None, 0);
path_hook!(sys_enter_mkdir, Op::Mkdir, None, 0);
path_hook!(sys_enter_mkdirat, Op::Mkdir, Some(0), 1);
path_hook!(sys_enter_mknod, Op::Mknod, None, 0);
path_hook!(sys_enter_mknodat, Op::Mknod, Some(0), 1);
// symlink(target, linkpath): only where the link is made matters; the target is content.
path_hook!(sys_enter_symlink, Op::Symlink, None, 1);
path_hook!(sys_enter_symlinkat, Op::Symlink, Some(1), 2);

/// `unlinkat(dfd, pathname, flags)`: AT_REMOVEDIR makes it an rmdir.
#[tracepoint]
pub fn sys_enter_unlinkat(ctx: TracePointContext) -> u32 {
    const AT_REMOVEDIR: i64 = 0x200;
    let op = if arg(&ctx, 2) & AT_REMOVEDIR != 0 { Op::Rmdir } else { Op::Unlink };
    path_event(&ctx, op, [(arg(&ctx, 0), arg(&ctx, 1)), (0, 0)], 0);
    0
}

#[tracepoint]
pub fn sys_enter_rename(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Rename, [(AT_FDCWD, arg(&ctx, 0)), (AT_FDCWD, arg(&ctx, 1))], 0);
    0
}

#[tracepoint]
pub fn sys_enter_renameat(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Rename, [(arg(&ctx, 0), arg(&ctx, 1)), (arg(&ctx, 2), arg(&ctx, 3))], 0);
    0
}

/// `renameat2(olddfd, oldname, newdfd, newname, flags)`.
#[tracepoint]
pub fn sys_enter_renameat2(ctx: TracePointContext) -> u32 {
    const RENAME_EXCHANGE: i64 = 0x2;
    let flags = if arg(&ctx, 4) & RENAME_EXCHANGE != 0 { EVENT_EXCHANGE } else { 0 };
    path_event(&ctx, Op::Rename, [(arg(&ctx, 0), arg(&ctx, 1)), (arg(&ctx, 2), arg(&ctx, 3))], flags);
    0
}

#[tracepoint]
pub fn sys_enter_link(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Link, [(AT_FDCWD, arg(&ctx, 0)), (AT_FDCWD, arg(&ctx, 1))], 0);
    0
}

#[tracepoint]
pub fn sys_enter_linkat(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Link, [(arg(&ctx, 0), arg(&ctx, 1)), (arg(&ctx, 2), arg(&ctx, 3))], 0);
    0
}
