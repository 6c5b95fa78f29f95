//! The WorkloadFimPolicy: which containers are checked against their images, and how. It
//! owns parsing and validating these policies (from files, directories of files, and
//! multi-document YAML), the Kubernetes label selector, and the decision of which policies
//! select a container and which paths inside it are exempt. Its rules are an ordinary
//! [`Policy`] over paths inside the container, validated by the same code as a FimPolicy's;
//! finding containers, reading their labels and scanning them is not done here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::marker::PhantomData;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::error::{Error, Result};
use crate::policy::{self, ApiVersion, MAX_POLICY_BYTES, Policy, RawRule, RulePath};

/// What a policy is matched against: one container, with the labels of its pod on
/// Kubernetes and its own labels elsewhere.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// The pod's labels (Kubernetes) or the container's labels (other runtimes).
    pub labels: &'a BTreeMap<String, String>,
    /// The container's name (in its pod on Kubernetes).
    pub container_name: &'a str,
    /// The image reference as the runtime reports it (`docker.io/library/nginx:1.25`).
    pub image: &'a str,
    /// The pod's namespace on Kubernetes; None elsewhere.
    pub namespace: Option<&'a str>,
}

/// A validated WorkloadFimPolicy.
#[derive(Debug, Clone)]
pub struct WorkloadPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`: the policy selects only workloads of this namespace.
    pub namespace: Option<String>,
    /// `kind`: a ClusterWorkloadFimPolicy is the cluster's, a WorkloadFimPolicy its namespace's.
    pub kind: PolicyKind,
    /// `spec.namespaceSelector` (ClusterWorkloadFimPolicy only), with the namespaces it
    /// matched at the last [`WorkloadPolicies::resolve_namespaces`]: until then, and when
    /// there is no Kubernetes API to read namespaces from, it matches none.
    namespace_selector: Option<(Selector, BTreeSet<String>)>,
    /// `spec.selector`, matched against the workload's labels.
    pub selector: Selector,
    /// `spec.containers`: the container names selected; empty selects every container.
    pub containers: Vec<String>,
    /// `spec.images`: globs on the image reference; None selects every image.
    images: Option<ImageGlobs>,
    /// `spec.rules` as a policy over paths inside the container, named after this policy,
    /// its source the document's YAML text.
    pub policy: Policy,
    /// `spec.exemptions`.
    exemptions: Vec<Exemption>,
    /// `spec.drift.exec`: report executables run in the container that its image does not hold.
    pub drift_exec: bool,
    /// The file (or other origin) the policy was read from, for errors.
    origin: String,
}

/// The two kinds of workload policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// `WorkloadFimPolicy`: in a file, for any namespace or the one it names; as a Kubernetes
    /// object, for its own namespace only (a tenant never selects another tenant's pods).
    Workload,
    /// `ClusterWorkloadFimPolicy`: the cluster admins', across namespaces (`namespaceSelector`).
    Cluster,
}

impl PolicyKind {
    /// The kind as written.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Workload => "WorkloadFimPolicy",
            PolicyKind::Cluster => "ClusterWorkloadFimPolicy",
        }
    }
}

#[derive(Debug, Clone)]
struct ImageGlobs {
    set: GlobSet,
    patterns: Vec<String>,
}

/// One `spec.exemptions` entry: changes at or below `path` in containers whose image matches
/// `image_pattern` are not reported.
#[derive(Debug, Clone)]
pub struct Exemption {
    /// The absolute, normalised path inside the container.
    pub path: PathBuf,
    /// The image glob as written.
    pub image_pattern: String,
    image: GlobMatcher,
}

impl WorkloadPolicy {
    /// Whether the policy applies to `w`: its namespace (a namespaced policy never reaches
    /// outside its namespace, nor to workloads that have none), its selector, its container
    /// names and its image globs all match.
    pub fn selects(&self, w: &Workload<'_>) -> bool {
        let namespace = match (&self.namespace, w.namespace) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        let selected_namespace = match (&self.namespace_selector, w.namespace) {
            (None, _) => true,
            (Some((_, matched)), Some(theirs)) => matched.contains(theirs),
            (Some(_), None) => false,
        };
        namespace
            && selected_namespace
            && self.selector.matches(w.labels)
            && (self.containers.is_empty() || self.containers.iter().any(|c| c == w.container_name))
            && self.images.as_ref().is_none_or(|i| i.set.is_match(w.image))
    }

    /// Whether a change at `path` (absolute, inside the container) in a container of `image`
    /// is exempt: `path` is at or below an exemption's path whose image glob matches.
    pub fn exempt(&self, path: &Path, image: &str) -> bool {
        self.exemptions.iter().any(|e| path.starts_with(&e.path) && e.image.is_match(image))
    }

    /// The image globs as written, or None when every image is selected.
    pub fn image_patterns(&self) -> Option<&[String]> {
        self.images.as_ref().map(|i| i.patterns.as_slice())
    }

    /// The exemptions, in the order written.
    pub fn exemptions(&self) -> &[Exemption] {
        &self.exemptions
    }

    /// The policy as it was written (its YAML or JSON document): two policies with the same
    /// name and source select and check the same.
    pub fn source(&self) -> &str {
        self.policy.source()
    }

    /// `namespace/name`, or `name` for a policy without a namespace.
    pub fn qualified_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// A Kubernetes `LabelSelector`, with its semantics: every `matchLabels` pair and every
/// `matchExpressions` requirement must hold; an empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Selector {
    /// Labels that must be present with exactly these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements on labels.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    /// Whether `labels` satisfy the selector.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// One `matchExpressions` entry; validated while deserialising (In and NotIn need values,
/// Exists and DoesNotExist take none), so the error has a line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRequirement")]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// How the label is tested.
    pub operator: Operator,
    /// The values for In and NotIn; empty for the others.
    pub values: Vec<String>,
}

/// A `matchExpressions` operator, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Operator {
    /// The label is present and its value is one of the values.
    In,
    /// The label is absent, or its value is none of the values.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl Requirement {
    /// Whether `labels` satisfy the requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: String,
    operator: Operator,
    #[serde(default)]
    values: Vec<String>,
}

impl TryFrom<RawRequirement> for Requirement {
    type Error = String;

    fn try_from(raw: RawRequirement) -> Result<Self, String> {
        if raw.key.is_empty() {
            return Err("`key` is empty".to_owned());
        }
        let needs_values = matches!(raw.operator, Operator::In | Operator::NotIn);
        if needs_values && raw.values.is_empty() {
            return Err(format!("{:?} on {:?} needs at least one value", raw.operator, raw.key));
        }
        if !needs_values && !raw.values.is_empty() {
            return Err(format!("{:?} on {:?} takes no values; remove `values`", raw.operator, raw.key));
        }
        Ok(Requirement { key: raw.key, operator: raw.operator, values: raw.values })
    }
}

/// Every workload policy read, in the order read (files in the order given, a directory's
/// files by name, documents in file order).
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies(Vec<WorkloadPolicy>);

impl WorkloadPolicies {
    /// Reads the policies from each path: a file, or a directory whose `*.yaml` and `*.yml`
    /// files are read in name order (not recursively; hidden files skipped). A file may hold
    /// several documents separated by `---`. Two policies with the same namespace and name
    /// are an error.
    pub fn load(paths: &[PathBuf]) -> Result<WorkloadPolicies> {
        let mut all = Vec::new();
        for path in paths {
            for file in files_of(path)? {
                let text = read_limited(&file)?;
                all.extend(parse(&text, &file.display().to_string())?);
            }
        }
        WorkloadPolicies::unique(all)
    }

    /// Parses the policies of one YAML text (one or more documents). `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<WorkloadPolicies> {
        if text.len() as u64 > MAX_POLICY_BYTES {
            return Err(Error::Policy { origin: origin.to_owned(), message: policy::too_big() });
        }
        WorkloadPolicies::unique(parse(text, origin)?)
    }

    fn unique(all: Vec<WorkloadPolicy>) -> Result<WorkloadPolicies> {
        let mut set = Gathered::default();
        set.add(WorkloadPolicies(all))?;
        Ok(set.finish())
    }

    /// Matches each ClusterWorkloadFimPolicy's `namespaceSelector` against the labels of the
    /// cluster's namespaces (name -> labels), as the Kubernetes API lists them now.
    pub fn resolve_namespaces(&mut self, namespaces: &BTreeMap<String, BTreeMap<String, String>>) {
        for p in &mut self.0 {
            if let Some((selector, matched)) = &mut p.namespace_selector {
                *matched =
                    namespaces.iter().filter(|(_, labels)| selector.matches(labels)).map(|(n, _)| n.clone()).collect();
            }
        }
    }

    /// The policies that select `w`, in the order read.
    pub fn for_workload(&self, w: &Workload<'_>) -> Vec<&WorkloadPolicy> {
        self.0.iter().filter(|p| p.selects(w)).collect()
    }

    /// Whether no policy was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The policies, in the order read.
    pub fn iter(&self) -> impl Iterator<Item = &WorkloadPolicy> {
        self.0.iter()
    }
}

/// A policy's identity: two policies with the same one are an error.
type Identity = (PolicyKind, Option<String>, String);

/// Policies gathered from several sources (files, API objects), one source at a time: a
/// source that defines a name already gathered is refused whole, and what was gathered stays.
/// Each addition costs what it adds, however many were gathered before.
#[derive(Debug, Default)]
pub struct Gathered {
    all: Vec<WorkloadPolicy>,
    /// Where each identity was defined.
    origins: HashMap<Identity, String>,
}

impl Gathered {
    /// Starts from `policies` (already checked to be unique).
    pub fn new(policies: WorkloadPolicies) -> Gathered {
        let origins = policies.0.iter().map(|p| (identity(p), p.origin.clone())).collect();
        Gathered { all: policies.0, origins }
    }

    /// Adds every policy of `more`, or none when one of its names is defined already (in
    /// `more` itself or before).
    pub fn add(&mut self, more: WorkloadPolicies) -> Result<()> {
        let mut new: HashMap<Identity, &str> = HashMap::with_capacity(more.0.len());
        for p in &more.0 {
            let id = identity(p);
            let first = self.origins.get(&id).map(String::as_str).or_else(|| new.get(&id).copied());
            if let Some(first) = first {
                let (kind, name) = (p.kind.name(), p.qualified_name());
                let message = if first == p.origin {
                    format!("the {kind} {name} is defined twice in this file; rename one")
                } else {
                    format!("the {kind} {name} is also defined in {first}; rename one")
                };
                return Err(Error::Policy { origin: p.origin.clone(), message });
            }
            new.insert(id, &p.origin);
        }
        self.origins.extend(more.0.iter().map(|p| (identity(p), p.origin.clone())));
        self.all.extend(more.0);
        Ok(())
    }

    /// The policies, in the order gathered.
    pub fn finish(self) -> WorkloadPolicies {
        WorkloadPolicies(self.all)
    }
}

fn identity(p: &WorkloadPolicy) -> Identity {
    (p.kind, p.namespace.clone(), p.name.clone())
}

/// The files a path names: itself, or a directory's `*.yaml` / `*.yml` files by name.
fn files_of(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = fs::metadata(path).map_err(|e| Error::io("read the workload policy", path, e))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let list_err = |e| Error::io("list the workload policies in", path, e);
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name();
        let yaml = matches!(Path::new(&name).extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if name.as_bytes().starts_with(b".") || !yaml {
            continue;
        }
        let file = entry.path();
        // Follow symbolic links: a ConfigMap volume's files are links into its hidden `..data`.
        let meta = fs::metadata(&file).map_err(|e| Error::io("read the workload policy", &file, e))?;
        if meta.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// The text of a file, refused beyond [`MAX_POLICY_BYTES`] without reading more than that.
fn read_limited(path: &Path) -> Result<String> {
    let read_err = |e| Error::io("read the workload policy", path, e);
    let mut text = String::new();
    fs::File::open(path).map_err(read_err)?.take(MAX_POLICY_BYTES + 1).read_to_string(&mut text).map_err(read_err)?;
    if text.len() as u64 > MAX_POLICY_BYTES {
        return Err(Error::Policy { origin: path.display().to_string(), message: policy::too_big() });
    }
    Ok(text)
}

/// Parses every document of `text`; empty documents are skipped.
fn parse(text: &str, origin: &str) -> Result<Vec<WorkloadPolicy>> {
    let bad = |message: String| Error::Policy { origin: origin.to_owned(), message };
    let mut docs = Vec::new();
    // After a syntax error the iterator may go on yielding failures: stop at the first.
    for document in serde_norway::Deserializer::from_str(text) {
        docs.push(Option::<WorkloadDoc>::deserialize(document).map_err(|e| bad(e.to_string()))?);
    }
    // Each policy keeps its own document as its source; should the split ever disagree
    // with the parser, the whole file is kept, which still holds the document.
    let texts = document_texts(text);
    let paired = texts.len() == docs.len();
    let mut policies = Vec::with_capacity(docs.len());
    for (i, doc) in docs.into_iter().enumerate() {
        let Some(doc) = doc else { continue };
        let source = if paired { texts[i] } else { text };
        let spec = doc.spec;
        let kind = doc.kind.0;
        let Some(selector) = spec.selector else {
            // A policy that selects every container by accident is as wrong as one that selects none.
            return Err(bad(format!(
                "{} {}: spec.selector is missing; write `selector: {{}}` to select every container",
                kind.name(),
                doc.metadata.name
            )));
        };
        match kind {
            PolicyKind::Cluster if doc.metadata.namespace.is_some() => {
                return Err(bad(format!(
                    "ClusterWorkloadFimPolicy {}: a cluster policy has no namespace; remove metadata.namespace, \
                     or select namespaces with spec.namespaceSelector",
                    doc.metadata.name
                )));
            }
            PolicyKind::Workload if spec.namespace_selector.is_some() => {
                return Err(bad(format!(
                    "WorkloadFimPolicy {}: spec.namespaceSelector is for a ClusterWorkloadFimPolicy; a \
                     WorkloadFimPolicy selects in its own namespace (metadata.namespace)",
                    doc.metadata.name
                )));
            }
            _ => {}
        }
        let policy = policy::build(doc.metadata.name.clone(), spec.rules, source, bad)?;
        let images = match spec.images {
            None => None,
            Some(list) => {
                let mut set = GlobSetBuilder::new();
                for g in &list {
                    set.add(g.glob.clone());
                }
                let set = set.build().map_err(|e| bad(format!("spec.images: {e}")))?;
                Some(ImageGlobs { set, patterns: list.into_iter().map(|g| g.pattern).collect() })
            }
        };
        policies.push(WorkloadPolicy {
            name: doc.metadata.name,
            namespace: doc.metadata.namespace,
            kind,
            namespace_selector: spec.namespace_selector.map(|s| (s, BTreeSet::new())),
            selector,
            containers: spec.containers.unwrap_or_default(),
            images,
            policy,
            exemptions: spec
                .exemptions
                .into_iter()
                .map(|e| Exemption {
                    path: e.path.0,
                    image: e.image.glob.compile_matcher(),
                    image_pattern: e.image.pattern,
                })
                .collect(),
            drift_exec: spec.drift.exec,
            origin: origin.to_owned(),
        });
    }
    Ok(policies)
}

/// The text of each document of a YAML stream, in order. In YAML a line that starts with
/// `---` or `...` followed by a blank is always a document marker, even inside a block or
/// quoted scalar, so splitting at those lines is exact. `---` starts a document even when
/// nothing follows; text before the first `---` or after a `...` is a document only when it
/// holds content (not only comments, blank lines and directives).
fn document_texts(text: &str) -> Vec<&str> {
    fn marker(line: &str, m: &str) -> bool {
        line.strip_prefix(m).is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    }
    fn content(chunk: &str) -> bool {
        chunk.lines().any(|l| {
            let t = l.trim_start();
            !(t.is_empty() || t.starts_with('#') || l.starts_with('%') || marker(l, "..."))
        })
    }
    let mut docs = Vec::new();
    let mut close = |chunk: std::ops::Range<usize>, explicit: bool| {
        if explicit || content(&text[chunk.clone()]) {
            docs.push(&text[chunk]);
        }
    };
    let (mut start, mut explicit, mut at) = (0, false, 0);
    for line in text.split_inclusive('\n') {
        if marker(line, "---") {
            close(start..at, explicit);
            (start, explicit) = (at, true);
        } else if marker(line, "...") {
            close(start..at + line.len(), explicit);
            (start, explicit) = (at + line.len(), false);
        }
        at += line.len();
    }
    close(start..text.len(), explicit);
    docs
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadDoc {
    #[serde(rename = "apiVersion")]
    #[expect(dead_code, reason = "validated by deserialising into the single-variant enum")]
    api_version: ApiVersion,
    kind: WorkloadKind,
    metadata: Metadata,
    spec: Spec,
}

/// `kind: WorkloadFimPolicy` or `ClusterWorkloadFimPolicy`; any other kind is refused with
/// what takes it.
struct WorkloadKind(PolicyKind);

impl<'de> Deserialize<'de> for WorkloadKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, not a String checked afterwards: an error raised while the scalar is
        // being read is given its line.
        struct KindVisitor;
        impl de::Visitor<'_> for KindVisitor {
            type Value = WorkloadKind;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`WorkloadFimPolicy` or `ClusterWorkloadFimPolicy`")
            }

            fn visit_str<E: de::Error>(self, kind: &str) -> Result<WorkloadKind, E> {
                match kind {
                    "WorkloadFimPolicy" => Ok(WorkloadKind(PolicyKind::Workload)),
                    "ClusterWorkloadFimPolicy" => Ok(WorkloadKind(PolicyKind::Cluster)),
                    "FimPolicy" => Err(E::custom(
                        "this is a FimPolicy (files of the node), which `--policy` takes; a workload \
                         policy (files inside containers) has `kind: WorkloadFimPolicy`",
                    )),
                    other => Err(E::custom(format!(
                        "kind {other:?} is not a workload policy; expected `kind: WorkloadFimPolicy` or \
                         `kind: ClusterWorkloadFimPolicy`"
                    ))),
                }
            }
        }
        d.deserialize_str(KindVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default, deserialize_with = "namespace")]
    namespace: Option<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted so the policy can live in a ConfigMap or CRD")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted so the policy can live in a ConfigMap or CRD")]
    annotations: BTreeMap<String, String>,
}

/// A namespace, never empty: an empty one would silently select nothing.
fn namespace<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match Option::<String>::deserialize(d)? {
        Some(ns) if ns.is_empty() => {
            Err(de::Error::custom("`namespace: \"\"` selects nothing; leave it out to select every namespace"))
        }
        ns => Ok(ns),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    // An Option, so that leaving it out gets a message saying how to select everything.
    #[serde(default)]
    selector: Option<Selector>,
    /// ClusterWorkloadFimPolicy only.
    #[serde(default, rename = "namespaceSelector")]
    namespace_selector: Option<Selector>,
    #[serde(default, deserialize_with = "containers")]
    containers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "images")]
    images: Option<Vec<ImageGlob>>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    exemptions: Vec<RawExemption>,
    #[serde(default)]
    drift: Drift,
}

fn containers<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    non_empty(d, "`containers: []` selects no container; leave the key out to select all")
}

fn images<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ImageGlob>>, D::Error> {
    non_empty(d, "`images: []` selects no image; leave the key out to select all")
}

/// A list that must not be empty, refused with `refusal`. Checked by a visitor, while the
/// list is being read, so that the error is given the list's line.
fn non_empty<'de, D, T>(d: D, refusal: &'static str) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct NonEmpty<T>(&'static str, PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for NonEmpty<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list")
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some(item) = seq.next_element()? {
                list.push(item);
            }
            if list.is_empty() {
                return Err(de::Error::custom(self.0));
            }
            Ok(list)
        }
    }
    d.deserialize_seq(NonEmpty(refusal, PhantomData)).map(Some)
}

/// A glob on an image reference; `*` crosses `/`, so `*/nginx:*` matches any registry's
/// nginx. Compiled while deserialising so the error has a line.
struct ImageGlob {
    pattern: String,
    glob: Glob,
}

impl<'de> Deserialize<'de> for ImageGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pattern = String::deserialize(d)?;
        let glob = GlobBuilder::new(&pattern)
            .backslash_escape(true)
            .build()
            .map_err(|e| de::Error::custom(format!("bad image glob {pattern:?}: {}", e.kind())))?;
        Ok(ImageGlob { pattern, glob })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExemption {
    path: RulePath,
    image: ImageGlob,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Drift {
    #[serde(default)]
    exec: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: kubefim.io/v1alpha1\nkind: WorkloadFimPolicy\n";

    /// A policy named `name` whose spec is `spec` (indented by the caller as under `spec:`).
    fn doc(name: &str, spec: &str) -> String {
        format!("{HEAD}metadata: {{name: {name}}}\nspec:\n{spec}")
    }

    fn one(yaml: &str) -> WorkloadPolicy {
        let mut all = WorkloadPolicies::from_yaml(yaml, "t").unwrap().0;
        assert_eq!(all.len(), 1);
        all.remove(0)
    }

    fn err(yaml: &str) -> String {
        WorkloadPolicies::from_yaml(yaml, "t").unwrap_err().to_string()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn selector(yaml: &str) -> Selector {
        one(&doc("s", &format!("  selector: {yaml}\n"))).selector
    }

    #[test]
    fn selector_operators_follow_kubernetes() {
        let web = labels(&[("app", "web"), ("tier", "edge")]);
        let db = labels(&[("app", "db")]);
        let none = labels(&[]);
        let cases: [(&str, [bool; 3]); 6] = [
            ("{matchLabels: {app: web}}", [true, false, false]),
            ("{matchExpressions: [{key: tier, operator: In, values: [frontend, edge]}]}", [true, false, false]),
            ("{matchExpressions: [{key: tier, operator: NotIn, values: [edge]}]}", [false, true, true]),
            ("{matchExpressions: [{key: tier, operator: Exists}]}", [true, false, false]),
            ("{matchExpressions: [{key: tier, operator: DoesNotExist}]}", [false, true, true]),
            ("{matchLabels: {app: web}, matchExpressions: [{key: tier, operator: In, values: [db]}]}", [false; 3]),
        ];
        for (yaml, want) in cases {
            let s = selector(yaml);
            assert_eq!([s.matches(&web), s.matches(&db), s.matches(&none)], want, "{yaml}");
        }
    }

    #[test]
    fn a_cluster_policy_selects_the_namespaces_its_namespace_selector_matches() {
        let yaml = "apiVersion: kubefim.io/v1alpha1\nkind: ClusterWorkloadFimPolicy\nmetadata: {name: c}\nspec:\n  \
                    selector: {}\n  namespaceSelector: {matchLabels: {kubefim.io/monitor: \"true\"}}\n  rules: [{path: /etc}]\n";
        let mut all = WorkloadPolicies::from_yaml(yaml, "t").unwrap();
        let none = labels(&[]);
        let w = |ns: Option<&'static str>| Workload { labels: &none, container_name: "c", image: "i", namespace: ns };
        assert_eq!(all.0[0].kind, PolicyKind::Cluster);
        assert!(!all.0[0].selects(&w(Some("shop"))), "nothing matches before namespaces are known");
        let namespaces: BTreeMap<String, BTreeMap<String, String>> = [
            ("shop".to_owned(), labels(&[("kubefim.io/monitor", "true")])),
            ("dev".to_owned(), labels(&[("kubefim.io/monitor", "false")])),
        ]
        .into_iter()
        .collect();
        all.resolve_namespaces(&namespaces);
        assert!(all.0[0].selects(&w(Some("shop"))));
        assert!(!all.0[0].selects(&w(Some("dev"))));
        assert!(!all.0[0].selects(&w(None)), "a container outside Kubernetes has no namespace to match");
        // Without a namespaceSelector, a cluster policy selects in every namespace.
        let every = yaml.replace("  namespaceSelector: {matchLabels: {kubefim.io/monitor: \"true\"}}\n", "");
        let every = WorkloadPolicies::from_yaml(&every, "t").unwrap();
        assert!(every.0[0].selects(&w(Some("dev"))) && every.0[0].selects(&w(None)));
    }

    #[test]
    fn namespace_fields_belong_to_their_kind() {
        let cluster_ns = "apiVersion: kubefim.io/v1alpha1\nkind: ClusterWorkloadFimPolicy\n\
                          metadata: {name: c, namespace: shop}\nspec: {selector: {}}\n";
        assert!(err(cluster_ns).contains("a cluster policy has no namespace"), "{}", err(cluster_ns));
        let workload_sel = doc("w", "  selector: {}\n  namespaceSelector: {}\n");
        assert!(
            err(&workload_sel).contains("namespaceSelector is for a ClusterWorkloadFimPolicy"),
            "{}",
            err(&workload_sel)
        );
        // The same name in both kinds is two policies.
        let both = format!(
            "{}---\napiVersion: kubefim.io/v1alpha1\nkind: ClusterWorkloadFimPolicy\nmetadata: {{name: w}}\nspec: {{selector: {{}}}}\n",
            doc("w", "  selector: {}\n")
        );
        assert_eq!(WorkloadPolicies::from_yaml(&both, "t").unwrap().iter().count(), 2);
    }

    #[test]
    fn an_empty_selector_selects_everything_and_a_missing_one_is_refused() {
        assert!(selector("{}").matches(&labels(&[])));
        assert!(selector("{}").matches(&labels(&[("a", "b")])));
        let missing = err(&doc("m", "  rules: [{path: /etc}]\n"));
        assert!(missing.contains("write `selector: {}` to select every container"), "{missing}");
    }

    #[test]
    fn requirements_are_checked_with_their_line() {
        let in_without = err(&doc("r", "  selector:\n    matchExpressions:\n      - {key: a, operator: In}\n"));
        assert!(in_without.contains("needs at least one value") && in_without.contains("line 7"), "{in_without}");
        let exists_with =
            err(&doc("r", "  selector:\n    matchExpressions:\n      - {key: a, operator: Exists, values: [x]}\n"));
        assert!(exists_with.contains("takes no values"), "{exists_with}");
        let unknown =
            err(&doc("r", "  selector:\n    matchExpressions:\n      - {key: a, operator: in, values: [x]}\n"));
        assert!(unknown.contains("unknown variant `in`") && unknown.contains("line 7"), "{unknown}");
        let key = err(&doc("r", "  selector: {matchLabel: {a: b}}\n"));
        assert!(key.contains("unknown field `matchLabel`") && key.contains("line 5"), "{key}");
    }

    #[test]
    fn selection_by_containers_images_and_namespace() {
        let l = labels(&[("app", "web")]);
        let w = |name, image, namespace| Workload { labels: &l, container_name: name, image, namespace };
        let nginx = "docker.io/library/nginx:1.25";
        let p = one(&doc(
            "p",
            "  selector: {matchLabels: {app: web}}\n  containers: [nginx]\n  images: [\"docker.io/library/nginx:*\", \"*/nginx@sha256:*\"]\n",
        ));
        assert_eq!(p.image_patterns().unwrap().len(), 2);
        assert!(p.selects(&w("nginx", nginx, None)));
        assert!(p.selects(&w("nginx", "quay.io/x/nginx@sha256:00", Some("shop"))));
        assert!(!p.selects(&w("sidecar", nginx, None)));
        assert!(!p.selects(&w("nginx", "docker.io/library/httpd:2", None)));
        let other = labels(&[("app", "db")]);
        assert!(!p.selects(&Workload { labels: &other, ..w("nginx", nginx, None) }));

        let all = one(&doc("a", "  selector: {}\n"));
        assert!(all.selects(&w("anything", "any:1", None)) && all.image_patterns().is_none());
        let no_images = err(&doc("e", "  selector: {}\n  images: []\n"));
        assert!(no_images.contains("`images: []` selects no image") && no_images.contains("line 6"), "{no_images}");
        assert!(err(&doc("e", "  selector: {}\n  containers: []\n")).contains("`containers: []` selects no container"));

        let namespaced =
            one(&format!("{HEAD}metadata: {{name: n, namespace: shop}}\nspec:\n  selector: {{}}\n")).namespace;
        let p = WorkloadPolicy { namespace: namespaced, ..all };
        assert!(p.selects(&w("c", nginx, Some("shop"))));
        assert!(!p.selects(&w("c", nginx, Some("other"))));
        assert!(!p.selects(&w("c", nginx, None)), "a namespaced policy selects only Kubernetes workloads");
        let empty_ns = err(&format!("{HEAD}metadata: {{name: n, namespace: \"\"}}\nspec: {{selector: {{}}}}\n"));
        assert!(empty_ns.contains("selects nothing"), "{empty_ns}");
    }

    #[test]
    fn for_workload_returns_every_policy_that_selects() {
        let yaml = format!(
            "{}---\n{}---\n{}",
            doc("web", "  selector: {matchLabels: {app: web}}\n"),
            doc("all", "  selector: {}\n"),
            doc("db", "  selector: {matchLabels: {app: db}}\n")
        );
        let ps = WorkloadPolicies::from_yaml(&yaml, "t").unwrap();
        let l = labels(&[("app", "web")]);
        let w = Workload { labels: &l, container_name: "c", image: "i", namespace: None };
        let names: Vec<_> = ps.for_workload(&w).iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["web", "all"]);
        assert!(!ps.is_empty() && ps.iter().count() == 3);
    }

    #[test]
    fn exemptions_cover_their_subtree_in_matching_images() {
        let p = one(&doc(
            "x",
            "  selector: {}\n  exemptions:\n    - {path: /var/cache/nginx/, image: \"*/nginx:*\"}\n    - {path: /tmp, image: \"*\"}\n",
        ));
        assert_eq!(p.exemptions()[0].path, Path::new("/var/cache/nginx"));
        assert!(p.exempt(Path::new("/var/cache/nginx"), "docker.io/library/nginx:1"));
        assert!(p.exempt(Path::new("/var/cache/nginx/a/b"), "docker.io/library/nginx:1"));
        assert!(!p.exempt(Path::new("/var/cache/nginx2"), "docker.io/library/nginx:1"));
        assert!(!p.exempt(Path::new("/var/cache/nginx/a"), "docker.io/library/httpd:2"));
        assert!(p.exempt(Path::new("/tmp/x"), "anything"));
        assert!(!p.exempt(Path::new("/etc/passwd"), "anything"));
        let rel = err(&doc("x", "  selector: {}\n  exemptions: [{path: var/cache, image: \"*\"}]\n"));
        assert!(rel.contains("must be absolute") && rel.contains("line 6"), "{rel}");
        assert!(err(&doc("x", "  selector: {}\n  exemptions: [{path: /tmp}]\n")).contains("missing field `image`"));
    }

    #[test]
    fn rules_are_validated_like_a_fim_policy_and_become_a_policy() {
        let p = one(&doc(
            "web",
            "  selector: {}\n  rules:\n    - {path: /etc/nginx, diff: true}\n    - {path: /etc/nginx/ssl, secret: true}\n  drift: {exec: true}\n",
        ));
        assert_eq!(p.policy.name, "web");
        assert!(p.drift_exec);
        assert_eq!(p.policy.rule_index_for(Path::new("/etc/nginx/ssl/key.pem")), Some(1));
        assert!(p.policy.rules[0].diff && p.policy.rules[1].secret);

        // The same rule text gives the same message as in a FimPolicy, at the same line.
        let fim = |rules: &str| {
            let yaml = format!(
                "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n{rules}"
            );
            Policy::from_yaml(&yaml, "t").unwrap_err().to_string()
        };
        let workload = |rules: &str| err(&doc("t", &format!("  rules:\n{rules}  selector: {{}}\n")));
        for rules in [
            "    - {path: etc/nginx}\n",
            "    - {path: /etc, attributes: []}\n",
            "    - {path: /etc, exclude: [\"a[b\"]}\n",
            "    - {path: /etc}\n    - {path: /etc/}\n",
        ] {
            let (w, f) = (workload(rules), fim(rules));
            assert_eq!(w, f, "{rules}");
        }
        assert!(workload("    - {path: /etc, attributes: []}\n").contains("monitors nothing"));
    }

    #[test]
    fn wrong_kinds_and_unknown_keys_are_refused() {
        let fim = "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: node}\nspec:\n  rules: [{path: /etc}]\n";
        let e = err(fim);
        assert!(e.contains("FimPolicy") && e.contains("`--policy`") && e.contains("WorkloadFimPolicy"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(
            err(&doc("k", "  selector: {}\n").replace("WorkloadFimPolicy", "Pod"))
                .contains("expected `kind: WorkloadFimPolicy`")
        );
        let typo = err(&doc("k", "  selector: {}\n  drift: {exe: true}\n"));
        assert!(typo.contains("unknown field `exe`") && typo.contains("line 6"), "{typo}");
        assert!(err(&doc("k", "  selector: {}\n  container: [a]\n")).contains("unknown field `container`"));
    }

    #[test]
    fn a_file_holds_several_documents_each_its_own_source() {
        let (a, b) = (doc("a", "  selector: {}\n"), doc("b", "  selector: {}\n  rules: [{path: /etc}]\n"));
        let yaml = format!("# policies\n---\n{a}...\n---\n---\n{b}");
        let ps = WorkloadPolicies::from_yaml(&yaml, "t").unwrap();
        let sources: Vec<_> = ps.iter().map(|p| p.policy.source()).collect();
        assert_eq!(sources, [format!("---\n{a}...\n"), format!("---\n{b}")]);
        // Errors in a later document name the line in the file.
        let bad = format!("{a}---\n{}", b.replace("/etc", "etc"));
        let line = a.lines().count() + 7;
        assert!(err(&bad).contains(&format!("line {line}")), "{} (want line {line})", err(&bad));
        // Empty input and comment-only documents hold no policy.
        assert!(WorkloadPolicies::from_yaml("", "t").unwrap().is_empty());
        assert!(WorkloadPolicies::from_yaml("# nothing\n---\n", "t").unwrap().is_empty());
    }

    #[test]
    fn document_texts_split_at_markers_only() {
        assert_eq!(document_texts("a: 1\n"), ["a: 1\n"]);
        assert_eq!(
            document_texts("%YAML 1.2\n---\na: 1\n--- # two\nb: |\n  ---x\n"),
            ["---\na: 1\n", "--- # two\nb: |\n  ---x\n"]
        );
        assert_eq!(document_texts("a: 1\n...\n# c\n...\nb: 2\n---"), ["a: 1\n...\n", "b: 2\n", "---"]);
        assert_eq!(document_texts("---- a\n"), ["---- a\n"]);
    }

    #[test]
    fn a_directory_is_read_by_name_without_hidden_or_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| fs::write(dir.path().join(name), text).unwrap();
        write("b.yml", &doc("b", "  selector: {}\n"));
        write("a.yaml", &format!("{}---\n{}", doc("a1", "  selector: {}\n"), doc("a2", "  selector: {}\n")));
        write(".hidden.yaml", "not: [a policy");
        write("notes.txt", "not a policy");
        fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        fs::create_dir(dir.path().join("..data")).unwrap();
        fs::write(dir.path().join("..data/c.yaml"), doc("c", "  selector: {}\n")).unwrap();
        // A ConfigMap volume: the visible file is a link into the hidden `..data`.
        std::os::unix::fs::symlink("..data/c.yaml", dir.path().join("c.yaml")).unwrap();
        let ps = WorkloadPolicies::load(&[dir.path().to_owned()]).unwrap();
        let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a1", "a2", "b", "c"]);

        let missing = WorkloadPolicies::load(&[dir.path().join("nope.yaml")]).unwrap_err();
        assert!(missing.to_string().contains("nope.yaml"), "{missing}");
        let big = dir.path().join("big");
        fs::write(&big, vec![b'#'; usize::try_from(MAX_POLICY_BYTES).unwrap() + 1]).unwrap();
        assert!(WorkloadPolicies::load(&[big]).unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn one_name_twice_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (one_file, two) = (dir.path().join("one.yaml"), dir.path().join("two.yaml"));
        fs::write(&one_file, format!("{HEAD}metadata: {{name: web, namespace: shop}}\nspec: {{selector: {{}}}}\n"))
            .unwrap();
        fs::write(&two, format!("{HEAD}metadata: {{name: web, namespace: shop}}\nspec: {{selector: {{}}}}\n")).unwrap();
        let e = WorkloadPolicies::load(&[one_file.clone(), two.clone()]).unwrap_err().to_string();
        assert!(e.contains(&one_file.display().to_string()) && e.contains(&two.display().to_string()), "{e}");
        assert!(e.contains("shop/web"), "{e}");
        // The same name in another namespace, or without one, is another policy.
        fs::write(
            &two,
            format!(
                "{HEAD}metadata: {{name: web, namespace: blog}}\nspec: {{selector: {{}}}}\n---\n{}",
                doc("web", "  selector: {}\n")
            ),
        )
        .unwrap();
        assert_eq!(WorkloadPolicies::load(&[one_file, two]).unwrap().iter().count(), 3);
        let twice = format!("{}---\n{}", doc("web", "  selector: {}\n"), doc("web", "  selector: {}\n"));
        assert!(err(&twice).contains("defined twice in this file"));
    }

    #[test]
    fn a_source_that_defines_a_gathered_name_is_refused_whole_and_the_rest_stays() {
        let source = |origin: &str, names: &[&str]| {
            let text: Vec<String> = names.iter().map(|n| doc(n, "  selector: {}\n")).collect();
            WorkloadPolicies::from_yaml(&text.join("---\n"), origin).unwrap()
        };
        let mut all = Gathered::new(source("files", &["a", "b"]));
        all.add(source("object c", &["c"])).unwrap();
        let e = all.add(source("object d", &["d", "b"])).unwrap_err().to_string();
        assert!(e.contains("object d") && e.contains("also defined in files"), "{e}");
        all.add(source("object e", &["e"])).unwrap();
        let names: Vec<String> = all.finish().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["a", "b", "c", "e"], "d came with b, so neither was taken");
    }

    #[test]
    fn the_shipped_example_loads() {
        let ps = WorkloadPolicies::from_yaml(include_str!("../../policies/workload-example.yaml"), "example").unwrap();
        let p = ps.iter().next().unwrap();
        assert_eq!(p.qualified_name(), "shop/web");
        let l = labels(&[("app", "web"), ("tier", "frontend")]);
        let w = Workload {
            labels: &l,
            container_name: "nginx",
            image: "docker.io/library/nginx:1.25",
            namespace: Some("shop"),
        };
        assert!(p.selects(&w) && p.drift_exec);
        assert!(p.exempt(Path::new("/var/cache/nginx/proxy_temp/1"), w.image));
        assert!(p.policy.rules.iter().any(|r| r.secret));
    }
}
