//! The FimPolicy: which paths kubefim watches and, per rule, which attributes it compares,
//! what it excludes, and whether it keeps content for diffs or treats it as secret. Parsing
//! validates everything (unknown keys, relative paths, bad globs) so that a bad policy fails
//! with the line it is on; nothing here touches the file system.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use schemars::JsonSchema;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The policy shipped in the binary: a Kubernetes worker node.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/node.yaml");

/// One attribute of a file that a rule can monitor. The names are the contract of the JSON
/// reports (`changed: [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attribute {
    /// The file type (file, dir, symlink, ...).
    Type,
    /// The BLAKE3 hash of the content.
    Content,
    /// The size in bytes.
    Size,
    /// Permission bits, including setuid, setgid and sticky.
    Mode,
    /// Owner user id.
    Uid,
    /// Owner group id.
    Gid,
    /// Modification time.
    Mtime,
    /// Status change time.
    Ctime,
    /// Inode number.
    Inode,
    /// Hard link count.
    Nlink,
    /// Target of a symbolic link.
    LinkTarget,
    /// Extended attributes (including security.* labels, capabilities and POSIX ACLs).
    Xattrs,
    /// Inode flags set with `chattr` (immutable, append-only, ...).
    Flags,
}

impl Attribute {
    /// Every attribute, in report order.
    pub const ALL: [Attribute; 13] = [
        Attribute::Type,
        Attribute::Content,
        Attribute::Size,
        Attribute::Mode,
        Attribute::Uid,
        Attribute::Gid,
        Attribute::Mtime,
        Attribute::Ctime,
        Attribute::Inode,
        Attribute::Nlink,
        Attribute::LinkTarget,
        Attribute::Xattrs,
        Attribute::Flags,
    ];

    /// The name used in reports and policies (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            Attribute::Type => "type",
            Attribute::Content => "content",
            Attribute::Size => "size",
            Attribute::Mode => "mode",
            Attribute::Uid => "uid",
            Attribute::Gid => "gid",
            Attribute::Mtime => "mtime",
            Attribute::Ctime => "ctime",
            Attribute::Inode => "inode",
            Attribute::Nlink => "nlink",
            Attribute::LinkTarget => "link_target",
            Attribute::Xattrs => "xattrs",
            Attribute::Flags => "flags",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of attributes, as a rule monitors them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeSet(u16);

impl AttributeSet {
    /// Every attribute.
    pub fn all() -> Self {
        AttributeSet(Attribute::ALL.iter().fold(0, |acc, a| acc | a.bit()))
    }

    /// The set without `attr`.
    pub fn without(self, attr: Attribute) -> Self {
        AttributeSet(self.0 & !attr.bit())
    }

    /// Whether `attr` is in the set.
    pub fn contains(self, attr: Attribute) -> bool {
        self.0 & attr.bit() != 0
    }

    /// The attributes of the set, in report order.
    pub fn iter(self) -> impl Iterator<Item = Attribute> {
        Attribute::ALL.into_iter().filter(move |a| self.contains(*a))
    }
}

impl FromIterator<Attribute> for AttributeSet {
    fn from_iter<I: IntoIterator<Item = Attribute>>(iter: I) -> Self {
        AttributeSet(iter.into_iter().fold(0, |acc, a| acc | a.bit()))
    }
}

/// One validated rule of a policy.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The absolute, normalised path the rule covers (a directory or a file).
    pub path: PathBuf,
    /// The attributes compared for paths under this rule.
    pub attributes: AttributeSet,
    /// Keep the content of text files (<= [`MAX_DIFF_CONTENT`]) for unified diffs.
    pub diff: bool,
    /// Never store or print the content of these files.
    pub secret: bool,
    /// The exclude patterns as written, for display.
    pub exclude_patterns: Vec<String>,
    name_globs: GlobSet,
    path_globs: GlobSet,
}

/// The largest policy read: four times what a ConfigMap holds (1 MiB) and some 150,000
/// rules. Parsing YAML costs about 40 bytes of memory per byte of text, so without a bound a
/// 100 MB file took 4.1 GB.
pub const MAX_POLICY_BYTES: u64 = 4 << 20;

pub(crate) fn too_big() -> String {
    format!(
        "the policy is larger than {} MiB, the most kubefim reads; cover the paths with fewer rules \
         (a rule covers its whole subtree)",
        MAX_POLICY_BYTES >> 20
    )
}

/// The largest file whose content a `diff: true` rule keeps.
pub const MAX_DIFF_CONTENT: u64 = 1 << 20;

impl Rule {
    /// Whether `path` (below or at this rule's root) is excluded by the rule's globs. A
    /// pattern without `/` matches the file name; one with `/` matches the whole path.
    pub fn excludes(&self, path: &Path) -> bool {
        if self.path_globs.is_match(path) {
            return true;
        }
        match path.file_name() {
            Some(name) => self.name_globs.is_match(name),
            None => false,
        }
    }

    /// Whether content of this file should be kept for diffs (before the text check).
    pub fn keeps_content(&self, size: u64) -> bool {
        self.diff && !self.secret && size <= MAX_DIFF_CONTENT && self.attributes.contains(Attribute::Content)
    }
}

/// A validated policy: its name, its rules, and the YAML it came from (which is what the
/// baseline stores and signs, so verify uses exactly the policy the baseline was made with).
#[derive(Debug, Clone)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// The rules, in the order written.
    pub rules: Vec<Rule>,
    /// Each rule's index by its root: the rule for a path is found by looking up the path's
    /// ancestors (depth look-ups), not by comparing it with every rule (a scan of a policy of
    /// thousands of rules spent its time there).
    roots: HashMap<PathBuf, usize>,
    source: String,
}

impl Policy {
    /// Parses and validates a policy. `origin` names it in errors (a path or "embedded").
    pub fn from_yaml(source: &str, origin: &str) -> Result<Policy> {
        let bad = |message: String| Error::Policy { origin: origin.to_owned(), message };
        if source.len() as u64 > MAX_POLICY_BYTES {
            return Err(bad(too_big()));
        }
        let doc: PolicyDoc = serde_norway::from_str(source).map_err(|e| bad(e.to_string()))?;
        build(doc.metadata.name, doc.spec.rules, source, bad)
    }

    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        use std::io::Read;
        let read_err = |source| Error::PolicyRead { path: path.to_owned(), source };
        let file = std::fs::File::open(path).map_err(read_err)?;
        // Never more than the limit and a byte in memory, whatever the file (or device) is.
        let mut source = String::new();
        file.take(MAX_POLICY_BYTES + 1).read_to_string(&mut source).map_err(read_err)?;
        if source.len() as u64 > MAX_POLICY_BYTES {
            return Err(Error::Policy { origin: path.display().to_string(), message: too_big() });
        }
        Policy::from_yaml(&source, &path.display().to_string())
    }

    /// The policy shipped in the binary.
    pub fn embedded_default() -> Policy {
        Policy::from_yaml(DEFAULT_POLICY, "embedded default policy").expect("the shipped policy is valid (tested)")
    }

    /// The YAML text this policy was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The index of the rule that governs `path`: the rule with the longest root that is
    /// `path` or one of its ancestors.
    pub fn rule_index_for(&self, path: &Path) -> Option<usize> {
        // The nearest ancestor (or the path itself) that is a rule's root has the longest root.
        path.ancestors().find_map(|a| self.roots.get(a).copied())
    }

    /// Whether `path` is the root of a rule other than `rule` (so the walk of `rule` leaves
    /// that subtree to the more specific rule).
    pub fn is_other_rule_root(&self, path: &Path, rule: usize) -> bool {
        self.roots.get(path).is_some_and(|&i| i != rule)
    }
}

/// Builds a policy from rules already validated while deserialising: compiles the exclude
/// globs and refuses two rules with one root. Shared with the workload policies (whose rules
/// are paths inside a container), so both kinds validate rules alike and say so in the same
/// words. `bad` turns a message into the caller's error, naming where the policy came from.
pub(crate) fn build(
    name: String,
    raw_rules: Vec<RawRule>,
    source: &str,
    bad: impl Fn(String) -> Error,
) -> Result<Policy> {
    let mut rules = Vec::with_capacity(raw_rules.len());
    // Roots seen so far, for the duplicate check: a set, so that a policy of n rules loads
    // in O(n), not O(n^2) comparisons of paths (8,000 rules took 12 s).
    let mut roots = HashMap::with_capacity(raw_rules.len());
    for raw in raw_rules {
        let (name_globs, path_globs) =
            raw.exclude.iter().fold((GlobSetBuilder::new(), GlobSetBuilder::new()), |(mut names, mut paths), p| {
                if p.0.contains('/') {
                    paths.add(p.1.clone());
                } else {
                    names.add(p.1.clone());
                }
                (names, paths)
            });
        let compile = |b: GlobSetBuilder| b.build().map_err(|e| bad(format!("rule {}: {e}", raw.path.0.display())));
        let rule = Rule {
            attributes: match &raw.attributes {
                Some(list) => list.0.iter().copied().collect(),
                None => AttributeSet::all(),
            },
            diff: raw.diff,
            secret: raw.secret,
            exclude_patterns: raw.exclude.iter().map(|p| p.0.clone()).collect(),
            name_globs: compile(name_globs)?,
            path_globs: compile(path_globs)?,
            path: raw.path.0,
        };
        if roots.insert(rule.path.clone(), rules.len()).is_some() {
            return Err(bad(format!("spec.rules: path {} appears in two rules; merge them", rule.path.display())));
        }
        rules.push(rule);
    }
    Ok(Policy { name, rules, roots, source: source.to_owned() })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    #[serde(rename = "apiVersion")]
    #[expect(dead_code, reason = "validated by deserialising into the single-variant enum")]
    api_version: ApiVersion,
    #[expect(dead_code, reason = "validated by deserialising into the single-variant enum")]
    kind: Kind,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
pub(crate) enum ApiVersion {
    #[serde(rename = "kubefim.io/v1alpha1")]
    V1Alpha1,
}

#[derive(Deserialize)]
enum Kind {
    FimPolicy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted so the policy can live in a ConfigMap or CRD")]
    namespace: Option<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted so the policy can live in a ConfigMap or CRD")]
    labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    #[expect(dead_code, reason = "accepted so the policy can live in a ConfigMap or CRD")]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    #[serde(default)]
    rules: Vec<RawRule>,
}

/// A rule as written, its path, globs and attributes validated while deserialising (so an
/// error names the line); [`build`] makes it a [`Rule`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    path: RulePath,
    #[serde(default)]
    exclude: Vec<ExcludePattern>,
    #[serde(default)]
    attributes: Option<AttributeList>,
    #[serde(default)]
    diff: bool,
    #[serde(default)]
    secret: bool,
}

/// An absolute, normalised path; validated while deserialising so the error has a line.
pub(crate) struct RulePath(pub(crate) PathBuf);

impl<'de> Deserialize<'de> for RulePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.contains('\0') {
            // No file name holds a NUL: the path would be cut short where the kernel sees it.
            return Err(de::Error::custom(format!("path {raw:?} contains a NUL byte, which no path can hold")));
        }
        normalise_absolute(Path::new(&raw))
            .map(RulePath)
            .ok_or_else(|| de::Error::custom(format!("path {raw:?} must be absolute and must not contain `..`")))
    }
}

/// A rule's `attributes`: at least one. Validated while deserialising so the error has a line.
struct AttributeList(Vec<Attribute>);

impl<'de> Deserialize<'de> for AttributeList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<Attribute>::deserialize(d)?;
        if list.is_empty() {
            // A rule that compares nothing would report nothing, ever: surely not what was meant.
            return Err(de::Error::custom(
                "`attributes: []` monitors nothing; name at least one attribute, or leave the key out to monitor all",
            ));
        }
        Ok(AttributeList(list))
    }
}

/// A compiled exclude glob; validated while deserialising so the error has a line.
struct ExcludePattern(String, globset::Glob);

impl<'de> Deserialize<'de> for ExcludePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.contains('\0') {
            return Err(de::Error::custom(format!("exclude {raw:?} contains a NUL byte, which no path can hold")));
        }
        let glob = GlobBuilder::new(&raw)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| de::Error::custom(format!("bad exclude glob {raw:?}: {}", e.kind())))?;
        Ok(ExcludePattern(raw, glob))
    }
}

/// Returns the path without `.` components and trailing slashes, or None if it is relative
/// or has `..` (which could point outside what the rule seems to cover).
pub fn normalise_absolute(path: &Path) -> Option<PathBuf> {
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// The bytes of a path, for keys and JSON.
pub fn path_bytes(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

/// A path from its bytes.
pub fn path_from_bytes(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - path: /etc/\n      exclude: [\"*.swp\", \"/etc/mtab\"]\n      attributes: [content, mode]\n      diff: true\n    - path: /etc/kubernetes\n";

    #[test]
    fn parses_and_picks_the_most_specific_rule() {
        let p = Policy::from_yaml(GOOD, "t").unwrap();
        assert_eq!(p.rules[0].path, Path::new("/etc"));
        assert!(p.rules[0].attributes.contains(Attribute::Mode));
        assert!(!p.rules[0].attributes.contains(Attribute::Uid));
        assert!(p.rules[1].attributes.contains(Attribute::Xattrs));
        assert_eq!(p.rule_index_for(Path::new("/etc/kubernetes/a")), Some(1));
        assert_eq!(p.rule_index_for(Path::new("/etc/kubernetesx")), Some(0));
        assert_eq!(p.rule_index_for(Path::new("/usr")), None);
        assert!(p.rules[0].excludes(Path::new("/etc/a/b.swp")));
        assert!(p.rules[0].excludes(Path::new("/etc/mtab")));
        assert!(!p.rules[0].excludes(Path::new("/etc/mtab2")));
    }

    fn err(yaml: &str) -> String {
        Policy::from_yaml(yaml, "t").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line() {
        let unknown = GOOD.replace("diff: true", "dif: true");
        assert!(err(&unknown).contains("line 9"), "{}", err(&unknown));
        let glob = GOOD.replace("*.swp", "a[b");
        assert!(err(&glob).contains("line 7"), "{}", err(&glob));
        let rel = GOOD.replace("/etc/kubernetes", "etc/kubernetes");
        assert!(err(&rel).contains("line 10"), "{}", err(&rel));
        let missing = GOOD.replace("- path: /etc/kubernetes", "- diff: false");
        assert!(err(&missing).contains("missing field `path`"), "{}", err(&missing));
        assert!(err(&missing).contains("line 10"), "{}", err(&missing));
        let attr = GOOD.replace("[content, mode]", "[content, colour]");
        assert!(err(&attr).contains("line 8"), "{}", err(&attr));
        assert!(err(&GOOD.replace("v1alpha1", "v9")).contains("line 1"));
    }

    #[test]
    fn shipped_policies_are_valid() {
        Policy::embedded_default();
        for f in ["control-plane.yaml", "demo.yaml"] {
            Policy::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies").join(f)).unwrap();
        }
    }

    #[test]
    fn empty_rules_are_valid() {
        let p = Policy::from_yaml(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: e}\nspec: {rules: []}\n",
            "t",
        )
        .unwrap();
        assert!(p.rules.is_empty());
    }
}
