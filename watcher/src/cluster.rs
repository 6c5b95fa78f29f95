//! What the agent's lines tell beyond its log: the metrics counted from lines (container
//! drift per namespace, drift execution, layer modifications), and, with `--kubernetes`, the
//! cluster's view of them: a Warning Event on the pod whose container drifted or on the node
//! for a host change (`kube_events`), and this node's FimNodeStatus (`node_status`). Every
//! printed line passes through [`observe`] once. This module only maps lines to those calls:
//! rate limits, aggregation and the writes are the two modules' own, and no file content
//! ever leaves here (a line's diff is never read).

use std::time::SystemTime;

use kube::Client;

use crate::kube_events::{Drift, KubeEvents, Reason, Regarding};
use crate::metrics::Metrics;
use crate::model::{Change, Event, Line, Pod, Process, Reference};
use crate::node_status::{
    BaselineStatus, ConditionStatus, ConditionType, NodeStatus, NodeStatusWriter, VerifyStatus, WatcherStatus,
    kube_time,
};

/// How often at most the node's status is written: its counts stay exact, they are only
/// written together.
const STATUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The Kubernetes side of the lines.
#[derive(Clone)]
pub(crate) struct Cluster {
    events: KubeEvents,
    status: NodeStatusWriter,
}

impl Cluster {
    /// Starts the Events and status writers on the current tokio runtime.
    pub fn start(client: Client, node: &str, metrics: &Metrics) -> Cluster {
        let writes = metrics.kube_write_metrics();
        let status = NodeStatusWriter::start(client.clone(), node, writes.clone(), STATUS_INTERVAL);
        status.update(|s| {
            let now = SystemTime::now();
            s.set_condition(ConditionType::Ready, ConditionStatus::False, "Starting", "the agent is starting", now);
            s.set_condition(
                ConditionType::BaselineTrusted,
                ConditionStatus::Unknown,
                "Loading",
                "the baseline is being loaded",
                now,
            );
        });
        Cluster { events: KubeEvents::start(client, node, writes), status }
    }

    /// A baseline is trusted and watched.
    pub fn baseline(&self, entries: u64, created: SystemTime, policy: &str) {
        self.status.update(|s| {
            s.baseline = Some(BaselineStatus {
                trusted: true,
                created: Some(kube_time(created)),
                entries,
                policy: policy.to_owned(),
            });
            let message = format!("a signed baseline of {entries} entries is watched");
            s.set_condition(
                ConditionType::BaselineTrusted,
                ConditionStatus::True,
                "Signed",
                &message,
                SystemTime::now(),
            );
        });
    }

    /// Ready or not, as /readyz says, with the programs attached.
    pub fn ready(&self, ready: bool, why: &str, programs: (u64, u64)) {
        self.status.update(|s| {
            let watcher = s.watcher.get_or_insert(WatcherStatus {
                ready,
                programs_attached: 0,
                programs_degraded: 0,
                lost_events: 0,
                last_rescan: None,
            });
            watcher.ready = ready;
            (watcher.programs_attached, watcher.programs_degraded) = programs;
            let (status, reason) =
                if ready { (ConditionStatus::True, "Watching") } else { (ConditionStatus::False, "NotReady") };
            s.set_condition(ConditionType::Ready, status, reason, why, SystemTime::now());
        });
    }

    /// The workload policies in force: how many objects applied, which were rejected.
    pub fn policies(&self, applied: u64, rejected: &[String]) {
        self.status.update(|s| {
            s.set_policies(applied, rejected);
            let (status, reason, message) = if rejected.is_empty() {
                (ConditionStatus::True, "Applied", format!("{applied} policy objects applied"))
            } else {
                let names = rejected.join(", ");
                (
                    ConditionStatus::False,
                    "PolicyRejected",
                    format!("cannot apply {names} (see the policy-rejected lines)"),
                )
            };
            s.set_condition(ConditionType::PoliciesApplied, status, reason, &message, SystemTime::now());
        });
    }

    fn event(
        &self,
        regarding: Regarding,
        reason: Reason,
        path: &str,
        kind: &str,
        writer: Option<&Process>,
        container: Option<String>,
    ) {
        self.events.record(Drift {
            regarding,
            reason,
            path: path.to_owned(),
            kind: kind.to_owned(),
            writer: writer.map(|p| format!("{} (pid {})", p.comm, p.pid)),
            container,
            // No content is ever handed over: what a secret rule hides is never here.
            secret: false,
        });
    }

    fn update(&self, change: impl FnOnce(&mut NodeStatus)) {
        self.status.update(change);
    }
}

/// The pod an Event about a container is written on.
fn on_pod(pod: &Pod) -> Regarding {
    Regarding::Pod { namespace: pod.namespace.clone(), name: pod.name.clone(), uid: pod.uid.clone() }
}

/// Counts `event` in the metrics and, on Kubernetes, tells the cluster.
pub(crate) fn observe(metrics: &Metrics, cluster: Option<&Cluster>, event: &Event) {
    match &event.line {
        Line::Added(c) => change(metrics, cluster, "added", c),
        Line::Removed(c) => change(metrics, cluster, "removed", c),
        Line::Modified(c) => change(metrics, cluster, "modified", c),
        Line::Renamed(c) => change(metrics, cluster, "renamed", c),
        Line::DriftExec(d) => {
            let namespace = d.pod.as_ref().map_or("", |p| p.namespace.as_str());
            metrics.drift_exec(namespace);
            let Some(cluster) = cluster else { return };
            cluster.update(|s| s.container_drift(namespace, true));
            if let Some(pod) = &d.pod {
                let path = &d.path.bytes.text;
                cluster.event(
                    on_pod(pod),
                    Reason::DriftExecuted,
                    path,
                    "drift-exec",
                    Some(&d.process),
                    pod.container.clone(),
                );
            }
        }
        Line::LayerModified(l) => {
            metrics.layer_modified();
            let Some(cluster) = cluster else { return };
            let path = &l.path.bytes.text;
            cluster.update(|s| s.record_change(path, "layer-modified", SystemTime::now()));
            cluster.event(Regarding::Node, Reason::FileDrift, path, "layer-modified", l.process.as_ref(), None);
            // Each pod that runs the image sees it as drift of its own.
            for pod in &l.pods {
                cluster.event(
                    on_pod(pod),
                    Reason::FileDrift,
                    path,
                    "layer-modified",
                    l.process.as_ref(),
                    pod.container.clone(),
                );
            }
        }
        Line::Verify(v) => {
            if let Some(cluster) = cluster {
                let status = VerifyStatus {
                    time: kube_time(SystemTime::now()),
                    result: v.result,
                    added: v.added,
                    removed: v.removed,
                    modified: v.modified,
                    errors: v.errors,
                };
                cluster.update(|s| s.last_verify = Some(status));
            }
        }
        Line::Rescan(_) => {
            if let Some(cluster) = cluster {
                cluster.update(|s| {
                    if let Some(w) = &mut s.watcher {
                        w.last_rescan = Some(kube_time(SystemTime::now()));
                    }
                });
            }
        }
        Line::Lost(l) => {
            if let Some(cluster) = cluster {
                cluster.update(|s| {
                    if let Some(w) = &mut s.watcher {
                        w.lost_events += l.events;
                    }
                });
            }
        }
        _ => {}
    }
}

/// A change line: a container's drift against its image, or a host change against the
/// signed baseline.
fn change(metrics: &Metrics, cluster: Option<&Cluster>, kind: &'static str, c: &Change) {
    let path = &c.path.bytes.text;
    if c.baseline == Reference::Image {
        let namespace = c.pod.as_ref().map_or("", |p| p.namespace.as_str());
        metrics.container_change(namespace, kind);
        let Some(cluster) = cluster else { return };
        cluster.update(|s| s.container_drift(namespace, false));
        if let Some(pod) = &c.pod {
            cluster.event(on_pod(pod), Reason::FileDrift, path, kind, c.process.as_ref(), pod.container.clone());
        }
        return;
    }
    let Some(cluster) = cluster else { return };
    cluster.update(|s| s.record_change(path, kind, SystemTime::now()));
    // Said already before a restart (from the journal): its Event was written then.
    if !c.already_known {
        cluster.event(Regarding::Node, Reason::FileDrift, path, kind, c.process.as_ref(), None);
    }
}
