//! Where a policy's paths are on disk. A policy names host paths (`/etc/passwd`); an agent in
//! a container sees the host's root file system mounted somewhere (`/host`), so every path
//! is read at `<root>/etc/passwd` and recorded, reported and signed as `/etc/passwd`. This
//! module owns the two directions of that mapping and nothing else.

use std::borrow::Cow;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The directory the policy's `/` is at; `/` itself (the default) maps paths to themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostRoot(Option<PathBuf>);

impl HostRoot {
    /// Paths are where they say.
    pub fn identity() -> Self {
        HostRoot(None)
    }

    /// Whether paths are where they say (no `--host-root`): this process sees the host's
    /// files in its own mount namespace.
    pub fn is_identity(&self) -> bool {
        self.0.is_none()
    }

    /// The host's root mounted at `dir`: an existing directory, given as an absolute path
    /// without `..` (symlinks in it are resolved once, here, so the prefix is stable).
    pub fn new(dir: &Path) -> Result<Self> {
        let bad = |source| Error::HostRoot { path: dir.to_owned(), source };
        if !dir.is_absolute() || dir.components().any(|c| c == Component::ParentDir) {
            return Err(bad(std::io::Error::other("not an absolute path without `..`")));
        }
        let canonical = std::fs::canonicalize(dir).map_err(bad)?;
        if !canonical.is_dir() {
            return Err(bad(std::io::Error::other("not a directory")));
        }
        Ok(if canonical == Path::new("/") { HostRoot(None) } else { HostRoot(Some(canonical)) })
    }

    /// The mount point, unless paths map to themselves.
    pub fn dir(&self) -> Option<&Path> {
        self.0.as_deref()
    }

    /// Where the policy path `path` (absolute) is on disk.
    pub fn disk<'a>(&self, path: &'a Path) -> Cow<'a, Path> {
        match &self.0 {
            None => Cow::Borrowed(path),
            Some(root) => Cow::Owned(root.join(path.strip_prefix("/").unwrap_or(path))),
        }
    }

    /// The policy path of the on-disk path `disk`; `None` if it is outside the root.
    pub fn logical<'a>(&self, disk: &'a Path) -> Option<Cow<'a, Path>> {
        match &self.0 {
            None => Some(Cow::Borrowed(disk)),
            Some(root) => disk.strip_prefix(root).ok().map(|rel| Cow::Owned(Path::new("/").join(rel))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_both_ways_and_refuses_what_is_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = HostRoot::new(dir.path()).unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(root.disk(Path::new("/etc/passwd")), base.join("etc/passwd"));
        assert_eq!(root.disk(Path::new("/")), base);
        assert_eq!(root.logical(&base.join("etc/passwd")).unwrap(), Path::new("/etc/passwd"));
        assert_eq!(root.logical(&base).unwrap(), Path::new("/"));
        assert!(root.logical(Path::new("/etc/passwd")).is_none());
        let same = HostRoot::new(Path::new("/")).unwrap();
        assert_eq!(same, HostRoot::identity());
        assert_eq!(same.disk(Path::new("/etc")), Path::new("/etc"));
    }

    #[test]
    fn refuses_relative_missing_and_non_directories() {
        let refusal = |dir: &Path| crate::error::chain(&HostRoot::new(dir).unwrap_err());
        let e = refusal(Path::new("host"));
        assert!(
            e.contains("cannot use host as the host root") && e.ends_with("not an absolute path without `..`"),
            "{e}"
        );
        let e = refusal(Path::new("/nonexistent-kubefim-root"));
        assert!(e.contains("/nonexistent-kubefim-root") && e.contains("No such file or directory"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = refusal(file.path());
        assert!(e.contains("--host-root") && e.ends_with(": not a directory"), "{e}");
    }
}
