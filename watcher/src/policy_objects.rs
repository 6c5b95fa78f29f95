//! Workload policies as Kubernetes objects (`--kubernetes --containers`): it owns the watches
//! of `WorkloadFimPolicy` (every namespace), `ClusterWorkloadFimPolicy` and `Namespace` (whose
//! labels a cluster policy's `namespaceSelector` matches), all get/list/watch, and turns what
//! they hold into the set of policies in force: the `--workload-policy` files plus every object
//! that parses, with each object that does not as a [`Rejected`]. A new set is sent a moment
//! after the objects change (a burst of changes makes one set). It does not apply the set to
//! containers (`containers` does) and never exits: a watch that fails is retried with backoff
//! while the last set stays in force.
//!
//! An object is checked by the same parser as a policy file (`kubefim_baseline::workload`),
//! fed the object's kind, name, namespace and spec: a field the parser does not know (an API
//! server that does not prune, or a newer CRD than the agent) rejects the object rather than
//! being ignored, as it would be in a file. A WorkloadFimPolicy object always has a namespace,
//! so it selects only its own namespace's pods.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::pin;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, reflector::store::Writer};
use kube::{Api, Client, ResourceExt};
use kubefim_baseline::workload::{Gathered, PolicyKind, WorkloadPolicies};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long after a change the set is rebuilt: the rest of a burst (`kubectl apply -f dir/`)
/// goes into the same set, well within the second a change must take to apply.
const SETTLE: Duration = Duration::from_millis(100);

/// The API group and version of the policy kinds.
const GROUP: &str = "kubefim.io";
const VERSION: &str = "v1alpha1";

/// The policies in force after a change, and the objects that could not be applied.
#[derive(Debug)]
pub struct PolicySet {
    /// The files' policies and every object that parsed, namespace selectors resolved.
    pub policies: WorkloadPolicies,
    /// Objects applied (files not counted).
    pub applied: usize,
    /// Objects that could not be.
    pub rejected: Vec<Rejected>,
}

/// A policy object that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its kind.
    pub kind: PolicyKind,
    /// Its namespace (a WorkloadFimPolicy's).
    pub namespace: Option<String>,
    /// Its name.
    pub name: String,
    /// Its `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// Why.
    pub error: String,
}

impl Rejected {
    /// `namespace/name`, or `name`.
    pub fn qualified_name(&self) -> String {
        qualified(self.namespace.as_deref(), &self.name)
    }
}

/// The latest set: None until both policy kinds were listed once.
pub type PolicySets = watch::Receiver<Option<std::sync::Arc<PolicySet>>>;

/// Starts the watches on the current tokio runtime; each new set replaces the receiver's
/// value (a reader that was busy sees the latest, never a backlog). `files` are the
/// `--workload-policy` files' policies, part of every set.
pub fn start(client: Client, files: WorkloadPolicies) -> PolicySets {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, files, tx));
    rx
}

fn resource(kind: PolicyKind, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind.name()), plural)
}

async fn run(client: Client, files: WorkloadPolicies, tx: watch::Sender<Option<std::sync::Arc<PolicySet>>>) {
    let workload = resource(PolicyKind::Workload, "workloadfimpolicies");
    let cluster = resource(PolicyKind::Cluster, "clusterworkloadfimpolicies");
    let workload_store = Writer::new(workload.clone());
    let workload_reader = workload_store.as_reader();
    let cluster_store = Writer::new(cluster.clone());
    let cluster_reader = cluster_store.as_reader();
    let (namespace_reader, namespace_writer) = reflector::store::<Namespace>();
    let config = watcher::Config::default().any_semantic();
    let mut workloads = pin!(reflector::reflector(
        workload_store,
        watcher::watcher(Api::<DynamicObject>::all_with(client.clone(), &workload), config.clone()).default_backoff(),
    ));
    let mut clusters = pin!(reflector::reflector(
        cluster_store,
        watcher::watcher(Api::<DynamicObject>::all_with(client.clone(), &cluster), config.clone()).default_backoff(),
    ));
    let mut namespaces = pin!(reflector::reflector(
        namespace_writer,
        watcher::watcher(Api::<Namespace>::all(client), config).default_backoff()
    ));
    // Nothing is sent before both policy kinds were listed once: a set built from half the
    // objects would take policies away from running containers for a moment.
    let mut listed = [false; 3];
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let sleep =
            tokio::time::sleep_until(due.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)));
        let (which, event) = tokio::select! {
            Some(e) = workloads.next() => (0, e.map(|e| matches!(e, Event::InitDone)).map_err(|e| ("WorkloadFimPolicy", e))),
            Some(e) = clusters.next() => (1, e.map(|e| matches!(e, Event::InitDone)).map_err(|e| ("ClusterWorkloadFimPolicy", e))),
            Some(e) = namespaces.next() => (2, e.map(|e| matches!(e, Event::InitDone)).map_err(|e| ("Namespace", e))),
            _ = sleep, if due.is_some() => {
                due = None;
                let set = build(&files, &workload_reader, &cluster_reader, &namespace_reader);
                if tx.send(Some(std::sync::Arc::new(set))).is_err() {
                    // The watcher is gone.
                    return;
                }
                continue;
            }
        };
        match event {
            Ok(init_done) => {
                listed[which] |= init_done;
                // Namespaces matter only to cluster policies with a namespace selector, and
                // are not waited for: without them such a policy selects nothing yet.
                if listed[0] && listed[1] {
                    due.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                }
            }
            Err((kind, error)) => tracing::warn!(
                error = %kubefim_baseline::error::chain(&error),
                "watching {kind} objects failed (is deploy/'s CRD installed, and may the service account list \
                 them?); the policies in force stay, and the watch is retried with backoff"
            ),
        }
    }
}

/// The set the stores hold now.
fn build(
    files: &WorkloadPolicies,
    workloads: &Store<DynamicObject>,
    clusters: &Store<DynamicObject>,
    namespaces: &Store<Namespace>,
) -> PolicySet {
    let mut objects: Vec<(PolicyKind, std::sync::Arc<DynamicObject>)> = workloads
        .state()
        .into_iter()
        .map(|o| (PolicyKind::Workload, o))
        .chain(clusters.state().into_iter().map(|o| (PolicyKind::Cluster, o)))
        .collect();
    // A stable order: sets built from the same objects are the same set.
    objects.sort_by(|(ka, a), (kb, b)| {
        (ka.name(), a.namespace(), a.name_any()).cmp(&(kb.name(), b.namespace(), b.name_any()))
    });
    let mut policies = Gathered::new(files.clone());
    let mut applied = 0;
    let mut rejected = Vec::new();
    for (kind, object) in objects {
        let parsed = parse(kind, &object).and_then(|p| policies.add(p).map_err(|e| e.to_string()));
        match parsed {
            Ok(()) => applied += 1,
            Err(error) => rejected.push(Rejected {
                kind,
                namespace: object.namespace(),
                name: object.name_any(),
                resource_version: object.resource_version(),
                error,
            }),
        }
    }
    let labels: BTreeMap<String, BTreeMap<String, String>> =
        namespaces.state().iter().map(|n| (n.name_any(), n.labels().clone())).collect();
    let mut policies = policies.finish();
    policies.resolve_namespaces(&labels);
    PolicySet { policies, applied, rejected }
}

/// One object through the policy file parser.
fn parse(kind: PolicyKind, object: &DynamicObject) -> Result<WorkloadPolicies, String> {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), Value::from(object.name_any()));
    if let Some(ns) = object.namespace() {
        metadata.insert("namespace".into(), Value::from(ns));
    }
    let Some(spec) = object.data.get("spec") else {
        return Err("the object has no spec; see deploy/examples for what one holds".to_owned());
    };
    let doc = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": kind.name(),
        "metadata": metadata,
        "spec": spec,
    });
    // JSON is YAML: the object goes through the file parser unchanged.
    let origin =
        format!("{} {} (Kubernetes API)", kind.name(), qualified(object.namespace().as_deref(), &object.name_any()));
    WorkloadPolicies::from_yaml(&doc.to_string(), &origin).map_err(|e| e.to_string())
}

fn qualified(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

/// What changed between two rejected lists: those to report (new, or a new version).
pub fn newly_rejected<'a>(before: &BTreeSet<(String, Option<String>)>, now: &'a [Rejected]) -> Vec<&'a Rejected> {
    now.iter().filter(|r| !before.contains(&rejection_key(r))).collect()
}

/// The key [`newly_rejected`] remembers a rejection by.
pub fn rejection_key(r: &Rejected) -> (String, Option<String>) {
    (format!("{}/{}", r.kind.name(), r.qualified_name()), r.resource_version.clone())
}
