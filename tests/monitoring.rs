//! The monitoring pack (deploy/components/monitoring) against the real agent and the real
//! promtool: the PodMonitor selects the DaemonSet's pods and port as deploy/ renders them;
//! the component renders on top of the base; the PrometheusRule's `spec`, extracted as the
//! rule file it is, passes `promtool check rules` and its `promtool test rules` cases (every
//! alert both firing and not firing); a live agent's `/metrics` passes `promtool check
//! metrics` in the classic text format and is OpenMetrics otherwise; and every metric the
//! rules and the dashboard name is one that agent exports.
//!
//! promtool comes with Debian's `prometheus` package (scripts/setup.sh); a test fails, not
//! skips, without it. The live-agent test needs root for the eBPF programs and skips without
//! it, never in CI (which runs as root).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::deploy::{parse_yaml_stream, rendered_objects, rendered_text_of, repo};
use common::watch::Watcher;
use common::{Fixture, Rule};
use serde_json::Value;

#[track_caller]
fn root_or_skip() -> bool {
    if !common::is_root() {
        assert!(std::env::var_os("CI").is_none(), "monitoring tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

/// The component's directory.
fn component() -> PathBuf {
    repo().join("deploy/components/monitoring")
}

/// One YAML file of the component, parsed (one document).
#[track_caller]
fn component_yaml(name: &str) -> Value {
    let path = component().join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut docs = parse_yaml_stream(&text);
    assert_eq!(docs.len(), 1, "{} holds one object", path.display());
    docs.remove(0)
}

/// The dashboard, parsed.
fn dashboard() -> Value {
    let path = component().join("dashboard.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------------------------

#[test]
fn the_pod_monitor_selects_the_agents_pods_and_port() {
    let kustomization = component_yaml("kustomization.yaml");
    assert_eq!(kustomization["kind"], "Component", "a Component, usable by any overlay of deploy/");
    let monitor = component_yaml("podmonitor.yaml");
    assert_eq!(monitor["kind"], "PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");

    let objects = rendered_objects();
    let daemonset = objects
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "kubefim")
        .expect("deploy/ renders the DaemonSet kubefim");
    let pod_labels = daemonset["spec"]["template"]["metadata"]["labels"].as_object().expect("pod template labels");
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().expect("the PodMonitor selects by labels");
    assert!(!selector.is_empty(), "an empty selector would select every pod");
    for (key, value) in selector {
        assert_eq!(pod_labels.get(key), Some(value), "the DaemonSet's pods carry {key}={value} ({pod_labels:?})");
    }
    // jobLabel names a label of the pods: it gives the alerts' job="kubefim".
    let job_label = monitor["spec"]["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(pod_labels.get(job_label).and_then(Value::as_str), Some("kubefim"), "job from {job_label}");
    let namespace = daemonset["metadata"]["namespace"].as_str().expect("the DaemonSet's namespace");
    let watched: Vec<&str> = monitor["spec"]["namespaceSelector"]["matchNames"]
        .as_array()
        .expect("namespaceSelector.matchNames")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(watched.contains(&namespace), "the PodMonitor looks in {watched:?}, the agents run in {namespace}");

    let ports: Vec<&Value> = daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .collect();
    let args: Vec<&str> = daemonset["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let endpoints = monitor["spec"]["podMetricsEndpoints"].as_array().expect("podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    let endpoint = &endpoints[0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = ports
        .iter()
        .find(|p| p["name"] == endpoint["port"])
        .unwrap_or_else(|| panic!("no container port named {} in {ports:?}", endpoint["port"]));
    // And the agent listens on that port.
    let listen = format!("--listen=0.0.0.0:{}", port["containerPort"]);
    assert!(args.contains(&listen.as_str()), "the agent listens with {listen}: {args:?}");
}

#[test]
fn the_component_renders_on_the_base() {
    // `kubectl kustomize` renders no Component alone: a throwaway overlay of deploy/ with it.
    // kustomize takes no absolute path: both named relative to the temp dir.
    let dir = tempfile::tempdir().expect("temp dir");
    let up = "../".repeat(dir.path().components().count() - 1);
    let from_root = |p: PathBuf| format!("{up}{}", p.strip_prefix("/").expect("an absolute path").display());
    let overlay = format!(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
        from_root(repo().join("deploy")),
        from_root(component())
    );
    fs::write(dir.path().join("kustomization.yaml"), overlay).unwrap();
    let out = Command::new("kubectl").arg("kustomize").arg(dir.path()).output().expect("kubectl must be installed");
    assert!(
        out.status.success(),
        "kubectl kustomize of deploy/ with the component: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = parse_yaml_stream(&String::from_utf8(out.stdout).unwrap());
    let one = |kind: &str| -> Value {
        let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
        assert_eq!(found.len(), 1, "one {kind} in the render");
        found[0].clone()
    };
    assert_eq!(one("PodMonitor")["spec"], component_yaml("podmonitor.yaml")["spec"]);
    assert_eq!(one("PrometheusRule")["spec"], component_yaml("prometheusrule.yaml")["spec"]);
    let dashboards: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ConfigMap" && o["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(dashboards.len(), 1, "one ConfigMap labelled grafana_dashboard: \"1\"");
    let shipped = dashboards[0]["data"]["kubefim.json"].as_str().expect("the dashboard in kubefim.json");
    assert_eq!(serde_json::from_str::<Value>(shipped).expect("JSON"), dashboard());
    // Every object of the component in the agents' namespace.
    for o in objects.iter().filter(|o| o["metadata"]["labels"]["app.kubernetes.io/component"] == "monitoring") {
        assert_eq!(o["metadata"]["namespace"], "kubefim", "{o:#}");
    }

    // And the shipped overlay uses it (when there is one).
    if repo().join("deploy/overlays/monitoring/kustomization.yaml").exists() {
        let text = rendered_text_of("deploy/overlays/monitoring");
        assert!(text.contains("kind: PodMonitor") && text.contains("kind: PrometheusRule"), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The rules and promtool
// ---------------------------------------------------------------------------------------------

/// `promtool ARGS...` with `stdin`, in `dir`: exit status, and stdout and stderr together.
#[track_caller]
fn promtool(dir: &Path, args: &[&str], stdin: &str) -> (Option<i32>, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install Debian's prometheus package (scripts/setup.sh does)")
        });
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().expect("promtool's output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The PrometheusRule's `spec`, which is a Prometheus rule file.
fn rule_file() -> Value {
    let rule = component_yaml("prometheusrule.yaml");
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    rule["spec"].clone()
}

/// Every alerting rule of the rule file.
fn alerts() -> Vec<Value> {
    rule_file()["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

/// The promtool test files, deploy/components/monitoring/tests/*.yaml.
fn rule_tests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(component().join("tests"))
        .expect("the component's tests/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no promtool test files");
    files
}

#[test]
fn promtool_checks_the_rules_and_passes_their_tests() {
    let dir = tempfile::tempdir().expect("temp dir");
    // JSON is YAML: the spec as it is, with nothing re-typed on the way.
    let rules = serde_json::to_string_pretty(&rule_file()).unwrap();
    fs::write(dir.path().join("kubefim-rules.yaml"), &rules).unwrap();
    let (code, out) = promtool(dir.path(), &["check", "rules", "kubefim-rules.yaml"], "");
    assert_eq!(code, Some(0), "promtool check rules:\n{out}\n{rules}");
    assert!(!out.contains("WARNING"), "promtool check rules warns:\n{out}");

    let mut names = Vec::new();
    for test in rule_tests() {
        let name = test.file_name().unwrap().to_str().unwrap().to_owned();
        fs::copy(&test, dir.path().join(&name)).unwrap();
        names.push(name);
    }
    let mut args = vec!["test", "rules"];
    args.extend(names.iter().map(String::as_str));
    let (code, out) = promtool(dir.path(), &args, "");
    assert_eq!(code, Some(0), "promtool test rules:\n{out}");
    assert!(out.contains("SUCCESS") && !out.contains("FAILED"), "{out}");
}

#[test]
fn every_alert_is_tested_firing_and_not_firing_and_says_what_to_do() {
    // alertname -> (a case expecting it, a case expecting nothing).
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for file in rule_tests() {
        let doc = &parse_yaml_stream(&fs::read_to_string(&file).unwrap())[0];
        assert_eq!(doc["rule_files"], serde_json::json!(["kubefim-rules.yaml"]), "{}", file.display());
        for case in doc["tests"].as_array().expect("tests").iter().flat_map(|t| t["alert_rule_test"].as_array()) {
            for check in case {
                let name = check["alertname"].as_str().expect("alertname").to_owned();
                match check["exp_alerts"].as_array() {
                    Some(a) if !a.is_empty() => firing.insert(name),
                    _ => quiet.insert(name),
                };
            }
        }
    }
    let alerts = alerts();
    assert!(alerts.len() >= 11, "{alerts:#?}");
    for rule in &alerts {
        let name = rule["alert"].as_str().unwrap_or_else(|| panic!("a recording rule? {rule:#}"));
        assert!(firing.contains(name), "no promtool case where {name} fires");
        assert!(quiet.contains(name), "no promtool case where {name} stays quiet");
        assert!(
            matches!(rule["labels"]["severity"].as_str(), Some("critical" | "warning")),
            "{name}: severity critical or warning"
        );
        for annotation in ["summary", "description"] {
            assert!(rule["annotations"][annotation].as_str().is_some_and(|s| s.len() > 10), "{name}: {annotation}");
        }
        assert!(rule["for"].is_string(), "{name}: a `for`");
    }
    let named: BTreeSet<&str> = alerts.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(named.len(), alerts.len(), "alert names are unique");
    // What the issue asks for, by name.
    for want in [
        "KubefimAgentDown",
        "KubefimAgentAbsent",
        "KubefimAgentNotReady",
        "KubefimBaselineUntrusted",
        "KubefimLostEvents",
        "KubefimVerifyFailing",
        "KubefimVerifyStale",
        "KubefimSelfCheckFailing",
        "KubefimContainerDrift",
        "KubefimDriftExec",
        "KubefimPolicyRejected",
        "KubefimKubernetesWritesFailing",
    ] {
        assert!(named.contains(want), "no alert {want}: {named:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Metric names in PromQL
// ---------------------------------------------------------------------------------------------

/// The `kubefim_*` metric names a PromQL expression (or a Grafana `label_values(...)` query)
/// names: identifiers outside quoted strings that start with `kubefim_`. Label names cannot
/// start so (ours do not), and label values are quoted.
fn metric_names_in(expr: &str) -> BTreeSet<String> {
    // Quoted strings out first: a label value or a legend may hold anything.
    let mut bare = String::new();
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
                bare.push(' ');
            }
            None if matches!(c, '"' | '\'' | '`') => {
                quote = Some(c);
                bare.push(' ');
            }
            None => bare.push(c),
        }
    }
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    bare.split(|c: char| !ident(c)).filter(|w| w.starts_with("kubefim_")).map(str::to_owned).collect()
}

/// The sample names an exposition in the classic format declares: each `# TYPE` name, and for
/// a histogram or summary its `_bucket`, `_sum` and `_count` series.
fn exported_names(classic: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (name, kind) in classic.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')) {
        match kind {
            "histogram" | "summary" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every `expr` in the rule file, by alert name.
fn rule_exprs() -> Vec<(String, String)> {
    alerts()
        .iter()
        .map(|r| (r["alert"].as_str().unwrap_or("?").to_owned(), r["expr"].as_str().expect("expr").to_owned()))
        .collect()
}

/// Every PromQL the dashboard runs: each `expr` anywhere (panel targets) and each templating
/// query, by where it is.
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let here = map.get("title").and_then(Value::as_str).map_or(at.to_owned(), |t| format!("{at}/{t}"));
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("expr", Value::String(e)) => out.push((here.clone(), e.clone())),
                        _ => walk(child, &here, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, at, out)),
            _ => {}
        }
    }
    let dash = dashboard();
    let mut out = Vec::new();
    walk(&dash["panels"], "panels", &mut out);
    assert!(out.len() >= 20, "the dashboard's panels run {} queries: {out:#?}", out.len());
    for var in dash["templating"]["list"].as_array().expect("templating").iter().filter(|v| v["type"] == "query") {
        let query = var["query"]["query"].as_str().or_else(|| var["query"].as_str()).expect("a query variable's query");
        out.push((format!("templating/{}", var["name"]), query.to_owned()));
    }
    out
}

/// Where `exprs` name a `kubefim_*` metric that is not in `exported`.
fn unknown_names(exprs: &[(String, String)], exported: &BTreeSet<String>) -> Vec<String> {
    exprs
        .iter()
        .flat_map(|(at, e)| {
            metric_names_in(e).into_iter().filter(|n| !exported.contains(n)).map(move |n| format!("{at}: {n}"))
        })
        .collect()
}

#[test]
fn metric_names_are_read_from_promql_as_prometheus_does() {
    let names = |e: &str| metric_names_in(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"sum by (namespace) (increase(kubefim_container_changes_total{job="kubefim_x"}[10m])) > 0"#),
        ["kubefim_container_changes_total"]
    );
    assert_eq!(
        names("time() - kubefim_last_verify_timestamp_seconds > 7 * 3600"),
        ["kubefim_last_verify_timestamp_seconds"]
    );
    assert_eq!(names("label_values(kubefim_build_info{job=\"kubefim\"}, node)"), ["kubefim_build_info"]);
    assert_eq!(names("kubefim_ready==0 and kubefim_programs_attached"), ["kubefim_programs_attached", "kubefim_ready"]);
    assert_eq!(names("up{job=\"kubefim\"} == 0"), Vec::<String>::new());
    let exported = exported_names(
        "# TYPE kubefim_events_total counter\n# TYPE kubefim_rehash_duration_seconds histogram\n# TYPE kubefim_build_info gauge\n",
    );
    let ok = [("a".to_owned(), "rate(kubefim_rehash_duration_seconds_bucket[5m]) + kubefim_events_total".to_owned())];
    assert!(unknown_names(&ok, &exported).is_empty());
    // A wrong name is caught, whichever the suffix.
    for wrong in ["kubefim_events", "kubefim_event_total", "kubefim_rehash_duration_seconds", "kubefim_build"] {
        let exprs = [("a".to_owned(), format!("sum(rate({wrong}[5m]))"))];
        assert_eq!(unknown_names(&exprs, &exported), [format!("a: {wrong}")], "{wrong}");
    }
}

// ---------------------------------------------------------------------------------------------
// A live agent
// ---------------------------------------------------------------------------------------------

/// `GET path` with these extra header lines: the status, the headers (lower-cased names) and
/// the body.
#[track_caller]
fn get(addr: SocketAddr, path: &str, headers: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connecting to the agent");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{headers}\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading the answer");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("a status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    assert!(!headers.iter().any(|(n, _)| n == "transfer-encoding"), "a chunked answer: {head}");
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The address the watcher says it serves on.
#[track_caller]
fn endpoint(watcher: &Watcher) -> SocketAddr {
    const SAYS: &str = "serving /metrics, /healthz and /readyz on http://";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump = watcher.dump();
        if let Some(addr) = dump.lines().find_map(|l| Some(l.split_once(SAYS)?.1.trim().to_owned())) {
            return addr.parse().unwrap_or_else(|e| panic!("bad endpoint address {addr:?}: {e}"));
        }
        assert!(Instant::now() < deadline, "no endpoint address on stderr\n{dump}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_live_agent_passes_promtool_in_the_classic_format_and_exports_every_metric_the_pack_names() {
    if !root_or_skip() {
        return;
    }
    let fx = Fixture::on_disk();
    fs::write(fx.t("a.txt"), "a\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree()).diff()]));
    let watcher = Watcher::start_on(&fx, &["--listen", "127.0.0.1:0"]);
    let addr = endpoint(&watcher);

    // Ready, and the gauge says the same as /readyz.
    let (status, _, body) = get(addr, "/readyz", "");
    assert_eq!(status, 200, "{body}\n{}", watcher.dump());

    // The classic format, asked for as promtool and older scrapers do.
    let (status, headers, classic) = get(addr, "/metrics", "Accept: text/plain;version=0.0.4\r\n");
    assert_eq!(status, 200, "{classic}");
    assert_eq!(header(&headers, "content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    assert!(classic.lines().any(|l| l == "kubefim_ready 1"), "kubefim_ready follows /readyz:\n{classic}");
    assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"), "{classic}");
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = promtool(dir.path(), &["check", "metrics"], &classic);
    assert_eq!(code, Some(0), "promtool check metrics:\n{out}\n--- /metrics ---\n{classic}");
    assert!(out.trim().is_empty(), "promtool check metrics complains:\n{out}\n--- /metrics ---\n{classic}");

    // OpenMetrics otherwise: no Accept, */*, Prometheus' own preference.
    for accept in [
        "",
        "Accept: */*\r\n",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1\r\n",
    ] {
        let (status, headers, text) = get(addr, "/metrics", accept);
        assert_eq!(status, 200, "{accept:?}: {text}");
        assert_eq!(
            header(&headers, "content-type"),
            Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            "{accept:?}"
        );
        assert_eq!(text.lines().last(), Some("# EOF"), "{accept:?}: OpenMetrics ends with # EOF:\n{text}");
        assert!(text.contains("# TYPE kubefim_build info\n"), "{text}");
    }

    // Every metric the rules and the dashboard name is one this agent exports.
    let exported = exported_names(&classic);
    for must in ["kubefim_container_changes_total", "kubefim_drift_exec_total", "kubefim_events_total", "kubefim_ready"]
    {
        assert!(exported.contains(must), "{must} is declared before its first sample:\n{classic}");
    }
    let rules = rule_exprs();
    let used: BTreeSet<String> = rules.iter().flat_map(|(_, e)| metric_names_in(e)).collect();
    assert!(used.len() >= 10, "the rules name {used:?}");
    let unknown = unknown_names(&rules, &exported);
    assert!(
        unknown.is_empty(),
        "the PrometheusRule names metrics the agent does not export: {unknown:#?}\n{exported:#?}"
    );
    let panels = dashboard_exprs();
    let unknown = unknown_names(&panels, &exported);
    assert!(unknown.is_empty(), "the dashboard names metrics the agent does not export: {unknown:#?}\n{exported:#?}");
    // And the dashboard shows every metric there is (a new one gets a panel).
    let shown: BTreeSet<String> = panels.iter().flat_map(|(_, e)| metric_names_in(e)).collect();
    let families: BTreeSet<String> = exported
        .iter()
        .map(|n| {
            n.strip_suffix("_bucket").or(n.strip_suffix("_sum")).or(n.strip_suffix("_count")).unwrap_or(n).to_owned()
        })
        .collect();
    let hidden: Vec<&String> = families.iter().filter(|f| !shown.iter().any(|s| s.starts_with(f.as_str()))).collect();
    assert!(hidden.is_empty(), "metrics no dashboard panel shows: {hidden:?}");
    let status = watcher.stop();
    assert!(status.success(), "the agent's exit: {status}");
}
