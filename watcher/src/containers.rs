//! Containers checked against their images while watching (`--containers`). They are found
//! at start-up (every process's cgroup) and the moment a new one's first process execs: the
//! kernel sends an exec from any cgroup not yet decided on, this module decides (the host's,
//! a container a workload policy selects, one none selects) and marks the cgroup in the
//! kernel's map, so each cgroup costs one event. A selected container's layer is compared
//! with its image once, on the checker thread (the loop never waits for a scan), and its
//! drift is reported as changes against the image. A container is released when the process
//! that revealed it exits (its pidfd becomes readable): its cgroups leave the kernel's map
//! and nothing of it stays here.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::container::check;
use kubefim_baseline::container::discover::{self, RunningContainer};
use kubefim_baseline::report::{EscapedPath, RecordView};
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::verify::ChangeKind;
use kubefim_baseline::workload::WorkloadPolicies;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::model::{
    Attribution, Change, Container, ContainerGone, ContainerWatched, DetectedBy, Event, FoundBy, Line, Origin, Pod,
    Reference, Unverified, time_string,
};
use crate::programs::Cgroups;

/// Containers checked at once on the checker thread, beyond which finds wait their turn.
const CHECKS_QUEUED: usize = 4096;

/// One container found, for the checker thread.
struct Job {
    container: RunningContainer,
    found_by: FoundBy,
    /// When the exec that revealed it happened (`found_by: exec`).
    exec_at: Option<Instant>,
}

/// What a check produced: the lines to print, in order (the changes, then the
/// `container-watched` line).
pub(crate) struct Checked {
    pub lines: Vec<Event>,
    /// Changes among `lines`.
    pub changes: Vec<ChangeKind>,
}

/// A container known here while it runs.
struct Known {
    /// Its cgroups (marked in the kernel's map).
    cgroups: Vec<u64>,
    /// Its description in lines; `None` when no policy selects it (nothing is said of it).
    selected: Option<(Container, Option<Pod>)>,
}

/// The containers of this node, as far as the workload policies care.
pub(crate) struct Containers {
    host: HostRoot,
    proc: PathBuf,
    policies: Arc<WorkloadPolicies>,
    cgroups: Cgroups,
    /// Running containers by id.
    known: HashMap<String, Known>,
    /// Cgroups whose container is not running yet (its root not mounted when its first
    /// process exec'd): asked about again at its next exec.
    waiting: HashSet<u64>,
    /// This process's mount namespace: a process still in it is not in its container yet.
    own_mnt_ns: Option<u64>,
    jobs: std::sync::mpsc::SyncSender<Job>,
    checked: mpsc::UnboundedReceiver<Checked>,
    gone_tx: mpsc::UnboundedSender<String>,
    gone_rx: mpsc::UnboundedReceiver<String>,
}

impl Containers {
    /// Starts the checker thread and checks every container running now. Must run inside
    /// the watcher's tokio runtime (exits are awaited there).
    pub fn start(policies: WorkloadPolicies, host: HostRoot, cgroups: Cgroups) -> std::io::Result<Containers> {
        let policies = Arc::new(policies);
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(CHECKS_QUEUED);
        let (checked_tx, checked) = mpsc::unbounded_channel();
        let for_checker = policies.clone();
        std::thread::Builder::new().name("kubefim-containers".into()).spawn(move || {
            for job in job_rx {
                if checked_tx.send(check_one(&job, &for_checker)).is_err() {
                    return;
                }
            }
        })?;
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let proc = PathBuf::from("/proc");
        let mut containers = Containers {
            own_mnt_ns: mnt_ns(&proc, "self"),
            host,
            proc,
            policies,
            cgroups,
            known: HashMap::new(),
            waiting: HashSet::new(),
            jobs,
            checked,
            gone_tx,
            gone_rx,
        };
        for c in discover::running(&containers.proc, &containers.host) {
            let cgroup = cgroup_id(&containers.proc, c.pid);
            containers.track(c, cgroup, FoundBy::Startup, None);
        }
        Ok(containers)
    }

    /// An exec in a cgroup the kernel's map does not hold: `pid` exec'd in `cgroup` at
    /// `at`; `container` is its container id, when its cgroup path names one.
    pub fn exec(&mut self, pid: u32, cgroup: u64, container: Option<&str>, at: Instant) {
        let Some(id) = container else {
            // The host's: nothing to check, ever.
            self.cgroups.know(cgroup);
            return;
        };
        if let Some(known) = self.known.get_mut(id) {
            if !known.cgroups.contains(&cgroup) {
                known.cgroups.push(cgroup);
            }
            self.cgroups.know(cgroup);
            return;
        }
        let Some(c) = discover::of_pid(&self.proc, &self.host, pid) else { return };
        if c.root.is_err() && mnt_ns(&self.proc, &pid.to_string()) == self.own_mnt_ns {
            // Its runtime's helper, before the container's root is in place: the next exec
            // (the entrypoint's) tells.
            self.waiting.insert(cgroup);
            return;
        }
        self.waiting.remove(&cgroup);
        self.track(c, Some(cgroup), FoundBy::Exec, Some(at));
    }

    /// Keeps `c` while its process runs and, when a policy selects it, has it checked.
    fn track(&mut self, c: RunningContainer, cgroup: Option<u64>, found_by: FoundBy, exec_at: Option<Instant>) {
        let pid = i32::try_from(c.pid).ok().and_then(rustix::process::Pid::from_raw);
        let Some(Ok(pidfd)) = pid.map(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()))
        else {
            // Gone already: nothing to keep (its cgroup stays undecided; it has no more execs).
            return;
        };
        let selected = check::selected(&c, &self.policies).then(|| describe(&c));
        if let Some(cgroup) = cgroup {
            self.cgroups.know(cgroup);
        }
        self.known.insert(c.id.clone(), Known { cgroups: cgroup.into_iter().collect(), selected: selected.clone() });
        watch_exit(c.id.clone(), pidfd, self.gone_tx.clone());
        if selected.is_some() {
            // A full queue (thousands of containers started at once) waits here rather
            // than lose a check.
            let _ = self.jobs.send(Job { container: c, found_by, exec_at });
        }
    }

    /// The next check's lines, or a container gone.
    pub async fn next(&mut self) -> Option<Next> {
        tokio::select! {
            checked = self.checked.recv() => checked.map(Next::Checked),
            gone = self.gone_rx.recv() => gone.map(Next::Gone),
        }
    }

    /// Releases a container whose process exited; the line to print when it was checked.
    pub fn gone(&mut self, id: &str) -> Option<Event> {
        let known = self.known.remove(id)?;
        for cgroup in &known.cgroups {
            self.cgroups.forget(*cgroup);
            self.waiting.remove(cgroup);
        }
        let (container, pod) = known.selected?;
        Some(Event::now(Line::ContainerGone(ContainerGone { container, pod })))
    }
}

/// What [`Containers::next`] brings.
pub(crate) enum Next {
    Checked(Checked),
    Gone(String),
}

/// Waits, on the runtime, for the process behind `pidfd` to exit, then says so.
fn watch_exit(id: String, pidfd: OwnedFd, gone: mpsc::UnboundedSender<String>) {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same descriptor until
    // both are dropped together.
    let Ok(fd) = (unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }) else {
        // Not pollable (cannot happen for a pidfd): released now rather than kept forever.
        let _ = gone.send(id);
        return;
    };
    tokio::spawn(async move {
        let _ = fd.readable().await;
        let _ = gone.send(id);
    });
}

/// A process's mount namespace (the inode of `/proc/PID/ns/mnt`).
fn mnt_ns(proc: &Path, pid: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(proc.join(pid).join("ns/mnt")).ok().map(|m| m.ino())
}

/// The cgroup v2 id of process `pid` (the inode of its cgroup's directory), when readable.
fn cgroup_id(proc: &Path, pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let text = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    std::fs::metadata(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))).ok().map(|m| m.ino())
}

/// How lines name `c` and its pod.
fn describe(c: &RunningContainer) -> (Container, Option<Pod>) {
    let container = Container {
        id: c.id.clone(),
        runtime: c.runtime,
        cgroup: None,
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
    };
    let pod = c.pod.as_ref().map(|p| Pod {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        uid: p.uid.clone().unwrap_or_default(),
        container: c.name.clone(),
        image: c.image.clone(),
    });
    (container, pod)
}

/// Checks one container under every policy that selects it: its changes against the image
/// as lines, then the line that says it is watched.
fn check_one(job: &Job, policies: &WorkloadPolicies) -> Checked {
    let (container, pod) = describe(&job.container);
    let origin = if pod.is_some() { Origin::Pod } else { Origin::Container };
    let time = time_string(SystemTime::now());
    let mut lines = Vec::new();
    let mut kinds = Vec::new();
    let mut watched = ContainerWatched {
        container: container.clone(),
        pod: pod.clone(),
        policies: Vec::new(),
        found_by: job.found_by,
        seconds_since_exec: None,
        scanned: 0,
        changes: 0,
        errors: Vec::new(),
        unverified: Vec::new(),
    };
    for one in check::check(&job.container, policies) {
        let name = one.policy.qualified_name();
        watched.policies.push(name.clone());
        let report = match one.report {
            Ok(report) => report,
            Err(e) => {
                watched.errors.push(format!("{name}: {e}"));
                continue;
            }
        };
        watched.scanned += report.scanned;
        for e in report.errors {
            watched
                .unverified
                .push(Unverified { path: kubefim_baseline::report::display_path(&e.path), error: e.message });
        }
        let policy = &one.policy.policy;
        for change in report.changes {
            kinds.push(change.kind);
            let line = Change {
                path: EscapedPath::of_path(&change.path),
                to: None,
                changed: change.changed,
                ops: Vec::new(),
                old: change.old.as_ref().map(|r| RecordView::new(r, policy)),
                new: change.new.as_ref().map(|r| RecordView::new(r, policy)),
                diff: change.diff,
                changed_ranges: change.changed_ranges,
                baseline_match: false,
                process: None,
                container: Some(container.clone()),
                pod: pod.clone(),
                origin: Some(origin),
                processes: Vec::new(),
                attribution: Attribution::None,
                detected_by: DetectedBy::Rescan,
                baseline: Reference::Image,
                policy: Some(name.clone()),
                already_known: false,
            };
            let line = match change.kind {
                ChangeKind::Added => Line::Added(line),
                ChangeKind::Modified => Line::Modified(line),
                ChangeKind::Removed | ChangeKind::Hidden => Line::Removed(line),
            };
            lines.push(Event { time: time.clone(), line });
        }
    }
    watched.changes = kinds.len() as u64;
    watched.seconds_since_exec = job.exec_at.map(|at| at.elapsed().as_secs_f64());
    lines.push(Event::now(Line::ContainerWatched(watched)));
    Checked { lines, changes: kinds }
}

/// How long an exec's kernel time is from now, as an [`Instant`] (the event's boot-clock
/// time, converted by the reader to wall time).
pub(crate) fn instant_of(time: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(time).unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}
