//! The Kubernetes manifests as the deploy tests see them: `kubectl kustomize deploy/`, as
//! text and as parsed objects.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `kubectl kustomize deploy/`, as YAML text.
pub fn rendered_text() -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo().join("deploy"))
        .output()
        .expect("kubectl (with kustomize) must be installed: it is on these machines");
    assert!(out.status.success(), "kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

/// `kubectl kustomize deploy/`, parsed: one value per object.
pub fn rendered_objects() -> Vec<Value> {
    let text = rendered_text();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}
