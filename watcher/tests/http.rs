//! The agent's HTTP endpoint over real TCP: `serve` on 127.0.0.1:0 inside a current-thread
//! runtime (the watcher's kind), plain HTTP/1.1 requests written on a socket, and the answers
//! checked as Prometheus and the kubelet would read them; and clients that connect and send
//! half a request, which may hold neither the descriptors nor the probes' turn for long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kubefim_watcher::http::{self, Health};
use kubefim_watcher::metrics::{CONTENT_TYPE, Metrics};
use kubefim_watcher::model::{LostBy, RescanReason};
use prometheus_parse::{LineInfo, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout};

/// How long any one wait may take before the test fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(10);

/// One HTTP answer.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` on a fresh connection and reads the whole answer (the server closes
/// after it, as asked).
async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting to the endpoint");
        let head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("sending the request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("reading the answer");
        raw
    };
    let raw =
        timeout(DEADLINE, exchange).await.unwrap_or_else(|_| panic!("{method} {path}: no answer in {DEADLINE:?}"));
    let text = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no end of headers in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .map(|l| l.split_once(':').unwrap_or_else(|| panic!("bad header {l:?}")))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let reply = Reply { status, headers, body: body.to_owned() };
    // Every body here has a known size; a chunked one would need decoding before comparing.
    assert!(reply.header("transfer-encoding").is_none(), "{method} {path}: unexpected chunked body");
    if method != "HEAD" {
        let length: usize = reply.header("content-length").and_then(|v| v.parse().ok()).expect("a Content-Length");
        assert_eq!(length, reply.body.len(), "{method} {path}: body length");
    }
    reply
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path).await
}

/// Requests `path` until its status is `status`, failing after [`DEADLINE`].
async fn until_status(addr: SocketAddr, path: &str, status: u16) -> Reply {
    let end = Instant::now() + DEADLINE;
    loop {
        let reply = get(addr, path).await;
        if reply.status == status {
            return reply;
        }
        assert!(Instant::now() < end, "GET {path} still {} ({:?}) after {DEADLINE:?}", reply.status, reply.body);
        sleep(Duration::from_millis(20)).await;
    }
}

fn start(metrics: &Arc<Metrics>, health: &Arc<Health>) -> SocketAddr {
    let (addr, _task) = http::serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), health.clone())
        .expect("serving on an ephemeral port");
    assert_ne!(addr.port(), 0, "serve must return the port it bound");
    addr
}

/// Parses an exposition strictly enough to catch a malformed line: `prometheus-parse` skips
/// what it does not understand, so every line must first be a comment or a sample it reads.
fn parse(text: &str) -> Scrape {
    assert_eq!(text.lines().last(), Some("# EOF"), "OpenMetrics text ends with # EOF:\n{text}");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        match LineInfo::parse(line) {
            LineInfo::Sample { value, .. } if value.parse::<f64>().is_ok() || value == "+Inf" => {}
            other => panic!("not a sample line: {line:?} ({other:?})"),
        }
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parsing the exposition")
}

/// The value of the sample `name{labels}`, which must exist once.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.len() == labels.len())
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name}{labels:?} is not a single value: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "samples named {name}{labels:?}: {found:?}");
    found[0]
}

/// The cumulative bucket counts of histogram `name`, by upper bound.
fn buckets(scrape: &Scrape, name: &str) -> Vec<(f64, f64)> {
    let sample = scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("no histogram {name}"));
    match &sample.value {
        Value::Histogram(b) => b.iter().map(|c| (c.less_than, c.count)).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn metrics_reflect_the_calls_made() {
    let metrics = Arc::new(Metrics::new());
    let addr = start(&metrics, &Arc::new(Health::default()));

    // Before anything happens: the fixed label sets exist at zero, the rest is absent.
    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
    let before = parse(&reply.body);
    assert_eq!(value(&before, "kubefim_changes_total", &[("kind", "renamed")]), 0.0);
    assert_eq!(value(&before, "kubefim_verify_runs_total", &[("result", "clean")]), 0.0);
    assert_eq!(value(&before, "kubefim_last_verify_success", &[]), 0.0);
    assert!(!reply.body.contains("kubefim_events_total"), "no event series before an event");

    for op in ["write", "write", "rename", "unlink"] {
        metrics.event(op);
    }
    metrics.change("added");
    metrics.change("modified");
    metrics.change("modified");
    metrics.lost(5, LostBy::Kernel);
    metrics.lost(2, LostBy::Kernel);
    metrics.rescan(RescanReason::Startup);
    metrics.rescan(RescanReason::LostEvents);
    metrics.rescan(RescanReason::LostEvents);
    for d in [Duration::from_micros(5), Duration::from_micros(300), Duration::from_millis(40), Duration::from_secs(2)] {
        metrics.rehash_seconds(d);
    }
    metrics.set_baseline(1234, 1_700_000_000.25, true);
    metrics.verified(1_700_000_500.5, 1, 0, 2, 0, Duration::from_millis(750));
    metrics.set_programs(11, 1);
    metrics.set_watched_inodes(98_765);
    let pods = metrics.pod_metrics();
    pods.events.inc();
    pods.events.inc();
    pods.pods.set(17);

    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    let s = parse(&reply.body);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(value(&s, "kubefim_build_info", &[("version", version)]), 1.0);
    assert_eq!(value(&s, "kubefim_events_total", &[("op", "write")]), 2.0);
    assert_eq!(value(&s, "kubefim_events_total", &[("op", "rename")]), 1.0);
    assert_eq!(value(&s, "kubefim_events_total", &[("op", "unlink")]), 1.0);
    assert_eq!(value(&s, "kubefim_changes_total", &[("kind", "added")]), 1.0);
    assert_eq!(value(&s, "kubefim_changes_total", &[("kind", "modified")]), 2.0);
    assert_eq!(value(&s, "kubefim_changes_total", &[("kind", "removed")]), 0.0);
    assert_eq!(value(&s, "kubefim_lost_events_total", &[("dropped_by", "kernel")]), 7.0);
    assert_eq!(value(&s, "kubefim_lost_events_total", &[("dropped_by", "watcher")]), 0.0);
    assert_eq!(value(&s, "kubefim_rescans_total", &[("reason", "startup")]), 1.0);
    assert_eq!(value(&s, "kubefim_rescans_total", &[("reason", "lost_events")]), 2.0);
    assert_eq!(value(&s, "kubefim_rescans_total", &[("reason", "truncated_path")]), 0.0, "every reason exists at 0");

    // The histogram: cumulative buckets from 10 µs to 1 s, the 2 s rehash only in +Inf.
    let b = buckets(&s, "kubefim_rehash_duration_seconds");
    assert_eq!(b.first(), Some(&(0.000_01, 1.0)), "{b:?}");
    assert_eq!(b.iter().find(|(le, _)| *le == 0.000_5), Some(&(0.000_5, 2.0)), "{b:?}");
    assert_eq!(b.iter().find(|(le, _)| *le == 0.05), Some(&(0.05, 3.0)), "{b:?}");
    assert_eq!(b.iter().find(|(le, _)| *le == 1.0), Some(&(1.0, 3.0)), "{b:?}");
    assert_eq!(b.last(), Some(&(f64::INFINITY, 4.0)), "{b:?}");
    assert!(b.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "buckets not cumulative: {b:?}");
    assert_eq!(value(&s, "kubefim_rehash_duration_seconds_count", &[]), 4.0);
    let sum = value(&s, "kubefim_rehash_duration_seconds_sum", &[]);
    assert!((sum - 2.040_305).abs() < 1e-9, "sum {sum}");
    assert!(reply.body.contains("# UNIT kubefim_rehash_duration_seconds seconds\n"));

    assert_eq!(value(&s, "kubefim_baseline_entries", &[]), 1234.0);
    assert_eq!(value(&s, "kubefim_baseline_created_timestamp_seconds", &[]), 1_700_000_000.25);
    assert_eq!(value(&s, "kubefim_baseline_trusted", &[]), 1.0);
    assert_eq!(value(&s, "kubefim_last_verify_timestamp_seconds", &[]), 1_700_000_500.5);
    assert_eq!(value(&s, "kubefim_last_verify_success", &[]), 0.0);
    assert_eq!(value(&s, "kubefim_last_verify_changes", &[("kind", "added")]), 1.0);
    assert_eq!(value(&s, "kubefim_last_verify_changes", &[("kind", "removed")]), 0.0);
    assert_eq!(value(&s, "kubefim_last_verify_changes", &[("kind", "modified")]), 2.0);
    assert_eq!(value(&s, "kubefim_last_verify_errors", &[]), 0.0);
    assert_eq!(value(&s, "kubefim_last_verify_duration_seconds", &[]), 0.75);
    assert_eq!(value(&s, "kubefim_verify_runs_total", &[("result", "changed")]), 1.0);
    assert_eq!(value(&s, "kubefim_verify_runs_total", &[("result", "clean")]), 0.0);
    assert_eq!(value(&s, "kubefim_programs_attached", &[]), 11.0);
    assert_eq!(value(&s, "kubefim_programs_degraded", &[]), 1.0);
    assert_eq!(value(&s, "kubefim_watched_inodes", &[]), 98_765.0);
    assert_eq!(value(&s, "kubefim_pod_cache_events_total", &[]), 2.0);
    assert_eq!(value(&s, "kubefim_pod_cache_entries", &[]), 17.0);

    // A clean run, then one with errors: the gauges follow the last run, the counters add up.
    metrics.verified(1_700_000_600.0, 0, 0, 0, 0, Duration::from_millis(500));
    let s = parse(&get(addr, "/metrics").await.body);
    assert_eq!(value(&s, "kubefim_last_verify_success", &[]), 1.0);
    assert_eq!(value(&s, "kubefim_last_verify_changes", &[("kind", "modified")]), 0.0);
    assert_eq!(value(&s, "kubefim_verify_runs_total", &[("result", "clean")]), 1.0);
    metrics.verified(1_700_000_700.0, 0, 1, 0, 3, Duration::from_millis(500));
    metrics.set_baseline(1234, 1_700_000_000.25, false);
    let s = parse(&get(addr, "/metrics").await.body);
    assert_eq!(value(&s, "kubefim_last_verify_success", &[]), 0.0);
    assert_eq!(value(&s, "kubefim_last_verify_errors", &[]), 3.0);
    assert_eq!(value(&s, "kubefim_verify_runs_total", &[("result", "error")]), 1.0);
    assert_eq!(value(&s, "kubefim_verify_runs_total", &[("result", "changed")]), 1.0);
    assert_eq!(value(&s, "kubefim_baseline_trusted", &[]), 0.0);

    // No path, pid or pod name can reach a label: every label value is one of the fixed words.
    for sample in &s.samples {
        for (k, v) in sample.labels.iter() {
            assert!(
                v.chars().all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c)),
                "{}: label {k}={v:?} looks like free text",
                sample.metric
            );
        }
    }
}

#[tokio::test]
async fn readyz_follows_the_watch_loop() {
    let health = Arc::new(Health::default());
    let addr = start(&Arc::new(Metrics::new()), &health);

    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.trim()), (503, "starting"));
    assert!(reply.header("content-type").is_some_and(|t| t.starts_with("text/plain")));

    health.set_not_ready("starting: loading programs");
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.trim()), (503, "starting: loading programs"));

    health.set_not_ready("baseline awaiting signature");
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.trim()), (503, "baseline awaiting signature"));

    health.set_ready(true);
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.trim()), (200, "ready"));

    health.set_ready(false);
    let reply = get(addr, "/readyz").await;
    assert_eq!((reply.status, reply.body.trim()), (503, "not ready"));

    // Readiness says nothing about liveness.
    assert_eq!(get(addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn healthz_fails_when_the_beats_stop() {
    let stale_after = Duration::from_millis(500);
    let health = Arc::new(Health::new(stale_after));
    let addr = start(&Arc::new(Metrics::new()), &health);

    health.beat();
    let reply = get(addr, "/healthz").await;
    assert_eq!((reply.status, reply.body.trim()), (200, "ok"));

    // Nobody beats any more: within the deadline the probe must fail, saying for how long.
    let reply = until_status(addr, "/healthz", 503).await;
    let silent: f64 = reply
        .body
        .trim()
        .strip_prefix("no heartbeat for ")
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected body {:?}", reply.body));
    assert!(silent >= stale_after.as_secs_f64(), "{silent}s of silence reported, stale after {stale_after:?}");
    assert!(health.liveness().is_err());

    // One beat and it is live again.
    health.beat();
    let reply = get(addr, "/healthz").await;
    assert_eq!((reply.status, reply.body.trim()), (200, "ok"));
}

#[tokio::test]
async fn other_paths_and_methods_are_refused() {
    let addr = start(&Arc::new(Metrics::new()), &Arc::new(Health::default()));
    for path in ["/", "/metrics/extra", "/health", "/debug/pprof", "/readyz/x"] {
        let reply = get(addr, path).await;
        assert_eq!(reply.status, 404, "GET {path}: {:?}", reply.body);
    }
    for method in ["POST", "PUT", "DELETE"] {
        let reply = request(addr, method, "/metrics").await;
        assert_eq!(reply.status, 405, "{method} /metrics");
    }
    // HEAD is GET without a body.
    let reply = request(addr, "HEAD", "/metrics").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some(CONTENT_TYPE));
    assert!(reply.body.is_empty(), "HEAD sent a body: {:?}", reply.body);
    assert_eq!(request(addr, "HEAD", "/healthz").await.status, 200);
}

#[tokio::test]
async fn idle_half_sent_connections_are_capped_and_timed_out() {
    let addr = start(&Arc::new(Metrics::new()), &Arc::new(Health::default()));
    let half = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n");
    let mut idle = Vec::new();
    for _ in 0..http::MAX_CONNECTIONS {
        let mut stream = TcpStream::connect(addr).await.expect("connecting to the endpoint");
        stream.write_all(half.as_bytes()).await.expect("sending half a request");
        idle.push(stream);
    }
    let opened = Instant::now();
    // Time for the server to take them all.
    sleep(Duration::from_millis(300)).await;
    // One more is closed at once: not served, not queued with a descriptor held for it.
    let mut extra = TcpStream::connect(addr).await.expect("connecting to the endpoint");
    let mut rest = Vec::new();
    let read = timeout(Duration::from_secs(2), extra.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "a connection beyond the cap was held open");
    assert!(rest.is_empty(), "a connection beyond the cap was answered: {:?}", String::from_utf8_lossy(&rest));
    // The idle ones are closed once their time to send a request head is up.
    for stream in &mut idle {
        let mut answer = Vec::new();
        let read = timeout(http::HEADER_TIMEOUT + Duration::from_secs(3), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "an idle half-sent request outlived the header timeout");
        assert!(!String::from_utf8_lossy(&answer).contains("200 OK"), "half a request was served");
    }
    assert!(opened.elapsed() >= http::HEADER_TIMEOUT - Duration::from_secs(1), "closed before its time");
    // And the probes are answered again.
    assert_eq!(get(addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let taken = start(&metrics, &health);

    let err = http::serve(taken, metrics.clone(), health.clone()).expect_err("binding a port already listened on");
    match &err {
        http::Error::AddrInUse { addr, source } => {
            assert_eq!(*addr, taken);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("expected AddrInUse, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(&taken.to_string()), "the message names the address: {message}");
    assert!(message.contains("already in use") && message.contains("--listen"), "and says what to do: {message}");

    // The first server is unharmed.
    assert_eq!(get(taken, "/healthz").await.status, 200);
}

#[test]
fn serving_outside_a_runtime_is_an_error_not_a_panic() {
    let result = http::serve("127.0.0.1:0".parse().unwrap(), Arc::new(Metrics::new()), Arc::new(Health::default()));
    assert!(matches!(result, Err(http::Error::NoRuntime)), "{result:?}");
}
