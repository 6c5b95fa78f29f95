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
//! that counting a kernel event allocates nothing.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
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

/// `version="..."` of `kubefim_build_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
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
    pods: PodMetrics,
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
            pods: PodMetrics::default(),
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
        r.register("kubefim_events", "Kernel events received, by operation", self.events.clone());
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

    /// The whole exposition, in the format named by [`CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and our label values are plain identifiers.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!("encoding the metrics failed: {e}");
        }
        text
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
    fn errors_win_over_changes() {
        let m = Metrics::new();
        m.verified(1.0, 1, 0, 0, 2, Duration::ZERO);
        let text = m.encode();
        assert!(text.contains("kubefim_verify_runs_total{result=\"error\"} 1\n"), "{text}");
        assert!(text.contains("kubefim_last_verify_errors 2\n"), "{text}");
    }
}
