//! The agent's HTTP endpoint: `/metrics` for Prometheus, `/healthz` (liveness: is the watch
//! loop still turning?) and `/readyz` (readiness: is the agent doing its job yet?) for the
//! kubelet. [`Health`] is what the watch loop updates; [`serve`] binds the address and serves
//! on the caller's tokio runtime. This module holds no metric of its own (`metrics` does) and
//! decides nothing about when the agent is ready: the watch loop says so.
//!
//! Everything here runs on the watcher's current-thread runtime, next to the event loop, so
//! no handler blocks: each one reads atomics or briefly locks a mutex nobody holds across an
//! await, and encoding the metrics is a few microseconds of formatting.
//!
//! The port is reachable by whoever can reach the node, so it is bounded: at most
//! [`MAX_CONNECTIONS`] connections at a time (one more is closed as soon as it is accepted,
//! so idle sockets cannot take the descriptors the watcher needs to rehash files), each with
//! [`HEADER_TIMEOUT`] to send its request head and [`CONNECTION_LIFETIME`] in all, one
//! request per connection. hyper does the HTTP and enforces the header timeout; this module
//! only accepts and counts.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::metrics::{CONTENT_TYPE, Metrics};

/// Connections served at once. Probes (three), a scraper or two and some slack: far more than
/// a node's legitimate clients, far fewer than the descriptors the watcher keeps for itself
/// (`limits::DESCRIPTOR_RESERVE`).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request line and headers: a probe or a scraper sends
/// them at once, a client that trickles them is holding a slot.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all (its request, and a response it may be slow to read).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// How long the accept loop waits after a failed accept (out of descriptors, say) before it
/// tries again, rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process already listens on the address.
    #[error(
        "cannot listen on {addr}: the address is already in use (by another kubefim, or another exporter \
         on this node?); stop that process or pick another address with --listen"
    )]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
        /// The error from bind(2).
        source: io::Error,
    },
    /// The address could not be bound or listened on for another reason.
    #[error("cannot listen on {addr}: {hint}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What to do about it.
        hint: &'static str,
        /// The error from the socket calls.
        source: io::Error,
    },
    /// [`serve`] was called outside a tokio runtime, so there is nothing to serve on.
    #[error("the HTTP endpoint must be started from inside the watcher's tokio runtime")]
    NoRuntime,
}

/// What the kubelet's probes see, as set by the watch loop.
///
/// Liveness is a heartbeat: the loop calls [`Health::beat`] at least every few seconds, and
/// `/healthz` fails once no beat came for `stale_after`, so a wedged loop (stuck on a lock, a
/// blocking read) gets the pod restarted while a merely busy one does not. Readiness is a flag
/// with a reason: not ready ("starting") until the loop says otherwise.
#[derive(Debug)]
pub struct Health {
    /// The origin of `last_beat`: an `Instant` cannot live in an atomic, its offset can.
    origin: Instant,
    /// Nanoseconds from `origin` to the last beat.
    last_beat: AtomicU64,
    stale_after: Duration,
    /// `None` when ready, else why not.
    not_ready: Mutex<Option<String>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Self::DEFAULT_STALE_AFTER)
    }
}

impl Health {
    /// How long liveness tolerates silence unless told otherwise: well above the loop's own
    /// timers, below the time anyone would accept an agent that silently stopped watching.
    pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(60);

    /// Live (creation counts as a beat) and not ready ("starting"). A startup longer than
    /// `stale_after` must beat as it goes, or be covered by the pod's startupProbe.
    pub fn new(stale_after: Duration) -> Self {
        Health {
            origin: Instant::now(),
            last_beat: AtomicU64::new(0),
            stale_after,
            not_ready: Mutex::new(Some("starting".to_owned())),
        }
    }

    /// The watch loop is alive.
    pub fn beat(&self) {
        self.last_beat.store(nanos(self.origin.elapsed()), Ordering::Relaxed);
    }

    /// Ready, or not ready for no particular reason ("not ready").
    pub fn set_ready(&self, ready: bool) {
        *self.lock() = if ready { None } else { Some("not ready".to_owned()) };
    }

    /// Not ready, for `reason` (e.g. "baseline awaiting signature"), which `/readyz` returns.
    pub fn set_not_ready(&self, reason: &str) {
        *self.lock() = Some(reason.to_owned());
    }

    /// `Err(how long since the last beat)` once that exceeds `stale_after`.
    pub fn liveness(&self) -> Result<(), Duration> {
        let since = self.origin.elapsed().saturating_sub(Duration::from_nanos(self.last_beat.load(Ordering::Relaxed)));
        if since > self.stale_after { Err(since) } else { Ok(()) }
    }

    /// `Err(reason)` while not ready.
    pub fn readiness(&self) -> Result<(), String> {
        match self.lock().as_ref() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic elsewhere while holding it cannot leave an Option<String> half-written.
        self.not_ready.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Saturates instead of truncating: 584 years of uptime is out of scope.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What every handler shares.
#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Binds `addr` now (so a taken port is an error at start-up, not a log line later), then
/// serves `/metrics`, `/healthz` and `/readyz` on the current tokio runtime until the returned
/// task is aborted. Returns the bound address, which differs from `addr` when it asked for
/// port 0. Must be called from inside a tokio runtime; the runtime may be current-thread, in
/// which case requests are answered whenever the runtime's owner awaits.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<(SocketAddr, JoinHandle<()>), Error> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
    // std's bind sets SO_REUSEADDR, so a restarted agent is not locked out by the previous
    // one's connections in TIME_WAIT, while a live listener still makes it fail.
    let listener = std::net::TcpListener::bind(addr).map_err(|source| bind_error(addr, source))?;
    let bound = listener.local_addr().map_err(|source| bind_error(addr, source))?;
    listener.set_nonblocking(true).map_err(|source| bind_error(addr, source))?;
    let listener = {
        let _in_runtime = runtime.enter();
        tokio::net::TcpListener::from_std(listener).map_err(|source| bind_error(addr, source))?
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(Endpoint { metrics, health });
    let task = runtime.spawn(accept_loop(listener, app));
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    Ok((bound, task))
}

/// Accepts connections and serves each on a task of its own, at most [`MAX_CONNECTIONS`] at a
/// time: one beyond is closed at once (dropping the accepted socket), so the descriptors it
/// holds stay bounded whatever a client does. Never ends: a failed accept is retried.
async fn accept_loop(listener: tokio::net::TcpListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer is what makes hyper enforce the header timeout; one request a connection,
    // so the timeout bounds every connection's idle time, not only its first request's.
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).keep_alive(false);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the descriptors or memory will come back; a
                // connection reset before it was accepted (ECONNABORTED) is nothing.
                tracing::debug!("accepting a connection on the HTTP endpoint failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Full: this one is closed now, not queued (a queue would hold its descriptor).
            drop(stream);
            continue;
        };
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            // A connection that ends in error (a client gone, a header timeout) is the
            // client's business; nothing to report.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop(slot);
        });
    }
}

fn bind_error(addr: SocketAddr, source: io::Error) -> Error {
    let hint = match source.kind() {
        io::ErrorKind::AddrInUse => return Error::AddrInUse { addr, source },
        io::ErrorKind::PermissionDenied => {
            "permission denied: ports below 1024 need CAP_NET_BIND_SERVICE; pick a higher port with --listen"
        }
        io::ErrorKind::AddrNotAvailable => {
            "the address is not one of this host's; pick another with --listen (0.0.0.0:PORT listens on all)"
        }
        _ => "pick another address with --listen",
    };
    Error::Bind { addr, hint, source }
}

async fn metrics_text(State(endpoint): State<Endpoint>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], endpoint.metrics.encode()).into_response()
}

async fn healthz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(since) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("no heartbeat for {:.1}s\n", since.as_secs_f64())).into_response()
        }
    }
}

async fn readyz(State(endpoint): State<Endpoint>) -> Response {
    match endpoint.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n").into_response()
}
