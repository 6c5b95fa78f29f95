//! The agent's Prometheus metrics: one [`Metrics`] value owns a `prometheus_client` registry and
//! every counter, gauge and histogram in it, and offers one method per thing the watch loop
//! reports (a kernel event, a change, a rescan, a verify run, a self-check...). It only counts
//! and encodes; serving the text over HTTP is `http`'s job, and deciding what to count is the
//! watch loop's.
//!
//! Label values come from small fixed sets compiled into the program (op names, change kinds,
//! rescan reasons, verify results): never a path, a pid or a pod name, both because every label
//! value is a time series kept forever by Prometheus and because metrics are readable by
//! whoever can reach the port, which must not learn which files changed. The methods take
//! `&'static str` so that a value built at run time (a path) does not even compile, and so
//! that counting a kernel event allocates nothing. The one exception is `namespace` on the
//! container drift counters: bounded by the cluster's namespaces (not its pods), and what a
//! per-tenant alert needs; it is "" outside Kubernetes.

mod classic;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::model::{LostBy, RescanReason, VerifyResult};
use crate::selfcheck::Check;

/// The media type of [`Metrics::encode`]'s output: `prometheus_client::encoding::text` writes
/// OpenMetrics 1.0 text (counters with `_total`, `# UNIT` lines, a closing `# EOF`), which
/// Prometheus negotiates by default.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The media type of [`Metrics::encode_classic`]'s output: the classic Prometheus text format,
/// for the clients that ask for it (promtool, older servers, other agents).
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds of the rehash-duration buckets, in seconds: 1-2.5-5 steps from 10 µs (a small
/// file in the page cache) to 1 s (a large binary read from disk); slower ones land in `+Inf`.
const REHASH_BUCKETS: [f64; 16] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
];

/// The kinds of change a report can carry (`kubefim_changes_total{kind}`), created at start so
/// that each series exists at 0 before its first change (`rate()` and alerts need a first point).
const CHANGE_KINDS: [&str; 4] = ["added", "removed", "modified", "renamed"];

/// The results of a verify run (`kubefim_verify_runs_total{result}`).
const VERIFY_RESULTS: [VerifyResult; 3] = [VerifyResult::Clean, VerifyResult::Changed, VerifyResult::Error];

/// `op="..."`: the name of a kernel event's operation (write, rename, unlink, chmod...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

/// `kind="..."`: added, removed, modified or renamed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// `reason="..."`: why a rescan ran (startup, interval, lost, io_uring...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// `dropped_by="..."`: kernel or watcher.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabel {
    dropped_by: &'static str,
}

/// `result="..."`: clean, changed or error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// `check="..."`: canary, inodes or names (the self-check that failed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabel {
    check: &'static str,
}

/// `state="..."` of `kubefim_workload_policies`: applied or rejected.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// `namespace="..."`: a container's pod's namespace ("" outside Kubernetes). Owned: the
/// namespace is read from the pod at run time, the one label value that is (see the module's
/// doc for why it is bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// `namespace="...",kind="..."`: container drift by namespace and change kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceKindLabel {
    namespace: String,
    kind: &'static str,
}

/// `version="..."` of `kubefim_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
}

/// A family whose HELP and TYPE are written even before its first series: the encoder skips an
/// empty family, and the namespaced families are empty until a container in some namespace
/// drifts (the events family until the first kernel event), yet Prometheus, the rules, the
/// dashboard and the README test must see that the metric exists.
/// (An OpenMetrics family may have no metric, a classic one no sample.)
#[derive(Debug)]
struct Listed<F>(F);

impl<F: EncodeMetric> EncodeMetric for Listed<F> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// A gauge holding a float (timestamps, durations), stored as the bits of an `f64`.
type FloatGauge = Gauge<f64, AtomicU64>;
/// A gauge holding a count.
pub type CountGauge = Gauge<u64, AtomicU64>;

/// Every metric the agent exports. Cheap to update from the hot loop (atomics, and a read lock
/// plus a hash look-up for labelled series); share it as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    events: Family<OpLabel, Counter>,
    changes: Family<KindLabel, Counter>,
    lost: Family<LostLabel, Counter>,
    rescans: Family<ReasonLabel, Counter>,
    rehash: Histogram,
    baseline_entries: CountGauge,
    baseline_created: FloatGauge,
    baseline_trusted: CountGauge,
    last_verify_at: FloatGauge,
    last_verify_success: CountGauge,
    last_verify_changes: Family<KindLabel, CountGauge>,
    last_verify_errors: CountGauge,
    last_verify_duration: FloatGauge,
    verify_runs: Family<ResultLabel, Counter>,
    programs_attached: CountGauge,
    programs_degraded: CountGauge,
    watched_inodes: CountGauge,
    self_check_failures: Family<CheckLabel, Counter>,
    self_check_ok: CountGauge,
    ready: CountGauge,
    policies: Family<StateLabel, CountGauge>,
    policy_rejections: Counter,
    container_changes: Family<NamespaceKindLabel, Counter>,
    drift_exec: Family<NamespaceLabel, Counter>,
    layer_modifications: Counter,
    pods: PodMetrics,
    kube_writes: KubeWriteMetrics,
}

/// What the Kubernetes writers' calls can end in (`kubefim_kube_events_total{result}`).
const KUBE_EVENT_RESULTS: [&str; 4] = ["created", "aggregated", "suppressed", "failed"];

/// The Kubernetes writers' metrics (Events on pods and nodes, the node's FimNodeStatus),
/// updated by their tasks: cloning shares the series.
#[derive(Debug, Clone, Default)]
pub struct KubeWriteMetrics {
    /// `kubefim_kube_events_total{result}`.
    events: Family<ResultLabel, Counter>,
    /// `kubefim_node_status_writes_total{result}`.
    status_writes: Family<ResultLabel, Counter>,
}

impl KubeWriteMetrics {
    /// One Event write ended in `result`: "created" (POST of a new Event), "aggregated" (PATCH
    /// of an existing Event's count), "suppressed" (over the rate limit, folded into a
    /// summary), "failed" (the API refused or was unreachable).
    pub fn event(&self, result: &'static str) {
        self.events.get_or_create(&ResultLabel { result }).inc();
    }

    /// One write of the node's FimNodeStatus, `ok` or failed.
    pub fn status_write(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.status_writes.get_or_create(&ResultLabel { result }).inc();
    }
}

/// The pod index's metrics, updated by its watch task as it applies events.
#[derive(Debug, Clone, Default)]
pub struct PodMetrics {
    /// `kubefim_pod_cache_events_total`: watch events applied (list items count one each).
    pub events: Counter,
    /// `kubefim_pod_cache_entries`: pods in the index.
    pub pods: CountGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, at zero, with `kubefim_build_info{version}` set to this crate's
    /// version.
    pub fn new() -> Self {
        let metrics = Metrics {
            registry: Registry::default(),
            events: Family::default(),
            changes: Family::default(),
            lost: Family::default(),
            rescans: Family::default(),
            rehash: Histogram::new(REHASH_BUCKETS),
            baseline_entries: Gauge::default(),
            baseline_created: Gauge::default(),
            baseline_trusted: Gauge::default(),
            last_verify_at: Gauge::default(),
            last_verify_success: Gauge::default(),
            last_verify_changes: Family::default(),
            last_verify_errors: Gauge::default(),
            last_verify_duration: Gauge::default(),
            verify_runs: Family::default(),
            programs_attached: Gauge::default(),
            programs_degraded: Gauge::default(),
            watched_inodes: Gauge::default(),
            self_check_failures: Family::default(),
            self_check_ok: Gauge::default(),
            ready: Gauge::default(),
            policies: Family::default(),
            policy_rejections: Counter::default(),
            container_changes: Family::default(),
            drift_exec: Family::default(),
            layer_modifications: Counter::default(),
            pods: PodMetrics::default(),
            kube_writes: KubeWriteMetrics::default(),
        };
        // Looking a series up creates it at zero; the read guard that comes back is not needed.
        for kind in CHANGE_KINDS {
            drop(metrics.changes.get_or_create(&KindLabel { kind }));
        }
        for kind in &CHANGE_KINDS[..3] {
            drop(metrics.last_verify_changes.get_or_create(&KindLabel { kind }));
        }
        for result in VERIFY_RESULTS {
            drop(metrics.verify_runs.get_or_create(&ResultLabel { result: result.as_str() }));
        }
        for by in [LostBy::Kernel, LostBy::Watcher, LostBy::Budget] {
            drop(metrics.lost.get_or_create(&LostLabel { dropped_by: by.as_str() }));
        }
        for reason in RescanReason::ALL {
            drop(metrics.rescans.get_or_create(&ReasonLabel { reason: reason.as_str() }));
        }
        for check in Check::ALL {
            drop(metrics.self_check_failures.get_or_create(&CheckLabel { check: check.as_str() }));
        }
        for state in ["applied", "rejected"] {
            drop(metrics.policies.get_or_create(&StateLabel { state }));
        }
        for result in KUBE_EVENT_RESULTS {
            drop(metrics.kube_writes.events.get_or_create(&ResultLabel { result }));
        }
        for result in ["ok", "failed"] {
            drop(metrics.kube_writes.status_writes.get_or_create(&ResultLabel { result }));
        }
        // The namespaced families start empty (listed nonetheless, see `Listed`): which
        // namespaces there are is not known here. A series is born at its first change, at 1,
        // which increase() does not count: the shipped alerts also fire on a series that is new.
        metrics.register()
    }

    /// Puts every metric in the registry. Counters are named without `_total` and
    /// seconds-valued metrics without `_seconds`: the encoder appends both (OpenMetrics), so
    /// the exported names are the ones in the comments.
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        // kubefim_build_info{version}
        r.register(
            "kubefim_build",
            "The running kubefim's version",
            Info::new(BuildLabel { version: env!("CARGO_PKG_VERSION") }),
        );
        // kubefim_events_total{op}
        // Listed from the start: its ops are many, and a series appears with its op's first event.
        r.register("kubefim_events", "Kernel events received, by operation", Listed(self.events.clone()));
        // kubefim_changes_total{kind}
        r.register("kubefim_changes", "Changes reported, by kind", self.changes.clone());
        // kubefim_lost_events_total{dropped_by}
        r.register(
            "kubefim_lost_events",
            "Kernel events dropped before the agent processed them, by the kernel (ring buffer full) or the \
             watcher (its queue full); each loss triggers a rescan",
            self.lost.clone(),
        );
        // kubefim_rescans_total{reason}
        r.register("kubefim_rescans", "Full rescans of the monitored trees, by reason", self.rescans.clone());
        // kubefim_rehash_duration_seconds
        r.register_with_unit(
            "kubefim_rehash_duration",
            "Time to rehash one file after an event",
            Unit::Seconds,
            self.rehash.clone(),
        );
        // kubefim_baseline_entries
        r.register("kubefim_baseline_entries", "Entries in the loaded baseline", self.baseline_entries.clone());
        // kubefim_baseline_created_timestamp_seconds
        r.register_with_unit(
            "kubefim_baseline_created_timestamp",
            "When the loaded baseline was made (Unix time)",
            Unit::Seconds,
            self.baseline_created.clone(),
        );
        // kubefim_baseline_trusted
        r.register(
            "kubefim_baseline_trusted",
            "1 when the loaded baseline's signature verified against a trusted key, else 0",
            self.baseline_trusted.clone(),
        );
        // kubefim_last_verify_timestamp_seconds
        r.register_with_unit(
            "kubefim_last_verify_timestamp",
            "When the last verify run finished (Unix time)",
            Unit::Seconds,
            self.last_verify_at.clone(),
        );
        // kubefim_last_verify_success
        r.register(
            "kubefim_last_verify_success",
            "1 when the last verify run found no change and no error, else 0",
            self.last_verify_success.clone(),
        );
        // kubefim_last_verify_changes{kind}
        r.register(
            "kubefim_last_verify_changes",
            "Changes the last verify run found, by kind",
            self.last_verify_changes.clone(),
        );
        // kubefim_last_verify_errors
        r.register(
            "kubefim_last_verify_errors",
            "Files the last verify run could not check",
            self.last_verify_errors.clone(),
        );
        // kubefim_last_verify_duration_seconds
        r.register_with_unit(
            "kubefim_last_verify_duration",
            "How long the last verify run took",
            Unit::Seconds,
            self.last_verify_duration.clone(),
        );
        // kubefim_verify_runs_total{result}
        r.register("kubefim_verify_runs", "Verify runs, by result", self.verify_runs.clone());
        // kubefim_programs_attached
        r.register("kubefim_programs_attached", "eBPF programs attached", self.programs_attached.clone());
        // kubefim_programs_degraded
        r.register(
            "kubefim_programs_degraded",
            "eBPF programs that could not be attached (their events are covered by rescans only)",
            self.programs_degraded.clone(),
        );
        // kubefim_watched_inodes
        r.register("kubefim_watched_inodes", "Inodes in the kernel's filter map", self.watched_inodes.clone());
        // kubefim_self_check_failures_total{check}
        r.register(
            "kubefim_self_check_failures",
            "Self-checks of the kernel side that failed, by check: the canary's write unseen, inodes or names \
             missing from the kernel filter",
            self.self_check_failures.clone(),
        );
        // kubefim_self_check_ok
        r.register(
            "kubefim_self_check_ok",
            "1 while the kernel side passes its self-checks (canary seen, filter intact), 0 from a failure until \
             a canary is seen again",
            self.self_check_ok.clone(),
        );
        // kubefim_pod_cache_events_total
        r.register(
            "kubefim_pod_cache_events",
            "Pod watch events applied to the pod index (list items count one each)",
            self.pods.events.clone(),
        );
        // kubefim_pod_cache_entries
        r.register("kubefim_pod_cache_entries", "Pods in the attribution index", self.pods.pods.clone());
        // kubefim_ready
        r.register(
            "kubefim_ready",
            "1 while /readyz answers 200 (baseline trusted, programs attached, self-checks passing), else 0",
            self.ready.clone(),
        );
        // kubefim_workload_policies{state}
        r.register(
            "kubefim_workload_policies",
            "Workload policies (files and WorkloadFimPolicy objects) the agent holds, by state: applied or rejected",
            self.policies.clone(),
        );
        // kubefim_policy_rejections_total
        r.register(
            "kubefim_policy_rejections",
            "Workload policies refused (bad selector, unknown field...), each with a policy-rejected line",
            self.policy_rejections.clone(),
        );
        // kubefim_container_changes_total{namespace,kind}
        r.register(
            "kubefim_container_changes",
            "Changes found inside running containers, by their pod's namespace (empty outside Kubernetes) and kind",
            Listed(self.container_changes.clone()),
        );
        // kubefim_drift_exec_total{namespace}
        r.register(
            "kubefim_drift_exec",
            "Executions in a container of a file its image does not have as it is (drift-exec lines), by namespace",
            Listed(self.drift_exec.clone()),
        );
        // kubefim_layer_modifications_total
        r.register(
            "kubefim_layer_modifications",
            "Writes on the node to a monitored file of an image layer that containers use (layer-modified lines)",
            self.layer_modifications.clone(),
        );
        // kubefim_kube_events_total{result}
        r.register(
            "kubefim_kube_events",
            "Kubernetes Events about drift, by result: created, aggregated (count patched), suppressed (over the \
             rate limit, folded into a summary), failed",
            self.kube_writes.events.clone(),
        );
        // kubefim_node_status_writes_total{result}
        r.register(
            "kubefim_node_status_writes",
            "Writes of this node's FimNodeStatus, by result: ok or failed",
            self.kube_writes.status_writes.clone(),
        );
        self
    }

    /// One kernel event received, `op` being its operation's name (write, rename, unlink...).
    pub fn event(&self, op: &'static str) {
        self.events.get_or_create(&OpLabel { op }).inc();
    }

    /// One change reported, `kind` being added, removed, modified or renamed.
    pub fn change(&self, kind: &'static str) {
        self.changes.get_or_create(&KindLabel { kind }).inc();
    }

    /// `n` kernel events were lost, dropped `by` the kernel or the watcher.
    pub fn lost(&self, n: u64, by: LostBy) {
        self.lost.get_or_create(&LostLabel { dropped_by: by.as_str() }).inc_by(n);
    }

    /// One rescan started, `reason` saying why.
    pub fn rescan(&self, reason: RescanReason) {
        self.rescans.get_or_create(&ReasonLabel { reason: reason.as_str() }).inc();
    }

    /// One file was rehashed in `d`.
    pub fn rehash_seconds(&self, d: Duration) {
        self.rehash.observe(d.as_secs_f64());
    }

    /// A baseline was loaded: its size, when it was made (Unix seconds) and whether its
    /// signature verified.
    pub fn set_baseline(&self, entries: u64, created_unix: f64, trusted: bool) {
        self.baseline_entries.set(entries);
        self.baseline_created.set(created_unix);
        self.baseline_trusted.set(u64::from(trusted));
    }

    /// A verify run finished at `at_unix` (Unix seconds) after `duration`, having found these
    /// changes and `errors` files it could not check. A run with errors counts as `error` even
    /// if it also found changes: its picture is incomplete, and the change gauges still say
    /// what it did find.
    pub fn verified(&self, at_unix: f64, added: u64, removed: u64, modified: u64, errors: u64, duration: Duration) {
        let changed = added > 0 || removed > 0 || modified > 0;
        let result = match (errors > 0, changed) {
            (true, _) => VerifyResult::Error,
            (false, true) => VerifyResult::Changed,
            (false, false) => VerifyResult::Clean,
        };
        for (kind, n) in [("added", added), ("removed", removed), ("modified", modified)] {
            self.last_verify_changes.get_or_create(&KindLabel { kind }).set(n);
        }
        self.last_verify_errors.set(errors);
        self.last_verify_duration.set(duration.as_secs_f64());
        self.last_verify_success.set(u64::from(result == VerifyResult::Clean));
        self.verify_runs.get_or_create(&ResultLabel { result: result.as_str() }).inc();
        // Last, so that a scrape seeing the new timestamp also sees the values it stamps.
        self.last_verify_at.set(at_unix);
    }

    /// How many eBPF programs are attached, and how many could not be (degraded coverage).
    pub fn set_programs(&self, attached: u64, degraded: u64) {
        self.programs_attached.set(attached);
        self.programs_degraded.set(degraded);
    }

    /// How many inodes the kernel's filter map holds.
    pub fn set_watched_inodes(&self, n: u64) {
        self.watched_inodes.set(n);
    }

    /// A self-check failed.
    pub(crate) fn self_check_failed(&self, check: Check) {
        self.self_check_failures.get_or_create(&CheckLabel { check: check.as_str() }).inc();
    }

    /// Whether the kernel side passes its self-checks.
    pub fn set_self_check_ok(&self, ok: bool) {
        self.self_check_ok.set(u64::from(ok));
    }

    /// The pod index's metrics, for its watch task to update.
    pub fn pod_metrics(&self) -> PodMetrics {
        self.pods.clone()
    }

    /// Whether `/readyz` answers 200. `http::Health` calls this on every change of its
    /// readiness, so the two never disagree.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(u64::from(ready));
    }

    /// How many workload policies are applied and how many were rejected, now.
    pub fn set_policies(&self, applied: u64, rejected: u64) {
        self.policies.get_or_create(&StateLabel { state: "applied" }).set(applied);
        self.policies.get_or_create(&StateLabel { state: "rejected" }).set(rejected);
    }

    /// One workload policy was refused (a policy-rejected line).
    pub fn policy_rejected(&self) {
        self.policy_rejections.inc();
    }

    /// One change found inside a container of a pod of `namespace` ("" outside Kubernetes),
    /// `kind` being added, removed or modified.
    pub fn container_change(&self, namespace: &str, kind: &'static str) {
        self.container_changes.get_or_create(&NamespaceKindLabel { namespace: namespace.to_owned(), kind }).inc();
    }

    /// One drift-exec line: a container of a pod of `namespace` ran a file not as its image has it.
    pub fn drift_exec(&self, namespace: &str) {
        self.drift_exec.get_or_create(&NamespaceLabel { namespace: namespace.to_owned() }).inc();
    }

    /// One layer-modified line: a monitored file of an image layer was written on the node.
    pub fn layer_modified(&self) {
        self.layer_modifications.inc();
    }

    /// The Kubernetes writers' metrics (Events, the node status), for their tasks to update.
    pub fn kube_write_metrics(&self) -> KubeWriteMetrics {
        self.kube_writes.clone()
    }

    /// The whole exposition, in the format named by [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and our label values are plain identifiers.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("encoding the metrics failed: {e}");
        }
        text
    }

    /// The whole exposition in the classic text format 0.0.4 ([`CLASSIC_CONTENT_TYPE`]),
    /// rewritten from [`Metrics::encode`]'s (see `classic` for why and how).
    pub fn encode_classic(&self) -> String {
        classic::from_openmetrics(&self.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exported_names_and_values() {
        let m = Metrics::new();
        m.event("write");
        m.event("write");
        m.lost(3, LostBy::Kernel);
        m.set_baseline(42, 1_700_000_000.5, true);
        m.verified(1_700_000_100.0, 0, 1, 2, 0, Duration::from_millis(1500));
        m.rehash_seconds(Duration::from_micros(20));
        let text = m.encode();
        let build = format!("kubefim_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        for line in [
            build.as_str(),
            "kubefim_events_total{op=\"write\"} 2",
            "kubefim_changes_total{kind=\"renamed\"} 0",
            "kubefim_lost_events_total{dropped_by=\"kernel\"} 3",
            "kubefim_lost_events_total{dropped_by=\"watcher\"} 0",
            "# UNIT kubefim_rehash_duration_seconds seconds",
            "kubefim_rehash_duration_seconds_bucket{le=\"0.000025\"} 1",
            "kubefim_rehash_duration_seconds_count 1",
            "kubefim_baseline_entries 42",
            "kubefim_baseline_created_timestamp_seconds 1700000000.5",
            "kubefim_baseline_trusted 1",
            "kubefim_last_verify_success 0",
            "kubefim_last_verify_changes{kind=\"modified\"} 2",
            "kubefim_last_verify_duration_seconds 1.5",
            "kubefim_verify_runs_total{result=\"changed\"} 1",
            "kubefim_verify_runs_total{result=\"clean\"} 0",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }

    #[test]
    fn kubernetes_and_container_metrics() {
        let m = Metrics::new();
        let text = m.encode();
        // At zero before anything happens, where the label set is fixed.
        for line in [
            "kubefim_ready 0",
            "kubefim_workload_policies{state=\"applied\"} 0",
            "kubefim_workload_policies{state=\"rejected\"} 0",
            "kubefim_policy_rejections_total 0",
            "kubefim_layer_modifications_total 0",
            "kubefim_kube_events_total{result=\"suppressed\"} 0",
            "kubefim_node_status_writes_total{result=\"failed\"} 0",
            "# TYPE kubefim_container_changes counter",
            "# TYPE kubefim_drift_exec counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        m.set_ready(true);
        m.set_policies(3, 1);
        m.policy_rejected();
        m.container_change("shop", "added");
        m.container_change("shop", "added");
        m.container_change("", "modified");
        m.drift_exec("shop");
        m.layer_modified();
        let kube = m.kube_write_metrics();
        kube.event("created");
        kube.clone().event("aggregated");
        kube.status_write(true);
        kube.status_write(false);
        let text = m.encode();
        for line in [
            "kubefim_ready 1",
            "kubefim_workload_policies{state=\"applied\"} 3",
            "kubefim_workload_policies{state=\"rejected\"} 1",
            "kubefim_policy_rejections_total 1",
            "kubefim_container_changes_total{namespace=\"shop\",kind=\"added\"} 2",
            "kubefim_container_changes_total{namespace=\"\",kind=\"modified\"} 1",
            "kubefim_drift_exec_total{namespace=\"shop\"} 1",
            "kubefim_layer_modifications_total 1",
            "kubefim_kube_events_total{result=\"created\"} 1",
            "kubefim_kube_events_total{result=\"aggregated\"} 1",
            "kubefim_node_status_writes_total{result=\"ok\"} 1",
            "kubefim_node_status_writes_total{result=\"failed\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
    }

    #[test]
    fn classic_text_names_what_openmetrics_does() {
        let m = Metrics::new();
        m.container_change("shop", "added");
        let text = m.encode_classic();
        let build = format!("kubefim_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        for line in [
            "# TYPE kubefim_build_info gauge",
            build.as_str(),
            "# TYPE kubefim_changes_total counter",
            "# TYPE kubefim_rehash_duration_seconds histogram",
            "kubefim_rehash_duration_seconds_count 0",
            "# TYPE kubefim_container_changes_total counter",
            "kubefim_container_changes_total{namespace=\"shop\",kind=\"added\"} 1",
            "# TYPE kubefim_ready gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
        }
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains(" info\n"), "{text}");
        // Every sample of one format is in the other.
        let samples = |t: &str| t.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(samples(&text), samples(&m.encode()));
    }

    #[test]
    fn errors_win_over_changes() {
        let m = Metrics::new();
        m.verified(1.0, 1, 0, 0, 2, Duration::ZERO);
        let text = m.encode();
        assert!(text.contains("kubefim_verify_runs_total{result=\"error\"} 1\n"), "{text}");
        assert!(text.contains("kubefim_last_verify_errors 2\n"), "{text}");
    }
}
