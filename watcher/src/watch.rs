//! The watch loop, and only that: trust the baseline, load the programs, index the state and
//! fill the kernel's filter, start the reader, say ready, start the startup rescan; then route
//! what arrives (observations and losses from the reader, findings from the rescan thread,
//! timers, signals) to the module that handles it, until SIGTERM or SIGINT.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::journal::Journal;
use kubefim_baseline::lock::{Lock, lock_path};
use kubefim_baseline::policy::path_bytes;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::sign::PublicKey;
use kubefim_baseline::workload::WorkloadPolicies;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::actor::Attribution;
use crate::ancestors::Ancestors;
use crate::cluster::Cluster;
use crate::containers::{Containers, Next};
use crate::error::{Error, Result};
use crate::http::Health;
use crate::lifecycle::{self, SignatureWatch};
use crate::metrics::Metrics;
use crate::model::{Degraded, DegradedReason, Event, Line, Lost, PolicyRejected, Rescan, RescanReason, VerifyReason};
use crate::output::{Format, Printer};
use crate::pods::PodIndex;
use crate::policy_objects::{PolicySet, PolicySets};
use crate::programs::{Attached, Programs};
use crate::reader::{Message, Reader, ReaderParts};
use crate::report::{Follow, Reporter, Reroot};
use crate::rescan::{Found, Request, Rescans, Setup};
use crate::selfcheck::{self, Check, Outcome, SelfCheck};
use crate::state::State;

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
    /// Check the containers these workload policies select against their images.
    pub containers: Option<WorkloadPolicies>,
    /// Where image layer records are cached (default: `layer-cache` beside the database).
    pub layer_cache: Option<PathBuf>,
}

/// Why a watch ended.
enum Exit {
    /// SIGTERM or SIGINT.
    Signal,
    /// A new signed baseline was installed: start again with it.
    NewBaseline,
}

/// How long after an io_uring path operation the rescan starts (time for it to complete).
const URING_RESCAN_DELAY: Duration = Duration::from_millis(300);
/// How long after a rename, removal or mount at or above a rule root (seen on the syscall's
/// entry) its subtrees are rescanned: time for it to complete, and for others like it (a swap
/// is often two renames) to join the same rescan.
const REROOT_DELAY: Duration = Duration::from_millis(100);
/// How often the journal is made durable while changes come in.
const JOURNAL_FLUSH: Duration = Duration::from_secs(1);
/// Observations the reader may be ahead of the loop; beyond, it drops and counts them.
const QUEUE: usize = 16 * 1024;
/// Observations taken from the queue in one turn of the loop, after the one that woke it.
const MESSAGES_PER_TURN: usize = 1024;
/// How long the loop may go without a heartbeat before /healthz fails. Rescans run on their
/// own thread, so only a loop that is truly stuck goes this long.
const HEALTH_STALE_AFTER: Duration = Duration::from_secs(120);

/// Runs the watcher until SIGINT or SIGTERM.
pub fn run(opts: WatchOptions) -> Result<()> {
    let key = PublicKey::load(&opts.pubkey)?;
    let limit = crate::limits::raise_descriptor_limit();
    tracing::debug!(was = ?limit.was, now = ?limit.now, "descriptor limit");
    if !limit.leaves_reserve(crate::http::MAX_CONNECTIONS) {
        tracing::warn!(
            limit = ?limit.now,
            "the descriptor limit is low: rehashes may fail while the HTTP endpoint is busy; raise the hard \
             RLIMIT_NOFILE (the container runtime's ulimit)"
        );
    }
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(HEALTH_STALE_AFTER));
    health.set_not_ready("starting: loading the baseline");
    // The endpoint and the pod watch run on a thread of their own: probes and the API's
    // watch must not wait for the loop.
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("kubefim-background")
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    if let Some(addr) = opts.listen {
        let _in = background.enter();
        let (bound, _task) = crate::http::serve(addr, metrics.clone(), health.clone())?;
        eprintln!("serving /metrics, /healthz and /readyz on http://{bound}");
    }
    let kube = opts.kubernetes.then(|| start_kube(&background, &opts, &metrics)).flatten();
    let pods = kube.as_ref().map(|k| k.pods.clone());
    // Drift as Events on pods and the node, and the node's FimNodeStatus.
    let cluster = kube.as_ref().map(|k| {
        let _in = background.enter();
        Cluster::start(k.client.clone(), &opts.node_name, &metrics)
    });
    // Workload policies as objects, with --containers: the files' policies and the API's.
    let policy_sets = match (&kube, &opts.containers) {
        (Some(kube), Some(files)) => {
            let _in = background.enter();
            Some(crate::policy_objects::start(kube.client.clone(), files.clone()))
        }
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let journal_path = opts.journal.clone().unwrap_or_else(|| {
        let mut p = opts.db.clone().into_os_string();
        p.push(".journal");
        PathBuf::from(p)
    });
    runtime.block_on(async {
        let mut signatures = SignatureWatch::default();
        // Held from the first trusted baseline to the exit: two watchers on one journal would
        // each take the other's observations for their own. Taken once a baseline is trusted,
        // so an untrusted or missing one is still exit 3, whatever the journal's directory.
        let mut journal_lock: Option<Lock> = None;
        loop {
            let mut printer = Printer::new(opts.format);
            let trusted = lifecycle::trusted(&opts, &key, &mut signatures, &mut printer, &health, &metrics).await?;
            let Some(baseline) = trusted else { return Ok(()) };
            if journal_lock.is_none() {
                journal_lock = Some(Lock::acquire(&journal_path, "watch")?);
            }
            let services = Services {
                key: &key,
                metrics: &metrics,
                health: &health,
                pods: pods.clone(),
                policy_sets: policy_sets.clone(),
                cluster: cluster.clone(),
            };
            let session = Session::start(&opts, &journal_path, baseline, printer, services)?;
            match session.run(&mut signatures).await? {
                Exit::Signal => return Ok(()),
                Exit::NewBaseline => {
                    health.set_not_ready("loading the newly signed baseline");
                    release_freed_memory();
                }
            }
        }
    })
}

/// The agent's uses of the Kubernetes API (`--kubernetes`), on the background runtime.
struct KubeApi {
    /// Shared by every use.
    client: kube::Client,
    /// This node's pods.
    pods: PodIndex,
}

/// Connects to the Kubernetes API and starts the index of this node's pods; without an API
/// server (not in a cluster), says so and goes on without pod names.
fn start_kube(background: &tokio::runtime::Runtime, opts: &WatchOptions, metrics: &Arc<Metrics>) -> Option<KubeApi> {
    let started = background.block_on(async {
        let client = crate::pods::client().await?;
        let pods = PodIndex::start_with_client(client.clone(), &opts.node_name, metrics.pod_metrics())?;
        Ok::<_, crate::pods::Error>(KubeApi { client, pods })
    });
    match started {
        Ok(kube) => Some(kube),
        Err(e) => {
            let line = Line::Degraded(Degraded {
                reason: DegradedReason::NoKubernetesApi,
                message: "no Kubernetes API: changes are attributed to containers, not pods".into(),
                missing: Vec::new(),
                capacity: None,
                error: Some(kubefim_baseline::error::chain(&e)),
            });
            let mut printer = Printer::new(opts.format);
            let _ = printer.print(&Event::now(line)).and_then(|()| printer.flush());
            None
        }
    }
}

/// What outlives one baseline.
struct Services<'a> {
    key: &'a PublicKey,
    metrics: &'a Arc<Metrics>,
    health: &'a Arc<Health>,
    pods: Option<PodIndex>,
    policy_sets: Option<PolicySets>,
    cluster: Option<Cluster>,
}

/// Where image layer records are cached.
fn layer_cache_dir(opts: &WatchOptions) -> PathBuf {
    opts.layer_cache.clone().unwrap_or_else(|| {
        opts.db.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).join("layer-cache")
    })
}

/// The next container checked or gone; never, without `--containers`.
async fn next_container(containers: &mut Option<Containers>) -> Option<Next> {
    match containers {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The next set of workload policies from the API; never, without them.
async fn next_policy_set(sets: &mut Option<PolicySets>) -> Option<Arc<PolicySet>> {
    let Some(rx) = sets else { return std::future::pending().await };
    if rx.changed().await.is_err() {
        // The watches ended (they do not, but a closed channel must not spin the loop).
        *sets = None;
        return None;
    }
    rx.borrow_and_update().clone()
}

/// Hands memory freed after a peak (parsing kernel BTF while loading, indexing the
/// baseline) back to the system: the watcher runs for months, and glibc keeps freed heap
/// otherwise.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One baseline watched: from its trust to a signal or a newer baseline.
struct Session<'a> {
    opts: &'a WatchOptions,
    key: &'a PublicKey,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    reporter: Reporter,
    rescans: Rescans,
    reader: Option<Reader>,
    rx: mpsc::Receiver<Message>,
    /// Keeps the programs attached.
    _attached: Attached,
    /// When to rescan for io_uring path operations (which carry no paths).
    uring_rescan_at: Option<Instant>,
    /// Renames, removals and mounts at or above rule roots waiting for [`REROOT_DELAY`].
    reroots: Vec<Reroot>,
    /// When they are due.
    reroot_at: Option<Instant>,
    /// The canary and the checks of the kernel filter.
    check: SelfCheck,
    /// The names of the rules' roots, in the filter even before they exist (for a refill).
    roots: Vec<Vec<u8>>,
    /// The containers checked against their images (`--containers`).
    containers: Option<Containers>,
    /// The workload policies of the Kubernetes API, as they change.
    policy_sets: Option<PolicySets>,
    /// The policy objects rejected so far (kind/name, version): each is said once.
    rejected: BTreeSet<(String, Option<String>)>,
    /// What the cluster is told (`--kubernetes`).
    cluster: Option<Cluster>,
    /// The programs attached and those this kernel lacks.
    programs: (u64, u64),
}

impl<'a> Session<'a> {
    fn start(
        opts: &'a WatchOptions,
        journal_path: &std::path::Path,
        baseline: TrustedBaseline,
        printer: Printer,
        services: Services<'a>,
    ) -> Result<Session<'a>> {
        let (metrics, health) = (services.metrics.clone(), services.health.clone());
        let id = format!("{}:{}", baseline.manifest.created_unix_ns, baseline.manifest.host);
        let journal = Journal::open(journal_path, &id)?;
        let created = Duration::from_nanos(u64::try_from(baseline.manifest.created_unix_ns).unwrap_or(0));
        let entries = baseline.len();
        metrics.set_baseline(entries, created.as_secs_f64(), true);
        health.set_not_ready("starting: indexing the baseline");
        let started = Instant::now();
        let policy = baseline.policy.clone();
        let policy_name = policy.name.clone();
        let state = State::load(baseline, journal)?;
        tracing::debug!(ms = started.elapsed().as_millis(), entries = state.index().len(), "indexed");
        // Room for what exists, what gets created while watching and renames' new inodes; the
        // maps are not preallocated, but their bucket arrays are as long as their capacity.
        let (inodes, names) = state.index().filter_sizes();
        let room = |n: usize| u32::try_from(n + n / 2).unwrap_or(u32::MAX).max(1 << 16);
        health.set_not_ready("starting: loading the eBPF programs");
        let started = Instant::now();
        let execs = opts.containers.is_some();
        let programs = Programs::load(std::process::id(), room(inodes), room(names), opts.ring_buffer_bytes, execs)?;
        tracing::debug!(ms = started.elapsed().as_millis(), "programs loaded and attached");
        let (attached, mut filter, source, cgroups) = programs.into_parts();
        let programs = (attached.attached as u64, attached.missing.len() as u64);
        let (tx, rx) = mpsc::channel(QUEUE);
        let reader = Reader::start(ReaderParts {
            source,
            attribution: Attribution::default().with_pods(services.pods.clone()),
            host: opts.host.clone(),
            metrics: metrics.clone(),
            tx,
        })
        .map_err(|e| Error::io("starting the reader thread", e))?;
        let started = Instant::now();
        let roots: Vec<Vec<u8>> = policy
            .rules
            .iter()
            .filter_map(|r| r.path.file_name())
            .map(|n| path_bytes(std::path::Path::new(n)).to_vec())
            .collect();
        let mut ancestors = Ancestors::of(&policy);
        ancestors.refresh(&opts.host);
        filter.fill(state.index(), roots.iter().map(Vec::as_slice), &ancestors);
        metrics.set_watched_inodes(filter.inodes());
        // Beside the journal: a place the agent must be able to write anyway.
        let canary = {
            let mut p = journal_path.as_os_str().to_owned();
            p.push(".canary");
            PathBuf::from(p)
        };
        let check = SelfCheck::new(canary.clone(), &mut filter).map_err(|e| {
            Error::io(
                format!("creating the self-check's canary file {} (its directory must be writable)", canary.display()),
                e,
            )
        })?;
        tracing::debug!(ms = started.elapsed().as_millis(), inodes = filter.inodes(), "kernel filter filled");
        metrics.set_programs(attached.attached as u64, attached.missing.len() as u64);
        let mut skip = vec![
            opts.db.clone(),
            journal_path.to_owned(),
            check.canary_path().to_owned(),
            lock_path(journal_path),
            lock_path(&opts.db),
        ];
        skip.extend(opts.ready_file.clone());
        let rescans = Rescans::new(policy, Setup { host: opts.host.clone(), skip }, metrics.clone());
        let mut reporter = Reporter::new(state, filter, ancestors, printer, metrics.clone(), opts.host.clone());
        reporter.set_cluster(services.cluster.clone());
        if let Some(cluster) = &services.cluster {
            cluster.baseline(entries, SystemTime::UNIX_EPOCH + created, &policy_name);
        }
        if !attached.missing.is_empty() {
            reporter.print(Line::Degraded(Degraded {
                reason: DegradedReason::MissingTracepoints,
                message: "tracepoints this kernel does not have; the rescans cover what they would see".into(),
                missing: attached.missing.clone(),
                capacity: None,
                error: None,
            }))?;
        }
        reporter.say_if_filter_full()?;
        let pods = services.pods;
        // The API's latest policies when they were listed already (a new baseline started
        // this session), else the files': the API's follow once listed.
        let latest = services.policy_sets.as_ref().and_then(|sets| sets.borrow().as_ref().map(|s| s.policies.clone()));
        let containers = match latest.as_ref().or(opts.containers.as_ref()) {
            Some(policies) => Some(
                Containers::start(policies.clone(), opts.host.clone(), cgroups, &layer_cache_dir(opts), pods)
                    .map_err(|e| Error::io("starting the containers' checker thread", e))?,
            ),
            None => None,
        };
        let mut policy_sets = services.policy_sets;
        if latest.is_none() {
            // Nothing listed yet: the first set is news to this session.
            if let Some(sets) = &mut policy_sets {
                sets.mark_changed();
            }
        }
        Ok(Session {
            opts,
            key: services.key,
            metrics,
            health,
            reporter,
            rescans,
            reader: Some(reader),
            rx,
            _attached: attached,
            uring_rescan_at: None,
            reroots: Vec::new(),
            reroot_at: None,
            check,
            roots,
            containers,
            policy_sets,
            rejected: BTreeSet::new(),
            cluster: services.cluster,
            programs,
        })
    }

    /// Ready: the programs are attached, the filter is filled and events flow. The startup
    /// rescan runs from here on; its findings are reported as they come.
    fn ready(&mut self) -> Result<()> {
        release_freed_memory();
        eprintln!("ready");
        if let Some(ready) = &self.opts.ready_file {
            std::fs::write(ready, b"ready\n").map_err(|e| Error::io(format!("writing {}", ready.display()), e))?;
        }
        self.health.set_ready(true);
        self.metrics.set_self_check_ok(true);
        if let Some(cluster) = &self.cluster {
            cluster.ready(true, "the programs are attached and the baseline's files watched", self.programs);
        }
        self.rescans.request(Request::all(RescanReason::Startup, Some(VerifyReason::Startup)));
        self.reporter.flush()
    }

    async fn run(mut self, signatures: &mut SignatureWatch) -> Result<Exit> {
        self.ready()?;
        let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
        let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;
        let mut journal_flush = tokio::time::interval(JOURNAL_FLUSH);
        let interval = self.opts.rescan_interval;
        let mut rescans = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        // Without --verify-interval, never (a period no timer reaches).
        let verify_every = self.opts.verify_interval.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
        let mut verifies = tokio::time::interval_at(tokio::time::Instant::now() + verify_every, verify_every);
        let mut signature_poll = tokio::time::interval(lifecycle::SIGNATURE_POLL);
        let mut self_checks = tokio::time::interval(selfcheck::CHECK_EVERY);
        // After a long turn, one check, not a burst of them (a canary needs time to be seen).
        self_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let signature_file = lifecycle::signature_file(self.opts);
        let mut exit = Exit::Signal;
        loop {
            self.health.beat();
            let next_due =
                self.reporter.queue.next_due().into_iter().chain(self.uring_rescan_at).chain(self.reroot_at).min();
            let sleep = tokio::time::sleep_until(
                next_due.map_or_else(|| tokio::time::Instant::now() + JOURNAL_FLUSH, tokio::time::Instant::from_std),
            );
            // Unbiased: a storm of events must not starve the rehashes that are due, nor the
            // rescan's findings (each branch is taken in a random order when several are ready).
            tokio::select! {
                _ = sigterm.recv() => break,
                _ = sigint.recv() => break,
                message = self.rx.recv() => match message {
                    Some(message) => {
                        self.message(message)?;
                        // What else is queued, up to a bound, in this turn.
                        for _ in 0..MESSAGES_PER_TURN {
                            let Ok(message) = self.rx.try_recv() else { break };
                            self.message(message)?;
                        }
                    }
                    None => return Err(Error::io("reading kernel events", std::io::Error::other("the reader thread ended"))),
                },
                found = self.rescans.recv() => if let Some(found) = found {
                    self.found(found);
                },
                Some(next) = next_container(&mut self.containers) => self.container(next)?,
                Some(set) = next_policy_set(&mut self.policy_sets) => self.policies(&set)?,
                _ = sleep => {
                    self.reporter.process_due(false, &mut self.rescans)?;
                    if self.uring_rescan_at.is_some_and(|at| at <= Instant::now()) {
                        self.uring_rescan_at = None;
                        self.rescans.request(Request::all(RescanReason::IoUring, None));
                    }
                    if self.reroot_at.is_some_and(|at| at <= Instant::now()) {
                        self.reroot_at = None;
                        let due = std::mem::take(&mut self.reroots);
                        self.reporter.reroot(due, &mut self.rescans)?;
                    }
                }
                _ = journal_flush.tick() => self.reporter.state.flush_journal()?,
                _ = self_checks.tick() => self.self_check()?,
                _ = rescans.tick() => self.rescans.request(Request::all(RescanReason::Interval, None)),
                _ = verifies.tick() => {
                    self.rescans.request(Request::all(RescanReason::Verify, Some(VerifyReason::Interval)));
                }
                _ = signature_poll.tick(), if signature_file.is_some() => {
                    if let Some(path) = &signature_file
                        && let Some(signature) = signatures.new_signature(path)
                        && lifecycle::try_attach(self.opts, self.key, signature, self.reporter.printer())?
                    {
                        exit = Exit::NewBaseline;
                        break;
                    }
                }
            }
            if self.reporter.queue.next_due().is_some_and(|due| due <= Instant::now()) {
                self.reporter.process_due(false, &mut self.rescans)?;
            }
            self.finish_rescans()?;
            self.reporter.flush()?;
        }
        self.shutdown().await?;
        Ok(exit)
    }

    /// A new set of workload policies from the Kubernetes API: in force at once for every
    /// running container; each object that cannot be applied said once (a line and a metric).
    fn policies(&mut self, set: &PolicySet) -> Result<()> {
        if let Some(containers) = &mut self.containers {
            containers.set_policies(set.policies.clone(), &mut self.reporter.filter);
            self.metrics.set_watched_inodes(self.reporter.filter.inodes());
        }
        self.metrics.set_policies(set.applied as u64, set.rejected.len() as u64);
        for r in crate::policy_objects::newly_rejected(&self.rejected, &set.rejected) {
            self.metrics.policy_rejected();
            self.reporter.print(Line::PolicyRejected(PolicyRejected {
                policy_kind: r.kind.name().to_owned(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                resource_version: r.resource_version.clone(),
                error: r.error.clone(),
            }))?;
        }
        self.rejected = set.rejected.iter().map(crate::policy_objects::rejection_key).collect();
        if let Some(cluster) = &self.cluster {
            let names: Vec<String> =
                set.rejected.iter().map(|r| format!("{} {}", r.kind.name(), r.qualified_name())).collect();
            cluster.policies(set.applied as u64, &names);
        }
        Ok(())
    }

    /// A container checked or gone.
    fn container(&mut self, next: Next) -> Result<()> {
        let Some(containers) = &mut self.containers else { return Ok(()) };
        match next {
            Next::Checked(checked) => {
                if let Some((id, merged)) = checked.watch {
                    containers.watch_layers(&id, checked.layers, &mut self.reporter.filter);
                    containers.rewatch(&id, merged, &mut self.reporter.filter);
                    self.metrics.set_watched_inodes(self.reporter.filter.inodes());
                }
                for kind in checked.changes {
                    self.metrics.change(kind.name());
                }
                for line in &checked.lines {
                    self.reporter.print_event(line)?;
                }
            }
            Next::Gone(id) => {
                let line = containers.gone(&id, &mut self.reporter.filter);
                self.metrics.set_watched_inodes(self.reporter.filter.inodes());
                if let Some(line) = line {
                    self.reporter.print_event(&line)?;
                }
            }
        }
        Ok(())
    }

    /// An observation or a loss from the reader.
    fn message(&mut self, message: Message) -> Result<()> {
        match message {
            Message::Event(observation) if observation.event.op == kubefim_common::Op::Exec => {
                if let Some(containers) = &mut self.containers {
                    let header = &observation.event.header;
                    let id = observation.actor.container.as_ref().map(|c| c.id.as_str());
                    let at = crate::containers::instant_of(observation.time);
                    let process = &observation.actor.process;
                    if let Some(line) = containers.exec(header.pid, header.cgroup_id, id, at, process) {
                        self.reporter.print_event(&line)?;
                    }
                }
            }
            Message::Event(observation) if self.check.is_canary(&observation.event) => self.check.canary_seen(),
            // A checked container's: compared with its image, not the baseline.
            Message::Event(observation)
                if self.containers.as_mut().is_some_and(|c| c.observe(&observation, &mut self.reporter.filter)) => {}
            Message::Event(observation) => match self.reporter.observe(&observation) {
                Follow::Nothing => {}
                Follow::Rescan(request) => self.rescans.request(request),
                Follow::RescanSoon => {
                    self.uring_rescan_at.get_or_insert_with(|| Instant::now() + URING_RESCAN_DELAY);
                }
                Follow::Reroot(reroot) => {
                    self.reroots.push(reroot);
                    self.reroot_at.get_or_insert_with(|| Instant::now() + REROOT_DELAY);
                }
            },
            Message::Lost { events, by, total } => {
                self.check.events_lost();
                self.metrics.lost(events, by);
                self.reporter.print(Line::Lost(Lost {
                    events,
                    dropped_by: by,
                    total,
                    action: "rescan of every monitored path".into(),
                }))?;
                self.rescans.request(Request::all(RescanReason::LostEvents, None));
            }
        }
        Ok(())
    }

    /// The self-check: the last canary's event, a window of the kernel filter. A failure
    /// makes the agent not ready, says so once a kind of failure (a `degraded` line), puts
    /// the filter back and rescans; a canary seen after that and a clean pass make it ready
    /// again. Then the next canary is written.
    fn self_check(&mut self) -> Result<()> {
        // What the reader already sent first: the canary's event may be queued behind a slow
        // turn of the loop, and a check must not call it missed.
        for _ in 0..QUEUE {
            let Ok(message) = self.rx.try_recv() else { break };
            self.message(message)?;
        }
        match self.check.run(&self.reporter.filter, self.reporter.state.index()) {
            Outcome::Unchanged => {}
            Outcome::Recovered => {
                tracing::info!("the kernel side passes its self-check again: ready");
                self.metrics.set_self_check_ok(true);
                self.health.set_ready(true);
                if let Some(cluster) = &self.cluster {
                    cluster.ready(true, "the kernel side passes its self-check again", self.programs);
                }
            }
            Outcome::Failed(failed) => {
                for check in &failed.checks {
                    self.metrics.self_check_failed(*check);
                }
                self.metrics.set_self_check_ok(false);
                if let Some(cluster) = &self.cluster {
                    cluster.ready(
                        false,
                        "the kernel side failed its self-check; everything is rescanned",
                        self.programs,
                    );
                }
                self.health.set_not_ready(
                    "the kernel side failed its self-check (see the degraded line): its filter is put back and \
                     everything rescanned; ready again once its canary is seen",
                );
                for failure in failed.new {
                    let (reason, message) = match failure.check {
                        Check::Canary => (
                            DegradedReason::CanaryMissed,
                            "the canary's write produced no event: the programs or their filter no longer see \
                             writes; not ready, the filter is put back and everything rescanned",
                        ),
                        Check::Inodes | Check::Names => (
                            DegradedReason::FilterTampered,
                            "entries the watcher put in the in-kernel filter are missing or changed (another \
                             process edited the maps); not ready, they are put back and everything rescanned",
                        ),
                    };
                    self.reporter.print(Line::Degraded(Degraded {
                        reason,
                        message: message.into(),
                        missing: Vec::new(),
                        capacity: None,
                        error: Some(failure.detail),
                    }))?;
                }
                if failed.refill || failed.first {
                    let index = self.reporter.state.index();
                    let ancestors = &self.reporter.ancestors;
                    self.reporter.filter.refill(index, self.roots.iter().map(Vec::as_slice), ancestors);
                    self.check.rewatch_canary(&mut self.reporter.filter);
                    self.metrics.set_watched_inodes(self.reporter.filter.inodes());
                    self.rescans.request(Request::all(RescanReason::SelfCheck, None));
                }
            }
        }
        self.check.write_canary();
        Ok(())
    }

    /// Findings of the rescan thread.
    fn found(&mut self, found: Found) {
        let reporter = &mut self.reporter;
        match found {
            Found::Batch(entries) => self.rescans.batch(&reporter.state, &mut reporter.queue, entries),
            Found::Done { scanned, incomplete } => {
                self.rescans.done(&reporter.state, &mut reporter.queue, scanned, incomplete);
            }
        }
    }

    /// The lines of rescans whose findings are all reported.
    fn finish_rescans(&mut self) -> Result<()> {
        for f in self.rescans.take_finished() {
            let errors = f.unverified.len() as u64;
            let scope = match &f.request.scope {
                crate::rescan::Scope::All => Vec::new(),
                crate::rescan::Scope::Under(roots) => {
                    roots.iter().map(|r| kubefim_baseline::report::display_path(r)).collect()
                }
            };
            self.reporter.print(Line::Rescan(Rescan {
                reason: f.request.reason,
                scope,
                scanned: f.scanned,
                changes: f.changes,
                unverified: f.unverified,
                seconds: f.started.elapsed().as_secs_f64(),
            }))?;
            if let Some(reason) = f.request.verify {
                let verify = self.reporter.verify_line(reason, errors, f.started);
                let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                self.metrics.verified(
                    at.as_secs_f64(),
                    verify.added,
                    verify.removed,
                    verify.modified,
                    verify.errors,
                    f.started.elapsed(),
                );
                self.reporter.print(Line::Verify(verify))?;
            }
            if f.request.reason == RescanReason::Startup {
                // Everything is compared: what the journal still holds from earlier runs
                // matches the signed baseline again.
                self.reporter.state.forget_earlier_runs()?;
            }
            self.reporter.state.flush_journal()?;
            release_freed_memory();
        }
        Ok(())
    }

    /// Reports what is pending before detaching: nothing seen is dropped.
    async fn shutdown(&mut self) -> Result<()> {
        if let Some(reader) = self.reader.take() {
            // The reader drains the ring buffer and delivers it all, then hangs up.
            let stopping = tokio::task::spawn_blocking(move || reader.stop());
            while let Some(message) = self.rx.recv().await {
                self.message(message)?;
            }
            let _ = stopping.await;
        }
        self.reporter.process_due(true, &mut self.rescans)?;
        self.reporter.state.flush_journal()?;
        self.reporter.flush()
    }
}
