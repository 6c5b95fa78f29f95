//! What the agent writes to the Kubernetes API, asserted as the requests the stand-in API
//! server recorded: Events about drift on pods and the node (kubefim_watcher::kube_events:
//! where, about what, said how, aggregated, rate-limited, retried) and the node's
//! FimNodeStatus (kubefim_watcher::node_status: created once, its status in the CRD's shape,
//! writes coalesced, state kept across failures). The writers run on a runtime of the test's
//! own, as they run on the agent's.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use common::api::{ApiServer, Recorded};
use common::deploy::validate_against_crd;
use kubefim_watcher::kube_events::{Config, Drift, KubeEvents, Reason, Regarding};
use kubefim_watcher::metrics::Metrics;
use kubefim_watcher::model::VerifyResult;
use kubefim_watcher::node_status::{
    BaselineStatus, ConditionStatus, ConditionType, NodeStatusWriter, VerifyStatus, WatcherStatus, kube_time,
};
use serde_json::{Value, json};

const NODE: &str = "node-1";
const POD_UID: &str = "6b1c2a4e-1111-4222-8333-000000000001";
const STATUS: &str = "/apis/kubefim.io/v1alpha1/fimnodestatuses/node-1";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// A client of the stand-in API server (the writers' task runs on `rt`).
fn client(rt: &tokio::runtime::Runtime, api: &ApiServer) -> kube::Client {
    let _in = rt.enter();
    let config = kube::Config::new(api.url().parse().expect("the stand-in's URL"));
    kube::Client::try_from(config).expect("a client of the stand-in API server")
}

/// Polls `f` every 10 ms until it gives a value, or panics after `within`.
#[track_caller]
fn until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < within, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kubefim_kube_events_total` and `kubefim_node_status_writes_total` by result, as /metrics
/// says them.
fn counts(metrics: &Metrics, family: &str) -> HashMap<String, u64> {
    let prefix = format!("{family}_total{{result=\"");
    metrics
        .encode()
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (result, value) = l.split_once("\"} ")?;
            Some((result.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn event_counts(metrics: &Metrics) -> [u64; 4] {
    let c = counts(metrics, "kubefim_kube_events");
    ["created", "aggregated", "suppressed", "failed"].map(|r| c.get(r).copied().unwrap_or(0))
}

/// The Event writes (creates and patches) recorded so far.
fn event_writes(api: &ApiServer) -> Vec<Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| ["POST", "PATCH"].contains(&r.method.as_str()) && r.path.contains("/events"))
        .collect()
}

fn pod(name: &str) -> Regarding {
    Regarding::Pod { namespace: "shop".into(), name: name.into(), uid: POD_UID.into() }
}

fn drift(regarding: Regarding, path: &str) -> Drift {
    Drift {
        regarding,
        reason: Reason::FileDrift,
        path: path.into(),
        kind: "modified".into(),
        writer: Some("sh (pid 42)".into()),
        container: Some("app".into()),
        secret: false,
    }
}

/// Test limits: production's, with retries that wait milliseconds.
fn config() -> Config {
    Config { backoff: Duration::from_millis(20), write_timeout: Duration::from_secs(1), ..Config::default() }
}

#[test]
fn drift_in_a_pod_is_a_warning_event_on_the_pod_in_its_namespace_aggregated_when_repeated() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let _in = rt.enter();
    let events = KubeEvents::start_with(client(&rt, &api), NODE, metrics.kube_write_metrics(), config());
    events.record(drift(pod("web-1"), "/etc/app.conf"));
    let created = until("the Event's create", Duration::from_secs(10), || event_writes(&api).first().cloned());

    assert_eq!((created.method.as_str(), created.path.as_str()), ("POST", "/api/v1/namespaces/shop/events"));
    let event = created.body.expect("a JSON body");
    let name = event["metadata"]["name"].as_str().expect("a name").to_owned();
    let suffix = name.strip_prefix("web-1.").unwrap_or_else(|| panic!("named after the pod: {name}"));
    assert!(suffix.len() == 16 && suffix.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{name}");
    assert_eq!(event["metadata"]["namespace"], "shop");
    assert_eq!(
        event["involvedObject"],
        json!({"apiVersion": "v1", "kind": "Pod", "name": "web-1", "namespace": "shop", "uid": POD_UID})
    );
    assert_eq!(event["reason"], "FileDrift");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["message"], "modified /etc/app.conf by sh (pid 42) in container app");
    assert_eq!(event["source"], json!({"component": "kubefim", "host": NODE}));
    assert_eq!(event["reportingComponent"], "kubefim.io/agent");
    assert_eq!(event["reportingInstance"], NODE);
    assert_eq!(event["count"], 1);
    assert!(event["firstTimestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{event:#}");
    assert_eq!(event["firstTimestamp"], event["lastTimestamp"]);
    assert!(event.get("eventTime").is_none_or(Value::is_null), "{event:#}");

    // The same drift again: the Event's count, not a second Event.
    events.record(Drift { writer: Some("vi (pid 43)".into()), ..drift(pod("web-1"), "/etc/app.conf") });
    let patched = until("the Event's patch", Duration::from_secs(10), || event_writes(&api).get(1).cloned());
    assert_eq!(
        (patched.method.as_str(), patched.path.as_str()),
        ("PATCH", &*format!("/api/v1/namespaces/shop/events/{name}"))
    );
    assert_eq!(patched.content_type.as_deref(), Some("application/merge-patch+json"));
    let patch = patched.body.expect("a JSON body");
    assert_eq!(patch["count"], 2, "{patch:#}");
    assert_eq!(patch["message"], "modified /etc/app.conf by vi (pid 43) in container app");
    assert!(patch["lastTimestamp"].is_string(), "{patch:#}");
    let stored = api.object(&format!("/api/v1/namespaces/shop/events/{name}")).expect("the Event is stored");
    assert_eq!(stored["count"], 2);

    // Another path, and a secret rule's file: Events of their own; the secret's says only
    // the kind and the path.
    events.record(drift(pod("web-1"), "/etc/other.conf"));
    events.record(Drift { secret: true, kind: "added".into(), ..drift(pod("web-1"), "/run/secrets/token") });
    let writes =
        until("two more creates", Duration::from_secs(10), || Some(event_writes(&api)).filter(|w| w.len() == 4));
    assert!(writes[2..].iter().all(|w| w.method == "POST"), "{writes:#?}");
    assert_eq!(writes[3].body.as_ref().unwrap()["message"], "added /run/secrets/token");
    assert_eq!(api.objects("/api/v1/namespaces/shop/events").len(), 3);
    until("the counts", Duration::from_secs(5), || (event_counts(&metrics) == [3, 1, 0, 0]).then_some(()));
}

#[test]
fn a_host_change_is_an_event_on_the_node_in_default() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let node_uid = "0f0e0d0c-1111-4222-8333-000000000009";
    api.push("/api/v1/nodes", "ADDED", json!({"metadata": {"name": NODE, "uid": node_uid}}));
    let _in = rt.enter();
    let events = KubeEvents::start_with(client(&rt, &api), NODE, metrics.kube_write_metrics(), config());
    events.record(Drift { writer: None, container: None, ..drift(Regarding::Node, "/etc/kubernetes/kubelet.conf") });
    let created = until("the Event's create", Duration::from_secs(10), || event_writes(&api).first().cloned());
    assert_eq!(created.path, "/api/v1/namespaces/default/events");
    let event = created.body.unwrap();
    assert_eq!(event["involvedObject"], json!({"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": node_uid}));
    assert!(event["metadata"]["name"].as_str().unwrap().starts_with("node-1."), "{event:#}");
    assert_eq!(event["metadata"]["namespace"], "default");
    assert_eq!(event["message"], "modified /etc/kubernetes/kubelet.conf");
    // The uid came from one GET of the node, the only read the writer makes.
    let reads: Vec<_> = api.requests().into_iter().filter(|r| r.method == "GET").map(|r| r.path).collect();
    assert_eq!(reads, ["/api/v1/nodes/node-1"]);
}

#[test]
fn a_storm_on_one_pod_makes_a_bounded_number_of_writes_and_a_summary() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let _in = rt.enter();
    // Production's limits but a 1 s refill, so that the summary comes within the test.
    let limits = Config { object_refill: Duration::from_secs(1), ..config() };
    let events = KubeEvents::start_with(client(&rt, &api), NODE, metrics.kube_write_metrics(), limits.clone());
    let start = Instant::now();
    for i in 0..10_000 {
        // Seven paths: the first writes are creates, then patches of the same Events.
        events.record(drift(pod("web-1"), &format!("/app/cache/f{}", i % 7)));
    }
    let storm = start.elapsed();
    // Every drift is accounted for once the queue is written.
    until("every drift counted", Duration::from_secs(10), || {
        let [created, aggregated, suppressed, failed] = event_counts(&metrics);
        (created + aggregated + suppressed + failed == 10_000).then_some(())
    });
    let [created, aggregated, suppressed, failed] = event_counts(&metrics);
    assert_eq!(failed, 0);
    assert_eq!(created + aggregated + suppressed, 10_000);
    // The bound of kube_events' doc: burst + one per refill for the storm's duration.
    let bound = u64::from(limits.object_burst) + storm.as_secs() / limits.object_refill.as_secs() + 1;
    let is_summary =
        |w: &Recorded| w.body.as_ref().is_some_and(|b| b["message"].to_string().contains(" more file changes "));
    let during = u64::try_from(event_writes(&api).iter().filter(|w| !is_summary(w)).count()).unwrap();
    assert!(during <= bound, "{during} writes for a storm of {storm:?} (bound {bound})");
    assert!(created + aggregated <= bound && created >= 7, "created {created}, aggregated {aggregated}");

    // The summary, once the pod's bucket has a token again, says how many were suppressed.
    let summaries = |api: &ApiServer| -> Vec<u64> {
        event_writes(api)
            .iter()
            .filter_map(|w| {
                w.body.as_ref()?["message"]
                    .as_str()?
                    .split_once(" more file changes in pod web-1 since ")
                    .map(|(n, _)| n.parse().unwrap())
            })
            .collect()
    };
    let first = until("a summary", Duration::from_secs(5), || summaries(&api).first().copied());
    assert_eq!(first, suppressed, "{:#?}", event_writes(&api));
    let summary = event_writes(&api).into_iter().find(is_summary).unwrap();
    let body = summary.body.unwrap();
    assert_eq!(summary.path, "/api/v1/namespaces/shop/events");
    assert_eq!(body["involvedObject"]["uid"], POD_UID);
    assert_eq!(body["reason"], "FileDrift");
    assert!(body["message"].as_str().unwrap().contains(" UTC, e.g. /app/cache/f"), "{body:#}");
    assert_eq!(event_counts(&metrics), [created, aggregated, suppressed, 0], "a summary is not a drift of its own");
}

#[test]
fn a_storm_on_many_pods_is_held_by_the_node_bucket() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let _in = rt.enter();
    let limits = config();
    let events = KubeEvents::start_with(client(&rt, &api), NODE, metrics.kube_write_metrics(), limits.clone());
    let start = Instant::now();
    for i in 0..10_000 {
        events.record(drift(pod(&format!("web-{}", i % 100)), &format!("/app/f{i}")));
    }
    until("every drift counted", Duration::from_secs(10), || {
        (event_counts(&metrics).iter().sum::<u64>() == 10_000).then_some(())
    });
    let elapsed = start.elapsed();
    let writes = u64::try_from(event_writes(&api).len()).unwrap();
    let bound = u64::from(limits.node_burst) + elapsed.as_secs() / limits.node_refill.as_secs() + 1;
    assert!(writes <= bound, "{writes} writes in {elapsed:?} (bound {bound})");
    let [created, aggregated, suppressed, failed] = event_counts(&metrics);
    assert_eq!((created, aggregated, failed), (50, 0, 0), "the node's burst, then nothing");
    assert_eq!(suppressed, 10_000 - 50);
}

#[test]
fn failed_event_writes_are_retried_then_counted_failed() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let _in = rt.enter();
    let events = KubeEvents::start_with(client(&rt, &api), NODE, metrics.kube_write_metrics(), config());

    // Two 500s, then the create goes through (retries: 3).
    api.fail_next_writes(2, 500);
    events.record(drift(pod("web-1"), "/etc/a"));
    until("the create", Duration::from_secs(10), || (event_counts(&metrics)[0] == 1).then_some(()));
    assert_eq!(event_writes(&api).len(), 3, "{:#?}", event_writes(&api));

    // Failing for longer than the retries: one failure, four attempts.
    api.fail_next_writes(100, 500);
    events.record(drift(pod("web-1"), "/etc/b"));
    until("the failure", Duration::from_secs(10), || (event_counts(&metrics)[3] == 1).then_some(()));
    assert_eq!(event_writes(&api).len(), 3 + 4);

    // 503: the client retries it itself, for minutes; the write timeout ends it.
    api.fail_next_writes(1000, 503);
    let start = Instant::now();
    events.record(drift(pod("web-1"), "/etc/d"));
    until("the timeout", Duration::from_secs(10), || (event_counts(&metrics)[3] == 2).then_some(()));
    assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
    api.fail_next_writes(0, 503);
    let before = event_writes(&api).len();

    // Forbidden is not retried: trying again would not help.
    api.fail_next_writes(1, 403);
    events.record(drift(pod("web-1"), "/etc/c"));
    until("the third failure", Duration::from_secs(10), || (event_counts(&metrics)[3] == 3).then_some(()));
    assert_eq!(event_writes(&api).len(), before + 1);
    assert_eq!(event_counts(&metrics), [1, 0, 0, 3]);
}

/// Fills every part of the status, as the watch loop would.
fn fill(status: &mut kubefim_watcher::node_status::NodeStatus, now: SystemTime) {
    status.baseline =
        Some(BaselineStatus { trusted: true, created: Some(kube_time(now)), entries: 1234, policy: "node".into() });
    status.last_verify = Some(VerifyStatus {
        time: kube_time(now),
        result: VerifyResult::Changed,
        added: 1,
        removed: 0,
        modified: 2,
        errors: 0,
    });
    status.watcher = Some(WatcherStatus {
        ready: true,
        programs_attached: 42,
        programs_degraded: 0,
        lost_events: 0,
        last_rescan: Some(kube_time(now)),
    });
    status.set_policies(3, &["shop/bad-selector".to_owned()]);
    status.container_drift("shop", false);
    status.container_drift("shop", true);
    status.container_drift("bank", false);
    status.record_change("/etc/hosts", "modified", now);
    status.record_change("/etc/passwd", "modified", now);
    status.set_condition(ConditionType::Ready, ConditionStatus::True, "Watching", "the watcher is ready", now);
    status.set_condition(ConditionType::BaselineTrusted, ConditionStatus::True, "SignatureVerified", "signed", now);
    status.set_condition(ConditionType::PoliciesApplied, ConditionStatus::False, "Rejected", "shop/bad-selector", now);
}

#[test]
fn the_node_status_is_created_once_then_written_through_its_status_subresource_in_the_crds_shape() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    let _in = rt.enter();
    let interval = Duration::from_millis(300);
    let writer = NodeStatusWriter::start(client(&rt, &api), NODE, metrics.kube_write_metrics(), interval);
    std::thread::sleep(Duration::from_millis(100));
    assert!(api.requests().is_empty(), "nothing to write before the first update");
    let now = SystemTime::now();
    writer.update(|s| fill(s, now));
    let status =
        until("the status", Duration::from_secs(10), || api.object(STATUS).filter(|o| o.get("status").is_some()));

    let calls: Vec<(String, String)> = api.requests().into_iter().map(|r| (r.method, r.path)).collect();
    let collection = "/apis/kubefim.io/v1alpha1/fimnodestatuses";
    assert_eq!(
        calls,
        [("GET", STATUS), ("POST", collection), ("PATCH", &*format!("{STATUS}/status"))]
            .map(|(m, p)| (m.to_owned(), p.to_owned()))
    );
    let requests = api.requests();
    let created = requests[1].body.as_ref().unwrap();
    assert_eq!(created["apiVersion"], "kubefim.io/v1alpha1");
    assert_eq!(created["kind"], "FimNodeStatus");
    assert_eq!(created["metadata"]["name"], NODE);
    assert_eq!(created["metadata"]["labels"], json!({"app.kubernetes.io/name": "kubefim"}));
    assert_eq!(requests[2].content_type.as_deref(), Some("application/merge-patch+json"));

    validate_against_crd("FimNodeStatus", &status).unwrap_or_else(|e| panic!("{e}\n{status:#}"));
    let s = &status["status"];
    let t = kube_time(now);
    let t = serde_json::to_value(&t).unwrap();
    assert_eq!(s["node"], NODE);
    assert_eq!(s["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert!(s["updateTime"].as_str().is_some_and(|u| u.len() == 20 && u.ends_with('Z')), "{s:#}");
    assert_eq!(s["baseline"], json!({"trusted": true, "created": t, "entries": 1234, "policy": "node"}));
    assert_eq!(
        s["lastVerify"],
        json!({"time": t, "result": "changed", "added": 1, "removed": 0, "modified": 2, "errors": 0})
    );
    assert_eq!(
        s["watcher"],
        json!({"ready": true, "programsAttached": 42, "programsDegraded": 0, "lostEvents": 0, "lastRescan": t})
    );
    assert_eq!(s["policies"], json!({"applied": 3, "rejected": 1, "rejectedNames": ["shop/bad-selector"]}));
    assert_eq!(
        s["containerDrift"],
        json!([{"namespace": "bank", "changes": 1, "driftExecs": 0}, {"namespace": "shop", "changes": 1, "driftExecs": 1}])
    );
    assert_eq!(
        s["recentChanges"],
        json!([{"path": "/etc/passwd", "kind": "modified", "time": t}, {"path": "/etc/hosts", "kind": "modified", "time": t}])
    );
    let conditions: Vec<(&str, &str, &str)> = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap(), c["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        conditions,
        [
            ("Ready", "True", "Watching"),
            ("BaselineTrusted", "True", "SignatureVerified"),
            ("PoliciesApplied", "False", "Rejected")
        ]
    );
    assert!(s["conditions"].as_array().unwrap().iter().all(|c| c["lastTransitionTime"] == t), "{s:#}");

    // A second of updates: coalesced into a write per interval, the last state written, the
    // object never created again.
    let start = Instant::now();
    for i in 0..100 {
        writer.update(|s| s.container_drift(&format!("ns-{}", i % 10), false));
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = start.elapsed();
    let all_written = |o: &Value| {
        let drift = o["status"]["containerDrift"].as_array().unwrap();
        drift.len() == 12
            && drift[1..11].iter().all(|d| d["namespace"].as_str().unwrap().starts_with("ns-") && d["changes"] == 10)
    };
    let status = until("every update written", Duration::from_secs(10), || api.object(STATUS).filter(all_written));
    std::thread::sleep(interval * 3);
    let patches = api.requests().iter().filter(|r| r.method == "PATCH").count();
    let bound = usize::try_from(elapsed.as_millis() / interval.as_millis()).unwrap() + 2;
    assert!(patches - 1 <= bound, "{} writes for {elapsed:?} of updates (bound {bound})", patches - 1);
    assert_eq!(api.requests().iter().filter(|r| r.method == "POST").count(), 1);
    validate_against_crd("FimNodeStatus", &status).unwrap_or_else(|e| panic!("{e}\n{status:#}"));
    // Nothing changed since: nothing written.
    assert_eq!(api.requests().iter().filter(|r| r.method == "PATCH").count(), patches);
    assert_eq!(counts(&metrics, "kubefim_node_status_writes").get("failed").copied().unwrap_or(0), 0);
}

#[test]
fn the_node_status_reaches_a_failing_server_whole_and_drops_what_a_previous_agent_left() {
    let (rt, api, metrics) = (runtime(), ApiServer::empty(), Metrics::new());
    // A previous agent's object, with a verify this one has not run yet.
    api.push(
        "/apis/kubefim.io/v1alpha1/fimnodestatuses",
        "ADDED",
        json!({"metadata": {"name": NODE}, "status": {"node": NODE, "agentVersion": "0.0.1",
            "lastVerify": {"time": "2026-01-01T00:00:00Z", "result": "clean", "added": 0, "removed": 0, "modified": 0, "errors": 0}}}),
    );
    let _in = rt.enter();
    let interval = Duration::from_millis(50);
    let writer = NodeStatusWriter::start(client(&rt, &api), NODE, metrics.kube_write_metrics(), interval);
    api.fail_next_writes(3, 500);
    for i in 0..5 {
        writer.update(|s| s.record_change(&format!("/etc/f{i}"), "added", SystemTime::now()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = until("the status after the failures", Duration::from_secs(20), || {
        api.object(STATUS).filter(|o| o["status"]["recentChanges"].as_array().is_some_and(|c| c.len() == 5))
    });
    let paths: Vec<&str> =
        status["status"]["recentChanges"].as_array().unwrap().iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/etc/f4", "/etc/f3", "/etc/f2", "/etc/f1", "/etc/f0"]);
    assert!(status["status"].get("lastVerify").is_none(), "the previous agent's verify is gone: {status:#}");
    assert_eq!(status["status"]["agentVersion"], env!("CARGO_PKG_VERSION"));
    validate_against_crd("FimNodeStatus", &status).unwrap_or_else(|e| panic!("{e}\n{status:#}"));
    let writes = counts(&metrics, "kubefim_node_status_writes");
    assert_eq!(writes.get("failed"), Some(&3), "{writes:?}");
    assert!(writes.get("ok").is_some_and(|ok| *ok >= 1), "{writes:?}");
    let patches: Vec<_> = api.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 4, "three refused, one through");
    assert_eq!(
        patches[3].body.as_ref().unwrap()["status"].get("lastVerify"),
        Some(&Value::Null),
        "removed with a null"
    );
    // The object existed: never created.
    assert!(api.requests().iter().all(|r| r.method != "POST"));
}
