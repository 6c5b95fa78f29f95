//! Getting to a trusted baseline, and replacing it, without the private key on the node. At
//! start: a signed baseline at `--db` is used; none at all, with `--init-policy`, means scan
//! an unsigned one (`<db>.pending`), print its signing request and wait, not ready, for the
//! operator's signature in `--signatures/<node>`; anything else that does not verify stops
//! the agent (exit 3). While watching: a new signature for a new pending baseline (the
//! operator's way to accept changes) installs it. The node is never trusted as it is.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kubefim_baseline::baseline::TrustedBaseline;
use kubefim_baseline::error::chain;
use kubefim_baseline::policy::Policy;
use kubefim_baseline::request::{self, Signature, SigningRequest, read_signature_file};
use kubefim_baseline::scan::ScanProgress;
use kubefim_baseline::seal;
use kubefim_baseline::sign::PublicKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::error::{Error, Result};
use crate::http::Health;
use crate::metrics::Metrics;
use crate::model::{AwaitingSignature, BaselineInstalled, Event, Line, SignatureRejected};
use crate::output::Printer;
use crate::watch::WatchOptions;

/// How often the signature file is looked at.
pub(crate) const SIGNATURE_POLL: Duration = Duration::from_secs(2);
/// How often a waiting agent repeats its request, so a log reader that starts late sees it.
const REPEAT_REQUEST: Duration = Duration::from_secs(600);

/// The file an operator's signature for this node arrives in.
pub(crate) fn signature_file(opts: &WatchOptions) -> Option<PathBuf> {
    opts.signatures.as_ref().map(|dir| dir.join(&opts.node_name))
}

/// Watches one signature file for new content (a ConfigMap volume swaps it behind a
/// symlink; the content is what counts). Kept across baselines, so that a signature tried
/// once is not tried again.
#[derive(Default)]
pub(crate) struct SignatureWatch {
    seen: Option<Vec<u8>>,
}

impl SignatureWatch {
    /// The signature in `path` if its content is new since the last call.
    pub fn new_signature(&mut self, path: &Path) -> Option<std::result::Result<Signature, String>> {
        // Bounded, never blocking, a regular file only: whoever can write the signature
        // directory must not be able to hang or exhaust the agent. The link is followed: a
        // ConfigMap volume's files are links into its current data.
        let read = read_signature_file(path, true);
        let seen = match &read {
            Ok(bytes) => bytes.clone(),
            Err(kubefim_baseline::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return None;
            }
            // An unusable file is said once, as a bad signature is, until it changes.
            Err(e) => chain(e).into_bytes(),
        };
        if self.seen.as_ref() == Some(&seen) {
            return None;
        }
        self.seen = Some(seen);
        Some(read.and_then(|bytes| Signature::parse(&bytes, path)).map_err(|e| chain(&e)))
    }
}

fn print(printer: &mut Printer, line: Line) -> Result<()> {
    printer.print(&Event::now(line)).and_then(|()| printer.flush()).map_err(|e| Error::io("writing to stdout", e))
}

fn rejected(opts: &WatchOptions, digest: Option<String>, error: String) -> Line {
    Line::SignatureRejected(SignatureRejected { node: opts.node_name.clone(), digest, error })
}

/// A pending baseline's request, if it was scanned with exactly `policy` (a changed policy
/// means a new scan, and so does a request from a kubefim that did not seal its manifest).
fn usable_pending(db: &Path, policy: &Policy) -> Result<Option<SigningRequest>> {
    Ok(request::pending_request(db)?.filter(|r| {
        seal::parse_unsigned_body(r.body.as_bytes())
            .is_some_and(|b| b.policy == policy.source() && b.manifest.is_some())
    }))
}

/// Tries `signature` on the pending baseline; true once it is installed. A signature for
/// another scan (stale) or one that does not verify is reported and waited past.
pub(crate) fn try_attach(
    opts: &WatchOptions,
    key: &PublicKey,
    signature: std::result::Result<Signature, String>,
    printer: &mut Printer,
) -> Result<bool> {
    let signature = match signature {
        Ok(s) => s,
        Err(e) => {
            print(printer, rejected(opts, None, e))?;
            return Ok(false);
        }
    };
    if !request::is_for_pending(&opts.db, &signature)? {
        let why = "not for the pending baseline of this node (stale, another node's, or nothing is pending)";
        print(printer, rejected(opts, Some(signature.digest), why.into()))?;
        return Ok(false);
    }
    match request::attach(&opts.db, key, &signature) {
        Ok(()) => {
            print(
                printer,
                Line::BaselineInstalled(BaselineInstalled {
                    node: opts.node_name.clone(),
                    db: opts.db.display().to_string(),
                    digest: signature.digest,
                }),
            )?;
            Ok(true)
        }
        Err(e) => {
            print(printer, rejected(opts, Some(signature.digest), chain(&e)))?;
            Ok(false)
        }
    }
}

/// The trusted baseline to watch with, once there is one; `None` when asked to stop while
/// waiting for it.
pub(crate) async fn trusted(
    opts: &WatchOptions,
    key: &PublicKey,
    signatures: &mut SignatureWatch,
    printer: &mut Printer,
    health: &Health,
    metrics: &Metrics,
) -> Result<Option<TrustedBaseline>> {
    let path = signature_file(opts);
    // A signature that arrived while the agent was down: for the pending baseline, it is
    // installed now; else it is taken as the one of the baseline in use.
    if let Some(path) = &path
        && let Some(signature) = signatures.new_signature(path)
        && request::pending_request(&opts.db)?.is_some()
    {
        try_attach(opts, key, signature, printer)?;
    }
    let init = match (&opts.init_policy, opts.db.exists()) {
        (Some(policy), false) => policy,
        // A baseline exists (it must verify), or there is no way to make one here.
        _ => return Ok(Some(TrustedBaseline::open(&opts.db, key)?)),
    };
    let policy = Policy::load(init)?;
    // Installed before the scan, which may take minutes: a stop during it is a clean exit.
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("installing SIGTERM handler", e))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::io("installing SIGINT handler", e))?;
    health.set_not_ready("no signed baseline yet: scanning the node for a signing request");
    metrics.set_baseline(0, 0.0, false);
    let request = match usable_pending(&opts.db, &policy)? {
        Some(request) => request,
        None => {
            let (db, host, node) = (opts.db.clone(), opts.host.clone(), opts.node_name.clone());
            let scan = tokio::task::spawn_blocking(move || {
                request::scan(&policy, &host, &db, &node, &ScanProgress::default()).map(|(_, r)| r)
            });
            tokio::select! {
                scanned = scan => scanned
                    .map_err(|e| Error::io("scanning for the first baseline", std::io::Error::other(e)))??,
                // The scan thread is left to the process's exit; its temporary is removed by
                // the next scan (its pid is gone by then).
                _ = sigterm.recv() => return Ok(None),
                _ = sigint.recv() => return Ok(None),
            }
        }
    };
    let Some(path) = path else {
        // Made sure by the caller: --init-policy comes with --signatures.
        return Err(Error::io("waiting for a signature", std::io::Error::other("no --signatures directory")));
    };
    let awaiting = |request: &SigningRequest| {
        Line::AwaitingSignature(AwaitingSignature {
            node: opts.node_name.clone(),
            signature_file: path.display().to_string(),
            what_to_do: "sign this request with `kubefim baseline sign --key KEY` where the private key is, \
                         and put the signature where signature_file is (the kubefim-signatures ConfigMap)"
                .into(),
            request: request.clone(),
        })
    };
    print(printer, awaiting(&request))?;
    health.set_not_ready("baseline awaiting signature (see the signing request in the log)");
    let mut poll = tokio::time::interval(SIGNATURE_POLL);
    let mut repeated = Instant::now();
    loop {
        tokio::select! {
            _ = poll.tick() => {}
            _ = sigterm.recv() => return Ok(None),
            _ = sigint.recv() => return Ok(None),
        }
        health.beat();
        if repeated.elapsed() >= REPEAT_REQUEST {
            repeated = Instant::now();
            print(printer, awaiting(&request))?;
        }
        if let Some(signature) = signatures.new_signature(&path)
            && try_attach(opts, key, signature, printer)?
        {
            return Ok(Some(TrustedBaseline::open(&opts.db, key)?));
        }
    }
}
