//! Drift where people look: a Warning Kubernetes Event (core/v1) on the Pod whose container
//! drifted, or on the Node for a host change, so that `kubectl describe pod` and `kubectl get
//! events -n NS` show it to the pod's tenant (a pod's events live in its namespace; a Node's in
//! `default`, as the kubelet writes them). It owns the aggregation, the rate limit and the
//! writes; it does not decide what is drift (the watch loop does and hands over a [`Drift`]),
//! and it never carries file content: a message names the kind, the path, the writer and the
//! container, and for a secret rule only the kind and the path.
//!
//! [`KubeEvents::record`] never blocks and never fails: it decides under a short lock whether
//! the drift may be written and queues it for the writer task on a bounded channel. The task
//! writes as client-go's EventCorrelator does: the same (object, reason, path, kind) again
//! within the aggregation window (10 min) PATCHes the existing Event's count, lastTimestamp
//! and message instead of creating another.
//!
//! The bound. Every API write (a create, a patch, a summary) takes a token from the object's
//! bucket (burst 10, one more every 10 s) and from the node's (burst 50, one more a second).
//! A storm of T seconds on one pod therefore makes at most `10 + ⌊T / 10 s⌋` writes about
//! that pod (10 for a storm of 10,000 changes in one second), and the node at most
//! `50 + ⌊T / 1 s⌋` writes in all; a write that fails is retried at most 3 times, with
//! backoff, for at most 30 s. Drifts over the limit are counted `suppressed` and folded into
//! one summary per object, written when the object's bucket has a token again ("N more file
//! changes in pod P since HH:MM:SS UTC, e.g. ..."; later ones aggregate into it), so the pod's
//! events still say drift went on. Exact counts are in the metrics and the FimNodeStatus, not
//! in Events. Memory is bounded too: the aggregation cache and the per-object limiter each keep
//! at most 4096 entries, least recently used evicted first (with an evicted object's pending
//! summary: its drifts stay counted in the metrics).

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use lru::LruCache;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::metrics::KubeWriteMetrics;
use crate::node_status::kube_time;

/// The most bytes an Event's message carries (the API allows more; a summary needs no more).
const MAX_MESSAGE: usize = 1024;

/// How many paths a summary names as examples.
const SUMMARY_EXAMPLES: usize = 3;

/// How often at most an API failure is logged at warn (the rest are counted in the metrics).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What drifted, on which object, as the watch loop saw it. Never file content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// The Pod or the Node the Event is about.
    pub regarding: Regarding,
    /// The Event's reason.
    pub reason: Reason,
    /// The path, as the container or the host sees it.
    pub path: String,
    /// What happened: added, removed, modified, drift-exec...
    pub kind: String,
    /// Who did it, e.g. "sh (pid 42)".
    pub writer: Option<String>,
    /// The container's name in its pod.
    pub container: Option<String>,
    /// The rule is a secret's: the message says only the kind and the path.
    pub secret: bool,
}

/// The object an Event is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Regarding {
    /// A pod of this node.
    Pod {
        /// Its namespace, where the Event is written.
        namespace: String,
        /// Its name.
        name: String,
        /// Its uid.
        uid: String,
    },
    /// This node (a host change).
    Node,
}

/// An Event's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A monitored file changed.
    FileDrift,
    /// A container ran a file that is not its image's.
    DriftExecuted,
}

impl Reason {
    /// The reason as Events carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FileDrift => "FileDrift",
            Reason::DriftExecuted => "DriftExecuted",
        }
    }
}

/// The limits; [`Config::default`] is production's, tests shorten the times.
#[derive(Debug, Clone)]
pub struct Config {
    /// Writes about one object in a burst.
    pub object_burst: u32,
    /// One more write about an object per this much time.
    pub object_refill: Duration,
    /// Writes about anything in a burst.
    pub node_burst: u32,
    /// One more write per this much time.
    pub node_refill: Duration,
    /// The same drift again within this window is aggregated into the existing Event.
    pub aggregation_window: Duration,
    /// Entries of the aggregation cache and of the per-object limiter (each).
    pub cache_capacity: usize,
    /// Drifts waiting for the writer; a drift that finds the queue full is suppressed.
    pub queue: usize,
    /// Retries of a failed write (429, 5xx, no connection), each after twice the last wait.
    pub retries: u32,
    /// The first retry's wait.
    pub backoff: Duration,
    /// The longest one write may take, retries included: a kube 5 client retries 429, 503
    /// and 504 itself, up to 15 times over minutes, which would stall every other Event.
    pub write_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            object_burst: 10,
            object_refill: Duration::from_secs(10),
            node_burst: 50,
            node_refill: Duration::from_secs(1),
            aggregation_window: Duration::from_secs(600),
            cache_capacity: 4096,
            queue: 256,
            retries: 3,
            backoff: Duration::from_millis(500),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The Events writer: cheap to clone; the task it started ends once every clone is gone and
/// the queue is written.
#[derive(Clone)]
pub struct KubeEvents {
    limiter: Arc<Mutex<Limiter>>,
    queue: mpsc::Sender<Drift>,
    metrics: KubeWriteMetrics,
}

impl KubeEvents {
    /// Starts the writer task on the current tokio runtime, with production's limits.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(client: Client, node: &str, metrics: KubeWriteMetrics) -> KubeEvents {
        KubeEvents::start_with(client, node, metrics, Config::default())
    }

    /// As [`KubeEvents::start`], with these limits.
    pub fn start_with(client: Client, node: &str, metrics: KubeWriteMetrics, config: Config) -> KubeEvents {
        let (queue, jobs) = mpsc::channel(config.queue.max(1));
        let limiter = Arc::new(Mutex::new(Limiter::new(&config)));
        let writer = Writer {
            client,
            node: node.to_owned(),
            node_uid: None,
            cache: bounded(config.cache_capacity),
            config,
            metrics: metrics.clone(),
            last_name: 0,
            warned: None,
            unlogged: 0,
        };
        tokio::spawn(writer.run(jobs, Arc::clone(&limiter)));
        KubeEvents { limiter, queue, metrics }
    }

    /// Queues an Event about `drift`, or counts it suppressed (and folds it into its object's
    /// next summary) when the rate limit or the queue says no. Never blocks, never fails.
    pub fn record(&self, drift: Drift) {
        let mut limiter = self.limiter.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let drift = match limiter.take(&drift.regarding, now) {
            true => match self.queue.try_send(drift) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(drift) | mpsc::error::TrySendError::Closed(drift)) => drift,
            },
            false => drift,
        };
        limiter.suppress(&drift, SystemTime::now());
        self.metrics.event("suppressed");
    }
}

/// A summary of suppressed drifts: its message, and the first drift, whose object it is about.
struct Summary {
    message: String,
    first: Drift,
}

/// A token bucket: `tokens` now, one more per `refill` since `since`, at most `burst`.
struct Bucket {
    tokens: u32,
    since: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Bucket {
        Bucket { tokens: burst, since: now }
    }

    fn refill(&mut self, now: Instant, burst: u32, refill: Duration) {
        let earned = now.saturating_duration_since(self.since).as_nanos() / refill.as_nanos().max(1);
        let earned = u32::try_from(earned).unwrap_or(u32::MAX);
        if self.tokens.saturating_add(earned) >= burst {
            *self = Bucket::full(burst, now);
        } else {
            self.tokens += earned;
            self.since += refill * earned;
        }
    }
}

/// Drifts over the limit about one object, since the last summary.
struct Suppressed {
    count: u64,
    since: SystemTime,
    examples: Vec<String>,
    first: Drift,
    executed: u64,
}

/// One object's bucket and what it has had suppressed.
struct ObjectLimit {
    bucket: Bucket,
    suppressed: Option<Suppressed>,
}

/// The rate limit: a bucket per object and one for the node.
struct Limiter {
    object_burst: u32,
    object_refill: Duration,
    node_burst: u32,
    node_refill: Duration,
    node: Bucket,
    objects: LruCache<Regarding, ObjectLimit>,
}

impl Limiter {
    fn new(config: &Config) -> Limiter {
        Limiter {
            object_burst: config.object_burst,
            object_refill: config.object_refill,
            node_burst: config.node_burst,
            node_refill: config.node_refill,
            node: Bucket::full(config.node_burst, Instant::now()),
            objects: bounded(config.cache_capacity),
        }
    }

    /// Takes a token from `regarding`'s bucket and the node's, if both have one and no summary
    /// of `regarding` is waiting (a drift after suppressed ones joins their summary, so that
    /// the summary, written first when a token comes, keeps the order).
    fn take(&mut self, regarding: &Regarding, now: Instant) -> bool {
        let burst = self.object_burst;
        let object = self.objects.get_or_insert_mut(regarding.clone(), || ObjectLimit {
            bucket: Bucket::full(burst, now),
            suppressed: None,
        });
        object.suppressed.is_none()
            && Limiter::take_both(
                object,
                &mut self.node,
                now,
                (self.object_burst, self.object_refill),
                (self.node_burst, self.node_refill),
            )
    }

    fn take_both(
        object: &mut ObjectLimit,
        node: &mut Bucket,
        now: Instant,
        (object_burst, object_refill): (u32, Duration),
        (node_burst, node_refill): (u32, Duration),
    ) -> bool {
        object.bucket.refill(now, object_burst, object_refill);
        node.refill(now, node_burst, node_refill);
        if object.bucket.tokens == 0 || node.tokens == 0 {
            return false;
        }
        object.bucket.tokens -= 1;
        node.tokens -= 1;
        true
    }

    /// Folds a drift that may not be written into its object's next summary.
    fn suppress(&mut self, drift: &Drift, now: SystemTime) {
        // Only evicted since `take` could make a new entry here: its bucket starts empty.
        let object = self.objects.get_or_insert_mut(drift.regarding.clone(), || ObjectLimit {
            bucket: Bucket { tokens: 0, since: Instant::now() },
            suppressed: None,
        });
        let s = object.suppressed.get_or_insert_with(|| Suppressed {
            count: 0,
            since: now,
            examples: Vec::new(),
            first: drift.clone(),
            executed: 0,
        });
        s.count += 1;
        s.executed += u64::from(drift.reason == Reason::DriftExecuted);
        if s.examples.len() < SUMMARY_EXAMPLES && !s.examples.contains(&drift.path) {
            s.examples.push(drift.path.clone());
        }
    }

    /// The summaries whose objects have a token again (and the node too), taking the tokens.
    fn due_summaries(&mut self, now: Instant, node_name: &str) -> Vec<Summary> {
        let limits = ((self.object_burst, self.object_refill), (self.node_burst, self.node_refill));
        let mut due = Vec::new();
        for (_, object) in self.objects.iter_mut() {
            if object.suppressed.is_some() && Limiter::take_both(object, &mut self.node, now, limits.0, limits.1) {
                let s = object.suppressed.take().expect("checked above");
                due.push(summary(s, node_name));
            }
        }
        due
    }
}

/// The summary Event of suppressed drifts: how many, since when, a few paths.
fn summary(s: Suppressed, node: &str) -> Summary {
    let mut first = s.first;
    let whose = match &first.regarding {
        Regarding::Pod { name, .. } => format!("in pod {name}"),
        Regarding::Node => format!("on node {node}"),
    };
    let since = s.since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() % 86_400;
    let (h, m, sec) = (since / 3600, since / 60 % 60, since % 60);
    let mut message = format!("{} more file changes {whose} since {h:02}:{m:02}:{sec:02} UTC", s.count);
    if s.executed > 0 {
        message.push_str(&format!(" ({} executed drift)", s.executed));
    }
    let examples: Vec<String> = s.examples.iter().map(|p| printable(p)).collect();
    message.push_str(&format!(", e.g. {}", examples.join(", ")));
    if s.executed > 0 {
        first.reason = Reason::DriftExecuted;
    }
    Summary { message: truncate(message), first }
}

/// A path with control characters escaped, so that a crafted name cannot forge message lines.
fn printable(path: &str) -> String {
    path.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}

/// `message`, cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn truncate(mut message: String) -> String {
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// A drift's message: kind and path; then, unless the rule is a secret's, writer and container.
fn message(drift: &Drift) -> String {
    let mut message = format!("{} {}", drift.kind, printable(&drift.path));
    if !drift.secret {
        if let Some(writer) = &drift.writer {
            message.push_str(&format!(" by {}", printable(writer)));
        }
        if let Some(container) = &drift.container {
            message.push_str(&format!(" in container {container}"));
        }
    }
    truncate(message)
}

/// What identifies an Event for aggregation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AggregationKey {
    regarding: Regarding,
    reason: Reason,
    path: String,
    kind: String,
}

/// An Event written and what it counts.
struct Written {
    namespace: String,
    name: String,
    count: i32,
    at: Instant,
}

/// How a write ended.
enum Outcome {
    Created,
    Aggregated,
}

/// The writer task's state.
struct Writer {
    client: Client,
    node: String,
    node_uid: Option<String>,
    config: Config,
    cache: LruCache<AggregationKey, Written>,
    metrics: KubeWriteMetrics,
    last_name: u128,
    warned: Option<Instant>,
    unlogged: u64,
}

impl Writer {
    async fn run(mut self, mut drifts: mpsc::Receiver<Drift>, limiter: Arc<Mutex<Limiter>>) {
        // RBAC has `get nodes`; without the uid a Node's Events still show, by name.
        let nodes = Api::<Node>::all(self.client.clone());
        match tokio::time::timeout(self.config.write_timeout, nodes.get_opt(&self.node)).await {
            Ok(Ok(node)) => self.node_uid = node.and_then(|n| n.metadata.uid),
            Ok(Err(e)) => debug!(node = %self.node, error = %e, "the node's uid is unknown; its Events name it only"),
            Err(_) => debug!(node = %self.node, "no answer about the node; its Events name it only"),
        }
        let tick = self
            .config
            .object_refill
            .min(self.config.node_refill)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticks = tokio::time::interval(tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                drift = drifts.recv() => {
                    let Some(drift) = drift else { return };
                    let result = match self.write(&drift, message(&drift), "").await {
                        Some(Outcome::Created) => "created",
                        Some(Outcome::Aggregated) => "aggregated",
                        None => "failed",
                    };
                    self.metrics.event(result);
                }
                _ = ticks.tick() => {
                    let due = limiter.lock().unwrap_or_else(PoisonError::into_inner).due_summaries(Instant::now(), &self.node);
                    for Summary { message, first } in due {
                        // The drifts it sums up were counted suppressed; only a failure is counted.
                        if self.write(&first, message, "summary").await.is_none() {
                            self.metrics.event("failed");
                        }
                    }
                }
            }
        }
    }

    /// Aggregates into the Event already written for this drift, or creates one. A summary
    /// (`summary` non-empty) aggregates with the object's earlier summaries.
    async fn write(&mut self, drift: &Drift, message: String, summary: &str) -> Option<Outcome> {
        let key = AggregationKey {
            regarding: drift.regarding.clone(),
            reason: drift.reason,
            path: if summary.is_empty() { drift.path.clone() } else { String::new() },
            kind: if summary.is_empty() { drift.kind.clone() } else { summary.to_owned() },
        };
        let now = kube_time(SystemTime::now());
        let window = self.config.aggregation_window;
        if let Some(written) = self.cache.get_mut(&key).filter(|w| w.at.elapsed() < window) {
            let (namespace, name, count) =
                (written.namespace.clone(), written.name.clone(), written.count.saturating_add(1));
            let patch = json!({"count": count, "lastTimestamp": now, "message": message});
            let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
            let (api, name, patch) = (&api, &name, &patch);
            let patched = self
                .retrying(move || async move {
                    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.map(drop)
                })
                .await;
            match patched {
                Ok(()) => {
                    let written = self.cache.get_mut(&key).expect("looked up above");
                    written.count = count;
                    written.at = Instant::now();
                    return Some(Outcome::Aggregated);
                }
                // Gone (Events expire after an hour by default): write a new one.
                Err(kube::Error::Api(status)) if status.is_not_found() => {
                    self.cache.pop(&key);
                }
                Err(e) => {
                    self.failed(&e);
                    return None;
                }
            }
        }
        let (namespace, involved) = match &drift.regarding {
            Regarding::Pod { namespace, name, uid } => {
                (namespace.clone(), reference("Pod", name, Some(namespace), Some(uid.clone())))
            }
            Regarding::Node => ("default".to_owned(), reference("Node", &self.node, None, self.node_uid.clone())),
        };
        let involved_name = involved.name.clone().unwrap_or_default();
        let api = Api::<Event>::namespaced(self.client.clone(), &namespace);
        let mut event = Event {
            metadata: ObjectMeta { namespace: Some(namespace.clone()), ..ObjectMeta::default() },
            involved_object: involved,
            reason: Some(drift.reason.as_str().to_owned()),
            message: Some(message),
            type_: Some("Warning".to_owned()),
            source: Some(EventSource { component: Some("kubefim".to_owned()), host: Some(self.node.clone()) }),
            reporting_component: Some("kubefim.io/agent".to_owned()),
            reporting_instance: Some(self.node.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Event::default()
        };
        for _ in 0..=self.config.retries {
            let name = format!("{involved_name}.{:016x}", self.unique());
            event.metadata.name = Some(name.clone());
            let (api, event) = (&api, &event);
            let created =
                self.retrying(move || async move { api.create(&PostParams::default(), event).await.map(drop) }).await;
            match created {
                Ok(()) => {
                    self.cache.put(key, Written { namespace, name, count: 1, at: Instant::now() });
                    return Some(Outcome::Created);
                }
                // The name is taken (a restarted agent in the same nanosecond): take another.
                Err(kube::Error::Api(status)) if status.is_already_exists() => continue,
                Err(e) => {
                    self.failed(&e);
                    return None;
                }
            }
        }
        None
    }

    /// `write` again after 429, 5xx or no answer, at most `retries` times, waiting twice as
    /// long each time, for at most `write_timeout` in all.
    async fn retrying<F, Fut>(&self, mut write: F) -> Result<(), kube::Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), kube::Error>>,
    {
        let deadline = Instant::now() + self.config.write_timeout;
        let mut wait = self.config.backoff;
        let mut left = self.config.retries;
        loop {
            let result = tokio::time::timeout_at(deadline.into(), write()).await.unwrap_or_else(|_| {
                let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within the write timeout");
                Err(kube::Error::Service(Box::new(timeout)))
            });
            match result {
                Err(e) if left > 0 && transient(&e) && Instant::now() + wait < deadline => {
                    debug!(error = %e, ?wait, "an Event write failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    left -= 1;
                }
                result => return result,
            }
        }
    }

    /// Logs a failed write at warn, at most once per [`WARN_EVERY`] with how many were not.
    fn failed(&mut self, error: &kube::Error) {
        if self.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            self.unlogged += 1;
            return;
        }
        warn!(
            error = %error,
            unlogged = self.unlogged,
            "writing a Kubernetes Event failed; drift stays in the log, the metrics and the FimNodeStatus \
             (check the agent's RBAC: events create, patch)"
        );
        self.warned = Some(Instant::now());
        self.unlogged = 0;
    }

    /// The Event name's suffix: nanoseconds since the epoch (as client-go's), never repeated.
    fn unique(&mut self) -> u128 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        self.last_name = now.max(self.last_name + 1);
        self.last_name
    }
}

/// Whether a failed write may succeed if tried again.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// An LRU map of at most `capacity` entries (at least one).
fn bounded<K: std::hash::Hash + Eq, V>(capacity: usize) -> LruCache<K, V> {
    LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN))
}

fn reference(kind: &str, name: &str, namespace: Option<&String>, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some(kind.to_owned()),
        name: Some(name.to_owned()),
        namespace: namespace.cloned(),
        uid: uid.filter(|u| !u.is_empty()),
        ..ObjectReference::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_one_token_per_period_up_to_its_burst() {
        let start = Instant::now();
        let mut bucket = Bucket { tokens: 0, since: start };
        bucket.refill(start + Duration::from_millis(2500), 10, Duration::from_secs(1));
        assert_eq!(bucket.tokens, 2);
        bucket.refill(start + Duration::from_millis(3000), 10, Duration::from_secs(1));
        assert_eq!(bucket.tokens, 3, "the half period left over counts");
        bucket.refill(start + Duration::from_secs(60), 10, Duration::from_secs(1));
        assert_eq!(bucket.tokens, 10);
    }

    #[test]
    fn messages_are_bounded_and_escape_control_characters() {
        let long = Drift {
            regarding: Regarding::Node,
            reason: Reason::FileDrift,
            path: format!("/etc/{}\nforged line", "é".repeat(600)),
            kind: "modified".into(),
            writer: Some("sh (pid 1)".into()),
            container: None,
            secret: false,
        };
        let m = message(&long);
        assert!(m.len() <= MAX_MESSAGE && m.ends_with('…'), "{} bytes", m.len());
        let short = Drift { path: "/etc/a\nb".into(), ..long };
        assert_eq!(message(&short), "modified /etc/a\\nb by sh (pid 1)");
    }
}
