//! A stand-in Kubernetes API server for the tests: a small in-memory API on 127.0.0.1, on a
//! tokio runtime of its own, that records every request. It owns what a kube-rs client and
//! watcher need of a real one, for any resource path (`/api/v1/...`, `/apis/G/V/...`,
//! cluster-scoped or under `namespaces/NS/`): LIST, WATCH (replay from the list's
//! resourceVersion, then live events, with a bookmark first), GET, POST, PUT (also of
//! `/status`), PATCH (every patch type read as a JSON merge patch) and DELETE, with the
//! `Status` bodies and codes a real server answers with (404 NotFound, 409 AlreadyExists or
//! Conflict). Tests push watch events with [`ApiServer::push`], read stored objects with
//! [`ApiServer::object`] and make writes fail with [`ApiServer::fail_next_writes`].
//!
//! It does not authenticate, validate against schemas, paginate, or honour selectors other than
//! `metadata.name=` and `metadata.namespace=` (a pod list is served whole whatever
//! `spec.nodeName` asks for: the tests assert on the selector the agent sent instead), and
//! never expires a resourceVersion (no 410).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One request the stand-in API server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub uri: String,
    pub query: HashMap<String, String>,
    pub content_type: Option<String>,
    /// The body, when it was JSON.
    pub body: Option<Value>,
}

/// Where a request points: a collection (`/api/v1/pods`, `/apis/G/V/R`), maybe a namespace,
/// maybe an object, maybe a subresource (`status`).
#[derive(Debug, Clone)]
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let base = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => return None,
        };
        let rest = segments.get(base..)?;
        // `namespaces/NS/R...` is a namespaced collection; `namespaces` and `namespaces/NS`
        // are the namespaces themselves.
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
            _ => (None, rest),
        };
        let (resource, name, subresource) = match rest {
            [r] => (*r, None, None),
            [r, n] => (*r, Some((*n).to_owned()), None),
            [r, n, s] => (*r, Some((*n).to_owned()), Some((*s).to_owned())),
            _ => return None,
        };
        let collection = format!("/{}/{resource}", segments[..base].join("/"));
        Some(Target { collection, namespace, name, subresource })
    }

    /// The stored object's key (a cluster-scoped object's namespace is "").
    fn key(&self, name: &str) -> Key {
        (self.collection.clone(), self.namespace.clone().unwrap_or_default(), name.to_owned())
    }
}

/// The apiVersion and kind of a collection's objects.
fn type_of(collection: &str) -> (String, String) {
    let (group_version, resource) = collection.rsplit_once('/').unwrap_or(("", collection));
    let api_version = group_version.trim_start_matches("/apis/").trim_start_matches("/api/");
    let kind = match resource {
        "pods" => "Pod",
        "nodes" => "Node",
        "namespaces" => "Namespace",
        "events" => "Event",
        "workloadfimpolicies" => "WorkloadFimPolicy",
        "clusterworkloadfimpolicies" => "ClusterWorkloadFimPolicy",
        "fimnodestatuses" => "FimNodeStatus",
        other => other,
    };
    (api_version.to_owned(), kind.to_owned())
}

/// A `Status` response, as the API server sends for errors.
fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn reply(code: StatusCode, body: &Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// (collection, namespace or "", name).
type Key = (String, String, String);

/// An open watch: what it selects, and where its lines go.
struct Watch {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    lines: mpsc::UnboundedSender<String>,
}

impl Watch {
    fn selects(&self, key: &Key) -> bool {
        key.0 == self.collection
            && self.namespace.as_ref().is_none_or(|ns| *ns == key.1)
            && self.name.as_ref().is_none_or(|n| *n == key.2)
    }
}

/// The API's state: objects, every change (for watches that start from an older version),
/// the open watches and the faults still to inject.
#[derive(Default)]
struct Store {
    resource_version: u64,
    objects: BTreeMap<Key, Value>,
    changes: Vec<(u64, Key, String)>,
    watches: Vec<Watch>,
    failures: Option<(u32, StatusCode)>,
}

impl Store {
    /// Stores `object` under `key` (or deletes it for "DELETED") with the next
    /// resourceVersion, and sends the change to the watches that select it.
    fn change(&mut self, key: Key, kind: &str, mut object: Value) -> Value {
        self.resource_version += 1;
        let rv = self.resource_version;
        let (api_version, object_kind) = type_of(&key.0);
        let fields = object.as_object_mut().expect("objects are JSON objects");
        fields.entry("apiVersion").or_insert(api_version.into());
        fields.entry("kind").or_insert(object_kind.into());
        let meta = fields.entry("metadata").or_insert(json!({}));
        meta["resourceVersion"] = rv.to_string().into();
        meta["name"] = key.2.clone().into();
        if !key.1.is_empty() {
            meta["namespace"] = key.1.clone().into();
        }
        if meta.get("uid").is_none() {
            meta["uid"] = format!("{:08x}-5a5a-4000-8000-{rv:012x}", std::process::id()).into();
        }
        if meta.get("creationTimestamp").is_none_or(Value::is_null) {
            meta["creationTimestamp"] = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().into();
        }
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        self.watches.retain(|w| !w.selects(&key) || w.lines.send(line.clone()).is_ok());
        self.changes.push((rv, key, line));
        object
    }

    fn bookmark(&self, collection: &str) -> String {
        let (api_version, kind) = type_of(collection);
        let object = json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": self.resource_version.to_string()}});
        format!("{}\n", json!({"type": "BOOKMARK", "object": object}))
    }

    /// Takes one injected failure, if any are left.
    fn failure(&mut self) -> Option<StatusCode> {
        let (left, code) = self.failures.as_mut()?;
        let code = *code;
        *left -= 1;
        if *left == 0 {
            self.failures = None;
        }
        Some(code)
    }
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<Recorded>>,
}

/// The stand-in API server, on 127.0.0.1, on a runtime of its own.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

impl ApiServer {
    /// A server whose `/api/v1/pods` holds the items of `list` (a PodList as recorded from a
    /// real server).
    #[track_caller]
    pub fn start(list: Value) -> ApiServer {
        let api = ApiServer::empty();
        // Versions above the recorded list's, as a real server's would be.
        let listed = list["metadata"]["resourceVersion"].as_str().and_then(|rv| rv.parse().ok()).unwrap_or(0);
        api.shared.store.lock().unwrap().resource_version = listed;
        for pod in list["items"].as_array().into_iter().flatten() {
            api.push("/api/v1/pods", "ADDED", pod.clone());
        }
        api
    }

    /// A server with no objects.
    #[track_caller]
    pub fn empty() -> ApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the stand-in API server");
        let shared = Arc::new(Shared::default());
        let listener =
            runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the stand-in API server");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&shared));
        runtime.spawn(async move { axum::serve(listener, app).await.expect("the stand-in API server failed") });
        ApiServer { addr, shared, _runtime: runtime }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in the order received.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Stores `object` in `collection` (its namespace from the path, else from the object) as
    /// `kind` (`ADDED`, `MODIFIED` or `DELETED`) says, and sends the event to the open watches
    /// that select it. Returns the object as stored (with its resourceVersion).
    #[track_caller]
    pub fn push(&self, collection: &str, kind: &str, object: Value) -> Value {
        assert!(["ADDED", "MODIFIED", "DELETED"].contains(&kind), "not a watch event type: {kind}");
        let mut target = Target::parse(collection).unwrap_or_else(|| panic!("not an API collection: {collection}"));
        if target.namespace.is_none() {
            target.namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        }
        let name = object["metadata"]["name"].as_str().unwrap_or_else(|| panic!("no metadata.name: {object}"));
        let key = target.key(name);
        self.shared.store.lock().unwrap().change(key, kind, object)
    }

    /// The object stored at `path` (`/apis/G/V/R/NAME`, `/api/v1/namespaces/NS/R/NAME`).
    #[track_caller]
    pub fn object(&self, path: &str) -> Option<Value> {
        let target = Target::parse(path).unwrap_or_else(|| panic!("not an API object path: {path}"));
        let key = target.key(target.name.as_deref().unwrap_or_else(|| panic!("no name in {path}")));
        self.shared.store.lock().unwrap().objects.get(&key).cloned()
    }

    /// The objects of a collection (`/api/v1/namespaces/NS/events`; without a namespace,
    /// every namespace's), in key order.
    #[track_caller]
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let target = Target::parse(collection).unwrap_or_else(|| panic!("not an API collection: {collection}"));
        let store = self.shared.store.lock().unwrap();
        store.objects.iter().filter(|(k, _)| selects(&target, None, k)).map(|(_, v)| v.clone()).collect()
    }

    /// The next `n` writes (POST, PUT, PATCH, DELETE) are answered with `code` and a `Status`,
    /// changing nothing.
    pub fn fail_next_writes(&self, n: u32, code: u16) {
        let code = StatusCode::from_u16(code).expect("an HTTP status code");
        self.shared.store.lock().unwrap().failures = (n > 0).then_some((n, code));
    }

    /// A kubeconfig for the server: plain HTTP, no credentials.
    pub fn kubeconfig(&self, path: &Path) {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: nobody\n\
             current-context: stand-in\nusers:\n- name: nobody\n  user: {{}}\n",
            self.addr
        );
        fs::write(path, yaml).unwrap();
    }
}

/// Whether a list of `target` (with its `metadata.name=`/`metadata.namespace=` field selector)
/// includes the object at `key`.
fn selects(target: &Target, fields: Option<&str>, key: &Key) -> bool {
    let field = |name: &str| {
        fields.into_iter().flat_map(|f| f.split(',')).find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
    };
    let namespace = target.namespace.as_deref().or(field("metadata.namespace"));
    key.0 == target.collection
        && namespace.is_none_or(|ns| ns == key.1)
        && field("metadata.name").is_none_or(|n| n == key.2)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let body: Option<Value> = serde_json::from_slice(&body).ok();
    shared.requests.lock().unwrap().push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        uri: uri.to_string(),
        query: query.clone(),
        content_type: headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned),
        body: body.clone(),
    });
    let Some(target) = Target::parse(&path) else {
        return status(StatusCode::NOT_FOUND, "NotFound", format!("the server could not find {path}"));
    };
    let mut store = shared.store.lock().unwrap();
    if method != Method::GET
        && let Some(code) = store.failure()
    {
        return status(code, code.canonical_reason().unwrap_or("Failure"), format!("injected failure of {path}"));
    }
    let (_, kind) = type_of(&target.collection);
    let not_found = |name: &str| status(StatusCode::NOT_FOUND, "NotFound", format!("{kind} \"{name}\" not found"));
    let name = target.name.clone();
    match (method, name) {
        (Method::GET, None) if query.get("watch").is_some_and(|w| w == "true" || w == "1") => {
            let fields = query.get("fieldSelector").map(String::as_str);
            let field_name = fields.and_then(|f| f.split(',').find_map(|f| f.strip_prefix("metadata.name=")));
            let (tx, rx) = mpsc::unbounded_channel();
            let watch = Watch {
                collection: target.collection.clone(),
                namespace: target.namespace.clone(),
                name: field_name.map(str::to_owned),
                lines: tx,
            };
            // What changed since the version the client listed, then a bookmark; without a
            // version (or "0"), every object as ADDED first, as a real server does.
            match query.get("resourceVersion").and_then(|rv| rv.parse::<u64>().ok()).filter(|rv| *rv > 0) {
                Some(since) => {
                    for (_, _, line) in store.changes.iter().filter(|(rv, key, _)| *rv > since && watch.selects(key)) {
                        let _ = watch.lines.send(line.clone());
                    }
                }
                None => {
                    for object in store.objects.iter().filter(|(k, _)| watch.selects(k)).map(|(_, v)| v) {
                        let _ = watch.lines.send(format!("{}\n", json!({"type": "ADDED", "object": object})));
                    }
                }
            }
            let _ = watch.lines.send(store.bookmark(&target.collection));
            store.watches.push(watch);
            let lines = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
            });
            ([(header::CONTENT_TYPE, "application/json")], Body::from_stream(lines)).into_response()
        }
        (Method::GET, None) => {
            let fields = query.get("fieldSelector").map(String::as_str);
            let items: Vec<&Value> =
                store.objects.iter().filter(|(k, _)| selects(&target, fields, k)).map(|(_, v)| v).collect();
            let (api_version, kind) = type_of(&target.collection);
            let list = json!({
                "apiVersion": api_version, "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": store.resource_version.to_string()}, "items": items,
            });
            reply(StatusCode::OK, &list)
        }
        (Method::GET, Some(name)) => match store.objects.get(&target.key(&name)) {
            Some(object) => reply(StatusCode::OK, object),
            None => not_found(&name),
        },
        (Method::POST, None) => {
            let Some(mut object) = body.filter(Value::is_object) else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not a JSON object".into());
            };
            let name = match (object["metadata"]["name"].as_str(), object["metadata"]["generateName"].as_str()) {
                (Some(name), _) => name.to_owned(),
                (None, Some(prefix)) => format!("{prefix}{:05x}", store.resource_version + 1),
                (None, None) => {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required".into());
                }
            };
            let key = target.key(&name);
            if store.objects.contains_key(&key) {
                return status(StatusCode::CONFLICT, "AlreadyExists", format!("{kind} \"{name}\" already exists"));
            }
            object["metadata"]["generation"] = 1.into();
            reply(StatusCode::CREATED, &store.change(key, "ADDED", object))
        }
        (method @ (Method::PUT | Method::PATCH), Some(name)) => {
            let key = target.key(&name);
            let Some(mut object) = store.objects.get(&key).cloned() else {
                return not_found(&name);
            };
            let Some(body) = body else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON".into());
            };
            let stored_rv = &object["metadata"]["resourceVersion"];
            if method == Method::PUT && body["metadata"]["resourceVersion"].as_str().is_some_and(|rv| *stored_rv != rv)
            {
                let message =
                    format!("Operation cannot be fulfilled on {kind} \"{name}\": the object has been modified");
                return status(StatusCode::CONFLICT, "Conflict", message);
            }
            let spec = object.get("spec").cloned();
            match (target.subresource.as_deref(), method) {
                (Some("status"), Method::PUT) => object["status"] = body["status"].clone(),
                (Some("status"), _) => merge(&mut object["status"], &body["status"]),
                (Some(other), _) => {
                    return status(StatusCode::NOT_FOUND, "NotFound", format!("no subresource {other} here"));
                }
                (None, Method::PUT) => object = body,
                (None, _) => merge(&mut object, &body),
            }
            if object.get("spec") != spec.as_ref() {
                let generation = object["metadata"]["generation"].as_u64().unwrap_or(0);
                object["metadata"]["generation"] = (generation + 1).into();
            }
            reply(StatusCode::OK, &store.change(key, "MODIFIED", object))
        }
        (Method::DELETE, Some(name)) => {
            let key = target.key(&name);
            match store.objects.get(&key).cloned() {
                Some(object) => reply(StatusCode::OK, &store.change(key, "DELETED", object)),
                None => not_found(&name),
            }
        }
        (method, _) => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", format!("{method} {path}")),
    }
}
