//! Which containers run on this node, whatever the runtime: every process's cgroup names its
//! container (`cgroup::container_of`); the lowest pid of each is asked for its root mount
//! (`/proc/PID/mountinfo`), which is the overlay to check; the runtime's OCI bundle
//! (`config.json`, at the place each runtime keeps it) gives the annotations, the container's
//! name, its image and, on Kubernetes, its pod. Nothing here talks to a runtime's API: what
//! the kernel and the runtimes' files say is enough, and works the same under every runtime.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::cgroup::{Runtime, container_of};
use super::overlay::OverlayRoot;
use crate::mounts::MountTable;
use crate::root::HostRoot;

/// Where runtimes keep a container's OCI `config.json`, `{}` standing for its id: CRI-O and
/// podman (containers/storage), containerd's task directories per namespace (Kubernetes,
/// nerdctl, Docker).
const BUNDLES: [&str; 5] = [
    "/var/lib/containers/storage/overlay-containers/{}/userdata/config.json",
    "/run/containerd/io.containerd.runtime.v2.task/k8s.io/{}/config.json",
    "/run/containerd/io.containerd.runtime.v2.task/default/{}/config.json",
    "/run/containerd/io.containerd.runtime.v2.task/moby/{}/config.json",
    "/run/crio/{}/config.json",
];

/// containers/storage's list of containers (podman, CRI-O): names and image.
const STORAGE_CONTAINERS: &str = "/var/lib/containers/storage/overlay-containers/containers.json";

/// The pod a container belongs to, as its runtime recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's uid.
    pub uid: Option<String>,
}

/// A running container.
#[derive(Debug, Clone)]
pub struct RunningContainer {
    /// Its id (64 hex digits).
    pub id: String,
    /// The runtime its cgroup names.
    pub runtime: Runtime,
    /// Its lowest pid (host pid namespace).
    pub pid: u32,
    /// Its name, when the runtime recorded one.
    pub name: Option<String>,
    /// Its image's name, when recorded.
    pub image: Option<String>,
    /// Its image's id, when recorded.
    pub image_id: Option<String>,
    /// Its OCI annotations: the labels a workload policy selects on outside Kubernetes.
    pub labels: BTreeMap<String, String>,
    /// Its pod, on Kubernetes.
    pub pod: Option<PodRef>,
    /// Its root as an overlay, or why it is not one.
    pub root: Result<OverlayRoot, String>,
}

#[derive(Deserialize)]
struct Bundle {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct StorageContainer {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    metadata: Option<String>,
}

#[derive(Deserialize)]
struct StorageMetadata {
    #[serde(rename = "image-name", default)]
    image_name: Option<String>,
}

/// The first of `keys` the annotations hold.
fn annotation(a: &BTreeMap<String, String>, keys: &[&str]) -> Option<String> {
    keys.iter().find_map(|k| a.get(*k)).filter(|v| !v.is_empty()).cloned()
}

/// Every container with a process on the node, by id, sorted; `proc` is the host's procfs.
pub fn running(proc: &Path, host: &HostRoot) -> Vec<RunningContainer> {
    let mut first_pid: BTreeMap<String, (u32, Runtime)> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(proc) else { return Vec::new() };
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        // A process gone meanwhile has no cgroup file: skipped.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else { continue };
        let Some((id, runtime)) = container_in(&cgroup) else { continue };
        let slot = first_pid.entry(id).or_insert((pid, runtime));
        if pid < slot.0 {
            *slot = (pid, runtime);
        }
    }
    let storage = storage_containers(host);
    first_pid.into_iter().map(|(id, (pid, runtime))| describe(proc, host, &storage, id, pid, runtime)).collect()
}

/// The container process `pid` runs in, described; `None` for a process outside any
/// container, or gone.
pub fn of_pid(proc: &Path, host: &HostRoot, pid: u32) -> Option<RunningContainer> {
    let cgroup = std::fs::read_to_string(proc.join(pid.to_string()).join("cgroup")).ok()?;
    let (id, runtime) = container_in(&cgroup)?;
    Some(describe(proc, host, &storage_containers(host), id, pid, runtime))
}

/// The container a `/proc/PID/cgroup` text names.
fn container_in(cgroup: &str) -> Option<(String, Runtime)> {
    cgroup.lines().find_map(|l| container_of(l.splitn(3, ':').nth(2)?))
}

fn storage_containers(host: &HostRoot) -> BTreeMap<String, StorageContainer> {
    let Ok(text) = std::fs::read(host.disk(Path::new(STORAGE_CONTAINERS))) else { return BTreeMap::new() };
    serde_json::from_slice::<Vec<StorageContainer>>(&text)
        .map(|list| list.into_iter().map(|c| (c.id.clone(), c)).collect())
        .unwrap_or_default()
}

fn describe(
    proc: &Path,
    host: &HostRoot,
    storage: &BTreeMap<String, StorageContainer>,
    id: String,
    pid: u32,
    runtime: Runtime,
) -> RunningContainer {
    let root = root_of(proc, host, pid);
    let annotations = BUNDLES
        .iter()
        .map(|pattern| PathBuf::from(pattern.replace("{}", &id)))
        .find_map(|p| std::fs::read(host.disk(&p)).ok())
        .and_then(|bytes| serde_json::from_slice::<Bundle>(&bytes).ok())
        .map(|b| b.annotations)
        .unwrap_or_default();
    let stored = storage.get(&id);
    let name = annotation(&annotations, &["io.kubernetes.cri.container-name", "io.kubernetes.container.name"])
        .or_else(|| stored.and_then(|c| c.names.first().cloned()));
    let image =
        annotation(&annotations, &["io.kubernetes.cri.image-name", "io.kubernetes.cri-o.ImageName"]).or_else(|| {
            let meta = stored?.metadata.as_deref()?;
            serde_json::from_str::<StorageMetadata>(meta).ok()?.image_name
        });
    let image_id = annotation(&annotations, &["io.kubernetes.cri-o.ImageRef"]).or_else(|| stored?.image.clone());
    let pod = match (
        annotation(&annotations, &["io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"]),
        annotation(&annotations, &["io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"]),
    ) {
        (Some(namespace), Some(name)) => Some(PodRef {
            namespace,
            name,
            uid: annotation(&annotations, &["io.kubernetes.cri.sandbox-uid", "io.kubernetes.pod.uid"]),
        }),
        _ => None,
    };
    RunningContainer { id, runtime, pid, name, image, image_id, labels: annotations, pod, root }
}

/// The overlay at `/` in process `pid`'s mount table.
fn root_of(proc: &Path, host: &HostRoot, pid: u32) -> Result<OverlayRoot, String> {
    let path = proc.join(pid.to_string()).join("mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let table = MountTable::parse(&text);
    let mount = table.at(Path::new("/")).ok_or_else(|| format!("{} has no mount at /", path.display()))?;
    OverlayRoot::from_mount(&mount.fs_type, &mount.super_options, host).map_err(|e| e.to_string())
}
