//! Changes to what is mounted where: mount(2), move_mount(2) (which attaches what fsmount(2)
//! and open_tree(2) made: those two only make detached mounts, invisible until moved),
//! mount_setattr(2) and umount2(2). A bind mount over a monitored file or a tmpfs over a
//! monitored directory hides the real files from every reader without changing them, so no
//! write hook fires: the mount itself is the event. The target is sent as a path event (`path_ops::path_event`, whose filter
//! keeps a mount at, above or below a monitored path); the watcher re-resolves the rule roots
//! it touches.
//!
//! Argument layouts (x86-64, 6.18, /sys/kernel/tracing/events/syscalls/sys_enter_*/format):
//! `mount(dev_name, dir_name, type, flags, data)`, `move_mount(from_dfd, from_pathname, to_dfd,
//! to_pathname, flags)`, `mount_setattr(dfd, path, flags, uattr, usize)`, `umount(name, flags)`.

use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::Op;

use crate::fd_ops::arg;
use crate::kernel::AT_FDCWD;
use crate::path_ops::path_event;

#[tracepoint]
pub fn sys_enter_mount(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Mount, [(AT_FDCWD, arg(&ctx, 1)), (AT_FDCWD, arg(&ctx, 0))], 0);
    0
}

/// With `MOVE_MOUNT_T_EMPTY_PATH` the target path is empty and `to_dfd` is the target: the
/// filter then looks at the descriptor's inode.
#[tracepoint]
pub fn sys_enter_move_mount(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::MoveMount, [(arg(&ctx, 2), arg(&ctx, 3)), (arg(&ctx, 0), arg(&ctx, 1))], 0);
    0
}

#[tracepoint]
pub fn sys_enter_mount_setattr(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::MountSetattr, [(arg(&ctx, 0), arg(&ctx, 1)), (0, 0)], 0);
    0
}

/// umount2(2): its tracepoint is `sys_enter_umount`.
#[tracepoint]
pub fn sys_enter_umount(ctx: TracePointContext) -> u32 {
    path_event(&ctx, Op::Umount, [(AT_FDCWD, arg(&ctx, 0)), (0, 0)], 0);
    0
}
