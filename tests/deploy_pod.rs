//! The DaemonSet's pod template, run for real: the image is built on this machine from the
//! test's `kubefim` binary (deploy/image/build-local.sh, no registry), the pod template of
//! the rendered kustomization becomes a Pod for `podman kube play` (podman 4.3.1 with runc),
//! and the agent must start with exactly the capabilities the manifest lists, become ready,
//! serve its metrics and report a change made on the host path its policy monitors, by its
//! host path.
//!
//! This needs root and podman. CI is root and has podman, so a missing one is a failure, not
//! a skip; `KUBEFIM_SKIP_PODMAN=1` skips on a machine that cannot run it.
//!
//! What differs from a kubelet is kept to what must differ on a test machine, each change
//! with its reason: the manifest edits (and the translations of what podman 4.3.1 reads
//! differently: the seccomp profile, $(VAR) in args) are in [`pod_for_this_machine`], the
//! settings a Pod cannot carry under podman 4.3.1 (host PID namespace, rlimits) in
//! [`CONTAINERS_CONF`].

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::deploy::{rendered_objects, repo};
use common::{BIN, Rule, Run, is_root, kubefim, policy_yaml, run_with_timeout};

/// How long the agent may take from `kube play` to a 200 on its startup probe's path (a
/// debug build loading its programs and verifying a one-file baseline takes a few seconds).
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long a change may take to show up in `podman logs`.
const REPORTED_WITHIN: Duration = Duration::from_secs(20);
/// Any one podman command (the image build copies a debug binary of a few hundred MB).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(180);

/// Settings a Pod cannot carry under podman 4.3.1, given to every podman command of this
/// test through CONTAINERS_CONF (which replaces the machine's containers.conf):
/// - `pidns = "host"`: the manifest's `hostPID: true`. podman 4.3.1's kube play ignores
///   hostPID (a TODO in its ToPodOpt), and a container created in a pod that does not share
///   its PID namespace takes the default from containers.conf. The test checks the result.
/// - `default_ulimits`: this machine's hard RLIMIT_NOFILE is below podman's default, and runc
///   then fails with "error setting rlimits" (tests/watch_env.rs passes the same --ulimit
///   values to `podman run`; kube play has no such flag). A kubelet leaves rlimits alone.
const CONTAINERS_CONF: &str = "\
[containers]
pidns = \"host\"
default_ulimits = [\"nofile=1024:1024\", \"nproc=1000:1000\"]
";

/// Capability numbers (linux/capability.h) of the names the manifest adds (tests/deploy.rs
/// keeps the list to these).
const CAPABILITY_NUMBERS: [(&str, u32); 4] = [("DAC_READ_SEARCH", 2), ("SYS_PTRACE", 19), ("PERFMON", 38), ("BPF", 39)];

/// `podman` with this machine's runtime settings (runc, cgroupfs) and [`CONTAINERS_CONF`].
struct Podman {
    conf: PathBuf,
}

impl Podman {
    fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf).args(["--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs"]);
        cmd
    }

    fn try_run(&self, args: &[&str]) -> Run {
        let mut cmd = self.command();
        cmd.args(args);
        run_with_timeout(cmd, PODMAN_TIMEOUT)
    }

    #[track_caller]
    fn run(&self, args: &[&str]) -> Run {
        let run = self.try_run(args);
        assert!(run.status.success(), "{} failed: {:?}\n{}", run.cmdline, run.status, run.dump());
        run
    }
}

/// Removes what the test created in podman's storage, whether it passed or not.
struct Teardown<'a> {
    podman: &'a Podman,
    pod: String,
    volumes: Vec<String>,
    image: String,
}

impl Drop for Teardown<'_> {
    fn drop(&mut self) {
        // The emptyDir volumes are anonymous volumes of the container: name them before the
        // pod (and with it the container) is gone.
        let container = format!("{}-agent", self.pod);
        let format = "{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}";
        let mounted = self.podman.try_run(&["container", "inspect", "--format", format, &container]);
        self.volumes.extend(mounted.stdout.split_whitespace().map(str::to_owned));
        let mut leftovers = Vec::new();
        let mut runs = vec![self.podman.try_run(&["pod", "rm", "--force", "--time", "5", &self.pod])];
        for volume in &self.volumes {
            runs.push(self.podman.try_run(&["volume", "rm", "--force", volume]));
        }
        runs.push(self.podman.try_run(&["rmi", "--force", &self.image]));
        for run in runs {
            // --force does not make a missing pod an error, nor a missing volume or image.
            if !run.status.success() {
                leftovers.push(format!("{}\n{}", run.cmdline, run.dump()));
            }
        }
        if !leftovers.is_empty() {
            eprintln!("teardown left things behind:\n{}", leftovers.join("\n"));
        }
    }
}

/// The test's files on the host: under /var/tmp (a disk, where /tmp may be a tmpfs), so the
/// monitored directory is an ordinary host directory the pod sees under /host.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let dir = tempfile::Builder::new().prefix("kubefim-deploy-pod-").tempdir_in("/var/tmp").expect("temp dir");
        for sub in ["state", "signing", "keys", "watched"] {
            fs::create_dir(dir.path().join(sub)).expect("create a test dir");
        }
        World { dir }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn watched_file(&self) -> PathBuf {
        self.path("watched/conf.txt")
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

#[test]
fn the_daemonset_pod_starts_least_privileged_becomes_ready_and_reports_a_host_change() {
    if std::env::var_os("KUBEFIM_SKIP_PODMAN").is_some_and(|v| v == "1") {
        eprintln!("KUBEFIM_SKIP_PODMAN=1: not running the DaemonSet's pod with podman");
        return;
    }
    assert!(
        is_root(),
        "this test runs the DaemonSet's pod with rootful podman and needs root (CI runs as root); \
         set KUBEFIM_SKIP_PODMAN=1 to skip it"
    );
    assert!(
        Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success()),
        "podman is not installed (scripts/setup.sh installs it); set KUBEFIM_SKIP_PODMAN=1 to skip this test"
    );

    let world = World::new();
    fs::write(world.path("containers.conf"), CONTAINERS_CONF).unwrap();
    let podman = Podman { conf: world.path("containers.conf") };
    let id = std::process::id();
    let mut teardown = Teardown {
        podman: &podman,
        pod: format!("kubefim-deploy-test-{id}"),
        volumes: Vec::new(),
        image: format!("localhost/kubefim-deploy-test:{id}"),
    };

    // The image, from this test's binary, the way a machine without a registry builds it.
    let mut build = Command::new(repo().join("deploy/image/build-local.sh"));
    build.env("CONTAINERS_CONF", &podman.conf).args(["--binary", BIN, "--tag", &teardown.image]);
    let built = run_with_timeout(build, PODMAN_TIMEOUT);
    assert!(built.status.success(), "build-local.sh failed\n{}", built.dump());
    check_image(&podman, &teardown.image);

    // The "baseline already signed" case: a key pair and a signed baseline of the test
    // policy, made on the host (the pod's /host is the host's /, so the paths are the same).
    fs::write(world.watched_file(), "alpha\n").unwrap();
    let policy = policy_yaml(&[Rule::new(world.path("watched")).diff()]);
    fs::write(world.path("policy.yaml"), &policy).unwrap();
    kubefim(["keygen", "--out", s(&world.path("signing"))]).expect_code(0);
    fs::copy(world.path("signing/kubefim.pub"), world.path("keys/kubefim.pub")).unwrap();
    kubefim([
        "baseline",
        "create",
        "--policy",
        s(&world.path("policy.yaml")),
        "--db",
        s(&world.path("state/baseline.db")),
        "--key",
        s(&world.path("signing/kubefim.key")),
    ])
    .expect_code(0);

    let port = free_port();
    let (docs, manifest) = pod_for_this_machine(&world, &teardown.pod, &teardown.image, &policy, port);
    let kube_yaml: Vec<String> = docs.iter().map(|d| serde_norway::to_string(d).expect("YAML")).collect();
    let kube_yaml = kube_yaml.join("---\n");
    fs::write(world.path("pod.yaml"), &kube_yaml).unwrap();
    // podman 4.3.1 keeps each ConfigMap volume as a named volume of the ConfigMap's name.
    for doc in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        teardown.volumes.push(doc["metadata"]["name"].as_str().unwrap().to_owned());
    }

    let played = podman.try_run(&["kube", "play", s(&world.path("pod.yaml"))]);
    assert!(played.status.success(), "podman kube play failed\n{}\n--- pod.yaml ---\n{kube_yaml}", played.dump());
    let container = format!("{}-agent", teardown.pod);
    let agent = Agent { podman: &podman, container: &container, port };

    // Ready: the readiness probe's path answers 200 within the deadline (the baseline is
    // trusted, the programs attached, the first rescan done), and the startup and liveness
    // paths do too (podman does not run these probes: see pod_for_this_machine).
    agent.wait_ready(&manifest.readiness_path);
    for path in [&manifest.startup_path, &manifest.liveness_path] {
        let (status, body) = agent.get(path).unwrap_or_else(|| panic!("GET {path}: no answer\n{}", agent.logs()));
        assert_eq!(status, 200, "GET {path}: {body}\n{}", agent.logs());
    }

    // Least privilege, as the kernel sees the agent's main process.
    let pid = podman.run(&["container", "inspect", "--format", "{{.State.Pid}}", &container]).stdout.trim().to_owned();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc/PID/status");
    let want = manifest.capabilities.iter().fold(0u64, |mask, cap| mask | 1 << cap);
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        let got = status_field(&status, field);
        let got = u64::from_str_radix(&got, 16).unwrap_or_else(|e| panic!("{field} {got:?}: {e}"));
        assert_eq!(got, want, "{field} is {got:#x}, the manifest adds {:?} ({want:#x})", manifest.capability_names);
    }
    assert_eq!(status_field(&status, "CapAmb"), "0000000000000000", "no ambient capabilities");
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "allowPrivilegeEscalation: false");
    let filtered = if manifest.seccomp_unconfined { "0" } else { "2" };
    assert_eq!(status_field(&status, "Seccomp"), filtered, "seccompProfile (0: none, 2: a filter)");
    assert_eq!(status_field(&status, "Uid").split_whitespace().next(), Some("0"), "runAsUser: 0");
    let own_pidns = fs::read_link("/proc/self/ns/pid").unwrap();
    assert_eq!(fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(), own_pidns, "hostPID: true");
    let mounts = fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("the agent's mountinfo");
    for (mount_point, read_only) in [
        ("/", true),
        ("/host", true),
        ("/sys/kernel/tracing", true),
        ("/sys/fs/bpf", true),
        ("/var/lib/kubefim", false),
        ("/etc/kubefim/keys", true),
        ("/etc/kubefim/policy", true),
        ("/etc/kubefim/signatures", true),
        ("/tmp", false),
    ] {
        let options = mount_options(&mounts, mount_point);
        assert_eq!(options.contains(&"ro"), read_only, "{mount_point} mounted {options:?}\n{mounts}");
    }

    // Metrics, on the named port.
    let (code, metrics) = agent.get("/metrics").unwrap_or_else(|| panic!("GET /metrics: no answer\n{}", agent.logs()));
    assert_eq!(code, 200, "GET /metrics: {metrics}");
    assert!(
        metrics.lines().any(|l| l.starts_with("kubefim_")) && metrics.contains("# TYPE kubefim_"),
        "no kubefim_ metrics in /metrics:\n{metrics}"
    );

    // A change on the host, reported by its host path (not /host/...).
    let watched = world.watched_file();
    fs::OpenOptions::new().append(true).open(&watched).unwrap().write_all(b"changed on the host\n").unwrap();
    let line = agent.wait_for_change(s(&watched));
    assert_eq!(line["kind"], "modified", "{line:#}");
    eprintln!("the agent in the pod reported: {line}");
    // Seen by the eBPF programs (the next rescan is an hour away), and the writer named by
    // its host pid: this test process (the agent's /proc is the host's).
    assert_eq!(line["detected_by"], "event", "{line:#}");
    assert_eq!(line["process"]["pid"], std::process::id(), "{line:#}");
    let reports = agent.reports();
    let under_host: Vec<&Value> =
        reports.iter().filter(|l| l["path"].as_str().is_some_and(|p| p.starts_with("/host/"))).collect();
    assert!(under_host.is_empty(), "reports name paths as the container sees them: {under_host:#?}");
    assert!(
        line["diff"].as_str().is_some_and(|d| d.contains("\n+changed on the host\n")),
        "the policy keeps content (diff: true): {line:#}"
    );
    drop(teardown);
}

/// What the test reads back from the rendered manifest to check the running pod against.
struct Manifest {
    startup_path: String,
    readiness_path: String,
    liveness_path: String,
    capability_names: Vec<String>,
    capabilities: Vec<u32>,
    seccomp_unconfined: bool,
}

/// The DaemonSet's pod template as a Pod for `podman kube play`, preceded by the ConfigMaps
/// it mounts (podman has no API server to take them from). Everything not changed here is
/// played as rendered: the security context, hostPID (see [`CONTAINERS_CONF`]), the
/// read-only host root at /host with its propagation, the tracefs and bpffs hostPaths, the
/// state hostPath's type, the volume mounts, the emptyDir, the args (but for the expansion
/// below), the resources and the image's entry point. podman ignores the service account,
/// tolerations and priority class; none matters on one machine.
fn pod_for_this_machine(world: &World, pod_name: &str, image: &str, policy: &str, port: u16) -> (Vec<Value>, Manifest) {
    let objects = rendered_objects();
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").expect("a DaemonSet in deploy/");
    let template = &ds["spec"]["template"];
    let mut spec = template["spec"].clone();
    assert_eq!(spec["containers"].as_array().map(Vec::len), Some(1), "one container");
    let manifest = {
        let c = &spec["containers"][0];
        let path = |probe: &str| {
            c[probe]["httpGet"]["path"].as_str().unwrap_or_else(|| panic!("{probe} is not an httpGet probe")).to_owned()
        };
        let names: Vec<String> = c["securityContext"]["capabilities"]["add"]
            .as_array()
            .expect("capabilities.add")
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let numbers = names
            .iter()
            .map(|n| {
                CAPABILITY_NUMBERS
                    .iter()
                    .find(|(name, _)| name == n)
                    .unwrap_or_else(|| panic!("unknown capability {n}"))
                    .1
            })
            .collect();
        Manifest {
            startup_path: path("startupProbe"),
            readiness_path: path("readinessProbe"),
            liveness_path: path("livenessProbe"),
            capability_names: names,
            capabilities: numbers,
            seccomp_unconfined: c["securityContext"]["seccompProfile"]["type"] == "Unconfined",
        }
    };

    // A Pod of its own name: a DaemonSet's pods get generated names, and a fixed one would
    // collide with a leftover of an interrupted run.
    let mut metadata = json!({
        "name": pod_name,
        "labels": template["metadata"]["labels"],
        "annotations": template["metadata"]["annotations"],
    });
    // The container's seccompProfile, in the form podman 4.3.1 reads: it ignores
    // securityContext.seccompProfile and takes the profile from the deprecated
    // container.seccomp.security.alpha.kubernetes.io/NAME annotation (its default being its
    // own profile, where a kubelet's default is Unconfined).
    let seccomp = match spec["containers"][0]["securityContext"]["seccompProfile"]["type"].as_str() {
        Some("Unconfined") => "unconfined",
        Some("RuntimeDefault") => "runtime/default",
        other => panic!("seccompProfile {other:?}: not translated for podman"),
    };
    let container_name = spec["containers"][0]["name"].as_str().unwrap().to_owned();
    metadata["annotations"][format!("container.seccomp.security.alpha.kubernetes.io/{container_name}")] =
        json!(seccomp);

    // The test policy: one temp directory on the host instead of the node policy (a scan of
    // a whole node takes minutes). Under a name of its own: podman 4.3.1 keeps a ConfigMap
    // volume as a named volume (the teardown removes it) and reuses one of the same name.
    let policy_map = format!("kubefim-policy-test-{}", std::process::id());
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": policy_map},
        "data": {"node.yaml": policy},
    });
    // The signatures ConfigMap, optional and absent on a node whose baseline is signed: a
    // kubelet then mounts an empty directory; podman 4.3.1 mounts nothing at all (the path
    // would not exist in the container). Supplied empty, podman mounts the same empty
    // directory.
    let signatures = spec["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == "signatures"))
        .expect("a signatures volume");
    assert_eq!(signatures["configMap"]["optional"], true);
    let signatures_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": signatures["configMap"]["name"]},
        "data": {},
    });
    let node_name = rustix::system::uname().nodename().to_str().expect("UTF-8 host name").to_owned();

    for volume in spec["volumes"].as_array_mut().expect("volumes") {
        match volume["name"].as_str().unwrap() {
            // The state hostPath: the test's directory (with the signed baseline) instead
            // of the node's /var/lib/kubefim.
            "state" => volume["hostPath"]["path"] = json!(s(&world.path("state"))),
            // The test policy's ConfigMap (above) instead of the node policy's.
            "policy" => volume["configMap"]["name"] = json!(policy_map),
            // The public-key Secret, as a hostPath holding the same single file: podman
            // 4.3.1's secret volumes take a podman secret holding a Secret document, write
            // its `data` values without base64-decoding them, and dereference
            // `secret.optional` without a nil check (it panics on our manifest, which does not
            // set it).
            "keys" => {
                assert_eq!(volume["secret"]["items"][0]["path"], "kubefim.pub");
                *volume = json!({"name": "keys", "hostPath": {"path": s(&world.path("keys")), "type": "Directory"}});
            }
            _ => {}
        }
    }

    let container = &mut spec["containers"][0];
    // The image built from this test's binary.
    container["image"] = json!(image);
    // No probes: podman 4.3.1 ignores startup and readiness probes and turns the liveness
    // probe into a healthcheck that runs `curl` inside the container (the image has no curl,
    // and a named port becomes port 0). The test asks the same paths from the host instead:
    // the startup path until it answers 200, then the readiness and liveness paths.
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        container.as_object_mut().unwrap().remove(probe);
    }
    // NODE_NAME from the downward API (spec.nodeName): podman 4.3.1 supports only
    // metadata.name, metadata.uid, labels and annotations there. The node's name is this
    // machine's host name.
    let env = container["env"].as_array_mut().expect("env");
    let node = env.iter_mut().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME in env");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    *node = json!({"name": "NODE_NAME", "value": node_name});
    // $(VAR) references in args: the kubelet expands them from the container's env, podman
    // 4.3.1 does not; the test does the kubelet's expansion.
    let vars: Vec<(String, String)> =
        env.iter().filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned()))).collect();
    for arg in container["args"].as_array_mut().expect("args") {
        let mut text = arg.as_str().unwrap().to_owned();
        for (name, value) in &vars {
            text = text.replace(&format!("$({name})"), value);
        }
        *arg = json!(text);
    }
    // The metrics port on a free loopback port: podman publishes every containerPort on the
    // host (as its hostPort when none is given), where 9090 may be taken; the kubelet
    // publishes nothing.
    let ports = container["ports"].as_array_mut().expect("ports");
    let metrics = ports.iter_mut().find(|p| p["name"] == "metrics").expect("a port named metrics");
    metrics["hostPort"] = json!(port);
    metrics["hostIP"] = json!("127.0.0.1");

    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec});
    (vec![config_map, signatures_map, pod], manifest)
}

/// The running agent, seen from the host.
struct Agent<'a> {
    podman: &'a Podman,
    container: &'a str,
    port: u16,
}

impl Agent<'_> {
    /// `podman logs` (stdout: the reports; stderr: the agent's own log) and its state.
    fn logs(&self) -> String {
        let logs = self.podman.try_run(&["logs", self.container]);
        let state = self.podman.try_run(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}} exit={{.State.ExitCode}} restarts={{.RestartCount}} {{.State.Error}}",
            self.container,
        ]);
        format!("--- podman logs {} ---\n{}\n--- state ---\n{}", self.container, logs.dump(), state.stdout.trim())
    }

    /// Panics (with the logs) if the agent is not running or has been restarted.
    fn check_running(&self) {
        let state = self.podman.run(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}} {{.RestartCount}}",
            self.container,
        ]);
        let state = state.stdout.trim();
        assert_eq!(state, "running 0", "the agent is not running (status, restarts: {state})\n{}", self.logs());
    }

    /// `GET path` on the published metrics port: status and body, or `None` if nothing
    /// answers yet.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        // HTTP/1.0: one response, no chunked encoding, closed at the end.
        write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned();
        Some((status, body))
    }

    /// Waits for a 200 on `path`; panics with the last answer and the logs at the deadline.
    fn wait_ready(&self, path: &str) {
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = None;
        loop {
            self.check_running();
            match self.get(path) {
                Some((200, _)) => return,
                answer => last = answer.or(last),
            }
            if Instant::now() >= deadline {
                panic!("GET {path} not 200 within {READY_WITHIN:?}; last answer {last:?}\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// The JSON lines the agent printed on stdout so far.
    fn reports(&self) -> Vec<Value> {
        let logs = self.podman.run(&["logs", self.container]);
        logs.stdout.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
    }

    /// Waits for the change report of `path` on the agent's stdout.
    fn wait_for_change(&self, path: &str) -> Value {
        let deadline = Instant::now() + REPORTED_WITHIN;
        loop {
            if let Some(line) = self.reports().into_iter().find(|l| l["path"] == path && l["kind"].is_string()) {
                return line;
            }
            if Instant::now() >= deadline {
                panic!("no report for {path} within {REPORTED_WITHIN:?}\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

/// The image holds the binary, the libraries and the loader, and carries the OCI labels.
fn check_image(podman: &Podman, image: &str) {
    let labels = podman.run(&["image", "inspect", "--format", "{{json .Labels}}", image]);
    let labels: Value = serde_json::from_str(labels.stdout.trim()).expect("labels as JSON");
    for key in ["title", "description", "version", "revision", "licenses", "source"] {
        let key = format!("org.opencontainers.image.{key}");
        assert!(labels[&key].as_str().is_some_and(|v| !v.is_empty()), "label {key} missing: {labels:#}");
    }
    let mount = podman.run(&["image", "mount", image]).stdout.trim().to_owned();
    let mut files = BTreeSet::new();
    let mut stack = vec![PathBuf::from(&mount)];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                files.insert(entry.path().strip_prefix(&mount).unwrap().to_str().unwrap().to_owned());
            }
        }
    }
    podman.run(&["image", "unmount", image]);
    assert!(files.contains("usr/local/bin/kubefim"), "no binary in the image: {files:?}");
    assert!(files.iter().any(|f| f.contains("/libc.so")), "no libc in the image: {files:?}");
    assert!(files.iter().any(|f| f.contains("/ld-linux")), "no loader in the image: {files:?}");
    let other: Vec<&String> = files.iter().filter(|f| *f != "usr/local/bin/kubefim" && !f.contains(".so")).collect();
    assert!(other.is_empty(), "the image holds more than the binary and its libraries: {other:?}");
}

/// A field of /proc/PID/status, trimmed.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/PID/status:\n{status}"))
        .trim()
        .to_owned()
}

/// The per-mount options of the last (topmost) mount at `mount_point` in a mountinfo.
fn mount_options<'a>(mountinfo: &'a str, mount_point: &str) -> Vec<&'a str> {
    mountinfo
        .lines()
        .rev()
        .find_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            (fields.get(4) == Some(&mount_point)).then(|| fields[5].split(',').collect())
        })
        .unwrap_or_else(|| panic!("nothing mounted at {mount_point}:\n{mountinfo}"))
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a loopback port").local_addr().unwrap().port()
}
