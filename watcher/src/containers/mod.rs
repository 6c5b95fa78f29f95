//! Containers checked against their images while watching (`--containers`). They are found
//! at start-up (every process's cgroup) and the moment a new one's first process execs: the
//! kernel sends an exec from any cgroup not yet decided on, this module decides (the host's,
//! a container a workload policy selects, one none selects) and marks the cgroup in the
//! kernel's map, so each cgroup costs one event. A selected container's layer is compared
//! with its image once, on the checker thread (the loop never waits for a scan), and its
//! drift is reported as changes against the image. In a container whose policy asks for
//! drift execution, every exec is sent and what ran is compared with the image's file at its
//! path (`drift-exec`). Its monitored entries (as its processes see them) go into the kernel
//! filter: an event on one is routed here by its device (the container's overlay), and a
//! batch of them, a few milliseconds after the first, has the container compared again and
//! what changed reported with the processes that did it. The monitored files of its image's
//! layers (host directories every container of the image shares) are watched too, once per
//! layer, while a checked container uses it: a change to one is a `layer-modified` line
//! naming each container that uses it. A container is released when the
//! process that revealed it exits (its pidfd becomes readable): its cgroups and inodes leave
//! the kernel's maps and nothing of it stays here.

mod checker;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kubefim_baseline::container::check;
use kubefim_baseline::container::discover::{self, RunningContainer};
use kubefim_baseline::container::layer_cache::LayerCache;
use kubefim_baseline::container::merged::Merged;
use kubefim_baseline::container::overlay::{Layer, OverlayRoot};
use kubefim_baseline::report::EscapedPath;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::workload::WorkloadPolicies;
use kubefim_common::{EVENT_HAS_PARENT, EVENT_HAS_TARGET, InodeKey};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

pub(crate) use self::checker::Checked;
use self::checker::{Checker, ExecJob, Job, LayerJob, Touch, describe};
use crate::filter::KernelFilter;
use crate::model::{Container, ContainerGone, Event, FileOp, FoundBy, Line, PathError, Pod, Process};
use crate::pods::PodIndex;
use crate::programs::Cgroups;
use crate::reader::Observation;

/// How long a container on Kubernetes waits for the pod index to learn its pod's labels (the
/// API server's watch can lag the container's start) before it is selected on its
/// annotations alone, and how often it is looked up meanwhile.
const POD_LABELS_WAIT: Duration = Duration::from_secs(30);
const POD_LABELS_RETRY: Duration = Duration::from_millis(200);

/// How long after the first event on a container's monitored entries it is compared again:
/// the rest of a burst (a write, its close, the rename of an editor's save) is in the same
/// comparison, and the report stays well within 100 ms of the change.
const SETTLE: Duration = Duration::from_millis(20);

/// Containers checked at once on the checker thread, beyond which finds wait their turn.
const CHECKS_QUEUED: usize = 4096;

/// What a container checked for drift execution needs at each exec.
#[derive(Clone)]
struct ExecCheck {
    root: OverlayRoot,
    /// The policies that ask for it.
    policies: Vec<String>,
}

/// A container known here while it runs.
struct Known {
    /// What was found of it: what selection is decided on again when policies change.
    c: RunningContainer,
    /// The policies that select it, each as a digest of its kind, name and text: a policy
    /// changed or added that selects it, or one taken away, changes this.
    selection: Vec<u64>,
    /// Counted up each time its selection changes; a check made for an earlier one is not
    /// watched.
    generation: u64,
    /// Its cgroups (marked in the kernel's map).
    cgroups: Vec<u64>,
    /// Its description in lines; `None` when no policy selects it (nothing is said of it).
    selected: Option<(Container, Option<Pod>)>,
    /// Set when a policy that selects it asks for drift execution.
    exec_check: Option<ExecCheck>,
    /// Its overlay's device (kernel numbering), once its entries were listed.
    dev: Option<u64>,
    /// Its root directory: where its processes' absolute paths start.
    root: Option<InodeKey>,
    /// Its monitored entries in the kernel filter, and their paths inside it.
    watched: HashMap<InodeKey, PathBuf>,
    /// Files created in its watched directories, which the kernel watches from then on,
    /// until its next listing says what they are.
    created: Vec<InodeKey>,
    /// Events on them not compared yet.
    touches: Vec<Touch>,
    /// When they are compared.
    due: Option<Instant>,
    /// A comparison of it is on the checker thread: the next waits for it to end (a storm of
    /// writes costs one comparison at a time, never a queue of them).
    comparing: bool,
    /// The image layers it uses that are watched.
    layers: Vec<LayerId>,
}

/// An image layer that checked containers use, watched for changes on the node.
struct LayerWatch {
    /// Its directory.
    dir: PathBuf,
    /// Its monitored files in the kernel filter, and their paths in the image.
    entries: HashMap<InodeKey, PathBuf>,
    /// Files created in its watched directories on the node, which the kernel watches from
    /// then on.
    created: Vec<InodeKey>,
    /// The checked containers that use it.
    users: Vec<String>,
    /// Events on its files not reported yet.
    touches: Vec<Touch>,
    /// When they are.
    due: Option<Instant>,
}

/// A container of a pod the pod index does not know yet: whether a policy selects it waits
/// for the pod's labels.
struct Unlabeled {
    c: RunningContainer,
    cgroup: Option<u64>,
    found_by: FoundBy,
    exec_at: Option<Instant>,
    since: Instant,
}

/// A layer's identity: the device and inode of its directory.
type LayerId = (u64, u64);

/// The containers of this node, as far as the workload policies care.
pub(crate) struct Containers {
    host: HostRoot,
    proc: PathBuf,
    policies: Arc<WorkloadPolicies>,
    cgroups: Cgroups,
    /// Running containers by id.
    known: HashMap<String, Known>,
    /// Checked containers' ids by their overlay's device.
    by_dev: HashMap<u64, String>,
    /// The image layers checked containers use.
    layers: HashMap<LayerId, LayerWatch>,
    /// Their files' inodes.
    layer_files: HashMap<InodeKey, LayerId>,
    /// The pods of this node, on Kubernetes: their labels are what selectors match.
    pods: Option<PodIndex>,
    /// Containers waiting for their pod's labels.
    unlabeled: Vec<Unlabeled>,
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
    pub fn start(
        policies: WorkloadPolicies,
        host: HostRoot,
        cgroups: Cgroups,
        layer_cache: &Path,
        pods: Option<PodIndex>,
    ) -> std::io::Result<Containers> {
        let policies = Arc::new(policies);
        let (jobs, job_rx) = std::sync::mpsc::sync_channel::<Job>(CHECKS_QUEUED);
        let (checked_tx, checked) = mpsc::unbounded_channel();
        let proc = PathBuf::from("/proc");
        // Without it (another kubefim holds it) the layers are read: slower, never less sure.
        let cache =
            LayerCache::open(layer_cache).inspect_err(|e| tracing::warn!("{e}: image layers are read without it")).ok();
        let mut checker = Checker::new(policies.clone(), proc.clone(), cache);
        std::thread::Builder::new().name("kubefim-containers".into()).spawn(move || {
            for job in job_rx {
                if let Some(checked) = checker.run(job)
                    && checked_tx.send(checked).is_err()
                {
                    return;
                }
            }
        })?;
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        let mut containers = Containers {
            own_mnt_ns: mnt_ns(&proc, "self"),
            host,
            proc,
            policies,
            cgroups,
            known: HashMap::new(),
            by_dev: HashMap::new(),
            layers: HashMap::new(),
            layer_files: HashMap::new(),
            pods,
            unlabeled: Vec::new(),
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
        if self.unlabeled.iter().any(|u| u.c.id == id) {
            // Still waiting for its pod's labels: its cgroup is decided then.
            return None;
        }
        if !self.known.contains_key(id) {
            let c = discover::of_pid(&self.proc, &self.host, pid)?;
            if c.root.is_err() {
                let ns = mnt_ns(&self.proc, &pid.to_string());
                if ns.is_none() || ns == self.own_mnt_ns {
                    // Its runtime's helper, before the container's root is in place, or a
                    // process gone already: its cgroup stays undecided, so the next exec (the
                    // entrypoint's) asks again.
                    return None;
                }
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
                let _ = self.jobs.send(Job::Exec(Box::new(job)));
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
        self.track_labeled(Unlabeled { c, cgroup, found_by, exec_at, since: Instant::now() });
    }

    /// [`Containers::track`], once the labels its selection needs are known: on Kubernetes
    /// its pod's (what the pod index says), waited for a while when the index does not have
    /// the pod yet; elsewhere, its annotations.
    fn track_labeled(&mut self, mut u: Unlabeled) {
        if let Some(pods) = &self.pods
            && let Some(uid) = u.c.pod.as_ref().and_then(|p| p.uid.as_deref())
        {
            match pods.pod_labels(uid) {
                Some(labels) => u.c.labels = labels,
                None if u.since.elapsed() < POD_LABELS_WAIT => {
                    self.unlabeled.push(u);
                    return;
                }
                None => tracing::warn!(
                    container = %u.c.id,
                    pod = uid,
                    "the API server never listed this container's pod: selected on its annotations"
                ),
            }
        }
        let Unlabeled { c, cgroup, found_by, exec_at, .. } = u;
        let pid = i32::try_from(c.pid).ok().and_then(rustix::process::Pid::from_raw);
        let Some(Ok(pidfd)) = pid.map(|pid| rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()))
        else {
            // Gone already: nothing to keep (its cgroup stays undecided; it has no more execs).
            return;
        };
        let (selection, exec_check) = selection(&c, &self.policies);
        let selected = (!selection.is_empty()).then(|| describe(&c));
        if let Some(cgroup) = cgroup {
            mark(&mut self.cgroups, cgroup, exec_check.is_some());
        }
        let known = Known {
            c: c.clone(),
            selection,
            generation: 0,
            cgroups: cgroup.into_iter().collect(),
            selected: selected.clone(),
            exec_check,
            dev: None,
            root: None,
            watched: HashMap::new(),
            created: Vec::new(),
            touches: Vec::new(),
            due: None,
            comparing: false,
            layers: Vec::new(),
        };
        self.known.insert(c.id.clone(), known);
        watch_exit(c.id.clone(), pidfd, self.gone_tx.clone());
        if selected.is_some() {
            // A full queue (thousands of containers started at once) waits here rather
            // than lose a check.
            let _ = self.jobs.send(Job::Check { container: Box::new(c), found_by, exec_at, generation: 0 });
        }
    }

    /// Puts `policies` in force: a running container that a policy now selects, or selects
    /// differently (a policy that selects it was changed), is checked again from the start
    /// (`found_by: policy`); one no policy selects any more is let go of (its entries leave
    /// the kernel filter; it stays known, so a later policy can select it again).
    pub fn set_policies(&mut self, policies: WorkloadPolicies, filter: &mut KernelFilter) {
        self.policies = Arc::new(policies);
        let _ = self.jobs.send(Job::Policies(self.policies.clone()));
        let ids: Vec<String> = self.known.keys().cloned().collect();
        for id in ids {
            let Some(known) = self.known.get(&id) else { continue };
            let (now, exec_check) = selection(&known.c, &self.policies);
            if now == known.selection {
                continue;
            }
            self.unwatch(&id, filter);
            let _ = self.jobs.send(Job::Forget(id.clone()));
            let Some(known) = self.known.get_mut(&id) else { continue };
            known.generation += 1;
            known.selection = now;
            known.comparing = false;
            known.selected = (!known.selection.is_empty()).then(|| describe(&known.c));
            known.exec_check = exec_check;
            for cgroup in &known.cgroups {
                mark(&mut self.cgroups, *cgroup, known.exec_check.is_some());
            }
            if known.selected.is_some() {
                let job = Job::Check {
                    container: Box::new(known.c.clone()),
                    found_by: FoundBy::Policy,
                    exec_at: None,
                    generation: known.generation,
                };
                let _ = self.jobs.send(job);
            }
        }
    }

    /// The next check's lines, or a container gone. Containers with events due are sent
    /// to be compared again meanwhile.
    pub async fn next(&mut self) -> Option<Next> {
        loop {
            let due = self
                .known
                .values()
                .filter(|k| !k.comparing)
                .filter_map(|k| k.due)
                .chain(self.layers.values().filter_map(|l| l.due))
                .min();
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(
                due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            tokio::select! {
                checked = self.checked.recv() => {
                    let mut checked = checked?;
                    if let Some(id) = &checked.rechecked
                        && let Some(known) = self.known.get_mut(id)
                        && known.generation == checked.generation
                    {
                        known.comparing = false;
                    }
                    // Listed under policies no longer in force: its lines were true when
                    // made, its entries are not the ones to watch.
                    if let Some((id, _)) = &checked.watch
                        && self.known.get(id).is_none_or(|k| k.generation != checked.generation)
                    {
                        checked.watch = None;
                        checked.layers.clear();
                    }
                    return Some(Next::Checked(checked));
                }
                gone = self.gone_rx.recv() => return gone.map(Next::Gone),
                _ = sleep, if due.is_some() => self.send_due(),
                _ = tokio::time::sleep(POD_LABELS_RETRY), if !self.unlabeled.is_empty() => {
                    for u in std::mem::take(&mut self.unlabeled) {
                        self.track_labeled(u);
                    }
                }
            }
        }
    }

    /// Has every container whose events are due compared again.
    fn send_due(&mut self) {
        let now = Instant::now();
        for (id, known) in &mut self.known {
            if !known.comparing && known.due.is_some_and(|due| due <= now) {
                known.due = None;
                known.comparing = true;
                let touches = std::mem::take(&mut known.touches);
                // A full queue waits: the comparison must not be lost.
                let _ = self.jobs.send(Job::Recheck { id: id.clone(), touches, generation: known.generation });
            }
        }
        for layer in self.layers.values_mut() {
            if layer.due.is_some_and(|due| due <= now) {
                layer.due = None;
                let users = layer.users.iter().filter_map(|id| self.known.get(id)?.selected.clone()).collect();
                let job = LayerJob { dir: layer.dir.clone(), touches: std::mem::take(&mut layer.touches), users };
                let _ = self.jobs.send(Job::Layer(Box::new(job)));
            }
        }
    }

    /// Takes a kernel event on a file (or directory) of a watched image layer. False when
    /// it is none's.
    fn observe_layer(&mut self, obs: &Observation, filter: &mut KernelFilter) -> bool {
        let header = &obs.event.header;
        let target = (header.flags & EVENT_HAS_TARGET != 0).then_some(header.target);
        let parent = (header.flags & EVENT_HAS_PARENT != 0).then_some(header.parent);
        let dirs = obs.seen.iter().map(|s| s.as_ref().map(|s| s.key));
        let keys = target.into_iter().chain(parent).chain(dirs.clone().flatten());
        let Some(id) = keys.into_iter().find_map(|k| self.layer_files.get(&k)).copied() else { return false };
        let Some(layer) = self.layers.get_mut(&id) else { return false };
        let op = FileOp::of_kernel(obs.event.op);
        let touch = |path: PathBuf, under: bool| Touch { path, under, op, actor: obs.actor.clone(), time: obs.time };
        match (target.and_then(|k| layer.entries.get(&k)), parent.and_then(|k| layer.entries.get(&k))) {
            (Some(path), _) => layer.touches.push(touch(path.clone(), false)),
            (None, Some(dir)) => {
                layer.touches.push(touch(dir.clone(), true));
                if let Some(key) = created_by_kernel(obs, target) {
                    filter.watched_by_kernel();
                    layer.created.push(key);
                }
            }
            (None, None) => {}
        }
        // A path event (the host's: resolved by the reader in the actor's root): the
        // directory each path is in, and the name it gave.
        for (dir, path) in dirs.zip(&obs.event.paths) {
            if let Some(dir) = dir.and_then(|k| layer.entries.get(&k)) {
                let name = path.rsplit(|&b| b == b'/').find(|n| !n.is_empty()).unwrap_or_default();
                layer.touches.push(touch(dir.join(OsStr::from_bytes(name)), false));
            }
        }
        layer.due.get_or_insert_with(|| Instant::now() + SETTLE);
        true
    }

    /// Watches the monitored files of the layers a container uses (listed at its first
    /// check under the policies that select it), each file once however many containers
    /// use its layer.
    pub fn watch_layers(&mut self, id: &str, layers: Vec<(Layer, Merged)>, filter: &mut KernelFilter) {
        let Some(known) = self.known.get_mut(id) else { return };
        for (layer, merged) in layers {
            let watch = self.layers.entry(layer.id).or_insert_with(|| LayerWatch {
                dir: layer.dir.clone(),
                entries: HashMap::new(),
                created: Vec::new(),
                users: Vec::new(),
                touches: Vec::new(),
                due: None,
            });
            // Each user's listing is added: containers of one image may be selected by
            // policies that monitor different paths of it.
            for e in merged.entries {
                let key = InodeKey::from_stat(e.dev, e.ino);
                if watch.entries.contains_key(&key) {
                    continue;
                }
                let name = e.path.file_name().map(OsStr::as_bytes).unwrap_or_default();
                filter.watch(key, e.is_dir, name);
                self.layer_files.insert(key, layer.id);
                watch.entries.insert(key, e.path);
            }
            if !watch.users.iter().any(|u| u == id) {
                watch.users.push(id.to_owned());
                known.layers.push(layer.id);
            }
        }
    }

    /// Takes a kernel event that is a checked container's: one on an inode of its overlay
    /// (a file, the directory an entry was made or removed in, where a relative path
    /// started). False when it is none's (the host's reporting has it).
    pub fn observe(&mut self, obs: &Observation, filter: &mut KernelFilter) -> bool {
        if self.observe_layer(obs, filter) {
            return true;
        }
        let header = &obs.event.header;
        let target = (header.flags & EVENT_HAS_TARGET != 0).then_some(header.target);
        let parent = (header.flags & EVENT_HAS_PARENT != 0).then_some(header.parent);
        let starts = header.start.iter().copied().filter(|k| k.dev != 0);
        let Some(id) = target.into_iter().chain(parent).chain(starts).find_map(|k| self.by_dev.get(&k.dev)) else {
            return false;
        };
        let Some(known) = self.known.get_mut(id) else { return false };
        let op = FileOp::of_kernel(obs.event.op);
        let touch = |path: PathBuf, under: bool| Touch { path, under, op, actor: obs.actor.clone(), time: obs.time };
        let mut touches = Vec::new();
        match target.and_then(|k| known.watched.get(&k)) {
            Some(path) => touches.push(touch(path.clone(), false)),
            None => {
                if let Some(dir) = parent.and_then(|k| known.watched.get(&k)) {
                    touches.push(touch(dir.clone(), true));
                    if let Some(key) = created_by_kernel(obs, target) {
                        filter.watched_by_kernel();
                        known.created.push(key);
                    }
                }
            }
        }
        // A path event: each path as the container names it, from where it started (its
        // root, or a watched directory), whether or not its process is still there.
        for (start, path) in header.start.iter().zip(&obs.event.paths) {
            let from = if Some(*start) == known.root {
                Some(Path::new("/"))
            } else {
                known.watched.get(start).map(PathBuf::as_path)
            };
            if let Some(from) = from {
                touches.push(touch(in_container(from, path), false));
            }
        }
        known.touches.extend(touches);
        // Compared even when no watched path was named: it is the container's, something in
        // it changed.
        known.due.get_or_insert_with(|| Instant::now() + SETTLE);
        true
    }

    /// Puts a checked container's monitored entries (listed just now) in the kernel filter,
    /// and takes out those it no longer has.
    pub fn rewatch(&mut self, id: &str, merged: Merged, filter: &mut KernelFilter) {
        let Some(known) = self.known.get_mut(id) else {
            // Gone while it was compared.
            return;
        };
        let dev = InodeKey::from_stat(merged.dev, 0).dev;
        if known.dev.is_none() {
            // Its first listing: what it changed between its first comparison and now (its
            // entrypoint starts writing at once) had no watched inode to be seen on. One more
            // comparison, now that every later change is seen, finds it.
            known.due.get_or_insert_with(Instant::now);
        }
        known.dev = Some(dev);
        known.root = Some(InodeKey::from_stat(merged.dev, merged.root_ino));
        self.by_dev.insert(dev, id.to_owned());
        let mut now = HashMap::with_capacity(merged.entries.len());
        for e in merged.entries {
            let key = InodeKey::from_stat(e.dev, e.ino);
            if !known.watched.contains_key(&key) {
                let name = e.path.file_name().map(OsStr::as_bytes).unwrap_or_default();
                filter.watch(key, e.is_dir, name);
            }
            now.insert(key, e.path);
        }
        for key in known.watched.keys().chain(&known.created) {
            if !now.contains_key(key) {
                filter.unwatch(*key);
            }
        }
        known.created.clear();
        known.watched = now;
    }

    /// Releases a container whose process exited; the line to print when it was checked.
    pub fn gone(&mut self, id: &str, filter: &mut KernelFilter) -> Option<Event> {
        self.unwatch(id, filter);
        let known = self.known.remove(id)?;
        for cgroup in &known.cgroups {
            self.cgroups.forget(*cgroup);
        }
        let _ = self.jobs.send(Job::Forget(id.to_owned()));
        let (container, pod) = known.selected?;
        Some(Event::now(Line::ContainerGone(ContainerGone { container, pod })))
    }

    /// Takes a container's entries, and the layers no other checked container uses, out of
    /// the kernel filter.
    fn unwatch(&mut self, id: &str, filter: &mut KernelFilter) {
        let Some(known) = self.known.get_mut(id) else { return };
        // Its overlay's inode numbers, and in time its device number, are reused.
        for key in known.watched.keys().chain(&known.created) {
            filter.unwatch(*key);
        }
        known.watched.clear();
        known.created.clear();
        known.touches.clear();
        known.due = None;
        known.root = None;
        if let Some(dev) = known.dev.take() {
            self.by_dev.remove(&dev);
        }
        let selected = known.selected.clone();
        for layer in std::mem::take(&mut known.layers) {
            let Some(watch) = self.layers.get_mut(&layer) else { continue };
            watch.users.retain(|u| u != id);
            if watch.users.is_empty() {
                // No checked container uses it: what is pending is said, then it is let go.
                if !watch.touches.is_empty() {
                    let job = LayerJob {
                        dir: watch.dir.clone(),
                        touches: std::mem::take(&mut watch.touches),
                        users: selected.clone().into_iter().collect(),
                    };
                    let _ = self.jobs.send(Job::Layer(Box::new(job)));
                }
                for key in watch.entries.keys() {
                    filter.unwatch(*key);
                    self.layer_files.remove(key);
                }
                for key in &watch.created {
                    filter.unwatch(*key);
                }
                self.layers.remove(&layer);
            }
        }
    }
}

/// What [`Containers::next`] brings.
pub(crate) enum Next {
    Checked(Checked),
    Gone(String),
}

/// Which policies select `c` (a digest of each: a policy changed under the same name is
/// another selection), and what an exec in it is checked with when one of them asks for
/// drift execution; the policies are matched once for both.
fn selection(c: &RunningContainer, policies: &WorkloadPolicies) -> (Vec<u64>, Option<ExecCheck>) {
    use std::hash::{Hash, Hasher};
    let selecting = policies.for_workload(&check::workload(c));
    let digests = selecting
        .iter()
        .map(|p| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (p.kind.name(), p.qualified_name(), p.source()).hash(&mut h);
            h.finish()
        })
        .collect();
    let exec: Vec<String> = selecting.iter().filter(|p| p.drift_exec).map(|p| p.qualified_name()).collect();
    let exec_check = match &c.root {
        Ok(root) if !exec.is_empty() => Some(ExecCheck { root: root.clone(), policies: exec }),
        _ => None,
    };
    (digests, exec_check)
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

/// The inode a file creation in a watched directory made, which the kernel filter watches
/// from then on (as it does for the host's files).
fn created_by_kernel(obs: &Observation, target: Option<InodeKey>) -> Option<InodeKey> {
    (obs.event.op == kubefim_common::Op::Create).then_some(target).flatten()
}

/// `path` (as a syscall got it) resolved lexically from `from`, inside a container: `..`
/// never leaves its root. A symlink on the way is not followed; the comparison that follows
/// reads what is there.
fn in_container(from: &Path, path: &[u8]) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::from("/");
    let start = if path.first() == Some(&b'/') { Path::new("/") } else { from };
    for c in start.components().chain(Path::new(OsStr::from_bytes(path)).components()) {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
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

/// How long an exec's kernel time is from now, as an [`Instant`] (the event's boot-clock
/// time, converted by the reader to wall time).
pub(crate) fn instant_of(time: SystemTime) -> Instant {
    let ago = SystemTime::now().duration_since(time).unwrap_or(Duration::ZERO);
    Instant::now().checked_sub(ago).unwrap_or_else(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_from_where_they_started_and_never_above_the_root() {
        assert_eq!(in_container(Path::new("/srv"), b"/etc/app.conf"), Path::new("/etc/app.conf"));
        assert_eq!(in_container(Path::new("/srv"), b"site/./index.html"), Path::new("/srv/site/index.html"));
        assert_eq!(in_container(Path::new("/srv"), b"../../../etc//x"), Path::new("/etc/x"));
        assert_eq!(in_container(Path::new("/"), b"a/"), Path::new("/a"));
    }
}
