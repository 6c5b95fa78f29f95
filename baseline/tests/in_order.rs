//! The scan hands entries over in `Path`'s order, baselines store records in it, and verify
//! merges the two in one pass: the order itself (names that sort differently as bytes and as
//! components, non-UTF-8 names, roots out of order, a nested root on another file system),
//! and added, removed and modified entries at the start, the middle, the end and on both
//! sides of a chunk boundary, against baselines in the real sled store.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use kubefim_baseline::baseline::{TrustedBaseline, create};
use kubefim_baseline::policy::Policy;
use kubefim_baseline::record::CHUNK_RECORDS;
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::{Scan, ScanProgress, ScanSink, ScannedEntry};
use kubefim_baseline::sign::{PublicKey, SigningKey, generate};
use kubefim_baseline::verify::{ChangeKind, VerifyReport, verify};

/// Paths as the scan hands them over, checking they come one at a time.
#[derive(Default)]
struct Paths(Mutex<Vec<PathBuf>>);

impl ScanSink for Paths {
    fn entry(&self, entry: ScannedEntry) {
        let mut paths = self.0.try_lock().expect("entries come one call at a time");
        paths.push(entry.path);
    }
}

fn policy(rules: &[(&Path, bool)]) -> Policy {
    let mut yaml =
        "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n".to_owned();
    for (path, diff) in rules {
        yaml.push_str(&format!("    - path: {}\n      diff: {diff}\n", path.display()));
    }
    Policy::from_yaml(&yaml, "test").unwrap()
}

fn scan(policy: &Policy) -> Vec<PathBuf> {
    let sink = Paths::default();
    let summary = Scan::whole_policy(policy).run(&sink, &ScanProgress::default());
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    sink.0.into_inner().unwrap()
}

#[track_caller]
fn assert_in_path_order(paths: &[PathBuf]) {
    for pair in paths.windows(2) {
        assert!(pair[0] < pair[1], "{} came before {}: {paths:#?}", pair[0].display(), pair[1].display());
    }
}

#[test]
fn entries_come_in_path_order_not_byte_or_listing_order() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    // Made in an order no file system lists back sorted, with names whose byte order
    // (`a-b` < `a.txt` < `a/b`) is not their order as paths (`a/b` < `a-b` < `a.txt`).
    fs::create_dir_all(t.join("a/b")).unwrap();
    for name in ["zeta", "a.txt", "a-b", "B", "0", "a b", "é"] {
        fs::write(t.join(name), name).unwrap();
    }
    fs::write(t.join(OsStr::from_bytes(b"not-utf8-\xff")), "x").unwrap();
    fs::write(t.join("a/b/c"), "c").unwrap();
    fs::create_dir(t.join("many")).unwrap();
    for i in (0..300).rev() {
        fs::write(t.join(format!("many/{i}")), "m").unwrap();
    }
    let paths = scan(&policy(&[(&t, false)]));
    assert_in_path_order(&paths);
    let rel: Vec<&[u8]> = paths.iter().map(|p| p.strip_prefix(&t).unwrap().as_os_str().as_bytes()).collect();
    let expect_start: &[&[u8]] = &[b"", b"0", b"B", b"a", b"a/b", b"a/b/c", b"a b", b"a-b", b"a.txt", b"many"];
    assert_eq!(&rel[..expect_start.len()], expect_start, "{paths:#?}");
    assert_eq!(rel.len(), 10 + 300 + 3, "{paths:#?}");
    assert_eq!(&rel[rel.len() - 3..], [&b"not-utf8-\xff"[..], b"zeta", "é".as_bytes()]);
}

#[test]
fn roots_are_walked_in_path_order_whatever_the_policy_says() {
    let dir = tempfile::tempdir().unwrap();
    let (z, a, inner) = (dir.path().join("z"), dir.path().join("a"), dir.path().join("a/inner"));
    for d in [&z, &inner] {
        fs::create_dir_all(d).unwrap();
        fs::write(d.join("f"), "f").unwrap();
    }
    fs::write(a.join("g"), "g").unwrap();
    // A nested root on the same file system is part of its parent's walk, listed once.
    let paths = scan(&policy(&[(&z, false), (&inner, true), (&a, false)]));
    assert_in_path_order(&paths);
    let want = vec![a.clone(), a.join("g"), inner.clone(), inner.join("f"), z.clone(), z.join("f")];
    assert_eq!(paths, want);
}

/// Unmounts when dropped, so a failing test leaves no mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_nested_root_on_another_file_system_is_merged_into_its_parents_order() {
    if !rustix::process::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "mounting needs root and CI runs as root");
        eprintln!("skipped: mounting needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t");
    let m = t.join("m");
    fs::create_dir_all(&m).unwrap();
    for name in ["l", "m.txt", "n"] {
        fs::write(t.join(name), name).unwrap();
    }
    let status = Command::new("mount").args(["-t", "tmpfs", "kubefim-test"]).arg(&m).status().unwrap();
    assert!(status.success());
    let _mounted = Mounted(m.clone());
    fs::create_dir(m.join("sub")).unwrap();
    for name in ["a", "sub/b", "z"] {
        fs::write(m.join(name), name).unwrap();
    }
    let paths = scan(&policy(&[(&t, false), (&m, false)]));
    assert_in_path_order(&paths);
    let want: Vec<PathBuf> = ["", "l", "m", "m/a", "m/sub", "m/sub/b", "m/z", "m.txt", "n"]
        .iter()
        .map(|p| if p.is_empty() { t.clone() } else { t.join(p) })
        .collect();
    assert_eq!(paths, want, "the mount point once, its tree where it sorts");
    // Only the outer rule: the other file system is not entered.
    let paths = scan(&policy(&[(&t, false)]));
    assert!(paths.contains(&m) && !paths.contains(&m.join("a")), "{paths:#?}");
}

struct Fixture {
    dir: tempfile::TempDir,
    policy: Policy,
    db: PathBuf,
    key: SigningKey,
    public: PublicKey,
}

impl Fixture {
    fn new(tree: &Path, diff: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (k, p) = generate(&dir.path().join("keys")).unwrap();
        let db = dir.path().join("db");
        Fixture {
            policy: policy(&[(tree, diff)]),
            db,
            key: SigningKey::load(&k).unwrap(),
            public: PublicKey::load(&p).unwrap(),
            dir,
        }
    }

    fn create(&self) {
        create(&self.policy, &HostRoot::identity(), &self.db, &self.key, &ScanProgress::default()).unwrap();
    }

    fn verify(&self) -> (TrustedBaseline, VerifyReport) {
        let trusted = TrustedBaseline::open(&self.db, &self.public).unwrap();
        let report = verify(&trusted, &HostRoot::identity(), &ScanProgress::default()).unwrap();
        (trusted, report)
    }
}

fn kinds(report: &VerifyReport, base: &Path) -> Vec<(String, ChangeKind)> {
    report.changes.iter().map(|c| (c.path.strip_prefix(base).unwrap().display().to_string(), c.kind)).collect()
}

#[test]
fn verify_merges_changes_at_the_ends_the_middle_and_chunk_boundaries() {
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path().join("t");
    fs::create_dir(&t).unwrap();
    // The root is record 0, so f{i} is record i + 1: f1022 ends the first chunk, f1023
    // starts the second.
    let files = 2 * CHUNK_RECORDS + 400;
    let name = |i: usize| format!("f{i:05}");
    for i in 0..files {
        fs::write(t.join(name(i)), format!("{i}\n")).unwrap();
    }
    let fx = Fixture::new(&t, true);
    fx.create();
    let (trusted, report) = fx.verify();
    assert!(report.is_clean(), "{:?}", kinds(&report, &t));
    assert_eq!(trusted.len(), files as u64 + 1);
    assert_eq!(trusted.chunk_count(), 3);
    let (last_of_first, first_of_second, last) = (CHUNK_RECORDS - 2, CHUNK_RECORDS - 1, files - 1);
    let mid = CHUNK_RECORDS + 300;
    for i in [0, last_of_first, 2 * CHUNK_RECORDS - 1] {
        fs::remove_file(t.join(name(i))).unwrap();
    }
    for i in [first_of_second, mid, last] {
        fs::write(t.join(name(i)), format!("{i} changed\n")).unwrap();
    }
    for added in ["a-first", &format!("{}x", name(last_of_first)), &format!("{}x", name(first_of_second)), "zz-last"] {
        fs::write(t.join(added), "new\n").unwrap();
    }
    let (_, report) = fx.verify();
    let mut want = vec![
        (String::new(), ChangeKind::Modified),
        ("a-first".to_owned(), ChangeKind::Added),
        (name(0), ChangeKind::Removed),
        (name(last_of_first), ChangeKind::Removed),
        (format!("{}x", name(last_of_first)), ChangeKind::Added),
        (name(first_of_second), ChangeKind::Modified),
        (format!("{}x", name(first_of_second)), ChangeKind::Added),
        (name(mid), ChangeKind::Modified),
        (name(2 * CHUNK_RECORDS - 1), ChangeKind::Removed),
        (name(last), ChangeKind::Modified),
        ("zz-last".to_owned(), ChangeKind::Added),
    ];
    want.sort_by(|a, b| Path::new(&a.0).cmp(Path::new(&b.0)));
    assert_eq!(kinds(&report, &t), want);
    // Diffs come from the file read again, only because it changed.
    let mid_change = report.changes.iter().find(|c| c.path == t.join(name(mid))).unwrap();
    let diff = mid_change.diff.as_deref().expect("a diff of a text file under a diff rule");
    assert!(diff.contains(&format!("-{mid}\n")) && diff.contains(&format!("+{mid} changed\n")), "{diff}");
    assert!(report.changes.iter().all(|c| c.kind != ChangeKind::Modified || c.path == t || c.changed_ranges.is_some()));
    drop(fx.dir);
}

#[test]
fn verify_of_an_emptied_tree_and_of_a_new_tree_in_place_of_an_empty_one() {
    let tree = tempfile::tempdir().unwrap();
    let t = tree.path().join("t");
    fs::create_dir(&t).unwrap();
    for i in 0..CHUNK_RECORDS + 5 {
        fs::write(t.join(format!("{i}")), "x").unwrap();
    }
    let fx = Fixture::new(&t, false);
    fx.create();
    fs::remove_dir_all(&t).unwrap();
    let (_, report) = fx.verify();
    assert_eq!(report.count(ChangeKind::Removed), CHUNK_RECORDS + 6);
    assert_eq!(report.changes.len(), CHUNK_RECORDS + 6);

    fx.create();
    fs::create_dir(&t).unwrap();
    fs::write(t.join("new"), "x").unwrap();
    let (trusted, report) = fx.verify();
    assert!(trusted.is_empty());
    assert_eq!(kinds(&report, &t), [(String::new(), ChangeKind::Added), ("new".to_owned(), ChangeKind::Added)]);
}
