//! Keys and signatures: Ed25519 (ring) key files, the canonical digest of a baseline and its
//! signature. The digest is a domain-separated BLAKE3 (derive-key mode) over every entry of
//! every tree in canonical order, each framed with its length, so an edited, inserted or
//! deleted entry anywhere, in any tree, changes it. Verification always uses a public key
//! the caller supplies, never one found in the database.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::store::TreeKind;

/// BLAKE3 derive-key context of the canonical digest. Never reuse it for anything else.
const DIGEST_CONTEXT: &str = "kubefim.io 2026-11 baseline canonical digest v1";

/// BLAKE3 derive-key context of the file-level seal's digest.
const SEAL_CONTEXT: &str = "kubefim.io 2026-11 baseline file seal v1";

/// Prefix of the signed message, so a baseline signature can never be mistaken for (or made
/// from) a signature over anything else made with the same key.
const SIGNED_PREFIX: &[u8] = b"kubefim.io baseline signature v1\0";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// File names written by [`generate`].
pub const PRIVATE_KEY_FILE: &str = "kubefim.key";
/// File names written by [`generate`].
pub const PUBLIC_KEY_FILE: &str = "kubefim.pub";

fn key_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Key { path: path.to_owned(), message: message.into() }
}

/// The private signing key. Only `baseline create` and `baseline accept` need it.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Loads a PKCS#8 Ed25519 key, PEM or DER (v1 as written by OpenSSL, or v2).
    /// Refuses a key file that its group or others may read or write (as ssh does): a key
    /// someone else could have read cannot be trusted to sign baselines.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let cannot_read = |e: std::io::Error| {
            key_err(
                path,
                format!("cannot read the private key ({e}); pass the kubefim.key that `kubefim keygen` wrote"),
            )
        };
        let mut file = std::fs::File::open(path).map_err(cannot_read)?;
        let mode = file.metadata().map_err(cannot_read)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(key_err(
                path,
                format!(
                    "the private key is accessible by group or others (mode {mode:04o}); anyone who read it can \
                     sign baselines: run `chmod 600 {}` (and make a new key pair if others could have read it)",
                    path.display()
                ),
            ));
        }
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(cannot_read)?;
        let der = unarmor(&raw, "PRIVATE KEY").map_err(|m| key_err(path, m))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| {
            key_err(path, format!("not a PKCS#8 Ed25519 private key ({e}); make one with `kubefim keygen`"))
        })?;
        Ok(SigningKey { pair })
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey { bytes }
    }

    /// Signs a baseline digest.
    pub fn sign(&self, digest: &Hash) -> [u8; 64] {
        let mut sig = [0; 64];
        sig.copy_from_slice(self.pair.sign(&signed_message(digest)).as_ref());
        sig
    }
}

/// A public verification key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    bytes: [u8; 32],
}

impl PublicKey {
    /// Loads a public key: PEM or DER SubjectPublicKeyInfo (as `kubefim keygen` and
    /// `openssl pkey -pubout` write), 32 raw bytes, or 64 hex digits.
    pub fn load(path: &Path) -> Result<PublicKey> {
        let raw = std::fs::read(path).map_err(|e| {
            key_err(path, format!("cannot read the public key ({e}); pass the kubefim.pub that `kubefim keygen` wrote"))
        })?;
        let bytes = parse_public(&raw).ok_or_else(|| {
            key_err(path, "not an Ed25519 public key (expected the kubefim.pub written by `kubefim keygen`)")
        })?;
        Ok(PublicKey { bytes })
    }

    /// Whether `signature` is this key's signature of `digest`.
    pub fn verifies(&self, digest: &Hash, signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes).verify(&signed_message(digest), signature).is_ok()
    }

    /// A short fingerprint for display: the first 16 hex digits of BLAKE3(key).
    pub fn fingerprint(&self) -> String {
        hex::encode(&blake3::hash(&self.bytes).as_bytes()[..8])
    }

    /// PEM SubjectPublicKeyInfo.
    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.bytes);
        pem::encode(&pem::Pem::new("PUBLIC KEY", der))
    }
}

fn parse_public(raw: &[u8]) -> Option<[u8; 32]> {
    let from_spki = |der: &[u8]| der.strip_prefix(&SPKI_PREFIX[..]).and_then(|k| k.try_into().ok());
    if raw.starts_with(b"-----BEGIN") {
        return unarmor(raw, "PUBLIC KEY").ok().and_then(|der| from_spki(&der));
    }
    if let Some(k) = from_spki(raw) {
        return Some(k);
    }
    if raw.len() == 32 {
        return raw.try_into().ok();
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    hex::decode(text).ok()?.try_into().ok()
}

/// PEM to DER when the input is PEM with the expected tag; DER passes through.
fn unarmor(raw: &[u8], tag: &str) -> std::result::Result<Vec<u8>, String> {
    if !raw.starts_with(b"-----BEGIN") {
        return Ok(raw.to_vec());
    }
    let p = pem::parse(raw).map_err(|e| format!("bad PEM: {e}"))?;
    if p.tag() != tag {
        return Err(format!("PEM holds a {:?}, expected a {tag:?}", p.tag()));
    }
    Ok(p.into_contents())
}

/// Writes a new key pair into `dir` (`kubefim.key`, mode 0600, and `kubefim.pub`) and
/// returns their paths. Never overwrites anything: both files are created new (`O_EXCL`, which
/// also refuses a symbolic link at either name, dangling or not), and when either exists
/// neither is written.
pub fn generate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create the key directory", dir, e))?;
    let (key_path, pub_path) = (dir.join(PRIVATE_KEY_FILE), dir.join(PUBLIC_KEY_FILE));
    let create = |path: &Path, mode: u32| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                key_err(
                    path,
                    format!(
                        "cannot create ({e}); an existing key (or anything else at that name) is never \
                         overwritten: move it away, or pass another --out"
                    ),
                )
            })
    };
    let mut key_file = create(&key_path, 0o600)?;
    let mut pub_file = match create(&pub_path, 0o644) {
        Ok(f) => f,
        Err(e) => {
            // Ours, created a moment ago and still empty: a key without its public half is
            // of no use, and would stop the next keygen here.
            let _ = std::fs::remove_file(&key_path);
            return Err(e);
        }
    };
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| key_err(&key_path, "the system random generator failed"))?;
    let key = SigningKey::load_der(pkcs8.as_ref()).ok_or_else(|| key_err(&key_path, "generated key is invalid"))?;
    let private_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    key_file
        .write_all(private_pem.as_bytes())
        .and_then(|()| key_file.sync_all())
        .map_err(|e| Error::io("write the private key", &key_path, e))?;
    pub_file
        .write_all(key.public_key().to_pem().as_bytes())
        .and_then(|()| pub_file.sync_all())
        .map_err(|e| Error::io("write the public key", &pub_path, e))?;
    Ok((key_path, pub_path))
}

impl SigningKey {
    fn load_der(der: &[u8]) -> Option<SigningKey> {
        Ed25519KeyPair::from_pkcs8(der).ok().map(|pair| SigningKey { pair })
    }
}

/// The digest of a file-level seal body (a different derive-key context from the canonical
/// digest, so neither can stand for the other).
pub fn seal_digest(body: &[u8]) -> Hash {
    blake3::derive_key(SEAL_CONTEXT, body)
}

fn signed_message(digest: &Hash) -> Vec<u8> {
    [SIGNED_PREFIX, &digest[..]].concat()
}

/// The canonical digest of a baseline, fed entry by entry in canonical order.
pub struct CanonicalDigest {
    hasher: blake3::Hasher,
    current: Option<(TreeKind, u64)>,
}

impl Default for CanonicalDigest {
    fn default() -> Self {
        CanonicalDigest { hasher: blake3::Hasher::new_derive_key(DIGEST_CONTEXT), current: None }
    }
}

impl CanonicalDigest {
    /// A digest of nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn end_tree(&mut self) {
        if let Some((_, count)) = self.current.take() {
            self.hasher.update(b"E");
            self.hasher.update(&count.to_be_bytes());
        }
    }

    fn frame(&mut self, bytes: &[u8]) {
        self.hasher.update(&(bytes.len() as u64).to_be_bytes());
        self.hasher.update(bytes);
    }

    /// Feeds one entry; entries must come tree by tree in [`TreeKind::ALL`] order with keys
    /// ascending (as the store iterates). The signature entry must not be fed.
    pub fn entry(&mut self, tree: TreeKind, key: &[u8], value: &[u8]) {
        if self.current.map(|(t, _)| t) != Some(tree) {
            self.end_tree();
            self.hasher.update(b"T");
            self.frame(tree.name().as_bytes());
            self.current = Some((tree, 0));
        }
        self.hasher.update(b"K");
        self.frame(key);
        self.frame(value);
        if let Some((_, count)) = self.current.as_mut() {
            *count += 1;
        }
    }

    /// The digest.
    pub fn finish(mut self) -> Hash {
        self.end_tree();
        *self.hasher.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_signatures_bind_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let (k, p) = generate(dir.path()).unwrap();
        assert!(generate(dir.path()).is_err(), "an existing key is never overwritten");
        let key = SigningKey::load(&k).unwrap();
        let public = PublicKey::load(&p).unwrap();
        assert_eq!(key.public_key(), public);
        let d = [7u8; 32];
        let sig = key.sign(&d);
        assert!(public.verifies(&d, &sig));
        assert!(!public.verifies(&[8u8; 32], &sig));
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!public.verifies(&d, &bad));
        let other = tempfile::tempdir().unwrap();
        let (_, p2) = generate(other.path()).unwrap();
        assert!(!PublicKey::load(&p2).unwrap().verifies(&d, &sig));
    }

    #[test]
    fn digest_depends_on_every_framing_detail() {
        let digest = |entries: &[(TreeKind, &[u8], &[u8])]| {
            let mut c = CanonicalDigest::new();
            entries.iter().for_each(|(t, k, v)| c.entry(*t, k, v));
            c.finish()
        };
        let base = digest(&[(TreeKind::Meta, b"a", b"1"), (TreeKind::Records, b"b", b"2")]);
        assert_ne!(base, digest(&[(TreeKind::Meta, b"a", b"1"), (TreeKind::Records, b"b", b"3")]));
        assert_ne!(base, digest(&[(TreeKind::Meta, b"a", b"1"), (TreeKind::Content, b"b", b"2")]));
        assert_ne!(base, digest(&[(TreeKind::Meta, b"a", b"1"), (TreeKind::Records, b"b2", b"")]));
        assert_ne!(base, digest(&[(TreeKind::Meta, b"a", b"1")]));
    }
}
