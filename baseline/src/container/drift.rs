//! A container compared with its image: what its own layer (overlay's upper directory) holds
//! at the paths a workload policy monitors, against the image's version of each (the merged
//! lower layers). Being in the upper layer is not being different: a file copied up by an
//! open for writing, or a chmod back to the same mode, matches its image file and is not
//! reported. Attributes copy-up cannot keep (inode, device, ctime, link count) and overlay's
//! own xattrs are never compared; a metacopy file's data is the image's.
//!
//! Reports are verify's: `added` (not in the image), `removed` (a whiteout over an image
//! entry, or an opaque directory hiding one; a removed image directory lists its monitored
//! entries), `modified` (the monitored attributes that differ, with a diff where the rule
//! keeps content and never for `secret`). A renamed directory (overlay's `redirect` xattr) is
//! its new path added and its old one removed; its entries are compared with the ones they
//! came from.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags};

use super::image::Image;
use super::layer_cache::LayerCache;
use super::overlay::{Marker, OverlayRoot, is_overlay_xattr, marker_at, overlay_xattr};
use crate::beneath;
use crate::policy::{Attribute, Policy};
use crate::record::FileRecord;
use crate::scan::{Recorded, record_entry};
use crate::verify::{Change, ChangeKind, VerifyError, VerifyReport, compare_with};

const DIR: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// A directory of the upper layer still to walk: its path in the container, and the path
/// its image counterpart has (another one for a renamed directory).
struct Pending {
    path: PathBuf,
    image_path: PathBuf,
}

/// `path` without its leading `/`.
fn relative(path: &Path) -> &Path {
    path.strip_prefix("/").unwrap_or(path)
}

/// Compares the container whose root is `root` with `image` under `policy` (paths inside the
/// container); `exempt` says which paths are not reported. The image's records come from
/// `cache` where it has them. Everything that could not be read is an error of the report,
/// never a silent match.
pub fn compare(
    root: &OverlayRoot,
    image: &Image,
    policy: &Policy,
    exempt: &dyn Fn(&Path) -> bool,
    cache: Option<&LayerCache>,
) -> VerifyReport {
    let mut cmp = Comparer { image, policy, exempt, metacopy: root.metacopy, cache, report: VerifyReport::default() };
    let upper = match rustix::fs::open(&root.upper, DIR, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            cmp.error(Path::new("/"), format!("cannot open the container's layer {}: {e}", root.upper.display()));
            return cmp.report;
        }
    };
    let mut stack = vec![Pending { path: PathBuf::from("/"), image_path: PathBuf::from("/") }];
    while let Some(dir) = stack.pop() {
        if let Err(e) = cmp.directory(&upper, &dir, &mut stack) {
            cmp.error(&dir.path, format!("cannot read the container's layer here: {e}"));
        }
    }
    cmp.report.changes.sort_by(|a, b| a.path.cmp(&b.path));
    cmp.report.errors.sort_by(|a, b| a.path.cmp(&b.path));
    // The old side of a container's diff is its image's file, and says so.
    for change in &mut cmp.report.changes {
        if let Some(diff) = &mut change.diff {
            *diff = crate::verify::relabel_old_side(diff, "image");
        }
    }
    cmp.report
}

struct Comparer<'a> {
    image: &'a Image,
    policy: &'a Policy,
    exempt: &'a dyn Fn(&Path) -> bool,
    metacopy: bool,
    cache: Option<&'a LayerCache>,
    report: VerifyReport,
}

impl Comparer<'_> {
    fn error(&mut self, path: &Path, message: String) {
        self.report.errors.push(VerifyError { path: path.to_owned(), message });
    }

    /// The rule index for a monitored, not excluded, not exempt path.
    fn rule_for(&self, path: &Path) -> Option<usize> {
        let i = self.policy.rule_index_for(path)?;
        (!self.policy.rules[i].excludes(path) && !(self.exempt)(path)).then_some(i)
    }

    /// Whether a directory must be walked for what lies below it: it is monitored, or a rule
    /// root is below it.
    fn leads_to_rules(&self, path: &Path) -> bool {
        self.rule_for(path).is_some() || self.policy.rules.iter().any(|r| r.path.starts_with(path))
    }

    /// Opens the upper layer's directory `path`, one component at a time, never following.
    fn open_upper(upper: &OwnedFd, path: &Path) -> io::Result<OwnedFd> {
        let mut cur = rustix::fs::openat(upper, c".", DIR, Mode::empty())?;
        for part in relative(path).components() {
            let name = CString::new(part.as_os_str().as_bytes()).map_err(io::Error::other)?;
            cur = rustix::fs::openat(&cur, name.as_c_str(), DIR, Mode::empty())?;
        }
        Ok(cur)
    }

    fn directory(&mut self, upper: &OwnedFd, dir: &Pending, stack: &mut Vec<Pending>) -> io::Result<()> {
        let fd = Self::open_upper(upper, &dir.path)?;
        let entries = beneath::read_dir(fd.as_fd())?;
        for entry in entries {
            let name = OsStr::from_bytes(entry.name.to_bytes());
            let path = dir.path.join(name);
            let mut image_path = dir.image_path.join(name);
            let mut renamed = false;
            let stat = match beneath::lstat_at(fd.as_fd(), &entry.name) {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    self.error(&path, format!("cannot stat it in the container's layer: {e}"));
                    continue;
                }
            };
            let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
            let marker = marker_at(fd.as_fd(), &entry.name, &stat);
            if is_dir && let Some(origin) = overlay_xattr(&beneath::path_at(fd.as_fd(), &entry.name), "redirect") {
                // Renamed from `origin`: absolute from the layer's root, or a sibling's name.
                let origin = Path::new(OsStr::from_bytes(&origin));
                image_path = if origin.is_absolute() { origin.to_owned() } else { dir.image_path.join(origin) };
                renamed = true;
            }
            if marker == Marker::Whiteout {
                self.removed_subtree(&path);
                continue;
            }
            if self.rule_for(&path).is_some() {
                // A renamed directory is new where it is; its entries came from its origin.
                let against = (!renamed).then_some(image_path.as_path());
                self.entry(fd.as_fd(), &entry.name, &path, against);
            }
            if is_dir {
                if marker == Marker::Opaque {
                    self.hidden_by_opaque(upper, &path)?;
                }
                if self.leads_to_rules(&path) {
                    stack.push(Pending { path, image_path });
                }
            }
        }
        Ok(())
    }

    /// Compares the upper entry `name` (container path `path`) with the image's entry at
    /// `image_path` (its origin for a renamed directory's entries; `None`: nothing to compare
    /// with, it is new).
    fn entry(&mut self, dir: BorrowedFd<'_>, name: &CStr, path: &Path, image_path: Option<&Path>) {
        let Some(rule_index) = self.rule_for(path) else { return };
        let rule = &self.policy.rules[rule_index];
        let looks_like_file =
            beneath::lstat_at(dir, name).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile);
        let now = match record_entry(dir, name, looks_like_file, rule, rule_index, false) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => return self.error(path, format!("cannot read it in the container's layer: {e}")),
        };
        self.report.scanned += 1;
        let was = match image_path.map(|p| (p, self.image_record(p, rule_index))) {
            None => None,
            Some((_, Ok(r))) => r,
            Some((p, Err(e))) => return self.error(path, format!("cannot read the image's {}: {e}", p.display())),
        };
        let metacopy = self.metacopy && overlay_xattr(&beneath::path_at(dir, name), "metacopy").is_some();
        let (mut now, mut now_content) = (now.record, now.content);
        strip_overlay_xattrs(&mut now);
        let Some((mut was, was_content)) = was else {
            self.push(compare_with(self.policy, path.to_owned(), None, now, None, |_| Ok(None)), path);
            return;
        };
        strip_overlay_xattrs(&mut was);
        // What copy-up cannot keep is not the container's doing.
        now.dev = was.dev;
        now.inode = was.inode;
        now.ctime_ns = was.ctime_ns;
        now.nlink = was.nlink;
        if metacopy {
            // Only the metadata was copied up: the data is the image's.
            now.digest = was.digest.clone();
            now.size = was.size;
            now_content = was_content.clone();
        }
        if rule.secret || !rule.attributes.contains(Attribute::Content) {
            now_content = None;
        }
        was.content_stored = was_content.is_some();
        let change = compare_with(self.policy, path.to_owned(), Some(&was), now, now_content.as_deref(), |_| {
            Ok(was_content.clone())
        });
        self.push(change, path);
    }

    fn push(&mut self, change: crate::error::Result<Option<Change>>, path: &Path) {
        match change {
            Ok(Some(c)) => self.report.changes.push(c),
            Ok(None) => {}
            Err(e) => self.error(path, e.to_string()),
        }
    }

    /// The image's record (and kept content) at `path` under rule `rule_index`.
    fn image_record(&self, path: &Path, rule_index: usize) -> io::Result<Option<(FileRecord, Option<Vec<u8>>)>> {
        let Some(found) = self.image.lookup(relative(path))? else { return Ok(None) };
        let rule = &self.policy.rules[rule_index];
        let is_file = FileType::from_raw_mode(found.stat.st_mode) == FileType::RegularFile;
        let read = || {
            let Recorded { record, content, .. } =
                record_entry(found.parent.as_fd(), &found.name, is_file, rule, rule_index, true)?;
            Ok((record, content))
        };
        match (self.cache, self.image.layers.get(found.layer)) {
            (Some(cache), Some(layer)) => cache.record(layer, path, &found.stat, rule, rule_index, read).map(Some),
            _ => read().map(Some),
        }
    }

    /// The image's monitored entries at and below `path`, reported removed (a whiteout in the
    /// container's layer deletes the whole subtree).
    fn removed_subtree(&mut self, path: &Path) {
        let mut todo = vec![path.to_owned()];
        while let Some(p) = todo.pop() {
            let rule_index = self.rule_for(&p);
            let record = match rule_index.map(|i| self.image_record(&p, i)).transpose() {
                Ok(r) => r.flatten(),
                Err(e) => {
                    self.error(&p, format!("cannot read the image's entry: {e}"));
                    continue;
                }
            };
            if let Some((record, _)) = &record {
                self.report.changes.push(Change {
                    path: p.clone(),
                    kind: ChangeKind::Removed,
                    changed: Vec::new(),
                    old: Some(record.clone()),
                    new: None,
                    diff: None,
                    changed_ranges: None,
                    mount: None,
                });
            }
            let is_dir = match &record {
                Some((r, _)) => r.kind == crate::record::FileKind::Dir,
                None => self
                    .image
                    .lookup(relative(&p))
                    .ok()
                    .flatten()
                    .is_some_and(|f| FileType::from_raw_mode(f.stat.st_mode) == FileType::Directory),
            };
            if is_dir && self.leads_to_rules(&p) {
                match self.image.list(relative(&p)) {
                    Ok(names) => todo.extend(names.keys().map(|n| p.join(OsStr::from_bytes(n.to_bytes())))),
                    Err(e) => self.error(&p, format!("cannot list the image's directory: {e}")),
                }
            }
        }
    }

    /// An opaque directory of the container's layer hides the image's entries below it:
    /// those it does not hold itself are removed.
    fn hidden_by_opaque(&mut self, upper: &OwnedFd, path: &Path) -> io::Result<()> {
        let mine: Vec<CString> =
            beneath::read_dir(Self::open_upper(upper, path)?.as_fd())?.into_iter().map(|e| e.name).collect();
        for (name, _) in self.image.list(relative(path))? {
            if !mine.contains(&name) {
                self.removed_subtree(&path.join(OsStr::from_bytes(name.to_bytes())));
            }
        }
        Ok(())
    }
}

fn strip_overlay_xattrs(record: &mut FileRecord) {
    record.xattrs.retain(|(name, _)| !is_overlay_xattr(name));
}
