//! The Kubernetes manifests (deploy/): the base (`kubectl apply -k deploy/`) and every
//! overlay rendered with `kubectl kustomize`, validated strictly against the OpenAPI schema
//! of a current Kubernetes release (kubernetes-validate, which scripts/setup.sh installs),
//! and checked for the least-privilege properties the DaemonSet promises: no privileged
//! container, all capabilities dropped and only the listed ones added, read-only root and
//! host mounts, RBAC that writes only Events and FimNodeStatus, ValidatingAdmissionPolicies
//! that hold each agent to its own node, only the public key. Also: the agent's command
//! line (per overlay) agrees with the volumes and ports it names, the probes are HTTP probes
//! (the image has no shell), and the image is the binary, its libraries and nothing else.
//! tests/deploy_pod.rs runs the pod template for real; tests/crds.rs checks the CRDs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use common::deploy::{KUSTOMIZATIONS, rendered_objects, rendered_objects_of, rendered_text_of, repo};
use serde_json::{Value, json};

const KUBERNETES_VERSION: &str = "1.32.0";

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "want exactly one {kind}, got {}", found.len());
    found[0]
}

/// The API groups whose kinds are custom resources (their CRDs are not Kubernetes'), which
/// kubernetes-validate has no schema for: kubefim's (tests/crds.rs validates them against
/// deploy/crds) and the Prometheus Operator's (the monitoring pack's tests check those).
const CUSTOM_GROUPS: [&str; 2] = ["kubefim.io", "monitoring.coreos.com"];

/// `kubernetes_validate --strict` on a YAML file: exit status, and its output.
fn kubernetes_validate(file: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .expect("python3 with kubernetes-validate (scripts/setup.sh installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The API group of an object's apiVersion ("" for the core group).
fn group(object: &Value) -> &str {
    object["apiVersion"].as_str().unwrap().rsplit_once('/').map_or("", |(g, _)| g)
}

#[test]
fn every_kustomization_renders_and_validates_strictly_against_the_kubernetes_schema() {
    let dir = tempfile::tempdir().unwrap();
    for kustomization in KUSTOMIZATIONS {
        let file = dir.path().join("rendered.yaml");
        std::fs::write(&file, rendered_text_of(kustomization)).unwrap();
        let (ok, text) = kubernetes_validate(&file);
        assert!(ok, "{kustomization}: strict validation failed:\n{text}");
        assert!(!text.contains("ERROR"), "{kustomization}:\n{text}");
        // kubernetes-validate warns, and passes, where it has no schema: allowed only for
        // custom resources. Every built-in object passed.
        for line in text.lines().filter(|l| l.starts_with("WARN")) {
            let custom = CUSTOM_GROUPS.iter().any(|g| line.contains(&format!("with api version {g}/")));
            assert!(custom, "{kustomization}: no schema for a kind that is not a custom resource:\n{line}");
        }
        for object in rendered_objects_of(kustomization) {
            let name = format!(
                "{}/{}",
                object["kind"].as_str().unwrap().to_lowercase(),
                object["metadata"]["name"].as_str().unwrap()
            );
            if CUSTOM_GROUPS.contains(&group(&object)) {
                continue;
            }
            assert!(
                text.contains(&format!("passed for resource {name} ")),
                "{kustomization}: {name} not validated:\n{text}"
            );
        }
    }
    // The base holds what the README's table lists.
    let kinds: BTreeSet<String> = rendered_objects().iter().map(|o| o["kind"].as_str().unwrap().to_owned()).collect();
    let want: BTreeSet<String> = [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "DaemonSet",
        "NetworkPolicy",
    ]
    .map(String::from)
    .into();
    assert_eq!(kinds, want);
}

/// Kinds without a namespace.
const CLUSTER_SCOPED: [&str; 6] = [
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
];

#[test]
fn cluster_scoped_objects_have_no_namespace_and_the_others_are_in_kubefim() {
    for kustomization in KUSTOMIZATIONS {
        for object in rendered_objects_of(kustomization) {
            let kind = object["kind"].as_str().unwrap();
            let namespace = &object["metadata"]["namespace"];
            if CLUSTER_SCOPED.contains(&kind) {
                assert!(namespace.is_null(), "{kustomization}: the cluster-scoped {kind} has namespace {namespace}");
            } else if !CUSTOM_GROUPS.contains(&group(&object)) {
                assert_eq!(namespace, "kubefim", "{kustomization}: {kind} {}", object["metadata"]["name"]);
            }
        }
    }
}

#[test]
fn the_overlays_build_on_the_base() {
    let base = rendered_objects();
    let key = |o: &Value| format!("{}/{}", o["kind"].as_str().unwrap(), o["metadata"]["name"].as_str().unwrap());
    // workloads: the base, with the agent's command line extended and nothing else changed.
    let workloads = rendered_objects_of("deploy/overlays/workloads");
    assert_eq!(workloads.len(), base.len());
    for (b, w) in base.iter().zip(&workloads) {
        assert_eq!(key(b), key(w));
        if b["kind"] == "DaemonSet" {
            let mut w = w.clone();
            w["spec"]["template"]["spec"]["containers"][0]["args"] =
                b["spec"]["template"]["spec"]["containers"][0]["args"].clone();
            assert_eq!(&w, b, "the workloads overlay changes the DaemonSet beyond its args");
        } else {
            assert_eq!(w, b, "the workloads overlay changes {}", key(b));
        }
    }
    // monitoring: every object of the base, and the pack's objects.
    let monitoring = rendered_objects_of("deploy/overlays/monitoring");
    let keys: BTreeSet<String> = monitoring.iter().map(key).collect();
    for b in &base {
        assert!(keys.contains(&key(b)), "the monitoring overlay lacks {}", key(b));
    }
    assert!(monitoring.len() > base.len(), "the monitoring overlay adds nothing to the base");
    // deploy/ is the base, and only the base.
    let root = std::fs::read_to_string(repo().join("deploy/kustomization.yaml")).unwrap();
    let root: Value = serde_norway::from_str(&root).unwrap();
    assert_eq!(root["resources"], json!(["base"]));
}

/// The generated ConfigMap that holds the node policy (kubefim-policy-<hash>).
fn policy_config_map(objects: &[Value]) -> &Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            o["kind"] == "ConfigMap" && o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("kubefim-policy-"))
        })
        .collect();
    assert_eq!(found.len(), 1, "one kubefim-policy ConfigMap");
    found[0]
}

#[test]
fn the_policy_config_map_is_the_shipped_node_policy() {
    let objects = rendered_objects();
    let cm = policy_config_map(&objects);
    let shipped = std::fs::read_to_string(repo().join("policies/node.yaml")).unwrap();
    assert_eq!(cm["data"]["node.yaml"].as_str(), Some(shipped.as_str()), "deploy/base/policy-node.yaml is stale");
}

#[test]
fn the_daemonset_is_least_privileged_in_every_overlay() {
    for kustomization in ["deploy", "deploy/overlays/monitoring", "deploy/overlays/workloads"] {
        daemonset_is_least_privileged(&rendered_objects_of(kustomization));
    }
}

fn daemonset_is_least_privileged(objects: &[Value]) {
    let ds = one(objects, "DaemonSet");
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
fn rbac_reads_what_the_agent_needs_and_writes_only_events_and_its_node_status() {
    let objects = rendered_objects();
    let role = one(&objects, "ClusterRole");
    // (group, resource) -> verbs, as granted.
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().unwrap() {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .unwrap_or_else(|| panic!("a rule without {key}: {rule}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(), "{rule}");
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                for verb in strings("verbs") {
                    assert!(![&group, &resource, &verb].iter().any(|s| s.contains('*')), "a wildcard in {rule}");
                    granted.entry((group.clone(), resource.clone())).or_default().insert(verb);
                }
            }
        }
    }
    let reads = ["get", "list", "watch"];
    let want: BTreeMap<(String, String), BTreeSet<String>> = [
        ("", "pods", &reads[..]),
        ("", "nodes", &["get"][..]),
        ("", "namespaces", &reads[..]),
        ("kubefim.io", "workloadfimpolicies", &reads[..]),
        ("kubefim.io", "clusterworkloadfimpolicies", &reads[..]),
        ("", "events", &["create", "patch"][..]),
        ("kubefim.io", "fimnodestatuses", &["get", "create", "update", "patch"][..]),
        ("kubefim.io", "fimnodestatuses/status", &["get", "update", "patch"][..]),
    ]
    .into_iter()
    .map(|(g, r, verbs)| ((g.to_owned(), r.to_owned()), verbs.iter().map(|v| (*v).to_owned()).collect()))
    .collect();
    assert_eq!(granted, want, "the agent's ClusterRole");
    // Said once more as the properties that matter, so that a change to `want` is read twice.
    for ((group, resource), verbs) in &granted {
        assert!(!resource.contains("secrets") && !resource.starts_with("pods/"), "{group}/{resource}");
        assert!(!verbs.contains("delete") && !verbs.contains("deletecollection") && !verbs.contains("escalate"));
        let writes = verbs.iter().any(|v| ["create", "update", "patch"].contains(&v.as_str()));
        assert!(
            !writes || ["events", "fimnodestatuses", "fimnodestatuses/status"].contains(&resource.as_str()),
            "{resource}: {verbs:?}"
        );
    }
    let binding = one(&objects, "ClusterRoleBinding");
    assert_eq!(
        binding["roleRef"],
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubefim"})
    );
    assert_eq!(binding["subjects"], json!([{"kind": "ServiceAccount", "name": "kubefim", "namespace": "kubefim"}]));
    // No other role, no other binding.
    for kind in ["Role", "RoleBinding"] {
        assert!(objects.iter().all(|o| o["kind"] != kind), "a {kind}");
    }
}

/// The agent's identity as the API server sees it: the DaemonSet's ServiceAccount.
const AGENT_USER: &str = "system:serviceaccount:kubefim:kubefim";

/// The node claim of a pod-bound ServiceAccount token.
const NODE_CLAIM: &str = "authentication.kubernetes.io/node-name";

/// The admission policy of `name` and its binding, with the policy's validations (their
/// expressions, whitespace collapsed) after the first, which is always "no node claim, no
/// write".
fn admission_policy<'a>(objects: &'a [Value], name: &str) -> (&'a Value, Vec<String>) {
    let policy = objects
        .iter()
        .find(|o| o["kind"] == "ValidatingAdmissionPolicy" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no ValidatingAdmissionPolicy {name}"));
    assert_eq!(policy["apiVersion"], "admissionregistration.k8s.io/v1");
    let spec = &policy["spec"];
    assert_eq!(spec["failurePolicy"], "Fail", "{name}");
    assert!(spec.get("paramKind").is_none(), "{name}: no parameters");
    // Bound, denying, narrowing nothing.
    let bindings: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "ValidatingAdmissionPolicyBinding" && o["spec"]["policyName"] == name)
        .collect();
    assert_eq!(bindings.len(), 1, "{name}: one binding");
    assert_eq!(bindings[0]["spec"]["validationActions"], json!(["Deny"]), "{name}");
    assert!(bindings[0]["spec"].get("matchResources").is_none(), "{name}: the binding narrows nothing");
    // Only the agent's requests, by its ServiceAccount (the ClusterRoleBinding's subject).
    let conditions = spec["matchConditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "{name}");
    assert_eq!(conditions[0]["expression"], format!("request.userInfo.username == '{AGENT_USER}'"), "{name}");
    // The node is the token's claim, '' without one (extra itself may be absent).
    let variables = spec["variables"].as_array().unwrap();
    assert_eq!(variables.len(), 1, "{name}");
    assert_eq!(variables[0]["name"], "node");
    let node = variables[0]["expression"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(node.starts_with("has(request.userInfo.extra) &&"), "{name}: {node}");
    assert!(node.contains(&format!("'{NODE_CLAIM}' in request.userInfo.extra")), "{name}: {node}");
    assert!(node.contains(&format!("? request.userInfo.extra['{NODE_CLAIM}'][0] : ''")), "{name}: {node}");
    let mut validations: Vec<String> = spec["validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            assert_eq!(v["reason"], "Forbidden", "{v}");
            assert!(v["message"].is_string() || v["messageExpression"].is_string(), "{v}");
            v["expression"].as_str().unwrap().split_whitespace().collect::<Vec<_>>().join(" ")
        })
        .collect();
    assert_eq!(validations.remove(0), "variables.node != ''", "{name}: deny without a node claim first");
    (policy, validations)
}

/// The resources a policy matches (`group:resource`), and that only creates and updates (a
/// patch is an update at admission) are matched.
fn matched_resources(policy: &Value) -> BTreeSet<String> {
    let mut matched = BTreeSet::new();
    for rule in policy["spec"]["matchConstraints"]["resourceRules"].as_array().unwrap() {
        assert_eq!(rule["operations"], json!(["CREATE", "UPDATE"]), "{rule}");
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                matched.insert(format!("{}:{}", g.as_str().unwrap(), r.as_str().unwrap()));
            }
        }
    }
    matched
}

#[test]
fn the_admission_policies_hold_each_agent_to_its_own_node() {
    // No API server here to run their CEL: their structure, and what each expression reads.
    let objects = rendered_objects();
    let subject = &one(&objects, "ClusterRoleBinding")["subjects"][0];
    assert_eq!(
        AGENT_USER,
        format!(
            "system:serviceaccount:{}:{}",
            subject["namespace"].as_str().unwrap(),
            subject["name"].as_str().unwrap()
        )
    );
    let policies: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "ValidatingAdmissionPolicy").collect();
    assert_eq!(policies.len(), 2);

    // FimNodeStatus: only the one named after the token's node.
    let (status, validations) = admission_policy(&objects, "kubefim-agent-node-status");
    let want: BTreeSet<String> =
        ["kubefim.io:fimnodestatuses", "kubefim.io:fimnodestatuses/status"].map(String::from).into();
    assert_eq!(matched_resources(status), want);
    assert_eq!(validations, ["object.metadata.name == variables.node"]);

    // Events: reported by the token's node, as the agent, about a Pod (in its namespace) or
    // that Node (in default).
    let (events, validations) = admission_policy(&objects, "kubefim-agent-node-events");
    assert_eq!(matched_resources(events), BTreeSet::from([":events".to_owned()]));
    assert_eq!(validations.len(), 3, "{validations:#?}");
    for field in ["object.source.host == variables.node", "object.reportingInstance == variables.node"] {
        assert!(validations[0].contains(field), "{field}");
    }
    assert!(validations[1].contains("object.reportingComponent == 'kubefim.io/agent'"));
    for part in [
        "object.involvedObject.kind == 'Pod'",
        "object.involvedObject.namespace == request.namespace",
        "object.involvedObject.kind == 'Node'",
        "object.involvedObject.name == variables.node",
        "request.namespace == 'default'",
    ] {
        assert!(validations[2].contains(part), "{part} in {}", validations[2]);
    }

    // Everything RBAC lets the agent write, a policy admits.
    let admitted: BTreeSet<String> = matched_resources(status).union(&matched_resources(events)).cloned().collect();
    let role = one(&objects, "ClusterRole");
    for rule in role["rules"].as_array().unwrap() {
        let writes = rule["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| ["create", "update", "patch"].contains(&v.as_str().unwrap()));
        for r in rule["resources"].as_array().unwrap().iter().filter(|_| writes) {
            let g = rule["apiGroups"][0].as_str().unwrap();
            assert!(
                admitted.contains(&format!("{g}:{}", r.as_str().unwrap())),
                "{r} is written and no policy admits it"
            );
        }
    }
    // The comment says what CEL cannot check.
    let text = std::fs::read_to_string(repo().join("deploy/base/admission.yaml")).unwrap();
    assert!(text.contains("What it cannot check") && text.contains("lookup of the Pod"), "the limit is stated");
}

#[test]
fn the_event_the_agent_writes_is_a_valid_event_and_the_fields_the_policy_reads() {
    // The Event of a drifted pod, with exactly the fields the agent writes: valid for the
    // API (strict), and it has every field the admission policy reads.
    let event = json!({
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "web-7c9f.18c1a2b3c4d5e6f7", "namespace": "shop"},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": "web-7c9f", "namespace": "shop",
                           "uid": "0e6c5a1e-0000-4000-8000-000000000001"},
        "reason": "FileDrift",
        "message": "/etc/nginx/nginx.conf modified (content) by sh (pid 4242) in container nginx",
        "type": "Warning",
        "source": {"component": "kubefim", "host": "worker-1"},
        "reportingComponent": "kubefim.io/agent",
        "reportingInstance": "worker-1",
        "firstTimestamp": "2026-12-07T12:00:00Z",
        "lastTimestamp": "2026-12-07T12:00:05Z",
        "count": 3
    });
    let dir = tempfile::tempdir().unwrap();
    // As JSON (which is YAML): PyYAML reads an unquoted time as a datetime, not a string.
    let file = dir.path().join("event.yaml");
    std::fs::write(&file, event.to_string()).unwrap();
    let (ok, text) = kubernetes_validate(&file);
    assert!(ok && text.contains("passed for resource event/"), "{text}");
    let objects = rendered_objects();
    let policy = objects.iter().find(|o| o["metadata"]["name"] == "kubefim-agent-node-events").unwrap();
    let expressions = policy["spec"]["validations"].to_string();
    for path in [
        "source.host",
        "reportingInstance",
        "reportingComponent",
        "involvedObject.kind",
        "involvedObject.name",
        "involvedObject.namespace",
    ] {
        let mut v = &event;
        for part in path.split('.') {
            v = &v[part];
        }
        assert!(!v.is_null(), "the agent's Event has no {path}");
        assert!(expressions.contains(&format!("object.{path}")), "the policy does not read {path}");
    }
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

/// What the workloads overlay adds to the agent's command line.
const WORKLOADS_ARGS: &[&str] = &["--containers", "--layer-cache=/var/lib/kubefim/layer-cache"];

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
    let workloads = [AGENT_ARGS, WORKLOADS_ARGS].concat();
    for (kustomization, want) in [
        ("deploy", AGENT_ARGS),
        ("deploy/overlays/monitoring", AGENT_ARGS),
        ("deploy/overlays/workloads", &workloads[..]),
    ] {
        let objects = rendered_objects_of(kustomization);
        let (c, _) = agent(&objects);
        let args: Vec<&str> = c["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
        assert_eq!(args, want, "{kustomization}: the agent's command line");
        command_line_matches_the_volumes(&objects);
    }
}

/// Each path and port the agent's flags name is the volume or port the pod has for it.
fn command_line_matches_the_volumes(objects: &[Value]) {
    let (c, pod) = agent(objects);
    let args: Vec<&str> = c["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert!(c.get("command").is_none(), "the image's entry point is the binary");
    let flags: BTreeMap<&str, &str> =
        args.iter().filter_map(|a| a.strip_prefix("--")).map(|a| a.split_once('=').unwrap_or((a, ""))).collect();
    assert!(!flags.contains_key("ready-file"), "readiness is /readyz now");

    // --host-root: the host's / read-only, following mounts made after the pod started.
    let (mount, volume) = volume_at(c, pod, flags["host-root"]);
    assert_eq!(volume["hostPath"]["path"], "/");
    assert_eq!(mount["readOnly"], true);
    assert_eq!(mount["mountPropagation"], "HostToContainer");
    // --db, --journal and --layer-cache (workloads) on the node's state hostPath, writable.
    for flag in ["db", "journal", "layer-cache"].into_iter().filter(|f| flags.contains_key(f)) {
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
    let cm = policy_config_map(objects);
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
    let annotations = &one(objects, "DaemonSet")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], port.to_string().as_str());
}

#[test]
fn the_binary_takes_every_overlays_command_line() {
    // The flags are the binary's: each overlay's command line parses (clap refuses an unknown
    // flag or a missing companion with its usage). Run as nobody, with a host root that does
    // not exist, so that the agent stops at its first check and loads nothing.
    for kustomization in ["deploy", "deploy/overlays/workloads"] {
        let objects = rendered_objects_of(kustomization);
        let (c, _) = agent(&objects);
        let args: Vec<String> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_str().unwrap().replace("$(NODE_NAME)", "worker-1");
                if a.starts_with("--host-root=") {
                    "--host-root=/nonexistent/kubefim-deploy-test".to_owned()
                } else {
                    a
                }
            })
            .collect();
        let run = common::kubefim_as_nobody(&args);
        assert!(
            !run.stderr.contains("Usage:"),
            "{kustomization}: the binary refuses its command line:\n{}",
            run.dump()
        );
        assert!(run.stderr.contains("/nonexistent/kubefim-deploy-test"), "{kustomization}: {}", run.dump());
        assert_ne!(run.code(), 0, "{kustomization}");
    }
    // And the check would see a flag the binary does not know.
    let run = common::kubefim_as_nobody(["watch", "--db=/x", "--pubkey=/y", "--no-such-flag"]);
    assert!(run.stderr.contains("Usage:"), "{}", run.dump());
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

/// The namespace whose pods may scrape the agent (deploy/base/networkpolicy.yaml).
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
