//! kubefim's kernel-side programs: static tracepoints (the only attach type the target
//! machines allow, see ../shared/notes/ebpf-on-these-machines.md) that see every way a file
//! can change, keep only what touches a watched inode or a monitored name, and hand it to the
//! watcher through one ring buffer. Hooks are grouped by what they watch: `fd_ops` (changes
//! through a file descriptor), `path_ops` (changes by path), `open` (opens for writing and
//! creates), `dirty` (what no syscall shows: shared mappings and io_uring), `aio` (Linux AIO
//! writes, which pass no write syscall), `mounts` (mounts at, above or below monitored
//! paths), `exec` (the first process of each new cgroup: containers as they start), `confirm`
//! (events held until their syscall succeeded, so failing calls make no work).
//! `kernel` reads kernel structs at offsets the watcher found in the running kernel's BTF;
//! `emit` fills and sends events. No panics: every fallible step returns early.
#![no_std]
#![no_main]

mod aio;
mod confirm;
mod dirty;
mod emit;
mod exec;
mod fd_ops;
mod kernel;
mod mounts;
mod open;
mod path_ops;

use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray, RingBuf};
use kubefim_common::{Config, InodeKey};

/// Watched inodes (`WATCH_*` bits); sized by the watcher at load time. Not preallocated: a
/// preallocated map costs its capacity (twice the baseline) in kernel memory from the start,
/// charged to the agent's memory cgroup (170 MB for a million entries); this one costs what
/// it holds.
#[map(name = "WATCHED")]
static WATCHED: HashMap<InodeKey, u32> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// Name hashes of every monitored entry; sized by the watcher at load time, not preallocated
/// (a tree of a million files often has a few thousand distinct names).
#[map(name = "NAMES")]
static NAMES: HashMap<u64, u8> = HashMap::with_max_entries(1 << 16, BPF_F_NO_PREALLOC);

/// `BPF_F_NO_PREALLOC` (include/uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// Events for the watcher.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Events dropped: because the ring buffer was full, because their process was over its
/// budget (`LOST_*` indexes).
#[map(name = "LOST")]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// What each process (tgid) not run by root has left of its event budget. LRU: a process
/// that exits leaves its entry to be reused; one evicted starts again with a full burst.
#[map(name = "BUDGETS")]
static BUDGETS: LruHashMap<u32, Budget> = LruHashMap::with_max_entries(8192, 0);

/// A token bucket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Budget {
    /// Events it may still send.
    tokens: u64,
    /// When tokens were last added (`bpf_ktime_get_boot_ns`).
    at_ns: u64,
}

/// Cgroups the watcher has decided on (`kubefim_common::CGROUP_KNOWN`): execs elsewhere are
/// sent, to find new containers. LRU: an evicted id is only asked about again.
#[map(name = "CGROUPS")]
static CGROUPS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);

/// Set by the watcher before load (see [`Config`]).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    self_pid: 0,
    ready: 0,
    dirty_pages: 0,
    dirty_inode: 0,
    offsets: kubefim_common::Offsets {
        task_files: 0,
        task_fs: 0,
        task_real_parent: 0,
        task_tgid: 0,
        task_flags: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_inode: 0,
        file_dentry: 0,
        file_mode: 0,
        inode_ino: 0,
        inode_sb: 0,
        sb_dev: 0,
        dentry_parent: 0,
        dentry_inode: 0,
        fs_pwd_dentry: 0,
        fs_root_dentry: 0,
        task_nsproxy: 0,
        nsproxy_mnt_ns: 0,
        mnt_ns_inum: 0,
        kiocb_file: 0,
        kiocb_opcode: 0,
        kiocb_flags: 0,
        kiocb_ctx: 0,
        kiocb_cqe_fd: 0,
        ctx_files_nr: 0,
        ctx_files_nodes: 0,
        rsrc_node_file_ptr: 0,
        regs_syscall_nr: 0,
        regs_args: [0; 3],
    },
};

/// Set by the watcher before load (`kubefim_common::maps::SEND_EXECS`): non-zero when it
/// checks containers.
#[unsafe(no_mangle)]
static SEND_EXECS: u32 = 0;

/// Set by the watcher before load (`kubefim_common::maps::OPEN_SYSCALLS`).
#[unsafe(no_mangle)]
static OPEN_SYSCALLS: [u32; 4] = [u32::MAX; 4];

/// The configuration, read through a volatile load so the compiler cannot fold the
/// zero initialiser into the code.
#[inline(always)]
fn config() -> Config {
    // SAFETY: a plain read of a global the loader patched before load.
    unsafe { core::ptr::read_volatile(&CONFIG) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
