//! Containers checked against their images, with real podman containers (runc, overlay
//! storage) from a local two-layer image built from Debian's static busybox: `kubefim verify
//! --containers` must report what each selected container changed in its own layer, against
//! the image's files, and nothing of an unselected container or of a copy-up that changed
//! nothing. `kubefim watch --containers` must check each selected container when it starts
//! (running before the watcher, or started after it is ready), report its drift against the
//! image, and release it when it exits.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::podman::{IMAGE, ensure_image, podman};
use common::watch::{Watcher, is_change};
use common::{BIN, Fixture, Rule, run_with_timeout};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);
/// The image the tests check against: the busybox image and a second layer of files.
const DRIFT_IMAGE: &str = "localhost/kubefim-drift:latest";

fn root_or_skip() -> bool {
    if !common::is_root() {
        assert!(std::env::var_os("CI").is_none(), "container tests need root and CI runs as root");
        eprintln!("skipped: needs root");
        return false;
    }
    true
}

#[track_caller]
fn podman_ok<S: AsRef<OsStr>>(args: &[S]) -> String {
    let mut cmd = podman();
    cmd.args(args);
    let run = run_with_timeout(cmd, TIMEOUT);
    run.expect_code(0);
    run.stdout.trim().to_owned()
}

/// Builds the drift image once: a layer over the busybox image with config files, a site
/// directory and a file to delete (`podman commit` of a container that made them).
fn ensure_drift_image() {
    ensure_image();
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("kubefim-drift-image.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let mut exists = podman();
    exists.args(["image", "exists", DRIFT_IMAGE]);
    if exists.status().unwrap().success() {
        return;
    }
    let name = format!("kubefim-drift-build-{}", std::process::id());
    let script = "mkdir -p /srv/site && echo 'listen 80' > /etc/app.conf && echo 'mode 644' > /etc/other.conf \
                  && echo 'bye' > /etc/removed.conf && echo 'keep' > /etc/opened.conf \
                  && echo '<h1>hi</h1>' > /srv/site/index.html && echo 'css' > /srv/site/style.css";
    podman_ok(&[
        "run",
        "--name",
        &name,
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1000:1000",
        IMAGE,
        "/bin/sh",
        "-c",
        script,
    ]);
    podman_ok(&["commit", &name, DRIFT_IMAGE]);
    podman_ok(&["rm", "-f", &name]);
}

/// `podman <verb...>` of a container of `image` annotated `app=<app>` that runs `script` in
/// its shell, with the limits these machines need.
fn container_args(verb: &[&str], app: &str, image: &str, script: &str) -> Vec<String> {
    let mut args: Vec<String> = verb.iter().map(|v| (*v).to_owned()).collect();
    args.extend(["--annotation".into(), format!("app={app}")]);
    args.extend(["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"].map(String::from));
    args.extend([image, "/bin/sh", "-c", script].map(String::from));
    args
}

/// A running container, removed when dropped (a failing test leaves none behind).
struct Container {
    id: String,
}

impl Container {
    /// Starts `script` then a long sleep in a container of `image` annotated `app=<app>`;
    /// returns once the script is done.
    fn start(app: &str, image: &str, script: &str) -> Container {
        let full = format!("{script} && touch /tmp/kubefim-ready && exec sleep 600");
        let id = podman_ok(&container_args(&["run", "-d"], app, image, &full));
        assert_eq!(id.len(), 64, "podman run printed {id:?}");
        let c = Container { id };
        let started = Instant::now();
        loop {
            let pid = podman_ok(&["inspect", "-f", "{{.State.Pid}}", &c.id]);
            if Path::new(&format!("/proc/{pid}/root/tmp/kubefim-ready")).exists() {
                return c;
            }
            assert!(started.elapsed() < TIMEOUT, "container {} never got ready", c.id);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let mut cmd = podman();
        cmd.args(["rm", "-f", "-t", "0", &self.id]);
        let _ = cmd.output();
    }
}

fn write_policy(dir: &Path, app: &str) -> PathBuf {
    write_policy_with(dir, app, "")
}

/// A policy selecting `app=<app>`, with `extra` added to its spec.
fn write_policy_with(dir: &Path, app: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{app}.yaml"));
    fs::write(
        &path,
        format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: WorkloadFimPolicy\nmetadata: {{name: {app}}}\nspec:\n  \
             selector:\n    matchLabels: {{app: {app}}}\n  rules:\n    - path: /etc\n      diff: true\n    - path: /srv\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// `verify --containers --format json` under `policy`: its exit code, its document (checked
/// against `kubefim schema containers`) and what it printed.
fn verify_containers(policy: &Path) -> (i32, Value, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["verify", "--containers", "--workload-policy"]).arg(policy).args(["--format", "json"]);
    cmd.arg("--layer-cache").arg(policy.with_file_name("layer-cache"));
    let run = run_with_timeout(cmd, TIMEOUT);
    let doc = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e})\n{}", run.dump()));
    let schema = common::kubefim(["schema", "containers"]);
    schema.expect_code(0);
    let validator = jsonschema::draft202012::new(&schema.json()).expect("a valid JSON Schema");
    let errors: Vec<String> = validator.iter_errors(&doc).map(|e| format!("{e} (at {})", e.instance_path())).collect();
    assert!(errors.is_empty(), "the report does not conform to its schema: {errors:#?}\n{}", run.dump());
    (run.code(), doc, run.dump())
}

fn report_for<'a>(doc: &'a Value, id: &str) -> Option<&'a Value> {
    doc["containers"].as_array().unwrap().iter().find(|c| c["container"]["id"] == id)
}

fn change<'a>(report: &'a Value, path: &str) -> Option<&'a Value> {
    report["changes"].as_array().unwrap().iter().find(|c| c["path"] == path)
}

fn changed(c: &Value) -> Vec<&str> {
    c["changed"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect()
}

#[test]
fn a_selected_containers_changes_are_reported_against_its_image_and_nothing_else() {
    if !root_or_skip() {
        return;
    }
    ensure_drift_image();
    let tmp = tempfile::tempdir().unwrap();
    let policy = write_policy(tmp.path(), "web");
    let web = Container::start(
        "web",
        DRIFT_IMAGE,
        "echo 'listen 8080' >> /etc/app.conf && chmod 600 /etc/other.conf && rm /etc/removed.conf \
         && echo new > /etc/added.conf && : >> /etc/opened.conf && cat /etc/app.conf > /dev/null \
         && mv /srv/site /srv/moved",
    );
    let other = Container::start("other", DRIFT_IMAGE, "echo changed >> /etc/app.conf");
    let (code, doc, dump) = verify_containers(&policy);
    assert_eq!(code, 1, "drift must exit 1\n{dump}");
    assert!(report_for(&doc, &other.id).is_none(), "an unselected container was checked\n{dump}");
    let report = report_for(&doc, &web.id).unwrap_or_else(|| panic!("the web container was not checked\n{dump}"));
    assert_eq!(report["origin"], "container", "{report:#}");
    assert_eq!(report["baseline"], "image", "{report:#}");
    assert_eq!(report["container"]["runtime"], "podman", "{report:#}");
    assert_eq!(report["container"]["image"], DRIFT_IMAGE, "{report:#}");
    assert_eq!(report["policy"], "web", "{report:#}");

    let app = change(report, "/etc/app.conf").unwrap_or_else(|| panic!("no app.conf change\n{report:#}"));
    assert_eq!(app["kind"], "modified", "{app:#}");
    assert!(changed(app).contains(&"content"), "{app:#}");
    let diff = app["diff"].as_str().unwrap_or_else(|| panic!("no diff against the image\n{app:#}"));
    assert!(diff.contains("\n listen 80\n+listen 8080\n"), "{diff}");

    let other_conf = change(report, "/etc/other.conf").unwrap_or_else(|| panic!("no chmod\n{report:#}"));
    assert_eq!(changed(other_conf), ["mode"], "a chmod changes the mode, nothing else: {other_conf:#}");

    let removed = change(report, "/etc/removed.conf").unwrap_or_else(|| panic!("no whiteout\n{report:#}"));
    assert_eq!(removed["kind"], "removed", "{removed:#}");
    let added = change(report, "/etc/added.conf").unwrap_or_else(|| panic!("no new file\n{report:#}"));
    assert_eq!(added["kind"], "added", "{added:#}");

    assert!(change(report, "/etc/opened.conf").is_none(), "a copy-up with no change is no change\n{report:#}");
    assert!(change(report, "/etc").is_none_or(|c| changed(c) != ["content"]), "{report:#}");

    let site = change(report, "/srv/site/index.html").unwrap_or_else(|| panic!("the moved site\n{report:#}"));
    assert_eq!(site["kind"], "removed", "{site:#}");
    let moved = change(report, "/srv/moved").unwrap_or_else(|| panic!("the site's new name\n{report:#}"));
    assert_eq!(moved["kind"], "added", "{moved:#}");
    for c in report["changes"].as_array().unwrap() {
        let xattrs = c["new"]["xattrs"].as_object().map(|x| x.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
        assert!(xattrs.iter().all(|k| !k.contains(".overlay.")), "overlay's xattrs reported as the file's: {c:#}");
    }
    assert_eq!(doc["summary"]["clean"], false, "{dump}");
}

#[test]
fn fifos_in_an_image_layer_are_compared_without_being_read() {
    if !root_or_skip() {
        return;
    }
    ensure_drift_image();
    // Opening a FIFO for reading waits for a writer: a check that read one would never end
    // (`verify_containers` gives it TIMEOUT).
    let image = OwnImage::with_layer("fifo", "mkfifo /etc/pipe /etc/kept");
    let tmp = tempfile::tempdir().unwrap();
    let app = format!("fifo{}", std::process::id());
    let policy = write_policy(tmp.path(), &app);
    let c = Container::start(&app, &image.name, "rm /etc/pipe && echo now-a-file > /etc/pipe");
    let (code, doc, dump) = verify_containers(&policy);
    assert_eq!(code, 1, "{dump}");
    let report = report_for(&doc, &c.id).unwrap_or_else(|| panic!("not checked\n{dump}"));
    let pipe = change(report, "/etc/pipe").unwrap_or_else(|| panic!("the FIFO made a file\n{report:#}"));
    assert_eq!(pipe["kind"], "modified", "{pipe:#}");
    assert!(changed(pipe).contains(&"type"), "{pipe:#}");
    assert!(change(report, "/etc/kept").is_none(), "the image's own FIFO is no change\n{report:#}");
}

#[test]
fn a_container_that_changed_nothing_is_clean_and_exits_0() {
    if !root_or_skip() {
        return;
    }
    ensure_drift_image();
    let tmp = tempfile::tempdir().unwrap();
    let app = format!("quiet{}", std::process::id());
    let policy = write_policy(tmp.path(), &app);
    // Reads and an open for writing that writes nothing: copy-up only.
    let quiet = Container::start(&app, DRIFT_IMAGE, "cat /etc/app.conf > /dev/null && : >> /etc/opened.conf");
    let (code, doc, dump) = verify_containers(&policy);
    let report = report_for(&doc, &quiet.id).unwrap_or_else(|| panic!("not checked\n{dump}"));
    assert_eq!(report["changes"], serde_json::json!([]), "{dump}");
    assert_eq!(report["summary"]["clean"], true, "{dump}");
    assert_eq!(code, 0, "{dump}");
}

#[test]
fn containers_mode_needs_a_workload_policy_and_a_bad_one_is_refused_saying_why() {
    let run = common::kubefim(["verify", "--containers"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--workload-policy"), "{}", run.dump());
    let run = common::kubefim(["verify", "--format", "json"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--db"), "{}", run.dump());
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    fs::write(
        &bad,
        "apiVersion: kubefim.io/v1alpha1\nkind: WorkloadFimPolicy\nmetadata: {name: b}\nspec:\n  selector: {}\n  rules:\n    - path: etc\n",
    )
    .unwrap();
    let run = common::kubefim([
        OsStr::new("verify"),
        OsStr::new("--containers"),
        OsStr::new("--workload-policy"),
        bad.as_os_str(),
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("bad.yaml") && run.stderr.contains("absolute"), "{}", run.dump());
    let missing = tmp.path().join("missing.yaml");
    let run = common::kubefim([
        OsStr::new("verify"),
        OsStr::new("--containers"),
        OsStr::new("--workload-policy"),
        missing.as_os_str(),
    ]);
    run.expect_code(2);
    assert!(run.stderr.contains("missing.yaml"), "{}", run.dump());
}

// ---- watch --containers -------------------------------------------------------------------

/// A workload policy selecting the containers annotated `app=<app>` (the name made unique to
/// this test process), and the watcher of a small host tree that also checks them.
struct Selected {
    /// The policy's directory, and room for the test's own files.
    tmp: tempfile::TempDir,
    /// The `app` annotation the policy selects.
    app: String,
    policy: PathBuf,
}

impl Selected {
    /// The policy, with `extra` in its spec; `None` when not root (outside CI). The drift
    /// image is built first.
    fn policy(app: &str, extra: &str) -> Option<Selected> {
        if !root_or_skip() {
            return None;
        }
        ensure_drift_image();
        let tmp = tempfile::tempdir().unwrap();
        let app = format!("{app}{}", std::process::id());
        let policy = write_policy_with(tmp.path(), &app, extra);
        Some(Selected { tmp, app, policy })
    }

    /// `kubefim watch --containers` under the policy, ready.
    fn watch(&self) -> (Fixture, Watcher) {
        self.watch_with(&[])
    }

    /// [`Selected::watch`] with more flags.
    fn watch_with(&self, extra: &[&str]) -> (Fixture, Watcher) {
        let fx = Fixture::on_disk();
        fs::write(fx.t("host.conf"), "host\n").unwrap();
        let rules = fx.write_policy(&[Rule::new(fx.tree())]);
        fx.create(&rules);
        let mut args = vec!["--containers", "--workload-policy", self.policy.to_str().unwrap()];
        args.extend(extra);
        let w = Watcher::start_on(&fx, &args);
        (fx, w)
    }
}

/// The `container-watched` line of container `id`.
fn watched_line(w: &Watcher, id: &str, within: Duration) -> Value {
    w.wait_for(&format!("container-watched {id}"), within, |l| {
        l["kind"] == "container-watched" && l["container"]["id"] == id
    })
}

/// The change lines of container `id` so far.
fn container_changes(w: &Watcher, id: &str) -> Vec<Value> {
    w.lines().into_iter().filter(|l| is_change(l) && l["container"]["id"] == id).collect()
}

fn change_at<'a>(changes: &'a [Value], path: &str) -> Option<&'a Value> {
    changes.iter().find(|c| c["path"] == path)
}

#[test]
fn watch_reports_a_running_containers_drift_against_its_image_and_its_exit() {
    let Some(selected) = Selected::policy("watched", "") else { return };
    let app = &selected.app;
    let web = Container::start(
        app,
        DRIFT_IMAGE,
        "echo 'listen 8080' >> /etc/app.conf && rm /etc/removed.conf && : >> /etc/opened.conf",
    );
    let other = Container::start(&format!("other{}", std::process::id()), DRIFT_IMAGE, "echo x >> /etc/app.conf");
    let (_fx, w) = selected.watch();
    let watched = watched_line(&w, &web.id, Duration::from_secs(30));
    assert_eq!(watched["found_by"], "startup", "{watched:#}");
    assert_eq!(watched["policies"], serde_json::json!([app]), "{watched:#}");
    assert_eq!(watched["container"]["image"], DRIFT_IMAGE, "{watched:#}");
    assert_eq!(watched["errors"], serde_json::json!([]), "{watched:#}");
    let changes = container_changes(&w, &web.id);
    // app.conf, removed.conf, and /etc's mtime (an entry removed from it).
    assert_eq!(watched["changes"], changes.len(), "{watched:#}\n{}", w.dump());
    assert_eq!(changes.len(), 3, "{}", w.dump());
    let app_conf = change_at(&changes, "/etc/app.conf").unwrap_or_else(|| panic!("no app.conf\n{}", w.dump()));
    assert_eq!(app_conf["kind"], "modified", "{app_conf:#}");
    assert_eq!(app_conf["baseline"], "image", "{app_conf:#}");
    assert_eq!(app_conf["origin"], "container", "{app_conf:#}");
    assert_eq!(app_conf["detected_by"], "rescan", "{app_conf:#}");
    assert_eq!(app_conf["policy"], app.as_str(), "{app_conf:#}");
    assert_eq!(app_conf["container"]["runtime"], "podman", "{app_conf:#}");
    let diff = app_conf["diff"].as_str().unwrap_or_else(|| panic!("no diff against the image\n{app_conf:#}"));
    assert!(diff.contains("\n listen 80\n+listen 8080\n"), "{diff}");
    assert!(diff.starts_with("--- /etc/app.conf (image)\n+++ /etc/app.conf (now)\n"), "{diff}");
    let removed = change_at(&changes, "/etc/removed.conf").unwrap_or_else(|| panic!("no whiteout\n{}", w.dump()));
    assert_eq!(removed["kind"], "removed", "{removed:#}");
    assert!(change_at(&changes, "/etc/opened.conf").is_none(), "a copy-up is no change\n{}", w.dump());
    assert!(
        w.lines().iter().all(|l| l["container"]["id"] != other.id.as_str()),
        "an unselected container was reported\n{}",
        w.dump()
    );

    drop(web);
    let id = watched["container"]["id"].as_str().unwrap().to_owned();
    let gone = w.wait_for("container-gone", Duration::from_secs(20), |l| {
        l["kind"] == "container-gone" && l["container"]["id"] == id.as_str()
    });
    assert_eq!(gone["container"]["image"], DRIFT_IMAGE, "{gone:#}");
    assert!(w.stop().success());
}

#[test]
fn watch_checks_a_container_started_after_ready_when_its_first_process_starts() {
    let Some(selected) = Selected::policy("late", "") else { return };
    let (tmp, app) = (&selected.tmp, &selected.app);
    let (_fx, w) = selected.watch();
    // Made before it starts: `podman cp` into a created container writes its layer, so the
    // check at its first exec has drift to find.
    let id = podman_ok(&container_args(&["create"], app, DRIFT_IMAGE, "exec sleep 600"));
    let late = Container { id };
    let dropped = tmp.path().join("dropped.sh");
    fs::write(&dropped, "#!/bin/sh\necho pwned\n").unwrap();
    podman_ok(&["cp", dropped.to_str().unwrap(), &format!("{}:/etc/dropped.sh", late.id)]);
    podman_ok(&["start", &late.id]);
    let watched = watched_line(&w, &late.id, Duration::from_secs(10));
    assert_eq!(watched["found_by"], "exec", "{watched:#}");
    let latency = watched["seconds_since_exec"].as_f64().unwrap_or_else(|| panic!("no latency\n{watched:#}"));
    // The target is 1 s (the benchmark measures it); a loaded CI machine gets slack here.
    assert!(latency < 5.0, "checked {latency} s after its first exec\n{}", w.dump());
    let changes = container_changes(&w, &late.id);
    let added = change_at(&changes, "/etc/dropped.sh").unwrap_or_else(|| panic!("no dropped file\n{}", w.dump()));
    assert_eq!(added["kind"], "added", "{added:#}");
    assert_eq!(added["baseline"], "image", "{added:#}");
    // Its later execs are not asked about: its cgroup is known.
    podman_ok(&["exec", &late.id, "/bin/sh", "-c", ":"]);
    std::thread::sleep(Duration::from_millis(500));
    let watched_lines = w
        .lines()
        .iter()
        .filter(|l| l["kind"] == "container-watched" && l["container"]["id"] == late.id.as_str())
        .count();
    assert_eq!(watched_lines, 1, "checked once\n{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn watch_reports_an_executable_the_image_does_not_hold_and_not_the_images_own() {
    let Some(selected) = Selected::policy("exec", "  drift:\n    exec: true\n") else { return };
    let app = &selected.app;
    let (_fx, w) = selected.watch();
    // The entrypoint (/bin/sh), cp and mkdir are the image's; the copy of busybox run from
    // /usr/local/bin is not, though its bytes are an image file's (it is not at that path).
    // (busybox picks its applet by the name it runs as: the copy is called sleep.)
    let c = Container::start(
        app,
        DRIFT_IMAGE,
        "mkdir -p /usr/local/bin && cp /bin/busybox /usr/local/bin/sleep && /usr/local/bin/sleep 1",
    );
    let line = w.wait_for("drift-exec", Duration::from_secs(10), |l| {
        l["kind"] == "drift-exec" && l["container"]["id"] == c.id.as_str()
    });
    assert_eq!(line["path"], "/usr/local/bin/sleep", "{line:#}");
    assert_eq!(line["image_hash"], Value::Null, "{line:#}");
    assert_eq!(line["hash"].as_str().map(str::len), Some(64), "{line:#}");
    assert_eq!(line["process"]["comm"], "sleep", "{line:#}");
    assert_eq!(line["origin"], "container", "{line:#}");
    assert_eq!(line["policies"], serde_json::json!([app]), "{line:#}");
    // What it ran is busybox's bytes.
    let pid = podman_ok(&["inspect", "-f", "{{.State.Pid}}", &c.id]);
    let b3sum = Command::new("b3sum").arg("--no-names").arg(format!("/proc/{pid}/root/bin/busybox")).output().unwrap();
    assert!(b3sum.status.success(), "b3sum: {b3sum:?}");
    assert_eq!(line["hash"], String::from_utf8_lossy(&b3sum.stdout).trim(), "{line:#}");
    let drift_execs: Vec<Value> = w.lines().into_iter().filter(|l| l["kind"] == "drift-exec").collect();
    assert!(
        drift_execs.iter().all(|l| l["container"]["id"] != c.id.as_str() || l["path"] == "/usr/local/bin/sleep"),
        "only the dropped binary is drift: {drift_execs:#?}"
    );
    assert!(w.stop().success());
}

/// The change line at `path` in container `id` found by a kernel event, waited for.
fn event_change(w: &Watcher, id: &str, path: &str) -> Value {
    w.wait_for(&format!("an event's change at {path}"), Duration::from_secs(10), |l| {
        is_change(l) && l["container"]["id"] == id && l["path"] == path && l["detected_by"] == "event"
    })
}

/// The comm of the process a change names.
fn writer(change: &Value) -> &str {
    change["process"]["comm"].as_str().unwrap_or_else(|| panic!("no process named\n{change:#}"))
}

#[test]
fn watch_reports_each_change_inside_a_running_container_as_it_happens_with_its_writer() {
    let Some(selected) = Selected::policy("live", "") else { return };
    let app = &selected.app;
    let (_fx, w) = selected.watch();
    let c = Container::start(app, DRIFT_IMAGE, "true");
    let watched = watched_line(&w, &c.id, Duration::from_secs(10));
    assert!(watched["watched"].as_u64().is_some_and(|n| n >= 8), "/etc's and /srv's entries: {watched:#}");
    assert!(container_changes(&w, &c.id).is_empty(), "a fresh container has no drift\n{}", w.dump());
    let in_container = |script: &str| podman_ok(&["exec", &c.id, "/bin/sh", "-c", script]);

    // An image file edited by the container's shell: a diff against the image, and who.
    in_container("echo 'listen 9090' >> /etc/app.conf");
    let edit = event_change(&w, &c.id, "/etc/app.conf");
    assert_eq!(edit["kind"], "modified", "{edit:#}");
    assert_eq!(edit["baseline"], "image", "{edit:#}");
    assert_eq!(edit["policy"], app.as_str(), "{edit:#}");
    assert_eq!(writer(&edit), "sh", "{edit:#}");
    assert_eq!(edit["attribution"], "exact", "{edit:#}");
    assert_eq!(edit["origin"], "container", "{edit:#}");
    assert_eq!(edit["process"]["pid"], edit["processes"][0]["pid"], "{edit:#}");
    assert!(edit["ops"].as_array().unwrap().contains(&Value::from("write")), "{edit:#}");
    let diff = edit["diff"].as_str().unwrap_or_else(|| panic!("no diff\n{edit:#}"));
    assert!(diff.starts_with("--- /etc/app.conf (image)\n"), "{diff}");
    assert!(diff.contains("\n listen 80\n+listen 9090\n"), "{diff}");

    // A chmod only: the mode, not the content.
    in_container("chmod 600 /etc/other.conf");
    let chmod = event_change(&w, &c.id, "/etc/other.conf");
    assert_eq!(changed(&chmod), ["mode"], "{chmod:#}");
    assert_eq!(writer(&chmod), "chmod", "{chmod:#}");

    // An image file removed (a whiteout), a file added, a directory renamed.
    in_container("rm /etc/removed.conf");
    let removed = event_change(&w, &c.id, "/etc/removed.conf");
    assert_eq!(removed["kind"], "removed", "{removed:#}");
    assert_eq!(writer(&removed), "rm", "{removed:#}");
    // Its directory's mtime, by the same process.
    let etc = event_change(&w, &c.id, "/etc");
    assert_eq!(changed(&etc), ["mtime"], "{etc:#}");
    assert_eq!(writer(&etc), "rm", "{etc:#}");
    in_container("echo new > /etc/added.conf");
    let added = event_change(&w, &c.id, "/etc/added.conf");
    assert_eq!(added["kind"], "added", "{added:#}");
    assert_eq!(writer(&added), "sh", "{added:#}");
    in_container("mv /srv/site /srv/moved");
    let moved = event_change(&w, &c.id, "/srv/moved");
    assert_eq!(moved["kind"], "added", "{moved:#}");
    assert_eq!(writer(&moved), "mv", "{moved:#}");
    let old = event_change(&w, &c.id, "/srv/site/index.html");
    assert_eq!(old["kind"], "removed", "{old:#}");
    assert_eq!(writer(&old), "mv", "{old:#}");

    // A file written after it was added is watched too (the kernel filter follows the layer).
    in_container("echo more >> /etc/added.conf");
    w.wait_for("the added file's edit", Duration::from_secs(10), |l| {
        l["kind"] == "added" && l["path"] == "/etc/added.conf" && l["new"]["size"] == 9
    });

    // A host process writing through the container's root is named, as the host's.
    let pid = podman_ok(&["inspect", "-f", "{{.State.Pid}}", &c.id]);
    fs::write(format!("/proc/{pid}/root/srv/moved/style.css"), "css\nhost\n").unwrap();
    let host = w.wait_for("the host's write", Duration::from_secs(10), |l| {
        is_change(l) && l["path"] == "/srv/moved/style.css" && l["new"]["size"] == 9
    });
    assert_eq!(host["process"]["pid"], std::process::id(), "{host:#}");
    assert_eq!(host["origin"], "host", "{host:#}");

    // An open for writing that writes nothing is no change: nothing is said of it before
    // the change that follows it.
    in_container(": >> /etc/opened.conf && echo x > /etc/marker.conf");
    event_change(&w, &c.id, "/etc/marker.conf");
    std::thread::sleep(Duration::from_millis(300));
    let changes = container_changes(&w, &c.id);
    assert!(change_at(&changes, "/etc/opened.conf").is_none(), "a copy-up is no change\n{}", w.dump());
    // Each change once: a comparison says only what is new.
    let app_conf = changes.iter().filter(|l| l["path"] == "/etc/app.conf").count();
    assert_eq!(app_conf, 1, "{}", w.dump());
    assert!(w.stop().success());
}

#[test]
fn two_containers_of_one_image_share_the_layer_cache_and_it_outlives_the_watcher() {
    let Some(selected) = Selected::policy("cache", "") else { return };
    let app = &selected.app;
    let script = "echo 'listen 8080' >> /etc/app.conf && chmod 600 /etc/other.conf";
    let first = Container::start(app, DRIFT_IMAGE, script);
    let second = Container::start(app, DRIFT_IMAGE, script);
    let (fx, w) = selected.watch();
    let counts = |l: &Value| (l["image_records_read"].as_u64().unwrap(), l["image_records_cached"].as_u64().unwrap());
    let a = counts(&watched_line(&w, &first.id, Duration::from_secs(30)));
    let b = counts(&watched_line(&w, &second.id, Duration::from_secs(30)));
    // app.conf, other.conf and /etc: read from the layers for the one checked first, taken
    // from the cache for the other.
    let (read_first, read_second) = if a.0 > 0 { (a, b) } else { (b, a) };
    assert!(read_first.0 >= 3 && read_first.1 == 0, "first: {read_first:?}\n{}", w.dump());
    assert_eq!(read_second, (0, read_first.0), "second\n{}", w.dump());
    assert!(w.stop().success());

    // Restarted: the image's records come from the cache on disk, and say the same.
    let again = Watcher::start_on(&fx, &["--containers", "--workload-policy", selected.policy.to_str().unwrap()]);
    let c = counts(&watched_line(&again, &first.id, Duration::from_secs(30)));
    assert_eq!(c, (0, read_first.0), "{}", again.dump());
    let changes = container_changes(&again, &first.id);
    let app_conf = change_at(&changes, "/etc/app.conf").unwrap_or_else(|| panic!("{}", again.dump()));
    assert!(app_conf["diff"].as_str().is_some_and(|d| d.contains("\n listen 80\n+listen 8080\n")), "{app_conf:#}");
    assert_eq!(changed(change_at(&changes, "/etc/other.conf").unwrap()), ["mode"], "{}", again.dump());
    assert!(again.stop().success());
}

#[test]
fn container_churn_releases_what_each_container_held() {
    let Some(selected) = Selected::policy("churn", "") else { return };
    let app = &selected.app;
    let (_fx, w) = selected.watch_with(&["--listen", "127.0.0.1:0"]);
    let before = w.metric("kubefim_watched_inodes");
    for round in 0..5 {
        // An image file changed, and a file made (a new inode the kernel watches at once).
        let script = format!("echo {round} >> /etc/app.conf && sleep 0.3 && echo {round} > /etc/new.conf && sleep 1");
        let c = Container { id: podman_ok(&container_args(&["run", "-d"], app, DRIFT_IMAGE, &script)) };
        let watched = watched_line(&w, &c.id, Duration::from_secs(10));
        assert!(watched["watched"].as_u64().is_some_and(|n| n > 0), "{watched:#}\n{}", w.dump());
        w.wait_for("container-gone", Duration::from_secs(20), |l| {
            l["kind"] == "container-gone" && l["container"]["id"] == c.id.as_str()
        });
    }
    // Each container's inodes (its own and its image layers') left the kernel filter with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while w.metric("kubefim_watched_inodes") != before {
        assert!(
            Instant::now() < deadline,
            "{} inodes watched, {before} before\n{}",
            w.metric("kubefim_watched_inodes"),
            w.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let watched = w.lines().iter().filter(|l| l["kind"] == "container-watched").count();
    let gone = w.lines().iter().filter(|l| l["kind"] == "container-gone").count();
    assert_eq!((watched, gone), (5, 5), "{}", w.dump());
    assert!(w.stop().success());
}

/// A pod of the stand-in API server's list: on node `test-node`, with these labels.
fn labeled_pod(namespace: &str, name: &str, uid: &str, labels: Value) -> Value {
    serde_json::json!({
        "metadata": {"namespace": namespace, "name": name, "uid": uid, "labels": labels, "resourceVersion": "1"},
        "spec": {"nodeName": "test-node", "containers": [{"name": "app", "image": DRIFT_IMAGE}]},
        "status": {"phase": "Pending"},
    })
}

#[test]
fn on_kubernetes_workload_policies_select_on_the_pods_labels() {
    let Some(selected) = Selected::policy("pods", "") else { return };
    let app = &selected.app;
    let uid = |n: u32| format!("{:08x}-1111-4222-8333-{:012x}", std::process::id(), n);
    // The pod the policy selects by its labels, and one whose container's annotations would
    // match but whose pod's labels do not.
    let list = serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
        "items": [
            labeled_pod("shop", "web-1", &uid(1), serde_json::json!({"app": app})),
            labeled_pod("shop", "other-1", &uid(2), serde_json::json!({"app": "other"})),
        ],
    });
    let api = common::api::ApiServer::start(list);
    let kubeconfig = selected.tmp.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let fx = Fixture::on_disk();
    fs::write(fx.t("host.conf"), "host\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree())]));
    let policy = selected.policy.to_str().unwrap();
    let w = Watcher::start_on_env(
        &fx,
        &["--containers", "--workload-policy", policy, "--kubernetes", "--node-name", "test-node"],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let pod_container = |pod: &str, n: u32, annotation: &str| {
        let mut args = vec!["run".to_owned(), "-d".to_owned()];
        for a in [
            "io.kubernetes.pod.namespace=shop".to_owned(),
            format!("io.kubernetes.pod.name={pod}"),
            format!("io.kubernetes.pod.uid={}", uid(n)),
            "io.kubernetes.container.name=app".to_owned(),
        ] {
            args.extend(["--annotation".to_owned(), a]);
        }
        args.extend(container_args(&[], annotation, DRIFT_IMAGE, "echo x >> /etc/app.conf && exec sleep 600"));
        Container { id: podman_ok(&args) }
    };
    let web = pod_container("web-1", 1, "unrelated");
    let other = pod_container("other-1", 2, app);
    let watched = watched_line(&w, &web.id, Duration::from_secs(20));
    assert_eq!(watched["pod"]["name"], "web-1", "{watched:#}");
    assert_eq!(watched["pod"]["uid"], uid(1), "{watched:#}");
    let changes = container_changes(&w, &web.id);
    assert!(change_at(&changes, "/etc/app.conf").is_some(), "{}", w.dump());
    // The other pod's container, annotated app=<app>, is not its pod's labels: not selected.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        w.lines().iter().all(|l| l["container"]["id"] != other.id.as_str()),
        "selected on its annotations, not its pod's labels\n{}",
        w.dump()
    );
    assert!(w.stop().success());
}

/// Where the stand-in API server keeps each kind of policy object.
const WORKLOAD_POLICIES: &str = "/apis/kubefim.io/v1alpha1/namespaces/shop/workloadfimpolicies";
const CLUSTER_POLICIES: &str = "/apis/kubefim.io/v1alpha1/clusterworkloadfimpolicies";

/// A policy object as `kubectl apply` would store it.
fn policy_object(kind: &str, namespace: Option<&str>, name: &str, spec: Value) -> Value {
    let mut metadata = serde_json::json!({"name": name, "uid": format!("uid-{name}"), "generation": 1});
    if let Some(ns) = namespace {
        metadata["namespace"] = Value::from(ns);
    }
    serde_json::json!({"apiVersion": "kubefim.io/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec})
}

#[test]
fn workload_policy_objects_from_the_api_apply_to_running_containers_as_they_change() {
    let Some(selected) = Selected::policy("objects", "") else { return };
    let app = selected.app.clone();
    let uid = |n: u32| format!("{:08x}-2222-4222-8333-{:012x}", std::process::id(), n);
    let list = serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "10"},
        "items": [
            labeled_pod("shop", "web-1", &uid(1), serde_json::json!({"app": app})),
            labeled_pod("other", "web-2", &uid(2), serde_json::json!({"app": app})),
        ],
    });
    let api = common::api::ApiServer::start(list);
    for (ns, monitor) in [("shop", "false"), ("other", "true")] {
        let namespace = serde_json::json!({"metadata": {"name": ns, "labels": {"kubefim.io/monitor": monitor}}});
        api.push("/api/v1/namespaces", "ADDED", namespace);
    }
    let kubeconfig = selected.tmp.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig);
    let fx = Fixture::on_disk();
    fs::write(fx.t("host.conf"), "host\n").unwrap();
    fx.create(&fx.write_policy(&[Rule::new(fx.tree())]));
    // No policy file: the API's objects are the only policies.
    let w = Watcher::start_on_env(
        &fx,
        &["--containers", "--kubernetes", "--node-name", "test-node", "--listen", "127.0.0.1:0"],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let pod_container = |ns: &str, pod: &str, n: u32| {
        let mut args = vec!["run".to_owned(), "-d".to_owned()];
        for a in [
            format!("io.kubernetes.pod.namespace={ns}"),
            format!("io.kubernetes.pod.name={pod}"),
            format!("io.kubernetes.pod.uid={}", uid(n)),
            "io.kubernetes.container.name=app".to_owned(),
        ] {
            args.extend(["--annotation".to_owned(), a]);
        }
        args.extend(container_args(&[], "none", DRIFT_IMAGE, "echo x >> /etc/app.conf && exec sleep 600"));
        Container { id: podman_ok(&args) }
    };
    let shop = pod_container("shop", "web-1", 1);
    let other = pod_container("other", "web-2", 2);
    // Every list the agent needs was made (and nothing selects the containers yet).
    let listed = |path: &str| api.requests().iter().any(|r| r.path == path);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(listed("/apis/kubefim.io/v1alpha1/workloadfimpolicies")
        && listed(CLUSTER_POLICIES)
        && listed("/api/v1/namespaces"))
    {
        assert!(Instant::now() < deadline, "the policy objects were never listed: {:#?}", api.requests());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(w.lines().iter().all(|l| l["kind"] != "container-watched"), "selected with no policy\n{}", w.dump());

    // A tenant's policy in `shop`: its pod is checked at once, the same labels in `other` are not.
    let spec = |rules: Value| serde_json::json!({"selector": {"matchLabels": {"app": app}}, "rules": rules});
    let rules = serde_json::json!([{"path": "/etc", "diff": true}]);
    api.push(WORKLOAD_POLICIES, "ADDED", policy_object("WorkloadFimPolicy", Some("shop"), "web", spec(rules)));
    let applied = Instant::now();
    let watched = w.wait_for("the shop container selected by the new object", Duration::from_secs(5), |l| {
        l["kind"] == "container-watched" && l["container"]["id"] == shop.id.as_str()
    });
    eprintln!("applied {:?} after the object was added", applied.elapsed());
    assert_eq!(watched["found_by"], "policy", "{watched:#}");
    assert_eq!(watched["policies"], serde_json::json!(["shop/web"]), "{watched:#}");
    let changes = container_changes(&w, &shop.id);
    let app_conf = change_at(&changes, "/etc/app.conf").unwrap_or_else(|| panic!("{}", w.dump()));
    assert_eq!(app_conf["pod"]["namespace"], "shop", "{app_conf:#}");

    // Changed: checked again under the new version (a rule on /srv added).
    let rules = serde_json::json!([{"path": "/etc", "diff": true}, {"path": "/srv"}]);
    api.push(WORKLOAD_POLICIES, "MODIFIED", policy_object("WorkloadFimPolicy", Some("shop"), "web", spec(rules)));
    let rechecked = w.wait_for("the shop container checked under the changed object", Duration::from_secs(5), |l| {
        l["kind"] == "container-watched" && l["container"]["id"] == shop.id.as_str() && l != &watched
    });
    assert!(rechecked["watched"].as_u64() > watched["watched"].as_u64(), "/srv not watched: {rechecked:#}");

    // A cluster policy selects the namespaces labelled for it: `other`'s container now.
    let cluster_spec = serde_json::json!({
        "selector": {"matchLabels": {"app": app}},
        "namespaceSelector": {"matchLabels": {"kubefim.io/monitor": "true"}},
        "rules": [{"path": "/etc"}],
    });
    api.push(CLUSTER_POLICIES, "ADDED", policy_object("ClusterWorkloadFimPolicy", None, "monitored", cluster_spec));
    let other_watched = w.wait_for("the other container selected by the cluster policy", Duration::from_secs(5), |l| {
        l["kind"] == "container-watched" && l["container"]["id"] == other.id.as_str()
    });
    assert_eq!(other_watched["policies"], serde_json::json!(["monitored"]), "{other_watched:#}");
    assert!(
        w.lines()
            .iter()
            .filter(|l| l["kind"] == "container-watched" && l["container"]["id"] == shop.id.as_str())
            .count()
            == 2,
        "the shop container (namespace not labelled) was selected by the cluster policy\n{}",
        w.dump()
    );

    // A bad object: rejected with a line and a metric, the others stay in force, no exit.
    let bad = serde_json::json!({"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}, "rules": []});
    api.push(WORKLOAD_POLICIES, "ADDED", policy_object("WorkloadFimPolicy", Some("shop"), "broken", bad));
    let rejected = w.wait_for("policy-rejected", Duration::from_secs(5), |l| l["kind"] == "policy-rejected");
    assert_eq!(
        (&rejected["policy_kind"], &rejected["namespace"], &rejected["name"]),
        (&Value::from("WorkloadFimPolicy"), &Value::from("shop"), &Value::from("broken")),
        "{rejected:#}"
    );
    assert!(rejected["error"].as_str().is_some_and(|e| e.contains("needs at least one value")), "{rejected:#}");
    assert_eq!(w.metric("kubefim_policy_rejections_total"), 1.0, "{}", w.dump());

    // Drift where people look: a Warning Event on the drifted container's pod, in its
    // namespace; a host change on the Node, in `default`; the node's FimNodeStatus.
    fs::write(fx.t("host.conf"), "host changed\n").unwrap();
    let event_where = |collection: &str, what: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(e) = api.objects(collection).into_iter().find(|e| what(e)) {
                return e;
            }
            assert!(Instant::now() < deadline, "no such event in {collection}: {:#?}", api.objects("/api/v1/events"));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let pod_event = event_where("/api/v1/namespaces/shop/events", &|e| {
        e["involvedObject"]["name"] == "web-1" && e["message"].as_str().is_some_and(|m| m.contains("/etc/app.conf"))
    });
    assert_eq!(
        (&pod_event["type"], &pod_event["reason"], &pod_event["involvedObject"]["kind"]),
        (&Value::from("Warning"), &Value::from("FileDrift"), &Value::from("Pod")),
        "{pod_event:#}"
    );
    assert_eq!(pod_event["involvedObject"]["uid"], uid(1), "{pod_event:#}");
    assert_eq!(pod_event["source"]["host"], "test-node", "{pod_event:#}");
    let host = fx.t("host.conf");
    let node_event = event_where("/api/v1/namespaces/default/events", &|e| {
        e["involvedObject"]["kind"] == "Node"
            && e["message"].as_str().is_some_and(|m| m.contains(host.to_str().unwrap()))
    });
    assert_eq!(node_event["involvedObject"]["name"], "test-node", "{node_event:#}");
    // A tenant reads only their namespace: nothing of `shop` is written elsewhere.
    for e in api.objects("/api/v1/events") {
        if e["involvedObject"]["kind"] == "Pod" {
            assert_eq!(e["metadata"]["namespace"], e["involvedObject"]["namespace"], "{e:#}");
        }
    }
    let status_path = "/apis/kubefim.io/v1alpha1/fimnodestatuses/test-node";
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let done = api.object(status_path).filter(|o| {
            let s = &o["status"];
            s["containerDrift"].as_array().is_some_and(|d| d.iter().any(|n| n["namespace"] == "shop"))
                && s["policies"]["rejected"] == 1
                && s["recentChanges"].as_array().is_some_and(|r| r.iter().any(|c| c["path"] == host.to_str().unwrap()))
        });
        if let Some(o) = done {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "the node status never said it: {:#}",
            api.object(status_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    common::deploy::validate_against_crd("FimNodeStatus", &status).unwrap_or_else(|e| panic!("{e}\n{status:#}"));
    let condition =
        |t: &str| status["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).cloned();
    assert_eq!(condition("PoliciesApplied").unwrap()["status"], "False", "{status:#}");
    assert_eq!(condition("Ready").unwrap()["status"], "True", "{status:#}");
    assert_eq!(status["status"]["baseline"]["trusted"], true, "{status:#}");
    assert!(!status.to_string().contains("host changed"), "file content in the status: {status:#}");

    // Deleted: the shop container is let go of; a later change in it is not reported.
    api.push(WORKLOAD_POLICIES, "DELETED", policy_object("WorkloadFimPolicy", Some("shop"), "web", Value::Null));
    let deadline = Instant::now() + Duration::from_secs(5);
    let before = w.metric("kubefim_watched_inodes");
    while w.metric("kubefim_watched_inodes") >= before {
        assert!(Instant::now() < deadline, "the deselected container's entries are still watched\n{}", w.dump());
        std::thread::sleep(Duration::from_millis(50));
    }
    podman_ok(&["exec", &shop.id, "/bin/sh", "-c", "echo later >> /etc/app.conf"]);
    std::thread::sleep(Duration::from_secs(1));
    let later = container_changes(&w, &shop.id).into_iter().filter(|c| c["detected_by"] == "event").count();
    assert_eq!(later, 0, "a change reported in a container no policy selects\n{}", w.dump());
    assert!(w.stop().success());
}

/// An image of this test's own (a layer over the drift image with `/etc/layer.conf`), so
/// that writing into its layer changes no other test's image; removed when dropped.
struct OwnImage {
    name: String,
}

impl OwnImage {
    fn build(tag: &str) -> OwnImage {
        OwnImage::with_layer(tag, "echo 'layer 1' > /etc/layer.conf")
    }

    /// An image whose top layer is what `script` made over the drift image.
    fn with_layer(tag: &str, script: &str) -> OwnImage {
        let name = format!("localhost/kubefim-{tag}-{}:latest", std::process::id());
        let builder = format!("kubefim-{tag}-build-{}", std::process::id());
        podman_ok(&[
            "run",
            "--name",
            &builder,
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
            DRIFT_IMAGE,
            "/bin/sh",
            "-c",
            script,
        ]);
        podman_ok(&["commit", &builder, &name]);
        podman_ok(&["rm", "-f", &builder]);
        OwnImage { name }
    }
}

impl Drop for OwnImage {
    fn drop(&mut self) {
        let mut cmd = podman();
        cmd.args(["rmi", "-f", &self.name]);
        let _ = cmd.output();
    }
}

/// The top image layer of container `id` (the one its image's own commit made), on the host.
fn top_layer(id: &str) -> PathBuf {
    let lower = podman_ok(&["inspect", "-f", "{{.GraphDriver.Data.LowerDir}}", id]);
    fs::canonicalize(lower.split(':').next().unwrap()).unwrap()
}

/// A host process (a real child) appends a line to `file`.
fn append_from_host(file: &Path) {
    let status = Command::new("/bin/sh").arg("-c").arg("echo tampered >> \"$1\"").arg("sh").arg(file).status().unwrap();
    assert!(status.success());
}

#[test]
fn watch_reports_a_host_write_into_an_image_layer_with_every_container_that_uses_it() {
    let Some(selected) = Selected::policy("layer", "") else { return };
    let app = &selected.app;
    let image = OwnImage::build("layer");
    let (_fx, w) = selected.watch();
    let first = Container::start(app, &image.name, "true");
    let second = Container::start(app, &image.name, "true");
    watched_line(&w, &first.id, Duration::from_secs(10));
    watched_line(&w, &second.id, Duration::from_secs(10));
    // The image's top layer: the one its own commit made.
    let top = top_layer(&first.id);
    let file = top.join("etc/layer.conf");
    assert_eq!(fs::read_to_string(&file).unwrap(), "layer 1\n", "{} is not the image's top layer", top.display());

    append_from_host(&file);
    let line = w.wait_for("layer-modified", Duration::from_secs(10), |l| {
        l["kind"] == "layer-modified" && l["path"] == "/etc/layer.conf"
    });
    assert_eq!(fs::canonicalize(line["layer"].as_str().unwrap()).unwrap(), top, "{line:#}");
    assert_eq!(line["process"]["comm"], "sh", "{line:#}");
    assert!(line["ops"].as_array().unwrap().contains(&Value::from("write")), "{line:#}");
    let b3sum = Command::new("b3sum").arg("--no-names").arg(&file).output().unwrap();
    assert_eq!(line["hash"], String::from_utf8_lossy(&b3sum.stdout).trim(), "{line:#}");
    let users: Vec<&str> = line["containers"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(users.contains(&first.id.as_str()) && users.contains(&second.id.as_str()), "{line:#}");
    // The containers see the image change under them, but their own layers did not: no
    // container change is reported for it.
    std::thread::sleep(Duration::from_millis(300));
    assert!(container_changes(&w, &first.id).iter().all(|c| c["path"] != "/etc/layer.conf"), "{}", w.dump());
    drop((first, second));
    assert!(w.stop().success());
}

#[test]
fn a_layer_shared_by_containers_of_different_policies_is_watched_for_each_ones_paths() {
    let Some(selected) = Selected::policy("layerpol", "") else { return };
    // A second policy, over another app, that monitors what the first does not.
    let other_app = format!("{}-opt", selected.app);
    let other = selected.tmp.path().join("opt.yaml");
    fs::write(
        &other,
        format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: WorkloadFimPolicy\nmetadata: {{name: {other_app}}}\nspec:\n  \
             selector:\n    matchLabels: {{app: {other_app}}}\n  rules:\n    - path: /opt\n"
        ),
    )
    .unwrap();
    let image = OwnImage::with_layer("layerpol", "mkdir -p /opt/tool && echo v1 > /opt/tool/run.sh");
    let (_fx, w) = selected.watch_with(&["--workload-policy", other.to_str().unwrap()]);
    // The container whose policy does not monitor /opt lists the shared layer first.
    let etc_only = Container::start(&selected.app, &image.name, "true");
    watched_line(&w, &etc_only.id, Duration::from_secs(10));
    let opt = Container::start(&other_app, &image.name, "true");
    watched_line(&w, &opt.id, Duration::from_secs(10));
    let top = top_layer(&opt.id);
    let file = top.join("opt/tool/run.sh");
    assert_eq!(fs::read_to_string(&file).unwrap(), "v1\n", "{} is not the image's top layer", top.display());

    append_from_host(&file);
    let line = w.wait_for("layer-modified of a path only the second policy monitors", Duration::from_secs(10), |l| {
        l["kind"] == "layer-modified" && l["path"] == "/opt/tool/run.sh"
    });
    let users: Vec<&str> = line["containers"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert!(users.contains(&opt.id.as_str()), "{line:#}");
    drop((etc_only, opt));
    assert!(w.stop().success());
}

#[test]
fn watch_containers_needs_a_workload_policy() {
    let run = common::kubefim(["watch", "--db", "x", "--pubkey", "y", "--containers"]);
    run.expect_code(2);
    assert!(run.stderr.contains("--workload-policy") && run.stderr.contains("--kubernetes"), "{}", run.dump());
}
