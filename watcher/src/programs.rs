//! The kernel side as user space sees it: the embedded eBPF object, loaded with the struct
//! offsets of the running kernel (from its BTF) and the watcher's own pid, its filter maps
//! sized for the baseline, and every program attached to its tracepoint. Tracepoints this
//! kernel does not have are reported, not fatal: what they would have seen is named.

use std::collections::HashSet;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{Program, RawTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use kubefim_common::{Config, InodeKey, Offsets, maps};

use crate::btf::KernelBtf;
use crate::error::{Error, Result};

/// The object built by watcher/build.rs from ../ebpf (empty when the build skipped it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kubefim"));

/// The loaded, attached programs and the maps the watcher uses. Dropping it detaches
/// everything.
pub struct Programs {
    /// Owns the programs and their links.
    _ebpf: Ebpf,
    /// Watched inodes.
    pub watched: BpfHashMap<MapData, InodeKey, u32>,
    /// Monitored names.
    pub names: BpfHashMap<MapData, u64, u8>,
    /// Events.
    pub events: RingBuf<MapData>,
    /// Lost-event counters.
    pub lost: PerCpuArray<MapData, u64>,
    /// Cgroups decided on (their execs are not sent).
    pub cgroups: BpfHashMap<MapData, u64, u8>,
    /// Tracepoints this kernel lacks (their programs are not attached).
    pub missing: Vec<String>,
    /// How many programs are attached.
    pub attached: usize,
    /// How many inodes the watched map can hold.
    pub capacity: u32,
}

/// Reads the offsets the programs need from kernel BTF.
fn offsets(btf: &KernelBtf) -> Result<Offsets> {
    let m = |s: &str, f: &str| btf.member_offset(s, f);
    let path_dentry = m("path", "dentry")?;
    Ok(Offsets {
        task_files: m("task_struct", "files")?,
        task_fs: m("task_struct", "fs")?,
        task_real_parent: m("task_struct", "real_parent")?,
        task_tgid: m("task_struct", "tgid")?,
        task_flags: m("task_struct", "flags")?,
        files_fdt: m("files_struct", "fdt")?,
        fdt_max_fds: m("fdtable", "max_fds")?,
        fdt_fd: m("fdtable", "fd")?,
        file_inode: m("file", "f_inode")?,
        file_dentry: m("file", "f_path")? + path_dentry,
        file_mode: m("file", "f_mode")?,
        inode_ino: m("inode", "i_ino")?,
        inode_sb: m("inode", "i_sb")?,
        sb_dev: m("super_block", "s_dev")?,
        dentry_parent: m("dentry", "d_parent")?,
        dentry_inode: m("dentry", "d_inode")?,
        fs_pwd_dentry: m("fs_struct", "pwd")? + path_dentry,
        fs_root_dentry: m("fs_struct", "root")? + path_dentry,
        task_nsproxy: m("task_struct", "nsproxy")?,
        nsproxy_mnt_ns: m("nsproxy", "mnt_ns")?,
        mnt_ns_inum: m("mnt_namespace", "ns")? + m("ns_common", "inum")?,
        kiocb_file: m("io_kiocb", "file")?,
        kiocb_opcode: m("io_kiocb", "opcode")?,
        kiocb_flags: m("io_kiocb", "flags")?,
        kiocb_ctx: m("io_kiocb", "ctx")?,
        kiocb_cqe_fd: m("io_kiocb", "cqe")? + m("io_cqe", "fd")?,
        regs_syscall_nr: m("pt_regs", "orig_ax")?,
        regs_args: [m("pt_regs", "di")?, m("pt_regs", "si")?, m("pt_regs", "dx")?],
        ..fixed_file_table(btf)
    })
}

/// Where a ring's registered files are (6.13+: `io_ring_ctx.file_table.data`, an
/// `io_rsrc_data` of `io_rsrc_node`s). Older kernels lay the table out otherwise: all zero,
/// and the programs leave fixed files to the dirtying hook and the rescans.
fn fixed_file_table(btf: &KernelBtf) -> Offsets {
    let m = |s: &str, f: &str| btf.member_offset(s, f).ok();
    let table = || {
        let data = m("io_ring_ctx", "file_table")? + m("io_file_table", "data")?;
        Some(Offsets {
            ctx_files_nr: data + m("io_rsrc_data", "nr")?,
            ctx_files_nodes: data + m("io_rsrc_data", "nodes")?,
            rsrc_node_file_ptr: m("io_rsrc_node", "file_ptr")?,
            ..Offsets::default()
        })
    };
    table().unwrap_or_default()
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map { name, message: "missing from the object".into() })?;
    T::try_from(map).map_err(|e| Error::Map { name, message: kubefim_baseline::error::chain(&e) })
}

impl Programs {
    /// Loads the programs for a watcher of `pid`, with room for `capacity` watched inodes
    /// and `names` monitored names, and attaches them. With `execs`, execs in cgroups not yet
    /// decided on are sent (the watcher checks containers).
    pub fn load(pid: u32, capacity: u32, names: u32, ring_bytes: Option<u32>, execs: bool) -> Result<Programs> {
        if OBJECT.is_empty() {
            return Err(Error::NotBuilt);
        }
        let btf = KernelBtf::from_sys_fs()?;
        // I_DIRTY_PAGES was 1 << 2 until the inode state bits were renumbered (6.12).
        // The inode state bits were renumbered in 6.12 (I_DIRTY_SYNC, _DATASYNC, _PAGES were
        // 1 << 0, 1 << 1, 1 << 2 before).
        let dirty_pages = btf.enum_value("I_DIRTY_PAGES").unwrap_or(1 << 2);
        let dirty_inode =
            btf.enum_value("I_DIRTY_SYNC").unwrap_or(1 << 0) | btf.enum_value("I_DIRTY_DATASYNC").unwrap_or(1 << 1);
        let config = Config { self_pid: pid, ready: 1, dirty_pages, dirty_inode, offsets: offsets(&btf)? };
        let send_execs = u32::from(execs);
        let open_syscalls = open_syscalls();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(maps::CONFIG, &config, true)
            .override_global(maps::SEND_EXECS, &send_execs, true)
            .override_global(maps::OPEN_SYSCALLS, &open_syscalls, true)
            .map_max_entries(maps::WATCHED, capacity)
            .map_max_entries(maps::NAMES, names);
        if let Some(bytes) = ring_bytes {
            loader.map_max_entries(maps::EVENTS, bytes);
        }
        let mut ebpf = loader.load(OBJECT).map_err(Error::Load)?;
        let available = available_syscall_tracepoints();
        if available.is_empty() {
            return Err(Error::Tracefs);
        }
        let mut missing = Vec::new();
        let mut attached = 0;
        for (name, program) in ebpf.programs_mut() {
            let started = std::time::Instant::now();
            match program {
                Program::TracePoint(tp) => {
                    if !available.contains(name) {
                        missing.push(format!("syscalls/{name}"));
                        continue;
                    }
                    load_tp(tp, name)?;
                    attached += 1;
                }
                Program::RawTracePoint(tp) => {
                    load_raw(tp, name)?;
                    attached += 1;
                }
                _ => {}
            }
            tracing::debug!(program = name, ms = started.elapsed().as_millis(), "loaded and attached");
        }
        Ok(Programs {
            watched: take(&mut ebpf, maps::WATCHED)?,
            names: take(&mut ebpf, maps::NAMES)?,
            events: take(&mut ebpf, maps::EVENTS)?,
            lost: take(&mut ebpf, maps::LOST)?,
            cgroups: take(&mut ebpf, maps::CGROUPS)?,
            _ebpf: ebpf,
            missing,
            attached,
            capacity,
        })
    }

    /// A descriptor of the ring buffer, to wait on.
    pub fn events_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.events).try_clone_to_owned()
    }

    /// Events dropped by the kernel side since load because the ring buffer was full.
    pub fn lost_total(&self) -> u64 {
        lost_at(&self.lost, kubefim_common::LOST_RING_FULL)
    }

    /// Events dropped by the kernel side since load because their process was over budget.
    pub fn lost_over_budget(&self) -> u64 {
        lost_at(&self.lost, kubefim_common::LOST_OVER_BUDGET)
    }

    /// Watches an inode (`bits`: `WATCH_FILE` / `WATCH_DIR`). False when the map is full.
    pub fn watch(&mut self, key: InodeKey, bits: u32) -> bool {
        let now = self.watched.get(&key, 0).unwrap_or(0);
        now | bits == now || self.watched.insert(key, now | bits, 0).is_ok()
    }

    /// Adds a monitored name's hash. False when the map is full.
    pub fn watch_name(&mut self, name: &[u8]) -> bool {
        self.name_bit(name, kubefim_common::NAME_ENTRY)
    }

    /// Adds the name of a rule root's ancestor (renames, removals and mounts of it are
    /// sent). False when the map is full.
    pub fn watch_ancestor_name(&mut self, name: &[u8]) -> bool {
        self.name_bit(name, kubefim_common::NAME_ANCESTOR)
    }

    fn name_bit(&mut self, name: &[u8], bit: u8) -> bool {
        let hash = kubefim_common::name_hash(name);
        let now = self.names.get(&hash, 0).unwrap_or(0);
        now | bit == now || self.names.insert(hash, now | bit, 0).is_ok()
    }

    /// Marks a cgroup decided on: its execs are no longer sent. False when the map refused.
    pub fn know_cgroup(&mut self, id: u64) -> bool {
        self.cgroups.insert(id, kubefim_common::CGROUP_KNOWN, 0).is_ok()
    }

    /// Marks a cgroup whose every exec is sent (a container checked for drift execution).
    /// False when the map refused.
    pub fn send_cgroup_execs(&mut self, id: u64) -> bool {
        self.cgroups.insert(id, kubefim_common::CGROUP_EXECS, 0).is_ok()
    }

    /// The parts, for their owners in the watcher: the attached programs (kept alive),
    /// the filter maps (`filter`), the ring buffer and lost counter (`reader`), the cgroups
    /// decided on (`containers`).
    pub(crate) fn into_parts(self) -> (Attached, crate::filter::KernelFilter, EventSource, Cgroups) {
        let attached = Attached { _ebpf: self._ebpf, missing: self.missing, attached: self.attached };
        let filter = crate::filter::KernelFilter::new(self.watched, self.names, self.capacity);
        (attached, filter, EventSource { events: self.events, lost: self.lost }, Cgroups(self.cgroups))
    }
}

/// The loaded programs, attached for as long as this lives.
pub(crate) struct Attached {
    _ebpf: Ebpf,
    /// Tracepoints this kernel lacks (their programs are not attached).
    pub missing: Vec<String>,
    /// How many programs are attached.
    pub attached: usize,
}

/// The kernel's map of cgroups decided on: a cgroup marked here sends no more execs.
pub(crate) struct Cgroups(BpfHashMap<MapData, u64, u8>);

impl Cgroups {
    /// Marks `id` decided on. False when the map refused (its execs keep coming: harmless).
    pub fn know(&mut self, id: u64) -> bool {
        self.0.insert(id, kubefim_common::CGROUP_KNOWN, 0).is_ok()
    }

    /// Marks `id` a container checked for drift execution: each of its execs is sent.
    pub fn send_execs(&mut self, id: u64) -> bool {
        self.0.insert(id, kubefim_common::CGROUP_EXECS, 0).is_ok()
    }

    /// Forgets `id` (a container gone), so the map keeps room for the living.
    pub fn forget(&mut self, id: u64) {
        let _ = self.0.remove(&id);
    }
}

/// What the kernel sends: the ring buffer and the per-CPU count of events it had no room for.
pub(crate) struct EventSource {
    /// Events.
    pub events: RingBuf<MapData>,
    lost: PerCpuArray<MapData, u64>,
}

impl EventSource {
    /// Events dropped by the kernel side since load because the ring buffer was full.
    pub fn lost_total(&self) -> u64 {
        lost_at(&self.lost, kubefim_common::LOST_RING_FULL)
    }

    /// Events dropped by the kernel side since load because their process was over budget.
    pub fn lost_over_budget(&self) -> u64 {
        lost_at(&self.lost, kubefim_common::LOST_OVER_BUDGET)
    }
}

/// The sum over CPUs of one counter of the lost map.
fn lost_at(lost: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
    lost.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
}

/// This architecture's numbers of open, openat, creat and openat2 (`u32::MAX` for one it
/// lacks): a thread whose saved syscall number is one of them is inside an open.
fn open_syscalls() -> [u32; 4] {
    let nr = |n: libc::c_long| u32::try_from(n).unwrap_or(u32::MAX);
    #[cfg(target_arch = "x86_64")]
    let (open, creat) = (nr(libc::SYS_open), nr(libc::SYS_creat));
    #[cfg(not(target_arch = "x86_64"))]
    let (open, creat) = (u32::MAX, u32::MAX);
    [open, nr(libc::SYS_openat), creat, nr(libc::SYS_openat2)]
}

fn load_tp(tp: &mut TracePoint, name: &str) -> Result<()> {
    let err = |source| Error::Program { name: name.to_owned(), source };
    tp.load().map_err(err)?;
    tp.attach("syscalls", name).map_err(err)?;
    Ok(())
}

fn load_raw(tp: &mut RawTracePoint, name: &str) -> Result<()> {
    let err = |source| Error::Program { name: name.to_owned(), source };
    tp.load().map_err(err)?;
    tp.attach(name).map_err(err)?;
    Ok(())
}

/// The syscall tracepoints this kernel has (names as `sys_enter_openat`).
fn available_syscall_tracepoints() -> HashSet<String> {
    ["/sys/kernel/tracing/events/syscalls", "/sys/kernel/debug/tracing/events/syscalls"]
        .iter()
        .find_map(|dir| std::fs::read_dir(dir).ok())
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}
