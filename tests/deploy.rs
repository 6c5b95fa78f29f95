//! The Kubernetes manifests (deploy/): rendered with `kubectl kustomize`, validated strictly
//! against the OpenAPI schema of a current Kubernetes release (kubernetes-validate, which
//! scripts/setup.sh installs), and checked for the least-privilege properties the DaemonSet
//! promises: no privileged container, all capabilities dropped and only the listed ones
//! added, read-only root and host mounts, read-only RBAC, only the public key.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const KUBERNETES_VERSION: &str = "1.32.0";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize deploy/`, as YAML text.
fn rendered() -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy"))
        .output()
        .expect("kubectl (with kustomize) must be installed: it is on these machines");
    assert!(out.status.success(), "kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

fn objects() -> Vec<Value> {
    let text = rendered();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "want exactly one {kind}, got {}", found.len());
    found[0]
}

#[test]
fn rendered_manifests_validate_strictly_against_the_kubernetes_schema() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, rendered()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("python3 with kubernetes-validate (scripts/setup.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "strict validation failed:\n{text}");
    let kinds: BTreeSet<&str> =
        ["namespace", "serviceaccount", "clusterrole", "clusterrolebinding", "configmap", "daemonset"]
            .into_iter()
            .collect();
    for kind in kinds {
        assert!(text.contains(&format!("passed for resource {kind}/")), "{kind} not validated:\n{text}");
    }
}

#[test]
fn the_policy_config_map_is_the_shipped_node_policy() {
    let objects = objects();
    let cm = one(&objects, "ConfigMap");
    let shipped = std::fs::read_to_string(repo().join("policies/node.yaml")).unwrap();
    assert_eq!(cm["data"]["node.yaml"].as_str(), Some(shipped.as_str()), "deploy/policy-node.yaml is stale");
}

#[test]
fn the_daemonset_is_least_privileged() {
    let objects = objects();
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
    let objects = objects();
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
