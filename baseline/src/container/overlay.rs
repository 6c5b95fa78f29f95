//! A container's root file system as overlayfs describes it: the image's layers (lower, top
//! first) and the container's own layer (upper), read from the super options of the root
//! mount in the container's mount table, and what overlay writes into a layer to record a
//! deletion (whiteouts), a directory that hides everything below it (opaque) and its other
//! bookkeeping (its own xattrs, which are never the file's).
//!
//! The layers' paths are host paths. Runtimes write them three ways: absolute (podman, CRI-O:
//! often the short `overlay/l/<ID>` links), relative to the directory containerd changed into
//! when the option string grew long (`compactLowerdirOption`: resolved against the upper
//! layer's snapshots directory), and with `:` inside a path escaped. Each layer is also known
//! by its identity (device and inode of its directory), which is what the layer cache keys on:
//! a link and its target are one layer.

use std::ffi::{CStr, OsString};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Stat};

use crate::beneath;
use crate::mounts::unescape;
use crate::root::HostRoot;

/// Overlay's own extended attributes, in the trusted (root-made mounts) and user (rootless,
/// `userxattr`) name spaces: bookkeeping, never a file's attribute.
const OVERLAY_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];

/// One layer of an image, as a host path and its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The layer's directory on the host (links resolved), as the agent reaches it.
    pub dir: PathBuf,
    /// Device and inode of that directory: the same layer however its path was written.
    pub id: (u64, u64),
}

/// A container's root: its image's layers and its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayRoot {
    /// The image's layers, top first.
    pub lower: Vec<Layer>,
    /// The container's layer (what it wrote, copied up or deleted).
    pub upper: PathBuf,
    /// Whether `metacopy=on`: a copied-up file may hold only metadata, its data below.
    pub metacopy: bool,
}

/// Why a container's root could not be read as an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// The root is not an overlay (a VM-based runtime, a plain bind mount...).
    #[error(
        "the container's root is not an overlay mount (file system type {0}): it cannot be checked against its image"
    )]
    NotOverlay(String),
    /// The root has no upper layer (a read-only root): nothing of the container's own.
    #[error("the container's root overlay has no upper layer (read-only root file system)")]
    NoUpper,
    /// An option is missing or a layer cannot be reached.
    #[error("{0}")]
    Layer(String),
}

/// Splits `lowerdir=`'s value into layer paths: `:` separates layers, `\:` (or a `:`
/// escaped in octal by mountinfo) is part of a path, and `::` marks data-only layers, which
/// hold the data of metacopy files and are not part of the merged tree (skipped).
fn split_lowerdir(raw: &str) -> Vec<PathBuf> {
    let mut layers = Vec::new();
    let mut data_only = false;
    for part in split_unescaped_colons(raw) {
        if part.is_empty() {
            // `a::b`: what follows the double colon is data-only.
            data_only = true;
            continue;
        }
        if !data_only {
            layers.push(unescape_colons(&unescape(&part)));
        }
    }
    layers
}

/// Splits at `:` not preceded by a backslash.
fn split_unescaped_colons(raw: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in raw.chars() {
        match c {
            ':' if !escaped => parts.push(String::new()),
            _ => parts.last_mut().expect("one part at least").push(c),
        }
        escaped = c == '\\' && !escaped;
    }
    parts
}

/// `\:` in a layer path is a colon.
fn unescape_colons(path: &Path) -> PathBuf {
    let b = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b':') {
            out.push(b':');
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// The value of each `key=value` super option, split at commas (commas inside values are
/// escaped by mountinfo).
fn option<'a>(options: &'a str, key: &str) -> Option<&'a str> {
    options.split(',').find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
}

impl OverlayRoot {
    /// Reads a container's root from the mount at `/` of its mount table (`fs_type`,
    /// `super_options` as mountinfo shows them). Layer paths are host paths, reached under
    /// `host`.
    pub fn from_mount(fs_type: &str, super_options: &str, host: &HostRoot) -> Result<OverlayRoot, OverlayError> {
        if fs_type != "overlay" {
            return Err(OverlayError::NotOverlay(fs_type.to_owned()));
        }
        let upper = option(super_options, "upperdir").ok_or(OverlayError::NoUpper)?;
        let upper = unescape_colons(&unescape(upper));
        if !upper.is_absolute() {
            return Err(OverlayError::Layer(format!("upperdir {} is not absolute", upper.display())));
        }
        // containerd's relative lowerdirs are relative to its snapshots directory, the one
        // that holds `<n>/fs` of the upper layer too.
        let snapshots = upper.parent().and_then(Path::parent).map(Path::to_owned);
        let mut raw_lower: Vec<PathBuf> = Vec::new();
        for o in super_options.split(',') {
            if let Some(v) = o.strip_prefix("lowerdir=") {
                raw_lower.extend(split_lowerdir(v));
            } else if let Some(v) = o.strip_prefix("lowerdir+=") {
                // The new mount API adds one layer an option, `:` not special.
                raw_lower.push(unescape(v));
            }
        }
        if raw_lower.is_empty() {
            return Err(OverlayError::Layer("the overlay names no lowerdir".into()));
        }
        let mut lower = Vec::with_capacity(raw_lower.len());
        for raw in raw_lower {
            let path = if raw.is_absolute() {
                raw
            } else {
                let Some(base) = &snapshots else {
                    return Err(OverlayError::Layer(format!("relative lowerdir {} and no base", raw.display())));
                };
                base.join(raw)
            };
            lower.push(Layer::at(&host.disk(&path))?);
        }
        let metacopy = option(super_options, "metacopy") == Some("on");
        Ok(OverlayRoot { lower, upper: host.disk(&upper).into_owned(), metacopy })
    }
}

impl Layer {
    /// The layer whose directory is `disk` (a link such as podman's `l/<ID>` resolved).
    pub fn at(disk: &Path) -> Result<Layer, OverlayError> {
        let dir = std::fs::canonicalize(disk)
            .map_err(|e| OverlayError::Layer(format!("cannot reach image layer {}: {e}", disk.display())))?;
        let meta = std::fs::metadata(&dir)
            .map_err(|e| OverlayError::Layer(format!("cannot stat image layer {}: {e}", dir.display())))?;
        Ok(Layer { dir, id: (meta.dev(), meta.ino()) })
    }
}

/// Whether an xattr name is overlay's own.
pub fn is_overlay_xattr(name: &[u8]) -> bool {
    OVERLAY_XATTR_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Overlay's xattr `name` (`opaque`, `whiteout`, `metacopy`, `redirect`) on the file at
/// `path` (not followed), in either name space.
pub fn overlay_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    ["trusted.overlay.", "user.overlay."]
        .into_iter()
        .find_map(|ns| xattr::get(path, format!("{ns}{name}")).ok().flatten())
}

/// What a layer's entry says about the merged tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// An ordinary entry.
    Entry,
    /// A deletion of whatever lower layers hold at this path: a character device 0/0, or a
    /// file with overlay's `whiteout` xattr.
    Whiteout,
    /// A directory that hides what lower layers hold below it.
    Opaque,
}

/// What the entry `name` of the layer directory `dir` (already `lstat`ed as `st`) marks.
pub fn marker_at(dir: BorrowedFd<'_>, name: &CStr, st: &Stat) -> Marker {
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind == FileType::CharacterDevice && st.st_rdev == 0 {
        return Marker::Whiteout;
    }
    let path = || beneath::path_at(dir, name);
    if kind == FileType::RegularFile && st.st_size == 0 && overlay_xattr(&path(), "whiteout").is_some() {
        return Marker::Whiteout;
    }
    if kind == FileType::Directory && overlay_xattr(&path(), "opaque").is_some_and(|v| v == b"y" || v == b"x") {
        return Marker::Opaque;
    }
    Marker::Entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowerdir_values_split_at_unescaped_colons_and_skip_data_only_layers() {
        assert_eq!(split_lowerdir("/a:/b:/c"), [PathBuf::from("/a"), "/b".into(), "/c".into()]);
        assert_eq!(split_lowerdir(r"/a\:x:/b"), [PathBuf::from("/a:x"), "/b".into()]);
        assert_eq!(split_lowerdir(r"/a\072x:/b"), [PathBuf::from("/a:x"), "/b".into()]);
        assert_eq!(split_lowerdir("/a:/b::/data"), [PathBuf::from("/a"), "/b".into()]);
        assert_eq!(split_lowerdir(r"/with\040space"), [PathBuf::from("/with space")]);
    }

    #[test]
    fn a_relative_lowerdir_is_resolved_against_the_snapshots_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let snaps = tmp.path().join("snapshots");
        for n in ["1/fs", "2/fs", "3/fs"] {
            std::fs::create_dir_all(snaps.join(n)).unwrap();
        }
        let opts = format!("rw,lowerdir=2/fs:1/fs,upperdir={0}/3/fs,workdir={0}/3/work,index=off", snaps.display());
        let root = OverlayRoot::from_mount("overlay", &opts, &HostRoot::default()).unwrap();
        let dirs: Vec<_> = root.lower.iter().map(|l| l.dir.clone()).collect();
        let snaps = std::fs::canonicalize(&snaps).unwrap();
        assert_eq!(dirs, [snaps.join("2/fs"), snaps.join("1/fs")]);
        assert_eq!(root.upper, tmp.path().join("snapshots/3/fs"));
    }

    #[test]
    fn a_link_to_a_layer_is_the_layer() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("abc/diff")).unwrap();
        std::fs::create_dir_all(tmp.path().join("l")).unwrap();
        std::os::unix::fs::symlink("../abc/diff", tmp.path().join("l/SHORT")).unwrap();
        let by_link = Layer::at(&tmp.path().join("l/SHORT")).unwrap();
        let direct = Layer::at(&tmp.path().join("abc/diff")).unwrap();
        assert_eq!(by_link, direct);
    }

    #[test]
    fn roots_that_are_not_overlays_or_have_no_upper_layer_say_so() {
        let host = HostRoot::default();
        assert!(matches!(OverlayRoot::from_mount("ext4", "rw", &host), Err(OverlayError::NotOverlay(_))));
        assert!(matches!(OverlayRoot::from_mount("overlay", "ro,lowerdir=/a:/b", &host), Err(OverlayError::NoUpper)));
    }

    #[test]
    fn overlay_xattrs_are_told_from_the_files_own() {
        assert!(is_overlay_xattr(b"trusted.overlay.origin"));
        assert!(is_overlay_xattr(b"user.overlay.whiteout"));
        assert!(!is_overlay_xattr(b"security.capability"));
        assert!(!is_overlay_xattr(b"user.overlayish"));
    }
}
