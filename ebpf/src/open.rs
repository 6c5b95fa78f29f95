//! Opens for writing: `sys_enter_open*` remembers the flags by thread, `sys_exit_open*`
//! resolves the new fd. An open of a watched file with O_TRUNC is a truncate; any other open
//! for writing is noted (its close is the rehash trigger); a file opened with O_CREAT in a
//! watched directory is a create, and its inode is watched from then on.

use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{EVENT_HAS_PARENT, EVENT_HAS_TARGET, EventHeader, Op, WATCH_DIR, WATCH_FILE};

use crate::emit::{active, fill_header, lost, watch, watched, within_budget};
use crate::fd_ops::arg;
use crate::kernel::{FMODE_CREATED, current_task, file_key, file_of_fd, file_parent_key, read};
use crate::{EVENTS, OPENS};

const O_WRONLY: u32 = 0o1;
const O_RDWR: u32 = 0o2;
const O_CREAT: u32 = 0o100;
const O_TRUNC: u32 = 0o1000;

#[inline(always)]
fn remember(flags: u32) {
    if flags & (O_WRONLY | O_RDWR | O_CREAT | O_TRUNC) == 0 {
        return;
    }
    if active().is_none() {
        return;
    }
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    let _ = OPENS.insert(tid, flags, 0);
}

#[tracepoint]
pub fn sys_enter_open(ctx: TracePointContext) -> u32 {
    remember(arg(&ctx, 1) as u32);
    0
}

#[tracepoint]
pub fn sys_enter_openat(ctx: TracePointContext) -> u32 {
    remember(arg(&ctx, 2) as u32);
    0
}

#[tracepoint]
pub fn sys_enter_creat(_ctx: TracePointContext) -> u32 {
    remember(O_WRONLY | O_CREAT | O_TRUNC);
    0
}

/// `openat2(dfd, filename, struct open_how *how, size)`: `how->flags` is the first u64.
#[tracepoint]
pub fn sys_enter_openat2(ctx: TracePointContext) -> u32 {
    // SAFETY: a user-memory read that fails cleanly on a bad pointer.
    let flags = unsafe { bpf_probe_read_user(arg(&ctx, 2) as *const u64) }.unwrap_or(0);
    remember(flags as u32);
    0
}

#[inline(always)]
fn opened(ctx: &TracePointContext) {
    let tid = aya_ebpf::helpers::bpf_get_current_pid_tgid() as u32;
    // SAFETY: copied out at once.
    let Some(flags) = (unsafe { OPENS.get(tid).copied() }) else { return };
    let _ = OPENS.remove(tid);
    // sys_exit_* records: the return value at offset 16.
    let fd = arg(ctx, 0);
    if fd < 0 {
        return;
    }
    let Some((cfg, pid_tgid)) = active() else { return };
    let task = current_task();
    let Some(file) = file_of_fd(&cfg, task, fd) else { return };
    let Some(key) = file_key(&cfg, file) else { return };
    let (op, event_flags, parent) = if watched(&key) & WATCH_FILE != 0 {
        let op = if flags & O_TRUNC != 0 { Op::Truncate } else { Op::OpenWrite };
        (op, EVENT_HAS_TARGET, Default::default())
    } else if flags & O_CREAT != 0 && read::<u32>(file, cfg.offsets.file_mode).unwrap_or(0) & FMODE_CREATED != 0 {
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
    opened(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    opened(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    opened(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_creat(ctx: TracePointContext) -> u32 {
    opened(&ctx);
    0
}
