//! Filling and sending events: the header every event carries (who, when, which cgroup),
//! the in-kernel filters (watched inode, watched directory, monitored name), and the count of
//! events lost to a full ring buffer, which the watcher turns into a rescan.

use aya_ebpf::helpers::generated::{bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_loop};
use aya_ebpf::helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid};
use kubefim_common::{
    Config, EventHeader, InodeKey, NAME_ANCESTOR, NAME_ENTRY, NAME_HASH_SEED, PATH_CAP, name_hash_step,
};

use crate::kernel::{PF_IO_WORKER, read};
use crate::{EVENTS, LOST, NAMES, WATCHED, config};

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
    path: *const u8,
    /// Hash of the component being read (the seed while it is empty).
    cur: u64,
    /// Hash of the last complete component, 0 if none.
    last: u64,
    /// Hash of the one before it, 0 if none.
    parent: u64,
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
        return 1;
    }
    if c == b'/' {
        if walk.cur != NAME_HASH_SEED {
            walk.parent = walk.last;
            walk.last = walk.cur;
        }
        walk.cur = NAME_HASH_SEED;
    } else {
        walk.cur = name_hash_step(walk.cur, c);
    }
    0
}

/// Whether the last or next-to-last component of a NUL-terminated path is a monitored name;
/// with `ancestors`, also whether the last one is the name of a rule root's ancestor (a
/// rename, removal or mount of it can swap or cover the root). An empty component hashes to
/// the seed (a non-empty name never does in practice).
#[inline(always)]
pub fn path_names_known(path: &[u8; PATH_CAP], ancestors: bool) -> bool {
    let mut walk = NameWalk { path: path.as_ptr(), cur: NAME_HASH_SEED, last: 0, parent: 0 };
    // SAFETY: the callback and its context follow bpf_loop's contract.
    unsafe {
        bpf_loop(
            PATH_CAP as u32,
            name_walk_step as *mut core::ffi::c_void,
            &mut walk as *mut NameWalk as *mut core::ffi::c_void,
            0,
        )
    };
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
    if let Some(n) = LOST.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, written only by this CPU with preemption off.
        unsafe { *n += 1 };
    }
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
