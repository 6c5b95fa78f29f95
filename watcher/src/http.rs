//! The agent's HTTP endpoint: `/metrics` for Prometheus, `/healthz` (liveness: is the watch
//! loop still turning?) and `/readyz` (readiness: is the agent doing its job yet?) for the
//! kubelet. [`Health`] is what the watch loop updates; [`serve`] binds the address and serves
//! on the caller's tokio runtime. This module holds no metric of its own (`metrics` does; once
//! served, [`Health`] copies its readiness into `kubefim_ready` so the gauge and `/readyz` never
//! disagree) and decides nothing about when the agent is ready: the watch loop says so.
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
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::metrics::{CLASSIC_CONTENT_TYPE, CONTENT_TYPE, Metrics};

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
    /// Where `kubefim_ready` lives, once [`serve`] has tied the two together: set under the
    /// `not_ready` lock so that the gauge and `/readyz` always say the same.
    metrics: OnceLock<Arc<Metrics>>,
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
            metrics: OnceLock::new(),
        }
    }

    /// From now on `kubefim_ready` in `metrics` follows readiness (set to it at once). A
    /// second call is ignored: one agent has one registry.
    fn report_to(&self, metrics: Arc<Metrics>) {
        let state = self.lock();
        metrics.set_ready(state.is_none());
        let _ = self.metrics.set(metrics);
    }

    /// The watch loop is alive.
    pub fn beat(&self) {
        self.last_beat.store(nanos(self.origin.elapsed()), Ordering::Relaxed);
    }

    /// Ready, or not ready for no particular reason ("not ready").
    pub fn set_ready(&self, ready: bool) {
        self.set(if ready { None } else { Some("not ready".to_owned()) });
    }

    /// Not ready, for `reason` (e.g. "baseline awaiting signature"), which `/readyz` returns.
    pub fn set_not_ready(&self, reason: &str) {
        self.set(Some(reason.to_owned()));
    }

    /// The one place readiness changes: the gauge is written under the same lock.
    fn set(&self, not_ready: Option<String>) {
        let mut state = self.lock();
        if let Some(metrics) = self.metrics.get() {
            metrics.set_ready(not_ready.is_none());
        }
        *state = not_ready;
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
    health.report_to(metrics.clone());
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

/// `/metrics`, in the format the client prefers (see [`wants_classic`]).
async fn metrics_text(State(endpoint): State<Endpoint>, headers: HeaderMap) -> Response {
    let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    if wants_classic(&accept) {
        ([(header::CONTENT_TYPE, CLASSIC_CONTENT_TYPE)], endpoint.metrics.encode_classic()).into_response()
    } else {
        ([(header::CONTENT_TYPE, CONTENT_TYPE)], endpoint.metrics.encode()).into_response()
    }
}

/// Whether an `Accept` header (several joined with commas) prefers the classic text format
/// (`text/plain`) to OpenMetrics (`application/openmetrics-text`): each gets the q-value of the
/// most specific range that matches it (`type/subtype`, then `type/*`, then `*/*`; RFC 9110
/// 12.5.1), and classic wins only when its q is strictly higher. So no header, `*/*`, a tie
/// and Prometheus' own default header (OpenMetrics first) get OpenMetrics, the richer format
/// and the one this agent is tested against; `text/plain;version=0.0.4` alone, promtool's and
/// older scrapers' request, gets classic. A `version` parameter is not matched: the client
/// asking for text/plain 1.0.0 reads 0.0.4 too.
fn wants_classic(accept: &str) -> bool {
    // (specificity, q) of the best-matching range for each type, specificity 0 = no match.
    let mut classic = (0, 0.0);
    let mut openmetrics = (0, 0.0);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(0.0));
        let Some((kind, subtype)) = media.split_once('/') else { continue };
        for (target, best) in
            [(("text", "plain"), &mut classic), (("application", "openmetrics-text"), &mut openmetrics)]
        {
            let specificity = match (kind, subtype) {
                (k, s) if (k, s) == target => 3,
                (k, "*") if k == target.0 => 2,
                ("*", "*") => 1,
                _ => 0,
            };
            if specificity > best.0 {
                *best = (specificity, q);
            }
        }
    }
    classic.1 > openmetrics.1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_negotiation() {
        for (accept, classic) in [
            ("", false),
            ("*/*", false),
            ("text/plain;version=0.0.4", true),
            ("text/plain; version=0.0.4; charset=utf-8", true),
            ("TEXT/Plain", true),
            ("text/*", true),
            ("application/openmetrics-text", false),
            ("text/plain, application/openmetrics-text", false),
            ("text/plain;q=0.5, application/openmetrics-text", false),
            ("text/plain, application/openmetrics-text;q=0.5", true),
            ("text/plain;version=0.0.4;q=0.9,*/*;q=0.1", true),
            // Prometheus 2.x's default.
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                 text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                false,
            ),
            // Prometheus 3 configured with scrape_protocols: [PrometheusText0.0.4].
            ("text/plain;version=0.0.4;q=1,*/*;q=0.1", true),
            ("text/plain;q=0", false),
            ("text/plain;q=0, */*", false),
            ("application/json", false),
            ("garbage", false),
        ] {
            assert_eq!(wants_classic(accept), classic, "Accept: {accept}");
        }
    }

    #[test]
    fn the_ready_gauge_follows_readiness() {
        let metrics = Arc::new(Metrics::new());
        let health = Health::default();
        health.set_ready(true);
        health.report_to(metrics.clone());
        assert!(metrics.encode().contains("\nkubefim_ready 1\n"), "set at once");
        health.set_not_ready("baseline awaiting signature");
        assert!(metrics.encode().contains("\nkubefim_ready 0\n"));
        health.set_ready(true);
        assert!(metrics.encode().contains("\nkubefim_ready 1\n"));
        health.set_ready(false);
        assert!(metrics.encode().contains("\nkubefim_ready 0\n"));
    }
}
