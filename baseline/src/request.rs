//! Baselines signed off the node. [`scan`] writes an unsigned baseline beside the real one
//! (`<db>.pending`) and a [`SigningRequest`]: the body of its seal (policy, records digest,
//! file listing) and that body's digest. [`sign`], on the operator's machine and with the
//! private key, checks a request and signs the digest. [`attach`], back on the node and with
//! the public key only, checks the signature, completes the seal and installs the baseline.
//! One signature covers everything (a v2 seal, see `seal`), so one round trip suffices and
//! the private key never has to be where the monitored files are.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::baseline::{ChunkWriter, MANIFEST_KEY, Manifest, TrustedBaseline, canonical_digest, manifest, scan_into};
use crate::error::{Error, Result};
use crate::lock::{Lock, lock_path};
use crate::policy::Policy;
use crate::root::HostRoot;
use crate::scan::{Scan, ScanProgress, ScanSummary};
use crate::seal;
use crate::sign::{PublicKey, SigningKey, seal_digest};
use crate::store::{self, Store, TreeKind};

/// `kind` of a signing request.
pub const REQUEST_KIND: &str = "KubefimSigningRequest";
/// `kind` of a signature.
pub const SIGNATURE_KIND: &str = "KubefimSignature";

/// What a node asks an operator to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SigningRequest {
    /// [`REQUEST_KIND`].
    pub kind: String,
    /// The node (Kubernetes node name, or host name) the baseline describes.
    pub node: String,
    /// When the scan was made, nanoseconds since the epoch.
    pub created_unix_ns: u64,
    /// Number of records.
    pub records: u64,
    /// `metadata.name` of the policy.
    pub policy_name: String,
    /// Paths that could not be fully recorded, with why.
    pub incomplete: Vec<(String, String)>,
    /// Hex digest of `body`: what is signed.
    pub digest: String,
    /// The seal body (policy text, records digest, file listing).
    pub body: String,
}

/// An operator's signature of a [`SigningRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// [`SIGNATURE_KIND`].
    pub kind: String,
    /// The node of the request.
    pub node: String,
    /// The digest signed (hex), to tell a stale signature from a bad one.
    pub digest: String,
    /// Hex Ed25519 signature.
    pub signature: String,
}

fn bad_request(message: String) -> Error {
    Error::Store { path: PathBuf::from("signing request"), message }
}

impl SigningRequest {
    /// The request in a line of text: the line itself, or its `request` field (the agent's
    /// log line). `None` for any other line, so whole logs can be fed in.
    pub fn find_in(line: &str) -> Option<SigningRequest> {
        let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
        let value = if value.get("kind").and_then(|k| k.as_str()) == Some(REQUEST_KIND) {
            value
        } else {
            value.get("request")?.clone()
        };
        serde_json::from_value(value).ok().filter(|r: &SigningRequest| r.kind == REQUEST_KIND)
    }

    /// The policy text and manifest of the body, once the body is checked against the
    /// request's digest. Only these are signed: the request's other fields (node, counts,
    /// time, incomplete paths) are the node's unauthenticated say, so they must match them.
    fn checked(&self) -> Result<(String, Manifest)> {
        // The node name as the request gives it is only for the messages: escaped, and
        // labelled as a claim.
        let claimed = format!("the request claiming node {:?}", self.node);
        let body = seal::parse_unsigned_body(self.body.as_bytes())
            .ok_or_else(|| bad_request(format!("{claimed} has no valid seal body")))?;
        if hex::encode(seal_digest(self.body.as_bytes())) != self.digest {
            return Err(bad_request(format!("{claimed} was altered: its body does not have the digest it names")));
        }
        let manifest: Manifest = body
            .manifest
            .as_deref()
            .ok_or_else(|| {
                bad_request(format!(
                    "{claimed} was made by an older kubefim, whose body does not carry its manifest (node, \
                     counts, incomplete paths): rescan the node with this version"
                ))
            })
            .and_then(|bytes| {
                serde_json::from_slice(bytes).map_err(|e| bad_request(format!("{claimed}: unreadable manifest ({e})")))
            })?;
        let agrees = manifest.host == self.node
            && manifest.records == self.records
            && u64::try_from(manifest.created_unix_ns).ok() == Some(self.created_unix_ns)
            && manifest.incomplete == self.incomplete
            && manifest.policy == body.policy;
        if !agrees {
            return Err(bad_request(format!(
                "{claimed} was altered: its node, counts, time or incomplete paths are not those of its signed \
                 body (node {:?}, {} records, {} incomplete); not signed",
                manifest.host,
                manifest.records,
                manifest.incomplete.len()
            )));
        }
        Ok((body.policy, manifest))
    }
}

/// The largest signature file read: one is about 300 bytes, so anything near this is not one
/// (and `/dev/zero` must not be read until memory runs out).
pub const MAX_SIGNATURE_BYTES: u64 = 64 << 10;

impl Signature {
    /// Reads a signature file given on the command line: a regular file, not a symbolic
    /// link, at most [`MAX_SIGNATURE_BYTES`].
    pub fn load(path: &Path) -> Result<Signature> {
        Signature::parse(&read_signature_file(path, false)?, path)
    }

    /// A signature from the bytes of `path`.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Signature> {
        serde_json::from_slice::<Signature>(bytes).ok().filter(|s| s.kind == SIGNATURE_KIND).ok_or_else(|| {
            Error::Store {
                path: path.to_owned(),
                message: "not a kubefim signature (make one with `kubefim baseline sign`)".into(),
            }
        })
    }
}

/// The bytes of a signature file, read without ever blocking or reading without bound: opened
/// with `O_NONBLOCK` (a FIFO does not wait for a writer), refused unless `fstat` says it is a
/// regular file (a FIFO, a device such as `/dev/zero`, a directory), and refused when larger
/// than [`MAX_SIGNATURE_BYTES`]. `follow` allows a symbolic link (a ConfigMap volume's files
/// are links into its current data directory); otherwise a link is refused (`O_NOFOLLOW`).
pub fn read_signature_file(path: &Path, follow: bool) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

    let refuse = |what: &str| Error::Store {
        path: path.to_owned(),
        message: format!("{what}, not a signature file; pass the regular file `kubefim baseline sign` wrote"),
    };
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY | nofollow)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) if !follow => refuse("a symbolic link"),
            _ => Error::io("read the signature", path, e),
        })?;
    let meta = file.metadata().map_err(|e| Error::io("read the signature", path, e))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(refuse(what));
    }
    let too_big = || Error::Store {
        path: path.to_owned(),
        message: format!(
            "larger than {} KiB, so not a signature (one is a few hundred bytes); pass the file `kubefim baseline sign` wrote",
            MAX_SIGNATURE_BYTES >> 10
        ),
    };
    if meta.len() > MAX_SIGNATURE_BYTES {
        return Err(too_big());
    }
    // Bounded whatever fstat said: a file may grow while it is read.
    let mut bytes = Vec::new();
    file.take(MAX_SIGNATURE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io("read the signature", path, e))?;
    if bytes.len() as u64 > MAX_SIGNATURE_BYTES {
        return Err(too_big());
    }
    Ok(bytes)
}

/// Where the unsigned baseline for `db` waits for its signature.
pub fn pending_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(".pending");
    PathBuf::from(p)
}

/// A node name usable as a file name (a signature is stored under it).
fn check_node(node: &str) -> Result<()> {
    if node.is_empty() || node == "." || node == ".." || node.contains('/') || node.contains('\0') {
        return Err(bad_request(format!("{node:?} cannot be a node name (it names the signature file)")));
    }
    Ok(())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// Scans everything `policy` names (read under `host`) into an unsigned baseline at
/// [`pending_path`]`(db)`, replacing any earlier pending one, and returns its signing
/// request (also kept in the pending baseline for [`attach`]).
pub fn scan(
    policy: &Policy,
    host: &HostRoot,
    db: &Path,
    node: &str,
    progress: &ScanProgress,
) -> Result<(ScanSummary, SigningRequest)> {
    check_node(node)?;
    let pending = pending_path(db);
    let store = Store::create_beside(&pending)?;
    let filled = (|| {
        let scan =
            Scan::whole_policy(policy).under(host).skip(db).skip(&lock_path(db)).skip(&pending).skip(store.path());
        let summary = scan_into(&mut ChunkWriter::new(&store), &scan, progress, std::iter::empty())?;
        let mut manifest = manifest(policy, summary.entries, &summary, Vec::new());
        manifest.host = node.to_owned();
        let manifest_bytes = serde_json::to_vec(&manifest).expect("a manifest serialises");
        store.put(TreeKind::Meta, MANIFEST_KEY, &manifest_bytes)?;
        Ok((summary, manifest, manifest_bytes, canonical_digest(&store)?))
    })();
    let (summary, manifest, manifest_bytes, records) = match filled {
        Ok(done) => done,
        Err(e) => {
            store.discard();
            return Err(e);
        }
    };
    let dir = store.close()?;
    let written = (|| {
        let body = seal::unsigned_body(&dir, &manifest.policy, &records, &manifest_bytes)?;
        let body = String::from_utf8(body).map_err(|_| bad_request("the seal body is not UTF-8".into()))?;
        let request = SigningRequest {
            kind: REQUEST_KIND.into(),
            node: node.to_owned(),
            created_unix_ns: u64::try_from(manifest.created_unix_ns).unwrap_or_else(|_| now_ns()),
            records: manifest.records,
            policy_name: policy.name.clone(),
            incomplete: manifest.incomplete.clone(),
            digest: hex::encode(seal_digest(body.as_bytes())),
            body,
        };
        let path = dir.join(store::REQUEST_FILE);
        std::fs::write(&path, serde_json::to_vec(&request).expect("a request serialises"))
            .map_err(|e| Error::io("write the signing request", &path, e))?;
        store::install(&dir, &pending)?;
        Ok(request)
    })();
    match written {
        Ok(request) => Ok((summary, request)),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// The request of the pending baseline for `db`, if there is one.
pub fn pending_request(db: &Path) -> Result<Option<SigningRequest>> {
    let path = pending_path(db).join(store::REQUEST_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Store {
            path: path.clone(),
            message: format!("unreadable signing request ({e}); rescan with `kubefim baseline scan`"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read the signing request", &path, e)),
    }
}

/// What was signed: the signature, and what the signed body says (all a signer may show).
#[derive(Debug, Clone)]
pub struct Signed {
    /// The signature, for the node the body names.
    pub signature: Signature,
    /// The manifest the body carries: node (`host`), time, record count, incomplete paths.
    pub manifest: Manifest,
    /// The policy's `metadata.name`, from the body's policy.
    pub policy_name: String,
}

/// Checks `request` and signs it. With `expect_policy`, the node must have scanned with
/// exactly that policy text (a node cannot narrow what it is monitored for).
pub fn sign(request: &SigningRequest, key: &SigningKey, expect_policy: Option<&str>) -> Result<Signed> {
    let (policy, manifest) = request.checked()?;
    check_node(&manifest.host)?;
    if let Some(expected) = expect_policy
        && expected != policy
    {
        return Err(bad_request(format!(
            "node {:?} scanned with a policy other than the expected one; not signed (if the policy \
             changed on purpose, sign with the new one)",
            manifest.host
        )));
    }
    let parsed = Policy::from_yaml(&policy, "the request's policy")?;
    if parsed.name != request.policy_name {
        return Err(bad_request(format!("the request of node {:?} misnames its policy", manifest.host)));
    }
    let signature = key.sign(&seal_digest(request.body.as_bytes()));
    Ok(Signed {
        signature: Signature {
            kind: SIGNATURE_KIND.into(),
            node: manifest.host.clone(),
            digest: request.digest.clone(),
            signature: hex::encode(signature),
        },
        manifest,
        policy_name: parsed.name,
    })
}

/// Whether `signature` is for the pending baseline of `db` (same digest), without checking
/// it: lets a caller tell "not for this scan" (wait) from "bad" (alarm).
pub fn is_for_pending(db: &Path, signature: &Signature) -> Result<bool> {
    Ok(pending_request(db)?.is_some_and(|r| r.digest == signature.digest))
}

/// Checks `signature` of the pending baseline of `db` with `public`, completes its seal and
/// installs it at `db` (replacing the previous baseline), then opens it as any baseline is
/// opened. Nothing is installed unless every check passes.
pub fn attach(db: &Path, public: &PublicKey, signature: &Signature) -> Result<()> {
    // Held until installed: an `accept` meanwhile would be replaced without a word.
    let _lock = Lock::for_rewrite(db, "attach")?;
    let pending = pending_path(db);
    let untrusted = |reason: String| Error::Untrusted { path: pending.clone(), reason };
    let request = pending_request(db)?.ok_or_else(|| Error::Store {
        path: pending.clone(),
        message: "no baseline is waiting for a signature here (scan one with `kubefim baseline scan`)".into(),
    })?;
    if signature.node != request.node {
        return Err(untrusted(format!(
            "the signature is for node {:?}, the pending baseline was scanned on node {:?}: use this node's signature",
            signature.node, request.node
        )));
    }
    if signature.digest != request.digest {
        return Err(untrusted(format!(
            "the signature is for digest {}, the pending baseline has digest {}: sign its current request",
            signature.digest, request.digest
        )));
    }
    let bytes = hex::decode(&signature.signature).map_err(|_| untrusted("the signature is not hex".into()))?;
    if !public.verifies(&seal_digest(request.body.as_bytes()), &bytes) {
        return Err(untrusted(format!(
            "the signature does not verify with public key {} (signed with another key?)",
            public.fingerprint()
        )));
    }
    // The node as the operator signed it (the sealed manifest), not as the files on the node
    // say: the signature's label must be that node.
    let sealed_node = seal::parse_unsigned_body(request.body.as_bytes())
        .and_then(|b| b.manifest)
        .and_then(|m| serde_json::from_slice::<Manifest>(&m).ok())
        .map(|m| m.host);
    if sealed_node.as_deref().is_some_and(|host| host != signature.node) {
        return Err(untrusted(format!(
            "the signature is labelled for node {:?}, but what was signed is a scan of node {:?}",
            signature.node,
            sealed_node.unwrap_or_default()
        )));
    }
    seal::write_signed(&pending, request.body.into_bytes(), &bytes)?;
    if let Err(e) = TrustedBaseline::open(&pending, public) {
        // Leave it as it was: still waiting, and the next attempt says the same.
        let _ = std::fs::remove_file(pending.join(store::SEAL_FILE));
        return Err(e);
    }
    // The request is part of no baseline; the seal now says everything it said.
    let request_file = pending.join(store::REQUEST_FILE);
    std::fs::remove_file(&request_file).map_err(|e| Error::io("remove the signing request", &request_file, e))?;
    store::install(&pending, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sign::generate;

    /// A node to baseline: a tree with one file, a policy over it, and the operator's keys.
    struct Node {
        dir: tempfile::TempDir,
        tree: PathBuf,
        policy: Policy,
        key: SigningKey,
        public: PublicKey,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("a"), "alpha\n").unwrap();
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n      diff: true\n",
            tree.display()
        );
        let policy = Policy::from_yaml(&yaml, "test").unwrap();
        let (k, p) = generate(&dir.path().join("keys")).unwrap();
        let (key, public) = (SigningKey::load(&k).unwrap(), PublicKey::load(&p).unwrap());
        Node { dir, tree, policy, key, public }
    }

    #[test]
    fn scan_sign_attach_gives_a_trusted_baseline_and_no_key_on_the_node() {
        let Node { dir, policy, key, public, .. } = node();
        let db = dir.path().join("db");
        let (summary, request) = scan(&policy, &HostRoot::identity(), &db, "node-a", &ScanProgress::default()).unwrap();
        assert_eq!(summary.entries, 2);
        assert!(!db.exists(), "nothing is trusted before the signature");
        assert!(TrustedBaseline::open(&pending_path(&db), &public).is_err());
        let line = serde_json::json!({"state": "awaiting-signature", "request": request}).to_string();
        let found = SigningRequest::find_in(&line).unwrap();
        assert_eq!(found, request);
        let signature = sign(&found, &key, Some(policy.source())).unwrap().signature;
        attach(&db, &public, &signature).unwrap();
        let trusted = TrustedBaseline::open(&db, &public).unwrap();
        assert_eq!(trusted.len(), 2);
        let mut listed = 0;
        trusted
            .for_each_in_path_order(|_, _| {
                listed += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(listed, 2);
        assert_eq!(trusted.manifest.host, "node-a");
        assert!(!pending_path(&db).exists());
    }

    #[test]
    fn altered_requests_stale_and_foreign_signatures_are_refused() {
        let Node { dir, tree, policy, key, public } = node();
        let (other, _) = generate(&dir.path().join("other")).unwrap();
        let other = SigningKey::load(&other).unwrap();
        let db = dir.path().join("db");
        let host = HostRoot::identity();
        let (_, request) = scan(&policy, &host, &db, "node-a", &ScanProgress::default()).unwrap();

        let mut altered = request.clone();
        altered.body = altered.body.replace("name: t}", "name: u}");
        assert!(sign(&altered, &key, None).unwrap_err().to_string().contains("altered"));
        let e = sign(&request, &key, Some("kind: FimPolicy")).unwrap_err().to_string();
        assert!(e.contains("other than the expected"), "{e}");

        let foreign = sign(&request, &other, None).unwrap().signature;
        let e = attach(&db, &public, &foreign).unwrap_err();
        assert!(e.is_untrusted() && e.to_string().contains("does not verify"), "{e}");

        let stale = sign(&request, &key, None).unwrap().signature;
        std::fs::write(tree.join("b"), "beta\n").unwrap();
        scan(&policy, &host, &db, "node-a", &ScanProgress::default()).unwrap();
        assert!(!is_for_pending(&db, &stale).unwrap());
        let e = attach(&db, &public, &stale).unwrap_err().to_string();
        assert!(e.contains("sign its current request"), "{e}");
        assert!(!db.exists());
    }

    #[test]
    fn an_edit_of_the_pending_database_after_signing_is_caught() {
        let Node { dir, policy, key, public, .. } = node();
        let db = dir.path().join("db");
        let (_, request) = scan(&policy, &HostRoot::identity(), &db, "n", &ScanProgress::default()).unwrap();
        let signature = sign(&request, &key, None).unwrap().signature;
        // The node edits its pending database (say, to hide a file) after the request left.
        let file = pending_path(&db).join("db");
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let e = attach(&db, &public, &signature).unwrap_err();
        assert!(e.is_untrusted(), "{e}");
        assert!(!db.exists());
    }
}
