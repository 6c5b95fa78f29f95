//! Reads of kernel structs at the offsets in [`Config`]: fd -> `struct file` -> inode and
//! dentry, the task's cwd, its parent. Each read is one `bpf_probe_read_kernel`; a failed read
//! (a NULL or stale pointer) ends the lookup with `None`.

use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};
use kubefim_common::{Config, InodeKey};

/// `FMODE_WRITE` (include/linux/fs.h, 6.18).
pub const FMODE_WRITE: u32 = 0x2;
/// `FMODE_CREATED` (include/linux/fs.h, 6.18): this open created the file.
pub const FMODE_CREATED: u32 = 0x10_0000;
/// `PF_IO_WORKER` (include/linux/sched.h, 6.18): the task is an io_uring worker thread.
pub const PF_IO_WORKER: u32 = 0x10;
/// `PF_KTHREAD` (include/linux/sched.h, 6.18): a kernel thread (the writeback flusher).
pub const PF_KTHREAD: u32 = 0x0020_0000;

#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel copes with any address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

#[inline(always)]
pub fn current_task() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_get_current_task() }
}

/// `current->files->fdt->fd[fd]`, bounds-checked against `max_fds`.
#[inline(always)]
pub fn file_of_fd(cfg: &Config, task: u64, fd: i64) -> Option<u64> {
    // An `int fd` in a 64-bit slot: only the low half is the fd.
    let fd = fd as i32 as i64;
    if fd < 0 {
        return None;
    }
    let o = &cfg.offsets;
    let files: u64 = read(task, o.task_files)?;
    let fdt: u64 = read(files, o.files_fdt)?;
    let (max, fds) = read_pair(fdt, o.fdt_max_fds, o.fdt_fd)?;
    if fd >= max as u32 as i64 {
        return None;
    }
    let file: u64 = read(fds, (fd as u32).wrapping_mul(8))?;
    (file != 0).then_some(file)
}

/// Words of a struct read at once by [`read_pair`].
const SPAN: usize = 5;

/// Two members of one struct (`a` any width up to 8 bytes, returned in the low bits; `b` an
/// 8-byte member, 8-aligned) in one `bpf_probe_read_kernel` when they lie within [`SPAN`]
/// words of each other, in two otherwise. Every read is a helper call, and on these machines
/// a helper call is most of a filter's cost (the write hook's ten reads were ~600 of its
/// ~700 ns a run on 6.18.44): `fdtable.{max_fds, fd}`, `file.{f_mode, f_inode}` and
/// `inode.{i_sb, i_ino}` are each one read on 6.18. The offsets are the loader's constants
/// (CONFIG is frozen read-only data), so the verifier sees every index as known.
#[inline(always)]
pub fn read_pair(base: u64, a: u32, b: u32) -> Option<(u64, u64)> {
    let start = a.min(b) & !7;
    let (ia, ib) = (((a - start) / 8) as usize, ((b - start) / 8) as usize);
    if ia >= SPAN || ib >= SPAN || !b.is_multiple_of(8) {
        return Some((read::<u64>(base, a)?, read::<u64>(base, b)?));
    }
    let words: [u64; SPAN] = read(base, start)?;
    let wa = *words.get(ia)? >> ((a % 8) * 8);
    Some((wa, *words.get(ib)?))
}

/// (`inode->i_sb->s_dev`, `inode->i_ino`).
#[inline(always)]
pub fn inode_key(cfg: &Config, inode: u64) -> Option<InodeKey> {
    let o = &cfg.offsets;
    let (sb, ino) = read_pair(inode, o.inode_sb, o.inode_ino)?;
    let dev: u32 = read(sb, o.sb_dev)?;
    Some(InodeKey { dev: dev as u64, ino })
}

/// The file's `f_mode` and its inode's key, in three reads (see [`read_pair`]).
#[inline(always)]
pub fn file_mode_key(cfg: &Config, file: u64) -> Option<(u32, InodeKey)> {
    let (mode, inode) = read_pair(file, cfg.offsets.file_mode, cfg.offsets.file_inode)?;
    Some((mode as u32, inode_key(cfg, inode)?))
}

#[inline(always)]
pub fn file_inode(cfg: &Config, file: u64) -> Option<u64> {
    read(file, cfg.offsets.file_inode)
}

#[inline(always)]
pub fn file_key(cfg: &Config, file: u64) -> Option<InodeKey> {
    inode_key(cfg, file_inode(cfg, file)?)
}

/// The inode of the directory holding the file's dentry.
#[inline(always)]
pub fn file_parent_key(cfg: &Config, file: u64) -> Option<InodeKey> {
    let o = &cfg.offsets;
    let dentry: u64 = read(file, o.file_dentry)?;
    let parent: u64 = read(dentry, o.dentry_parent)?;
    let inode: u64 = read(parent, o.dentry_inode)?;
    inode_key(cfg, inode)
}

/// The inode of the directory a relative path starts from: `dirfd`'s, or the cwd's.
#[inline(always)]
pub fn start_dir_key(cfg: &Config, task: u64, dirfd: i64) -> Option<InodeKey> {
    // `int dfd` arrives in a 64-bit slot whose upper half the ABI leaves unspecified.
    let dirfd = dirfd as i32 as i64;
    if dirfd == AT_FDCWD {
        let o = &cfg.offsets;
        let fs: u64 = read(task, o.task_fs)?;
        let dentry: u64 = read(fs, o.fs_pwd_dentry)?;
        let inode: u64 = read(dentry, o.dentry_inode)?;
        inode_key(cfg, inode)
    } else {
        file_key(cfg, file_of_fd(cfg, task, dirfd)?)
    }
}

/// The inode of the task's root directory (`task->fs->root`): what its absolute paths
/// start from.
#[inline(always)]
pub fn root_dir_key(cfg: &Config, task: u64) -> Option<InodeKey> {
    let o = &cfg.offsets;
    let fs: u64 = read(task, o.task_fs)?;
    let dentry: u64 = read(fs, o.fs_root_dentry)?;
    let inode: u64 = read(dentry, o.dentry_inode)?;
    inode_key(cfg, inode)
}

/// The inode number of the task's mount namespace (`task->nsproxy->mnt_ns->ns.inum`), 0 when
/// it cannot be read (an exiting task has no nsproxy).
#[inline(always)]
pub fn mnt_ns(cfg: &Config, task: u64) -> u32 {
    let o = &cfg.offsets;
    let ns = read::<u64>(task, o.task_nsproxy).and_then(|nsproxy| read::<u64>(nsproxy, o.nsproxy_mnt_ns));
    ns.and_then(|ns| read::<u32>(ns, o.mnt_ns_inum)).unwrap_or(0)
}

/// `AT_FDCWD`, as the syscalls receive it.
pub const AT_FDCWD: i64 = -100;

/// The current thread's user registers, as its entry into the kernel saved them
/// (`bpf_task_pt_regs(bpf_get_current_task_btf())`, both helpers of tracing programs since
/// 5.15), 0 when there are none.
#[inline(always)]
fn user_regs() -> u64 {
    // SAFETY: helpers without preconditions; the task pointer is the kernel's own.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
}

/// Argument `n` (0..3) of the syscall the current thread is in, read from its saved user
/// registers: at a `sys_exit_*`, where the record carries only the return value, this is
/// what an entry hook would have had to keep for it.
#[inline(always)]
pub fn syscall_arg(cfg: &Config, n: usize) -> Option<u64> {
    read(user_regs(), *cfg.offsets.regs_args.get(n)?)
}

/// Whether the current thread is inside an open (open, openat, creat, openat2): the number
/// in its saved `orig_ax`, which a page fault sets to -1.
#[inline(always)]
pub fn in_open(cfg: &Config) -> bool {
    let Some(nr) = read::<u64>(user_regs(), cfg.offsets.regs_syscall_nr) else { return false };
    // SAFETY: a plain read of a global the loader patched before load.
    let open = unsafe { core::ptr::read_volatile(&crate::OPEN_SYSCALLS) };
    nr >> 32 == 0 && open.contains(&(nr as u32))
}
