//! Integration tests of the real `kubefim` binary: keygen, baseline create/show/accept and
//! verify, against temp trees built per test.
//!
//! Each test owns a temp dir (tree, keys, db), runs the binary with `std::process::Command`
//! under a 60 s timeout, parses the JSON contracts of `docs/output-formats.md`, and panics with
//! the binary's output when an expectation fails. Tests that need a process root's DAC
//! override does not help (unreadable files), a device node or a mount namespace run only as
//! root; CI is root, so they run there.

mod common;

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `b3sum --no-names FILE`: the reference BLAKE3 of a file.
#[track_caller]
fn b3sum(path: &Path) -> String {
    let run = tool("b3sum", [OsStr::new("--no-names"), path.as_os_str()]);
    let hash = run.stdout.trim().to_owned();
    assert_eq!(hash.len(), 64, "unexpected b3sum output for {}: {:?}", path.display(), run.stdout);
    hash
}

#[track_caller]
fn write(path: &Path, contents: impl AsRef<[u8]>) {
    fs::write(path, contents).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}

#[track_caller]
fn mkdir(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|err| panic!("mkdir {}: {err}", path.display()));
}

#[track_caller]
fn assert_summary(report: &Value, added: u64, removed: u64, modified: u64, unverified: u64) {
    let s = &report["summary"];
    let got = [&s["added"], &s["removed"], &s["modified"], &s["unverified"]];
    let want = [added, removed, modified, unverified];
    assert!(
        got.iter().zip(want).all(|(g, w)| g.as_u64() == Some(w)),
        "summary (added, removed, modified, unverified) is {got:?}, want {want:?}\n{report:#}"
    );
}

/// Spawns `baseline create` without waiting for it (for kill tests).
fn spawn_create(fx: &Fixture, policy: &Path, db: &Path) -> std::process::Child {
    Command::new(BIN)
        .args([OsStr::new("baseline"), OsStr::new("create"), OsStr::new("--policy")])
        .arg(policy)
        .arg("--db")
        .arg(db)
        .arg("--key")
        .arg(fx.key())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn baseline create")
}

/// A tree of `dirs` x `per_dir` small files under `fx.tree()`.
fn big_tree(fx: &Fixture, dirs: usize, per_dir: usize) {
    for d in 0..dirs {
        let dir = fx.t(format!("d{d:03}"));
        mkdir(&dir);
        for f in 0..per_dir {
            write(&dir.join(format!("f{f:04}")), format!("{d}/{f}\n"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// keygen, create, verify of an unchanged tree
// ---------------------------------------------------------------------------------------------

#[test]
fn keygen_writes_pem_key_pair_with_private_key_mode_0600() {
    let fx = Fixture::bare();
    let out = fx.path("keys");
    fx.keygen_into(&out);
    let key = out.join("kubefim.key");
    let pubkey = out.join("kubefim.pub");
    let key_meta = fs::metadata(&key).unwrap_or_else(|err| panic!("no private key {}: {err}", key.display()));
    assert_eq!(key_meta.permissions().mode() & 0o7777, 0o600, "private key mode is {:o}", key_meta.mode());
    let key_pem = fs::read_to_string(&key).expect("read private key");
    assert!(key_pem.contains("-----BEGIN PRIVATE KEY-----"), "private key is not PKCS#8 PEM:\n{key_pem}");
    let pub_pem = fs::read_to_string(&pubkey).unwrap_or_else(|err| panic!("no public key {}: {err}", pubkey.display()));
    assert!(pub_pem.contains("-----BEGIN PUBLIC KEY-----"), "public key is not SPKI PEM:\n{pub_pem}");
    assert!(!pub_pem.contains("PRIVATE"), "public key file holds a private key:\n{pub_pem}");
}

#[test]
fn unchanged_tree_verifies_clean() {
    let fx = Fixture::new();
    write(&fx.t("a.txt"), "alpha\n");
    mkdir(&fx.t("sub"));
    write(&fx.t("sub/b.txt"), "beta\n");
    symlink("a.txt", fx.t("link")).expect("symlink");
    fx.create_default();

    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);
    assert_eq!(report["summary"]["clean"], true, "{report:#}");
    assert!(report["summary"]["scanned"].as_u64() >= Some(4), "scanned too few: {report:#}");
    assert!(changes(&report).is_empty(), "changes in an unchanged tree: {report:#}");

    // The human formats work too and agree on the exit code.
    let human = fx.verify_human();
    human.expect_code(0);
    let show_human = kubefim([
        OsStr::new("baseline"),
        OsStr::new("show"),
        OsStr::new("--db"),
        fx.db().as_os_str(),
        OsStr::new("--pubkey"),
        fx.pubkey().as_os_str(),
    ]);
    show_human.expect_code(0);
    assert!(show_human.stdout.contains("b.txt"), "human show lacks sub/b.txt\n{}", show_human.dump());

    let records = fx.show();
    let a = record_for(&records, &fx.t("a.txt"));
    assert_eq!(a["type"], "file", "{a:#}");
    assert_eq!(a["size"], 6, "{a:#}");
    assert_eq!(a["rule"], fx.tree().to_str().unwrap(), "{a:#}");
    assert!(a["error"].is_null(), "{a:#}");
    let link = record_for(&records, &fx.t("link"));
    assert_eq!(link["type"], "symlink", "{link:#}");
    assert_eq!(link["link_target"], "a.txt", "{link:#}");
    assert!(link["hash"].is_null(), "a symlink has no content hash: {link:#}");
    let paths = recorded_paths(&records);
    let mut sorted = paths.clone();
    // Path order: component by component, so "/t/a/b" comes before "/t/a-b".
    sorted.sort_by(|a, b| Path::new(a).cmp(Path::new(b)));
    assert_eq!(paths, sorted, "show is not in path order");
}

// ---------------------------------------------------------------------------------------------
// What verify reports for each kind of change
// ---------------------------------------------------------------------------------------------

#[test]
fn modified_content_has_diff_for_diff_rule_and_nothing_for_secret_rule() {
    const SECRET_OLD: &str = "TOPSECRET-old-hunter2";
    const SECRET_NEW: &str = "TOPSECRET-new-correct-horse";
    let fx = Fixture::new();
    mkdir(&fx.t("text"));
    mkdir(&fx.t("secret"));
    let notes = fx.t("text/notes.txt");
    let token = fx.t("secret/token");
    write(&notes, "header\nold line\nfooter\n");
    write(&token, format!("password={SECRET_OLD}\n"));
    let policy = fx.write_policy(&[
        Rule::new(fx.t("text")).diff(),
        // diff: true as well, to check that secret wins.
        Rule::new(fx.t("secret")).diff().secret(),
    ]);
    fx.create(&policy);

    write(&notes, "header\nnew line, longer\nfooter\n");
    write(&token, format!("password={SECRET_NEW}\n"));
    let run = fx.verify_run();
    run.expect_code(1);
    let report = run.json();

    let change = change_for(&report, &notes);
    assert_eq!(change["kind"], "modified", "{change:#}");
    let attrs = changed_attrs(change);
    assert!(attrs.contains(&"content") && attrs.contains(&"size"), "changed lacks content/size: {change:#}");
    let diff = change["diff"].as_str().unwrap_or_else(|| panic!("no diff for a diff: true rule: {change:#}"));
    assert!(diff.contains("-old line"), "diff lacks the removed line:\n{diff}");
    assert!(diff.contains("+new line"), "diff lacks the added line:\n{diff}");
    let ranges = change["changed_ranges"].as_array().unwrap_or_else(|| panic!("no changed_ranges: {change:#}"));
    assert!(!ranges.is_empty() && ranges[0][0] == 0, "changed_ranges should start at 0: {change:#}");

    let secret = change_for(&report, &token);
    assert_eq!(secret["kind"], "modified", "{secret:#}");
    assert!(changed_attrs(secret).contains(&"content"), "{secret:#}");
    assert!(secret.get("diff").is_none_or(Value::is_null), "diff shown for a secret rule: {secret:#}");

    // The secret never appears: not in verify (json or human), not in show, not in the db.
    let human = fx.verify_human();
    human.expect_code(1);
    let show = fx.show_with(&fx.db(), &fx.pubkey());
    show.expect_code(0);
    let show_human = fx.show_human();
    show_human.expect_code(0);
    for r in [&run, &human, &show, &show_human] {
        assert!(
            !r.stdout.contains("TOPSECRET") && !r.stderr.contains("TOPSECRET"),
            "secret leaked by {}\n{}",
            r.cmdline,
            r.dump()
        );
    }
    for_each_file(&fx.db(), &mut |path| {
        let bytes = fs::read(path).expect("read db file");
        assert!(find_bytes(&bytes, b"TOPSECRET").is_none(), "secret content stored in {}", path.display());
    });
}

fn for_each_file(dir: &Path, f: &mut dyn FnMut(&Path)) {
    for entry in fs::read_dir(dir).unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display())) {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_dir() {
            for_each_file(&entry.path(), f);
        } else {
            f(&entry.path());
        }
    }
}

#[test]
fn one_flipped_byte_in_large_binary_file_reports_its_64k_range() {
    let fx = Fixture::new();
    let blob = fx.t("blob.bin");
    write(&blob, random_bytes(7, (1 << 20) + 4321));
    fx.create_default();

    let file = OpenOptions::new().read(true).write(true).open(&blob).expect("open blob");
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 300_000).expect("read byte");
    byte[0] ^= 0xff;
    file.write_all_at(&byte, 300_000).expect("write byte");
    drop(file);

    let report = fx.verify(1);
    let change = change_for(&report, &blob);
    assert_eq!(change["kind"], "modified", "{change:#}");
    let attrs = changed_attrs(change);
    assert!(attrs.contains(&"content"), "{change:#}");
    assert!(!attrs.contains(&"size"), "size did not change: {change:#}");
    assert_eq!(change["changed_ranges"], serde_json::json!([[262144, 327680]]), "{change:#}");
    assert!(change.get("diff").is_none_or(Value::is_null), "diff for a binary file without diff: true: {change:#}");
}

#[test]
fn added_file_is_reported() {
    let fx = Fixture::new();
    write(&fx.t("old.txt"), "old\n");
    fx.create_default();
    let new = fx.t("new.txt");
    write(&new, "new\n");

    let report = fx.verify(1);
    let change = change_for(&report, &new);
    assert_eq!(change["kind"], "added", "{change:#}");
    assert!(change["old"].is_null(), "{change:#}");
    assert_eq!(change["new"]["type"], "file", "{change:#}");
    assert_eq!(change["new"]["hash"], b3sum(&new), "{change:#}");
    assert_eq!(report["summary"]["added"], 1, "{report:#}");
    assert_eq!(report["summary"]["clean"], false, "{report:#}");
}

#[test]
fn change_records_are_show_records_without_path() {
    let fx = Fixture::new();
    write(&fx.t("old.txt"), "old\n");
    fx.create_default();
    let new = fx.t("new.txt");
    write(&new, "new\n");
    let report = fx.verify(1);
    let reported = change_for(&report, &new)["new"].clone();

    // Once accepted, show prints the same record, plus its path.
    fx.accept(&[&new]).expect_code(0);
    let records = fx.show();
    let mut shown = record_for(&records, &new).clone();
    shown.as_object_mut().expect("record is an object").remove("path");
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(
        keys(&reported),
        keys(&shown),
        "verify's new record and show's record (without path) have different fields\nverify: {reported:#}\nshow: {shown:#}"
    );
    assert_eq!(reported, shown, "verify's new record differs from show's");
}

#[test]
fn removed_file_is_reported() {
    let fx = Fixture::new();
    write(&fx.t("stay.txt"), "stay\n");
    let gone = fx.t("gone.txt");
    write(&gone, "gone\n");
    fx.create_default();
    fs::remove_file(&gone).expect("remove");

    let report = fx.verify(1);
    let change = change_for(&report, &gone);
    assert_eq!(change["kind"], "removed", "{change:#}");
    assert!(change["new"].is_null(), "{change:#}");
    assert_eq!(change["old"]["type"], "file", "{change:#}");
    assert_eq!(report["summary"]["removed"], 1, "{report:#}");
    assert!(!has_change(&report, &fx.t("stay.txt")), "{report:#}");
}

#[test]
fn chmod_is_reported_as_mode_not_content() {
    let fx = Fixture::new();
    let file = fx.t("conf");
    write(&file, "x=1\n");
    chmod(&file, 0o644);
    fx.create_default();
    chmod(&file, 0o4600);

    let report = fx.verify(1);
    let change = change_for(&report, &file);
    assert_eq!(change["kind"], "modified", "{change:#}");
    let attrs = changed_attrs(change);
    assert!(attrs.contains(&"mode"), "{change:#}");
    assert!(!attrs.contains(&"content") && !attrs.contains(&"size"), "{change:#}");
    assert_eq!(change["old"]["mode"], 0o644, "{change:#}");
    assert_eq!(change["new"]["mode"], 0o4600, "setuid bit must be part of mode: {change:#}");
}

#[test]
fn chown_is_reported_as_uid_and_gid() {
    if !is_root() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let fx = Fixture::new();
    let file = fx.t("owned");
    write(&file, "mine\n");
    fx.create_default();
    std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).expect("chown");

    let report = fx.verify(1);
    let change = change_for(&report, &file);
    let attrs = changed_attrs(change);
    assert!(attrs.contains(&"uid") && attrs.contains(&"gid"), "{change:#}");
    assert!(!attrs.contains(&"content"), "{change:#}");
    assert_eq!(change["new"]["uid"], NOBODY, "{change:#}");
    assert_eq!(change["new"]["gid"], NOBODY, "{change:#}");
}

#[test]
fn retargeted_symlink_is_reported_as_link_target() {
    let fx = Fixture::new();
    write(&fx.t("target-one"), "1\n");
    write(&fx.t("target-two"), "2\n");
    let link = fx.t("link");
    symlink("target-one", &link).expect("symlink");
    fx.create_default();
    fs::remove_file(&link).expect("remove link");
    symlink("target-two", &link).expect("symlink");

    let report = fx.verify(1);
    let change = change_for(&report, &link);
    assert_eq!(change["kind"], "modified", "{change:#}");
    assert!(changed_attrs(change).contains(&"link_target"), "{change:#}");
    assert_eq!(change["old"]["link_target"], "target-one", "{change:#}");
    assert_eq!(change["new"]["link_target"], "target-two", "{change:#}");
    assert!(!has_change(&report, &fx.t("target-one")), "the symlink was followed: {report:#}");
}

#[test]
fn file_replaced_by_directory_is_reported_as_type() {
    let fx = Fixture::new();
    let thing = fx.t("thing");
    write(&thing, "a file\n");
    fx.create_default();
    fs::remove_file(&thing).expect("remove");
    mkdir(&thing);

    let report = fx.verify(1);
    let change = change_for(&report, &thing);
    assert_eq!(change["kind"], "modified", "{change:#}");
    assert!(changed_attrs(change).contains(&"type"), "{change:#}");
    assert_eq!(change["old"]["type"], "file", "{change:#}");
    assert_eq!(change["new"]["type"], "dir", "{change:#}");
    assert!(change["new"]["hash"].is_null(), "{change:#}");
}

#[test]
fn new_hardlink_changes_nlink_of_original() {
    let fx = Fixture::new();
    let orig = fx.t("orig.txt");
    write(&orig, "shared\n");
    fx.create_default();
    let twin = fx.t("twin.txt");
    fs::hard_link(&orig, &twin).expect("hard link");

    let report = fx.verify(1);
    let change = change_for(&report, &orig);
    assert!(changed_attrs(change).contains(&"nlink"), "{change:#}");
    assert!(!changed_attrs(change).contains(&"content"), "{change:#}");
    assert_eq!(change["old"]["nlink"], 1, "{change:#}");
    assert_eq!(change["new"]["nlink"], 2, "{change:#}");
    assert_eq!(change_for(&report, &twin)["kind"], "added", "{report:#}");
}

#[test]
fn xattr_set_is_reported_as_xattrs() {
    let fx = Fixture::new();
    let file = fx.t("labelled");
    write(&file, "data\n");
    fx.create_default();
    let record = fx.show();
    assert_eq!(record_for(&record, &file)["xattrs"], serde_json::json!({}), "xattrs should start empty");
    tool(
        "setfattr",
        [OsStr::new("-n"), OsStr::new("user.kubefim"), OsStr::new("-v"), OsStr::new("hello"), file.as_os_str()],
    );

    let report = fx.verify(1);
    let change = change_for(&report, &file);
    let attrs = changed_attrs(change);
    assert!(attrs.contains(&"xattrs"), "{change:#}");
    assert!(!attrs.contains(&"content"), "{change:#}");
    assert!(change["new"]["xattrs"].get("user.kubefim").is_some(), "new xattrs lack user.kubefim: {change:#}");
}

#[test]
fn content_only_rule_ignores_chmod_and_chown() {
    let fx = Fixture::new();
    let file = fx.t("data");
    write(&file, "v1\n");
    chmod(&file, 0o644);
    let policy = fx.write_policy(&[Rule::new(fx.tree()).attributes(&["content"])]);
    fx.create(&policy);
    chmod(&file, 0o600);
    if is_root() {
        std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);

    // Content is still watched, and only content is named.
    write(&file, "v2, longer\n");
    let report = fx.verify(1);
    let change = change_for(&report, &file);
    assert_eq!(changed_attrs(change), ["content"], "only monitored attributes may be named: {change:#}");
}

// ---------------------------------------------------------------------------------------------
// Policy: excludes, empty policy, bad policies, filesystem boundaries
// ---------------------------------------------------------------------------------------------

#[test]
fn excluded_globs_are_not_recorded_and_do_not_fail_verify() {
    let fx = Fixture::new();
    let skip = fx.t("skip");
    mkdir(&skip);
    mkdir(&fx.t("sub"));
    write(&fx.t("keep.txt"), "keep\n");
    write(&fx.t("notes.swp"), "swap\n");
    write(&fx.t("sub/deep.swp"), "swap\n");
    write(&fx.t("sub/deep.txt"), "keep\n");
    write(&skip.join("inner.txt"), "skipped\n");
    // Directory timestamps change when entries are added; leave them out so that only the
    // excludes decide the outcome.
    let policy = fx.write_policy(&[Rule::new(fx.tree())
        .exclude("*.swp")
        .exclude(skip.to_str().unwrap())
        .attributes(&["type", "content", "mode", "uid", "gid"])]);
    fx.create(&policy);

    let records = fx.show();
    let paths = recorded_paths(&records);
    record_for(&records, &fx.t("keep.txt"));
    record_for(&records, &fx.t("sub/deep.txt"));
    for excluded in [fx.t("notes.swp"), fx.t("sub/deep.swp"), skip.clone(), skip.join("inner.txt")] {
        let p = excluded.to_str().unwrap();
        assert!(!paths.iter().any(|r| r == p), "excluded {p} was recorded: {paths:#?}");
    }

    write(&fx.t("notes.swp"), "changed swap\n");
    write(&fx.t("new.swp"), "new swap\n");
    write(&fx.t("sub/other.swp"), "new swap\n");
    write(&skip.join("inner.txt"), "changed\n");
    write(&skip.join("added.txt"), "added\n");
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);

    // Sanity: a non-excluded addition is still seen.
    write(&fx.t("sub/new.txt"), "seen\n");
    let report = fx.verify(1);
    assert_eq!(change_for(&report, &fx.t("sub/new.txt"))["kind"], "added", "{report:#}");
}

#[test]
fn empty_policy_creates_and_verifies_clean() {
    let fx = Fixture::new();
    let policy = fx.write_policy(&[]);
    fx.create(&policy);
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);
    assert_eq!(report["summary"]["scanned"], 0, "{report:#}");
    assert!(fx.show().is_empty(), "an empty policy recorded something");
}

#[test]
fn bad_policies_exit_2_naming_the_line() {
    let fx = Fixture::new();
    let ok = serde_json::to_string(fx.tree().to_str().unwrap()).unwrap();
    let head = format!(
        "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: test}}\nspec:\n  rules:\n    - path: {ok}\n      diff: true\n"
    );
    // (what, the rest of the document from line 8 on, the line the error is on)
    let cases = [
        ("unknown key", format!("    - path: {ok}\n      colour: blue\n"), 9),
        ("missing path", "    - exclude: [\"*.swp\"]\n      diff: true\n".to_owned(), 8),
        ("bad glob", format!("    - path: {ok}\n      exclude: [\"a[b\"]\n"), 9),
        ("relative path", "    - path: relative/dir\n".to_owned(), 8),
    ];
    for (what, tail, line) in cases {
        let policy = fx.write_policy_text(&format!("{head}{tail}"));
        let db = fx.path(format!("db-{}", what.replace(' ', "-")));
        let run = fx.create_run(&policy, &db);
        assert_eq!(run.status.code(), Some(2), "{what}: want exit 2\n{}\npolicy:\n{head}{tail}", run.dump());
        assert!(
            run.stderr.contains(&format!("line {line}")),
            "{what}: stderr does not name line {line}\n{}\npolicy:\n{head}{tail}",
            run.dump()
        );
    }
}

#[test]
fn scan_does_not_cross_filesystems() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let fx = Fixture::new();
    write(&fx.t("here.txt"), "here\n");
    let mnt = fx.t("mnt");
    mkdir(&mnt);
    let policy = fx.default_policy();
    // A private mount namespace: the tmpfs exists only for this create and vanishes with it.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs kubefim-test "$1" && echo other-fs > "$1/inside.txt" && exec "$2" baseline create --policy "$3" --db "$4" --key "$5""#)
        .arg("sh")
        .arg(&mnt)
        .arg(BIN)
        .arg(&policy)
        .arg(fx.db())
        .arg(fx.key());
    run_with_timeout(cmd, TIMEOUT).expect_code(0);

    let records = fx.show();
    record_for(&records, &fx.t("here.txt"));
    let inside = mnt.join("inside.txt");
    assert!(
        !recorded_paths(&records).iter().any(|p| p == inside.to_str().unwrap()),
        "the scan crossed into another filesystem: {:#?}",
        recorded_paths(&records)
    );
}

// ---------------------------------------------------------------------------------------------
// Hashes equal b3sum
// ---------------------------------------------------------------------------------------------

#[test]
fn hash_equals_b3sum_around_chunk_boundaries() {
    let fx = Fixture::new();
    let sizes = [0usize, 1, 1024, 1025, 65536, 65537, 3 << 20];
    for (i, size) in sizes.iter().enumerate() {
        write(&fx.t(format!("size-{size}")), random_bytes(i as u64 + 100, *size));
    }
    fx.create_default();
    let records = fx.show();
    for size in sizes {
        let path = fx.t(format!("size-{size}"));
        let record = record_for(&records, &path);
        assert_eq!(record["size"], size, "{record:#}");
        assert_eq!(record["hash"], b3sum(&path), "hash of a {size}-byte file differs from b3sum: {record:#}");
    }
}

#[test]
fn hash_of_2gib_sparse_file_equals_b3sum() {
    let fx = Fixture::new();
    let path = fx.t("sparse.img");
    let file = File::create(&path).expect("create sparse file");
    file.set_len(2 << 30).expect("set_len 2 GiB");
    file.write_all_at(b"not all zeros", 1 << 30).expect("write in the middle");
    drop(file);
    fx.create_default();
    let records = fx.show();
    let record = record_for(&records, &path);
    assert_eq!(record["size"], 2u64 << 30, "{record:#}");
    assert_eq!(record["hash"], b3sum(&path), "{record:#}");
}

// ---------------------------------------------------------------------------------------------
// Inputs that must not hang, crash or escape the tree
// ---------------------------------------------------------------------------------------------

#[test]
fn fifo_socket_and_device_are_recorded_without_being_opened() {
    let fx = Fixture::new();
    write(&fx.t("regular"), "plain\n");
    let fifo = fx.t("fifo");
    tool("mkfifo", [fifo.as_os_str()]);
    let sock = fx.t("sock");
    let _listener = UnixListener::bind(&sock).expect("bind unix socket");
    let dev = fx.t("null-dev");
    if is_root() {
        tool("mknod", [dev.as_os_str(), OsStr::new("c"), OsStr::new("1"), OsStr::new("3")]);
    }
    // create and verify run under the 60 s timeout: opening the FIFO would block forever.
    fx.create_default();

    let records = fx.show();
    let mut want = vec![(fifo, "fifo"), (sock, "socket")];
    if is_root() {
        want.push((dev, "char"));
    }
    for (path, kind) in want {
        let record = record_for(&records, &path);
        assert_eq!(record["type"], kind, "{record:#}");
        assert!(record["hash"].is_null(), "a {kind} has no content hash: {record:#}");
    }
    assert_eq!(record_for(&records, &fx.t("regular"))["hash"], b3sum(&fx.t("regular")));
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);
}

#[test]
fn symlink_loops_are_recorded_not_followed() {
    let fx = Fixture::new();
    symlink("b", fx.t("a")).expect("symlink a -> b");
    symlink("a", fx.t("b")).expect("symlink b -> a");
    mkdir(&fx.t("dir"));
    write(&fx.t("dir/file"), "x\n");
    symlink("..", fx.t("dir/up")).expect("symlink dir/up -> ..");
    symlink(fx.tree(), fx.t("dir/root")).expect("absolute symlink to the tree");
    fx.create_default();

    let records = fx.show();
    for (link, target) in [
        ("a", "b".to_owned()),
        ("b", "a".to_owned()),
        ("dir/up", "..".to_owned()),
        ("dir/root", fx.tree().to_str().unwrap().to_owned()),
    ] {
        let record = record_for(&records, &fx.t(link));
        assert_eq!(record["type"], "symlink", "{record:#}");
        assert_eq!(record["link_target"], target.as_str(), "{record:#}");
    }
    let followed: Vec<_> =
        recorded_paths(&records).into_iter().filter(|p| p.contains("/up/") || p.contains("/root/")).collect();
    assert!(followed.is_empty(), "symlinks were followed: {followed:#?}");
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);
}

#[test]
fn non_utf8_file_name_is_escaped_carries_path_hex_and_is_verified() {
    let fx = Fixture::new();
    let tree = fx.tree();
    let bad = tree.join(OsStr::from_bytes(b"bad\xffname"));
    let slashy = tree.join(OsStr::from_bytes(b"a\\b\xfe"));
    let utf8_backslash = tree.join("plain\\name");
    let odd_link = tree.join("odd-link");
    symlink(OsStr::from_bytes(b"tgt\xfe"), &odd_link).expect("symlink to a non-UTF-8 target");
    write(&bad, "one\n");
    write(&slashy, "two\n");
    write(&utf8_backslash, "three\n");
    fx.create_default();

    let records = fx.show();
    let prefix = tree.to_str().unwrap();
    for (path, printed) in [(&bad, format!(r"{prefix}/bad\xffname")), (&slashy, format!(r"{prefix}/a\\b\xfe"))] {
        let hex = hex::encode(path.as_os_str().as_bytes());
        let record = records
            .iter()
            .find(|r| r["path_hex"] == hex.as_str())
            .unwrap_or_else(|| panic!("no record with path_hex {hex}; recorded: {:#?}", recorded_paths(&records)));
        assert_eq!(record["path"], printed.as_str(), "{record:#}");
        assert_eq!(record["hash"], b3sum(path), "{record:#}");
    }
    let link = record_for(&records, &odd_link);
    assert_eq!(link["link_target"], r"tgt\xfe", "{link:#}");
    assert_eq!(link["link_target_hex"], hex::encode(b"tgt\xfe"), "{link:#}");
    let plain = record_for(&records, &utf8_backslash);
    assert!(plain.get("path_hex").is_none_or(Value::is_null), "a UTF-8 path needs no path_hex: {plain:#}");

    write(&bad, "one, modified\n");
    let report = fx.verify(1);
    let hex = hex::encode(bad.as_os_str().as_bytes());
    let change = changes(&report)
        .iter()
        .find(|c| c["path_hex"] == hex.as_str())
        .unwrap_or_else(|| panic!("the non-UTF-8 file's change is missing or lacks path_hex {hex}: {report:#}"));
    assert_eq!(change["kind"], "modified", "{change:#}");
    assert_eq!(change["path"], format!(r"{prefix}/bad\xffname").as_str(), "{change:#}");
    assert!(changed_attrs(change).contains(&"content"), "{change:#}");
    assert_eq!(changes(&report).len(), 1, "only the modified file changed: {report:#}");
}

#[test]
fn deep_tree_of_depth_300() {
    let fx = Fixture::new();
    let mut deep = fx.tree();
    for _ in 0..300 {
        deep.push("d");
    }
    mkdir(&deep);
    let leaf = deep.join("leaf.txt");
    write(&leaf, "deep\n");
    fx.create_default();
    let records = fx.show();
    assert_eq!(record_for(&records, &leaf)["hash"], b3sum(&leaf));
    fx.verify(0);

    write(&leaf, "deeper\n");
    let report = fx.verify(1);
    assert_eq!(change_for(&report, &leaf)["kind"], "modified", "{report:#}");
}

// ---------------------------------------------------------------------------------------------
// Symlinks in the middle of a path, and paths longer than PATH_MAX
// ---------------------------------------------------------------------------------------------

/// A marker line that must never be read: it lives outside every monitored tree.
const OUTSIDE_MARKER: &str = "OUTSIDE-MARKER-must-never-be-read";

/// Asserts that nothing `runs` printed, and nothing stored under `db`, holds [`OUTSIDE_MARKER`].
#[track_caller]
fn assert_outside_never_read(runs: &[&Run], db: &Path) {
    for r in runs {
        assert!(
            !r.stdout.contains(OUTSIDE_MARKER) && !r.stderr.contains(OUTSIDE_MARKER),
            "content from outside the monitored tree leaked through {}\n{}",
            r.cmdline,
            r.dump()
        );
    }
    for_each_file(db, &mut |path| {
        let bytes = fs::read(path).expect("read db file");
        assert!(
            find_bytes(&bytes, OUTSIDE_MARKER.as_bytes()).is_none(),
            "content from outside the monitored tree stored in {}",
            path.display()
        );
    });
}

#[test]
fn host_root_resolves_symlinks_inside_the_host_root_never_outside_it() {
    let fx = Fixture::new();
    let host = fx.path("hostroot");
    // The host's /srv is an absolute symlink to a directory that exists outside the host
    // root (on the agent's side): it must be read as the host would, inside the host root,
    // where there is nothing.
    let outside = fx.path("outside");
    mkdir(&outside.join("app"));
    write(&outside.join("app/shadow"), format!("root:{OUTSIDE_MARKER}\n"));
    mkdir(&host);
    symlink(&outside, host.join("srv")).expect("symlink");
    // The host's /opt is an absolute symlink to /hostopt: inside the host root, it is there.
    mkdir(&host.join("hostopt/conf"));
    write(&host.join("hostopt/conf/a.txt"), "inside the host\n");
    symlink("/hostopt", host.join("opt")).expect("symlink");
    let policy = fx.write_policy(&[Rule::new("/srv/app").diff(), Rule::new("/opt/conf").diff()]);
    let with_host = |mut argv: Vec<OsString>| {
        argv.extend(["--host-root".into(), host.as_os_str().to_owned()]);
        argv
    };
    let create = kubefim(with_host(args(&[
        "baseline".as_ref(),
        "create".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--key".as_ref(),
        fx.key().as_os_str(),
    ])));
    create.expect_code(0);
    let records = fx.show();
    let paths = recorded_paths(&records);
    assert!(!paths.iter().any(|p| p.starts_with("/srv/app/")), "/srv/app was read outside the host root: {paths:?}");
    let conf = record_for(&records, Path::new("/opt/conf/a.txt"));
    assert_eq!(conf["type"], "file", "{conf:#}");
    assert!(conf["hash"].is_string(), "{conf:#}");

    // A later verify resolves the same way: clean.
    let verify = kubefim(with_host(args(&[
        "verify".as_ref(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--pubkey".as_ref(),
        fx.pubkey().as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ])));
    verify.expect_code(0);
    let show = fx.show_with(&fx.db(), &fx.pubkey());
    assert_outside_never_read(&[&create, &verify, &show], &fx.db());
}

#[test]
fn a_nested_rule_root_whose_parent_became_a_symlink_is_not_read_through_it() {
    // The inner rule's root is walked on its own when it is another file system than the
    // outer rule's: here, because its parent `d` was replaced by a symlink to a tmpfs. Its
    // path must be resolved inside the outer rule's root, where `d` is a symlink.
    let fx = Fixture::new();
    let elsewhere = tempfile::Builder::new()
        .prefix("kubefim-outside-")
        .tempdir_in("/dev/shm")
        .expect("a temp dir on /dev/shm (tmpfs)");
    mkdir(&elsewhere.path().join("inner"));
    write(&elsewhere.path().join("inner/shadow"), format!("root:{OUTSIDE_MARKER}\n"));
    mkdir(&fx.t("d/inner"));
    write(&fx.t("d/inner/shadow"), "root:x:monitored\n");
    let policy = fx.write_policy(&[Rule::new(fx.tree()), Rule::new(fx.t("d/inner")).diff()]);
    fx.create(&policy);

    fs::rename(fx.t("d"), fx.path("d.old")).expect("move d away");
    symlink(elsewhere.path(), fx.t("d")).expect("symlink");
    let run = fx.verify_run();
    run.expect_code(1);
    let report = run.json();
    let d = change_for(&report, &fx.t("d"));
    assert_eq!(d["kind"], "modified", "{d:#}");
    assert!(changed_attrs(d).contains(&"type"), "{d:#}");
    assert_eq!(d["new"]["type"], "symlink", "{d:#}");
    let shadow = change_for(&report, &fx.t("d/inner/shadow"));
    assert_eq!(shadow["kind"], "removed", "a path under a symlink is not in the tree: {shadow:#}");
    assert!(shadow["new"].is_null() && shadow.get("diff").is_none_or(Value::is_null), "{shadow:#}");
    assert_outside_never_read(&[&run], &fx.db());
}

/// Writes `content` to `leaf.txt` at the bottom of `levels` nested directories named `name`
/// under `base` (made as needed), through directory descriptors: the whole path is longer
/// than PATH_MAX, which path-based calls refuse. Returns the leaf's path.
#[track_caller]
fn write_deep(base: &Path, name: &str, levels: usize, content: &str) -> std::path::PathBuf {
    use rustix::fs::{Mode, OFlags};
    use std::io::Write;
    let mut dir = rustix::fs::open(base, OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).expect("open base");
    let mut path = base.to_owned();
    for _ in 0..levels {
        match rustix::fs::mkdirat(&dir, name, Mode::from(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => panic!("mkdir {}/{name}: {e}", path.display()),
        }
        dir = rustix::fs::openat(&dir, name, OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .unwrap_or_else(|e| panic!("open {}/{name}: {e}", path.display()));
        path.push(name);
    }
    let leaf = rustix::fs::openat(
        &dir,
        "leaf.txt",
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::CLOEXEC,
        Mode::from(0o644),
    )
    .expect("create the deep leaf");
    File::from(leaf).write_all(content.as_bytes()).expect("write the deep leaf");
    path.join("leaf.txt")
}

#[test]
fn a_tree_deeper_than_path_max_is_recorded_and_verified() {
    let fx = Fixture::new();
    let name = "d".repeat(200);
    let leaf = write_deep(&fx.tree(), &name, 25, "deep\n");
    assert!(leaf.as_os_str().len() > 4096, "the test needs a path longer than PATH_MAX");
    fx.create_default();
    let records = fx.show();
    let record = record_for(&records, &leaf);
    assert!(record["error"].is_null(), "{record:#}");
    // BLAKE3 of "deep\n" (b3sum cannot open the path to check it).
    assert_eq!(record["hash"], "53ee0df288d4f5a6e3ffca5d41ecb6eaf0d3d50cf6441c362a7d0f3bf37728a0", "{record:#}");
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);

    write_deep(&fx.tree(), &name, 25, "deeper\n");
    let report = fx.verify(1);
    assert_summary(&report, 0, 0, 1, 0);
    let change = change_for(&report, &leaf);
    assert_eq!(change["kind"], "modified", "{change:#}");
    assert!(changed_attrs(change).contains(&"content"), "{change:#}");
}

#[test]
fn unreadable_file_and_dir_are_warnings_not_fatal() {
    if !is_root() {
        eprintln!("skipped: needs root to drop to uid {NOBODY} with setpriv");
        return;
    }
    let fx = Fixture::bare();
    // The run as nobody must reach the tree, write its db and read its key.
    chmod(fx.root.path(), 0o755);
    let tree = fx.tree();
    mkdir(&tree);
    write(&tree.join("readable.txt"), "fine\n");
    let unreadable = tree.join("unreadable.key");
    write(&unreadable, "no peeking\n");
    chmod(&unreadable, 0o000);
    let locked = tree.join("locked");
    mkdir(&locked);
    write(&locked.join("inner.txt"), "hidden\n");
    chmod(&locked, 0o000);
    let state = fx.path("state");
    mkdir(&state);
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).expect("chown state dir");
    let keys = state.join("keys");
    let db = state.join("db");
    kubefim_as_nobody([OsStr::new("keygen"), OsStr::new("--out"), keys.as_os_str()]).expect_code(0);
    let key = keys.join("kubefim.key");
    let pubkey = keys.join("kubefim.pub");
    let policy = fx.write_policy(&[Rule::new(&tree)]);
    chmod(&policy, 0o644);

    let create = kubefim_as_nobody(args(&[
        "baseline".as_ref(),
        "create".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
    ]));
    create.expect_code(0);
    for path in [&unreadable, &locked] {
        assert!(
            create.stderr.contains(path.to_str().unwrap()),
            "no warning naming {} on stderr\n{}",
            path.display(),
            create.dump()
        );
    }

    // As nobody too: a root-run sled open could leave root-owned files in nobody's db.
    let records = kubefim_as_nobody(args(&[
        "baseline".as_ref(),
        "show".as_ref(),
        "--db".as_ref(),
        db.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
        "--format".as_ref(),
        "jsonl".as_ref(),
    ]));
    records.expect_code(0);
    let records = records.jsonl();
    let file = record_for(&records, &unreadable);
    assert_eq!(file["type"], "file", "{file:#}");
    assert!(file["hash"].is_null(), "an unreadable file has no hash: {file:#}");
    assert!(file["error"].is_string(), "an unreadable file records why: {file:#}");
    let dir = record_for(&records, &locked);
    assert_eq!(dir["type"], "dir", "{dir:#}");
    record_for(&records, &tree.join("readable.txt"));

    // Verify as the same user: the unreadable file cannot be verified, so not clean.
    let verify = kubefim_as_nobody(args(&[
        "verify".as_ref(),
        "--db".as_ref(),
        db.as_os_str(),
        "--pubkey".as_ref(),
        pubkey.as_os_str(),
        "--format".as_ref(),
        "json".as_ref(),
    ]));
    verify.expect_code(1);
    let report = verify.json();
    assert_eq!(report["summary"]["clean"], false, "{report:#}");
    assert!(report["summary"]["unverified"].as_u64() >= Some(1), "{report:#}");
    let errors = report["errors"].as_array().unwrap_or_else(|| panic!("no errors array: {report:#}"));
    assert!(
        errors.iter().any(|e| e["path"] == unreadable.to_str().unwrap()),
        "errors do not list {}: {report:#}",
        unreadable.display()
    );

    // Last, so the checks above run whatever this says: the dir's entries were never listed,
    // so its record is not complete and must say why.
    assert!(dir["error"].is_string(), "an unreadable dir records why: {dir:#}\ncreate's stderr:\n{}", create.stderr);
}

// ---------------------------------------------------------------------------------------------
// accept
// ---------------------------------------------------------------------------------------------

#[test]
fn accept_of_one_path_leaves_the_other_change_and_accept_all_cleans() {
    let fx = Fixture::new();
    let a = fx.t("a.txt");
    let b = fx.t("b.txt");
    write(&a, "a1\n");
    write(&b, "b1\n");
    fx.create_default();
    write(&a, "a2, changed\n");
    write(&b, "b2, changed\n");
    let report = fx.verify(1);
    change_for(&report, &a);
    change_for(&report, &b);

    fx.accept(&[&a]).expect_code(0);
    let report = fx.verify(1);
    assert_eq!(changed_paths(&report), [b.to_str().unwrap()], "only b.txt should remain changed: {report:#}");
    let records = fx.show();
    assert_eq!(record_for(&records, &a)["hash"], b3sum(&a), "accepted content not recorded");

    fx.accept(&[]).expect_code(0);
    let report = fx.verify(0);
    assert_summary(&report, 0, 0, 0, 0);
}

// ---------------------------------------------------------------------------------------------
// An untrusted baseline: exit 3
// ---------------------------------------------------------------------------------------------

/// Copies the fixture db, damages the copy's largest file with `damage`, and checks that
/// verify and show both refuse it with exit 3, while the original still verifies.
#[track_caller]
fn assert_damaged_db_untrusted(fx: &Fixture, what: &str, damage: impl Fn(&Path)) {
    fx.verify(0);
    let tampered = fx.path("db-tampered");
    copy_dir(&fx.db(), &tampered);
    damage(&largest_file(&tampered));
    // show gets its own copy: opening a damaged sled db may rewrite it.
    let tampered_show = fx.path("db-tampered-show");
    copy_dir(&tampered, &tampered_show);

    let verify = fx.verify_with(&tampered, &fx.pubkey());
    assert_eq!(verify.status.code(), Some(3), "{what}: verify want exit 3\n{}", verify.dump());
    let show = fx.show_with(&tampered_show, &fx.pubkey());
    assert_eq!(show.status.code(), Some(3), "{what}: show want exit 3\n{}", show.dump());
    fx.verify(0);
}

/// A tree whose baseline has a recognisable file name to aim damage at.
const MARKER: &str = "tamper-marker-7f3a9c.txt";

fn tamper_fixture() -> Fixture {
    let fx = Fixture::new();
    for i in 0..20 {
        write(&fx.t(format!("file-{i:02}.txt")), format!("content {i}\n"));
    }
    write(&fx.t(MARKER), "marker\n");
    fx.create_default();
    fx
}

#[test]
fn flipped_byte_in_db_file_is_untrusted() {
    let fx = tamper_fixture();
    assert_damaged_db_untrusted(&fx, "flipped byte", |file| {
        let mut bytes = fs::read(file).expect("read db file");
        // Aim at a record (its key holds the marker's name); else the middle of the data.
        let at = find_bytes(&bytes, MARKER.as_bytes()).map_or(used_len(&bytes) / 2, |i| i + 7);
        bytes[at] ^= 0x01;
        fs::write(file, bytes).expect("write db file");
    });
}

#[test]
fn truncated_db_file_is_untrusted() {
    let fx = tamper_fixture();
    assert_damaged_db_untrusted(&fx, "truncated", |file| {
        let bytes = fs::read(file).expect("read db file");
        let half = used_len(&bytes) / 2;
        OpenOptions::new().write(true).open(file).expect("open").set_len(half as u64).expect("truncate");
    });
}

#[test]
fn garbled_db_file_is_untrusted() {
    let fx = tamper_fixture();
    assert_damaged_db_untrusted(&fx, "garbled", |file| {
        let mut bytes = fs::read(file).expect("read db file");
        let used = used_len(&bytes);
        let start = (used / 2).saturating_sub(2048);
        let end = (start + 4096).min(bytes.len());
        bytes[start..end].copy_from_slice(&random_bytes(99, end - start));
        fs::write(file, bytes).expect("write db file");
    });
}

#[test]
fn wrong_public_key_is_untrusted() {
    let fx = tamper_fixture();
    let other = fx.path("other-keys");
    fx.keygen_into(&other);
    let other_pub = other.join("kubefim.pub");
    let verify = fx.verify_with(&fx.db(), &other_pub);
    verify.expect_code(3);
    fx.show_with(&fx.db(), &other_pub).expect_code(3);
    let accept = kubefim(args(&[
        "baseline".as_ref(),
        "accept".as_ref(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--key".as_ref(),
        fx.key().as_os_str(),
        "--pubkey".as_ref(),
        other_pub.as_os_str(),
    ]));
    accept.expect_code(3);
    fx.verify(0);
}

#[test]
fn missing_or_empty_public_key_is_an_error() {
    let fx = tamper_fixture();
    let missing = fx.path("no-such.pub");
    let empty = fx.path("empty.pub");
    write(&empty, "");
    for pubkey in [&missing, &empty] {
        for run in [fx.verify_with(&fx.db(), pubkey), fx.show_with(&fx.db(), pubkey)] {
            let code = run.code();
            assert!(code == 2 || code == 3, "{}: want exit 2 or 3, got {code}\n{}", run.cmdline, run.dump());
        }
    }
}

#[test]
fn missing_db_is_untrusted() {
    let fx = Fixture::new();
    let db = fx.path("no-such-db");
    fx.verify_with(&db, &fx.pubkey()).expect_code(3);
    fx.show_with(&db, &fx.pubkey()).expect_code(3);
}

#[test]
fn baseline_accepted_with_another_key_is_untrusted_under_the_first() {
    let fx = tamper_fixture();
    let b = fx.path("keys-b");
    fx.keygen_into(&b);
    // A's public key vouches for the old baseline; B signs the new one.
    kubefim(args(&[
        "baseline".as_ref(),
        "accept".as_ref(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--key".as_ref(),
        b.join("kubefim.key").as_os_str(),
        "--pubkey".as_ref(),
        fx.pubkey().as_os_str(),
    ]))
    .expect_code(0);
    fx.verify_with(&fx.db(), &fx.pubkey()).expect_code(3);
    fx.show_with(&fx.db(), &fx.pubkey()).expect_code(3);
    fx.verify_with(&fx.db(), &b.join("kubefim.pub")).expect_code(0);
}

/// `kubefim debug tamper --db DB --op OP [--other-db OTHER] [--reseal-with KEY]`: edits the
/// store directly, without re-signing; then verify and show must exit 3. Each edit is made
/// twice: once as is (the file-level seal catches it) and once with the seal re-signed by
/// the right key, so that only the signature over the records can catch it, and must.
#[track_caller]
fn assert_debug_tamper_untrusted(op: &str) {
    for reseal in [false, true] {
        let fx = tamper_fixture();
        fx.verify(0);
        let mut argv = args(&[
            "debug".as_ref(),
            "tamper".as_ref(),
            "--db".as_ref(),
            fx.db().as_os_str(),
            "--op".as_ref(),
            op.as_ref(),
        ]);
        if op == "swap-signature" {
            // Another baseline signed by the same key: a valid signature, of something else.
            let other_tree = fx.path("other-tree");
            mkdir(&other_tree);
            write(&other_tree.join("x"), "other\n");
            let policy = fx.path("other-policy.yaml");
            write(&policy, policy_yaml(&[Rule::new(&other_tree)]));
            let other_db = fx.path("other-db");
            fx.create_run(&policy, &other_db).expect_code(0);
            fx.verify_with(&other_db, &fx.pubkey()).expect_code(0);
            argv.push("--other-db".into());
            argv.push(other_db.into());
        }
        if reseal {
            argv.push("--reseal-with".into());
            argv.push(fx.key().into());
        }
        kubefim(argv).expect_code(0);
        let verify = fx.verify_run();
        assert_eq!(
            verify.status.code(),
            Some(3),
            "after {op} (reseal {reseal}): verify want exit 3\n{}",
            verify.dump()
        );
        let caught_by = if reseal { "signature" } else { "seal" };
        let other = if reseal { "seal" } else { "its signature" };
        assert!(
            verify.stderr.contains(caught_by) && !verify.stderr.contains(other),
            "after {op} (reseal {reseal}): want it caught by the {caught_by}\n{}",
            verify.dump()
        );
        let show = fx.show_with(&fx.db(), &fx.pubkey());
        assert_eq!(show.status.code(), Some(3), "after {op} (reseal {reseal}): show want exit 3\n{}", show.dump());
    }
}

#[test]
fn edited_record_is_untrusted() {
    assert_debug_tamper_untrusted("edit-record");
}

#[test]
fn inserted_record_is_untrusted() {
    assert_debug_tamper_untrusted("insert-record");
}

#[test]
fn deleted_record_is_untrusted() {
    assert_debug_tamper_untrusted("delete-record");
}

#[test]
fn dropped_signature_is_untrusted() {
    assert_debug_tamper_untrusted("drop-signature");
}

#[test]
fn swapped_signature_is_untrusted() {
    assert_debug_tamper_untrusted("swap-signature");
}

// ---------------------------------------------------------------------------------------------
// A create killed part-way
// ---------------------------------------------------------------------------------------------

/// Kill points spread over a full create of the 20k-file tree (about 0.8 s on a 2-core
/// machine under load; longer on a slower one, which only moves the kills earlier).
const KILL_DELAYS_MS: [u64; 4] = [50, 150, 300, 500];

#[test]
fn killed_create_leaves_previous_baseline_verifying() {
    let fx = Fixture::new();
    big_tree(&fx, 100, 200);
    let policy = fx.default_policy();
    let started = Instant::now();
    fx.create(&policy);
    eprintln!("full create of 20k files took {:?}", started.elapsed());
    fx.verify(0);

    for delay in KILL_DELAYS_MS {
        let mut child = spawn_create(&fx, &policy, &fx.db());
        thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let status = child.wait().expect("wait for killed create");
        let verify = fx.verify_run();
        assert_eq!(
            verify.status.code(),
            Some(0),
            "after create was killed at {delay} ms ({status:?}) the previous baseline no longer verifies\n{}",
            verify.dump()
        );
    }
}

#[test]
fn killed_first_create_never_verifies() {
    let fx = Fixture::new();
    big_tree(&fx, 100, 200);
    let policy = fx.default_policy();
    for delay in KILL_DELAYS_MS {
        let db = fx.path(format!("db-killed-{delay}"));
        let mut child = spawn_create(&fx, &policy, &db);
        thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let status = child.wait().expect("wait for killed create");
        // A create that beat the kill exits 0 (an unreaped child ignores SIGKILL) and has
        // written a whole baseline.
        let finished_first = status.success();
        let verify = fx.verify_with(&db, &fx.pubkey());
        let want = if finished_first { 0 } else { 3 };
        assert_eq!(
            verify.status.code(),
            Some(want),
            "create killed at {delay} ms ({status:?}, finished first: {finished_first}): a partial baseline must be untrusted\n{}",
            verify.dump()
        );
    }
}

#[test]
fn added_or_removed_file_in_db_dir_is_untrusted() {
    let fx = tamper_fixture();
    // A planted file: sled would read e.g. a `snap.*` file as its snapshot.
    let planted = fx.path("db-planted");
    copy_dir(&fx.db(), &planted);
    let big = largest_file(&planted);
    fs::copy(&big, planted.join("snap.0000000000000000")).expect("plant a file");
    fx.verify_with(&planted, &fx.pubkey()).expect_code(3);
    fx.show_with(&planted, &fx.pubkey()).expect_code(3);

    // Each file of the db dir removed in turn.
    let mut files = Vec::new();
    for_each_file(&fx.db(), &mut |path| files.push(path.strip_prefix(fx.db()).unwrap().to_owned()));
    assert!(!files.is_empty(), "no files in the db dir");
    for (i, rel) in files.iter().enumerate() {
        let copy = fx.path(format!("db-missing-{i}"));
        copy_dir(&fx.db(), &copy);
        fs::remove_file(copy.join(rel)).expect("remove db file");
        let verify = fx.verify_with(&copy, &fx.pubkey());
        assert_eq!(
            verify.status.code(),
            Some(3),
            "db without {}: verify want exit 3\n{}",
            rel.display(),
            verify.dump()
        );
    }
    fx.verify(0);
}

#[test]
fn db_path_that_is_a_file_is_untrusted() {
    let fx = Fixture::new();
    let db = fx.path("db-is-a-file");
    write(&db, "not a database\n");
    fx.verify_with(&db, &fx.pubkey()).expect_code(3);
    fx.show_with(&db, &fx.pubkey()).expect_code(3);
}

#[test]
fn rule_on_a_single_file() {
    let fx = Fixture::new();
    let watched = fx.t("watched.conf");
    let other = fx.t("other.conf");
    write(&watched, "a=1\n");
    write(&other, "b=1\n");
    let policy = fx.write_policy(&[Rule::new(&watched)]);
    fx.create(&policy);
    let records = fx.show();
    assert_eq!(recorded_paths(&records), [watched.to_str().unwrap()], "a file rule records that file only");
    write(&other, "b=2, not watched\n");
    fx.verify(0);
    write(&watched, "a=2, watched\n");
    let report = fx.verify(1);
    assert_eq!(change_for(&report, &watched)["kind"], "modified", "{report:#}");
}

#[test]
fn removed_rule_root_is_reported_not_fatal() {
    let fx = Fixture::new();
    let root = fx.t("watched");
    mkdir(&root.join("sub"));
    write(&root.join("sub/file"), "x\n");
    let policy = fx.write_policy(&[Rule::new(&root)]);
    fx.create(&policy);
    fs::remove_dir_all(&root).expect("remove the rule's root");
    let report = fx.verify(1);
    for path in [root.clone(), root.join("sub"), root.join("sub/file")] {
        assert_eq!(change_for(&report, &path)["kind"], "removed", "{report:#}");
    }
}

#[test]
fn accept_of_added_and_removed_paths() {
    let fx = Fixture::new();
    let gone = fx.t("gone.txt");
    let stays = fx.t("stays.txt");
    write(&gone, "soon gone\n");
    write(&stays, "v1\n");
    fx.create_default();
    fs::remove_file(&gone).expect("remove");
    let new = fx.t("new.txt");
    write(&new, "new\n");
    write(&stays, "v2, not accepted\n");

    fx.accept(&[&gone, &new]).expect_code(0);
    let report = fx.verify(1);
    assert!(!has_change(&report, &gone), "accepted removal still reported: {report:#}");
    assert!(!has_change(&report, &new), "accepted addition still reported: {report:#}");
    assert_eq!(change_for(&report, &stays)["kind"], "modified", "{report:#}");
    let records = fx.show();
    record_for(&records, &new);
    assert!(
        !recorded_paths(&records).iter().any(|p| p == gone.to_str().unwrap()),
        "an accepted removal is still recorded"
    );
}

#[test]
fn missing_policy_or_key_exits_2() {
    let fx = Fixture::new();
    let run = fx.create_run(&fx.path("no-such-policy.yaml"), &fx.db());
    run.expect_code(2);
    let policy = fx.default_policy();
    let run = kubefim(args(&[
        "baseline".as_ref(),
        "create".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--key".as_ref(),
        fx.path("no-such.key").as_os_str(),
    ]));
    run.expect_code(2);
    assert!(!fx.db().exists(), "a failed create left a db behind");
}

/// A command that must fail, and what its one error line must say.
struct Failing<'a> {
    what: &'a str,
    argv: Vec<OsString>,
    code: i32,
    /// The path the error is about.
    path: &'a Path,
    /// What to do about it (a flag, a command, a remedy).
    hint: &'a str,
    /// The text of the cause (an OS error's), which must be said exactly once.
    cause: Option<&'a str>,
}

/// Real failing commands of the real binary: each says, on one `kubefim: error:` line, which
/// path, what to do, and its cause once (messages used to print their source and then main
/// printed it again as the next link of the chain).
#[test]
fn errors_name_the_path_say_what_to_do_and_their_cause_once() {
    const ENOENT: &str = "No such file or directory";
    let fx = Fixture::new();
    let policy = fx.default_policy();
    let (key, pubkey, db) = (fx.key(), fx.pubkey(), fx.db());
    let (no_policy, no_key, no_pubkey) =
        (fx.path("no-such-policy.yaml"), fx.path("no-such.key"), fx.path("no-such.pub"));
    let (no_root, file) = (fx.path("no-such-root"), fx.path("a-regular-file"));
    write(&file, "not a directory\n");
    let tree = fx.tree();
    let create = |policy: &Path, db: &Path, key: &Path| {
        let (policy, db, key) = (policy.as_os_str(), db.as_os_str(), key.as_os_str());
        args(&[
            "baseline".as_ref(),
            "create".as_ref(),
            "--policy".as_ref(),
            policy,
            "--db".as_ref(),
            db,
            "--key".as_ref(),
            key,
        ])
    };
    let verify = |db: &Path, pubkey: &Path| {
        args(&["verify".as_ref(), "--db".as_ref(), db.as_os_str(), "--pubkey".as_ref(), pubkey.as_os_str()])
    };
    let with_host_root = |mut argv: Vec<OsString>, dir: &Path| {
        argv.extend(["--host-root".into(), dir.as_os_str().to_owned()]);
        argv
    };
    let cases = [
        Failing {
            what: "missing policy",
            argv: create(&no_policy, &db, &key),
            code: 2,
            path: &no_policy,
            hint: "`kubefim default-policy` prints one",
            cause: Some(ENOENT),
        },
        Failing {
            what: "policy that is a directory",
            argv: create(&tree, &db, &key),
            code: 2,
            path: &tree,
            hint: "a FimPolicy YAML file",
            cause: Some("Is a directory"),
        },
        Failing {
            what: "missing private key",
            argv: create(&policy, &db, &no_key),
            code: 2,
            path: &no_key,
            hint: "the kubefim.key that `kubefim keygen` wrote",
            cause: Some(ENOENT),
        },
        Failing {
            what: "create with a --db that is a regular file",
            argv: create(&policy, &file, &key),
            code: 2,
            path: &file,
            hint: "remove it or choose another --db path",
            cause: None,
        },
        Failing {
            what: "verify with a --db that is a regular file",
            argv: verify(&file, &pubkey),
            code: 3,
            path: &file,
            hint: "check the --db path",
            cause: None,
        },
        Failing {
            what: "missing public key",
            argv: verify(&db, &no_pubkey),
            code: 2,
            path: &no_pubkey,
            hint: "the kubefim.pub that `kubefim keygen` wrote",
            cause: Some(ENOENT),
        },
        Failing {
            what: "missing --host-root",
            argv: with_host_root(verify(&db, &pubkey), &no_root),
            code: 2,
            path: &no_root,
            hint: "--host-root takes the absolute path of the directory the host's / is mounted at",
            cause: Some(ENOENT),
        },
        Failing {
            what: "--host-root that is a regular file",
            argv: with_host_root(create(&policy, &db, &key), &file),
            code: 2,
            path: &file,
            hint: "--host-root takes the absolute path",
            cause: Some("not a directory"),
        },
        Failing {
            what: "missing database",
            argv: verify(&db, &pubkey),
            code: 3,
            path: &db,
            hint: "create one with `kubefim baseline create`",
            cause: None,
        },
    ];
    for case in cases {
        let run = kubefim(&case.argv);
        let what = case.what;
        assert_eq!(run.code(), case.code, "{what}: want exit {}\n{}", case.code, run.dump());
        let errors: Vec<&str> = run.stderr.lines().filter(|l| l.starts_with("kubefim: error: ")).collect();
        assert_eq!(errors.len(), 1, "{what}: want one error line\n{}", run.dump());
        let line = errors[0];
        assert!(line.contains(case.path.to_str().unwrap()), "{what}: the error does not name the path\n{}", run.dump());
        assert!(line.contains(case.hint), "{what}: the error does not say {:?}\n{}", case.hint, run.dump());
        if let Some(cause) = case.cause {
            assert_eq!(line.matches(cause).count(), 1, "{what}: want the cause {cause:?} said once\n{}", run.dump());
        }
        assert!(!db.exists(), "{what}: a failed command left a database behind\n{}", run.dump());
    }
}

// ---------------------------------------------------------------------------------------------
// Usage errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unknown_flag_exits_2() {
    let fx = Fixture::new();
    let run = kubefim(args(&[
        "verify".as_ref(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--pubkey".as_ref(),
        fx.pubkey().as_os_str(),
        "--no-such-flag".as_ref(),
    ]));
    run.expect_code(2);
    assert!(!run.stderr.is_empty(), "a usage error says why on stderr\n{}", run.dump());
    kubefim(["no-such-subcommand"]).expect_code(2);
}

#[test]
fn verify_without_db_exits_2() {
    let fx = Fixture::new();
    let run = kubefim(args(&["verify".as_ref(), "--pubkey".as_ref(), fx.pubkey().as_os_str()]));
    run.expect_code(2);
    assert!(run.stderr.contains("--db"), "the error should name the missing flag\n{}", run.dump());
}

#[test]
fn unknown_format_exits_2() {
    let fx = tamper_fixture();
    let run = kubefim(args(&[
        "verify".as_ref(),
        "--db".as_ref(),
        fx.db().as_os_str(),
        "--pubkey".as_ref(),
        fx.pubkey().as_os_str(),
        "--format".as_ref(),
        "xml".as_ref(),
    ]));
    run.expect_code(2);
}

// ---------------------------------------------------------------------------------------------
// Files that vanish or change while the scan runs
// ---------------------------------------------------------------------------------------------

#[test]
fn files_vanishing_and_changing_during_the_scan_are_not_fatal() {
    let fx = Fixture::new();
    big_tree(&fx, 20, 250);
    let churn_dir = fx.t("churn");
    mkdir(&churn_dir);
    let growing = fx.t("growing.log");
    write(&growing, "start\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, churn_dir, growing) = (stop.clone(), churn_dir.clone(), growing.clone());
        thread::spawn(move || {
            let mut log = OpenOptions::new().append(true).open(&growing).expect("open growing file");
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let p = churn_dir.join(format!("f{}", n % 64));
                let _ = fs::write(&p, vec![b'x'; 200_000]);
                let _ = fs::remove_file(churn_dir.join(format!("f{}", (n + 32) % 64)));
                let _ = std::io::Write::write_all(&mut log, &[b'y'; 4096]);
                n += 1;
            }
            n
        })
    };
    let policy = fx.default_policy();
    let runs: Vec<Run> = (0..3).map(|_| fx.create_run(&policy, &fx.db())).collect();
    let verify = fx.verify_run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned = churn.join().expect("churn thread");
    assert!(churned > 10, "the churn thread barely ran ({churned} rounds)");
    for run in &runs {
        run.expect_code(0);
        for line in run.stderr.lines().filter(|l| l.starts_with("warning:")) {
            assert!(
                line.contains("vanished during the scan") || line.contains("changed while being read"),
                "unexpected warning during churn: {line}\n{}",
                run.dump()
            );
        }
    }
    // The tree kept changing after the last create: differences, never an error or "untrusted".
    assert!(matches!(verify.code(), 0 | 1), "verify during churn must compare, got\n{}", verify.dump());
}

#[test]
fn verify_says_entries_under_a_new_mount_are_hidden_not_removed() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "mount tests need root and CI runs as root");
        eprintln!("skipped: mounting needs root");
        return;
    }
    let fx = Fixture::new();
    write(&fx.t("kubelet.conf"), "server: https://real\n");
    mkdir(&fx.t("manifests"));
    write(&fx.t("manifests/etcd.yaml"), "image: etcd\n");
    write(&fx.t("gone.txt"), "gone\n");
    write(&fx.path("evil.conf"), "server: https://evil\n");
    fx.create_default();
    fs::remove_file(fx.t("gone.txt")).unwrap();
    // In a private mount namespace: the mounts exist only for this verify.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && mount -t tmpfs kubefim-test "$3" && exec "$4" verify --db "$5" --pubkey "$6" --format json"#)
        .arg("sh")
        .arg(fx.path("evil.conf"))
        .arg(fx.t("kubelet.conf"))
        .arg(fx.t("manifests"))
        .arg(BIN)
        .arg(fx.db())
        .arg(fx.pubkey());
    let run = run_with_timeout(cmd, TIMEOUT);
    run.expect_code(1);
    let report = run.json();
    check_report_shape(&report, &run);
    let hidden = change_for(&report, &fx.t("manifests/etcd.yaml"));
    assert_eq!(hidden["kind"], "hidden", "{hidden:#}\n{}", run.dump());
    assert_eq!(hidden["mount"]["target"], fx.t("manifests").to_str().unwrap(), "{hidden:#}");
    assert_eq!(hidden["mount"]["fs_type"], "tmpfs", "{hidden:#}");
    assert_eq!(hidden["mount"]["source"], "kubefim-test", "{hidden:#}");
    let conf = change_for(&report, &fx.t("kubelet.conf"));
    assert_eq!(conf["kind"], "modified", "{conf:#}");
    assert!(changed_attrs(conf).contains(&"content"), "{conf:#}");
    assert_eq!(conf["mount"]["target"], fx.t("kubelet.conf").to_str().unwrap(), "{conf:#}");
    let gone = change_for(&report, &fx.t("gone.txt"));
    assert_eq!(gone["kind"], "removed", "a file really gone is removed: {gone:#}");
    assert!(gone.get("mount").is_none(), "{gone:#}");
    assert_eq!(report["summary"]["hidden"], 1, "{report:#}");
    assert_eq!(report["summary"]["removed"], 1, "{report:#}");
    // The same for people.
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs kubefim-test "$1" && exec "$2" verify --db "$3" --pubkey "$4" --format human"#)
        .arg("sh")
        .arg(fx.t("manifests"))
        .arg(BIN)
        .arg(fx.db())
        .arg(fx.pubkey());
    let run = run_with_timeout(cmd, TIMEOUT);
    run.expect_code(1);
    let etcd = fx.t("manifests/etcd.yaml");
    assert!(
        run.stdout.lines().any(|l| l.starts_with("hidden") && l.contains(etcd.to_str().unwrap())),
        "no hidden line for {}\n{}",
        etcd.display(),
        run.dump()
    );
    assert!(run.stdout.contains("hidden by a mount"), "{}", run.dump());
}

// ---------------------------------------------------------------------------------------------
// The tools refuse what they must: keys, signatures, requests, locks, names, policies
// ---------------------------------------------------------------------------------------------

#[test]
fn keygen_never_overwrites_a_public_key_nor_follows_a_symlink_at_its_name() {
    let fx = Fixture::bare();
    let out = fx.path("keys");
    mkdir(&out);
    write(&out.join("kubefim.pub"), "mine\n");
    let run = kubefim([OsStr::new("keygen"), OsStr::new("--out"), out.as_os_str()]);
    run.expect_code(2);
    assert_eq!(fs::read_to_string(out.join("kubefim.pub")).unwrap(), "mine\n", "overwritten\n{}", run.dump());
    assert!(!out.join("kubefim.key").exists(), "a private key without its public half was left\n{}", run.dump());
    assert!(run.stderr.contains("never overwritten"), "{}", run.dump());

    let other = fx.path("other");
    mkdir(&other);
    let target = fx.path("planted.pub");
    symlink(&target, other.join("kubefim.pub")).unwrap();
    kubefim([OsStr::new("keygen"), OsStr::new("--out"), other.as_os_str()]).expect_code(2);
    assert!(!target.exists(), "keygen wrote through a symlink at kubefim.pub");
    assert!(!other.join("kubefim.key").exists());
}

#[test]
fn a_private_key_others_can_read_is_refused_with_the_chmod_to_run() {
    let fx = Fixture::new();
    write(&fx.t("a.txt"), "alpha\n");
    fs::set_permissions(fx.key(), fs::Permissions::from_mode(0o644)).unwrap();
    let run = fx.create_run(&fx.default_policy(), &fx.db());
    run.expect_code(2);
    let chmod = format!("chmod 600 {}", fx.key().display());
    assert!(run.stderr.contains(&chmod), "no `{chmod}` in the error\n{}", run.dump());
    assert!(!fx.db().exists(), "a baseline was signed with an exposed key");
}

/// `baseline scan` of the fixture's tree into `db` for `node`; returns the request line.
#[track_caller]
fn scan_request(fx: &Fixture, db: &Path, node: &str) -> String {
    let policy = fx.default_policy();
    let run = kubefim(args(&[
        "baseline".as_ref(),
        "scan".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
        "--node-name".as_ref(),
        node.as_ref(),
    ]));
    run.expect_code(0);
    run.stdout.trim().to_owned()
}

/// `baseline sign` of `request` (a file) with the fixture's key into `out`.
fn sign_request(fx: &Fixture, request: &Path, out: &Path) -> Run {
    kubefim(args(&[
        "baseline".as_ref(),
        "sign".as_ref(),
        "--key".as_ref(),
        fx.key().as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        request.as_os_str(),
    ]))
}

/// `baseline attach` of `signature` to `db`, within `timeout`.
fn attach_run(fx: &Fixture, db: &Path, signature: &Path, timeout: Duration) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(["baseline", "attach", "--db"]).arg(db).arg("--pubkey").arg(fx.pubkey()).arg("--signature").arg(signature);
    run_with_timeout(cmd, timeout)
}

#[test]
fn attach_reads_a_bounded_regular_file_and_refuses_another_nodes_signature() {
    let fx = Fixture::new();
    write(&fx.t("a.txt"), "alpha\n");
    let db = fx.path("db");
    let request = fx.path("request.json");
    write(&request, scan_request(&fx, &db, "node-a"));
    let signatures = fx.path("signatures");
    sign_request(&fx, &request, &signatures).expect_code(0);
    let good = signatures.join("node-a");

    // /dev/zero: refused at once (it was read without bound, 2.1 GB in 4 s).
    let started = Instant::now();
    let run = attach_run(&fx, &db, Path::new("/dev/zero"), Duration::from_secs(20));
    run.expect_code(2);
    assert!(run.stderr.contains("a device"), "{}", run.dump());
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    // A FIFO nobody writes: refused, not waited on.
    let fifo = fx.path("signature.fifo");
    tool("mkfifo", [fifo.as_os_str()]);
    let run = attach_run(&fx, &db, &fifo, Duration::from_secs(20));
    run.expect_code(2);
    assert!(run.stderr.contains("a FIFO"), "{}", run.dump());
    // A regular file far larger than any signature.
    let big = fx.path("big.json");
    write(&big, vec![b' '; 1 << 20]);
    let run = attach_run(&fx, &db, &big, Duration::from_secs(20));
    run.expect_code(2);
    assert!(run.stderr.contains("larger than 64 KiB"), "{}", run.dump());
    // A symbolic link to the good signature: the path given must be the file itself.
    let link = fx.path("link.json");
    symlink(&good, &link).unwrap();
    let run = attach_run(&fx, &db, &link, Duration::from_secs(20));
    run.expect_code(2);
    assert!(run.stderr.contains("a symbolic link"), "{}", run.dump());

    // The right digest and signature, but the signature says it is another node's.
    let mut other: Value = serde_json::from_str(&fs::read_to_string(&good).unwrap()).unwrap();
    other["node"] = "node-b".into();
    let foreign = fx.path("node-b.json");
    write(&foreign, other.to_string());
    let run = attach_run(&fx, &db, &foreign, Duration::from_secs(60));
    run.expect_code(3);
    assert!(run.stderr.contains("\"node-b\"") && run.stderr.contains("\"node-a\""), "{}", run.dump());
    assert!(!db.exists(), "another node's signature installed the baseline");

    let run = attach_run(&fx, &db, &good, Duration::from_secs(60));
    run.expect_code(0);
    assert!(run.stderr.contains("installed for node node-a"), "{}", run.dump());
}

#[test]
fn sign_shows_only_what_the_signed_body_says_lists_incomplete_paths_and_escapes_them() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "this test needs root and CI runs as root");
        eprintln!("skipped: needs root (an unreadable file, scanned as nobody)");
        return;
    }
    let fx = Fixture::new();
    fs::set_permissions(fx.root.path(), fs::Permissions::from_mode(0o755)).unwrap();
    write(&fx.t("readable.txt"), "fine\n");
    let unreadable = fx.t("unreadable\rsecret.key");
    write(&unreadable, "no peeking\n");
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    let state = fx.path("state");
    mkdir(&state);
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let policy = fx.default_policy();
    fs::set_permissions(&policy, fs::Permissions::from_mode(0o644)).unwrap();
    let db = state.join("db");
    let scan = kubefim_as_nobody(args(&[
        "baseline".as_ref(),
        "scan".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
        "--node-name".as_ref(),
        "worker\r\nsigned node forged".as_ref(),
    ]));
    scan.expect_code(0);
    let request: Value = serde_json::from_str(scan.stdout.trim()).unwrap();
    let records = request["records"].as_u64().unwrap();

    // Unedited: the count, one incomplete path listed with why, control characters escaped.
    let file = fx.path("request.json");
    write(&file, request.to_string());
    let run = sign_request(&fx, &file, &fx.path("signatures"));
    run.expect_code(0);
    assert!(run.stderr.contains(&format!("{records} entries, 1 incomplete")), "{}", run.dump());
    assert!(run.stderr.contains("unreadable\\rsecret.key"), "the incomplete path is not listed\n{}", run.dump());
    assert!(run.stderr.contains("signed node worker\\r\\nsigned node forged"), "{}", run.dump());
    assert!(!run.stderr.contains('\r') && !run.stderr.contains("\nsigned node forged"), "{:?}", run.stderr);

    // Edited on its way: counts, time and incomplete paths are the node's unsigned say.
    let mut edited = request.clone();
    edited["records"] = 48213.into();
    edited["incomplete"] = Value::Array(Vec::new());
    write(&file, edited.to_string());
    let out = fx.path("edited-signatures");
    let run = sign_request(&fx, &file, &out);
    run.expect_code(2);
    assert!(!run.stderr.contains("48213 entries"), "the request's own count was shown\n{}", run.dump());
    assert!(run.stderr.contains("altered"), "{}", run.dump());
    assert!(!out.exists() || fs::read_dir(&out).unwrap().next().is_none(), "an altered request was signed");
}

/// Holds `DB.lock` the way kubefim does (flock, pid inside) until dropped.
fn hold_lock(db: &Path) -> File {
    let mut lock = db.as_os_str().to_owned();
    lock.push(".lock");
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(lock).unwrap();
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    std::io::Write::write_all(&mut file, format!("{} test\n", std::process::id()).as_bytes()).unwrap();
    file
}

#[test]
fn accept_refuses_while_another_holds_the_database_and_concurrent_accepts_lose_nothing() {
    let fx = Fixture::new();
    let files: Vec<_> = (0..4).map(|i| fx.t(format!("f{i}.txt"))).collect();
    for f in &files {
        write(f, "before\n");
    }
    fx.create_default();
    for f in &files {
        write(f, "after\n");
    }

    let held = hold_lock(&fx.db());
    let run = fx.accept(&[&files[0]]);
    run.expect_code(4);
    assert!(run.stderr.contains(&format!("(pid {})", std::process::id())), "the holder is not named\n{}", run.dump());
    drop(held);

    // Four at once, one path each: every one that says "accepted" must have its path in the
    // baseline that is left (they all said so, and only one survived).
    let children: Vec<_> = files
        .iter()
        .map(|f| {
            Command::new(BIN)
                .args(["baseline", "accept", "--db"])
                .arg(fx.db())
                .arg("--key")
                .arg(fx.key())
                .arg("--pubkey")
                .arg(fx.pubkey())
                .arg(f)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = children.into_iter().map(|c| c.wait_with_output().unwrap().status.code().unwrap()).collect();
    assert!(codes.iter().all(|c| [0, 4].contains(c)), "exit codes {codes:?}");
    let report = fx.verify_run().json();
    let still: Vec<&str> = changes(&report).iter().filter_map(|c| c["path"].as_str()).collect();
    for (f, code) in files.iter().zip(&codes) {
        let reported = still.contains(&f.to_str().unwrap());
        assert_eq!(reported, *code != 0, "{} (accept exit {code}) in {still:?}", f.display());
    }
}

#[test]
fn control_characters_in_file_names_cannot_forge_a_line_of_human_output() {
    let fx = Fixture::new();
    write(&fx.t("a.txt"), "alpha\n");
    fx.create_default();
    // A name can hold anything but '/' and NUL: here a line break, a terminal escape that
    // erases the line, and a carriage return.
    let forged = fx.t("x\nmodified  kubelet.conf \u{1b}[2K\r");
    write(&forged, "new\n");
    let escaped = "x\\nmodified  kubelet.conf \\x1b[2K\\r";
    let run = fx.verify_human();
    run.expect_code(1);
    assert!(run.stdout.lines().all(|l| !l.starts_with("modified  kubelet.conf")), "a forged line\n{}", run.dump());
    assert!(!run.stdout.contains('\u{1b}') && !run.stdout.contains('\r'), "{:?}", run.stdout);
    assert!(run.stdout.contains(escaped), "{}", run.dump());

    // `show` of a baseline that holds the name.
    fs::remove_dir_all(fx.db()).unwrap();
    fx.create_default();
    let run = fx.show_human();
    run.expect_code(0);
    assert!(run.stdout.lines().all(|l| !l.starts_with("modified  kubelet.conf")), "{}", run.dump());
    assert!(run.stdout.contains(escaped), "{}", run.dump());
}

#[test]
fn policies_with_no_attributes_a_nul_byte_or_over_4_mib_are_refused_saying_why() {
    let fx = Fixture::new();
    write(&fx.t("a.txt"), "alpha\n");
    let tree = fx.tree().display().to_string();
    let cases = [
        (format!("    - path: {tree}\n      attributes: []\n"), "`attributes: []` monitors nothing"),
        (format!("    - path: \"{tree}/a\\0b\"\n"), "contains a NUL byte"),
        (format!("    - path: {tree}\n# {}\n", "x".repeat(5 << 20)), "larger than 4 MiB"),
    ];
    for (rules, why) in cases {
        let policy = fx.write_policy_text(&format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n{rules}"
        ));
        let run = fx.create_run(&policy, &fx.db());
        run.expect_code(2);
        assert!(run.stderr.contains(why), "no {why:?} in\n{}", run.dump().chars().take(2000).collect::<String>());
        assert!(!fx.db().exists());
    }
}
