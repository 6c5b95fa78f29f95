//! The node's FimNodeStatus (`kubefim.io/v1alpha1`, cluster-scoped, one per node, named after
//! it): what the agent knows of its node, where `kubectl get fimnodestatuses` shows it. It owns
//! the status's Rust shape ([`NodeStatus`], whose field names are the CRD's in
//! deploy/crds) with the helpers that keep its lists bounded, and the writer task
//! ([`NodeStatusWriter`]). It does not decide what the status says: the watch loop calls
//! [`NodeStatusWriter::update`]. It never carries file content: a recent change is a path, a
//! kind and a time.
//!
//! The writer never blocks its caller: an update is a closure run under a std mutex held for
//! as long as the closure takes, and a wake-up of the task. The task writes at most once per
//! `min_interval` and only when something changed, always the latest state, so a failed write
//! loses nothing: the next one carries everything. It creates the object when it is missing,
//! then writes the status through the status subresource as a JSON merge patch of the whole
//! status. A merge patch rather than a PUT because the agent is the object's only writer: a
//! PUT needs the current resourceVersion and a read-and-retry on every conflict, for nothing;
//! what a merge patch would keep that a PUT would drop (a field the status no longer has, such
//! as a previous agent's) is removed by sending it as `null`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::metrics::KubeWriteMetrics;
use crate::model::VerifyResult;

/// How many recent changes the status lists.
const RECENT_CHANGES: usize = 20;

/// How many namespaces `containerDrift` lists; the metrics count every one.
const DRIFT_NAMESPACES: usize = 1000;

/// How many rejected policies the status names.
const REJECTED_NAMES: usize = 50;

/// The CRD's longest recent-change path, rejected name and condition message, in bytes (a
/// longer one would make the API server refuse the whole status).
const MAX_PATH: usize = 4096;
const MAX_NAME: usize = 512;
const MAX_MESSAGE: usize = 32768;

/// The longest one write may take: a kube 5 client retries 429, 503 and 504 itself, up to 15
/// times over minutes; meanwhile the state to write grows stale.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// An API time (RFC 3339, whole seconds, as the API server writes them) of a `SystemTime`.
pub fn kube_time(time: SystemTime) -> Time {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let nanos = i32::try_from(since.subsec_nanos()).unwrap_or(0);
    Time(Timestamp::new(seconds, nanos).unwrap_or(Timestamp::MAX))
}

/// The `status` of the node's FimNodeStatus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The node's name.
    pub node: String,
    /// The agent's version.
    pub agent_version: String,
    /// When the status was written (set by the writer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_time: Option<Time>,
    /// The node's baseline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineStatus>,
    /// The last verify run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<VerifyStatus>,
    /// The watcher's health.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watcher: Option<WatcherStatus>,
    /// The workload policies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<PolicyStatus>,
    /// Container drift per namespace, sorted by namespace, at most 1000.
    #[serde(default)]
    container_drift: Vec<NamespaceDrift>,
    /// The last 20 host changes, newest first.
    #[serde(default)]
    recent_changes: Vec<RecentChange>,
    /// Ready, BaselineTrusted, PoliciesApplied.
    #[serde(default)]
    conditions: Vec<Condition>,
}

/// `status.baseline`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaselineStatus {
    /// Its signature verified against the trusted key.
    pub trusted: bool,
    /// When it was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
    /// How many records it holds.
    pub entries: u64,
    /// The policy it was built with (its name or path).
    pub policy: String,
}

/// `status.lastVerify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyStatus {
    /// When it ran.
    pub time: Time,
    /// clean, changed or error.
    pub result: VerifyResult,
    /// Paths the baseline does not have.
    pub added: u64,
    /// Paths gone.
    pub removed: u64,
    /// Paths that differ.
    pub modified: u64,
    /// Paths that could not be checked.
    pub errors: u64,
}

/// `status.watcher`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherStatus {
    /// Watching, and the self-check sees what it should.
    pub ready: bool,
    /// eBPF programs attached.
    pub programs_attached: u64,
    /// eBPF programs that could not be attached.
    pub programs_degraded: u64,
    /// Kernel events lost so far.
    pub lost_events: u64,
    /// When the last rescan ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_rescan: Option<Time>,
}

/// `status.policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Policies applied.
    pub applied: u64,
    /// Policies rejected.
    pub rejected: u64,
    /// The rejected ones (`namespace/name`, or `name` for cluster policies), at most 50.
    pub rejected_names: Vec<String>,
}

/// One entry of `status.containerDrift`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceDrift {
    /// The pods' namespace.
    pub namespace: String,
    /// Changes found in its containers.
    pub changes: u64,
    /// Files its containers ran that are not their image's.
    pub drift_execs: u64,
}

/// One entry of `status.recentChanges`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentChange {
    /// The path on the host.
    pub path: String,
    /// added, removed, modified, renamed.
    pub kind: String,
    /// When it was found.
    pub time: Time,
}

/// One entry of `status.conditions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What it is about.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// Why, in CamelCase (the API's condition reason format).
    pub reason: String,
    /// Why, for people.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: Time,
    /// The generation of the object the condition was set for, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The conditions a FimNodeStatus has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionType {
    /// The agent watches and its self-check passes.
    Ready,
    /// The baseline's signature is verified.
    BaselineTrusted,
    /// Every workload policy is applied.
    PoliciesApplied,
}

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not.
    False,
    /// Not known yet.
    Unknown,
}

impl NodeStatus {
    /// An empty status of `node`, with this agent's version.
    pub fn new(node: &str) -> NodeStatus {
        NodeStatus {
            node: node.to_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            update_time: None,
            baseline: None,
            last_verify: None,
            watcher: None,
            policies: None,
            container_drift: Vec::new(),
            recent_changes: Vec::new(),
            conditions: Vec::new(),
        }
    }

    /// A host change: listed first; the 21st newest goes.
    pub fn record_change(&mut self, path: &str, kind: &str, time: SystemTime) {
        let change = RecentChange { path: cut(path, MAX_PATH), kind: cut(kind, 32), time: kube_time(time) };
        self.recent_changes.insert(0, change);
        self.recent_changes.truncate(RECENT_CHANGES);
    }

    /// A change in a container of a pod of `namespace` (`drift_exec`: a file it ran). A new
    /// namespace past the 1000th is not listed.
    pub fn container_drift(&mut self, namespace: &str, drift_exec: bool) {
        let i = match self.container_drift.binary_search_by(|d| d.namespace.as_str().cmp(namespace)) {
            Ok(i) => i,
            Err(_) if self.container_drift.len() >= DRIFT_NAMESPACES => return,
            Err(i) => {
                let entry = NamespaceDrift { namespace: namespace.to_owned(), changes: 0, drift_execs: 0 };
                self.container_drift.insert(i, entry);
                i
            }
        };
        let entry = &mut self.container_drift[i];
        if drift_exec {
            entry.drift_execs += 1;
        } else {
            entry.changes += 1;
        }
    }

    /// The policies applied, and those rejected (named, sorted, the first 50).
    pub fn set_policies(&mut self, applied: u64, rejected: &[String]) {
        let mut names: Vec<String> = rejected.iter().map(|n| cut(n, MAX_NAME)).collect();
        names.sort();
        names.truncate(REJECTED_NAMES);
        let rejected = u64::try_from(rejected.len()).unwrap_or(u64::MAX);
        self.policies = Some(PolicyStatus { applied, rejected, rejected_names: names });
    }

    /// Sets a condition; its lastTransitionTime becomes `now` only when its status changes.
    /// `reason` is CamelCase (characters the API does not allow in a reason are dropped).
    pub fn set_condition(
        &mut self,
        type_: ConditionType,
        status: ConditionStatus,
        reason: &str,
        message: &str,
        now: SystemTime,
    ) {
        let mut reason: String = reason.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !reason.starts_with(|c: char| c.is_ascii_alphabetic()) {
            reason.insert_str(0, "Reason");
        }
        let message = cut(message, MAX_MESSAGE);
        match self.conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                if c.status != status {
                    c.status = status;
                    c.last_transition_time = kube_time(now);
                }
                c.reason = reason;
                c.message = message;
            }
            None => self.conditions.push(Condition {
                type_,
                status,
                reason,
                message,
                last_transition_time: kube_time(now),
                observed_generation: None,
            }),
        }
    }

    /// The conditions, in the order first set.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// The container drift per namespace, sorted by namespace.
    pub fn container_drifts(&self) -> &[NamespaceDrift] {
        &self.container_drift
    }

    /// The recent host changes, newest first.
    pub fn recent_changes(&self) -> &[RecentChange] {
        &self.recent_changes
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The FimNodeStatus resource.
fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubefim.io", "v1alpha1", "FimNodeStatus"),
        "fimnodestatuses",
    )
}

/// The writer of the node's FimNodeStatus: cheap to clone; when the last clone is dropped the
/// task writes what is left, once, and ends.
#[derive(Clone)]
pub struct NodeStatusWriter {
    handle: Arc<Handle>,
}

/// Tells the task when the last writer is gone.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// What callers and the task share.
struct Shared {
    /// The status and its version, one more per update.
    state: Mutex<(NodeStatus, u64)>,
    wake: Notify,
    closed: AtomicBool,
}

impl NodeStatusWriter {
    /// Starts the writer task on the current tokio runtime. Nothing is written before the
    /// first [`NodeStatusWriter::update`].
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(client: Client, node: &str, metrics: KubeWriteMetrics, min_interval: Duration) -> NodeStatusWriter {
        let shared = Arc::new(Shared {
            state: Mutex::new((NodeStatus::new(node), 0)),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let task = Task {
            api: Api::all_with(client, &resource()),
            node: node.to_owned(),
            metrics,
            min_interval,
            exists: false,
            stored: None,
        };
        tokio::spawn(task.run(Arc::clone(&shared)));
        NodeStatusWriter { handle: Arc::new(Handle { shared }) }
    }

    /// Changes the status; the task writes it soon. Never waits on the network.
    pub fn update(&self, change: impl FnOnce(&mut NodeStatus)) {
        let shared = &self.handle.shared;
        {
            let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            change(&mut state.0);
            state.1 += 1;
        }
        shared.wake.notify_one();
    }
}

/// The writer task's state.
struct Task {
    api: Api<DynamicObject>,
    node: String,
    metrics: KubeWriteMetrics,
    min_interval: Duration,
    /// The object is known to exist.
    exists: bool,
    /// The status as the API server holds it, as far as the task knows.
    stored: Option<Value>,
}

impl Task {
    async fn run(mut self, shared: Arc<Shared>) {
        let mut written = 0;
        let mut failures = 0u32;
        let mut last: Option<Instant> = None;
        loop {
            loop {
                let version = shared.state.lock().unwrap_or_else(PoisonError::into_inner).1;
                if version != written {
                    break;
                }
                if shared.closed.load(Ordering::Acquire) {
                    return;
                }
                shared.wake.notified().await;
            }
            let closing = shared.closed.load(Ordering::Acquire);
            if let Some(last) = last
                && !closing
            {
                // Coalesce: what changes meanwhile goes in this write.
                tokio::time::sleep_until((last + self.min_interval).into()).await;
            }
            let (mut status, version) = shared.state.lock().unwrap_or_else(PoisonError::into_inner).clone();
            status.update_time = Some(kube_time(SystemTime::now()));
            let result = tokio::time::timeout(WRITE_TIMEOUT, self.write(&status)).await.unwrap_or_else(|_| {
                self.exists = false;
                let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 30 s");
                Err(kube::Error::Service(Box::new(timeout)))
            });
            last = Some(Instant::now());
            self.metrics.status_write(result.is_ok());
            match result {
                Ok(()) => {
                    if failures > 0 {
                        info!(node = %self.node, failures, "the FimNodeStatus is written again");
                    }
                    written = version;
                    failures = 0;
                }
                Err(e) if closing => {
                    warn!(node = %self.node, error = %e, "the last write of the FimNodeStatus failed");
                    return;
                }
                Err(e) => {
                    // The first failure in a row at warn, the rest at debug: the metric counts them.
                    if failures == 0 {
                        warn!(
                            node = %self.node, error = %e,
                            "writing the FimNodeStatus failed; retrying with backoff (check the CRD is installed \
                             and the agent's RBAC: fimnodestatuses get, create, patch)"
                        );
                    } else {
                        debug!(node = %self.node, error = %e, failures, "writing the FimNodeStatus failed again");
                    }
                    failures += 1;
                    let backoff = self.min_interval.saturating_mul(1 << failures.min(10)).min(MAX_BACKOFF);
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Creates the object if it is missing, then merge-patches its status.
    async fn write(&mut self, status: &NodeStatus) -> Result<(), kube::Error> {
        if !self.exists {
            match self.api.get_opt(&self.node).await? {
                Some(object) => self.stored = object.data.get("status").cloned(),
                None => {
                    let mut object = DynamicObject::new(&self.node, &resource());
                    object.metadata.labels =
                        Some([("app.kubernetes.io/name".to_owned(), "kubefim".to_owned())].into_iter().collect());
                    self.api.create(&PostParams::default(), &object).await?;
                    self.stored = None;
                }
            }
            self.exists = true;
        }
        let desired = serde_json::to_value(status).map_err(kube::Error::SerdeError)?;
        let patch = json!({"status": with_removals(self.stored.as_ref(), &desired)});
        match self.api.patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                self.stored = Some(desired);
                Ok(())
            }
            Err(e) => {
                // Deleted meanwhile, or in an unknown state: read it again next time.
                self.exists = false;
                Err(e)
            }
        }
    }
}

/// `desired` as a merge patch over `stored`: every field `stored` has and `desired` has not
/// is set to null (removed), at every depth; lists are replaced whole.
fn with_removals(stored: Option<&Value>, desired: &Value) -> Value {
    let (Some(Value::Object(stored)), Value::Object(desired)) = (stored, desired) else {
        return desired.clone();
    };
    let mut patch: Map<String, Value> =
        desired.iter().map(|(k, v)| (k.clone(), with_removals(stored.get(k), v))).collect();
    for k in stored.keys().filter(|k| !desired.contains_key(*k)) {
        patch.insert(k.clone(), Value::Null);
    }
    Value::Object(patch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_nulls_at_every_depth() {
        let stored = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "gone": {"x": 1}});
        let desired = json!({"a": 2, "b": {"c": 2}, "e": [3]});
        assert_eq!(
            with_removals(Some(&stored), &desired),
            json!({"a": 2, "b": {"c": 2, "d": null}, "e": [3], "gone": null})
        );
        assert_eq!(with_removals(None, &desired), desired);
    }

    #[test]
    fn lists_stay_bounded_and_ordered() {
        let mut status = NodeStatus::new("n");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for i in 0..30 {
            status.record_change(&format!("/etc/f{i}"), "modified", t + Duration::from_secs(i));
        }
        assert_eq!(status.recent_changes().len(), 20);
        assert_eq!(status.recent_changes()[0].path, "/etc/f29");
        for ns in ["b", "a", "c", "a"] {
            status.container_drift(ns, false);
        }
        status.container_drift("a", true);
        let drift: Vec<_> =
            status.container_drifts().iter().map(|d| (d.namespace.as_str(), d.changes, d.drift_execs)).collect();
        assert_eq!(drift, [("a", 2, 1), ("b", 1, 0), ("c", 1, 0)]);
        let names: Vec<String> = (0..60).rev().map(|i| format!("ns/p{i:02}")).collect();
        status.set_policies(3, &names);
        let policies = status.policies.as_ref().unwrap();
        assert_eq!((policies.rejected, policies.rejected_names.len()), (60, 50));
        assert_eq!(policies.rejected_names[0], "ns/p00");
    }

    #[test]
    fn a_condition_transitions_only_when_its_status_changes() {
        let mut status = NodeStatus::new("n");
        let (t0, t1, t2) = (
            UNIX_EPOCH + Duration::from_secs(100),
            UNIX_EPOCH + Duration::from_secs(200),
            UNIX_EPOCH + Duration::from_secs(300),
        );
        status.set_condition(ConditionType::Ready, ConditionStatus::False, "Starting up!", "loading", t0);
        assert_eq!(status.conditions()[0].reason, "Startingup");
        status.set_condition(ConditionType::Ready, ConditionStatus::False, "Loading", "still loading", t1);
        assert_eq!(status.conditions()[0].last_transition_time, kube_time(t0));
        assert_eq!(status.conditions()[0].reason, "Loading");
        status.set_condition(ConditionType::Ready, ConditionStatus::True, "Watching", "ready", t2);
        assert_eq!(status.conditions()[0].last_transition_time, kube_time(t2));
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["conditions"][0]["type"], "Ready");
        assert_eq!(json["conditions"][0]["lastTransitionTime"], "1970-01-01T00:05:00Z");
        assert!(json.get("baseline").is_none(), "{json}");
    }
}
