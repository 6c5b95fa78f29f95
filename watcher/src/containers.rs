//! Containers checked against their images while watching (`--containers`). They are found
//! at start-up (every process's cgroup) and the moment a new one's first process execs: the
//! kernel sends an exec from any cgroup not yet decided on, this module decides (the host's,
//! a container a workload policy selects, one none selects) and marks the cgroup in the
//! kernel's map, so each cgroup costs one event. A selected container's layer is compared
//! with its image once, on the checker thread (the loop never waits for a scan), and its
//! drift is reported as changes against the image. In a container whose policy asks for
//! drift execution, every exec is sent and what ran is compared with the image's file at its
//! path (`drift-exec`). A container is released when the process
//! that revealed it exits (its pidfd becomes readable): its cgroups leave the kernel's map
//! and nothing of it stays here.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::container::check;
use kubefim_baseline::container::discover::{self, RunningContainer};
use kubefim_baseline::container::overlay::OverlayRoot;
use kubefim_baseline::report::{EscapedPath, RecordView};
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::verify::ChangeKind;
use kubefim_baseline::workload::WorkloadPolicies;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::model::{
    Attribution, Change, Container, ContainerGone, ContainerWatched, DetectedBy, DriftExec, Event, FoundBy, Line,
    Origin, PathError, Pod, Process, Reference, Unverified, time_string,
};
use crate::programs::Cgroups;

/// Containers checked at once on the checker thread, beyond which finds wait their turn.
const CHECKS_QUEUED: usize = 4096;

/// Work for the checker thread.
enum Job {
    /// A container found: compare its layer with its image.
    Check {
        container: RunningContainer,
        found_by: FoundBy,
        /// When the exec that revealed it happened (`found_by: exec`).
        exec_at: Option<Instant>,
    },
    /// An exec in a container checked for drift execution: is what ran its image's?
    Exec(ExecJob),
}

/// An exec to compare with the image.
struct ExecJob {
    /// What ran (`/proc/PID/exe`, opened when the exec was read).
    exe: std::fs::File,
    /// Where it is in the container.
    path: PathBuf,
    root: OverlayRoot,
    process: Process,
    container: Container,
    pod: Option<Pod>,
    policies: Vec<String>,
}

/// What a container checked for drift execution needs at each exec.
#[derive(Clone)]
struct ExecCheck {
    root: OverlayRoot,
    /// The policies that ask for it.
    policies: Vec<String>,
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
    /// Set when a policy that selects it asks for drift execution.
    exec_check: Option<ExecCheck>,
}

/// The containers of this node, as far as the workload policies care.
pub(crate) struct Containers {
    host: HostRoot,
    proc: PathBuf,
    policies: Arc<WorkloadPolicies>,
    cgroups: Cgroups,
    /// Running containers by id.
    known: HashMap<String, Known>,
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
                let checked = match job {
                    Job::Check { container, found_by, exec_at } => {
                        check_one(&container, found_by, exec_at, &for_checker)
                    }
                    Job::Exec(exec) => check_exec(exec),
                };
                if checked_tx.send(checked).is_err() {
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

    /// An exec the kernel sent: in a cgroup its map does not hold, or in a container checked
    /// for drift execution. `pid` exec'd in `cgroup` at `at`; `container` is its container id,
    /// when its cgroup path names one. A line to print at once, if any (an exec that could
    /// not be checked).
    pub fn exec(
        &mut self,
        pid: u32,
        cgroup: u64,
        container: Option<&str>,
        at: Instant,
        process: &Process,
    ) -> Option<Event> {
        let Some(id) = container else {
            // The host's: nothing to check, ever.
            self.cgroups.know(cgroup);
            return None;
        };
        if !self.known.contains_key(id) {
            let c = discover::of_pid(&self.proc, &self.host, pid)?;
            if c.root.is_err() && mnt_ns(&self.proc, &pid.to_string()) == self.own_mnt_ns {
                // Its runtime's helper, before the container's root is in place: its cgroup
                // stays undecided, so the next exec (the entrypoint's) asks again.
                return None;
            }
            self.track(c, Some(cgroup), FoundBy::Exec, Some(at));
        }
        let known = self.known.get_mut(id)?;
        if !known.cgroups.contains(&cgroup) {
            known.cgroups.push(cgroup);
            mark(&mut self.cgroups, cgroup, known.exec_check.is_some());
        }
        let check = known.exec_check.clone()?;
        let (container, pod) = known.selected.clone()?;
        self.exec_job(pid, check, process, container, pod)
    }

    /// Opens what `pid` executes, now (before it can exit), and has it compared with the
    /// image; a line when that cannot be done.
    fn exec_job(
        &mut self,
        pid: u32,
        check: ExecCheck,
        process: &Process,
        container: Container,
        pod: Option<Pod>,
    ) -> Option<Event> {
        let link = self.proc.join(pid.to_string()).join("exe");
        let opened = std::fs::File::open(&link).and_then(|exe| Ok((exe, std::fs::read_link(&link)?)));
        match opened {
            Ok((exe, path)) => {
                let job = ExecJob {
                    exe,
                    path,
                    root: check.root,
                    process: process.clone(),
                    container,
                    pod,
                    policies: check.policies,
                };
                let _ = self.jobs.send(Job::Exec(job));
                None
            }
            Err(e) => Some(Event::now(Line::Error(PathError {
                path: EscapedPath::of_path(&link),
                error: format!(
                    "process {pid} of container {} exec'd, but what it runs could not be read ({e}): not compared with \
                     its image",
                    container.id
                ),
            }))),
        }
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
        let exec_check = selected.as_ref().and_then(|_| {
            let w = check::workload(&c);
            let policies: Vec<String> =
                self.policies.for_workload(&w).iter().filter(|p| p.drift_exec).map(|p| p.qualified_name()).collect();
            let root = c.root.as_ref().ok()?.clone();
            (!policies.is_empty()).then_some(ExecCheck { root, policies })
        });
        if let Some(cgroup) = cgroup {
            mark(&mut self.cgroups, cgroup, exec_check.is_some());
        }
        let known = Known { cgroups: cgroup.into_iter().collect(), selected: selected.clone(), exec_check };
        self.known.insert(c.id.clone(), known);
        watch_exit(c.id.clone(), pidfd, self.gone_tx.clone());
        if selected.is_some() {
            // A full queue (thousands of containers started at once) waits here rather
            // than lose a check.
            let _ = self.jobs.send(Job::Check { container: c, found_by, exec_at });
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

/// Marks a cgroup decided on in the kernel's map: every exec sent when its container is
/// checked for drift execution, none otherwise.
fn mark(cgroups: &mut Cgroups, cgroup: u64, execs: bool) {
    if execs {
        cgroups.send_execs(cgroup);
    } else {
        cgroups.know(cgroup);
    }
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
fn check_one(
    c: &RunningContainer,
    found_by: FoundBy,
    exec_at: Option<Instant>,
    policies: &WorkloadPolicies,
) -> Checked {
    let (container, pod) = describe(c);
    let origin = if pod.is_some() { Origin::Pod } else { Origin::Container };
    let time = time_string(SystemTime::now());
    let mut lines = Vec::new();
    let mut kinds = Vec::new();
    let mut watched = ContainerWatched {
        container: container.clone(),
        pod: pod.clone(),
        policies: Vec::new(),
        found_by,
        seconds_since_exec: None,
        scanned: 0,
        changes: 0,
        errors: Vec::new(),
        unverified: Vec::new(),
    };
    for one in check::check(c, policies) {
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
    watched.seconds_since_exec = exec_at.map(|at| at.elapsed().as_secs_f64());
    lines.push(Event::now(Line::ContainerWatched(watched)));
    Checked { lines, changes: kinds }
}

/// Compares what an exec ran with the image: a `drift-exec` line when it is not the image's,
/// an `error` line when that could not be told, nothing when it is the image's.
fn check_exec(mut job: ExecJob) -> Checked {
    let line = match check::exec_drift(&job.root, &mut job.exe, &job.path) {
        Ok(None) => None,
        Ok(Some(drift)) => Some(Line::DriftExec(DriftExec {
            path: EscapedPath::of_path(&job.path),
            hash: drift.hash,
            image_hash: drift.image_hash,
            process: job.process,
            origin: if job.pod.is_some() { Origin::Pod } else { Origin::Container },
            container: job.container,
            pod: job.pod,
            policies: job.policies,
        })),
        Err(e) => Some(Line::Error(PathError {
            path: EscapedPath::of_path(&job.path),
            error: format!("executed in container {}, but could not be compared with its image: {e}", job.container.id),
        })),
    };
    Checked { lines: line.map(Event::now).into_iter().collect(), changes: Vec::new() }
}

/// How long an exec's kernel time is from now, as an [`Instant`] (the event's boot-clock
/// time, converted by the reader to wall time).
pub(crate) fn instant_of(time: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(time).unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}
