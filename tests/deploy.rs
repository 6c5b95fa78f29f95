//! The Kubernetes manifests (deploy/): rendered with `kubectl kustomize`, validated strictly
//! against the OpenAPI schema of a current Kubernetes release (kubernetes-validate, which
//! scripts/setup.sh installs), and checked for the least-privilege properties the DaemonSet
//! promises: no privileged container, all capabilities dropped and only the listed ones
//! added, read-only root and host mounts, read-only RBAC, only the public key. Also: the
//! agent's command line agrees with the volumes and ports it names, the probes are HTTP
//! probes (the image has no shell), and the image is the binary, its libraries and nothing
//! else. tests/deploy_pod.rs runs the pod template for real.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::deploy::{rendered_objects, rendered_text, repo};
use serde_json::Value;

const KUBERNETES_VERSION: &str = "1.32.0";

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "want exactly one {kind}, got {}", found.len());
    found[0]
}

#[test]
fn rendered_manifests_validate_strictly_against_the_kubernetes_schema() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered_text()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("python3 with kubernetes-validate (scripts/setup.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "strict validation failed:\n{text}");
    let kinds: BTreeSet<&str> =
        ["namespace", "serviceaccount", "clusterrole", "clusterrolebinding", "configmap", "daemonset", "networkpolicy"]
            .into_iter()
            .collect();
    for kind in kinds {
        assert!(text.contains(&format!("passed for resource {kind}/")), "{kind} not validated:\n{text}");
    }
}

#[test]
fn the_policy_config_map_is_the_shipped_node_policy() {
    let objects = rendered_objects();
    let cm = one(&objects, "ConfigMap");
    let shipped = std::fs::read_to_string(repo().join("policies/node.yaml")).unwrap();
    assert_eq!(cm["data"]["node.yaml"].as_str(), Some(shipped.as_str()), "deploy/policy-node.yaml is stale");
}

#[test]
fn the_daemonset_is_least_privileged() {
    let objects = rendered_objects();
    let ds = one(&objects, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod.get("initContainers").is_none(), "no init container (nothing is compiled on the node)");
    assert_ne!(pod["hostNetwork"], true);
    assert_eq!(pod["tolerations"][0]["operator"], "Exists", "runs on every node");
    assert!(pod["priorityClassName"].is_string());
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let added: BTreeSet<&str> =
        sc["capabilities"]["add"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let allowed: BTreeSet<&str> = ["BPF", "PERFMON", "DAC_READ_SEARCH", "SYS_PTRACE"].into_iter().collect();
    assert_eq!(added, allowed, "capabilities added beyond the documented ones");
    // Stated, so a kubelet with --seccomp-default does not put a profile that forbids bpf()
    // without SYS_ADMIN on the agent (daemonset.yaml says why not RuntimeDefault).
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined");
    assert!(c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object());
    assert!(c["readinessProbe"].is_object() && c["livenessProbe"].is_object());
    let env = c["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    // Host paths: the root, tracefs and bpffs only read-only; only the state dir writable.
    let volumes = pod["volumes"].as_array().unwrap();
    for mount in c["volumeMounts"].as_array().unwrap() {
        let name = mount["name"].as_str().unwrap();
        let volume = volumes.iter().find(|v| v["name"] == name).unwrap();
        if let Some(host) = volume["hostPath"]["path"].as_str() {
            let writable = mount["readOnly"] != true;
            assert!(!writable || host == "/var/lib/kubefim", "host path {host} mounted writable");
        }
    }
    // Only the public key from the Secret.
    let keys = volumes.iter().find(|v| v["secret"].is_object()).expect("the public key secret");
    let items: Vec<&str> =
        keys["secret"]["items"].as_array().unwrap().iter().filter_map(|i| i["key"].as_str()).collect();
    assert_eq!(items, ["kubefim.pub"]);
}

#[test]
fn rbac_is_read_only_on_pods_and_nodes() {
    let objects = rendered_objects();
    let role = one(&objects, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for resource in rule["resources"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                granted.insert(format!("{}:{}", resource.as_str().unwrap(), verb.as_str().unwrap()));
            }
        }
    }
    let want: BTreeSet<String> =
        ["pods:get", "pods:list", "pods:watch", "nodes:get"].into_iter().map(String::from).collect();
    assert_eq!(granted, want);
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], "kubefim");
    assert_eq!(binding["subjects"][0]["name"], "kubefim");
}

/// The agent's command line, as the DaemonSet passes it (the contract with the agent's flags).
const AGENT_ARGS: &[&str] = &[
    "watch",
    "--db=/var/lib/kubefim/baseline.db",
    "--journal=/var/lib/kubefim/journal",
    "--pubkey=/etc/kubefim/keys/kubefim.pub",
    "--host-root=/host",
    "--listen=0.0.0.0:9090",
    "--kubernetes",
    "--node-name=$(NODE_NAME)",
    "--init-policy=/etc/kubefim/policy/node.yaml",
    "--signatures=/etc/kubefim/signatures",
    "--verify-interval=6h",
    "--rescan-interval=1h",
    "--format=jsonl",
];

/// The agent container of the rendered DaemonSet, and its pod spec.
fn agent(objects: &[Value]) -> (&Value, &Value) {
    let pod = &one(objects, "DaemonSet")["spec"]["template"]["spec"];
    (&pod["containers"][0], pod)
}

/// The volume mounted at `mount_path` in the container, with its mount.
fn volume_at<'a>(c: &'a Value, pod: &'a Value, mount_path: &str) -> (&'a Value, &'a Value) {
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == mount_path)
        .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap();
    (mount, volume)
}

#[test]
fn the_agent_command_line_is_the_contract_and_matches_the_volumes() {
    let objects = rendered_objects();
    let (c, pod) = agent(&objects);
    let args: Vec<&str> = c["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(args, AGENT_ARGS, "the agent's command line");
    assert!(c.get("command").is_none(), "the image's entry point is the binary");
    let flags: BTreeMap<&str, &str> =
        args.iter().filter_map(|a| a.strip_prefix("--")).map(|a| a.split_once('=').unwrap_or((a, ""))).collect();
    assert!(!flags.contains_key("ready-file"), "readiness is /readyz now");

    // --host-root: the host's / read-only, following mounts made after the pod started.
    let (mount, volume) = volume_at(c, pod, flags["host-root"]);
    assert_eq!(volume["hostPath"]["path"], "/");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    // --db and --journal on the node's state hostPath, writable.
    for flag in ["db", "journal"] {
        let dir = Path::new(flags[flag]).parent().unwrap().to_str().unwrap();
        let (mount, volume) = volume_at(c, pod, dir);
        assert_eq!(volume["hostPath"]["path"], "/var/lib/kubefim", "--{flag}");
        assert_ne!(mount["readOnly"], true, "--{flag}");
    }
    // --pubkey: the Secret's one item.
    let pubkey = Path::new(flags["pubkey"]);
    let (_, volume) = volume_at(c, pod, pubkey.parent().unwrap().to_str().unwrap());
    assert_eq!(volume["secret"]["items"][0]["path"].as_str(), pubkey.file_name().unwrap().to_str());
    // --init-policy: a key of the generated policy ConfigMap.
    let policy = Path::new(flags["init-policy"]);
    let (mount, volume) = volume_at(c, pod, policy.parent().unwrap().to_str().unwrap());
    assert_eq!(mount["readOnly"], true);
    let cm = one(&objects, "ConfigMap");
    assert_eq!(volume["configMap"]["name"], cm["metadata"]["name"]);
    assert!(cm["data"][policy.file_name().unwrap().to_str().unwrap()].is_string());
    // --signatures: the kubefim-signatures ConfigMap, optional (it exists only once a first
    // scan has been signed) and read-only.
    let (mount, volume) = volume_at(c, pod, flags["signatures"]);
    assert_eq!(volume["configMap"]["name"], "kubefim-signatures");
    assert_eq!(volume["configMap"]["optional"], true);
    assert_eq!(mount["readOnly"], true);
    // --node-name from the downward API.
    let env = c["env"].as_array().unwrap();
    let var = flags["node-name"].strip_prefix("$(").and_then(|v| v.strip_suffix(')')).expect("--node-name=$(VAR)");
    assert!(env.iter().any(|e| e["name"] == var && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"));
    // TMPDIR on an emptyDir (the image has no /tmp and a read-only root).
    let tmpdir = env.iter().find(|e| e["name"] == "TMPDIR").expect("TMPDIR")["value"].as_str().unwrap();
    let (mount, volume) = volume_at(c, pod, tmpdir);
    assert!(volume["emptyDir"].is_object());
    assert_ne!(mount["readOnly"], true);
    // --listen on the port named metrics.
    let port = flags["listen"].rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
    let ports = c["ports"].as_array().expect("ports");
    assert!(ports.iter().any(|p| p["name"] == "metrics" && p["containerPort"] == port), "{ports:?}");
    let annotations = &one(&objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string().as_str());
}

#[test]
fn the_probes_are_http_on_the_metrics_port() {
    let objects = rendered_objects();
    let (c, _) = agent(&objects);
    // Startup asks "alive", not "ready": an agent waiting for its first signature is
    // running and not ready for as long as the operator takes, and must not be restarted.
    for (probe, path) in [("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let p = &c[probe];
        assert!(p.get("exec").is_none(), "{probe}: no exec probes, the image has no shell");
        assert_eq!(p["httpGet"]["path"], path, "{probe}");
        assert_eq!(p["httpGet"]["port"], "metrics", "{probe} on the named port");
    }
    // A first scan of a node takes minutes: the startup probe waits at least ten.
    let startup = &c["startupProbe"];
    let patience = startup["periodSeconds"].as_u64().unwrap() * startup["failureThreshold"].as_u64().unwrap();
    assert!(patience >= 600, "the startup probe gives up after {patience} s");
}

/// The namespace whose pods may scrape the agent (deploy/networkpolicy.yaml).
const MONITORING_NAMESPACE: &str = "monitoring";

#[test]
fn only_the_monitoring_namespace_reaches_the_metrics_port() {
    let objects = rendered_objects();
    let policy = one(&objects, "NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], "kubefim", "{policy:#}");
    let spec = &policy["spec"];
    // It selects the agent's pods: its selector is a subset of the pod template's labels.
    let ds = one(&objects, "DaemonSet");
    let pod_labels = ds["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
    let selector = spec["podSelector"]["matchLabels"].as_object().expect("a podSelector with matchLabels");
    assert!(!selector.is_empty(), "an empty podSelector would select every pod of the namespace");
    for (k, v) in selector {
        assert_eq!(pod_labels.get(k), Some(v), "the policy selects {k}={v}, the agent's pods have {pod_labels:?}");
    }
    assert!(spec.get("matchExpressions").is_none() && spec["podSelector"].get("matchExpressions").is_none());
    assert_eq!(spec["policyTypes"], serde_json::json!(["Ingress"]), "{spec:#}");
    // One rule: from the monitoring namespace (any pod of it, no IP block), to the metrics port.
    let rules = spec["ingress"].as_array().expect("ingress rules");
    assert_eq!(rules.len(), 1, "{spec:#}");
    let want_from = serde_json::json!([
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}
    ]);
    assert_eq!(rules[0]["from"], want_from, "{spec:#}");
    let ports = rules[0]["ports"].as_array().expect("the rule names its ports");
    assert_eq!(ports.len(), 1, "{spec:#}");
    assert_eq!(ports[0]["protocol"], "TCP");
    // The port is the container's `metrics` port, by name, which --listen serves.
    let (c, _) = agent(&objects);
    assert_eq!(ports[0]["port"], "metrics", "{spec:#}");
    let named = c["ports"].as_array().unwrap().iter().find(|p| p["name"] == "metrics").expect("a metrics port");
    let listen = format!("--listen=0.0.0.0:{}", named["containerPort"]);
    assert!(AGENT_ARGS.contains(&listen.as_str()), "the metrics port is not the one the agent listens on");
}

#[test]
fn the_image_is_built_from_scratch_with_the_binary_and_its_libraries() {
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let lines: Vec<&str> = dockerfile.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
    let runtime =
        lines.iter().position(|l| l.starts_with("FROM scratch AS runtime")).expect("a runtime stage FROM scratch");
    assert!(!lines[runtime + 1..].iter().any(|l| l.starts_with("FROM ")), "the runtime stage is the last one");
    let stage = &lines[runtime..];
    assert!(stage.contains(&"COPY --from=rootfs /rootfs/ /"), "the runtime stage is the rootfs stage's tree");
    assert!(!stage.iter().any(|l| l.starts_with("RUN")), "nothing runs in a runtime stage without a shell");
    assert!(stage.contains(&r#"ENTRYPOINT ["/usr/local/bin/kubefim"]"#));
    for key in ["title", "description", "version", "revision", "licenses", "source"] {
        assert!(dockerfile.contains(&format!("org.opencontainers.image.{key}=")), "label {key}");
    }
    assert!(
        lines.iter().any(|l| l.starts_with("RUN sh deploy/image/rootfs.sh ")),
        "the rootfs stage runs the script build-local.sh runs"
    );
    let local = std::fs::read_to_string(repo().join("deploy/image/build-local.sh")).unwrap();
    assert!(
        local.contains("rootfs.sh") && local.contains("--target runtime") && local.contains("rootfs=$context/stage")
    );

    // The tree rootfs.sh assembles from this test's binary: the binary, the libraries ldd
    // lists, the loader; nothing else.
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    let out = Command::new("sh")
        .arg(repo().join("deploy/image/rootfs.sh"))
        .arg(env!("CARGO_BIN_EXE_kubefim"))
        .arg(&rootfs)
        .output()
        .unwrap();
    assert!(out.status.success(), "rootfs.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let ldd = Command::new("ldd").arg(env!("CARGO_BIN_EXE_kubefim")).output().expect("ldd");
    let mut want: BTreeSet<String> = String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words.as_slice() {
                [_, "=>", path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                [path, ..] if path.starts_with('/') => Some((*path).to_owned()),
                _ => None,
            }
        })
        .collect();
    want.insert("/usr/local/bin/kubefim".to_owned());
    let mut got = BTreeSet::new();
    let mut stack = vec![rootfs.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            assert!(!kind.is_symlink(), "{}: files are copied, not linked", entry.path().display());
            if kind.is_dir() {
                stack.push(entry.path());
            } else {
                got.insert(format!("/{}", entry.path().strip_prefix(&rootfs).unwrap().display()));
            }
        }
    }
    assert_eq!(got, want);
}
