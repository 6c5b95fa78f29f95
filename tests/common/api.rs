//! A stand-in Kubernetes API server for the tests: `GET /api/v1/pods` (a list, and a watch
//! that sends a bookmark and stays open) from a recorded pod list, on 127.0.0.1, recording
//! every request.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// A watch event as the API server writes it: one compact JSON object per line.
fn bookmark_line() -> String {
    let event = json!({
        "type": "BOOKMARK",
        "object": {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": "52001", "creationTimestamp": null},
            "spec": {"containers": null},
            "status": {},
        },
    });
    format!("{event}\n")
}

/// One request the stand-in API server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub uri: String,
    pub query: HashMap<String, String>,
}

/// The stand-in API server: `GET /api/v1/pods` (list and watch) on 127.0.0.1, on a runtime
/// of its own, recording every request.
pub struct ApiServer {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    _runtime: tokio::runtime::Runtime,
}

impl ApiServer {
    #[track_caller]
    pub fn start(list: Value) -> ApiServer {
        use axum::body::Body;
        use axum::extract::{Query, State};
        use axum::http::{Uri, header};
        use axum::response::{IntoResponse, Response};
        use futures_util::StreamExt;

        #[derive(Clone)]
        struct Shared {
            list: Arc<String>,
            requests: Arc<Mutex<Vec<Recorded>>>,
        }
        async fn any(State(shared): State<Shared>, uri: Uri, Query(query): Query<HashMap<String, String>>) -> Response {
            let watch = query.get("watch").is_some_and(|w| w == "true");
            let path = uri.path().to_owned();
            shared.requests.lock().unwrap().push(Recorded { path: path.clone(), uri: uri.to_string(), query });
            if path != "/api/v1/pods" {
                return (axum::http::StatusCode::NOT_FOUND, "only /api/v1/pods here").into_response();
            }
            let json = [(header::CONTENT_TYPE, "application/json")];
            if watch {
                // A bookmark, then open for as long as the client keeps it, like a real watch.
                let first = futures_util::stream::once(async { Ok::<_, Infallible>(bookmark_line()) });
                return (json, Body::from_stream(first.chain(futures_util::stream::pending()))).into_response();
            }
            (json, shared.list.as_str().to_owned()).into_response()
        }

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the stand-in API server");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = Shared { list: Arc::new(list.to_string()), requests: Arc::clone(&requests) };
        let listener =
            runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind the stand-in API server");
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().fallback(any).with_state(shared);
        runtime.spawn(async move { axum::serve(listener, app).await.expect("the stand-in API server failed") });
        ApiServer { addr, requests, _runtime: runtime }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
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
