//! The containers' checker thread: every comparison of a container with its image runs here,
//! so the watch loop never waits for one. A container found is compared whole (its drift
//! before kubefim saw it, `detected_by: rescan`); each batch of kernel events on its monitored
//! entries compares it again and reports what differs from what was last reported, with the
//! processes whose events touched that path (`detected_by: event`). Each comparison also
//! lists the container's monitored entries again, for the kernel filter (and, at its first
//! check, those of each of its image's layers). An exec in a container checked for drift
//! execution is compared with the image's file here too, and a layer file changed on the
//! node is hashed here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use kubefim_baseline::container::check;
use kubefim_baseline::container::discover::RunningContainer;
use kubefim_baseline::container::layer_cache::LayerCache;
use kubefim_baseline::container::merged::{self, Merged};
use kubefim_baseline::container::overlay::{Layer, OverlayRoot};
use kubefim_baseline::report::{EscapedPath, RecordView};
use kubefim_baseline::verify::ChangeKind;
use kubefim_baseline::workload::WorkloadPolicies;

use crate::actor::Actor;
use crate::model::{
    Attribution, Change, Container, ContainerWatched, DetectedBy, DriftExec, Event, FileOp, FoundBy, LayerModified,
    Line, Origin, PathError, Pod, Process, Reference, Unverified, Writer, time_string,
};

/// Monitored entries of one container the kernel filter watches at most; beyond, its changes
/// are found by the comparisons its other events cause (and at its start).
const WATCHED_PER_CONTAINER: usize = 1 << 16;

/// How much later than the last event naming it a file's ctime may be and still be that
/// event's change (the kernel's clocks for the two differ by a tick at most).
const LATER_SLACK_NS: i128 = 5_000_000;

/// Work for the checker thread.
pub(super) enum Job {
    /// A container found: compare its layer with its image.
    Check {
        container: Box<RunningContainer>,
        found_by: FoundBy,
        /// When the exec that revealed it happened (`found_by: exec`).
        exec_at: Option<Instant>,
        /// Which selection of it this check is for (see [`Checked::generation`]).
        generation: u64,
    },
    /// Kernel events on a checked container's monitored entries: compare it again.
    Recheck { id: String, touches: Vec<Touch>, generation: u64 },
    /// The workload policies changed: later jobs are done under these.
    Policies(Arc<WorkloadPolicies>),
    /// An exec in a container checked for drift execution: is what ran its image's?
    Exec(Box<ExecJob>),
    /// A container is gone: forget what was reported of it.
    Forget(String),
    /// Kernel events on files of an image layer in use: say what each is now.
    Layer(Box<LayerJob>),
}

/// Files of a layer that were changed on the node.
pub(super) struct LayerJob {
    /// The layer's directory.
    pub dir: PathBuf,
    pub touches: Vec<Touch>,
    /// The checked containers that use it.
    pub users: Vec<(Container, Option<Pod>)>,
}

/// A kernel event on a container's monitored entry, as its comparison needs it.
#[derive(Debug, Clone)]
pub(super) struct Touch {
    /// The path inside the container the event named.
    pub path: PathBuf,
    /// Something was created in this directory, under a name the event does not carry.
    pub under: bool,
    /// What was done, when it is a change of its own.
    pub op: Option<FileOp>,
    /// Who.
    pub actor: Arc<Actor>,
    /// When.
    pub time: SystemTime,
}

impl Touch {
    /// Whether this event may have made the change at `path`.
    fn names(&self, path: &Path) -> bool {
        // Opens and closes change nothing by themselves: they ask for a comparison, and name
        // no one.
        let Some(op) = self.op else { return false };
        // A directory removed or renamed names what was below it too.
        let whole_tree = matches!(op, FileOp::Rename | FileOp::Rmdir | FileOp::Unlink);
        // An entry made or removed changes its directory (its mtime).
        let entry =
            whole_tree || matches!(op, FileOp::Create | FileOp::Mkdir | FileOp::Mknod | FileOp::Link | FileOp::Symlink);
        self.path == path
            || (self.under && path.parent() == Some(&self.path))
            || (whole_tree && path.starts_with(&self.path))
            || (entry && self.path.parent() == Some(path))
    }
}

/// An exec to compare with the image.
pub(super) struct ExecJob {
    /// What ran (`/proc/PID/exe`, opened when the exec was read).
    pub exe: std::fs::File,
    /// Where it is in the container.
    pub path: PathBuf,
    pub root: OverlayRoot,
    pub process: Process,
    pub container: Container,
    pub pod: Option<Pod>,
    pub policies: Vec<String>,
}

/// What a job produced: the lines to print, in order, and the container's monitored entries
/// for the kernel filter.
#[derive(Default)]
pub(crate) struct Checked {
    pub lines: Vec<Event>,
    /// Changes among `lines`.
    pub changes: Vec<ChangeKind>,
    /// The container (id) and its monitored entries now, when they were listed.
    pub watch: Option<(String, Merged)>,
    /// At a container's first check: its image's layers and their monitored entries.
    pub layers: Vec<(Layer, Merged)>,
    /// The container compared again, for a [`Job::Recheck`] (done, whatever it found).
    pub rechecked: Option<String>,
    /// The selection of the container the job was for: once policies change, a container's
    /// selection is counted up, and what a job for an earlier one listed is not watched.
    pub generation: u64,
}

/// A container compared here, and what was last reported of it.
struct Tracked {
    container: RunningContainer,
    /// Each change reported, by policy and path: what it said (a change that says the same
    /// again is not reported again).
    reported: HashMap<(String, PathBuf), String>,
}

/// The checker thread's state.
pub(super) struct Checker {
    policies: Arc<WorkloadPolicies>,
    proc: PathBuf,
    tracked: HashMap<String, Tracked>,
    /// The image layers' records, shared by every container and kept across restarts.
    cache: Option<LayerCache>,
}

impl Checker {
    pub fn new(policies: Arc<WorkloadPolicies>, proc: PathBuf, cache: Option<LayerCache>) -> Checker {
        Checker { policies, proc, tracked: HashMap::new(), cache }
    }

    /// Does one job.
    pub fn run(&mut self, job: Job) -> Option<Checked> {
        match job {
            Job::Check { container, found_by, exec_at, generation } => {
                Some(Checked { generation, ..self.check(*container, found_by, exec_at) })
            }
            Job::Recheck { id, touches, generation } => {
                self.recheck(&id, &touches).map(|checked| Checked { generation, ..checked })
            }
            Job::Policies(policies) => {
                self.policies = policies;
                None
            }
            Job::Exec(exec) => Some(check_exec(*exec)),
            Job::Layer(job) => Some(check_layer(*job)),
            Job::Forget(id) => {
                self.tracked.remove(&id);
                None
            }
        }
    }

    /// Compares a container found with its image: its changes as lines, then the line that
    /// says it is watched.
    fn check(&mut self, c: RunningContainer, found_by: FoundBy, exec_at: Option<Instant>) -> Checked {
        let (container, pod) = describe(&c);
        let mut watched = ContainerWatched {
            container,
            pod,
            policies: Vec::new(),
            found_by,
            seconds_since_exec: None,
            scanned: 0,
            changes: 0,
            watched: 0,
            image_records_cached: 0,
            image_records_read: 0,
            errors: Vec::new(),
            unverified: Vec::new(),
        };
        let mut tracked = Tracked { container: c, reported: HashMap::new() };
        let counts = |cache: Option<&LayerCache>| cache.map_or((0, 0), |c| (c.hits(), c.misses()));
        let before = counts(self.cache.as_ref());
        let mut checked = compare(&mut tracked, &self.policies, self.cache.as_ref(), &[], Some(&mut watched));
        let after = counts(self.cache.as_ref());
        (watched.image_records_cached, watched.image_records_read) = (after.0 - before.0, after.1 - before.1);
        let watch = self.list(&tracked.container);
        match &watch {
            Ok(m) => {
                watched.watched = m.entries.len() as u64;
                if m.cut {
                    watched.errors.push(format!(
                        "more than {WATCHED_PER_CONTAINER} monitored entries: the kernel watches the first, the rest \
                         are compared when the others change"
                    ));
                }
            }
            Err(e) => watched.errors.push(format!(
                "its monitored entries could not be listed ({e}): changes are found when it starts, not as they \
                 happen"
            )),
        }
        watched.changes = checked.changes.len() as u64;
        watched.seconds_since_exec = exec_at.map(|at| at.elapsed().as_secs_f64());
        checked.lines.push(Event::now(Line::ContainerWatched(watched)));
        checked.watch = watch.ok().map(|m| (tracked.container.id.clone(), m));
        checked.layers = self.list_layers(&tracked.container);
        self.tracked.insert(tracked.container.id.clone(), tracked);
        checked
    }

    /// Compares a container again after kernel events on it: what differs from what was
    /// reported, attributed to the events' processes.
    fn recheck(&mut self, id: &str, touches: &[Touch]) -> Option<Checked> {
        let Some(mut tracked) = self.tracked.remove(id) else {
            // Gone meanwhile; the loop still learns the comparison is over.
            return Some(Checked { rechecked: Some(id.to_owned()), ..Checked::default() });
        };
        let mut checked = compare(&mut tracked, &self.policies, self.cache.as_ref(), touches, None);
        checked.rechecked = Some(id.to_owned());
        checked.watch = self.list(&tracked.container).ok().map(|m| (id.to_owned(), m));
        self.tracked.insert(id.to_owned(), tracked);
        Some(checked)
    }

    /// The monitored entries of each of the container's image layers (a layer that cannot be
    /// listed is left out: its files are still compared when the container's are).
    fn list_layers(&self, c: &RunningContainer) -> Vec<(Layer, Merged)> {
        let Ok(root) = &c.root else { return Vec::new() };
        let w = check::workload(c);
        let policies = self.policies.for_workload(&w);
        root.lower
            .iter()
            .filter_map(|layer| {
                match merged::monitored(&layer.dir, policies.iter().map(|p| &p.policy), WATCHED_PER_CONTAINER) {
                    Ok(m) => Some((layer.clone(), m)),
                    Err(e) => {
                        tracing::warn!(layer = %layer.dir.display(), "cannot list the layer's monitored files: {e}");
                        None
                    }
                }
            })
            .collect()
    }

    /// The container's monitored entries as its processes see them.
    fn list(&self, c: &RunningContainer) -> std::io::Result<Merged> {
        let w = check::workload(c);
        let policies = self.policies.for_workload(&w);
        let root = self.proc.join(c.pid.to_string()).join("root");
        merged::monitored(&root, policies.iter().map(|p| &p.policy), WATCHED_PER_CONTAINER)
    }
}

/// Compares `tracked` with its image under every policy that selects it; the changes not
/// reported yet in the state they are in now become lines (all of them, found by a rescan,
/// when `touches` is empty). `watched`, for a first check, gathers the counts.
fn compare(
    tracked: &mut Tracked,
    policies: &WorkloadPolicies,
    cache: Option<&LayerCache>,
    touches: &[Touch],
    mut watched: Option<&mut ContainerWatched>,
) -> Checked {
    let (container, pod) = describe(&tracked.container);
    let own_origin = if pod.is_some() { Origin::Pod } else { Origin::Container };
    let mut lines = Vec::new();
    let mut kinds = Vec::new();
    let mut reported = HashMap::new();
    for one in check::check(&tracked.container, policies, cache) {
        let name = one.policy.qualified_name();
        let report = match one.report {
            Ok(report) => report,
            Err(e) => {
                if let Some(w) = watched.as_deref_mut() {
                    w.policies.push(name.clone());
                    w.errors.push(format!("{name}: {e}"));
                }
                // Cannot tell: keep what was said, so nothing is reported again as new.
                reported.extend(
                    tracked.reported.iter().filter(|((p, _), _)| *p == name).map(|(k, v)| (k.clone(), v.clone())),
                );
                continue;
            }
        };
        if let Some(w) = watched.as_deref_mut() {
            w.policies.push(name.clone());
            w.scanned += report.scanned;
            w.unverified.extend(report.errors.iter().map(|e| Unverified {
                path: kubefim_baseline::report::display_path(&e.path),
                error: e.message.clone(),
            }));
        }
        let policy = &one.policy.policy;
        for change in report.changes {
            let said = format!("{:?} {:?} {:?}", change.kind, change.changed, change.new);
            let key = (name.clone(), change.path.clone());
            let new = tracked.reported.get(&key) != Some(&said);
            reported.insert(key, said);
            if !new {
                continue;
            }
            let by: Vec<&Touch> = touches.iter().filter(|t| t.names(&change.path)).collect();
            let writers = writers(&by);
            // Changed again after the last event this comparison was for (by a process whose
            // event is in the next batch): what was read is not only these processes' doing.
            let latest = by.iter().map(|t| t.time).max().and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
            let changed_later = match (&change.new, latest) {
                (Some(r), Some(t)) => i128::from(r.ctime_ns) > t.as_nanos() as i128 + LATER_SLACK_NS,
                _ => false,
            };
            let process = by.last().map(|t| t.actor.process.clone());
            let time = by.last().map_or_else(|| time_string(SystemTime::now()), |t| time_string(t.time));
            kinds.push(change.kind);
            let line = Change {
                path: EscapedPath::of_path(&change.path),
                to: None,
                changed: change.changed,
                ops: ops_of(&writers),
                old: change.old.as_ref().map(|r| RecordView::new(r, policy)),
                new: change.new.as_ref().map(|r| RecordView::new(r, policy)),
                diff: change.diff,
                changed_ranges: change.changed_ranges,
                baseline_match: false,
                origin: Some(by.last().map_or(own_origin, |t| t.actor.origin())),
                process,
                container: Some(container.clone()),
                pod: pod.clone(),
                attribution: match (writers.is_empty(), changed_later) {
                    (true, _) => Attribution::None,
                    (false, true) => Attribution::Inferred,
                    (false, false) => Attribution::Exact,
                },
                processes: writers,
                detected_by: if touches.is_empty() { DetectedBy::Rescan } else { DetectedBy::Event },
                baseline: Reference::Image,
                policy: Some(name.clone()),
                already_known: false,
            };
            let line = match change.kind {
                ChangeKind::Added => Line::Added(line),
                ChangeKind::Modified => Line::Modified(line),
                ChangeKind::Removed | ChangeKind::Hidden => Line::Removed(line),
            };
            lines.push(Event { time, line });
        }
    }
    tracked.reported = reported;
    Checked { lines, changes: kinds, ..Checked::default() }
}

/// The processes of `touches`, each once, in the order first seen, with their ops.
fn writers(touches: &[&Touch]) -> Vec<Writer> {
    let mut writers: Vec<Writer> = Vec::new();
    for t in touches {
        let at = writers.iter().position(|w| w.process.pid == t.actor.process.pid);
        let w = match at {
            Some(i) => &mut writers[i],
            None => {
                writers.push(t.actor.writer(Vec::new()));
                writers.last_mut().expect("just pushed")
            }
        };
        if let Some(op) = t.op
            && !w.ops.contains(&op)
        {
            w.ops.push(op);
        }
    }
    writers
}

/// Every op of `writers`, in the order first seen (a change's `ops`).
fn ops_of(writers: &[Writer]) -> Vec<FileOp> {
    let mut ops = Vec::new();
    for op in writers.iter().flat_map(|w| w.ops.iter().copied()) {
        if !ops.contains(&op) {
            ops.push(op);
        }
    }
    ops
}

/// How lines name `c` and its pod.
pub(super) fn describe(c: &RunningContainer) -> (Container, Option<Pod>) {
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
    Checked { lines: line.map(Event::now).into_iter().collect(), ..Checked::default() }
}

/// A `layer-modified` line for each file of the layer an event changed: what it is now, who
/// changed it, the containers that use it.
fn check_layer(job: LayerJob) -> Checked {
    let mut paths: Vec<&Path> = job.touches.iter().filter(|t| t.op.is_some()).map(|t| t.path.as_path()).collect();
    paths.sort();
    paths.dedup();
    let (containers, pods): (Vec<Container>, Vec<Option<Pod>>) = job.users.iter().cloned().unzip();
    let lines = paths
        .into_iter()
        .map(|path| {
            let by: Vec<&Touch> = job.touches.iter().filter(|t| t.names(path)).collect();
            let processes = writers(&by);
            let time = by.last().map_or_else(|| time_string(SystemTime::now()), |t| time_string(t.time));
            let line = LayerModified {
                layer: job.dir.display().to_string(),
                path: EscapedPath::of_path(path),
                ops: ops_of(&processes),
                hash: None,
                error: None,
                process: by.last().map(|t| t.actor.process.clone()),
                processes,
                containers: containers.clone(),
                pods: pods.iter().flatten().cloned().collect(),
            };
            let mut line = line;
            match layer_file_hash(&job.dir, path) {
                Ok(hash) => line.hash = hash,
                Err(e) => line.error = Some(e.to_string()),
            }
            Event { time, line: Line::LayerModified(line) }
        })
        .collect();
    Checked { lines, ..Checked::default() }
}

/// BLAKE3 of the regular file at `path` (inside the image) in the layer `dir`, resolved
/// without following a symlink; `None` when nothing, or no regular file, is there.
fn layer_file_hash(dir: &Path, path: &Path) -> std::io::Result<Option<String>> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let rel = path.strip_prefix("/").unwrap_or(path);
    let root = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS;
    let fd = match rustix::fs::openat2(&root, rel, flags, Mode::empty(), resolve) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Ok(None);
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(&file)?;
    Ok(Some(hasher.finalize().to_hex().to_string()))
}
