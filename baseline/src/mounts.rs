//! What is mounted where, as `/proc/self/mountinfo` says (proc(5)): each mount's target,
//! file system type, source and device. `verify` uses it to tell an entry hidden by a mount
//! made since the baseline from one that is gone, and the watcher to describe a mount made at,
//! above or below a monitored path. It reads; it never mounts.

use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted, as this process sees it (an on-disk path).
    pub target: PathBuf,
    /// Its file system type (`tmpfs`, `ext4`, ...).
    pub fs_type: String,
    /// Its source as the kernel recorded it (a device, or any word for a virtual file system).
    pub source: String,
    /// `st_dev` of what is mounted (mountinfo's `major:minor`).
    pub dev: u64,
    /// The file system's own options as mountinfo shows them (escaped: see [`unescape`]);
    /// an overlay's layers are there.
    pub super_options: String,
}

/// The mounts of this process's mount namespace, in mount order (a later one is on top).
#[derive(Debug, Clone, Default)]
pub struct MountTable {
    mounts: Vec<Mount>,
}

/// mountinfo's `\ooo` escapes (space, tab, newline, backslash, and in options comma and
/// colon) taken back to bytes.
pub(crate) fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |c: u8| c.is_ascii_digit() && c < b'8';
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|&c| octal(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

impl MountTable {
    /// This process's mounts.
    pub fn read() -> io::Result<MountTable> {
        Ok(MountTable::parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
    }

    /// Parses mountinfo text: `id parent major:minor root target options [optional...] - type
    /// source super-options`. Lines that do not parse are skipped.
    pub fn parse(text: &str) -> MountTable {
        let mounts = text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let dash = fields.iter().position(|f| *f == "-")?;
                let (major, minor) = fields.get(2)?.split_once(':')?;
                Some(Mount {
                    target: unescape(fields.get(4)?),
                    fs_type: fields.get(dash + 1)?.to_string(),
                    source: unescape(fields.get(dash + 2)?).to_string_lossy().into_owned(),
                    dev: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
                    super_options: fields.get(dash + 3).map(|s| s.to_string()).unwrap_or_default(),
                })
            })
            .collect();
        MountTable { mounts }
    }

    /// The mount on top at exactly `disk` (a path mounted over), if any.
    pub fn at(&self, disk: &Path) -> Option<&Mount> {
        self.mounts.iter().rev().find(|m| m.target == disk)
    }

    /// The mount `disk` is in: the top one of the deepest targets at or above it.
    pub fn covering(&self, disk: &Path) -> Option<&Mount> {
        self.mounts
            .iter()
            .enumerate()
            .filter(|(_, m)| disk.starts_with(&m.target))
            .max_by_key(|(i, m)| (m.target.components().count(), *i))
            .map(|(_, m)| m)
    }
}

/// Whether an entry recorded on device `dev`, now absent at `disk`, is hidden by a mount
/// rather than gone: the mount it now falls in holds another file system than the one it was
/// recorded on, or is mounted on a directory that was recorded (`recorded_dir`: the (device,
/// inode) the baseline has for the mount's target, when the target is in the baseline) and
/// is now another inode (a bind mount of the same file system). Returns that mount.
pub fn hiding<'a>(
    table: &'a MountTable,
    disk: &Path,
    dev: u64,
    recorded_dir: impl FnOnce(&Path) -> Option<(u64, u64)>,
) -> Option<&'a Mount> {
    let m = table.covering(disk)?;
    if m.target == disk {
        return None;
    }
    let now = std::fs::metadata(&m.target).ok()?;
    if now.dev() != dev {
        return Some(m);
    }
    recorded_dir(&m.target).filter(|&(d, i)| (d, i) != (now.dev(), now.ino())).map(|_| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /etc/kubernetes/manifests rw,relatime shared:20 - tmpfs kubefim-test rw
41 22 8:1 /srv/evil.conf /etc/kubernetes/kubelet.conf rw - ext4 /dev/sda1 rw
42 22 0:36 / /tmp/with\\040space rw - tmpfs none rw
43 40 0:37 / /etc/kubernetes/manifests rw - tmpfs second rw
";

    #[test]
    fn mountinfo_parses_with_escapes_and_the_top_mount_wins() {
        let t = MountTable::parse(INFO);
        assert_eq!(t.mounts.len(), 5);
        let m = t.at(Path::new("/etc/kubernetes/manifests")).unwrap();
        assert_eq!((m.fs_type.as_str(), m.source.as_str()), ("tmpfs", "second"));
        assert_eq!(m.dev, libc::makedev(0, 37));
        assert!(t.at(Path::new("/tmp/with space")).is_some());
        assert_eq!(t.at(Path::new("/etc/kubernetes/kubelet.conf")).unwrap().fs_type, "ext4");
        assert!(t.at(Path::new("/etc/kubernetes")).is_none());
    }

    #[test]
    fn the_covering_mount_is_the_deepest_and_then_the_latest() {
        let t = MountTable::parse(INFO);
        let c = |p: &str| t.covering(Path::new(p)).map(|m| m.source.clone());
        assert_eq!(c("/etc/kubernetes/manifests/pod.yaml").as_deref(), Some("second"));
        assert_eq!(c("/etc/passwd").as_deref(), Some("/dev/sda1"));
        // A prefix of a name is not a parent.
        assert_eq!(c("/etc/kubernetes/manifests2/x").as_deref(), Some("/dev/sda1"));
    }
}
