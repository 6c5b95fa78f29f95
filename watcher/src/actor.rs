//! Who made a change: the process (from the event: pid, tid, uid, gid, comm, cgroup id; from
//! /proc while the process lives: exe, cmdline) and the container it runs in (cgroup id ->
//! cgroup path -> container id, for the path formats of containerd, CRI-O, Docker and
//! podman) -> the pod, through the API server's view of this node's pods (`pods`). Read
//! when the event arrives, before the process can exit, and cached briefly so a
//! storm of writes does not become a storm of /proc reads.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::KernelEvent;
use kubefim_baseline::container::cgroup::container_of;

use crate::model::{Container, FileOp, Origin, Pod, Process, Writer};
use crate::pods::{PodIndex, pod_uid_from_cgroup};

/// How long a process's /proc details are reused.
const CACHE_FOR: Duration = Duration::from_secs(2);

/// The actor of a change: the process, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor {
    /// The process.
    pub process: Process,
    /// The container, when the cgroup path names one.
    pub container: Option<Container>,
    /// The pod the container belongs to, when the Kubernetes API has told.
    pub pod: Option<Pod>,
}

impl Actor {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// `host` for a process outside any container, `pod` for a container whose pod is
    /// known, `container` otherwise.
    pub fn origin(&self) -> Origin {
        match (&self.container, &self.pod) {
            (None, _) => Origin::Host,
            (Some(_), Some(_)) => Origin::Pod,
            (Some(_), None) => Origin::Container,
        }
    }

    /// This actor as one of a change's writers, with its ops.
    pub fn writer(&self, ops: Vec<FileOp>) -> Writer {
        Writer {
            process: self.process.clone(),
            ops,
            container: self.container.clone(),
            pod: self.pod.clone(),
            origin: self.origin(),
        }
    }

    /// A host process with only a pid and a name, for tests of what consumes actors.
    #[cfg(test)]
    pub fn for_tests(pid: u32, comm: &str) -> Actor {
        let process = Process { pid, ppid: 1, uid: 0, gid: 0, comm: comm.to_owned(), exe: None, cmdline: None };
        Actor { process, container: None, pod: None }
    }
}

struct Details {
    at: Instant,
    exe: Option<String>,
    cmdline: Option<String>,
    cgroup: Option<String>,
    /// The last actor made for this process, reused while the event says the same.
    last: Option<Arc<Actor>>,
}

/// Resolves actors, with caches of /proc details and cgroup paths.
pub(crate) struct Attribution {
    cgroup_root: PathBuf,
    processes: HashMap<u32, Details>,
    cgroups: HashMap<u64, Option<String>>,
    pods: Option<PodIndex>,
}

impl Default for Attribution {
    /// Attribution with the cgroup v2 hierarchy where this system mounts it
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid systems).
    fn default() -> Self {
        Self::new(&cgroup2_mount().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")))
    }
}

/// Where cgroup v2 is mounted, from /proc/self/mountinfo (`... - cgroup2 ...`).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if !after.starts_with("cgroup2 ") {
            return None;
        }
        before.split(' ').nth(4).map(PathBuf::from)
    })
}

impl Attribution {
    /// Attribution with the cgroup v2 hierarchy mounted at `cgroup_root`.
    pub fn new(cgroup_root: &Path) -> Self {
        Attribution {
            cgroup_root: cgroup_root.to_owned(),
            processes: HashMap::new(),
            cgroups: HashMap::new(),
            pods: None,
        }
    }

    /// Also names the pod of each container, from this index of the node's pods.
    pub fn with_pods(mut self, pods: Option<PodIndex>) -> Self {
        self.pods = pods;
        self
    }

    /// The pod of a container: by its id once the pod's status lists it, else by the pod
    /// uid in its cgroup path (a container that just started; its name is not known yet).
    fn pod_of(&self, container_id: &str, cgroup: Option<&str>) -> Option<Pod> {
        let pods = self.pods.as_ref()?;
        if let Some(info) = pods.lookup(container_id) {
            return Some(info.to_pod());
        }
        let uid = pod_uid_from_cgroup(cgroup?)?;
        let (namespace, name) = pods.lookup_pod_uid(&uid)?;
        Some(Pod { namespace, name, uid, container: None, image: None })
    }

    /// The actor of an event.
    pub fn actor(&mut self, event: &KernelEvent) -> Arc<Actor> {
        let h = &event.header;
        let now = Instant::now();
        if self.processes.len() > 4096 {
            self.processes.retain(|_, d| now.duration_since(d.at) < CACHE_FOR);
        }
        let fresh = self.processes.get(&h.pid).is_some_and(|d| now.duration_since(d.at) < CACHE_FOR);
        if !fresh {
            let proc = PathBuf::from(format!("/proc/{}", h.pid));
            let exe = std::fs::read_link(proc.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
            let cmdline = std::fs::read(proc.join("cmdline")).ok().filter(|c| !c.is_empty()).map(|c| {
                let args: Vec<String> =
                    c.split(|&b| b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
                args.join(" ")
            });
            let cgroup = std::fs::read_to_string(proc.join("cgroup"))
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned)));
            self.processes.insert(h.pid, Details { at: now, exe, cmdline, cgroup, last: None });
        }
        let comm = event.comm();
        if let Some(last) = &self.processes[&h.pid].last
            && (last.process.ppid, last.process.uid, last.process.gid, last.process.comm.as_str())
                == (h.ppid, h.uid, h.gid, comm.as_str())
            // A pod found late (the API listed the container since) is worth a new actor.
            && (last.container.is_none() || last.pod.is_some())
        {
            return last.clone();
        }
        let details = &self.processes[&h.pid];
        let (exe, cmdline) = (details.exe.clone(), details.cmdline.clone());
        let cgroup = match &details.cgroup {
            Some(c) => Some(c.clone()),
            None => self.cgroup_path(h.cgroup_id),
        };
        let container = cgroup.as_deref().and_then(container_of).map(|(id, runtime)| Container {
            id,
            runtime,
            cgroup: cgroup.clone(),
            name: None,
            image: None,
            image_id: None,
        });
        let pod = container.as_ref().and_then(|c| self.pod_of(&c.id, cgroup.as_deref()));
        let process = Process { pid: h.pid, ppid: h.ppid, uid: h.uid, gid: h.gid, comm, exe, cmdline };
        let actor = Arc::new(Actor { process, container, pod });
        if let Some(d) = self.processes.get_mut(&h.pid) {
            d.last = Some(actor.clone());
        }
        actor
    }

    /// The cgroup v2 path of a cgroup id (the id is the inode number of the cgroup's
    /// directory), found by walking the hierarchy once per unknown id.
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(found) = self.cgroups.get(&id) {
            return found.clone();
        }
        let found = walk_for_inode(&self.cgroup_root, id).map(|p| {
            let rel = p.strip_prefix(&self.cgroup_root).unwrap_or(&p);
            format!("/{}", rel.display())
        });
        self.cgroups.insert(id, found.clone());
        found
    }
}

fn walk_for_inode(root: &Path, ino: u64) -> Option<PathBuf> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == ino) {
            return Some(dir);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(
                entries.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
            );
        }
    }
    None
}
