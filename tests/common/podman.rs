//! A real container for the tests: podman with runc, and a test image imported from
//! Debian's static busybox (no registry is reachable), shared by every test binary.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::watch::{s, sh};

/// The test image.
pub const IMAGE: &str = "localhost/kubefim-test:latest";

/// podman with the runtime and cgroup manager that work on these machines.
pub fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Imports the test image (Debian's static busybox, nothing else) unless it exists; a file
/// lock keeps two tests (or two test binaries) from importing at once.
#[track_caller]
pub fn ensure_image() {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("kubefim-test-image.lock"))
        .expect("open the image lock file");
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("lock the image lock file");
    let mut exists = podman();
    exists.args(["image", "exists", IMAGE]);
    if exists.status().expect("run podman image exists").success() {
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("no busybox: scripts/setup.sh installs busybox-static");
    let rootfs = tempfile::tempdir().expect("temp rootfs");
    let bin = rootfs.path().join("bin");
    fs::create_dir(&bin).unwrap();
    fs::copy(busybox, bin.join("busybox")).expect("copy busybox");
    fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o755)).unwrap();
    for tool in ["sh", "echo", "cat", "mv", "rm", "chmod", "ln", "touch", "sleep"] {
        std::os::unix::fs::symlink("busybox", bin.join(tool)).unwrap();
    }
    for dir in ["data", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir(rootfs.path().join(dir)).unwrap();
    }
    sh(&format!("tar -C '{}' -c . | podman import - {IMAGE}", s(rootfs.path())));
}
