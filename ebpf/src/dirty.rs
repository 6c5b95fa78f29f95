//! What no syscall of a monitored file shows. Stores through a shared writable mapping made
//! after the fd was closed, and io_uring requests, which do not pass through the syscall
//! tracepoints of the operation they perform. Raw tracepoints (raw: they get the kernel
//! pointers the trace records do not carry):
//! - `writeback_mark_inode_dirty(struct inode *inode, int flags)` fires in the writer's
//!   context when an inode of a disk-backed file system is dirtied, whatever the path
//!   (write, mmap store, io_uring worker). tmpfs does not dirty inodes this way.
//! - `io_uring_file_get(struct io_kiocb *req, int fd)` fires when a request looks up the
//!   file of its fd; `io_uring_submit_req(struct io_kiocb *req)` when a request is submitted
//!   (for fixed files, which have no fd lookup, and path operations, which have no fd).
//!
//! Checked on 6.18 (include/trace/events/writeback.h, include/trace/events/io_uring.h).

use aya_ebpf::macros::raw_tracepoint;
use aya_ebpf::programs::RawTracePointContext;
use kubefim_common::{EVENT_URING_PATH_OP, EventHeader, Op, WATCH_FILE};

use crate::EVENTS;
use crate::emit::{active, fill_header, inode_event, lost, watched, within_budget};
use crate::kernel::{PF_KTHREAD, current_task, file_key, file_of_fd, in_open, inode_key, read};

#[raw_tracepoint(tracepoint = "writeback_mark_inode_dirty")]
pub fn writeback_mark_inode_dirty(ctx: RawTracePointContext) -> i32 {
    let inode: u64 = ctx.arg(0);
    let flags: u64 = ctx.arg(1);
    let Some((cfg, pid_tgid)) = active() else { return 0 };
    // Only pages dirtied alone are a store (`__folio_mark_dirty` passes I_DIRTY_PAGES by
    // itself). Timestamp-only dirtying (atime of a read) has no page bit, and a metadata
    // change through `mark_inode_dirty()` (a chmod, ext4's size update) passes the page bit
    // with the inode bits (checked on 6.18 with the writeback_mark_inode_dirty trace): the
    // syscall hooks see those changes, and blaming them as a store would name a chmod `mmap`.
    if flags as u32 & cfg.dirty_pages == 0 || flags as u32 & cfg.dirty_inode != 0 {
        return 0;
    }
    let task = current_task();
    // The flusher (a kernel thread) dirties inodes while it writes back what a process
    // wrote earlier (ext4 allocates delayed blocks then): that process's write was reported.
    let task_flags: u32 = read(task, cfg.offsets.task_flags).unwrap_or(0);
    if task_flags & PF_KTHREAD != 0 {
        return 0;
    }
    let Some(key) = inode_key(&cfg, inode) else { return 0 };
    if watched(&key) & WATCH_FILE == 0 {
        return 0;
    }
    // Inside an open (O_TRUNC dirties the inode): the open's exit reports it as what it is.
    // Asked last: it is three helper calls, and only a watched inode needs the answer.
    if in_open(&cfg) {
        return 0;
    }
    inode_event(&cfg, task, pid_tgid, Op::Dirty as u32, 0, flags as u32, key);
    0
}

/// io_uring opcodes that write to the file of their fd (include/uapi/linux/io_uring.h, 6.18):
/// WRITEV, WRITE_FIXED, FALLOCATE, WRITE, SPLICE, TEE, FSETXATTR, FTRUNCATE.
#[inline(always)]
fn uring_writes(opcode: u8) -> bool {
    matches!(opcode, 2 | 5 | 17 | 23 | 30 | 33 | 41 | 55)
}

/// io_uring opcodes that act by path: OPENAT, OPENAT2, RENAMEAT, UNLINKAT, MKDIRAT,
/// SYMLINKAT, LINKAT, SETXATTR.
#[inline(always)]
fn uring_by_path(opcode: u8) -> bool {
    matches!(opcode, 18 | 28 | 35..=39 | 42)
}

/// `io_uring_file_get(struct io_kiocb *req, int fd)`: a request getting the file of its fd,
/// in the submitter's or a worker's context (both share the submitter's file table).
#[raw_tracepoint(tracepoint = "io_uring_file_get")]
pub fn io_uring_file_get(ctx: RawTracePointContext) -> i32 {
    let req: u64 = ctx.arg(0);
    let fd: u64 = ctx.arg(1);
    let Some((cfg, pid_tgid)) = active() else { return 0 };
    let opcode: u8 = read(req, cfg.offsets.kiocb_opcode).unwrap_or(0);
    if !uring_writes(opcode) {
        return 0;
    }
    let task = current_task();
    let Some(file) = file_of_fd(&cfg, task, fd as i32 as i64) else { return 0 };
    let Some(key) = file_key(&cfg, file) else { return 0 };
    if watched(&key) & WATCH_FILE == 0 {
        return 0;
    }
    inode_event(&cfg, task, pid_tgid, Op::IoUring as u32, 0, opcode as u32, key);
    0
}

/// `REQ_F_FIXED_FILE` (include/linux/io_uring_types.h, 6.18: bit `IOSQE_FIXED_FILE_BIT`, 0): the
/// request's fd is a slot of the ring's registered file table, not a descriptor.
const REQ_F_FIXED_FILE: u64 = 1;
/// `FFS_NOWAIT | FFS_ISREG` (io_uring/filetable.h, 6.18): flag bits in `file_ptr`.
const FFS_FLAGS: u64 = 0x3;

/// The file in slot `index` of the ring's registered file table
/// (`ctx->file_table.data.nodes[index]->file_ptr`, io_uring/filetable.h `io_slot_file`,
/// 6.18), 0 when out of range or empty.
#[inline(always)]
fn fixed_file(cfg: &kubefim_common::Config, req: u64) -> u64 {
    let o = &cfg.offsets;
    if o.ctx_files_nodes == 0 {
        return 0;
    }
    let ring: u64 = read(req, o.kiocb_ctx).unwrap_or(0);
    let index: u32 = read(req, o.kiocb_cqe_fd).unwrap_or(u32::MAX);
    let nr: u32 = read(ring, o.ctx_files_nr).unwrap_or(0);
    if index >= nr {
        return 0;
    }
    let nodes: u64 = read(ring, o.ctx_files_nodes).unwrap_or(0);
    let node: u64 = read(nodes, index.wrapping_mul(8)).unwrap_or(0);
    read::<u64>(node, o.rsrc_node_file_ptr).unwrap_or(0) & !FFS_FLAGS
}

/// `io_uring_submit_req(struct io_kiocb *req)`, after the request's fields are read from its
/// SQE and before it is issued (io_uring/io_uring.c `io_submit_sqe`, 6.18). Two kinds matter:
/// - writes to a fixed file (a registered file or a direct descriptor): they take the file
///   from the ring's table, not from the fd table, so `io_uring_file_get` never fires for
///   them; the slot is read here. (A table update linked before the write in the same
///   submission is not applied yet: the dirtying of a buffered write, the interval rescan for
///   an O_DIRECT one, are what see that.)
/// - path operations, whose paths this hook cannot see; the watcher answers with a rescan.
#[raw_tracepoint(tracepoint = "io_uring_submit_req")]
pub fn io_uring_submit_req(ctx: RawTracePointContext) -> i32 {
    let req: u64 = ctx.arg(0);
    let Some((cfg, pid_tgid)) = active() else { return 0 };
    let opcode: u8 = read(req, cfg.offsets.kiocb_opcode).unwrap_or(0);
    if uring_writes(opcode) {
        let flags: u64 = read(req, cfg.offsets.kiocb_flags).unwrap_or(0);
        if flags & REQ_F_FIXED_FILE == 0 {
            return 0;
        }
        let file = fixed_file(&cfg, req);
        let Some(key) = file_key(&cfg, file) else { return 0 };
        if watched(&key) & WATCH_FILE != 0 {
            inode_event(&cfg, current_task(), pid_tgid, Op::IoUring as u32, 0, opcode as u32, key);
        }
        return 0;
    }
    if !uring_by_path(opcode) || !within_budget(pid_tgid) {
        return 0;
    }
    let task = current_task();
    match EVENTS.reserve::<EventHeader>(0) {
        Some(mut entry) => {
            // SAFETY: sized for an EventHeader; filled here.
            let h = unsafe { &mut *entry.as_mut_ptr() };
            fill_header(h, &cfg, task, pid_tgid, Op::IoUring as u32, EVENT_URING_PATH_OP, opcode as u32);
            entry.submit(0);
        }
        None => lost(),
    }
    0
}
