//! The harness of tests/kernel.rs: a [`Kernel`] is one load of the real programs (its own
//! maps and ring buffer) with a temp directory on disk to work in; [`Expect`] is an event
//! written down field by field; [`Actor`] is who the calling thread is, as the kernel must
//! report it. It owns the waiting (poll the ring buffer every millisecond up to a deadline,
//! panic with what was seen) and the proof of absence (a sentinel written by a child process
//! after the operations under test: everything they caused is in the ring buffer before it).
//! It does not decide what an operation should produce: each test says that.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kubefim_common::{
    EVENT_HAS_PARENT, EVENT_HAS_PATHS, EVENT_HAS_TARGET, EVENT_URING_PATH_OP, InodeKey, Op, WATCH_DIR, WATCH_FILE,
};
use kubefim_watcher::kernel::{KernelEvent, Programs};

/// How long an expected event may take to show up. Hooks send from the syscall itself, so
/// an event is in the ring buffer before the call returns; this only absorbs a busy machine.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// `AT_FDCWD`, as the kernel reports a path that has no directory fd.
pub const AT_FDCWD: i32 = libc::AT_FDCWD;

/// A raw system call, so that each test drives exactly the syscall (and tracepoint) it names,
/// whatever the C library would pick. Every argument is passed as a `long`, as the kernel
/// reads it. Panics with the syscall's name and errno when it fails; yields the return value.
macro_rules! sys {
    ($nr:ident $(, $arg:expr)* $(,)?) => {{
        // SAFETY: each call site passes pointers to live, NUL-terminated or correctly sized
        // buffers owned by the test for the length of the call.
        let ret = unsafe { libc::syscall(libc::$nr $(, $arg as libc::c_long)*) };
        assert!(ret >= 0, "{}: {}", stringify!($nr), std::io::Error::last_os_error());
        ret
    }};
}

/// Skips a root-only test outside CI (CI runs as root and must never skip).
fn root_or_skip() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "kernel tests need root and CI runs as root");
    eprintln!("skipped: loading eBPF programs needs root");
    false
}

/// A NUL-terminated copy of a path, for a system call.
pub fn c(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("a test path has no NUL byte")
}

/// The kernel's key of a path's inode (the path itself, not a symlink's target).
pub fn key_of(path: &Path) -> InodeKey {
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    InodeKey::from_stat(meta.dev(), meta.ino())
}

/// `CLOCK_BOOTTIME` in nanoseconds, the clock of `EventHeader::time_ns`.
fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_BOOTTIME): {}", std::io::Error::last_os_error());
    u64::try_from(ts.tv_sec).expect("boot time is positive") * 1_000_000_000
        + u64::try_from(ts.tv_nsec).expect("nanoseconds are positive")
}

/// Who did it, as the event header says: process, thread, parent, real ids, `comm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
}

impl Actor {
    /// The calling thread (its `comm` is the test harness's thread name, cut to 15 bytes by
    /// the kernel: read back from procfs rather than guessed).
    pub fn current() -> Actor {
        let comm = std::fs::read_to_string("/proc/thread-self/comm").expect("read /proc/thread-self/comm");
        Actor {
            pid: std::process::id(),
            // SAFETY: gettid has no preconditions.
            tid: unsafe { libc::gettid() }.unsigned_abs(),
            ppid: rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get().unsigned_abs()),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            comm: comm.trim_end_matches('\n').to_owned(),
        }
    }

    /// The actor an event names.
    pub fn of(ev: &KernelEvent) -> Actor {
        let h = &ev.header;
        Actor { pid: h.pid, tid: h.tid, ppid: h.ppid, uid: h.uid, gid: h.gid, comm: ev.comm() }
    }
}

/// Path bytes that print as a string.
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.escape_ascii())
    }
}

/// Every field of an event but the actor and the clocks, as the test expects it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub op: Op,
    pub flags: u32,
    /// `None` where the value is the kernel's own (the `I_DIRTY_*` bits of a dirtying).
    pub arg: Option<u32>,
    pub target: InodeKey,
    pub parent: InodeKey,
    pub start: [InodeKey; 2],
    pub dirfd: [i32; 2],
    pub paths: Vec<Bytes>,
    /// The actor's mount namespace, sent with path events only.
    pub mnt_ns: u32,
}

/// The key of a path as the kernel side names inodes.
fn key_of_path(path: &str) -> InodeKey {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    InodeKey::from_stat(m.dev(), m.ino())
}

/// This process's mount namespace, as `nsproxy->mnt_ns->ns.inum`.
fn own_mnt_ns() -> u32 {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata("/proc/self/ns/mnt").expect("stat /proc/self/ns/mnt").ino();
    u32::try_from(ino).expect("namespace inode numbers fit in 32 bits")
}

impl Expect {
    /// An event about an inode the kernel resolved (from an fd, an open, a dirtying).
    pub fn inode(op: Op, target: InodeKey) -> Expect {
        Expect {
            op,
            flags: EVENT_HAS_TARGET,
            arg: Some(0),
            target,
            parent: InodeKey::default(),
            start: [InodeKey::default(); 2],
            dirfd: [AT_FDCWD; 2],
            paths: Vec::new(),
            mnt_ns: 0,
        }
    }

    /// A path event with one path (the second slot empty), as the syscall passed it.
    pub fn path(op: Op, path: impl AsRef<[u8]>) -> Expect {
        Expect::paths(op, path, b"")
    }

    /// A path event with two paths (rename, link).
    /// An absolute path starts at the actor's root directory, which the event names.
    pub fn paths(op: Op, first: impl AsRef<[u8]>, second: impl AsRef<[u8]>) -> Expect {
        let paths = [first.as_ref().to_vec(), second.as_ref().to_vec()];
        let root = |p: &[u8]| if p.first() == Some(&b'/') { key_of_path("/") } else { InodeKey::default() };
        Expect {
            flags: EVENT_HAS_PATHS,
            target: InodeKey::default(),
            start: [root(&paths[0]), root(&paths[1])],
            mnt_ns: own_mnt_ns(),
            paths: paths.into_iter().map(Bytes).collect(),
            ..Expect::inode(op, InodeKey::default())
        }
    }

    /// An io_uring request that acts by path (`opcode`: `IORING_OP_*`): no target, no paths.
    pub fn uring_path_op(opcode: u8) -> Expect {
        Expect {
            flags: EVENT_URING_PATH_OP,
            target: InodeKey::default(),
            ..Expect::inode(Op::IoUring, InodeKey::default()).arg(u32::from(opcode))
        }
    }

    pub fn arg(mut self, arg: u32) -> Expect {
        self.arg = Some(arg);
        self
    }

    /// The argument is the kernel's and not checked.
    pub fn any_arg(mut self) -> Expect {
        self.arg = None;
        self
    }

    /// More `EVENT_*` bits.
    pub fn with_flags(mut self, flags: u32) -> Expect {
        self.flags |= flags;
        self
    }

    /// The directory of the target (a create).
    pub fn parent(mut self, parent: InodeKey) -> Expect {
        self.flags |= EVENT_HAS_PARENT;
        self.parent = parent;
        self
    }

    /// Path `i` is relative to `dirfd`, whose inode is `start`.
    pub fn start(mut self, i: usize, dirfd: i32, start: InodeKey) -> Expect {
        self.dirfd[i] = dirfd;
        self.start[i] = start;
        self
    }

    /// What an event says, in the same shape (`arg` left out where the expectation leaves it).
    fn observed(&self, ev: &KernelEvent) -> Expect {
        let h = &ev.header;
        Expect {
            op: ev.op,
            flags: h.flags,
            arg: self.arg.map(|_| h.arg),
            target: h.target,
            parent: h.parent,
            start: h.start,
            dirfd: h.dirfd,
            paths: ev.paths.iter().map(|p| Bytes(p.clone())).collect(),
            mnt_ns: h.mnt_ns,
        }
    }

    /// Whether `ev` is the event this expectation is about: same op, and same target, first
    /// path or io_uring opcode. Every other field is then compared, not searched for.
    pub fn selects(&self, ev: &KernelEvent) -> bool {
        ev.op == self.op
            && if self.flags & EVENT_HAS_TARGET != 0 {
                ev.header.target == self.target
            } else if self.flags & EVENT_HAS_PATHS != 0 {
                ev.paths.first().map(|p| p.as_slice()) == self.paths.first().map(|p| p.0.as_slice())
            } else {
                ev.header.flags & EVENT_URING_PATH_OP != 0 && Some(ev.header.arg) == self.arg
            }
    }
}

/// One line about an event, for failure messages.
pub fn summary(ev: &KernelEvent) -> String {
    let h = &ev.header;
    let paths: Vec<_> = ev.paths.iter().map(|p| Bytes(p.clone())).collect();
    format!(
        "{} pid {} tid {} comm {:?} flags {:#x} arg {:#x} target {:?} parent {:?} start {:?} dirfd {:?} paths {paths:?}",
        ev.op.name(),
        h.pid,
        h.tid,
        ev.comm(),
        h.flags,
        h.arg,
        h.target,
        h.parent,
        h.start,
        h.dirfd,
    )
}

/// One load of the programs, and a directory on disk to work in.
pub struct Kernel {
    programs: Programs,
    dir: tempfile::TempDir,
    /// The thread that loaded (the test's): expected events come from it.
    pub me: Actor,
    /// `CLOCK_BOOTTIME` at load: no event of the test is older.
    loaded_ns: u64,
    /// A watched file a child process writes to close a window in [`Kernel::assert_no_event`].
    sentinel: PathBuf,
    sentinel_key: InodeKey,
}

impl Kernel {
    /// Loads the programs for a watcher that is nobody (`self_pid` 0: no user process has
    /// tgid 0), so this process's own operations are seen. `None` when not root (outside CI).
    pub fn load() -> Option<Kernel> {
        Kernel::load_ignoring(0)
    }

    /// Loads the programs for a watcher whose tgid is `self_pid`.
    pub fn load_ignoring(self_pid: u32) -> Option<Kernel> {
        Kernel::load_with(self_pid, false)
    }

    /// Loads the programs for a watcher that checks containers: execs in cgroups not marked
    /// known are sent.
    #[allow(dead_code, reason = "used by the kernel tests only")]
    pub fn load_sending_execs() -> Option<Kernel> {
        Kernel::load_with(0, true)
    }

    fn load_with(self_pid: u32, execs: bool) -> Option<Kernel> {
        if !root_or_skip() {
            return None;
        }
        // Under cargo's target dir, on disk: tmpfs does not dirty inodes the way
        // writeback_mark_inode_dirty reports.
        let dir = tempfile::Builder::new()
            .prefix("kernel-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .expect("create a test dir under CARGO_TARGET_TMPDIR");
        let loaded_ns = boot_ns();
        let programs = Programs::load(self_pid, 1024, 1024, Some(1 << 20), execs)
            .unwrap_or_else(|e| panic!("loading the eBPF programs: {e:?}"));
        assert!(programs.missing.is_empty(), "tracepoints missing on this kernel: {:?}", programs.missing);
        let sentinel = dir.path().join("sentinel");
        std::fs::write(&sentinel, b"").expect("create the sentinel");
        let mut kernel =
            Kernel { programs, dir, me: Actor::current(), loaded_ns, sentinel_key: key_of(&sentinel), sentinel };
        kernel.watch(&kernel.sentinel.clone());
        Some(kernel)
    }

    /// The test's directory (on disk, removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates `name` in the test dir with `content`, flushed to disk (so its pages are clean
    /// and the next store dirties them again).
    pub fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::write(&path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .unwrap_or_else(|e| panic!("sync {}: {e}", path.display()));
        path
    }

    /// Creates directory `name` in the test dir.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let path = self.dir().join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        path
    }

    /// Watches a file (`WATCH_FILE`) or directory (`WATCH_DIR`) by inode; returns its key.
    pub fn watch(&mut self, path: &Path) -> InodeKey {
        let key = key_of(path);
        let bits = if path.is_dir() { WATCH_DIR } else { WATCH_FILE };
        assert!(self.programs.watch(key, bits), "watch {}: the map is full", path.display());
        key
    }

    /// Marks cgroup `id` decided on: its execs are no longer sent.
    #[allow(dead_code, reason = "used by the kernel tests only")]
    pub fn know_cgroup(&mut self, id: u64) {
        assert!(self.programs.know_cgroup(id), "mark cgroup {id} known: the map refused");
    }

    /// Marks cgroup `id` as one whose every exec is sent (drift execution).
    #[allow(dead_code, reason = "used by the kernel tests only")]
    pub fn send_cgroup_execs(&mut self, id: u64) {
        assert!(self.programs.send_cgroup_execs(id), "mark cgroup {id}: the map refused");
    }

    /// Makes `name` a monitored file name: paths whose last or next-to-last component it is
    /// are sent.
    pub fn watch_name(&mut self, name: &str) {
        assert!(self.programs.watch_name(name.as_bytes()), "watch name {name}: the map is full");
    }

    /// Makes `name` the name of a rule root's ancestor: renames, removals and mounts whose
    /// last component it is are sent.
    pub fn watch_ancestor_name(&mut self, name: &str) {
        assert!(self.programs.watch_ancestor_name(name.as_bytes()), "watch ancestor name {name}: the map is full");
    }

    /// Reads the ring buffer until `pred` holds, every millisecond up to `timeout`.
    fn poll(&mut self, timeout: Duration, mut pred: impl FnMut(&KernelEvent) -> bool) -> Result<KernelEvent, String> {
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            while let Some(record) = self.programs.events.next() {
                match KernelEvent::decode(&record) {
                    Some(ev) if pred(&ev) => return Ok(ev),
                    Some(ev) => seen.push(summary(&ev)),
                    None => seen.push(format!("undecodable record of {} bytes", record.len())),
                }
            }
            if started.elapsed() > timeout {
                let skipped = seen.len().saturating_sub(40);
                return Err(format!(
                    "after {timeout:?}, {} other events (lost: {}){}:\n  {}",
                    seen.len(),
                    self.programs.lost_total(),
                    if skipped > 0 { ", the last 40" } else { "" },
                    seen[skipped..].join("\n  "),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The first event for which `pred` holds; panics with what was seen if none comes
    /// within `timeout`. Events before it are consumed.
    pub fn next_event(&mut self, timeout: Duration, pred: impl FnMut(&KernelEvent) -> bool) -> KernelEvent {
        self.poll(timeout, pred).unwrap_or_else(|seen| panic!("no matching event; {seen}"))
    }

    /// Waits for the event `want` describes, sent from this test's thread, and asserts every
    /// field of it: the op's own, the actor, the time.
    pub fn expect(&mut self, what: &str, want: Expect) -> KernelEvent {
        let me = self.me.clone();
        let ev = self
            .poll(DEADLINE, |ev| ev.header.tid == me.tid && want.selects(ev))
            .unwrap_or_else(|seen| panic!("{what}: no {want:?} from tid {}; {seen}", me.tid));
        self.check(what, &ev, &want, &me);
        ev
    }

    /// Asserts every field of `ev` against `want` and `actor`.
    pub fn check(&self, what: &str, ev: &KernelEvent, want: &Expect, actor: &Actor) {
        assert_eq!(&want.observed(ev), want, "{what}: the event differs (left: sent, right: expected)");
        assert_eq!(&Actor::of(ev), actor, "{what}: the actor differs (left: sent, right: expected)");
        if want.arg.is_none() {
            assert_ne!(ev.header.arg, 0, "{what}: no argument");
        }
        let now = boot_ns();
        assert!(
            (self.loaded_ns..=now).contains(&ev.header.time_ns),
            "{what}: time {} is not between the load ({}) and now ({now})",
            ev.header.time_ns,
            self.loaded_ns,
        );
        assert_ne!(ev.header.cgroup_id, 0, "{what}: no cgroup id");
    }

    /// Asserts that no event for which `pred` holds was sent by the operations done so far.
    /// A child process then writes the watched sentinel: the operations under test finished
    /// before it started, so whatever they sent is in the ring buffer before its event, and
    /// the window is closed without guessing a delay. Events up to the sentinel's are consumed.
    pub fn assert_no_event(&mut self, what: &str, pred: impl FnMut(&KernelEvent) -> bool) {
        let unexpected = self.events_until_sentinel(what, pred);
        assert!(unexpected.is_empty(), "{what}: unexpected events:\n  {}", unexpected.join("\n  "));
        assert_eq!(self.programs.lost_total(), 0, "{what}: events were lost, so absence proves nothing");
    }

    /// The events for which `pred` holds among those sent by the operations done so far
    /// (summed up), closed by the sentinel as in [`Kernel::assert_no_event`].
    pub fn events_until_sentinel(&mut self, what: &str, mut pred: impl FnMut(&KernelEvent) -> bool) -> Vec<String> {
        let mut child = Command::new("sh")
            .args(["-c", "printf x >> \"$1\"", "sh"])
            .arg(&self.sentinel)
            .spawn()
            .expect("spawn sh to write the sentinel");
        let child_pid = child.id();
        let status = child.wait().expect("wait for sh");
        assert!(status.success(), "sh writing the sentinel: {status}");
        let sentinel = self.sentinel_key;
        let mut found = Vec::new();
        self.poll(DEADLINE, |ev| {
            if ev.header.pid == child_pid && ev.target() == Some(sentinel) {
                return true;
            }
            if pred(ev) {
                found.push(summary(ev));
            }
            false
        })
        .unwrap_or_else(|seen| panic!("{what}: the sentinel's event never came; {seen}"));
        found
    }

    /// Events the programs dropped since load: (ring buffer full, over a process's budget).
    pub fn lost(&self) -> (u64, u64) {
        (self.programs.lost_total(), self.programs.lost_over_budget())
    }

    /// Whether an event came from this test's thread.
    pub fn mine(&self) -> impl Fn(&KernelEvent) -> bool + 'static {
        let tid = self.me.tid;
        move |ev| ev.header.tid == tid
    }
}
