//! The Kubernetes manifests as the tests see them: each kustomization rendered with
//! `kubectl kustomize`, as text and as parsed objects; the CustomResourceDefinitions of
//! deploy/crds; and each CRD's schema as a JSON Schema, to validate objects of its kind the
//! way the API server would (tests/crds.rs for the examples, the agent's tests for the
//! FimNodeStatus it writes).
//!
//! What the API server checks and a JSON Schema validator does not: the CEL rules
//! (`x-kubernetes-validations`). Each rule the CRDs hold has a twin here in Rust
//! ([`cel_twin`]), run by [`validate_against_crd`] where the rule sits; a rule without a twin
//! fails the tests, so a rule cannot change without its twin being looked at. The twins are
//! hand-written, not CEL: they hold the CRDs to what the twin says, not the API server.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::{Map, Value, json};

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every kustomization that is installed as it is (the base and its overlays), and the CRDs
/// alone, relative to the repository root.
pub const KUSTOMIZATIONS: [&str; 4] =
    ["deploy", "deploy/overlays/monitoring", "deploy/overlays/workloads", "deploy/crds"];

/// The API group and version of kubefim's own kinds.
pub const API_VERSION: &str = "kubefim.io/v1alpha1";

/// `kubectl kustomize DIR` (relative to the repository root), as YAML text.
pub fn rendered_text_of(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join(dir))
        .output()
        .expect("kubectl (with kustomize) must be installed: it is on these machines");
    assert!(out.status.success(), "kubectl kustomize {dir} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// `kubectl kustomize DIR`, parsed: one value per object.
pub fn rendered_objects_of(dir: &str) -> Vec<Value> {
    parse_yaml_stream(&rendered_text_of(dir))
}

/// `kubectl kustomize deploy/` (the base install), as YAML text.
pub fn rendered_text() -> String {
    rendered_text_of("deploy")
}

/// `kubectl kustomize deploy/` (the base install), parsed: one value per object.
pub fn rendered_objects() -> Vec<Value> {
    rendered_objects_of("deploy")
}

/// Every document of a YAML stream, empty ones skipped.
pub fn parse_yaml_stream(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The CustomResourceDefinition of `kind` (e.g. `FimNodeStatus`) in deploy/crds.
#[track_caller]
pub fn crd(kind: &str) -> Value {
    let mut found: Vec<Value> = crds().into_iter().filter(|c| c["spec"]["names"]["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "want one CRD of kind {kind} in deploy/crds");
    found.remove(0)
}

/// Every CustomResourceDefinition in deploy/crds (its kustomization, rendered).
pub fn crds() -> Vec<Value> {
    let crds = rendered_objects_of("deploy/crds");
    assert!(crds.iter().all(|c| c["kind"] == "CustomResourceDefinition"), "deploy/crds holds only CRDs");
    crds
}

/// The openAPIV3Schema of `kind`'s one version, as the CRD states it.
#[track_caller]
pub fn crd_openapi_schema(kind: &str) -> Value {
    let crd = crd(kind);
    let versions = crd["spec"]["versions"].as_array().expect("spec.versions");
    assert_eq!(versions.len(), 1, "{kind}: one version");
    versions[0]["schema"]["openAPIV3Schema"].clone()
}

/// The JSON Schema of a whole object of `kind` (apiVersion, kind, metadata and its spec or
/// status): the CRD's openAPIV3Schema with what the API server adds to it. `nullable: true`
/// admits null; and, as the API server's strict field validation (`kubectl apply`'s default)
/// refuses unknown fields, every object schema that lists its `properties` refuses others
/// (`additionalProperties: false`) unless it says `x-kubernetes-preserve-unknown-fields`.
/// `metadata` is left open: the API server validates it as ObjectMeta.
#[track_caller]
pub fn crd_schema(kind: &str) -> Value {
    to_json_schema(&crd_openapi_schema(kind))
}

/// Validates `object` (a whole object: apiVersion, kind, metadata, spec or status) against
/// the CRD of `kind`: its apiVersion and kind, a name, the schema ([`crd_schema`], with
/// date-time and other formats checked) and the CEL rules through their twins. The error
/// lists every violation with where it is.
pub fn validate_against_crd(kind: &str, object: &Value) -> Result<(), String> {
    let mut errors = Vec::new();
    if object["apiVersion"] != API_VERSION {
        errors.push(format!("apiVersion is {}, want {API_VERSION}", object["apiVersion"]));
    }
    if object["kind"] != kind {
        errors.push(format!("kind is {}, want {kind}", object["kind"]));
    }
    if object["metadata"]["name"].as_str().is_none_or(str::is_empty) {
        errors.push("metadata.name is missing".to_owned());
    }
    let schema = crd_schema(kind);
    let validator = jsonschema::draft4::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("the {kind} schema is not a valid JSON Schema: {e}\n{schema:#}"));
    errors.extend(validator.iter_errors(object).map(|e| format!("{e} (at {})", e.instance_path())));
    check_cel(&crd_openapi_schema(kind), object, "", &mut errors);
    if errors.is_empty() { Ok(()) } else { Err(errors.join("\n")) }
}

/// An OpenAPI v3 schema of a CRD as a JSON Schema (see [`crd_schema`]).
pub fn to_json_schema(openapi: &Value) -> Value {
    let Some(node) = openapi.as_object() else { return openapi.clone() };
    let mut out = Map::new();
    for (key, value) in node {
        match key.as_str() {
            "properties" => {
                let props = value.as_object().expect("properties is a map");
                out.insert(key.clone(), props.iter().map(|(k, v)| (k.clone(), to_json_schema(v))).collect());
            }
            "items" | "not" => {
                out.insert(key.clone(), to_json_schema(value));
            }
            "additionalProperties" if value.is_object() => {
                out.insert(key.clone(), to_json_schema(value));
            }
            "allOf" | "anyOf" | "oneOf" => {
                let list = value.as_array().expect("a list of schemas");
                out.insert(key.clone(), list.iter().map(to_json_schema).collect());
            }
            // Not JSON Schema: nullable is handled below, the x-kubernetes-* keys are the API
            // server's (CEL rules, list types, int-or-string), description is only words.
            "nullable" | "description" => {}
            k if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if node.get("nullable") == Some(&Value::Bool(true)) {
        if let Some(t) = out.remove("type") {
            out.insert("type".to_owned(), json!([t, "null"]));
        }
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    if node.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        out.insert("anyOf".to_owned(), json!([{"type": "integer"}, {"type": "string"}]));
    }
    let preserve = node.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if node.contains_key("properties") && !node.contains_key("additionalProperties") && !preserve {
        out.insert("additionalProperties".to_owned(), Value::Bool(false));
    }
    Value::Object(out)
}

/// A CEL rule's twin: true when `value` (the rule's `self`) passes. Panics on a rule it does
/// not know: add its twin here when you add a rule to a CRD.
#[track_caller]
pub fn cel_twin(rule: &str) -> fn(&Value) -> bool {
    // Rules are compared with their whitespace collapsed (YAML's folded scalars).
    let rule = rule.split_whitespace().collect::<Vec<_>>().join(" ");
    match rule.as_str() {
        // A LabelSelector requirement: In and NotIn need values, Exists and DoesNotExist none.
        "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values) || size(self.values) == 0" => {
            |requirement| {
                let values = requirement.get("values").and_then(Value::as_array).map_or(0, Vec::len);
                match requirement["operator"].as_str() {
                    Some("In" | "NotIn") => values > 0,
                    _ => values == 0,
                }
            }
        }
        // A path without a `..` component.
        "!self.matches('(^|/)[.][.](/|$)')" => |path| !path.as_str().unwrap_or("").split('/').any(|c| c == ".."),
        other => panic!("the CEL rule {other:?} has no twin in tests/common/deploy.rs: write one"),
    }
}

/// What the API server checks beyond the JSON Schema, on `value` and what it holds: the CEL
/// rules (through their twins) and the uniqueness of a list map's keys. Records each
/// failure with its path.
fn check_cel(schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    if let (Some("map"), Some(items)) = (schema["x-kubernetes-list-type"].as_str(), value.as_array()) {
        let keys = schema["x-kubernetes-list-map-keys"].as_array().cloned().unwrap_or_default();
        let mut seen = std::collections::BTreeSet::new();
        for item in items {
            let key: Vec<String> = keys.iter().map(|k| item[k.as_str().unwrap_or("")].to_string()).collect();
            if !seen.insert(key.clone()) {
                errors.push(format!("duplicate entry {key:?} in a list map (at {at})"));
            }
        }
    }
    for rule in schema["x-kubernetes-validations"].as_array().into_iter().flatten() {
        let text = rule["rule"].as_str().expect("a rule");
        if !cel_twin(text)(value) {
            errors.push(format!("{} (at {at}; CEL rule {text:?})", rule["message"].as_str().unwrap_or("rule failed")));
        }
    }
    match value {
        Value::Object(fields) => {
            for (key, field) in fields {
                let sub = match schema["properties"].get(key) {
                    Some(sub) => sub,
                    None => &schema["additionalProperties"],
                };
                if sub.is_object() {
                    check_cel(sub, field, &format!("{at}/{key}"), errors);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter().enumerate() {
                check_cel(&schema["items"], item, &format!("{at}/{i}"), errors);
            }
        }
        _ => {}
    }
}
