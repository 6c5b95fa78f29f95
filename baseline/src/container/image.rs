//! An image as the container's baseline: the merged view of its layers (top first), with
//! overlay's rules applied as the kernel applies them: the topmost layer that has an entry at
//! a path wins; a whiteout there deletes it; a directory marked opaque hides what lower layers
//! hold below it; a non-directory on the way hides everything below its path. Every lookup
//! goes from the layer's directory one component at a time without following a symlink
//! (`O_NOFOLLOW`): a layer is a tenant's content, and a symlink in it must never lead the
//! agent elsewhere on the host.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{FileType, Mode, OFlags, Stat};

use super::overlay::{Layer, Marker, marker_at};
use crate::beneath;

/// The image's file at a path: the layer that provides it, its directory there (open) and
/// its name.
#[derive(Debug)]
pub struct Found {
    /// Index of the layer in [`Image::layers`] (0 is the top).
    pub layer: usize,
    /// The directory holding it in that layer.
    pub parent: OwnedFd,
    /// Its name there.
    pub name: CString,
    /// Its status (not followed).
    pub stat: Stat,
}

/// A merged directory listing entry: which layer provides the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedIn {
    /// The providing layer.
    pub layer: usize,
    /// Whether it is a directory there.
    pub is_dir: bool,
}

/// An image's layers.
#[derive(Debug, Clone)]
pub struct Image {
    /// Top first.
    pub layers: Vec<Layer>,
}

/// In one layer: the directory `rel_dir` if the layer has it, and whether the layer hides
/// what lower layers hold there.
enum DirInLayer {
    /// The layer has it (open), and it is opaque (`true`) or not.
    Here(OwnedFd, bool),
    /// The layer has nothing there; lower layers may.
    Absent,
    /// The layer deletes or replaces it (a whiteout, a non-directory, an opaque directory
    /// above it without it): nothing from this layer down.
    Masked,
}

fn components(rel: &Path) -> io::Result<Vec<CString>> {
    rel.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(CString::new(n.as_bytes()).map_err(|_| io::Error::other("a NUL in a path"))),
            _ => None,
        })
        .collect()
}

const DIR: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

impl Image {
    /// Walks `parts` (directories) down `layer`.
    fn dir_in(&self, layer: usize, parts: &[CString]) -> io::Result<DirInLayer> {
        let mut cur: OwnedFd = rustix::fs::open(&self.layers[layer].dir, DIR, Mode::empty())?;
        let mut opaque = false;
        for part in parts {
            let st = match beneath::lstat_at(cur.as_fd(), part) {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(if opaque { DirInLayer::Masked } else { DirInLayer::Absent });
                }
                Err(e) => return Err(e),
            };
            if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                // A whiteout, a file or a symlink where a directory would be: nothing below.
                return Ok(DirInLayer::Masked);
            }
            opaque = marker_at(cur.as_fd(), part, &st) == Marker::Opaque;
            cur = rustix::fs::openat(&cur, part.as_c_str(), DIR, Mode::empty())?;
        }
        Ok(DirInLayer::Here(cur, opaque))
    }

    /// The image's entry at `rel` (a path inside the container, without the leading `/`);
    /// `None` when the image has nothing there.
    pub fn lookup(&self, rel: &Path) -> io::Result<Option<Found>> {
        let mut parts = components(rel)?;
        let Some(name) = parts.pop() else { return Ok(None) };
        for layer in 0..self.layers.len() {
            let (dir, opaque) = match self.dir_in(layer, &parts)? {
                DirInLayer::Here(dir, opaque) => (dir, opaque),
                DirInLayer::Absent => continue,
                DirInLayer::Masked => return Ok(None),
            };
            match beneath::lstat_at(dir.as_fd(), &name) {
                Ok(stat) => {
                    if marker_at(dir.as_fd(), &name, &stat) == Marker::Whiteout {
                        return Ok(None);
                    }
                    return Ok(Some(Found { layer, parent: dir, name, stat }));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if opaque {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The merged listing of the image's directory `rel`: each name the merged view shows,
    /// with the layer that provides it.
    pub fn list(&self, rel: &Path) -> io::Result<BTreeMap<CString, ListedIn>> {
        let parts = components(rel)?;
        let mut seen: BTreeMap<CString, Option<ListedIn>> = BTreeMap::new();
        for layer in 0..self.layers.len() {
            let (dir, opaque) = match self.dir_in(layer, &parts)? {
                DirInLayer::Here(dir, opaque) => (dir, opaque),
                DirInLayer::Absent => continue,
                DirInLayer::Masked => break,
            };
            for entry in beneath::read_dir(dir.as_fd())? {
                if seen.contains_key(&entry.name) {
                    continue;
                }
                let stat = beneath::lstat_at(dir.as_fd(), &entry.name)?;
                let shown = (marker_at(dir.as_fd(), &entry.name, &stat) != Marker::Whiteout).then_some(ListedIn {
                    layer,
                    is_dir: FileType::from_raw_mode(stat.st_mode) == FileType::Directory,
                });
                seen.insert(entry.name, shown);
            }
            if opaque {
                break;
            }
        }
        Ok(seen.into_iter().filter_map(|(name, shown)| Some((name, shown?))).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;

    use super::*;

    /// Layers built in a temporary directory, top first; whiteouts as overlay's xattr form
    /// (a character device needs root; the tests of real containers cover that form).
    fn image(tmp: &Path, layers: &[&[(&str, &str)]]) -> Image {
        let mut out = Vec::new();
        for (i, entries) in layers.iter().enumerate() {
            let dir = tmp.join(format!("layer{i}"));
            fs::create_dir_all(&dir).unwrap();
            for (path, what) in *entries {
                let p = dir.join(path);
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                match *what {
                    "dir" => fs::create_dir_all(&p).unwrap(),
                    "opaque" => {
                        fs::create_dir_all(&p).unwrap();
                        xattr::set(&p, "user.overlay.opaque", b"y").unwrap();
                    }
                    "whiteout" => {
                        fs::write(&p, "").unwrap();
                        xattr::set(&p, "user.overlay.whiteout", b"").unwrap();
                    }
                    link if link.starts_with("->") => std::os::unix::fs::symlink(&link[2..], &p).unwrap(),
                    text => fs::write(&p, text).unwrap(),
                }
            }
            out.push(Layer::at(&dir).unwrap());
        }
        Image { layers: out }
    }

    fn content(image: &Image, rel: &str) -> Option<String> {
        let found = image.lookup(Path::new(rel)).unwrap()?;
        let file = beneath::open_file_at(found.parent.as_fd(), &found.name).ok()?;
        Some(std::io::read_to_string(file).unwrap())
    }

    #[test]
    fn the_top_layer_wins_whiteouts_delete_and_opaque_directories_hide() {
        let tmp = tempfile::tempdir().unwrap();
        let img = image(
            tmp.path(),
            &[
                &[("etc/app.conf", "top\n"), ("etc/gone.conf", "whiteout"), ("var", "opaque"), ("var/new", "n\n")],
                &[
                    ("etc/app.conf", "bottom\n"),
                    ("etc/gone.conf", "was\n"),
                    ("etc/base.conf", "base\n"),
                    ("var/old", "o\n"),
                ],
            ],
        );
        assert_eq!(content(&img, "etc/app.conf").as_deref(), Some("top\n"));
        assert_eq!(content(&img, "etc/base.conf").as_deref(), Some("base\n"));
        assert!(img.lookup(Path::new("etc/gone.conf")).unwrap().is_none());
        assert!(img.lookup(Path::new("var/old")).unwrap().is_none(), "hidden by the opaque var");
        assert_eq!(content(&img, "var/new").as_deref(), Some("n\n"));
        let names: Vec<PathBuf> = img
            .list(Path::new("etc"))
            .unwrap()
            .keys()
            .map(|n| PathBuf::from(std::ffi::OsStr::from_bytes(n.to_bytes())))
            .collect();
        assert_eq!(names, [PathBuf::from("app.conf"), "base.conf".into()]);
        assert_eq!(img.list(Path::new("var")).unwrap().len(), 1);
    }

    #[test]
    fn a_symlink_in_a_layer_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("shadow"), "secret\n").unwrap();
        let target = format!("->{}", outside.display());
        let img = image(tmp.path(), &[&[("etc", target.as_str())], &[("etc/shadow", "image\n")]]);
        // `etc` is a symlink in the top layer: nothing below it, neither the lower layer's
        // file nor what the link points at.
        assert!(img.lookup(Path::new("etc/shadow")).unwrap().is_none());
        let link = img.lookup(Path::new("etc")).unwrap().unwrap();
        assert_eq!(FileType::from_raw_mode(link.stat.st_mode), FileType::Symlink);
    }
}
