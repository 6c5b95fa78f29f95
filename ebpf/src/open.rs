//! Opens for writing: `sys_exit_open*` reads the open's flags from the thread's saved
//! registers and resolves the new fd. An open of a watched file with O_TRUNC is a truncate;
//! any other open for writing is noted (its close is the rehash trigger); a file opened with
//! O_CREAT in a watched directory is a create, and its inode is watched from then on.

use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{EVENT_HAS_PARENT, EVENT_HAS_TARGET, EventHeader, Op, WATCH_DIR, WATCH_FILE};

use crate::EVENTS;
use crate::emit::{active, fill_header, lost, watch, watched, within_budget};
use crate::fd_ops::arg;
use crate::kernel::{FMODE_CREATED, current_task, file_mode_key, file_of_fd, file_parent_key, syscall_arg};

const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

/// The flags of a finished open, read from the thread's saved registers at its exit; an
/// entry hook that kept them by thread for the exit cost every open on the node a second
/// program and a hash map update (519 ns a run on 6.18.44), monitored or not.
#[derive(Clone, Copy)]
enum Flags {
    /// In argument `n` (open: 1, openat: 2).
    Arg(usize),
    /// creat(2): O_WRONLY | O_CREAT | O_TRUNC.
    Creat,
    /// openat2(2): `how->flags`, the first u64 of the `struct open_how` in argument 2.
    How,
}

#[inline(always)]
fn open_flags(cfg: &kubefim_common::Config, flags: Flags) -> u32 {
    match flags {
        Flags::Arg(n) => syscall_arg(cfg, n).unwrap_or(0) as u32,
        Flags::Creat => O_WRONLY | O_CREAT | O_TRUNC,
        Flags::How => {
            let how = syscall_arg(cfg, 2).unwrap_or(0);
            // SAFETY: a user-memory read that fails cleanly on a bad pointer (the open has
            // read it already).
            unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0) as u32
        }
    }
}

#[inline(always)]
fn opened(ctx: &TracePointContext, how: Flags) {
    // sys_exit_* records: the return value at offset 16.
    let fd = arg(ctx, 0);
    if fd < 0 {
        return;
    }
    let Some((cfg, pid_tgid)) = active() else { return };
    let flags = open_flags(&cfg, how);
    if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) == 0 {
        return;
    }
    let task = current_task();
    let Some(file) = file_of_fd(&cfg, task, fd) else { return };
    let Some((mode, key)) = file_mode_key(&cfg, file) else { return };
    let (op, event_flags, parent) = if watched(&key) & WATCH_FILE != 0 {
        let op = if flags & O_TRUNC != 0 { Op::Truncate } else { Op::OpenWrite };
        (op, EVENT_HAS_TARGET, Default::default())
    } else if flags & O_CREAT != 0 && mode & FMODE_CREATED != 0 {
        // Only an open that created the file can add one to a watched directory.
        let Some(parent) = file_parent_key(&cfg, file) else { return };
        if watched(&parent) & WATCH_DIR == 0 {
            return;
        }
        watch(&key, WATCH_FILE);
        (Op::Create, EVENT_HAS_TARGET | EVENT_HAS_PARENT, parent)
    } else {
        return;
    };
    if !within_budget(pid_tgid) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) else {
        lost();
        return;
    };
    // SAFETY: sized for an EventHeader; filled below.
    let h = unsafe { &mut *entry.as_mut_ptr() };
    fill_header(h, &cfg, task, pid_tgid, op as u32, event_flags, flags);
    h.target = key;
    h.parent = parent;
    entry.submit(0);
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    opened(&ctx, Flags::Arg(1));
    0
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    opened(&ctx, Flags::Arg(2));
    0
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    opened(&ctx, Flags::How);
    0
}

#[tracepoint]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    opened(&ctx, Flags::Creat);
    0
}
