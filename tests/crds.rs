//! kubefim's CustomResourceDefinitions (deploy/crds): each is structural, as the API server
//! requires (every node typed, nothing it refuses), serves and stores v1alpha1, and its
//! printer columns read fields its schema has. The example policies (deploy/examples)
//! validate against their CRD and are read alike by the agent's own parser of workload
//! policies; bad objects (a relative path, an unknown field, an unknown operator...) are
//! refused by both. A FimNodeStatus in the shape the agent writes validates.
//!
//! No API server runs here: the schema is checked as a JSON Schema (tests/common/deploy.rs
//! says how it follows the API server), and the CEL rules through their Rust twins.

mod common;

use std::collections::BTreeSet;

use common::deploy::{API_VERSION, crd, crd_openapi_schema, crds, parse_yaml_stream, repo, validate_against_crd};
use kubefim_baseline::workload::WorkloadPolicies;
use serde_json::{Value, json};

/// The kinds, their plural, short name and scope.
const KINDS: [(&str, &str, &str, &str); 3] = [
    ("WorkloadFimPolicy", "workloadfimpolicies", "wfp", "Namespaced"),
    ("ClusterWorkloadFimPolicy", "clusterworkloadfimpolicies", "cwfp", "Cluster"),
    ("FimNodeStatus", "fimnodestatuses", "fns", "Cluster"),
];

#[test]
fn each_crd_names_its_kind_and_serves_and_stores_v1alpha1() {
    let all = crds();
    assert_eq!(all.len(), KINDS.len(), "deploy/crds holds {} CRDs", all.len());
    for (kind, plural, short, scope) in KINDS {
        let crd = crd(kind);
        let spec = &crd["spec"];
        assert_eq!(crd["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(crd["metadata"]["name"], format!("{plural}.kubefim.io"), "{kind}");
        assert_eq!(spec["group"], "kubefim.io");
        assert_eq!(spec["scope"], scope, "{kind}");
        assert_eq!(spec["names"]["plural"], plural);
        assert_eq!(spec["names"]["singular"], kind.to_lowercase());
        assert_eq!(spec["names"]["listKind"], format!("{kind}List"));
        assert_eq!(spec["names"]["shortNames"], json!([short]));
        let versions = spec["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 1, "{kind}");
        let v = &versions[0];
        assert_eq!(format!("{}/{}", spec["group"].as_str().unwrap(), v["name"].as_str().unwrap()), API_VERSION);
        assert_eq!((v["served"].as_bool(), v["storage"].as_bool()), (Some(true), Some(true)), "{kind}");
        assert!(v.get("deprecated").is_none());
        // Only FimNodeStatus has a status, written through its subresource; the policies
        // have a spec and no status (each node's results go to its FimNodeStatus).
        let properties = v["schema"]["openAPIV3Schema"]["properties"].as_object().unwrap();
        if kind == "FimNodeStatus" {
            assert_eq!(v["subresources"], json!({"status": {}}));
            assert!(properties.contains_key("status") && !properties.contains_key("spec"));
        } else {
            assert!(v.get("subresources").is_none(), "{kind}: no status, no subresource");
            assert!(properties.contains_key("spec") && !properties.contains_key("status"));
            assert_eq!(v["schema"]["openAPIV3Schema"]["required"], json!(["spec"]), "{kind}");
        }
    }
}

/// The keys the API server accepts in a CRD's schema (JSONSchemaProps, less what structural
/// schemas forbid: $ref, definitions, patternProperties, dependencies, additionalItems,
/// uniqueItems...).
const SCHEMA_KEYS: [&str; 27] = [
    "type",
    "format",
    "title",
    "description",
    "default",
    "maximum",
    "exclusiveMaximum",
    "minimum",
    "exclusiveMinimum",
    "maxLength",
    "minLength",
    "pattern",
    "maxItems",
    "minItems",
    "multipleOf",
    "enum",
    "maxProperties",
    "minProperties",
    "required",
    "items",
    "allOf",
    "oneOf",
    "anyOf",
    "not",
    "properties",
    "additionalProperties",
    "nullable",
];

/// Why `schema` (at `at`) is not structural, per "Specifying a structural schema" of the
/// Kubernetes CRD documentation; `in_junctor` inside allOf/anyOf/oneOf/not.
fn structural_violations(schema: &Value, at: &str, in_junctor: bool, out: &mut Vec<String>) {
    let node = schema.as_object().unwrap_or_else(|| panic!("{at}: a schema is an object"));
    for key in node.keys() {
        let known = SCHEMA_KEYS.contains(&key.as_str())
            || [
                "x-kubernetes-validations",
                "x-kubernetes-list-type",
                "x-kubernetes-list-map-keys",
                "x-kubernetes-map-type",
                "x-kubernetes-preserve-unknown-fields",
                "x-kubernetes-int-or-string",
                "x-kubernetes-embedded-resource",
            ]
            .contains(&key.as_str());
        if !known {
            out.push(format!("{at}: `{key}` is not allowed in a CRD schema"));
        }
    }
    let preserve = node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let int_or_string = node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    if in_junctor {
        for key in ["type", "description", "default", "additionalProperties", "nullable"] {
            if node.contains_key(key) {
                out.push(format!("{at}: `{key}` inside allOf/anyOf/oneOf/not"));
            }
        }
    } else {
        match node.get("type").and_then(Value::as_str) {
            Some("object" | "array" | "string" | "integer" | "number" | "boolean") => {}
            Some(other) => out.push(format!("{at}: type {other:?}")),
            None if preserve || int_or_string => {}
            None => out.push(format!("{at}: no type")),
        }
    }
    if node.contains_key("properties") && node.contains_key("additionalProperties") {
        out.push(format!("{at}: properties and additionalProperties together"));
    }
    if node.get("items").is_some_and(|items| !items.is_object()) {
        out.push(format!("{at}: items must be one schema"));
    }
    if node.get("type") == Some(&json!("array")) && !node.contains_key("items") {
        out.push(format!("{at}: an array without items"));
    }
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        let ty = node["type"].as_str().unwrap_or("");
        for v in values {
            let fits = match ty {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !fits {
                out.push(format!("{at}: enum value {v} is not a {ty}"));
            }
        }
    }
    // A list map: its keys are required scalar fields of its items.
    if node.get("x-kubernetes-list-type") == Some(&json!("map")) {
        let keys = node["x-kubernetes-list-map-keys"].as_array().cloned().unwrap_or_default();
        if keys.is_empty() {
            out.push(format!("{at}: a list map names its keys"));
        }
        let items = &node["items"];
        for key in keys {
            let key = key.as_str().unwrap();
            let required = items["required"].as_array().is_some_and(|r| r.iter().any(|k| k == key));
            let scalar = matches!(items["properties"][key]["type"].as_str(), Some("string" | "integer" | "boolean"));
            if !required || !scalar {
                out.push(format!("{at}: list map key {key} must be a required scalar of the items"));
            }
        }
    }
    if let Some(list) = node.get("x-kubernetes-list-type").and_then(Value::as_str)
        && (!["atomic", "set", "map"].contains(&list) || node["type"] != "array")
    {
        out.push(format!("{at}: x-kubernetes-list-type {list} on a non-array or unknown"));
    }
    // Every field of a junctor's schemas is also specified outside it.
    for junctor in ["allOf", "anyOf", "oneOf"] {
        for (i, sub) in node.get(junctor).and_then(Value::as_array).into_iter().flatten().enumerate() {
            for field in sub["properties"].as_object().into_iter().flatten().map(|(k, _)| k) {
                if node["properties"].get(field).is_none() {
                    out.push(format!("{at}/{junctor}/{i}: field {field} is not specified outside the junctor"));
                }
            }
            structural_violations(sub, &format!("{at}/{junctor}/{i}"), true, out);
        }
    }
    if let Some(sub) = node.get("not") {
        structural_violations(sub, &format!("{at}/not"), true, out);
    }
    for (name, sub) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
        structural_violations(sub, &format!("{at}/{name}"), in_junctor, out);
    }
    if let Some(sub) = node.get("items").filter(|i| i.is_object()) {
        structural_violations(sub, &format!("{at}/items"), in_junctor, out);
    }
    if let Some(sub) = node.get("additionalProperties").filter(|a| a.is_object()) {
        structural_violations(sub, &format!("{at}/additionalProperties"), in_junctor, out);
    }
}

#[test]
fn every_schema_is_structural() {
    for (kind, ..) in KINDS {
        let schema = crd_openapi_schema(kind);
        let mut violations = Vec::new();
        structural_violations(&schema, "", false, &mut violations);
        assert_eq!(schema["type"], "object", "{kind}: the root is an object");
        // metadata: the API server allows restrictions on name and generateName only; ours
        // has none.
        assert_eq!(schema["properties"]["metadata"], json!({"type": "object"}), "{kind}");
        assert_eq!(schema["properties"]["apiVersion"], json!({"type": "string"}), "{kind}");
        assert_eq!(schema["properties"]["kind"], json!({"type": "string"}), "{kind}");
        assert!(violations.is_empty(), "{kind} is not structural:\n{}", violations.join("\n"));
    }
    // The checker finds what it looks for.
    let mut found = Vec::new();
    let bad = json!({"type": "object", "properties": {"a": {"description": "untyped"}},
                     "additionalProperties": {"type": "string"},
                     "anyOf": [{"properties": {"b": {"type": "string"}}}]});
    structural_violations(&bad, "", false, &mut found);
    assert_eq!(found.len(), 4, "{found:#?}");
}

#[test]
fn the_cluster_policy_spec_is_the_namespaced_one_with_a_namespace_selector() {
    /// The schema without descriptions (the two describe their selectors in their own words).
    fn bare(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                m.iter().filter(|(k, _)| *k != "description").map(|(k, v)| (k.clone(), bare(v))).collect()
            }
            Value::Array(a) => a.iter().map(bare).collect(),
            other => other.clone(),
        }
    }
    let namespaced = bare(&crd_openapi_schema("WorkloadFimPolicy")["properties"]["spec"]);
    let mut cluster = bare(&crd_openapi_schema("ClusterWorkloadFimPolicy")["properties"]["spec"]);
    let namespace_selector =
        cluster["properties"].as_object_mut().unwrap().remove("namespaceSelector").expect("namespaceSelector");
    assert_eq!(cluster, namespaced, "the specs differ beyond namespaceSelector");
    // A LabelSelector, like the pod selector; optional (absent: every namespace).
    assert_eq!(namespace_selector, namespaced["properties"]["selector"]);
    assert_eq!(namespaced["required"], json!(["selector"]));
}

/// The schema node a printer column's JSONPath names, or why it names none. Understands
/// what the columns use: `.a.b`, `.a[*].b` and `.a[?(@.field=="x")].b`.
fn resolve<'a>(schema: &'a Value, path: &str) -> Result<&'a Value, String> {
    let mut node = schema;
    let mut rest = path.strip_prefix('.').ok_or("a JSONPath starts with `.`")?;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (name, after) = rest.split_at(end);
        node = node["properties"].get(name).ok_or_else(|| format!("no field {name}"))?;
        rest = after;
        while let Some(inner) = rest.strip_prefix('[') {
            let close = inner.find(']').ok_or("an unclosed [")?;
            let selector = &inner[..close];
            node = node.get("items").ok_or_else(|| format!("{name} is not a list"))?;
            if let Some(filter) = selector.strip_prefix("?(@.") {
                let field = &filter[..filter.find(['=', '!', ')']).ok_or("a filter without a test")?];
                node["properties"].get(field).ok_or_else(|| format!("the filter's field {field} is not a field"))?;
            } else if selector != "*" {
                return Err(format!("unexpected [{selector}]"));
            }
            rest = &inner[close + 1..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Ok(node)
}

#[test]
fn printer_columns_read_fields_the_schema_has() {
    for (kind, ..) in KINDS {
        let crd = crd(kind);
        let version = &crd["spec"]["versions"][0];
        let schema = &version["schema"]["openAPIV3Schema"];
        let columns = version["additionalPrinterColumns"].as_array().expect("printer columns");
        let mut names = BTreeSet::new();
        for c in columns {
            let (name, path, ty) =
                (c["name"].as_str().unwrap(), c["jsonPath"].as_str().unwrap(), c["type"].as_str().unwrap());
            assert!(names.insert(name), "{kind}: column {name} twice");
            if path == ".metadata.creationTimestamp" {
                assert_eq!((name, ty), ("Age", "date"), "{kind}");
                continue;
            }
            let node = resolve(schema, path).unwrap_or_else(|e| panic!("{kind} column {name}: {path}: {e}"));
            // The column's type is the field's: a boolean for a boolean, a date for a
            // date-time; a string column may show anything (lists and maps as JSON).
            let fits = match ty {
                "boolean" => node["type"] == "boolean",
                "integer" => node["type"] == "integer",
                "date" => node["format"] == "date-time",
                "string" => true,
                other => panic!("{kind} column {name}: type {other}"),
            };
            assert!(fits, "{kind} column {name} ({ty}) reads {path}, which is {node}");
        }
        assert_eq!(columns.last().unwrap()["name"], "Age", "{kind}: Age last, as kubectl does");
    }
    // The names a user looks for.
    let status = crd("FimNodeStatus");
    let columns: Vec<&str> = status["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in ["Ready", "Trusted", "Verify", "Verified"] {
        assert!(columns.contains(&want), "FimNodeStatus columns {columns:?} lack {want}");
    }
    let ready = &status["spec"]["versions"][0]["additionalPrinterColumns"][0];
    assert_eq!(ready["jsonPath"], r#".status.conditions[?(@.type=="Ready")].status"#);
    assert!(resolve(&crd_openapi_schema("WorkloadFimPolicy"), ".spec.nothing").is_err());
}

/// The examples: (file name, its objects).
fn examples() -> Vec<(String, Vec<Value>)> {
    let dir = repo().join("deploy/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
        .map(|f| {
            let text = std::fs::read_to_string(&f).unwrap();
            (f.file_name().unwrap().to_string_lossy().into_owned(), parse_yaml_stream(&text))
        })
        .collect()
}

/// `object` (a WorkloadFimPolicy or ClusterWorkloadFimPolicy) through the agent's parser of
/// workload policies, the one that reads both files and objects.
fn agent_parses(object: &Value) -> Result<(), String> {
    let yaml = serde_norway::to_string(object).unwrap();
    WorkloadPolicies::from_yaml(&yaml, "example").map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn every_example_validates_against_its_crd_and_is_read_by_the_agent() {
    let examples = examples();
    let mut kinds = BTreeSet::new();
    for (file, objects) in &examples {
        assert!(!objects.is_empty(), "{file} holds no object");
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_else(|| panic!("{file}: an object without kind"));
            kinds.insert(kind.to_owned());
            if let Err(e) = validate_against_crd(kind, object) {
                panic!("{file}: {kind} {} does not validate:\n{e}", object["metadata"]["name"]);
            }
            agent_parses(object).unwrap_or_else(|e| panic!("{file}: the agent's parser refuses it: {e}"));
            // Namespaced examples name no namespace: `kubectl apply -n NS -f` puts them in
            // the user's.
            assert!(object["metadata"].get("namespace").is_none(), "{file}: leave the namespace to -n");
            let spec = &object["spec"];
            assert_eq!(spec["drift"]["exec"], true, "{file}: drift.exec on");
            assert!(spec["rules"].as_array().is_some_and(|r| !r.is_empty()), "{file}: rules");
        }
    }
    let want: BTreeSet<String> = ["WorkloadFimPolicy", "ClusterWorkloadFimPolicy"].map(String::from).into();
    assert_eq!(kinds, want);
    let names: Vec<&str> = examples.iter().map(|(f, _)| f.as_str()).collect();
    for want in ["nginx.yaml", "jvm-service.yaml", "python-app.yaml", "cluster-os-files.yaml"] {
        assert!(names.contains(&want), "deploy/examples lacks {want}: {names:?}");
    }
    // The cluster example opts namespaces in by label and protects the account files.
    let (_, cluster) = examples.iter().find(|(f, _)| f == "cluster-os-files.yaml").unwrap();
    let spec = &cluster[0]["spec"];
    assert_eq!(spec["namespaceSelector"], json!({"matchLabels": {"kubefim.io/monitor": "true"}}));
    let rules = spec["rules"].as_array().unwrap();
    assert!(rules.iter().any(|r| r["path"] == "/etc/shadow" && r["secret"] == true), "/etc/shadow is secret");
    for path in ["/etc/passwd", "/usr/bin", "/usr/sbin"] {
        assert!(rules.iter().any(|r| r["path"] == path), "{path} is covered");
    }

    // The file-format example the README shows is a valid object too.
    let text = std::fs::read_to_string(repo().join("policies/workload-example.yaml")).unwrap();
    for object in parse_yaml_stream(&text) {
        validate_against_crd("WorkloadFimPolicy", &object).unwrap_or_else(|e| panic!("workload-example.yaml: {e}"));
    }
}

/// A way to break a valid object, and what it breaks.
type Breakage = (&'static str, fn(&mut Value));

/// A valid WorkloadFimPolicy to break.
fn good_policy() -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "WorkloadFimPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"},
                         "matchExpressions": [{"key": "tier", "operator": "In", "values": ["edge"]},
                                              {"key": "canary", "operator": "DoesNotExist"}]},
            "containers": ["nginx"],
            "images": ["*/nginx:*"],
            "rules": [{"path": "/etc/nginx", "diff": true, "exclude": ["*.bak"]},
                      {"path": "/usr/bin", "attributes": ["content", "mode"]},
                      {"path": "/etc/ssl/private", "secret": true}],
            "exemptions": [{"path": "/var/cache/nginx", "image": "*"}],
            "drift": {"exec": true}
        }
    })
}

#[test]
fn bad_policies_are_refused_by_the_crd_as_by_the_agent() {
    let good = good_policy();
    validate_against_crd("WorkloadFimPolicy", &good).unwrap();
    agent_parses(&good).unwrap();
    let cases: [Breakage; 17] = [
        ("a rule path without a leading /", |p| p["spec"]["rules"][0]["path"] = json!("etc/nginx")),
        ("a rule path with ..", |p| p["spec"]["rules"][0]["path"] = json!("/etc/../root")),
        ("an exemption path without a leading /", |p| p["spec"]["exemptions"][0]["path"] = json!("var/cache")),
        ("an exemption without image", |p| {
            p["spec"]["exemptions"][0].as_object_mut().unwrap().remove("image");
        }),
        ("an unknown field in a rule", |p| p["spec"]["rules"][0]["recursive"] = json!(true)),
        ("an unknown field in the spec", |p| p["spec"]["container"] = json!(["a"])),
        ("an unknown field in the selector", |p| p["spec"]["selector"]["matchLabel"] = json!({"a": "b"})),
        ("an unknown field in drift", |p| p["spec"]["drift"]["exe"] = json!(true)),
        ("a namespaceSelector on a namespaced policy", |p| p["spec"]["namespaceSelector"] = json!({})),
        ("an unknown operator", |p| p["spec"]["selector"]["matchExpressions"][0]["operator"] = json!("in")),
        ("In without values", |p| {
            p["spec"]["selector"]["matchExpressions"][0].as_object_mut().unwrap().remove("values");
        }),
        ("DoesNotExist with values", |p| p["spec"]["selector"]["matchExpressions"][1]["values"] = json!(["x"])),
        ("no selector", |p| {
            p["spec"].as_object_mut().unwrap().remove("selector");
        }),
        ("containers: []", |p| p["spec"]["containers"] = json!([])),
        ("images: []", |p| p["spec"]["images"] = json!([])),
        ("attributes: []", |p| p["spec"]["rules"][1]["attributes"] = json!([])),
        ("an unknown attribute", |p| p["spec"]["rules"][1]["attributes"] = json!(["content", "colour"])),
    ];
    for (what, break_it) in cases {
        let mut bad = good.clone();
        break_it(&mut bad);
        assert!(validate_against_crd("WorkloadFimPolicy", &bad).is_err(), "the CRD accepts {what}:\n{bad:#}");
        assert!(agent_parses(&bad).is_err(), "the agent's parser accepts {what} (the CRD refuses it)");
    }
    // The same rule path twice: rules are a list map keyed by path, whose duplicate keys the
    // API server refuses.
    let rules = &crd_openapi_schema("WorkloadFimPolicy")["properties"]["spec"]["properties"]["rules"];
    assert_eq!(
        (&rules["x-kubernetes-list-type"], &rules["x-kubernetes-list-map-keys"]),
        (&json!("map"), &json!(["path"]))
    );
    let mut twice = good.clone();
    twice["spec"]["rules"][1]["path"] = json!("/etc/nginx");
    assert!(validate_against_crd("WorkloadFimPolicy", &twice).unwrap_err().contains("duplicate"));
    assert!(agent_parses(&twice).is_err());

    // A ClusterWorkloadFimPolicy takes a namespaceSelector, and checks it like the selector.
    let mut cluster = good.clone();
    cluster["kind"] = json!("ClusterWorkloadFimPolicy");
    cluster["metadata"].as_object_mut().unwrap().remove("namespace");
    cluster["spec"]["namespaceSelector"] = json!({"matchLabels": {"kubefim.io/monitor": "true"}});
    validate_against_crd("ClusterWorkloadFimPolicy", &cluster).unwrap();
    agent_parses(&cluster).unwrap();
    let cases: [(&str, Value); 3] = [
        ("Exists with values", json!({"matchExpressions": [{"key": "team", "operator": "Exists", "values": ["a"]}]})),
        ("an unknown operator", json!({"matchExpressions": [{"key": "team", "operator": "Has"}]})),
        ("an unknown field", json!({"matchLabel": {"team": "a"}})),
    ];
    for (what, selector) in cases {
        let mut bad = cluster.clone();
        bad["spec"]["namespaceSelector"] = selector;
        assert!(validate_against_crd("ClusterWorkloadFimPolicy", &bad).is_err(), "the CRD accepts {what}");
        assert!(agent_parses(&bad).is_err(), "the agent's parser accepts {what} (the CRD refuses it)");
    }
}

#[test]
fn every_cel_rule_has_a_twin_and_sits_where_its_twin_expects() {
    /// (path in the schema, rule) of every CEL rule.
    fn rules(schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
        for r in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
            assert!(r["message"].is_string(), "{at}: a rule with a message");
            out.push((at.to_owned(), r["rule"].as_str().unwrap().to_owned()));
        }
        for (k, sub) in schema["properties"].as_object().into_iter().flatten() {
            rules(sub, &format!("{at}.{k}"), out);
        }
        if schema["items"].is_object() {
            rules(&schema["items"], &format!("{at}[]"), out);
        }
    }
    let mut all = Vec::new();
    for kind in ["WorkloadFimPolicy", "ClusterWorkloadFimPolicy"] {
        rules(&crd_openapi_schema(kind), "", &mut all);
    }
    let at: BTreeSet<&str> = all.iter().map(|(at, _)| at.as_str()).collect();
    let want: BTreeSet<&str> = [
        ".spec.selector.matchExpressions[]",
        ".spec.namespaceSelector.matchExpressions[]",
        ".spec.rules[].path",
        ".spec.exemptions[].path",
    ]
    .into();
    assert_eq!(at, want);
    for (at, rule) in &all {
        let twin = common::deploy::cel_twin(rule);
        let (good, bad) = if at.ends_with("path") {
            (json!("/a/..b/c.."), json!("/a/../b"))
        } else {
            (json!({"key": "k", "operator": "Exists"}), json!({"key": "k", "operator": "NotIn", "values": []}))
        };
        assert!(twin(&good) && !twin(&bad), "{at}: {rule}");
    }
    // FimNodeStatus is written by the agent alone: no rule to keep.
    let before = all.len();
    rules(&crd_openapi_schema("FimNodeStatus"), "", &mut all);
    assert_eq!(all.len(), before, "{all:#?}");
}

/// A FimNodeStatus in the shape the agent writes, every field set.
fn node_status() -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "FimNodeStatus",
        "metadata": {"name": "worker-1"},
        "status": {
            "node": "worker-1",
            "agentVersion": "0.1.0",
            "updateTime": "2026-12-07T12:00:00Z",
            "baseline": {"trusted": true, "created": "2026-12-01T08:30:00Z", "entries": 48213, "policy": "node"},
            "lastVerify": {"time": "2026-12-07T11:59:30Z", "result": "changed", "added": 1, "removed": 0,
                           "modified": 2, "errors": 0},
            "watcher": {"ready": true, "programsAttached": 23, "programsDegraded": 0, "lostEvents": 0,
                        "lastRescan": "2026-12-07T11:00:00Z"},
            "policies": {"applied": 3, "rejected": 1, "rejectedNames": ["shop/broken"]},
            "containerDrift": [{"namespace": "shop", "changes": 4, "driftExecs": 1},
                               {"namespace": "", "changes": 1, "driftExecs": 0}],
            "recentChanges": [{"path": "/etc/kubernetes/manifests/backdoor.yaml", "kind": "added",
                               "time": "2026-12-07T11:58:00Z"}],
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                 "lastTransitionTime": "2026-12-07T10:00:00Z", "observedGeneration": 1},
                {"type": "BaselineTrusted", "status": "True", "reason": "SignatureChecked",
                 "message": "signed baseline of 48213 entries", "lastTransitionTime": "2026-12-01T08:31:00Z"},
                {"type": "PoliciesApplied", "status": "False", "reason": "PolicyRejected",
                 "message": "shop/broken: unknown field `exe`", "lastTransitionTime": "2026-12-07T11:00:00Z"}
            ]
        }
    })
}

#[test]
fn a_node_status_in_the_agents_shape_validates() {
    let status = node_status();
    validate_against_crd("FimNodeStatus", &status).unwrap();
    // A node without a baseline yet: created is null, and a bare status is fine.
    let mut first = status.clone();
    first["status"]["baseline"] = json!({"trusted": false, "created": null, "entries": 0, "policy": "node"});
    validate_against_crd("FimNodeStatus", &first).unwrap();
    validate_against_crd(
        "FimNodeStatus",
        &json!({"apiVersion": API_VERSION, "kind": "FimNodeStatus",
        "metadata": {"name": "n"}, "status": {"node": "n"}}),
    )
    .unwrap();

    let cases: [Breakage; 11] = [
        ("an unknown result", |s| s["status"]["lastVerify"]["result"] = json!("dirty")),
        ("content in a recent change", |s| s["status"]["recentChanges"][0]["content"] = json!("secret")),
        ("21 recent changes", |s| {
            let one = s["status"]["recentChanges"][0].clone();
            s["status"]["recentChanges"] = Value::Array(vec![one; 21]);
        }),
        ("51 rejected names", |s| s["status"]["policies"]["rejectedNames"] = json!(vec!["a"; 51])),
        ("a condition status yes", |s| s["status"]["conditions"][0]["status"] = json!("yes")),
        ("a condition without lastTransitionTime", |s| {
            s["status"]["conditions"][0].as_object_mut().unwrap().remove("lastTransitionTime");
        }),
        ("a time that is not a date-time", |s| s["status"]["updateTime"] = json!("yesterday")),
        ("a negative count", |s| s["status"]["lastVerify"]["added"] = json!(-1)),
        ("a count as a string", |s| s["status"]["watcher"]["lostEvents"] = json!("3")),
        ("an unknown status field", |s| s["status"]["spec"] = json!({})),
        ("a spec", |s| s["spec"] = json!({"node": "x"})),
    ];
    for (what, break_it) in cases {
        let mut bad = status.clone();
        break_it(&mut bad);
        assert!(validate_against_crd("FimNodeStatus", &bad).is_err(), "the CRD accepts {what}:\n{bad:#}");
    }
    // The per-namespace drift and the conditions are list maps (one entry per namespace, per
    // condition type), as the agent's patches expect.
    let schema = crd_openapi_schema("FimNodeStatus");
    let status_schema = &schema["properties"]["status"]["properties"];
    assert_eq!(status_schema["containerDrift"]["x-kubernetes-list-map-keys"], json!(["namespace"]));
    assert_eq!(status_schema["conditions"]["x-kubernetes-list-map-keys"], json!(["type"]));
    assert_eq!(status_schema["containerDrift"]["maxItems"], 1000);
}
