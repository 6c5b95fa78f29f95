//! The kernel <-> user-space ABI of kubefim: the `#[repr(C)]` event, key and configuration
//! types that the eBPF programs (ebpf/) write and the watcher (watcher/) reads, the names of
//! the maps and globals both sides agree on, and the name hash both sides compute. It is
//! `no_std` so the BPF target can use it; the `user` feature adds what only user space needs
//! (`aya::Pod` impls and device-number conversions). Numbers of [`Op`] are never reused.
#![no_std]

/// Longest path prefix a path event carries (bytes, NUL included). Longer paths are sent
/// with [`EVENT_PATH_TRUNCATED`]; the name filter still reads them whole (up to `PATH_MAX`).
pub const PATH_CAP: usize = 256;

/// A file's identity as the kernel sees it: `super_block.s_dev` (the kernel's internal
/// `MAJOR << 20 | MINOR` encoding, not `st_dev`) and `inode.i_ino`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct InodeKey {
    /// `super_block.s_dev`.
    pub dev: u64,
    /// `inode.i_ino`.
    pub ino: u64,
}

/// Value bits of the watched-inode map.
pub const WATCH_FILE: u32 = 1;
/// The inode is a monitored directory: entries created, removed or renamed in it matter.
pub const WATCH_DIR: u32 = 2;
/// The inode is an unmonitored ancestor of a rule root: only a mount made through a
/// descriptor of it (`move_mount`, `mount_setattr` with an empty path) matters; its renames
/// and removals pass the name filter ([`NAME_ANCESTOR`]).
pub const WATCH_ANCESTOR: u32 = 4;

/// Value bits of the `NAMES` map. The name of a monitored entry: a path event whose last or
/// next-to-last component it is may touch a monitored path.
pub const NAME_ENTRY: u8 = 1;
/// The name of an ancestor of a rule root: a rename, unlink, rmdir or mount whose *last*
/// component it is may swap or cover a whole rule root (an op on an entry *in* an ancestor
/// directory cannot, so the next-to-last component does not count for it).
pub const NAME_ANCESTOR: u8 = 2;

/// What the kernel saw. `#[repr(u32)]`; a number, once given, is never reused.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// write, pwrite64, writev, pwritev, pwritev2, copy_file_range, sendfile, splice into it.
    Write = 1,
    /// truncate, ftruncate, or an open with O_TRUNC.
    Truncate = 2,
    /// fallocate.
    Fallocate = 3,
    /// rename, renameat, renameat2.
    Rename = 4,
    /// unlink, unlinkat.
    Unlink = 5,
    /// rmdir, unlinkat with AT_REMOVEDIR.
    Rmdir = 6,
    /// link, linkat.
    Link = 7,
    /// symlink, symlinkat.
    Symlink = 8,
    /// chmod family.
    Chmod = 9,
    /// chown family.
    Chown = 10,
    /// setxattr family.
    Setxattr = 11,
    /// removexattr family.
    Removexattr = 12,
    /// utimensat, futimesat, utimes, utime.
    Utimes = 13,
    /// mmap of a monitored file, shared and writable.
    Mmap = 14,
    /// An io_uring request on a monitored file (`io_uring/io_uring_file_get`), or one that
    /// changes the namespace by path (`io_uring/io_uring_submit_req`, [`EVENT_URING_PATH_OP`]).
    IoUring = 15,
    /// An open for writing of a monitored file (not a change by itself).
    OpenWrite = 16,
    /// A new entry opened with O_CREAT in a monitored directory.
    Create = 17,
    /// The close of a monitored file open for writing: the rehash trigger.
    Close = 18,
    /// mkdir, mkdirat.
    Mkdir = 19,
    /// mknod, mknodat.
    Mknod = 20,
    /// The inode was dirtied (`writeback/writeback_mark_inode_dirty`) with no syscall of
    /// ours in sight: a store through a shared mapping, or io_uring's worker threads.
    Dirty = 21,
    // 22..=31 and 36..=39 are unused: numbers are never reused or renumbered, so a
    // program and a watcher of different builds never read one op as another.
    /// mount(2) (`sys_enter_mount`): the target path, and the source.
    Mount = 32,
    /// move_mount(2): attaches a mount made by fsmount(2) or open_tree(2), or moves one.
    MoveMount = 33,
    /// mount_setattr(2): changes a mount's flags (read-only, id mapping, propagation).
    MountSetattr = 34,
    /// umount2(2) (`sys_enter_umount`).
    Umount = 35,
    /// A Linux AIO write (`io_submit(2)` of an IOCB_CMD_PWRITE / PWRITEV iocb) to a monitored
    /// file: O_DIRECT writes through AIO dirty no page and pass no write syscall.
    Aio = 40,
    /// A change of a monitored file's inode flags (`chattr`: ioctl FS_IOC_SETFLAGS or
    /// FS_IOC_FSSETXATTR, file_setattr(2)), sent once the call succeeded.
    SetFlags = 41,
    /// A process exec'd (`sched_process_exec`) in a cgroup the watcher has not decided on
    /// (the `CGROUPS` map): the first process of a new container, seen the moment it starts;
    /// or in a container checked for drift execution ([`CGROUP_EXECS`]).
    Exec = 42,
}

impl Op {
    /// Whether the op changes what is mounted where.
    pub const fn is_mount(self) -> bool {
        matches!(self, Op::Mount | Op::MoveMount | Op::MountSetattr | Op::Umount)
    }

    /// The op for a number read from the ring buffer.
    pub fn from_u32(n: u32) -> Option<Op> {
        use Op::*;
        Some(match n {
            1 => Write,
            2 => Truncate,
            3 => Fallocate,
            4 => Rename,
            5 => Unlink,
            6 => Rmdir,
            7 => Link,
            8 => Symlink,
            9 => Chmod,
            10 => Chown,
            11 => Setxattr,
            12 => Removexattr,
            13 => Utimes,
            14 => Mmap,
            15 => IoUring,
            16 => OpenWrite,
            17 => Create,
            18 => Close,
            19 => Mkdir,
            20 => Mknod,
            21 => Dirty,
            32 => Mount,
            33 => MoveMount,
            34 => MountSetattr,
            35 => Umount,
            40 => Aio,
            41 => SetFlags,
            42 => Exec,
            _ => return None,
        })
    }

    /// The name used in reports' `ops`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Truncate => "truncate",
            Op::Fallocate => "fallocate",
            Op::Rename => "rename",
            Op::Unlink => "unlink",
            Op::Rmdir => "rmdir",
            Op::Link => "link",
            Op::Symlink => "symlink",
            Op::Chmod => "chmod",
            Op::Chown => "chown",
            Op::Setxattr => "setxattr",
            Op::Removexattr => "removexattr",
            Op::Utimes => "utimes",
            Op::Mmap => "mmap",
            Op::IoUring => "io_uring",
            Op::OpenWrite => "open",
            Op::Create => "create",
            Op::Close => "close",
            Op::Mkdir => "mkdir",
            Op::Mknod => "mknod",
            Op::Dirty => "dirty",
            Op::Mount => "mount",
            Op::MoveMount => "move_mount",
            Op::MountSetattr => "mount_setattr",
            Op::Umount => "umount",
            Op::Aio => "aio",
            Op::SetFlags => "setflags",
            Op::Exec => "exec",
        }
    }
}

/// [`EventHeader::flags`]: `target` holds the inode the op acted on (resolved from an fd).
pub const EVENT_HAS_TARGET: u32 = 1;
/// `parent` holds the directory of `target` (the new entry of a [`Op::Create`]).
pub const EVENT_HAS_PARENT: u32 = 1 << 1;
/// A [`PathEvent`]: `paths` follow the header.
pub const EVENT_HAS_PATHS: u32 = 1 << 2;
/// A path did not fit in [`PATH_CAP`] bytes.
pub const EVENT_PATH_TRUNCATED: u32 = 1 << 3;
/// renameat2 with RENAME_EXCHANGE.
pub const EVENT_EXCHANGE: u32 = 1 << 4;
/// The thread is an io_uring worker (`PF_IO_WORKER`): the dirtying came from io_uring.
pub const EVENT_IO_WORKER: u32 = 1 << 5;

/// An io_uring request that changes the namespace (rename, unlink, mkdir, link, symlink,
/// open, setxattr by path): its paths are not visible here, so the watcher rescans.
pub const EVENT_URING_PATH_OP: u32 = 1 << 6;

/// The fixed part of every event. Inode events are just this; path events are a
/// [`PathEvent`].
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct EventHeader {
    /// An [`Op`] number.
    pub op: u32,
    /// `EVENT_*` bits.
    pub flags: u32,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Parent's process id.
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// The syscall's first argument that is not a path (flags, mode...), truncated to 32 bits.
    pub arg: u32,
    /// cgroup v2 id of the actor (`bpf_get_current_cgroup_id`).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns`.
    pub time_ns: u64,
    /// The inode acted on, with [`EVENT_HAS_TARGET`].
    pub target: InodeKey,
    /// The directory of `target`, with [`EVENT_HAS_PARENT`].
    pub parent: InodeKey,
    /// For each path of a path event: the inode of the directory the path is resolved from:
    /// its dirfd or the cwd for a relative path, the actor's root directory for an absolute
    /// one; zero when unknown.
    pub start: [InodeKey; 2],
    /// The directory fds of the two paths (`AT_FDCWD` = -100 when none).
    pub dirfd: [i32; 2],
    /// `task->comm`.
    pub comm: [u8; 16],
    /// The inode number of the actor's mount namespace (`nsproxy->mnt_ns->ns.inum`), for path
    /// events: with `start` (its root), whether its absolute paths mean what the host's do.
    pub mnt_ns: u32,
    /// Zero.
    pub _reserved: u32,
}

/// A path event: the header and up to two NUL-terminated user paths, as the syscall
/// passed them (relative or absolute, in the actor's mount namespace and root).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PathEvent {
    /// The fixed part.
    pub header: EventHeader,
    /// The paths: source and destination for rename and link, the path otherwise.
    pub paths: [[u8; PATH_CAP]; 2],
}

/// Load-time configuration, a global the watcher sets before loading (`CONFIG`). The
/// offsets are read from the running kernel's BTF: Rust eBPF programs have no CO-RE field
/// relocations, so the watcher does that part.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    /// The watcher's own tgid: its I/O never produces events.
    pub self_pid: u32,
    /// Non-zero once the watcher filled it in (programs stay silent otherwise).
    pub ready: u32,
    /// `I_DIRTY_PAGES` of this kernel (renumbered in 6.12): only page dirtying is a store;
    /// timestamp-only dirtying (a read updating atime) is not.
    pub dirty_pages: u32,
    /// `I_DIRTY_SYNC | I_DIRTY_DATASYNC` of this kernel: `mark_inode_dirty()` passes them
    /// with `I_DIRTY_PAGES` for any metadata change (a chmod, a size update), while a store
    /// dirties pages alone; so only pages without these bits are a store.
    pub dirty_inode: u32,
    /// Offsets, in bytes.
    pub offsets: Offsets,
}

/// Byte offsets of the kernel struct members the programs read.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Offsets {
    /// `task_struct.files`.
    pub task_files: u32,
    /// `task_struct.fs`.
    pub task_fs: u32,
    /// `task_struct.real_parent`.
    pub task_real_parent: u32,
    /// `task_struct.tgid`.
    pub task_tgid: u32,
    /// `task_struct.flags`.
    pub task_flags: u32,
    /// `files_struct.fdt`.
    pub files_fdt: u32,
    /// `fdtable.max_fds`.
    pub fdt_max_fds: u32,
    /// `fdtable.fd`.
    pub fdt_fd: u32,
    /// `file.f_inode`.
    pub file_inode: u32,
    /// `file.f_path` + `path.dentry`.
    pub file_dentry: u32,
    /// `file.f_mode`.
    pub file_mode: u32,
    /// `inode.i_ino`.
    pub inode_ino: u32,
    /// `inode.i_sb`.
    pub inode_sb: u32,
    /// `super_block.s_dev`.
    pub sb_dev: u32,
    /// `dentry.d_parent`.
    pub dentry_parent: u32,
    /// `dentry.d_inode`.
    pub dentry_inode: u32,
    /// `fs_struct.pwd` + `path.dentry`.
    pub fs_pwd_dentry: u32,
    /// `fs_struct.root` + `path.dentry`.
    pub fs_root_dentry: u32,
    /// `task_struct.nsproxy`.
    pub task_nsproxy: u32,
    /// `nsproxy.mnt_ns`.
    pub nsproxy_mnt_ns: u32,
    /// `mnt_namespace.ns` + `ns_common.inum`.
    pub mnt_ns_inum: u32,
    /// `io_kiocb.file`.
    pub kiocb_file: u32,
    /// `io_kiocb.opcode` (a `u8`).
    pub kiocb_opcode: u32,
    /// `io_kiocb.flags` (`io_req_flags_t`, a `u64`; bit 0 is `REQ_F_FIXED_FILE`).
    pub kiocb_flags: u32,
    /// `io_kiocb.ctx`.
    pub kiocb_ctx: u32,
    /// `io_kiocb.cqe` + `io_cqe.fd`: the request's fd, a slot of the ring's file table for
    /// a fixed file.
    pub kiocb_cqe_fd: u32,
    /// `io_ring_ctx.file_table` + `io_file_table.data` + `io_rsrc_data.nr`. The file table
    /// offsets are 0 on kernels without this layout (before 6.13): fixed files go unseen.
    pub ctx_files_nr: u32,
    /// `io_ring_ctx.file_table` + `io_file_table.data` + `io_rsrc_data.nodes`.
    pub ctx_files_nodes: u32,
    /// `io_rsrc_node.file_ptr` (a `struct file *` with flag bits in its low 2 bits).
    pub rsrc_node_file_ptr: u32,
    /// `pt_regs.orig_ax`: the number of the syscall the thread is in (x86-64).
    pub regs_syscall_nr: u32,
    /// `pt_regs.di`, `.si`, `.dx`: a syscall's first three arguments (x86-64), as the entry
    /// saved them; they are still there at the syscall's exit.
    pub regs_args: [u32; 3],
}

/// Map names (the eBPF side names its statics the same).
pub mod maps {
    /// `HashMap<InodeKey, u32>`: watched inodes, `WATCH_*` bits.
    pub const WATCHED: &str = "WATCHED";
    /// `HashMap<u64, u8>`: [`super::name_hash`] of every monitored entry's file name
    /// ([`super::NAME_ENTRY`]) and of every rule root's ancestors ([`super::NAME_ANCESTOR`]).
    pub const NAMES: &str = "NAMES";
    /// `RingBuf` of [`super::EventHeader`] / [`super::PathEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// `PerCpuArray<u64>`: events dropped, at [`super::LOST_RING_FULL`] because the ring
    /// buffer was full, at [`super::LOST_OVER_BUDGET`] because their process was over its
    /// budget.
    pub const LOST: &str = "LOST";
    /// The [`super::Config`] global.
    pub const CONFIG: &str = "CONFIG";
    /// A `u32` global: non-zero when the watcher checks containers, so execs in cgroups it
    /// has not decided on are sent ([`super::Op::Exec`]); otherwise none are. Apart from
    /// [`super::Config`]: every program copies that one to its stack, and its size weighs on
    /// the verifier's work for the largest of them.
    pub const SEND_EXECS: &str = "SEND_EXECS";
    /// A `[u32; 4]` global: this architecture's numbers of open, openat, creat and openat2
    /// (`u32::MAX` for one it lacks). A thread whose saved `orig_ax` is one of them is inside
    /// an open. Apart from [`super::Config`] for the same reason as `SEND_EXECS`.
    pub const OPEN_SYSCALLS: &str = "OPEN_SYSCALLS";
    /// `LruHashMap<u64, u8>`: cgroup ids the watcher has decided on ([`super::CGROUP_KNOWN`]):
    /// an exec in any other cgroup is sent ([`super::Op::Exec`]), once the watcher decided
    /// none are. LRU: an id evicted is only asked about again.
    pub const CGROUPS: &str = "CGROUPS";
}

/// Value of the `CGROUPS` map: the watcher knows what this cgroup is (the host's, a container
/// it checks or one no workload policy selects); its execs are not sent.
pub const CGROUP_KNOWN: u8 = 1;
/// Value of the `CGROUPS` map: a container checked for drift execution (`drift.exec`): every
/// exec in it is sent.
pub const CGROUP_EXECS: u8 = 2;

/// Index in the `LOST` map: events the ring buffer had no room for.
pub const LOST_RING_FULL: u32 = 0;
/// Index in the `LOST` map: events of a process (not root) over its budget of
/// [`BUDGET_PER_SECOND`] events a second (a burst of [`BUDGET_BURST`]): one process cannot
/// fill the ring buffer and the watcher's queue ahead of everyone else's changes.
pub const LOST_OVER_BUDGET: u32 = 1;
/// Events a second a process whose real uid is not 0 may send.
pub const BUDGET_PER_SECOND: u64 = 2000;
/// Events such a process may send at once.
pub const BUDGET_BURST: u64 = 4000;

/// Seed of [`name_hash`] (FNV-1a 64).
pub const NAME_HASH_SEED: u64 = 0xcbf2_9ce4_8422_2325;

/// One byte of [`name_hash`]; the eBPF programs hash path components byte by byte with it.
#[inline(always)]
pub const fn name_hash_step(hash: u64, byte: u8) -> u64 {
    (hash ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3)
}

/// FNV-1a 64 of a file name (one path component).
pub const fn name_hash(name: &[u8]) -> u64 {
    let mut h = NAME_HASH_SEED;
    let mut i = 0;
    while i < name.len() {
        h = name_hash_step(h, name[i]);
        i += 1;
    }
    h
}

const _: () = assert!(core::mem::size_of::<InodeKey>() == 16);
const _: () = assert!(core::mem::size_of::<EventHeader>() == 144);
const _: () = assert!(core::mem::size_of::<PathEvent>() == 144 + 2 * PATH_CAP);
const _: () = assert!(core::mem::size_of::<Config>() == 16 + 33 * 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data with no padding holes that matter and no pointers; any
    // bit pattern is a valid value.
    unsafe impl aya::Pod for super::InodeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}

    impl super::InodeKey {
        /// The key for a `st_dev` / `st_ino` pair as `stat(2)` returns them.
        pub fn from_stat(st_dev: u64, st_ino: u64) -> Self {
            let (major, minor) = (libc::major(st_dev), libc::minor(st_dev));
            super::InodeKey { dev: (u64::from(major) << 20) | u64::from(minor), ino: st_ino }
        }

        /// The `st_dev` this key's kernel device number corresponds to.
        pub fn st_dev(&self) -> u64 {
            let major = u32::try_from(self.dev >> 20).unwrap_or(u32::MAX);
            let minor = u32::try_from(self.dev & 0xf_ffff).unwrap_or(0);
            libc::makedev(major, minor)
        }
    }
}
