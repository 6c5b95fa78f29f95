//! Events held until their syscall succeeded. A call that fails changes nothing, yet any
//! process may make one on a monitored name or a readable monitored file (an unlink of a
//! long path, a chmod of a root-owned file by another user, a chattr without
//! CAP_LINUX_IMMUTABLE) as fast as it can: sent at entry, each made the watcher resolve, look
//! and rehash, and a flood of them delayed every report (issue 10, finding 6). So the entry
//! hook keeps what it would send, by thread, and the `sys_exit_*` hook of the same syscall
//! sends it only when the return value is not an error.
//!
//! Exit records (`sys_exit_*/format`, 6.18): 8 bytes of common fields, `int __syscall_nr` at
//! 8, `long ret` at 16. The entry records have `__syscall_nr` at 8 too: an entry kept by a
//! thread whose exit was never seen (it cannot happen for these syscalls, but a map outlives
//! any such assumption) is overwritten by its next kept entry, and never sent for another
//! syscall's exit. When the maps are full the event is sent at entry, unconfirmed: never a
//! silent miss.

use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::HashMap;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{InodeKey, PathEvent};

use crate::EVENTS;
use crate::emit::{active, inode_event, lost, within_budget};
use crate::kernel::current_task;

/// Path events waiting for their syscall's exit, by thread id. The syscall number rides in
/// `header._reserved` while the event waits here (it is zeroed before it is sent). Not
/// preallocated: 656 bytes an entry, and only threads inside a kept path syscall hold one.
#[map(name = "PENDING_PATHS")]
static PENDING_PATHS: HashMap<u32, PathEvent> = HashMap::with_max_entries(4096, crate::BPF_F_NO_PREALLOC);

/// An inode event waiting for its syscall's exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingInode {
    /// The entry's `__syscall_nr`.
    nr: u32,
    /// An `Op` number.
    op: u32,
    /// The event's `arg`.
    arg: u32,
    _pad: u32,
    target: InodeKey,
}

/// Inode events waiting for their syscall's exit, by thread id.
#[map(name = "PENDING_INODES")]
static PENDING_INODES: HashMap<u32, PendingInode> = HashMap::with_max_entries(4096, crate::BPF_F_NO_PREALLOC);

/// `__syscall_nr` of a `sys_enter_*` or `sys_exit_*` record.
#[inline(always)]
pub fn syscall_nr(ctx: &TracePointContext) -> u32 {
    // SAFETY: within the record; a failed read is 0.
    unsafe { ctx.read_at::<i32>(8).unwrap_or(-1) as u32 }
}

/// Keeps a path event until the exit of syscall `nr`. False when there is no room: the
/// caller sends it now.
#[inline(always)]
pub fn hold_path(ev: &mut PathEvent, tid: u32, nr: u32) -> bool {
    ev.header._reserved = nr;
    #[expect(clippy::needless_borrows_for_generic_args, reason = "656 bytes must not be copied to the stack")]
    let held = PENDING_PATHS.insert(tid, &*ev, 0).is_ok();
    ev.header._reserved = 0;
    held
}

/// Keeps an inode event until the exit of syscall `nr`; sends it now when there is no room.
#[inline(always)]
pub fn hold_inode(ctx: &TracePointContext, op: u32, arg: u32, target: InodeKey) {
    let Some((cfg, pid_tgid)) = active() else { return };
    let pending = PendingInode { nr: syscall_nr(ctx), op, arg, _pad: 0, target };
    if PENDING_INODES.insert(pid_tgid as u32, pending, 0).is_err() {
        inode_event(&cfg, current_task(), pid_tgid, op, 0, arg, target);
    }
}

/// `ret` of a `sys_exit_*` record.
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: within the record; a failed read is an error value.
    unsafe { ctx.read_at::<i64>(16).unwrap_or(-1) }
}

/// At a path syscall's exit: sends this thread's held path event if the call succeeded.
#[inline(always)]
pub fn confirm_path(ctx: &TracePointContext) {
    let pid_tgid = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(ev) = PENDING_PATHS.get_ptr_mut(tid) else { return };
    // SAFETY: a map value of this program's map, valid until the delete below.
    let ev = unsafe { &mut *ev };
    if ev.header._reserved == syscall_nr(ctx) && ret(ctx) >= 0 && within_budget(pid_tgid) {
        ev.header._reserved = 0;
        if EVENTS.output::<PathEvent>(&*ev, 0).is_err() {
            lost();
        }
    }
    let _ = PENDING_PATHS.remove(tid);
}

/// At an fd syscall's exit: sends this thread's held inode event if the call succeeded.
#[inline(always)]
pub fn confirm_inode(ctx: &TracePointContext) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out at once.
    let Some(p) = (unsafe { PENDING_INODES.get(tid).copied() }) else { return };
    let _ = PENDING_INODES.remove(tid);
    if p.nr != syscall_nr(ctx) || ret(ctx) < 0 {
        return;
    }
    let Some((cfg, pid_tgid)) = active() else { return };
    inode_event(&cfg, current_task(), pid_tgid, p.op, 0, p.arg, p.target);
}

macro_rules! exit_hook {
    ($name:ident, $confirm:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            $confirm(&ctx);
            0
        }
    };
}

// The exits of every path syscall `path_ops` hooks.
exit_hook!(sys_exit_truncate, confirm_path);
exit_hook!(sys_exit_chmod, confirm_path);
exit_hook!(sys_exit_fchmodat, confirm_path);
exit_hook!(sys_exit_fchmodat2, confirm_path);
exit_hook!(sys_exit_chown, confirm_path);
exit_hook!(sys_exit_lchown, confirm_path);
exit_hook!(sys_exit_fchownat, confirm_path);
exit_hook!(sys_exit_setxattr, confirm_path);
exit_hook!(sys_exit_lsetxattr, confirm_path);
exit_hook!(sys_exit_setxattrat, confirm_path);
exit_hook!(sys_exit_removexattr, confirm_path);
exit_hook!(sys_exit_lremovexattr, confirm_path);
exit_hook!(sys_exit_removexattrat, confirm_path);
exit_hook!(sys_exit_utimes, confirm_path);
exit_hook!(sys_exit_utime, confirm_path);
exit_hook!(sys_exit_futimesat, confirm_path);
exit_hook!(sys_exit_unlink, confirm_path);
exit_hook!(sys_exit_unlinkat, confirm_path);
exit_hook!(sys_exit_rmdir, confirm_path);
exit_hook!(sys_exit_mkdir, confirm_path);
exit_hook!(sys_exit_mkdirat, confirm_path);
exit_hook!(sys_exit_mknod, confirm_path);
exit_hook!(sys_exit_mknodat, confirm_path);
exit_hook!(sys_exit_symlink, confirm_path);
exit_hook!(sys_exit_symlinkat, confirm_path);
exit_hook!(sys_exit_rename, confirm_path);
exit_hook!(sys_exit_renameat, confirm_path);
exit_hook!(sys_exit_renameat2, confirm_path);
exit_hook!(sys_exit_link, confirm_path);
exit_hook!(sys_exit_linkat, confirm_path);
// A mount's event is sent once it is made: a mount that failed covers nothing.
exit_hook!(sys_exit_mount, confirm_path);
exit_hook!(sys_exit_move_mount, confirm_path);
exit_hook!(sys_exit_mount_setattr, confirm_path);
exit_hook!(sys_exit_umount, confirm_path);
// The exits of the fd syscalls that any process may call and fail on a file it can read
// (metadata changes need ownership or a capability); the write family needs a descriptor
// open for writing, which `fd_ops` checks at entry instead.
exit_hook!(sys_exit_fchmod, confirm_inode);
exit_hook!(sys_exit_fchown, confirm_inode);
exit_hook!(sys_exit_fsetxattr, confirm_inode);
exit_hook!(sys_exit_fremovexattr, confirm_inode);
exit_hook!(sys_exit_ioctl, confirm_inode);

/// utimensat is an fd or a path syscall depending on its path argument.
#[tracepoint]
pub fn sys_exit_utimensat(ctx: TracePointContext) -> u32 {
    confirm_path(&ctx);
    confirm_inode(&ctx);
    0
}

/// file_setattr likewise (AT_EMPTY_PATH acts on the fd).
#[tracepoint]
pub fn sys_exit_file_setattr(ctx: TracePointContext) -> u32 {
    confirm_path(&ctx);
    confirm_inode(&ctx);
    0
}
