//! The watch loop: trust the baseline, load the programs, fill their maps from the state,
//! rescan once, say ready; then turn ring buffer events into pending paths, rehash them when
//! due, report what differs from the last known state, and keep the state, the journal and
//! the kernel's maps current. Lost events and the rescan interval trigger full rescans.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::hash::Hash;
use kubefim_baseline::journal::Journal;
use kubefim_baseline::policy::{Attribute, AttributeSet, path_bytes};
use kubefim_baseline::record::{FileKind, FileRecord};
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::{Scan, ScanProgress, ScanSink, ScannedEntry, rehash};
use kubefim_baseline::sign::PublicKey;
use kubefim_baseline::verify::{Change, ChangeKind, compare_with};
use kubefim_common::{
    EVENT_EXCHANGE, EVENT_HAS_PARENT, EVENT_IO_WORKER, EVENT_URING_PATH_OP, InodeKey, Op, WATCH_DIR, WATCH_FILE,
};
use serde_json::{Value, json};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::actor::{Actor, Attribution};
use crate::error::{Error, Result};
use crate::event::KernelEvent;
use crate::http::Health;
use crate::lifecycle::{self, SignatureWatch};
use crate::metrics::Metrics;
use crate::output::{ChangeLine, DetectedBy, Format, Printer, state_line};
use crate::pending::{Pending, Queue};
use crate::pods::PodIndex;
use crate::programs::Programs;
use crate::resolve::{Scope, Targets, covered, dir_changes, resolve_path};
use crate::state::{Known, State, key_of};

/// How `kubefim watch` was asked to run.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The signed baseline.
    pub db: PathBuf,
    /// Its public key.
    pub pubkey: PathBuf,
    /// Output format.
    pub format: Format,
    /// Full rescan interval (the backstop).
    pub rescan_interval: Duration,
    /// Touched once ready.
    pub ready_file: Option<PathBuf>,
    /// The journal (default: beside the database, `<db>.journal`).
    pub journal: Option<PathBuf>,
    /// Ring buffer size in bytes (a power of two, at least a page); default 8 MiB. Small
    /// sizes exist to test that overflow turns into a rescan.
    pub ring_buffer_bytes: Option<u32>,
    /// Where the policy's paths are on disk (the host's root, in a pod).
    pub host: HostRoot,
    /// Serve /metrics, /healthz and /readyz here.
    pub listen: Option<SocketAddr>,
    /// Name pods through the Kubernetes API (watching only this node's pods).
    pub kubernetes: bool,
    /// This node's name: the pods watched, the signing request, the signature file.
    pub node_name: String,
    /// With no baseline at all: scan with this policy and wait for a signature.
    pub init_policy: Option<PathBuf>,
    /// Where operators' signatures arrive, one file per node name.
    pub signatures: Option<PathBuf>,
    /// Compare everything with the signed baseline this often (a `verify` line and metrics).
    pub verify_interval: Option<Duration>,
}

/// Why a watch ended.
enum Exit {
    /// SIGTERM or SIGINT.
    Signal,
    /// A new signed baseline was installed: start again with it.
    NewBaseline,
}

/// How often the kernel's lost-event counter is read.
const LOST_POLL: Duration = Duration::from_millis(200);
/// How long after an io_uring path operation the rescan starts (time for it to complete).
const URING_RESCAN_DELAY: Duration = Duration::from_millis(300);
/// How often the journal is made durable while changes come in.
const JOURNAL_FLUSH: Duration = Duration::from_secs(1);

/// Runs the watcher until SIGINT or SIGTERM.
pub fn run(opts: WatchOptions) -> Result<()> {
    let key = PublicKey::load(&opts.pubkey)?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(HEALTH_STALE_AFTER));
    health.set_not_ready("starting: loading the baseline");
    // The endpoint and the pod watch run on a thread of their own: the watch loop blocks
    // for whole rescans, and probes and the API's watch must not wait for those.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kubefim-background")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    if let Some(addr) = opts.listen {
        let _in = background.enter();
        let (bound, _task) = crate::http::serve(addr, metrics.clone(), health.clone())
            .map_err(|e| Error::io(format!("--listen {addr}"), std::io::Error::other(e)))?;
        eprintln!("serving /metrics, /healthz and /readyz on http://{bound}");
    }
    let pods = opts.kubernetes.then(|| start_pods(&background, &opts)).flatten();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    runtime.block_on(async {
        let mut signatures = SignatureWatch::default();
        loop {
            let mut printer = Printer::new(opts.format);
            let trusted = lifecycle::trusted(&opts, &key, &mut signatures, &mut printer, &health, &metrics).await?;
            let Some(mut baseline) = trusted else { return Ok(()) };
            let journal_path = opts.journal.clone().unwrap_or_else(|| {
                let mut p = opts.db.clone().into_os_string();
                p.push(".journal");
                PathBuf::from(p)
            });
            let id = format!("{}:{}", baseline.manifest.created_unix_ns, baseline.manifest.host);
            let journal = Journal::open(&journal_path, &id)?;
            let created = Duration::from_nanos(u64::try_from(baseline.manifest.created_unix_ns).unwrap_or(0));
            metrics.set_baseline(baseline.records.len() as u64, created.as_secs_f64(), true);
            let state = State::load(&mut baseline, &journal)?;
            let services = Services {
                key: key.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
                pods: pods.clone(),
                signatures: std::mem::take(&mut signatures),
            };
            let mut watcher = Watcher::start(opts.clone(), baseline, journal, journal_path, state, services)?;
            let exit = watcher.run().await?;
            signatures = std::mem::take(&mut watcher.signatures);
            match exit {
                Exit::Signal => return Ok(()),
                Exit::NewBaseline => {
                    health.set_not_ready("loading the newly signed baseline");
                    drop(watcher);
                    release_freed_memory();
                }
            }
        }
    })
}

/// Starts the index of this node's pods; without an API server (not in a cluster), says so
/// and goes on without pod names.
fn start_pods(background: &tokio::runtime::Runtime, opts: &WatchOptions) -> Option<PodIndex> {
    match background.block_on(PodIndex::start(&opts.node_name)) {
        Ok(index) => Some(index),
        Err(e) => {
            let line = state_line(
                "degraded",
                json!({"reason": "no Kubernetes API: changes are attributed to containers, not pods", "error": e.to_string()}),
            );
            let _ = Printer::new(opts.format).print(&line);
            None
        }
    }
}

/// What outlives one baseline: the public key, the endpoint's metrics and health, the pod
/// index and the signatures seen.
struct Services {
    key: PublicKey,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    pods: Option<PodIndex>,
    signatures: SignatureWatch,
}

/// How long the loop may go without a heartbeat before /healthz fails. Rescans beat from
/// their sink, so only a loop that is truly stuck goes this long.
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(120);

struct Watcher {
    opts: WatchOptions,
    key: PublicKey,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    baseline: TrustedBaseline,
    journal: Journal,
    journal_path: PathBuf,
    journal_dirty: bool,
    state: State,
    programs: Programs,
    queue: Queue,
    attribution: Attribution,
    printer: Printer,
    /// Inodes created in a monitored directory and not yet listed, with the directory.
    new_inodes: HashMap<InodeKey, PathBuf>,
    lost_seen: u64,
    /// When to rescan for io_uring path operations (which carry no paths).
    uring_rescan_at: Option<std::time::Instant>,
    boot_offset: Duration,
    full_map_reported: bool,
    /// New signatures of a pending baseline (the operator accepting changes).
    signatures: SignatureWatch,
}

/// Puts a monitored entry in the kernel's filter: its inode (a directory's as a watched
/// directory too) and its file name. False when a map is full.
fn watch_entry(programs: &mut Programs, path: &Path, record: &FileRecord) -> bool {
    let bits = if record.kind == FileKind::Dir { WATCH_FILE | WATCH_DIR } else { WATCH_FILE };
    let name = path.file_name().map_or(&[][..], |n| path_bytes(Path::new(n)));
    // Both, even when the first fails: the name filter still helps.
    let inode = programs.watch(key_of(record), bits);
    programs.watch_name(name) && inode
}

/// Hands memory freed after a peak (parsing kernel BTF while loading, a rescan's scratch)
/// back to the system: the watcher runs for months, and glibc keeps freed heap otherwise.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Wall time minus boot time, to turn `bpf_ktime_get_boot_ns` into wall time.
fn boot_offset() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let boot = Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0));
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().saturating_sub(boot)
}

impl Watcher {
    fn start(
        opts: WatchOptions,
        baseline: TrustedBaseline,
        journal: Journal,
        journal_path: PathBuf,
        state: State,
        services: Services,
    ) -> Result<Watcher> {
        let entries = u32::try_from(state.len()).unwrap_or(u32::MAX);
        // Room for the baseline, what gets created while watching, and renames' new inodes.
        let capacity = entries.saturating_mul(2).max(1 << 16);
        services.health.set_not_ready("starting: loading the eBPF programs");
        let programs = Programs::load(std::process::id(), capacity, capacity, opts.ring_buffer_bytes)?;
        let mut w = Watcher {
            printer: Printer::new(opts.format),
            key: services.key,
            signatures: services.signatures,
            metrics: services.metrics,
            health: services.health,
            opts,
            baseline,
            journal,
            journal_path,
            journal_dirty: false,
            state,
            programs,
            queue: Queue::default(),
            attribution: Attribution::default().with_pods(services.pods),
            new_inodes: HashMap::new(),
            lost_seen: 0,
            uring_rescan_at: None,
            boot_offset: boot_offset(),
            full_map_reported: false,
        };
        w.fill_maps();
        w.metrics.set_watched_inodes(w.state.len() as u64);
        let attached = w.programs.attached as u64;
        w.metrics.set_programs(attached, w.programs.missing.len() as u64);
        if !w.programs.missing.is_empty() {
            let missing = w.programs.missing.clone();
            w.print(&state_line(
                "degraded",
                json!({"reason": "tracepoints this kernel does not have; the rescan covers what they would see", "missing": missing}),
            ))?;
        }
        Ok(w)
    }

    fn fill_maps(&mut self) {
        let mut ok = true;
        for (path, record) in self.state.iter() {
            ok &= watch_entry(&mut self.programs, path, record);
        }
        // Rule roots that do not exist yet: their creation by path must pass the name filter.
        for rule in &self.baseline.policy.rules {
            if let Some(name) = rule.path.file_name() {
                ok &= self.programs.watch_name(path_bytes(Path::new(name)));
            }
        }
        if !ok {
            self.map_full();
        }
    }

    fn map_full(&mut self) {
        if self.full_map_reported {
            return;
        }
        self.full_map_reported = true;
        let line = state_line(
            "degraded",
            json!({"reason": "the in-kernel filter is full; changes to paths beyond it are found by the rescan only", "capacity": self.programs.capacity}),
        );
        let _ = self.print(&line);
    }

    fn print(&mut self, line: &Value) -> Result<()> {
        self.printer.print(line).map_err(|e| Error::io("writing to stdout", e))
    }

    async fn run(&mut self) -> Result<Exit> {
        self.health.set_not_ready("starting: the first rescan");
        self.verify("startup")?;
        release_freed_memory();
        eprintln!("ready");
        if let Some(ready) = &self.opts.ready_file {
            std::fs::write(ready, b"ready\n").map_err(|e| Error::io(format!("writing {}", ready.display()), e))?;
        }
        self.health.set_ready(true);
        self.printer.flush().map_err(|e| Error::io("writing to stdout", e))?;
        let events_fd = self.programs.events_fd().map_err(|e| Error::io("polling the ring buffer", e))?;
        // SAFETY: an OwnedFd of our own, open until the AsyncFd is dropped at the end of this
        // function.
        let events = unsafe { AsyncFd::register_with_interest(events_fd, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::io("polling the ring buffer", e.into()))?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;
        let mut lost_poll = tokio::time::interval(LOST_POLL);
        let mut journal_flush = tokio::time::interval(JOURNAL_FLUSH);
        let start = tokio::time::Instant::now() + self.opts.rescan_interval;
        let mut rescans = tokio::time::interval_at(start, self.opts.rescan_interval);
        // Without --verify-interval, never (a period no timer reaches).
        let verify_every = self.opts.verify_interval.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let mut verifies = tokio::time::interval_at(tokio::time::Instant::now() + verify_every, verify_every);
        let mut signature_poll = tokio::time::interval(lifecycle::SIGNATURE_POLL);
        let signature_file = lifecycle::signature_file(&self.opts);
        let mut exit = Exit::Signal;
        loop {
            self.health.beat();
            let next_due =
                self.queue.next_due().into_iter().chain(self.uring_rescan_at).min().map(tokio::time::Instant::from_std);
            let sleep = tokio::time::sleep_until(next_due.unwrap_or_else(|| tokio::time::Instant::now() + LOST_POLL));
            tokio::select! {
                guard = events.readable() => {
                    let mut guard = guard.map_err(|e| Error::io("polling the ring buffer", e))?;
                    // Readiness is edge-triggered: only clear it once the buffer is empty.
                    if self.drain() {
                        guard.clear_ready();
                    }
                }
                _ = sleep => {
                    self.flush_due()?;
                    if self.uring_rescan_at.is_some_and(|at| at <= std::time::Instant::now()) {
                        self.uring_rescan_at = None;
                        self.rescan("io_uring path operation")?;
                        self.printer.flush().map_err(|e| Error::io("writing to stdout", e))?;
                    }
                }
                _ = lost_poll.tick() => self.check_lost()?,
                _ = journal_flush.tick() => {
                    self.flush_journal()?;
                    if let Some(pods) = self.attribution.pods() {
                        self.metrics.set_pods(pods.len() as u64);
                    }
                }
                _ = rescans.tick() => {
                    self.rescan("interval")?;
                }
                _ = verifies.tick() => self.verify("interval")?,
                _ = signature_poll.tick(), if signature_file.is_some() => {
                    if let Some(path) = &signature_file
                        && let Some(signature) = self.signatures.new_signature(path)
                        && lifecycle::try_attach(&self.opts, &self.key, signature, &mut self.printer)?
                    {
                        exit = Exit::NewBaseline;
                        break;
                    }
                }
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
            }
            self.printer.flush().map_err(|e| Error::io("writing to stdout", e))?;
        }
        // Report what is pending before detaching: nothing seen is dropped.
        while !self.drain() {}
        self.flush_all()?;
        self.flush_journal()?;
        self.printer.flush().map_err(|e| Error::io("writing to stdout", e))?;
        Ok(exit)
    }

    /// Reads up to a batch of events from the ring buffer; true when it is empty.
    fn drain(&mut self) -> bool {
        let mut batch = Vec::new();
        let mut empty = true;
        while let Some(item) = self.programs.events.next() {
            if let Some(ev) = KernelEvent::decode(&item) {
                batch.push(ev);
            }
            if batch.len() >= 4096 {
                empty = false;
                break;
            }
        }
        for ev in batch {
            self.on_event(ev);
        }
        empty
    }

    fn event_time(&self, boot_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.boot_offset + Duration::from_nanos(boot_ns)
    }

    fn on_event(&mut self, ev: KernelEvent) {
        self.metrics.event(ev.op.name());
        if ev.op == Op::IoUring && ev.header.flags & EVENT_URING_PATH_OP != 0 {
            // Its paths are not visible to the kernel side: rescan once it has completed.
            self.uring_rescan_at.get_or_insert_with(|| std::time::Instant::now() + URING_RESCAN_DELAY);
            return;
        }
        tracing::debug!(op = ev.op.name(), pid = ev.header.pid, comm = ev.comm(), target = ?ev.target(), start = ?ev.header.start, dirfd = ?ev.header.dirfd, paths = ?ev.paths.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(), "event");
        let actor = self.attribution.actor(&ev);
        let time = self.event_time(ev.header.time_ns);
        let pid = ev.header.pid;
        let policy = &self.baseline.policy;
        let mut targets = Targets::default();
        let mut slots: Vec<Targets> = Vec::new();
        match ev.op {
            Op::Create => {
                if ev.header.flags & EVENT_HAS_PARENT != 0
                    && let Some(dir) = self.state.dir_of_inode(&ev.header.parent)
                {
                    if let Some(key) = ev.target() {
                        self.new_inodes.insert(key, dir.clone());
                    }
                    targets.mark_dir(policy, &dir);
                }
            }
            _ if ev.paths.is_empty() => {
                if let Some(key) = ev.target() {
                    // Only paths that are that inode now: an unlinked file's inode number can be
                    // reused at once, by a file anywhere on the same file system.
                    let host = &self.opts.host;
                    let is_it = |p: &PathBuf| {
                        std::fs::symlink_metadata(host.disk(p))
                            .is_ok_and(|m| InodeKey::from_stat(m.dev(), m.ino()) == key)
                    };
                    targets
                        .paths
                        .extend(self.state.paths_of_inode(&key).into_iter().filter(|p| covered(policy, p) && is_it(p)));
                    if targets.paths.is_empty()
                        && let Some(dir) = self.new_inodes.get(&key)
                    {
                        targets.mark_dir(policy, dir);
                    }
                }
            }
            _ => {
                let scope = match ev.op {
                    Op::Rename | Op::Unlink | Op::Rmdir | Op::Link | Op::Symlink | Op::Mkdir | Op::Mknod => {
                        Scope::Namespace
                    }
                    _ => Scope::Entry,
                };
                for (i, path) in ev.paths.iter().enumerate() {
                    let mut slot = Targets::default();
                    if !path.is_empty() {
                        let (dirfd, start) = (ev.header.dirfd[i], ev.header.start[i]);
                        let at = (pid, dirfd, start);
                        resolve_path(&self.state, policy, &self.opts.host, at, path, scope, &mut slot);
                    }
                    targets.paths.extend(slot.paths.iter().cloned());
                    targets.dirs.extend(slot.dirs.iter().cloned());
                    slots.push(slot);
                }
            }
        }
        let op_name = match ev.op {
            Op::OpenWrite | Op::Close => None,
            Op::Dirty if ev.header.flags & EVENT_IO_WORKER != 0 => Some(Op::IoUring.name()),
            Op::Dirty => Some(Op::Mmap.name()),
            op => Some(op.name()),
        };
        for path in &targets.paths {
            let op = match ev.op {
                // Dirtying by a process that wrote the file through a syscall is that write.
                Op::Dirty if self.queue.had_syscall(path, pid) => None,
                _ => op_name,
            };
            self.queue.note(path, op, &actor, time, ev.op == Op::Close);
            match ev.op {
                Op::Dirty if op == Some(Op::Mmap.name()) => self.queue.dirty_by(path, pid),
                Op::Dirty | Op::Mmap | Op::IoUring => {}
                _ => self.queue.syscall_by(path, pid),
            }
        }
        for dir in &targets.dirs {
            self.queue.list_entries(dir);
        }
        if ev.op == Op::Rename && slots.len() == 2 {
            let files = |t: &Targets| -> Vec<PathBuf> { t.paths.difference(&t.dirs).cloned().collect() };
            // A destination no name could place (the actor gone, a new name): in the same
            // directory as the source when the paths say so.
            let same_parent = |a: &[u8], b: &[u8]| {
                let parent = |p: &[u8]| p.iter().rposition(|&c| c == b'/').map(|i| p[..i].to_vec());
                parent(a) == parent(b)
            };
            if files(&slots[1]).is_empty()
                && same_parent(&ev.paths[0], &ev.paths[1])
                && let [from] = files(&slots[0]).as_slice()
                && let (Some(dir), Some(name)) =
                    (from.parent(), Path::new(std::ffi::OsStr::from_bytes(&ev.paths[1])).file_name())
            {
                let to = dir.join(name);
                if covered(policy, &to) {
                    self.queue.note(&to, op_name, &actor, time, false);
                    slots[1].paths.insert(to);
                }
            }
            if ev.header.flags & EVENT_EXCHANGE == 0
                && let ([from], [to]) = (files(&slots[0]).as_slice(), files(&slots[1]).as_slice())
            {
                self.queue.renamed(to, from);
            }
        }
    }

    fn check_lost(&mut self) -> Result<()> {
        let total = self.programs.lost_total();
        if total > self.lost_seen {
            let lost = total - self.lost_seen;
            self.lost_seen = total;
            self.metrics.lost(lost);
            self.print(&state_line(
                "lost",
                json!({"events": lost, "total": total, "action": "rescan of every monitored path"}),
            ))?;
            while !self.drain() {}
            self.flush_all()?;
            self.rescan("lost events")?;
        }
        Ok(())
    }

    fn flush_due(&mut self) -> Result<()> {
        let due = self.queue.take_due();
        self.process(due)
    }

    fn flush_all(&mut self) -> Result<()> {
        loop {
            let due = self.queue.take_due();
            if due.is_empty() && self.queue.is_empty() {
                return Ok(());
            }
            if due.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            self.process(due)?;
        }
    }

    /// Rehashes due paths and reports what changed.
    fn process(&mut self, due: Vec<(PathBuf, Pending)>) -> Result<()> {
        let mut done: BTreeSet<PathBuf> = BTreeSet::new();
        let mut work: Vec<(PathBuf, Arc<Pending>)> = Vec::new();
        let due_paths: HashSet<PathBuf> = due.iter().map(|(p, _)| p.clone()).collect();
        for (path, pending) in due {
            let pending = Arc::new(pending);
            if pending.list_entries {
                let mut entries = Targets::default();
                dir_changes(&self.state, &self.baseline.policy, &self.opts.host, &path, &mut entries);
                // Entries with events of their own keep them (and their actor).
                for entry in entries.paths {
                    if !self.queue.contains(&entry) && !due_paths.contains(&entry) {
                        work.push((entry, pending.clone()));
                    }
                }
            }
            work.push((path, pending));
        }
        // Destinations of renames first: they may account for their source.
        work.sort_by(|(a, p), (b, q)| (p.renamed_from.is_none(), a).cmp(&(q.renamed_from.is_none(), b)));
        for (path, pending) in work {
            if !done.insert(path.clone()) {
                continue;
            }
            if let Some(from) = &pending.renamed_from
                && !done.contains(from)
                && self.report_rename(from, &path, &pending)?
            {
                done.insert(from.clone());
                continue;
            }
            self.rehash_and_report(&path, &pending.ops, pending.actor.as_deref(), pending.time, DetectedBy::Event)?;
        }
        Ok(())
    }

    /// Rehashes `path` now; `None` when the policy does not cover it or it could not be read.
    fn rehash_now(&mut self, path: &Path) -> Option<Option<Known>> {
        let started = std::time::Instant::now();
        let rehashed = rehash(path, &self.baseline.policy, &self.opts.host)?;
        self.metrics.rehash_seconds(started.elapsed());
        match rehashed {
            Ok(r) => Some(Some(Known { record: r.record, content: r.content })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Some(None),
            Err(e) => {
                let line = state_line("error", json!({"path": path.display().to_string(), "error": e.to_string()}));
                let _ = self.print(&line);
                None
            }
        }
    }

    fn old_content(&self, path: &Path) -> impl FnOnce(&Hash) -> kubefim_baseline::Result<Option<Vec<u8>>> + '_ {
        let known = self.state.get(path).and_then(|k| k.content.cloned());
        move |hash| match known {
            Some(c) => Ok(Some(c)),
            None => self.baseline.content(hash),
        }
    }

    fn diff(&self, path: &Path, old: Option<&FileRecord>, now: Option<&Known>) -> Result<Option<Change>> {
        let policy = &self.baseline.policy;
        Ok(match (old, now) {
            (None, None) => None,
            (Some(o), None) => Some(Change {
                path: path.to_owned(),
                kind: ChangeKind::Removed,
                changed: Vec::new(),
                old: Some(o.clone()),
                new: None,
                diff: None,
                changed_ranges: None,
            }),
            (o, Some(n)) => compare_with(
                policy,
                path.to_owned(),
                o,
                n.record.clone(),
                n.content.as_deref(),
                self.old_content(path),
            )?,
        })
    }

    fn rehash_and_report(
        &mut self,
        path: &Path,
        ops: &[&'static str],
        actor: Option<&Actor>,
        time: SystemTime,
        by: DetectedBy,
    ) -> Result<()> {
        let Some(now) = self.rehash_now(path) else { return Ok(()) };
        let old = self.state.get(path).map(|k| k.record.clone());
        let change = self.diff(path, old.as_ref(), now.as_ref())?;
        // A new directory may have been filled before the kernel's filter knew it (tar -x,
        // mkdir -p): once it is watched, compare its entries with the state.
        let new_dir = old.is_none() && now.as_ref().is_some_and(|k| k.record.kind == FileKind::Dir);
        if let Some(change) = change {
            let line = ChangeLine {
                change: &change,
                renamed_to: None,
                ops,
                actor,
                time,
                baseline_match: self.baseline_match(path, now.as_ref().map(|k| &k.record)),
                detected_by: by,
            };
            let json = line.json(&self.baseline.policy);
            self.print(&json)?;
            self.metrics.change(change.kind.name());
        }
        self.update(path, now)?;
        if new_dir && let Some(actor) = actor {
            let actor = Arc::new(actor.clone());
            self.queue.note(path, None, &actor, time, true);
            for op in ops {
                self.queue.note(path, Some(op), &actor, time, true);
            }
            self.queue.list_entries(path);
        }
        Ok(())
    }

    /// Reports `from` renamed to `to` when that is what happened: `from` is gone, `to` is new
    /// and is the inode `from` was. False when it is something else (then each is reported
    /// on its own).
    fn report_rename(&mut self, from: &Path, to: &Path, pending: &Pending) -> Result<bool> {
        let Some(source) = self.state.get(from).map(|k| k.record.clone()) else { return Ok(false) };
        if self.state.get(to).is_some() || std::fs::symlink_metadata(self.opts.host.disk(from)).is_ok() {
            return Ok(false);
        }
        let Some(Some(now)) = self.rehash_now(to) else { return Ok(false) };
        if now.record.inode != source.inode || now.record.dev != source.dev {
            return Ok(false);
        }
        let mut ops = pending.ops.clone();
        if let Some(p) = self.queue.take(from) {
            ops.extend(p.ops.into_iter().filter(|o| !pending.ops.contains(o)));
        }
        let rule = &self.baseline.policy.rules[usize::try_from(now.record.rule).unwrap_or(0)];
        let change = Change {
            path: from.to_owned(),
            kind: ChangeKind::Modified,
            changed: source.changed_attributes(&now.record, rule.attributes),
            old: Some(source),
            new: Some(now.record.clone()),
            diff: None,
            changed_ranges: None,
        };
        let line = ChangeLine {
            change: &change,
            renamed_to: Some(to),
            ops: &ops,
            actor: pending.actor.as_deref(),
            time: pending.time,
            baseline_match: self.baseline_match(from, None),
            detected_by: DetectedBy::Event,
        };
        let json = line.json(&self.baseline.policy);
        self.print(&json)?;
        self.metrics.change("renamed");
        self.update(from, None)?;
        self.update(to, Some(now))?;
        Ok(true)
    }

    /// Whether `now` equals the signed baseline's record of `path` in every monitored
    /// attribute but the ones a restore cannot bring back (times, inode number).
    fn baseline_match(&self, path: &Path, now: Option<&FileRecord>) -> bool {
        match (self.state.signed(path), now) {
            (None, None) => true,
            (Some(signed), Some(now)) => {
                let rule = usize::try_from(now.rule).ok().and_then(|i| self.baseline.policy.rules.get(i));
                let attrs: AttributeSet = rule
                    .map(|r| r.attributes)
                    .unwrap_or_else(AttributeSet::all)
                    .iter()
                    .filter(|a| !matches!(a, Attribute::Mtime | Attribute::Ctime | Attribute::Inode))
                    .collect();
                signed.changed_attributes(now, attrs).is_empty()
            }
            _ => false,
        }
    }

    /// Takes `now` as the state of `path`: journal, indexes, kernel maps.
    fn update(&mut self, path: &Path, now: Option<Known>) -> Result<()> {
        let deviated_before = self.state.journal_entry(path).is_some();
        if let Some(known) = &now {
            self.new_inodes.remove(&key_of(&known.record));
            if !watch_entry(&mut self.programs, path, &known.record) {
                self.map_full();
            }
        }
        let old_key = self.state.get(path).map(|k| key_of(k.record));
        self.state.set(path, now);
        // A key no path has any more leaves the kernel's filter: its number may be reused.
        if let Some(old) = old_key
            && self.state.paths_of_inode(&old).is_empty()
        {
            self.programs.unwatch(old);
        }
        let entry = self.state.journal_entry(path);
        if deviated_before || entry.is_some() {
            self.journal.put(path_bytes(path), entry.as_ref())?;
            self.journal_dirty = true;
        }
        Ok(())
    }

    fn flush_journal(&mut self) -> Result<()> {
        if self.journal_dirty {
            self.journal.flush()?;
            self.journal_dirty = false;
        }
        Ok(())
    }

    /// Rescans everything the policy names and reports what differs from the state, except
    /// paths with pending events (their rehash reports them, with who did it). Returns how
    /// many paths could not be verified.
    fn rescan(&mut self, reason: &'static str) -> Result<u64> {
        self.metrics.rescan(reason);
        let started = std::time::Instant::now();
        let policy = self.baseline.policy.clone();
        let (differing, seen, summary) = {
            // Entries equal to the state are only counted as seen: a rescan of a large tree
            // keeps just the paths, not every record, in memory.
            let sink = Collect {
                state: &self.state,
                health: &self.health,
                differing: Mutex::default(),
                seen: Mutex::default(),
            };
            let mut scan =
                Scan::whole_policy(&policy).under(&self.opts.host).skip(&self.opts.db).skip(&self.journal_path);
            if let Some(ready) = &self.opts.ready_file {
                scan = scan.skip(ready);
            }
            let summary = scan.run(&sink, &ScanProgress::default());
            let differing = sink.differing.into_inner().unwrap_or_else(|e| e.into_inner());
            let seen = sink.seen.into_inner().unwrap_or_else(|e| e.into_inner());
            (differing, seen, summary)
        };
        let mut changes = 0u64;
        let now = SystemTime::now();
        for entry in differing {
            if self.queue.contains(&entry.path) {
                continue;
            }
            let known = Known { record: entry.record, content: entry.content };
            let old = self.state.get(&entry.path).map(|k| k.record.clone());
            if let Some(change) = self.diff(&entry.path, old.as_ref(), Some(&known))? {
                changes += 1;
                self.report_rescanned(&change, Some(&known.record), now)?;
            }
            self.update(&entry.path, Some(known))?;
        }
        let incomplete: Vec<PathBuf> = summary.incomplete().map(|w| w.path.clone()).collect();
        let gone: Vec<PathBuf> = self
            .state
            .iter()
            .map(|(p, _)| p)
            .filter(|p| !seen.contains(&path_digest(p)) && !self.queue.contains(p))
            .filter(|p| !incomplete.iter().any(|i| p.starts_with(i)))
            .map(Path::to_owned)
            .collect();
        for path in gone {
            let old = self.state.get(&path).map(|k| k.record.clone());
            if let Some(change) = self.diff(&path, old.as_ref(), None)? {
                changes += 1;
                self.report_rescanned(&change, None, now)?;
            }
            self.update(&path, None)?;
        }
        let unverified: Vec<Value> =
            summary.incomplete().map(|w| json!({"path": w.path.display().to_string(), "error": w.message})).collect();
        self.print(&state_line(
            "rescan",
            json!({
                "reason": reason,
                "scanned": summary.entries,
                "changes": changes,
                "unverified": unverified,
                "seconds": started.elapsed().as_secs_f64(),
            }),
        ))?;
        release_freed_memory();
        self.flush_journal()?;
        Ok(unverified.len() as u64)
    }

    /// Rescans, then compares everything with the signed baseline: a `verify` line (what
    /// differs from the baseline now, however it got so) and the verify metrics.
    fn verify(&mut self, reason: &'static str) -> Result<()> {
        let started = std::time::Instant::now();
        let errors = self.rescan(if reason == "startup" { "startup" } else { "verify" })?;
        let policy = &self.baseline.policy;
        let (mut added, mut removed, mut modified) = (0u64, 0u64, 0u64);
        let mut listed = Vec::new();
        for (path, signed, now) in self.state.deviations() {
            let kind = match (signed, now) {
                (None, Some(_)) => ChangeKind::Added,
                (Some(_), None) => ChangeKind::Removed,
                (Some(signed), Some(now)) => {
                    let rule = usize::try_from(now.rule).ok().and_then(|i| policy.rules.get(i));
                    let attrs = rule.map_or_else(AttributeSet::all, |r| r.attributes);
                    if signed.changed_attributes(now, attrs).is_empty() {
                        continue;
                    }
                    ChangeKind::Modified
                }
                (None, None) => continue,
            };
            *match kind {
                ChangeKind::Added => &mut added,
                ChangeKind::Removed => &mut removed,
                ChangeKind::Modified => &mut modified,
            } += 1;
            if listed.len() < VERIFY_LISTED {
                listed.push(json!({"path": path.display().to_string(), "kind": kind.name()}));
            }
        }
        let result = match (errors, added + removed + modified) {
            (0, 0) => "clean",
            (0, _) => "changed",
            _ => "error",
        };
        let total = added + removed + modified;
        self.print(&state_line(
            "verify",
            json!({
                "reason": reason,
                "result": result,
                "added": added,
                "removed": removed,
                "modified": modified,
                "errors": errors,
                "deviations": listed,
                "deviations_truncated": total > VERIFY_LISTED as u64,
                "baseline_entries": self.state.signed_len(),
                "seconds": started.elapsed().as_secs_f64(),
            }),
        ))?;
        let at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        self.metrics.verified(at.as_secs_f64(), added, removed, modified, errors, started.elapsed());
        Ok(())
    }

    fn report_rescanned(&mut self, change: &Change, now: Option<&FileRecord>, time: SystemTime) -> Result<()> {
        let line = ChangeLine {
            change,
            renamed_to: None,
            ops: &[],
            actor: None,
            time,
            baseline_match: self.baseline_match(&change.path, now),
            detected_by: DetectedBy::Rescan,
        };
        let json = line.json(&self.baseline.policy);
        self.metrics.change(change.kind.name());
        self.print(&json)
    }
}

/// How many deviating paths a `verify` line names (the counts are always complete).
const VERIFY_LISTED: usize = 100;

fn path_digest(path: &Path) -> [u8; 16] {
    let hash = blake3::hash(path_bytes(path));
    let mut out = [0; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

/// What a rescan keeps: entries that differ from the state, and the paths of all.
struct Collect<'a> {
    state: &'a State,
    /// Beaten per entry: a long rescan is the loop at work, not a stuck loop.
    health: &'a Health,
    differing: Mutex<Vec<ScannedEntry>>,
    /// 128-bit BLAKE3 of each path seen (not the path: a rescan of a large tree should cost
    /// little; a collision is 2^-64-unlikely for 100M paths).
    seen: Mutex<HashSet<[u8; 16]>>,
}

impl ScanSink for Collect<'_> {
    fn entry(&self, entry: ScannedEntry) {
        self.health.beat();
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(path_digest(&entry.path));
        if self.state.get(&entry.path).is_some_and(|k| *k.record == entry.record) {
            return;
        }
        self.differing.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
    }
}
