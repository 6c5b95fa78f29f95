//! Pod attribution through the Kubernetes API: which namespace, pod and container a container
//! id (or a pod uid read from a cgroup path) belongs to. It owns a watch of this node's pods
//! (`spec.nodeName=<node>`, so the read-only get/list/watch RBAC on pods is all it needs) and
//! the in-memory index built from it. It does not read cgroups or /proc (`actor` does; this
//! module only parses a cgroup path it is handed) and does not decide what a report says.
//!
//! The index mirrors what the API says about each pod: every container id in
//! `status.containerStatuses`, `initContainerStatuses` and `ephemeralContainerStatuses`, both
//! the running instance's (`containerID`) and the previous instance's
//! (`lastState.terminated.containerID`). Keeping the previous one is deliberate: a container
//! that crashed and was restarted gets a new id in the same MODIFIED event, and the file
//! change that made it crash (or that it made while dying) is often still in the ring buffer;
//! users expect it attributed to that pod, not to "unknown". An id two restarts old is gone
//! from the API and so from the index. A deleted pod's ids go with it: the API sends DELETED
//! only once the kubelet has stopped every container, so little can still be in flight.

use std::collections::{BTreeMap, HashMap};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tracing::{debug, info, warn};

use crate::metrics::PodMetrics;

/// The annotation a mirror pod carries with its static pod's config hash. The kubelet names a
/// static pod's cgroup after that hash, not after the mirror pod's API uid.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why pod attribution could not start. Once started it never fails: the watch retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Neither a kubeconfig (`KUBECONFIG`, `~/.kube/config`) nor the in-cluster service
    /// account gave an API server to talk to.
    #[error(
        "no Kubernetes API to attribute pods with (not in a cluster, and no usable KUBECONFIG or \
         ~/.kube/config); run kubefim in the DaemonSet of deploy/ or point KUBECONFIG at a cluster"
    )]
    Config(#[source] kube::config::InferConfigError),
    /// The client could not be built from the configuration (bad certificate, bad URL...).
    #[error("building the Kubernetes client failed; check the kubeconfig or the service account mount")]
    Client(#[source] kube::Error),
    /// The node name is empty, which would watch every pod of the cluster.
    #[error(
        "no node name to select this node's pods with; set NODE_NAME from the downward API \
         (fieldRef spec.nodeName), as deploy/base/daemonset.yaml does"
    )]
    NoNodeName,
    /// Called outside a tokio runtime, so there is nothing to run the watch on.
    #[error("pod attribution must be started from inside the watcher's tokio runtime")]
    NoRuntime,
}

/// Who runs a container, as the API server tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The pod's uid (`metadata.uid`).
    pub uid: String,
    /// The container's name in the pod spec.
    pub container: String,
    /// The image the container status reports (the current one, also for a previous instance).
    pub image: String,
    /// The node the pod is bound to.
    pub node: String,
}

impl PodInfo {
    /// The `pod` of a report line.
    pub fn to_pod(&self) -> crate::model::Pod {
        crate::model::Pod {
            namespace: self.namespace.clone(),
            name: self.pod.clone(),
            uid: self.uid.clone(),
            container: Some(self.container.clone()),
            image: Some(self.image.clone()),
        }
    }
}

/// A client of the API server `kube` infers: the kubeconfig of `KUBECONFIG` or
/// `~/.kube/config` if there is one, else the in-cluster service account. Must be called
/// inside a tokio runtime.
pub async fn client() -> Result<Client, Error> {
    let config = kube::Config::infer().await.map_err(Error::Config)?;
    Client::try_from(config).map_err(Error::Client)
}

/// A live index of this node's pods, kept up to date by a watch on the API server.
///
/// Cheap to clone (one `Arc`). The watch runs as a task on the tokio runtime that started it
/// and is aborted when the last clone is dropped. Lookups never wait on the network: they read
/// whatever the watch has applied so far (nothing before [`PodIndex::is_synced`]).
#[derive(Clone)]
pub struct PodIndex {
    inner: Arc<Handle>,
}

/// Owns the watch task: dropping the last [`PodIndex`] stops it.
struct Handle {
    state: Arc<State>,
    task: tokio::task::AbortHandle,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the watch task writes and lookups read.
#[derive(Default)]
struct State {
    maps: RwLock<Maps>,
    synced: AtomicBool,
    events: AtomicU64,
    errors: AtomicU64,
    metrics: PodMetrics,
}

impl State {
    /// One watch event applied: counted, and the pod gauge set to what the index holds.
    fn applied(&self, pods: usize) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.metrics.events.inc();
        self.metrics.pods.set(pods as u64);
    }
}

/// The two lookups, kept consistent with each other by always changing them together.
#[derive(Default)]
struct Maps {
    /// Container id (no runtime scheme) -> who runs it.
    containers: HashMap<String, PodInfo>,
    /// Pod uid -> the pod, with the container ids it put in `containers`.
    pods: HashMap<String, PodEntry>,
    /// Static pod config hash (the uid in its cgroup path) -> the mirror pod's uid.
    mirrors: HashMap<String, String>,
}

struct PodEntry {
    namespace: String,
    name: String,
    /// `metadata.labels`: what workload policies select on.
    labels: BTreeMap<String, String>,
    container_ids: Vec<String>,
    mirror_hash: Option<String>,
}

impl PodIndex {
    /// Starts watching the pods of `node_name` with the configuration `kube` infers: the
    /// kubeconfig of `KUBECONFIG` or `~/.kube/config` if there is one, else the in-cluster
    /// service account. The watch is spawned on the current tokio runtime.
    pub async fn start(node_name: &str, metrics: PodMetrics) -> Result<PodIndex, Error> {
        Self::start_with_client(client().await?, node_name, metrics)
    }

    /// Starts watching the pods of `node_name` on the API server `config` names. Must be
    /// called inside a tokio runtime (a current_thread one is enough); returns at once, before
    /// the first list has arrived.
    pub fn start_with_config(config: kube::Config, node_name: &str, metrics: PodMetrics) -> Result<PodIndex, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let client = Client::try_from(config).map_err(Error::Client)?;
        Self::start_with_client(client, node_name, metrics)
    }

    /// Starts watching the pods of `node_name` with `client` (shared with the agent's other
    /// uses of the API). Must be called inside a tokio runtime.
    pub fn start_with_client(client: Client, node_name: &str, metrics: PodMetrics) -> Result<PodIndex, Error> {
        let node = node_name.trim();
        if node.is_empty() {
            return Err(Error::NoNodeName);
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let api: Api<Pod> = Api::all(client);
        // (Re-)lists are served from the API server's watch cache (resourceVersion=0), not by
        // a quorum read of etcd, as the kubelet's own pod list is: this agent runs on every
        // node, and every node re-lists when the API server restarts. kube sends
        // resourceVersion=0 only for an unpaginated list; a node runs at most a few hundred
        // pods (110 by default), so one page is what the API server would send anyway.
        let mut config = watcher::Config::default().fields(&format!("spec.nodeName={node}")).any_semantic();
        config.page_size = None;
        let state = Arc::new(State { metrics, ..State::default() });
        let task = runtime.spawn(watch(api, config, Arc::clone(&state), node.to_owned()));
        Ok(PodIndex { inner: Arc::new(Handle { state, task: task.abort_handle() }) })
    }

    /// Who runs the container with this id. Accepts the bare id or the API's
    /// `<runtime>://<id>` form.
    pub fn lookup(&self, container_id: &str) -> Option<PodInfo> {
        self.inner.state.read().containers.get(strip_runtime_scheme(container_id)).cloned()
    }

    /// The namespace and name of the pod with this uid, as found in a cgroup path (see
    /// [`pod_uid_from_cgroup`]). For a static pod, the uid of its cgroup is its config hash,
    /// which is found through its mirror pod.
    pub fn lookup_pod_uid(&self, uid: &str) -> Option<(String, String)> {
        let maps = self.inner.state.read();
        let entry = maps.pods.get(uid).or_else(|| maps.mirrors.get(uid).and_then(|uid| maps.pods.get(uid)))?;
        Some((entry.namespace.clone(), entry.name.clone()))
    }

    /// The labels of the pod with this uid (as [`PodIndex::lookup_pod_uid`] finds it), when
    /// the index has it.
    pub fn pod_labels(&self, uid: &str) -> Option<BTreeMap<String, String>> {
        let maps = self.inner.state.read();
        let entry = maps.pods.get(uid).or_else(|| maps.mirrors.get(uid).and_then(|uid| maps.pods.get(uid)))?;
        Some(entry.labels.clone())
    }

    /// True once the first complete list of the node's pods has been applied.
    pub fn is_synced(&self) -> bool {
        self.inner.state.synced.load(Ordering::Acquire)
    }

    /// The number of watch events applied so far (list items count one each), for metrics.
    pub fn events_applied(&self) -> u64 {
        self.inner.state.events.load(Ordering::Relaxed)
    }

    /// The number of failed list or watch attempts so far (each was logged and retried).
    pub fn watch_errors(&self) -> u64 {
        self.inner.state.errors.load(Ordering::Relaxed)
    }

    /// The number of container ids in the index.
    pub fn len(&self) -> usize {
        self.inner.state.read().containers.len()
    }

    /// The number of pods in the index.
    pub fn pods(&self) -> usize {
        self.inner.state.read().pods.len()
    }

    /// True when no container id is known (not synced yet, or no pod has started one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for PodIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodIndex")
            .field("synced", &self.is_synced())
            .field("containers", &self.len())
            .field("events_applied", &self.events_applied())
            .finish()
    }
}

impl State {
    // A panic while holding the lock cannot leave the maps half-written in a way that matters
    // more than losing attribution altogether, so a poisoned lock is used as it is.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.maps.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The watch task: applies events until the index is dropped. Errors are logged and the
/// watcher's default backoff (client-go's: 800 ms doubling to 30 s, with jitter) paces the
/// retries; after a 410 Gone the watcher re-lists by itself.
async fn watch(api: Api<Pod>, config: watcher::Config, state: Arc<State>, node: String) {
    let mut events = pin!(watcher::watcher(api, config).default_backoff());
    // A re-list is built aside and swapped in at InitDone, so lookups keep answering from the
    // previous list meanwhile, and pods deleted while the watch was down disappear.
    let mut relist: Option<Maps> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => relist = Some(Maps::default()),
            Ok(Event::InitApply(pod)) => {
                relist.get_or_insert_with(Maps::default).apply(&pod, &node);
                // The gauge follows the index in use, which the re-list replaces only at InitDone.
                state.applied(state.read().pods.len());
            }
            Ok(Event::InitDone) => {
                let fresh = relist.take().unwrap_or_default();
                let (pods, containers) = (fresh.pods.len(), fresh.containers.len());
                *state.write() = fresh;
                state.metrics.pods.set(pods as u64);
                if !state.synced.swap(true, Ordering::AcqRel) {
                    info!(node = %node, pods, containers, "pod attribution synced with the API server");
                } else {
                    debug!(node = %node, pods, containers, "pods re-listed");
                }
            }
            Ok(Event::Apply(pod)) => {
                let pods = {
                    let mut maps = state.write();
                    maps.apply(&pod, &node);
                    maps.pods.len()
                };
                state.applied(pods);
            }
            Ok(Event::Delete(pod)) => {
                let pods = {
                    let mut maps = state.write();
                    if let Some(uid) = pod.metadata.uid.as_deref() {
                        maps.remove(uid);
                    }
                    maps.pods.len()
                };
                state.applied(pods);
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                // Routine: the resourceVersion fell out of the API server's window.
                state.errors.fetch_add(1, Ordering::Relaxed);
                info!(node = %node, reason = %status.message, "the pod watch expired; re-listing this node's pods");
            }
            Err(error) => {
                state.errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    node = %node,
                    error = %kubefim_baseline::error::chain(&error),
                    "watching this node's pods failed; pod attribution retries with backoff"
                );
            }
        }
    }
}

impl Maps {
    /// Puts a pod's current state in place of what was known of it.
    fn apply(&mut self, pod: &Pod, node: &str) {
        let Some(uid) = pod.metadata.uid.as_deref() else { return };
        self.remove(uid);
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_else(|| node.to_owned());
        let mut container_ids = Vec::new();
        for status in statuses(pod) {
            let previous = status.last_state.as_ref().and_then(|s| s.terminated.as_ref()?.container_id.as_deref());
            for id in [status.container_id.as_deref(), previous].into_iter().flatten() {
                let id = strip_runtime_scheme(id);
                if id.is_empty() || container_ids.iter().any(|known| known == id) {
                    continue;
                }
                let info = PodInfo {
                    namespace: namespace.clone(),
                    pod: name.clone(),
                    uid: uid.to_owned(),
                    container: status.name.clone(),
                    image: status.image.clone(),
                    node: node.clone(),
                };
                self.containers.insert(id.to_owned(), info);
                container_ids.push(id.to_owned());
            }
        }
        let mirror_hash = pod.metadata.annotations.as_ref().and_then(|a| a.get(MIRROR_ANNOTATION)).cloned();
        if let Some(hash) = &mirror_hash {
            self.mirrors.insert(hash.clone(), uid.to_owned());
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        self.pods.insert(uid.to_owned(), PodEntry { namespace, name, labels, container_ids, mirror_hash });
    }

    /// Forgets a pod and its container ids.
    fn remove(&mut self, uid: &str) {
        let Some(entry) = self.pods.remove(uid) else { return };
        for id in entry.container_ids {
            // Only if still ours: ids are unique per runtime, but a stale event must not take
            // away an id that a newer event gave to another pod.
            if self.containers.get(&id).is_some_and(|info| info.uid == uid) {
                self.containers.remove(&id);
            }
        }
        if let Some(hash) = entry.mirror_hash
            && self.mirrors.get(&hash).is_some_and(|owner| owner == uid)
        {
            self.mirrors.remove(&hash);
        }
    }
}

/// Every container status of a pod: regular, init and ephemeral (`kubectl debug`) containers.
fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    let status = pod.status.as_ref();
    [
        status.and_then(|s| s.container_statuses.as_ref()),
        status.and_then(|s| s.init_container_statuses.as_ref()),
        status.and_then(|s| s.ephemeral_container_statuses.as_ref()),
    ]
    .into_iter()
    .flatten()
    .flatten()
}

/// The bare id of a CRI container id: `containerd://<id>`, `cri-o://<id>` and `docker://<id>`
/// all name the id the runtime puts in the cgroup path.
fn strip_runtime_scheme(id: &str) -> &str {
    id.split_once("://").map_or(id, |(_, bare)| bare)
}

/// The uid of the Kubernetes pod a cgroup path belongs to, from the pod level of the kubelet's
/// cgroup hierarchy:
/// - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/...`
///   (`kubepods-pod<uid>.slice` for Guaranteed pods), with `_` for each `-` of the uid because
///   systemd reserves `-` in slice names for the hierarchy; also under a kubelet cgroup root
///   such as kind's `kubelet-kubepods-...`;
/// - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>` (`/kubepods/pod<uid>/...` for
///   Guaranteed pods), cgroup v1 or v2.
///
/// The uid is a UUID, or for a static pod the 32-hex-digit config hash. Paths outside
/// `kubepods` (host services, plain docker or podman containers) give `None`.
pub fn pod_uid_from_cgroup(path: &str) -> Option<String> {
    if !path.contains("kubepods") {
        return None;
    }
    path.rsplit('/').find_map(|segment| {
        let raw = match segment.strip_suffix(".slice") {
            Some(slice) if slice.contains("kubepods") => &slice[slice.rfind("-pod")? + "-pod".len()..],
            Some(_) => return None,
            None => segment.strip_prefix("pod")?,
        };
        let uid = raw.replace('_', "-");
        is_pod_uid(&uid).then_some(uid)
    })
}

/// A UUID in its 8-4-4-4-12 form, or a static pod's config hash (32 hex digits).
fn is_pod_uid(uid: &str) -> bool {
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if uid.len() == 32 {
        return hex(uid);
    }
    let groups: Vec<&str> = uid.split('-').collect();
    groups.len() == 5 && groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const UID: &str = "1b2c3d4e-5f6a-4b8c-9d0e-1f2a3b4c5d6e";
    const ID: &str = "4f1c0e9a7b3d2c5e8f6a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e";

    #[test]
    fn pod_uids_from_the_kubelets_cgroup_layouts() {
        let systemd_uid = UID.replace('-', "_");
        let hash = "b1946ac92492d2347c6235b4d2611184";
        for path in [
            // systemd driver, containerd, each QoS class.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"),
            // systemd driver, CRI-O (cgroup v2 with crun adds a `container` leaf).
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice/crio-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{systemd_uid}.slice/crio-{ID}.scope/container"),
            // kind: the kubelet's cgroup root is a slice of its own.
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{systemd_uid}.slice/cri-containerd-{ID}.scope"
            ),
            // cgroupfs driver, each QoS class, v2 path and a v1 /proc/<pid>/cgroup line.
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
            format!("4:memory:/kubepods/burstable/pod{UID}/{ID}"),
            // The pod level itself (the sandbox, or a path read before the container's).
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"),
        ] {
            assert_eq!(pod_uid_from_cgroup(&path).as_deref(), Some(UID), "{path}");
        }
        let static_pod = format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/x.scope");
        assert_eq!(pod_uid_from_cgroup(&static_pod).as_deref(), Some(hash));
        assert_eq!(pod_uid_from_cgroup(&format!("/kubepods/pod{hash}/{ID}")).as_deref(), Some(hash));
    }

    #[test]
    fn paths_without_a_pod_give_none() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-2.scope",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/system.slice/docker-4f1c.scope",
            "/machine.slice/libpod-4f1c.scope/container",
            // Not a uid: too short, not hex, or outside kubepods.
            "/kubepods/burstable/pod1234/abc",
            "/kubepods/burstable/podzzzzzzzz-5f6a-4b8c-9d0e-1f2a3b4c5d6e/abc",
            "/system.slice/podman-1b2c3d4e_5f6a_4b8c_9d0e_1f2a3b4c5d6e.slice",
        ] {
            assert_eq!(pod_uid_from_cgroup(path), None, "{path}");
        }
        assert_eq!(pod_uid_from_cgroup(&format!("/docker/pod{UID}/{ID}")), None);
    }

    #[test]
    fn runtime_schemes_are_stripped() {
        for id in [format!("containerd://{ID}"), format!("cri-o://{ID}"), format!("docker://{ID}"), ID.to_owned()] {
            assert_eq!(strip_runtime_scheme(&id), ID);
        }
    }

    fn pod(uid: &str, running: &str, previous: Option<&str>) -> Pod {
        let last_state = previous.map_or(json!({}), |id| json!({"terminated": {"exitCode": 137, "containerID": id}}));
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": uid},
            "spec": {"nodeName": "worker-1", "containers": [{"name": "nginx", "image": "nginx:1.27"}]},
            "status": {"containerStatuses": [{
                "name": "nginx", "image": "docker.io/library/nginx:1.27", "imageID": "", "ready": true,
                "restartCount": 1, "containerID": running, "lastState": last_state
            }]}
        }))
        .expect("a valid pod")
    }

    #[test]
    fn apply_replaces_a_pods_ids_and_keeps_the_previous_instance() {
        let mut maps = Maps::default();
        maps.apply(&pod(UID, "containerd://aaa", None), "worker-1");
        assert_eq!(maps.containers["aaa"].container, "nginx");
        maps.apply(&pod(UID, "containerd://bbb", Some("containerd://aaa")), "worker-1");
        assert!(maps.containers.contains_key("aaa") && maps.containers.contains_key("bbb"));
        maps.apply(&pod(UID, "containerd://ccc", Some("containerd://bbb")), "worker-1");
        assert!(!maps.containers.contains_key("aaa"), "two restarts old: gone from the API, gone here");
        maps.remove(UID);
        assert!(maps.containers.is_empty() && maps.pods.is_empty());
    }

    #[test]
    fn a_stale_removal_does_not_take_another_pods_id() {
        let mut maps = Maps::default();
        let other = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b";
        maps.apply(&pod(UID, "containerd://aaa", None), "worker-1");
        maps.apply(&pod(other, "containerd://aaa", None), "worker-1");
        maps.remove(UID);
        assert_eq!(maps.containers["aaa"].uid, other);
    }
}
