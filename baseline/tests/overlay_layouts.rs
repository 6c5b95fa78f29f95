//! Real overlay mounts in the shapes containerd and CRI-O/podman give them, built here (no
//! runtime needed): the root is read back from this process's own mountinfo line, as the
//! agent reads a container's, and the container's layer is compared with the image's layers
//! after changes made through the merged view. Root only (mounting).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kubefim_baseline::container::drift;
use kubefim_baseline::container::image::Image;
use kubefim_baseline::container::overlay::OverlayRoot;
use kubefim_baseline::mounts::MountTable;
use kubefim_baseline::policy::Policy;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::verify::{ChangeKind, VerifyReport};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn skip() -> bool {
    if is_root() {
        return false;
    }
    assert!(std::env::var_os("CI").is_none(), "overlay tests need root and CI runs as root");
    eprintln!("skipped: mounting needs root");
    true
}

#[track_caller]
fn sh(script: &str) {
    let out = Command::new("sh").arg("-c").arg(script).output().expect("run sh");
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Unmounts when dropped, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The image: a bottom layer with /etc/{app,gone,same}.conf and /srv/site/index.html, a top
/// layer that changes app.conf.
fn fill_layers(bottom: &Path, top: &Path) {
    fs::create_dir_all(bottom.join("etc")).unwrap();
    fs::create_dir_all(bottom.join("srv/site")).unwrap();
    fs::write(bottom.join("etc/app.conf"), "listen 80\n").unwrap();
    fs::write(bottom.join("etc/gone.conf"), "bye\n").unwrap();
    fs::write(bottom.join("etc/same.conf"), "same\n").unwrap();
    fs::write(bottom.join("srv/site/index.html"), "<h1>hi</h1>\n").unwrap();
    fs::create_dir_all(top.join("etc")).unwrap();
    fs::write(top.join("etc/app.conf"), "listen 81\n").unwrap();
    fs::set_permissions(top.join("etc/app.conf"), fs::Permissions::from_mode(0o644)).unwrap();
}

/// Changes made through the merged view, as a container's processes would.
fn change_through(merged: &Path) {
    sh(&format!(
        "cd '{}' && echo 'listen 8080' >> etc/app.conf && rm etc/gone.conf && echo new > etc/new.conf \
         && : >> etc/same.conf && rm -r srv/site",
        merged.display()
    ));
}

fn policy() -> Policy {
    Policy::from_yaml(
        "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - path: /etc\n      diff: true\n    - path: /srv\n",
        "test",
    )
    .unwrap()
}

/// The root read from the mountinfo line of `target`, and the line itself.
fn root_at(target: &Path) -> (OverlayRoot, String) {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let table = MountTable::parse(&text);
    let mount = table.at(target).unwrap_or_else(|| panic!("no mount at {}\n{text}", target.display()));
    let root = OverlayRoot::from_mount(&mount.fs_type, &mount.super_options, &HostRoot::default()).unwrap();
    (root, mount.super_options.clone())
}

fn kinds(report: &VerifyReport) -> Vec<(String, ChangeKind)> {
    report.changes.iter().map(|c| (c.path.display().to_string(), c.kind)).collect()
}

fn check(report: &VerifyReport) {
    let k = kinds(report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let has = |p: &str, kind| k.iter().any(|(path, kk)| path == p && *kk == kind);
    assert!(has("/etc/app.conf", ChangeKind::Modified), "{k:?}");
    assert!(has("/etc/gone.conf", ChangeKind::Removed), "{k:?}");
    assert!(has("/etc/new.conf", ChangeKind::Added), "{k:?}");
    assert!(has("/srv/site", ChangeKind::Removed), "{k:?}");
    assert!(has("/srv/site/index.html", ChangeKind::Removed), "{k:?}");
    assert!(!k.iter().any(|(p, _)| p == "/etc/same.conf"), "a copy-up without a change: {k:?}");
    let app = report.changes.iter().find(|c| c.path == Path::new("/etc/app.conf")).unwrap();
    let diff = app.diff.as_deref().unwrap_or_else(|| panic!("no diff: {app:?}"));
    assert!(diff.contains("\n listen 81\n+listen 8080\n"), "against the top layer's version: {diff}");
}

#[test]
fn a_containerd_shaped_overlay_with_relative_lowerdirs_is_compared_with_its_image() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let snaps = tmp.path().join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    for n in ["1/fs", "2/fs", "3/fs", "3/work"] {
        fs::create_dir_all(snaps.join(n)).unwrap();
    }
    fill_layers(&snaps.join("1/fs"), &snaps.join("2/fs"));
    let merged = tmp.path().join("rootfs");
    fs::create_dir(&merged).unwrap();
    // containerd's compact form: it changes into the snapshots directory and names the
    // lower layers relative to it.
    sh(&format!(
        "cd '{}' && mount -t overlay overlay -o 'lowerdir=2/fs:1/fs,upperdir={}/3/fs,workdir={}/3/work' '{}'",
        snaps.display(),
        snaps.display(),
        snaps.display(),
        merged.display()
    ));
    let _m = Mounted(merged.clone());
    let (root, options) = root_at(&merged);
    assert!(options.contains("lowerdir=2/fs:1/fs"), "the kernel keeps them relative: {options}");
    let snaps = fs::canonicalize(&snaps).unwrap();
    assert_eq!(root.lower.iter().map(|l| l.dir.clone()).collect::<Vec<_>>(), [snaps.join("2/fs"), snaps.join("1/fs")]);
    change_through(&merged);
    let image = Image { layers: root.lower.clone() };
    check(&drift::compare(&root, &image, &policy(), &|_| false, None));
}

#[test]
fn a_containers_storage_shaped_overlay_with_short_links_is_compared_with_its_image() {
    if skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let overlay = tmp.path().join("storage/overlay");
    for id in ["aaa", "bbb", "ccc"] {
        fs::create_dir_all(overlay.join(id).join("diff")).unwrap();
        fs::create_dir_all(overlay.join(id).join("work")).unwrap();
    }
    fs::create_dir_all(overlay.join("l")).unwrap();
    std::os::unix::fs::symlink("../aaa/diff", overlay.join("l/SHORTA")).unwrap();
    std::os::unix::fs::symlink("../bbb/diff", overlay.join("l/SHORTB")).unwrap();
    fill_layers(&overlay.join("aaa/diff"), &overlay.join("bbb/diff"));
    let merged = tmp.path().join("merged");
    fs::create_dir(&merged).unwrap();
    sh(&format!(
        "mount -t overlay overlay -o 'lowerdir={0}/l/SHORTB:{0}/l/SHORTA,upperdir={0}/ccc/diff,workdir={0}/ccc/work' '{1}'",
        overlay.display(),
        merged.display()
    ));
    let _m = Mounted(merged.clone());
    let (root, _) = root_at(&merged);
    let overlay = fs::canonicalize(&overlay).unwrap();
    assert_eq!(
        root.lower.iter().map(|l| l.dir.clone()).collect::<Vec<_>>(),
        [overlay.join("bbb/diff"), overlay.join("aaa/diff")],
        "short links resolved to their layers"
    );
    change_through(&merged);
    let image = Image { layers: root.lower.clone() };
    check(&drift::compare(&root, &image, &policy(), &|_| false, None));
}
