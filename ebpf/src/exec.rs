//! New containers, the moment their first process starts: `sched_process_exec` (raw, in the
//! exec'ing task's context, once the new image is in place, so a container's entrypoint is
//! already behind its `pivot_root`) sends an exec from any cgroup the watcher has not decided
//! on yet (`CGROUPS`). The watcher decides at once (host, container checked, container not
//! selected) and marks the cgroup, so a cgroup costs one event, not one per exec; until it
//! decides, execs in it keep coming (a container's runtime helper may exec before its root is
//! mounted, and the entrypoint's exec is then the one that counts). In a container checked
//! for drift execution (`CGROUP_EXECS`), every exec is sent: the watcher compares what runs
//! with the image.
//!
//! `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`,
//! include/trace/events/sched.h (6.18); only the current task is read here.

use aya_ebpf::helpers::generated::bpf_get_current_cgroup_id;
use aya_ebpf::macros::raw_tracepoint;
use aya_ebpf::programs::RawTracePointContext;
use kubefim_common::{CGROUP_EXECS, EventHeader, Op};

use crate::emit::{active, fill_header, lost, within_budget};
use crate::kernel::current_task;
use crate::{CGROUPS, EVENTS};

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec(_ctx: RawTracePointContext) -> i32 {
    let Some((cfg, pid_tgid)) = active() else { return 0 };
    // SAFETY: a plain read of a global the loader patched before load.
    if unsafe { core::ptr::read_volatile(&crate::SEND_EXECS) } == 0 {
        return 0;
    }
    // SAFETY: a helper without preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    if let Some(decided) = unsafe { CGROUPS.get(cgroup) }.copied()
        && decided != CGROUP_EXECS
    {
        return 0;
    }
    if !within_budget(pid_tgid) {
        return 0;
    }
    match EVENTS.reserve::<EventHeader>(0) {
        Some(mut entry) => {
            // SAFETY: the reservation is sized for an EventHeader; fill_header writes every field.
            let h = unsafe { &mut *entry.as_mut_ptr() };
            fill_header(h, &cfg, current_task(), pid_tgid, Op::Exec as u32, 0, 0);
            entry.submit(0);
        }
        None => lost(),
    }
    0
}
