//! The file-level seal of a baseline: `kubefim.seal` in the database directory, a signed
//! listing of every other file there (BLAKE3, size, name) together with the policy text.
//! Signing the files, not only the records, makes a changed byte anywhere count, even where
//! the store would never look; carrying the policy lets verify start rescanning as soon as
//! the seal's signature checks out, while the database itself is still being checked.

use std::path::Path;

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::sign::{self, PublicKey, SigningKey};
use crate::store;

/// First line of a seal file whose database carries its own signature (signed where it was
/// made, by `create` and `accept`).
const HEADER: &[u8] = b"kubefim baseline seal v1\n";
/// First line of a seal that also carries the records' canonical digest, so that one
/// signature covers everything: a baseline scanned on a node and signed elsewhere (see
/// `request`), where a second round trip for an inner signature would be needed otherwise.
/// Such a body also carries the manifest's bytes (node, time, record count, incomplete paths),
/// so what the signer is shown is what it signs; opening the baseline checks they are the
/// manifest's.
const HEADER_V2: &[u8] = b"kubefim baseline seal v2\n";

/// A seal whose signature has been checked.
#[derive(Debug, Clone)]
pub struct Seal {
    /// The policy YAML the baseline was made with.
    pub policy: String,
    /// The canonical digest of the records, for seals that carry it (v2).
    pub records: Option<Hash>,
    /// The manifest's bytes, for v2 seals that carry them (the baseline's manifest must be
    /// exactly these).
    pub manifest: Option<Vec<u8>>,
    listing: Vec<u8>,
}

fn untrusted(shown: &Path, reason: String) -> Error {
    Error::Untrusted { path: shown.to_owned(), reason }
}

/// The signed part of a seal of the closed store directory `dir`.
fn body(dir: &Path, policy: &str, records: Option<(&Hash, &[u8])>) -> Result<Vec<u8>> {
    let mut body = if records.is_some() { HEADER_V2 } else { HEADER }.to_vec();
    body.extend_from_slice(format!("policy {}\n", policy.len()).as_bytes());
    body.extend_from_slice(policy.as_bytes());
    body.push(b'\n');
    if let Some((records, manifest)) = records {
        body.extend_from_slice(format!("records {}\n", hex::encode(records)).as_bytes());
        body.extend_from_slice(format!("manifest {}\n", manifest.len()).as_bytes());
        body.extend_from_slice(manifest);
        body.push(b'\n');
    }
    body.extend(store::file_listing(dir).map_err(|e| Error::io("list the files of", dir, e))?);
    Ok(body)
}

/// Writes the seal of the closed store directory `dir`.
pub fn write(dir: &Path, key: &SigningKey, policy: &str) -> Result<()> {
    let body = body(dir, policy, None)?;
    let signature = key.sign(&sign::seal_digest(&body));
    write_signed(dir, body, &signature)
}

/// The body of a v2 seal of `dir`, whose records have the canonical digest `records` and
/// whose manifest is `manifest` (its stored bytes): what a signer elsewhere signs (through
/// [`sign::seal_digest`]).
pub fn unsigned_body(dir: &Path, policy: &str, records: &Hash, manifest: &[u8]) -> Result<Vec<u8>> {
    body(dir, policy, Some((records, manifest)))
}

/// What a v2 seal body says, for a signer to check and show before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsignedBody {
    /// The policy YAML.
    pub policy: String,
    /// The records' canonical digest.
    pub records: Hash,
    /// The manifest's bytes; `None` in a body made by a kubefim that did not seal them.
    pub manifest: Option<Vec<u8>>,
}

/// Completes a seal body with its signature and writes it into `dir`, durably.
pub fn write_signed(dir: &Path, mut body: Vec<u8>, signature: &[u8]) -> Result<()> {
    body.extend_from_slice(format!("ed25519 {}\n", hex::encode(signature)).as_bytes());
    // Written in place, not renamed over: a directory with a partial seal does not verify,
    // which is what an interrupted signing must look like.
    let path = dir.join(store::SEAL_FILE);
    std::fs::write(&path, body)
        .and_then(|()| std::fs::File::open(&path)?.sync_all())
        .map_err(|e| Error::io("write the seal", &path, e))
}

/// What a v2 seal body names; `None` if it is not one.
pub fn parse_unsigned_body(body: &[u8]) -> Option<UnsignedBody> {
    let BodyParts { policy, records, manifest, .. } = parse_body(body)?;
    Some(UnsignedBody { policy, records: records?, manifest })
}

/// A `NAME LEN\n` line followed by LEN bytes and `\n`: the bytes and what follows.
fn framed<'a>(rest: &'a [u8], name: &str) -> Option<(&'a [u8], &'a [u8])> {
    let line_end = rest.iter().position(|&b| b == b'\n')?;
    let len: usize =
        std::str::from_utf8(&rest[..line_end]).ok()?.strip_prefix(name)?.strip_prefix(' ')?.parse().ok()?;
    let rest = &rest[line_end + 1..];
    let bytes = rest.get(..len)?;
    Some((bytes, rest.get(len..)?.strip_prefix(b"\n")?))
}

/// The parts of a seal body.
struct BodyParts<'a> {
    policy: String,
    /// The records' digest (v2).
    records: Option<Hash>,
    /// The manifest (v2, when sealed).
    manifest: Option<Vec<u8>>,
    /// The file listing.
    listing: &'a [u8],
}

/// Splits a seal body into its parts. File listing lines start with a hex hash, so a
/// `manifest` line cannot be one.
fn parse_body(body: &[u8]) -> Option<BodyParts<'_>> {
    let (v2, rest) = match body.strip_prefix(HEADER) {
        Some(rest) => (false, rest),
        None => (true, body.strip_prefix(HEADER_V2)?),
    };
    let (policy, mut rest) = framed(rest, "policy")?;
    let policy = String::from_utf8(policy.to_vec()).ok()?;
    let (mut records, mut manifest) = (None, None);
    if v2 {
        let line_end = rest.iter().position(|&b| b == b'\n')?;
        let hex_digest = std::str::from_utf8(&rest[..line_end]).ok()?.strip_prefix("records ")?;
        records = Some(hex::decode(hex_digest).ok()?.try_into().ok()?);
        rest = &rest[line_end + 1..];
        if rest.starts_with(b"manifest ") {
            let (bytes, after) = framed(rest, "manifest")?;
            manifest = Some(bytes.to_vec());
            rest = after;
        }
    }
    Some(BodyParts { policy, records, manifest, listing: rest })
}

/// The parts of a seal file.
struct Parsed<'a> {
    /// What the signature covers.
    body: &'a [u8],
    policy: String,
    records: Option<Hash>,
    manifest: Option<Vec<u8>>,
    listing: &'a [u8],
    signature: Vec<u8>,
}

/// Splits a seal file into its parts.
fn parse(file: &[u8]) -> Option<Parsed<'_>> {
    let body_end = file[..file.len().checked_sub(1)?].iter().rposition(|&b| b == b'\n')? + 1;
    let (body, last) = file.split_at(body_end);
    let signature = hex::decode(std::str::from_utf8(last).ok()?.trim_end().strip_prefix("ed25519 ")?).ok()?;
    let BodyParts { policy, records, manifest, listing } = parse_body(body)?;
    Some(Parsed { body, policy, records, manifest, listing, signature })
}

impl Seal {
    /// Reads the seal of the baseline at `db` and checks its signature with `key`.
    pub fn read_verified(db: &Path, key: &PublicKey) -> Result<Seal> {
        let file = std::fs::read(db.join(store::SEAL_FILE)).map_err(|e| {
            let reason = if !db.exists() {
                "no baseline database there (create one with `kubefim baseline create`)".to_owned()
            } else if !db.is_dir() {
                "it is a file, not a baseline database (the directory `kubefim baseline create` writes); \
                 check the --db path"
                    .to_owned()
            } else {
                format!("its seal file {} cannot be read ({e})", store::SEAL_FILE)
            };
            untrusted(db, reason)
        })?;
        let Parsed { body, policy, records, manifest, listing, signature } =
            parse(&file).ok_or_else(|| untrusted(db, "its seal file is malformed".into()))?;
        if !key.verifies(&sign::seal_digest(body), &signature) {
            return Err(untrusted(
                db,
                format!(
                    "its seal does not verify with public key {} (wrong key, or the database was modified)",
                    key.fingerprint()
                ),
            ));
        }
        Ok(Seal { policy, records, manifest, listing: listing.to_vec() })
    }

    /// Checks that `dir` (a copy of the baseline `shown`) holds exactly the sealed files,
    /// byte for byte.
    pub fn check_files(&self, dir: &Path, shown: &Path) -> Result<()> {
        let listing = store::file_listing(dir).map_err(|e| untrusted(shown, format!("cannot be read: {e}")))?;
        if listing == self.listing {
            return Ok(());
        }
        let now: std::collections::BTreeSet<&[u8]> = listing.split(|&b| b == b'\n').collect();
        let then: std::collections::BTreeSet<&[u8]> = self.listing.split(|&b| b == b'\n').collect();
        let culprit = now
            .symmetric_difference(&then)
            .filter_map(|l| l.splitn(3, |&b| b == b' ').nth(2))
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .next()
            .unwrap_or_default();
        Err(untrusted(
            shown,
            format!("it does not match its seal: file {culprit:?} was modified, added or removed after it was signed"),
        ))
    }
}

/// Re-signs the seal of the baseline at `db` as it is now, keeping its policy, without
/// looking at anything else. Only for tests of the signature inside the database: it lets
/// an edit made behind kubefim's back pass the seal, so only the inner signature can catch it.
#[doc(hidden)]
pub fn reseal_for_tests(db: &Path, key: &SigningKey) -> Result<()> {
    let file = std::fs::read(db.join(store::SEAL_FILE)).map_err(|e| Error::io("read the seal of", db, e))?;
    let parsed = parse(&file).ok_or_else(|| untrusted(db, "its seal file is malformed".into()))?;
    write(db, key, &parsed.policy)
}
