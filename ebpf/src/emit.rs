//! Filling and sending events: the header every event carries (who, when, which cgroup),
//! the in-kernel filters (watched inode, watched directory, monitored name), each process's
//! event budget, and the count of events lost to a full ring buffer or an exhausted budget,
//! which the watcher turns into a `lost` line and a rescan.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_loop};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_user_str_bytes,
};
use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;
use kubefim_common::{
    BUDGET_BURST, BUDGET_PER_SECOND, Config, EventHeader, InodeKey, LOST_OVER_BUDGET, LOST_RING_FULL, NAME_ANCESTOR,
    NAME_ENTRY, NAME_HASH_SEED, PATH_CAP, name_hash_step,
};

use crate::kernel::{PF_IO_WORKER, read};
use crate::{BUDGETS, Budget, EVENTS, LOST, NAMES, WATCHED, config};

/// The configuration, or `None` when the watcher has not filled it in or this is the
/// watcher's own I/O (which must never feed back into events).
#[inline(always)]
pub fn active() -> Option<(Config, u64)> {
    let cfg = config();
    if cfg.ready == 0 {
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == cfg.self_pid {
        return None;
    }
    Some((cfg, pid_tgid))
}

/// The `WATCH_*` bits of an inode, 0 when not watched.
#[inline(always)]
pub fn watched(key: &InodeKey) -> u32 {
    // SAFETY: the value is copied out at once; no reference is kept.
    unsafe { WATCHED.get(key).copied().unwrap_or(0) }
}

/// Marks a new inode watched (a file created in a monitored directory), so its writes and
/// close are seen before the watcher has caught up.
#[inline(always)]
pub fn watch(key: &InodeKey, bits: u32) {
    let _ = WATCHED.insert(key, bits, 0);
}

/// The `NAME_*` bits of a name hash, 0 when unknown.
#[inline(always)]
fn name_bits(hash: u64) -> u8 {
    // SAFETY: as in `watched`.
    unsafe { NAMES.get(hash).copied().unwrap_or(0) }
}

/// The state of [`path_names_known`]'s walk over a path, one byte per `bpf_loop` step.
#[repr(C)]
struct NameWalk {
    /// The bytes being walked: the event's path slot, then the scratch chunk.
    path: *const u8,
    /// Hash of the component being read (the seed while it is empty).
    cur: u64,
    /// Hash of the last complete component, 0 if none.
    last: u64,
    /// Hash of the one before it, 0 if none.
    parent: u64,
    /// The user address of the path (for the part past the slot).
    user: u64,
    /// 1: the walk reached the path's NUL; [`UNREADABLE`]: a chunk could not be read.
    ended: u64,
}

/// The hash seed and a zero, in writable data: loaded from here, the verifier knows nothing
/// of their values. A walk started from constants has its hashes tracked bit by bit through
/// every xor and multiply, so each turn of a `bpf_loop` enters its callback in a state the
/// verifier has not seen and checks it again; from unknown values the first turn's state
/// covers every later one. Never written.
#[unsafe(no_mangle)]
static mut WALK_START: [u64; 2] = [NAME_HASH_SEED, 0];

impl NameWalk {
    /// A walk over `path` (the slot) or, for a long path, `user`, from the seed.
    #[inline(always)]
    fn start(path: *const u8, user: u64) -> NameWalk {
        // SAFETY: plain reads of a global nothing writes.
        let (seed, zero) = unsafe {
            let start = &raw const WALK_START;
            (core::ptr::read_volatile(&(*start)[0]), core::ptr::read_volatile(&(*start)[1]))
        };
        NameWalk { path, cur: seed, last: zero, parent: zero, user, ended: zero }
    }
}

/// [`NameWalk::ended`] when a chunk of the path could not be read here (a page the kernel
/// will fault in for the syscall, but a probe cannot): the path is kept, unfiltered.
const UNREADABLE: u64 = 2;

/// Bytes of a path read per chunk past the event's slot (a chunk's last byte is its NUL).
const CHUNK: u64 = PATH_CAP as u64 - 1;
/// Chunks read for a path longer than its slot: they cover `PATH_MAX` (4096) bytes.
const CHUNKS: u64 = 17;

/// A path longer than its slot, in chunks: the kernel refuses paths of `PATH_MAX` or more,
/// so a path whose end is never reached cannot name anything and needs no event.
#[map(name = "PATH_SCRATCH")]
static PATH_SCRATCH: PerCpuArray<[u8; PATH_CAP]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn walk_byte(walk: &mut NameWalk, c: u8) {
    if c == b'/' {
        if walk.cur != NAME_HASH_SEED {
            walk.parent = walk.last;
            walk.last = walk.cur;
        }
        walk.cur = NAME_HASH_SEED;
    } else {
        walk.cur = name_hash_step(walk.cur, c);
    }
}

/// One byte of the walk. `bpf_loop` has the verifier check this once, not once per byte
/// (an unrolled 256-byte walk cost ~0.4 s of verification per program).
#[inline(never)]
extern "C" fn name_walk_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the NameWalk on path_names_known's stack, alive for the whole loop.
    let walk = unsafe { &mut *(ctx as *mut NameWalk) };
    if index >= PATH_CAP as u64 {
        return 1;
    }
    // SAFETY: index < PATH_CAP and path points at a PATH_CAP-byte slot.
    let c = unsafe { *walk.path.add(index as usize) };
    if c == 0 {
        walk.ended = 1;
        return 1;
    }
    walk_byte(walk, c);
    0
}

/// One byte of a path longer than its slot, read whole from user memory: at the start of
/// each chunk, the chunk is read into the per-CPU scratch (syscall tracepoint programs run
/// with preemption off, so no other program on this CPU uses it meanwhile). One flat loop
/// over every byte (not a loop of chunks each looping over its bytes), called once per
/// program after the short walks: the verifier checks a `bpf_loop` callback as a loop of its
/// own for every state it is called in, and a long walk inside the per-path loop (nested,
/// after the slot's walk) made the two-path programs exceed its million instructions on
/// 6.18.44. The chunk is the index's quotient, not a count kept in the walk: the verifier
/// would follow a count's every value as a state of its own.
#[inline(never)]
extern "C" fn long_walk_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the NameWalk on long_path_names_known's stack, alive for the whole loop.
    let walk = unsafe { &mut *(ctx as *mut NameWalk) };
    let Some(buf) = PATH_SCRATCH.get_ptr_mut(0) else { return 1 };
    // SAFETY: the per-CPU slot, used by this program alone while it runs.
    let buf = unsafe { &mut *buf };
    let at = index % CHUNK;
    if at == 0 {
        let src = walk.user + index;
        // SAFETY: the helper bounds the copy by the buffer and NUL-terminates it.
        if unsafe { bpf_probe_read_user_str_bytes(src as *const u8, buf) }.is_err() {
            walk.ended = UNREADABLE;
            return 1;
        }
    }
    // The verifier draws no bound from `%`, and the compiler drops a check it knows holds:
    // read back through a volatile load, the offset is checked where the verifier sees it.
    // SAFETY: a read of a local.
    let at = unsafe { core::ptr::read_volatile(&at) };
    let Some(&c) = buf.get(at as usize) else { return 1 };
    if c == 0 {
        walk.ended = 1;
        return 1;
    }
    walk_byte(walk, c);
    0
}

/// Whether the last or next-to-last component of the path in an event's slot
/// (NUL-terminated, whole) is a monitored name; with `ancestors`, also whether the last one is
/// the name of a rule root's ancestor (a rename, removal or mount of it can swap or cover the
/// root). An empty component hashes to the seed (a non-empty name never does in practice).
#[inline(always)]
pub fn path_names_known(path: &[u8; PATH_CAP], ancestors: bool) -> bool {
    let mut walk = NameWalk::start(path.as_ptr(), 0);
    // SAFETY: the callback and its context follow bpf_loop's contract.
    unsafe {
        bpf_loop(
            CHUNK as u32,
            name_walk_step as *mut core::ffi::c_void,
            &mut walk as *mut NameWalk as *mut core::ffi::c_void,
            0,
        )
    };
    names_known(&mut walk, ancestors)
}

/// [`path_names_known`] for a path that did not fit in its slot, read whole from `user` in
/// chunks, so a long path is filtered as exactly as a short one. A path longer than
/// `PATH_MAX` is one the kernel refuses: not kept; one that cannot be read here is kept.
#[inline(always)]
pub fn long_path_names_known(user: u64, ancestors: bool) -> bool {
    let mut walk = NameWalk::start(core::ptr::null(), user);
    // SAFETY: as above.
    unsafe {
        bpf_loop(
            (CHUNK * CHUNKS) as u32,
            long_walk_step as *mut core::ffi::c_void,
            &mut walk as *mut NameWalk as *mut core::ffi::c_void,
            0,
        )
    };
    match walk.ended {
        0 => false,
        UNREADABLE => true,
        _ => names_known(&mut walk, ancestors),
    }
}

/// The decision on a finished walk.
#[inline(always)]
fn names_known(walk: &mut NameWalk, ancestors: bool) -> bool {
    if walk.cur != NAME_HASH_SEED {
        walk.parent = walk.last;
        walk.last = walk.cur;
    }
    let last = if walk.last != 0 { name_bits(walk.last) } else { 0 };
    let last_wanted = if ancestors { NAME_ENTRY | NAME_ANCESTOR } else { NAME_ENTRY };
    (last & last_wanted != 0) || (walk.parent != 0 && name_bits(walk.parent) & NAME_ENTRY != 0)
}

/// Counts an event the ring buffer had no room for.
#[inline(always)]
pub fn lost() {
    count_lost(LOST_RING_FULL);
}

#[inline(always)]
fn count_lost(index: u32) {
    if let Some(n) = LOST.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption off.
        unsafe { *n += 1 };
    }
}

/// Nanoseconds per token of a budget.
const NS_PER_TOKEN: u64 = 1_000_000_000 / BUDGET_PER_SECOND;

/// Whether the current process may send one more event; counts it lost when not. Root's
/// processes always may (root can stop the agent outright; its storms are reported whole).
/// Called only for events about to be sent: one map update per event, none per syscall.
/// Threads of a process on several CPUs update the bucket without a lock: a lost race only
/// lets a few events more through.
#[inline(always)]
pub fn within_budget(pid_tgid: u64) -> bool {
    if bpf_get_current_uid_gid() as u32 == 0 {
        return true;
    }
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let Some(b) = BUDGETS.get_ptr_mut(tgid) else {
        let _ = BUDGETS.insert(tgid, Budget { tokens: BUDGET_BURST - 1, at_ns: now }, 0);
        return true;
    };
    // SAFETY: a value of this map, valid while the program runs.
    let b = unsafe { &mut *b };
    let earned = now.saturating_sub(b.at_ns) / NS_PER_TOKEN;
    if earned > 0 {
        b.tokens = (b.tokens + earned).min(BUDGET_BURST);
        b.at_ns += earned * NS_PER_TOKEN;
    }
    if b.tokens == 0 {
        count_lost(LOST_OVER_BUDGET);
        return false;
    }
    b.tokens -= 1;
    true
}

/// Fills the parts of the header that describe the actor.
#[inline(always)]
pub fn fill_header(h: &mut EventHeader, cfg: &Config, task: u64, pid_tgid: u64, op: u32, flags: u32, arg: u32) {
    let uid_gid = bpf_get_current_uid_gid();
    h.op = op;
    h.flags = flags;
    h.pid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.uid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    h.arg = arg;
    let parent: u64 = read(task, cfg.offsets.task_real_parent).unwrap_or(0);
    h.ppid = read(parent, cfg.offsets.task_tgid).unwrap_or(0);
    let task_flags: u32 = read(task, cfg.offsets.task_flags).unwrap_or(0);
    if task_flags & PF_IO_WORKER != 0 {
        h.flags |= kubefim_common::EVENT_IO_WORKER;
    }
    // SAFETY: helpers without preconditions.
    unsafe {
        h.cgroup_id = bpf_get_current_cgroup_id();
        h.time_ns = bpf_ktime_get_boot_ns();
    }
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    h.target = InodeKey::default();
    h.parent = InodeKey::default();
    h.start = [InodeKey::default(); 2];
    h.dirfd = [crate::kernel::AT_FDCWD as i32; 2];
    h.mnt_ns = 0;
    h._reserved = 0;
}

/// Sends a header-only event about an inode.
#[inline(always)]
pub fn inode_event(cfg: &Config, task: u64, pid_tgid: u64, op: u32, flags: u32, arg: u32, target: InodeKey) {
    if !within_budget(pid_tgid) {
        return;
    }
    match EVENTS.reserve::<EventHeader>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for an EventHeader; every field is written.
            let h = unsafe { &mut *entry.as_mut_ptr() };
            fill_header(h, cfg, task, pid_tgid, op, flags | kubefim_common::EVENT_HAS_TARGET, arg);
            h.target = target;
            entry.submit(0);
        }
        None => lost(),
    }
}
