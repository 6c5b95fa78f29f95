//! Linux AIO writes. `io_submit(ctx_id, nr, struct iocb **iocbpp)` hands the kernel a batch
//! of requests that never pass through a write syscall; with O_DIRECT they dirty no page
//! either (so `dirty` does not see them), and a writer that exits without close(2) leaves no
//! close. Each iocb of the batch is read here, and a write to a watched file open for writing
//! is sent as [`Op::Aio`]. The request completes after the event; the watcher's quiet period
//! before the rehash covers a completion in the usual milliseconds.
//!
//! `struct iocb` (include/uapi/linux/aio_abi.h, 6.18, little-endian): `aio_data` u64 at 0,
//! `aio_key`, `aio_rw_flags` u32 at 8 and 12, `aio_lio_opcode` u16 at 16, `aio_reqprio` at 18,
//! `aio_fildes` u32 at 20. `sys_enter_io_submit/format`: `ctx_id` at 16, `nr` at 24,
//! `iocbpp` at 32.

use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::helpers::generated::bpf_loop;
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use kubefim_common::{Op, WATCH_FILE};

use crate::emit::{active, inode_event, watched};
use crate::fd_ops::arg;
use crate::kernel::{FMODE_WRITE, current_task, file_key, file_of_fd, read};

/// `IOCB_CMD_PWRITE`.
const IOCB_CMD_PWRITE: u16 = 1;
/// `IOCB_CMD_PWRITEV`.
const IOCB_CMD_PWRITEV: u16 = 8;
/// iocbs read per io_submit: the kernel caps a context at `aio-max-nr` events (65536 by
/// default), so a batch longer than this cannot be submitted whole.
const MAX_IOCBS: u32 = 1 << 16;

/// The state of the walk over a batch.
#[repr(C)]
struct Batch {
    iocbpp: u64,
    task: u64,
    pid_tgid: u64,
    /// The fd of the previous write seen (a batch of writes to one file is one event).
    last_fd: i64,
}

/// One iocb of the batch.
#[inline(never)]
extern "C" fn iocb_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the Batch on sys_enter_io_submit's stack, alive for the whole loop.
    let batch = unsafe { &mut *(ctx as *mut Batch) };
    // SAFETY: user-memory reads that fail cleanly on a bad pointer (the kernel then fails the
    // submission with EFAULT too).
    let Ok(iocb) = (unsafe { bpf_probe_read_user((batch.iocbpp + index * 8) as *const u64) }) else { return 1 };
    let Ok(opcode) = (unsafe { bpf_probe_read_user((iocb + 16) as *const u16) }) else { return 1 };
    if opcode != IOCB_CMD_PWRITE && opcode != IOCB_CMD_PWRITEV {
        return 0;
    }
    let Ok(fd) = (unsafe { bpf_probe_read_user((iocb + 20) as *const u32) }) else { return 1 };
    let fd = fd as i64;
    if fd == batch.last_fd {
        return 0;
    }
    batch.last_fd = fd;
    let cfg = crate::config();
    let Some(file) = file_of_fd(&cfg, batch.task, fd) else { return 0 };
    // The kernel refuses a write iocb on a descriptor not open for writing (EBADF).
    if read::<u32>(file, cfg.offsets.file_mode).unwrap_or(0) & FMODE_WRITE == 0 {
        return 0;
    }
    let Some(key) = file_key(&cfg, file) else { return 0 };
    if watched(&key) & WATCH_FILE != 0 {
        inode_event(&cfg, batch.task, batch.pid_tgid, Op::Aio as u32, 0, opcode as u32, key);
    }
    0
}

#[tracepoint]
pub fn sys_enter_io_submit(ctx: TracePointContext) -> u32 {
    let Some((_, pid_tgid)) = active() else { return 0 };
    let nr = arg(&ctx, 1);
    if nr <= 0 {
        return 0;
    }
    let nr = if nr > MAX_IOCBS as i64 { MAX_IOCBS } else { nr as u32 };
    let mut batch = Batch { iocbpp: arg(&ctx, 2) as u64, task: current_task(), pid_tgid, last_fd: -1 };
    // SAFETY: the callback and its context follow bpf_loop's contract.
    unsafe { bpf_loop(nr, iocb_step as *mut core::ffi::c_void, &mut batch as *mut Batch as *mut core::ffi::c_void, 0) };
    0
}
