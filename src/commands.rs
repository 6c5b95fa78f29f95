//! One function per subcommand: load what the flags name, call the library, hand the result
//! to `output`, return the exit code.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use kubefim_baseline::baseline::{self, TrustedBaseline};
use kubefim_baseline::container::layer_cache::LayerCache;
use kubefim_baseline::container::{check, discover};
use kubefim_baseline::policy::{Policy, path_from_bytes};
use kubefim_baseline::record::{decode_chunk, encode_chunk};
use kubefim_baseline::report::{self, ContainerReportView, ContainersReportView, RecordLine, VerifyReportView};
use kubefim_baseline::request::{self, Signature, SigningRequest};
use kubefim_baseline::root::HostRoot;
use kubefim_baseline::scan::ScanProgress;
use kubefim_baseline::sign::{self, PublicKey, SigningKey};
use kubefim_baseline::store::{SIGNATURE_KEY, Store, TreeKind};
use kubefim_baseline::verify as verifier;
use kubefim_baseline::workload::WorkloadPolicies;

use crate::exit;
use crate::output::{self, Progress};

pub fn keygen(out: &Path) -> Result<u8> {
    let (key, public) = sign::generate(out)?;
    output::status(&format!(
        "wrote private key {} (keep it off the monitored nodes) and public key {}",
        key.display(),
        public.display()
    ));
    Ok(exit::CLEAN)
}

pub fn create(policy: &Path, host: &HostRoot, db: &Path, key: &Path) -> Result<u8> {
    let policy = Policy::load(policy)?;
    let key = SigningKey::load(key)?;
    create_with(&policy, host, db, &key)
}

fn create_with(policy: &Policy, host: &HostRoot, db: &Path, key: &SigningKey) -> Result<u8> {
    let progress = ScanProgress::default();
    let started = std::time::Instant::now();
    let summary = Progress::show("scanning", &progress, || baseline::create(policy, host, db, key, &progress))
        .with_context(|| format!("creating the baseline {}", db.display()))?;
    output::warnings(&summary.warnings);
    output::status(&format!(
        "signed baseline {} written: {} entries, {} hashed, {} warnings, in {:.1?}",
        db.display(),
        summary.entries,
        output::bytes(summary.bytes),
        summary.warnings.len(),
        started.elapsed()
    ));
    Ok(exit::CLEAN)
}

fn open_trusted(db: &Path, pubkey: &Path) -> Result<TrustedBaseline> {
    let key = PublicKey::load(pubkey)?;
    Ok(TrustedBaseline::open(db, &key)?)
}

pub fn show(db: &Path, pubkey: &Path, jsonl: bool) -> Result<u8> {
    let trusted = open_trusted(db, pubkey)?;
    let mut out = anstream::stdout().lock();
    trusted.for_each_in_path_order(|path, record| {
        let path = path_from_bytes(path);
        if jsonl {
            output::json_line(&mut out, &RecordLine::new(path, record, &trusted.policy))
        } else {
            output::record_human(&mut out, path, record)
        }
        .map_err(|source| kubefim_baseline::Error::Io {
            action: "write to",
            path: "standard output".into(),
            source,
        })
    })?;
    if !jsonl {
        output::status(&output::baseline_header(&trusted));
    }
    Ok(exit::CLEAN)
}

pub fn verify(db: &Path, pubkey: &Path, host: &HostRoot, json: bool) -> Result<u8> {
    let key = PublicKey::load(pubkey)?;
    let progress = ScanProgress::default();
    let started = std::time::Instant::now();
    let (trusted, report) = Progress::show("verifying", &progress, || verifier::verify_db(db, &key, host, &progress))
        .with_context(|| format!("verifying against {}", db.display()))?;
    tracing::debug!(elapsed = ?started.elapsed(), scanned = report.scanned, "verified");
    if json {
        output::json_line(&mut anstream::stdout().lock(), &VerifyReportView::new(&report, &trusted.policy))?;
    } else {
        output::status(&output::baseline_header(&trusted));
        output::verify_human(&report)?;
    }
    Ok(if report.is_clean() { exit::CLEAN } else { exit::DIFFERENCES })
}

/// `verify --containers`: every running container a workload policy selects, against its
/// image. Exit 1 on drift or on a container that could not be checked whole.
pub fn verify_containers(policy_paths: &[PathBuf], layer_cache: &Path, host: &HostRoot, json: bool) -> Result<u8> {
    let policies = WorkloadPolicies::load(policy_paths)?;
    // Without it (another kubefim holds it) the layers are read: slower, never less sure.
    let cache =
        LayerCache::open(layer_cache).inspect_err(|e| tracing::warn!("{e}: image layers are read without it")).ok();
    let running = discover::running(Path::new("/proc"), host);
    let mut checked = Vec::new();
    // The comparisons, beside their views, for the human form.
    let mut reports = Vec::new();
    for c in &running {
        for one in check::check(c, &policies, cache.as_ref()) {
            let outcome = one.report.as_ref().map_err(String::as_str);
            checked.push(ContainerReportView::new(c, &one.policy.qualified_name(), &one.policy.policy, outcome));
            reports.push(one.report);
        }
    }
    let doc = ContainersReportView::new(running.len(), checked);
    if json {
        output::json_line(&mut anstream::stdout().lock(), &doc)?;
    } else {
        for (view, report) in doc.containers.iter().zip(&reports) {
            output::container_header(view)?;
            match report {
                Ok(r) => output::verify_human(r)?,
                Err(e) => output::status(&format!("cannot check container {}: {e}", view.container.id)),
            }
        }
        output::status(&format!(
            "{} running containers, {} checked against their images, {} drifted, {} not checked whole",
            doc.summary.running, doc.summary.checked, doc.summary.drifted, doc.summary.unverified
        ));
    }
    let clean = doc.summary.clean;
    Ok(if clean { exit::CLEAN } else { exit::DIFFERENCES })
}

pub fn accept(host: &HostRoot, db: &Path, key: &Path, pubkey: &Path, paths: &[PathBuf]) -> Result<u8> {
    let key = SigningKey::load(key)?;
    let public = PublicKey::load(pubkey)?;
    let progress = ScanProgress::default();
    let summary =
        Progress::show("accepting", &progress, || baseline::accept(host, db, &key, &public, paths, &progress))
            .with_context(|| format!("accepting changes into {}", db.display()))?;
    output::warnings(&summary.warnings);
    let what = if paths.is_empty() { "everything".to_owned() } else { format!("{} path(s)", paths.len()) };
    output::status(&format!("accepted the current state of {what}; new signed baseline {}", db.display()));
    Ok(exit::CLEAN)
}

/// The main job on one machine: keys and a baseline if missing, then verify.
pub fn run(state_dir: &Path, policy: Option<&Path>, json: bool) -> Result<u8> {
    let keys = state_dir.join("keys");
    let (key_path, pub_path) = (keys.join(sign::PRIVATE_KEY_FILE), keys.join(sign::PUBLIC_KEY_FILE));
    let db = state_dir.join("baseline.sled");
    if !db.exists() {
        if !key_path.exists() {
            sign::generate(&keys)?;
            output::status(&format!("generated signing keys in {}", keys.display()));
        }
        let policy = match policy {
            Some(p) => Policy::load(p)?,
            None => Policy::embedded_default(),
        };
        output::status(&format!("no baseline at {}: creating one from policy {:?}", db.display(), policy.name));
        create_with(&policy, &HostRoot::identity(), &db, &SigningKey::load(&key_path)?)?;
    } else if policy.is_some() {
        output::status(
            "a baseline exists: verifying with the policy it was signed with (--policy is for new baselines)",
        );
    }
    verify(&db, &pub_path, &HostRoot::identity(), json)
}

/// The node name a request is made for: the flag (or NODE_NAME), else the host name.
pub fn node_name(given: Option<String>) -> String {
    given.filter(|n| !n.is_empty()).unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
    })
}

pub fn scan(policy: &Path, host: &HostRoot, db: &Path, node: Option<String>) -> Result<u8> {
    let policy = Policy::load(policy)?;
    let node = node_name(node);
    let progress = ScanProgress::default();
    let (summary, request) =
        Progress::show("scanning", &progress, || request::scan(&policy, host, db, &node, &progress))
            .with_context(|| format!("scanning into {}", request::pending_path(db).display()))?;
    output::warnings(&summary.warnings);
    output::json_line(&mut anstream::stdout().lock(), &serde_json::to_value(&request)?)?;
    output::status(&format!(
        "unsigned baseline {} written for node {node}: {} entries; sign the request printed on stdout with `kubefim baseline sign --key KEY` elsewhere, then `kubefim baseline attach` its signature",
        request::pending_path(db).display(),
        summary.entries,
    ));
    Ok(exit::CLEAN)
}

pub fn sign(key: &Path, expect_policy: Option<&Path>, out: Option<&Path>, files: &[PathBuf]) -> Result<u8> {
    let key = SigningKey::load(key)?;
    let expected = expect_policy
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let text = if files.is_empty() {
        std::io::read_to_string(std::io::stdin()).context("reading requests from standard input")?
    } else {
        let mut all = String::new();
        for f in files {
            all.push_str(&std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?);
            all.push('\n');
        }
        all
    };
    let requests: Vec<SigningRequest> = text.lines().filter_map(SigningRequest::find_in).collect();
    if requests.is_empty() {
        bail!("no signing request in the input (they are the lines with \"kind\":\"{}\")", request::REQUEST_KIND);
    }
    let mut failed = 0;
    for req in &requests {
        let signed = match request::sign(req, &key, expected.as_deref()) {
            Ok(s) => s,
            Err(e) => {
                output::error(&anyhow::Error::from(e));
                failed += 1;
                continue;
            }
        };
        // Only what the signature covers: the request's own fields are the node's say.
        output::signed(&signed);
        let signature = signed.signature;
        match out {
            Some(dir) => {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                // Written aside and renamed: an agent polling this directory never reads half.
                let path = dir.join(&signature.node);
                let tmp = dir.join(format!(".{}.tmp", signature.node));
                std::fs::write(&tmp, serde_json::to_vec(&signature)?)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => output::json_line(&mut anstream::stdout().lock(), &serde_json::to_value(&signature)?)?,
        }
    }
    Ok(if failed == 0 { exit::CLEAN } else { exit::ERROR })
}

pub fn attach(db: &Path, pubkey: &Path, signature: &Path) -> Result<u8> {
    let public = PublicKey::load(pubkey)?;
    let signature = Signature::load(signature)?;
    request::attach(db, &public, &signature)
        .with_context(|| format!("attaching the signature to {}", request::pending_path(db).display()))?;
    output::status(&format!("signed baseline {} installed for node {}", db.display(), signature.node));
    Ok(exit::CLEAN)
}

/// The JSON outputs `kubefim schema` describes; each names the type that prints it.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchemaOutput {
    /// One line of `kubefim watch --format jsonl` (changes and the watcher's own lines).
    Events,
    /// The document `verify --format json` (and `run --format json`) prints.
    Verify,
    /// One line of `baseline show --format jsonl`.
    Record,
    /// The document `verify --containers --format json` prints.
    Containers,
}

/// `kubefim schema OUTPUT`: the JSON Schema (draft 2020-12) of that output, generated from
/// the types that print it.
pub fn schema(output: SchemaOutput) -> Result<u8> {
    let schema = match output {
        SchemaOutput::Events => report::output_schema::<kubefim_watcher::model::Event>(),
        SchemaOutput::Verify => report::output_schema::<VerifyReportView>(),
        SchemaOutput::Record => report::output_schema::<RecordLine>(),
        SchemaOutput::Containers => report::output_schema::<ContainersReportView>(),
    };
    let mut out = anstream::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &schema)?;
    writeln!(out)?;
    Ok(exit::CLEAN)
}

/// Ways to edit a database behind kubefim's back, to prove verify notices.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TamperOp {
    EditRecord,
    InsertRecord,
    DeleteRecord,
    DropSignature,
    SwapSignature,
}

pub fn tamper(db: &Path, op: TamperOp, other: Option<&Path>, reseal_with: Option<&Path>) -> Result<u8> {
    let store = Store::open(db)?;
    let mut first = None;
    store.for_each_entry(|tree, k, v| {
        if tree == TreeKind::Records && first.is_none() {
            first = Some((k.to_vec(), v.to_vec()));
        }
        Ok(())
    })?;
    let (chunk_key, mut entries) = match first {
        Some((k, v)) => (k, decode_chunk(&v).context("undecodable record chunk")?),
        None => bail!("the baseline has no records to tamper with"),
    };
    let first = entries.first().cloned().context("the baseline has an empty record chunk")?;
    match op {
        TamperOp::EditRecord => {
            entries[0].1.mode ^= 0o002;
            store.put(TreeKind::Records, &chunk_key, &encode_chunk(&entries))?;
        }
        TamperOp::InsertRecord => {
            let inserted = [(b"/kubefim-tamper-inserted".to_vec(), first.1)];
            store.put(TreeKind::Records, &u64::MAX.to_be_bytes(), &encode_chunk(&inserted))?;
        }
        TamperOp::DeleteRecord => {
            entries.remove(0);
            store.put(TreeKind::Records, &chunk_key, &encode_chunk(&entries))?;
        }
        TamperOp::DropSignature => store.remove(TreeKind::Meta, SIGNATURE_KEY)?,
        TamperOp::SwapSignature => {
            let Some(other) = other else { bail!("swap-signature needs --other-db") };
            let sig = Store::open(other)?
                .get(TreeKind::Meta, SIGNATURE_KEY)?
                .context("the other baseline has no signature")?;
            store.put(TreeKind::Meta, SIGNATURE_KEY, &sig)?;
        }
    }
    store.flush()?;
    drop(store);
    if let Some(key) = reseal_with {
        kubefim_baseline::seal::reseal_for_tests(db, &SigningKey::load(key)?)?;
    }
    Ok(exit::CLEAN)
}

/// `kubefim watch`: runs until SIGINT or SIGTERM.
pub fn watch(opts: kubefim_watcher::WatchOptions) -> Result<u8> {
    match kubefim_watcher::run(opts) {
        Ok(()) => Ok(exit::CLEAN),
        // Keep the baseline's own error so main sees an untrusted baseline for what it is.
        Err(kubefim_watcher::Error::Baseline(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}
