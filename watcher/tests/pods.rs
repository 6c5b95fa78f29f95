//! Pod attribution against a stand-in API server on 127.0.0.1 that replays recorded responses
//! (tests/fixtures/k8s): a PodList for the node's pods, then a chunked watch stream of
//! newline-delimited WatchEvents that the test feeds one event at a time and keeps open. The
//! server records every request, so the tests check what the client asked for as well as
//! what the index answers. No test sleeps blindly: each waits for a condition, with a deadline.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kubefim_watcher::metrics::PodMetrics;
use kubefim_watcher::pods::{self, PodIndex, PodInfo, pod_uid_from_cgroup};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const NODE: &str = "worker-1";
const DEADLINE: Duration = Duration::from_secs(30);

// The container ids and uids of the fixtures.
const WEB_UID: &str = "3f9c2a1e-8b7d-4c6e-9a5f-1d2e3b4c5a6f";
const WEB_NGINX: &str = "2f79cedcae0090d6f411ad248f908ecb890e004f5126208a26b997ce2b4665cc";
const WEB_NGINX_RESTARTED: &str = "db955648667de6bdafb79e5723f310b3a0fbb656f129d8816a6344b77f69e16a";
const WEB_LOG_SHIPPER: &str = "03afab1263789c223c12c758351e41ba5e64091eb08b6b27179db216daec9234";
const WEB_MIGRATE_INIT: &str = "ecbcce528cb2e7497806fc9aed695499691bbf3b635f8a165ca9b7972551b012";
const PROXY_STATIC: &str = "ebf25d41929da8de6576a4e0decfd2282ebb62dfb663d19065a10d2da6507310";
const PROXY_CONFIG_HASH: &str = "b1946ac92492d2347c6235b4d2611184";
const REPORT_UID: &str = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d";
const REPORT: &str = "8f6decfb25303bbe670581f55c846b5a24109568fa487e446bca3144b0bffc6a";
const CACHE_REDIS: &str = "24b6ab0567688cd2ebb55f5a1ab4ec898edb135862644581e98ca71970ec60af";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// A recorded watch event as the API server writes it: one compact JSON object per line.
fn event_line(name: &str) -> String {
    let event: Value = serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    format!("{event}\n")
}

/// One request the server received.
#[derive(Debug, Clone)]
struct Recorded {
    uri: String,
    query: HashMap<String, String>,
    authorization: Option<String>,
}

impl Recorded {
    fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true")
    }
}

/// A watch request the server is holding open; the test writes its events.
struct Watch {
    query: HashMap<String, String>,
    events: mpsc::UnboundedSender<String>,
}

impl Watch {
    fn send(&self, fixture: &str) {
        self.events.send(event_line(fixture)).expect("the client hung up the watch");
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    /// The PodList fixtures to serve, in order; the last one is served again and again.
    lists: Mutex<VecDeque<&'static str>>,
    watches: mpsc::UnboundedSender<Watch>,
}

/// The stand-in API server: `GET /api/v1/pods` only, as `Api::<Pod>::all` calls it.
struct ApiServer {
    url: String,
    shared: Arc<Shared>,
    watches: mpsc::UnboundedReceiver<Watch>,
}

impl ApiServer {
    async fn start(lists: &[&'static str]) -> ApiServer {
        Self::bind("127.0.0.1:0".parse().expect("an address"), lists).await
    }

    async fn bind(addr: SocketAddr, lists: &[&'static str]) -> ApiServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().expect("a local address");
        let (watches_tx, watches) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            lists: Mutex::new(lists.iter().copied().collect()),
            watches: watches_tx,
        });
        let app = Router::new().route("/api/v1/pods", get(pods)).with_state(Arc::clone(&shared));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("the stand-in API server failed") });
        ApiServer { url: format!("http://{addr}"), shared, watches }
    }

    fn config(&self) -> kube::Config {
        kube::Config::new(self.url.parse().expect("a URL"))
    }

    fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests").clone()
    }

    fn lists(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| !r.is_watch()).collect()
    }

    /// The next watch the client opens.
    async fn next_watch(&mut self) -> Watch {
        tokio::time::timeout(DEADLINE, self.watches.recv())
            .await
            .expect("the client did not open a watch in time")
            .expect("the server stopped")
    }
}

async fn pods(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let request = Recorded { uri: uri.to_string(), query: query.clone(), authorization };
    let watch = request.is_watch();
    shared.requests.lock().expect("requests").push(request);
    if watch {
        let (events, rx) = mpsc::unbounded_channel::<String>();
        // Nobody waiting any more just means the test is over.
        let _ = shared.watches.send(Watch { query, events });
        // Chunked and open for as long as the test holds the sender, like a real watch.
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
        });
        return ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(stream)).into_response();
    }
    let name = {
        let mut lists = shared.lists.lock().expect("lists");
        if lists.len() > 1 { lists.pop_front() } else { lists.front().copied() }
    };
    let name = name.expect("the test gave the server no PodList to serve");
    ([(header::CONTENT_TYPE, "application/json")], fixture(name)).into_response()
}

/// Waits for `check` to hold, polling, and fails the test with `what` at the deadline.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn systemd_cgroup(qos: &str, uid: &str, id: &str) -> String {
    let uid = uid.replace('-', "_");
    format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid}.slice/cri-containerd-{id}.scope")
}

fn pod_of(index: &PodIndex, cgroup: &str) -> Option<(String, String)> {
    index.lookup_pod_uid(&pod_uid_from_cgroup(cgroup)?)
}

fn named(namespace: &str, name: &str) -> Option<(String, String)> {
    Some((namespace.to_owned(), name.to_owned()))
}

fn assert_node_selector(request: &Recorded) {
    assert!(request.uri.contains("fieldSelector=spec.nodeName%3Dworker-1"), "no node field selector: {}", request.uri);
    assert_eq!(request.query.get("fieldSelector").map(String::as_str), Some("spec.nodeName=worker-1"));
}

/// Asserts what the recorded PodList of pod-list.json gives.
fn assert_initial_list(index: &PodIndex) {
    let nginx = index.lookup(WEB_NGINX).expect("the web pod's nginx container");
    assert_eq!(
        nginx,
        PodInfo {
            namespace: "shop".into(),
            pod: "web-7d4b9c8f6d-x2k9p".into(),
            uid: WEB_UID.into(),
            container: "nginx".into(),
            image: "docker.io/library/nginx:1.27.4".into(),
            node: NODE.into(),
        }
    );
    assert_eq!(
        serde_json::to_value(nginx.to_pod()).unwrap(),
        json!({"namespace": "shop", "name": "web-7d4b9c8f6d-x2k9p", "uid": WEB_UID, "container": "nginx",
               "image": "docker.io/library/nginx:1.27.4"})
    );
    assert_eq!(index.lookup(&format!("containerd://{WEB_NGINX}")), Some(nginx), "the API's form of the id");
    assert_eq!(index.lookup(WEB_LOG_SHIPPER).map(|p| p.container).as_deref(), Some("log-shipper"));
    assert_eq!(index.lookup(WEB_MIGRATE_INIT).map(|p| p.container).as_deref(), Some("migrate"), "init container");
    let proxy = index.lookup(PROXY_STATIC).expect("the static pod's container");
    assert_eq!((proxy.namespace.as_str(), proxy.pod.as_str()), ("kube-system", "nginx-proxy-worker-1"));
    assert_eq!(index.len(), 4);
    assert_eq!(index.lookup_pod_uid(WEB_UID), named("shop", "web-7d4b9c8f6d-x2k9p"));
    // A static pod's cgroup carries its config hash, found through the mirror pod.
    assert_eq!(
        pod_of(index, &systemd_cgroup("burstable", PROXY_CONFIG_HASH, PROXY_STATIC)),
        named("kube-system", "nginx-proxy-worker-1")
    );
    assert_eq!(index.lookup(REPORT), None);
}

#[tokio::test]
async fn list_then_watch_keeps_the_index_current() {
    let mut server = ApiServer::start(&["pod-list.json"]).await;
    let metrics = PodMetrics::default();
    let index = PodIndex::start_with_config(server.config(), NODE, metrics.clone()).expect("starting the pod index");
    eventually("the first list", || index.is_synced()).await;

    let lists = server.lists();
    assert_eq!(lists.len(), 1, "{lists:#?}");
    assert_node_selector(&lists[0]);
    assert_eq!(lists[0].query.get("resourceVersion").map(String::as_str), Some("0"), "served from the watch cache");
    assert_initial_list(&index);

    let watch = server.next_watch().await;
    assert_eq!(watch.query.get("resourceVersion").map(String::as_str), Some("41800"), "{:?}", watch.query);
    assert_eq!(watch.query.get("allowWatchBookmarks").map(String::as_str), Some("true"));
    assert_node_selector(server.requests().last().expect("the watch request"));

    // A pod just bound to the node: no container status yet, but its containers' cgroups
    // already carry its uid (the race at container start).
    watch.send("watch-bookmark-41900.json");
    watch.send("watch-added-report-pending.json");
    let report_cgroup = systemd_cgroup("besteffort", REPORT_UID, REPORT);
    eventually("the ADDED pod", || pod_of(&index, &report_cgroup).is_some()).await;
    assert_eq!(pod_of(&index, &report_cgroup), named("analytics", "report-29112340-7xk2q"));
    assert_eq!(index.lookup(REPORT), None, "no container id in its status yet");

    watch.send("watch-modified-report-running.json");
    eventually("the started container of the ADDED pod", || index.lookup(REPORT).is_some()).await;
    let report = index.lookup(REPORT).expect("resolved");
    assert_eq!((report.namespace.as_str(), report.container.as_str()), ("analytics", "report"));

    // nginx was OOM-killed and restarted: the new id resolves, and so does the old one (now
    // lastState.terminated.containerID), for the changes still in flight from it.
    watch.send("watch-modified-web-restarted.json");
    eventually("the restarted container's new id", || index.lookup(WEB_NGINX_RESTARTED).is_some()).await;
    let restarted = index.lookup(WEB_NGINX_RESTARTED).expect("resolved");
    assert_eq!((restarted.pod.as_str(), restarted.container.as_str()), ("web-7d4b9c8f6d-x2k9p", "nginx"));
    assert_eq!(index.lookup(WEB_NGINX).map(|p| p.container).as_deref(), Some("nginx"), "the previous instance");
    assert!(index.lookup(WEB_LOG_SHIPPER).is_some() && index.lookup(WEB_MIGRATE_INIT).is_some());

    watch.send("watch-deleted-report.json");
    eventually("the DELETED pod to go", || index.lookup(REPORT).is_none()).await;
    assert_eq!(pod_of(&index, &report_cgroup), None);
    assert_eq!(index.len(), 5, "web (4 ids with the previous nginx) and the static pod");
    assert!(index.events_applied() >= 6, "2 listed + 4 watched, got {}", index.events_applied());
    // The metrics say the same: every applied event counted, the gauge counts pods (not ids).
    assert_eq!(metrics.events.get(), index.events_applied());
    assert_eq!((index.pods(), metrics.pods.get()), (2, 2), "web and the static pod");

    // The watch ends after a bookmark: the client resumes from the bookmark's resourceVersion
    // without listing again.
    watch.send("watch-bookmark-42050.json");
    let before = index.events_applied();
    drop(watch);
    let resumed = server.next_watch().await;
    assert_eq!(resumed.query.get("resourceVersion").map(String::as_str), Some("42050"), "{:?}", resumed.query);
    assert_eq!(server.lists().len(), 1, "a closed watch must not cost a re-list");
    assert_eq!(index.events_applied(), before);
    assert_eq!(index.watch_errors(), 0);
    assert!(index.lookup(WEB_NGINX_RESTARTED).is_some());
}

#[tokio::test]
async fn an_expired_watch_relists_and_replaces_the_index() {
    let mut server = ApiServer::start(&["pod-list.json", "pod-list-relist.json"]).await;
    let index =
        PodIndex::start_with_config(server.config(), NODE, PodMetrics::default()).expect("starting the pod index");
    eventually("the first list", || index.is_synced()).await;
    assert_initial_list(&index);

    // The API server answers with 410 Gone in the stream and closes it, as it does when the
    // resourceVersion has left its window.
    let watch = server.next_watch().await;
    watch.send("watch-error-expired.json");
    drop(watch);

    eventually("a second list", || server.lists().len() == 2).await;
    let relist = &server.lists()[1];
    assert_node_selector(relist);
    // The web pod was deleted and cache-0 created while the watch was down.
    eventually("the re-listed pods", || index.lookup(CACHE_REDIS).is_some()).await;
    assert_eq!(index.lookup(WEB_NGINX), None, "a pod gone from the re-list is gone from the index");
    assert_eq!(index.lookup(WEB_LOG_SHIPPER), None);
    assert_eq!(index.lookup_pod_uid(WEB_UID), None);
    assert_eq!(index.lookup(PROXY_STATIC).map(|p| p.pod).as_deref(), Some("nginx-proxy-worker-1"));
    let redis = index.lookup(CACHE_REDIS).expect("resolved");
    assert_eq!(
        (redis.namespace.as_str(), redis.pod.as_str(), redis.image.as_str()),
        ("shop", "cache-0", "docker.io/library/redis:7.4.2")
    );
    assert_eq!(index.len(), 2);
    assert_eq!(index.watch_errors(), 1);

    let watch = server.next_watch().await;
    assert_eq!(watch.query.get("resourceVersion").map(String::as_str), Some("42100"), "{:?}", watch.query);
}

thread_local! {
    static LOGS: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Sends the logs of the whole test binary to one global subscriber that writes each line to
/// a buffer of the thread that logged it: a current_thread test runtime runs the index's task
/// on the test's own thread, so each test reads its own logs. (A per-thread `set_default`
/// would not do: tracing caches each callsite's interest globally, from whichever thread
/// reaches it first.)
fn capture_logs() {
    struct ThreadLogs;
    impl std::io::Write for ThreadLogs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            LOGS.with(|logs| logs.borrow_mut().extend_from_slice(buf));
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::fmt().with_writer(|| ThreadLogs).with_ansi(false).finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
    });
}

fn logged() -> String {
    LOGS.with(|logs| String::from_utf8_lossy(&logs.borrow()).into_owned())
}

#[tokio::test]
async fn an_unreachable_api_server_is_retried_until_it_answers() {
    capture_logs();

    // A port nothing listens on (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
    let config = kube::Config::new(format!("http://{addr}").parse().expect("a URL"));
    let index =
        PodIndex::start_with_config(config, NODE, PodMetrics::default()).expect("starting does not need the server");
    eventually("a failed list", || index.watch_errors() >= 1).await;
    assert!(!index.is_synced());
    assert!(index.is_empty());
    assert_eq!(index.lookup(WEB_NGINX), None);
    let logs = logged();
    assert!(logs.contains("WARN") && logs.contains("watching this node's pods failed"), "logs: {logs}");

    let mut server = ApiServer::bind(addr, &["pod-list.json"]).await;
    eventually("recovery once the server answers", || index.is_synced()).await;
    assert_initial_list(&index);
    assert_node_selector(&server.lists()[0]);
    server.next_watch().await;
    let logs = logged();
    assert!(logs.contains("INFO") && logs.contains("pod attribution synced"), "logs: {logs}");
}

#[test]
fn starting_needs_a_node_name_and_a_runtime() {
    let config = || kube::Config::new("http://127.0.0.1:1".parse().expect("a URL"));
    assert!(matches!(PodIndex::start_with_config(config(), NODE, PodMetrics::default()), Err(pods::Error::NoRuntime)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let _inside = runtime.enter();
    assert!(matches!(PodIndex::start_with_config(config(), " ", PodMetrics::default()), Err(pods::Error::NoNodeName)));
}

/// The half of the `start` tests that runs in a child process, where the environment that
/// `kube::Config::infer` reads can be set without racing the other tests' threads. Does
/// nothing when run as an ordinary test.
#[tokio::test]
async fn start_in_child_process() {
    let Ok(expect) = std::env::var("KUBEFIM_PODS_CHILD") else { return };
    match expect.as_str() {
        "synced" => {
            let index = PodIndex::start(NODE, PodMetrics::default()).await.expect("starting from KUBECONFIG");
            eventually("the first list", || index.is_synced()).await;
            assert_initial_list(&index);
        }
        "no-config" => {
            let error = PodIndex::start(NODE, PodMetrics::default()).await.expect_err("no cluster to talk to");
            assert!(matches!(error, pods::Error::Config(_)), "{error:?}");
            assert!(error.to_string().contains("KUBECONFIG"), "{error}");
        }
        other => panic!("unknown KUBEFIM_PODS_CHILD={other}"),
    }
}

/// Runs `start_in_child_process` in a child with `KUBECONFIG` and `HOME` set and no
/// in-cluster environment, and fails if the child did not run it or it failed.
async fn run_child(expect: &'static str, kubeconfig: std::path::PathBuf, home: std::path::PathBuf) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--exact", "start_in_child_process", "--nocapture", "--test-threads=1"])
            .env("KUBEFIM_PODS_CHILD", expect)
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", home)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .output()
            .expect("running the child test")
    })
    .await
    .expect("the child's thread");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child ({expect}) failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn start_infers_the_cluster_from_kubeconfig() {
    let mut server = ApiServer::start(&["pod-list.json"]).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let kubeconfig = dir.path().join("kubeconfig");
    let url = &server.url;
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: kubefim\n\
             current-context: test\nusers:\n- name: kubefim\n  user:\n    token: kubefim-test-token\n"
        ),
    )
    .expect("writing the kubeconfig");
    let shared = Arc::clone(&server.shared);
    // The child's watch stays open until it exits: hold each one open meanwhile.
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Some(watch) = server.watches.recv().await {
            open.push(watch);
        }
    });
    run_child("synced", kubeconfig, dir.path().to_owned()).await;
    held.abort();
    let requests = shared.requests.lock().expect("requests").clone();
    let list = requests.iter().find(|r| !r.is_watch()).expect("the child listed the pods");
    assert_node_selector(list);
    assert_eq!(list.authorization.as_deref(), Some("Bearer kubefim-test-token"), "the kubeconfig's user");
}

#[tokio::test]
async fn start_outside_a_cluster_says_so() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    run_child("no-config", dir.path().join("missing"), dir.path().to_owned()).await;
}
