//! Making, opening and amending signed baselines: `create` (scan -> store -> digest -> sign ->
//! install), [`TrustedBaseline::open`] (check the signature with the caller's public key
//! before any record is believed) and `accept` (take the current state of some paths, keep
//! the rest, sign anew).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, mpsc};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::lock::lock_path;
use crate::policy::{Policy, path_bytes, path_from_bytes};
use crate::record::{CHUNK_RECORDS, FileRecord, PathRecord, RecordLoc, decode_chunk, encode_chunk};
use crate::root::HostRoot;
use crate::scan::{Scan, ScanProgress, ScanSink, ScanSummary, ScannedEntry};
use crate::seal::{self, Seal};
use crate::sign::{CanonicalDigest, PublicKey, SigningKey};
use crate::store::{self, SIGNATURE_KEY, Store, TreeKind};

/// The layout version of a baseline. 2: records are stored in path order (`Path`'s `Ord`,
/// the scan's order), so verify merges them with a rescan instead of holding them. 1: in
/// the order a scan's threads finished them; still trusted and watched, but not verified
/// ([`Error::OldFormat`]).
pub const FORMAT_VERSION: u32 = 2;

/// The first format whose records are in path order.
const SORTED_SINCE: u32 = 2;

/// The meta-tree key of the manifest.
pub(crate) const MANIFEST_KEY: &[u8] = b"manifest";

/// How many scanned entries may wait for the store writer.
const WRITE_QUEUE: usize = 4096;

/// What a baseline says about itself (signed with everything else).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The policy YAML the baseline was made with; verify rescans with exactly this.
    pub policy: String,
    /// When it was signed, nanoseconds since the epoch.
    pub created_unix_ns: u128,
    /// The host it was made on.
    pub host: String,
    /// The kubefim version that made it.
    pub tool_version: String,
    /// Number of records.
    pub records: u64,
    /// Paths that could not be fully recorded, with why.
    pub incomplete: Vec<(String, String)>,
    /// The paths taken over by the `accept` that made this baseline (empty for `create`).
    pub accepted: Vec<String>,
}

/// Scanned entries on their way into a new store: records, in order, to one writer; text
/// content straight into the store from the thread that read it.
struct ChannelSink<'a> {
    tx: mpsc::SyncSender<ScannedEntry>,
    store: &'a Store,
    /// The first content that could not be stored.
    failed: Mutex<Option<Error>>,
}

impl ScanSink for ChannelSink<'_> {
    fn entry(&self, entry: ScannedEntry) {
        // The writer only hangs up after an error, which it reports; nothing to do here.
        let _ = self.tx.send(entry);
    }

    fn content(&self, hash: &Hash, text: &[u8]) {
        if let Err(e) = self.store.put_content(hash, text) {
            self.failed.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
        }
    }
}

/// Writes records into the store in chunks of [`CHUNK_RECORDS`], under increasing keys, and
/// checks they come in path order (what [`FORMAT_VERSION`] 2 promises readers).
pub(crate) struct ChunkWriter<'a> {
    store: &'a Store,
    next: u64,
    pending: Vec<PathRecord>,
    /// The path of the last record written.
    last: Option<Vec<u8>>,
}

impl<'a> ChunkWriter<'a> {
    pub(crate) fn new(store: &'a Store) -> Self {
        ChunkWriter { store, next: 0, pending: Vec::with_capacity(CHUNK_RECORDS), last: None }
    }

    fn push(&mut self, path: Vec<u8>, record: FileRecord) -> Result<()> {
        let last = self.pending.last().map(|(p, _)| p).or(self.last.as_ref());
        if let Some(last) = last
            && path_from_bytes(last) >= path_from_bytes(&path)
        {
            return Err(Error::Store {
                path: self.store.path().to_owned(),
                message: format!(
                    "records out of path order ({} after {}): a bug in kubefim; nothing was installed",
                    path_from_bytes(&path).display(),
                    path_from_bytes(last).display()
                ),
            });
        }
        self.pending.push((path, record));
        if self.pending.len() == CHUNK_RECORDS { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.store.put(TreeKind::Records, &self.next.to_be_bytes(), &encode_chunk(&self.pending))?;
        self.next += 1;
        self.last = self.pending.pop().map(|(p, _)| p);
        self.pending.clear();
        Ok(())
    }
}

/// Scans `scan` into the store, pipelined: the scan's threads hash while this thread writes.
/// `kept` (records kept from an earlier baseline, in path order, none of them under the
/// scan's roots) are merged in, so the store gets one sequence in path order.
pub(crate) fn scan_into(
    writer: &mut ChunkWriter<'_>,
    scan: &Scan<'_>,
    progress: &ScanProgress,
    kept: impl Iterator<Item = Result<PathRecord>>,
) -> Result<ScanSummary> {
    let store = writer.store;
    let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
    let mut kept = kept.peekable();
    let (written, summary, failed) = std::thread::scope(|s| {
        let scanner = s.spawn(move || {
            let sink = ChannelSink { tx, store, failed: Mutex::new(None) };
            let summary = scan.run(&sink, progress);
            (summary, sink.failed.into_inner().unwrap_or_else(PoisonError::into_inner))
        });
        let mut written = Ok(());
        for entry in rx {
            if written.is_ok() {
                written = write_merged(writer, &mut kept, entry);
            }
        }
        let (summary, failed) = scanner.join().expect("the scan does not panic");
        (written, summary, failed)
    });
    written?;
    if let Some(e) = failed {
        return Err(e);
    }
    for rest in kept {
        let (path, record) = rest?;
        writer.push(path, record)?;
    }
    writer.flush()?;
    Ok(summary)
}

/// Writes `entry` after the kept records that come before it.
fn write_merged(
    writer: &mut ChunkWriter<'_>,
    kept: &mut std::iter::Peekable<impl Iterator<Item = Result<PathRecord>>>,
    entry: ScannedEntry,
) -> Result<()> {
    while let Some(before) =
        kept.next_if(|k| k.as_ref().is_ok_and(|(p, _)| path_from_bytes(p) < entry.path.as_path()) || k.is_err())
    {
        let (path, record) = before?;
        writer.push(path, record)?;
    }
    writer.push(path_bytes(&entry.path).to_vec(), entry.record)
}

fn host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The canonical digest of everything in `store`, once it is on disk.
pub(crate) fn canonical_digest(store: &Store) -> Result<Hash> {
    store.flush()?;
    let mut digest = CanonicalDigest::new();
    store.for_each_entry(|tree, k, v| {
        digest.entry(tree, k, v);
        Ok(())
    })?;
    Ok(digest.finish())
}

/// Writes the manifest, signs everything and moves the store into place at `target`.
fn seal(store: Store, target: &Path, key: &SigningKey, manifest: &Manifest) -> Result<()> {
    let json = serde_json::to_vec(manifest).expect("a manifest serialises");
    store.put(TreeKind::Meta, MANIFEST_KEY, &json)?;
    store.put(TreeKind::Meta, SIGNATURE_KEY, &key.sign(&canonical_digest(&store)?))?;
    let dir = store.close()?;
    let sealed = seal::write(&dir, key, &manifest.policy).and_then(|()| store::install(&dir, target));
    if sealed.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    sealed
}

pub(crate) fn manifest(policy: &Policy, records: u64, summary: &ScanSummary, accepted: Vec<String>) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        policy: policy.source().to_owned(),
        created_unix_ns: now_ns(),
        host: host_name(),
        tool_version: env!("CARGO_PKG_VERSION").to_owned(),
        records,
        incomplete: summary.incomplete().map(|w| (w.path.display().to_string(), w.message.clone())).collect(),
        accepted,
    }
}

/// Writes a new baseline beside `db` with `fill`, then signs, seals and installs it; a
/// failure discards the new one and leaves any previous baseline as it was.
fn write_baseline(
    db: &Path,
    key: &SigningKey,
    fill: impl FnOnce(&Store) -> Result<(Manifest, ScanSummary)>,
) -> Result<ScanSummary> {
    let store = Store::create_beside(db)?;
    match fill(&store) {
        Ok((manifest, summary)) => {
            seal(store, db, key, &manifest)?;
            Ok(summary)
        }
        Err(e) => {
            store.discard();
            Err(e)
        }
    }
}

/// Scans everything `policy` names (read under `host`) and writes a signed baseline at `db`,
/// replacing any previous one only once the new one is complete.
pub fn create(
    policy: &Policy,
    host: &HostRoot,
    db: &Path,
    key: &SigningKey,
    progress: &ScanProgress,
) -> Result<ScanSummary> {
    write_baseline(db, key, |store| {
        let scan = Scan::whole_policy(policy).under(host).skip(db).skip(&lock_path(db)).skip(store.path());
        let summary = scan_into(&mut ChunkWriter::new(store), &scan, progress, std::iter::empty())?;
        Ok((manifest(policy, summary.entries, &summary, Vec::new()), summary))
    })
}

/// A baseline whose signature has been checked with the caller's public key. Its records
/// stay in the store: the pass that checked the signature also took the BLAKE3 of every
/// record chunk, and every later read of a chunk is checked against it, so what is read is
/// what was signed, however long the reader runs (the watcher runs for months) and however
/// many records there are.
pub struct TrustedBaseline {
    store: Store,
    /// The manifest.
    pub manifest: Manifest,
    /// The policy the baseline was made with.
    pub policy: Policy,
    /// The key and BLAKE3 of every record chunk, in stored order.
    chunks: Vec<(Box<[u8]>, blake3::Hash)>,
    /// The chunks read last, decoded (most recent first): readers look up records of the
    /// same directories in bursts.
    cache: Mutex<Vec<(usize, Arc<Vec<PathRecord>>)>>,
    /// Each non-empty chunk's first path, once a pass in path order has read them all: with
    /// records in path order, what [`TrustedBaseline::find`] searches (one path a chunk,
    /// about 1,000 for a million records).
    firsts: OnceLock<Vec<(usize, Box<[u8]>)>>,
}

/// How many decoded chunks [`TrustedBaseline`] keeps (a chunk of small files is ~300 KB).
const CHUNK_CACHE: usize = 8;

impl TrustedBaseline {
    /// Opens `db` and checks its seal and signature with `key`. Any failure is
    /// [`Error::Untrusted`].
    pub fn open(db: &Path, key: &PublicKey) -> Result<TrustedBaseline> {
        Self::open_sealed(db, key, &Seal::read_verified(db, key)?)
    }

    /// Like [`TrustedBaseline::open`], for a seal already read and verified.
    pub fn open_sealed(db: &Path, key: &PublicKey, seal: &Seal) -> Result<TrustedBaseline> {
        let untrusted = |reason: String| Error::Untrusted { path: db.to_owned(), reason };
        let store = Store::open_snapshot(db, |copy| seal.check_files(copy, db))?;
        let mut digest = CanonicalDigest::new();
        let (mut signature, mut manifest_bytes) = (None, None);
        let mut chunks = Vec::new();
        let mut records_without_flags = false;
        store.for_each_entry(|tree, k, v| {
            if tree == TreeKind::Meta && k == SIGNATURE_KEY {
                signature = Some(v.to_vec());
                return Ok(());
            }
            digest.entry(tree, k, v);
            match tree {
                TreeKind::Meta if k == MANIFEST_KEY => manifest_bytes = Some(v.to_vec()),
                TreeKind::Records => {
                    records_without_flags |= v.first() == Some(&crate::record::CHUNK_FORMAT_1);
                    chunks.push((k.into(), blake3::hash(v)));
                }
                _ => {}
            }
            Ok(())
        })?;
        let digest = digest.finish();
        match &seal.records {
            // Signed elsewhere: the seal's one signature covers this digest.
            Some(sealed) if *sealed != digest => {
                return Err(untrusted(
                    "its records do not match the digest its seal was signed for (the database was modified)".into(),
                ));
            }
            Some(_) => {}
            None => {
                let signature = signature
                    .ok_or_else(|| untrusted("it has no signature (an interrupted or tampered baseline)".into()))?;
                if !key.verifies(&digest, &signature) {
                    return Err(untrusted(format!(
                        "its signature does not verify with public key {} (wrong key, or the database was modified)",
                        key.fingerprint()
                    )));
                }
            }
        }
        if let Some(sealed) = &seal.manifest
            && manifest_bytes.as_ref() != Some(sealed)
        {
            // The signer was shown the sealed manifest (node, time, counts, incomplete paths).
            return Err(untrusted(
                "its manifest is not the one its seal was signed for (the database was modified)".into(),
            ));
        }
        let manifest: Manifest = manifest_bytes
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| untrusted("its manifest is missing or unreadable".into()))?;
        if !(1..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(untrusted(format!(
                "format version {} is not one this kubefim reads (1 to {FORMAT_VERSION})",
                manifest.format_version
            )));
        }
        let mut policy = Policy::from_yaml(&manifest.policy, "the baseline's policy")
            .map_err(|e| untrusted(crate::error::chain(&e)))?;
        if records_without_flags {
            // Recorded before inode flags were (chunk format 1): under it they are neither
            // recorded nor compared, or every entry would differ from its baseline record and
            // every rescan rehash everything. A new baseline (create, or accept) starts them.
            for rule in &mut policy.rules {
                rule.attributes = rule.attributes.without(crate::policy::Attribute::Flags);
            }
        }
        Ok(TrustedBaseline { store, manifest, policy, chunks, cache: Mutex::new(Vec::new()), firsts: OnceLock::new() })
    }

    /// How many records the baseline has (its signed manifest says).
    pub fn len(&self) -> u64 {
        self.manifest.records
    }

    /// Whether the baseline has no records.
    pub fn is_empty(&self) -> bool {
        self.manifest.records == 0
    }

    /// How many record chunks the baseline has.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Record chunk `i` (in stored order), read from the store and checked against the
    /// BLAKE3 taken when the signature was checked.
    pub fn chunk(&self, i: usize) -> Result<Arc<Vec<PathRecord>>> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(at) = cache.iter().position(|(n, _)| *n == i) {
            let hit = cache.remove(at);
            let chunk = hit.1.clone();
            cache.insert(0, hit);
            return Ok(chunk);
        }
        drop(cache);
        if i >= self.chunks.len() {
            return Err(Error::Untrusted {
                path: self.path().to_owned(),
                reason: format!("record chunk {i} does not exist"),
            });
        }
        let entries = Arc::new(self.read_chunk(i)?);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.insert(0, (i, entries.clone()));
        cache.truncate(CHUNK_CACHE);
        Ok(entries)
    }

    /// The record at `loc` (see [`TrustedBaseline::for_each_record`]).
    pub fn record(&self, loc: RecordLoc) -> Result<PathRecord> {
        let chunk = self.chunk(loc.chunk())?;
        chunk.get(loc.index()).cloned().ok_or_else(|| Error::Untrusted {
            path: self.path().to_owned(),
            reason: format!("record chunk {} has no record {}", loc.chunk(), loc.index()),
        })
    }

    /// Calls `f` with every record and its location, in stored order, one chunk in memory
    /// at a time.
    pub fn for_each_record(&self, mut f: impl FnMut(RecordLoc, &[u8], &FileRecord) -> Result<()>) -> Result<()> {
        for i in 0..self.chunks.len() {
            // Read around the cache: a whole pass would only evict what readers use.
            let chunk = self.read_chunk(i)?;
            for (n, (path, record)) in chunk.iter().enumerate() {
                let loc = RecordLoc::new(i, n).ok_or_else(|| Error::Untrusted {
                    path: self.path().to_owned(),
                    reason: format!("record chunk {i} holds more than {CHUNK_RECORDS} records"),
                })?;
                f(loc, path, record)?;
            }
        }
        Ok(())
    }

    fn read_chunk(&self, i: usize) -> Result<Vec<PathRecord>> {
        let untrusted = |reason: String| Error::Untrusted { path: self.path().to_owned(), reason };
        let (key, hash) = &self.chunks[i];
        let bytes = self
            .store
            .get(TreeKind::Records, key)?
            .filter(|b| blake3::hash(b) == *hash)
            .ok_or_else(|| untrusted(format!("record chunk {i} changed after its signature was checked")))?;
        decode_chunk(&bytes).ok_or_else(|| untrusted(format!("record chunk {i} has an unknown format")))
    }

    /// Every record in path order (`Path`'s `Ord`), one chunk in memory at a time, each
    /// checked to come after the one before it. A baseline of format 1 has them in another
    /// order: [`Error::OldFormat`], saying that `what` (for example "verified") cannot be done.
    pub fn records_in_order(&self, what: &'static str) -> Result<InOrder<'_>> {
        if self.manifest.format_version < SORTED_SINCE {
            return Err(Error::OldFormat { path: self.path().to_owned(), version: self.manifest.format_version, what });
        }
        Ok(InOrder { baseline: self, next_chunk: 0, chunk: Vec::new().into_iter(), last: None, firsts: Vec::new() })
    }

    /// The record of `path`, found by binary search in the chunk whose first path is the
    /// last one not after it (records are in path order). The first call reads every chunk
    /// once, unless a whole [`TrustedBaseline::records_in_order`] pass did already.
    pub fn find(&self, path: &Path) -> Result<Option<FileRecord>> {
        if self.firsts.get().is_none() {
            for record in self.records_in_order("searched by path")? {
                record?;
            }
        }
        let firsts = self.firsts.get().expect("set by a whole pass");
        let at = firsts.partition_point(|(_, first)| path_from_bytes(first) <= path);
        let Some((chunk, _)) = at.checked_sub(1).map(|i| &firsts[i]) else { return Ok(None) };
        let chunk = self.chunk(*chunk)?;
        Ok(chunk.binary_search_by(|(p, _)| path_from_bytes(p).cmp(path)).ok().map(|i| chunk[i].1.clone()))
    }

    /// Calls `f` with every record in path order (`Path`'s `Ord`): for `show`. A baseline of
    /// format 2 streams them a chunk at a time; one of format 1 (stored in another order) is
    /// sorted in memory first, as it always was.
    pub fn for_each_in_path_order(&self, mut f: impl FnMut(&[u8], &FileRecord) -> Result<()>) -> Result<()> {
        if self.manifest.format_version >= SORTED_SINCE {
            for record in self.records_in_order("listed")? {
                let (path, record) = record?;
                f(&path, &record)?;
            }
            return Ok(());
        }
        let mut records = Vec::new();
        self.for_each_record(|_, path, record| {
            records.push((path.to_vec(), record.clone()));
            Ok(())
        })?;
        records.sort_by(|(a, _), (b, _)| path_from_bytes(a).cmp(path_from_bytes(b)));
        records.iter().try_for_each(|(path, record)| f(path, record))
    }

    /// Stored content by hash (checked against the hash).
    pub fn content(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        self.store.content(hash)
    }

    /// The database path.
    pub fn path(&self) -> &Path {
        self.store.path()
    }
}

/// [`TrustedBaseline::records_in_order`]'s iterator.
pub struct InOrder<'a> {
    baseline: &'a TrustedBaseline,
    next_chunk: usize,
    chunk: std::vec::IntoIter<PathRecord>,
    /// The path of the record returned last.
    last: Option<Vec<u8>>,
    /// The first path of every chunk read so far.
    firsts: Vec<(usize, Box<[u8]>)>,
}

impl Iterator for InOrder<'_> {
    type Item = Result<PathRecord>;

    fn next(&mut self) -> Option<Result<PathRecord>> {
        let (path, record) = loop {
            if let Some(r) = self.chunk.next() {
                break r;
            }
            let i = self.next_chunk;
            if i >= self.baseline.chunks.len() {
                if i == self.baseline.chunks.len() {
                    self.baseline.firsts.get_or_init(|| std::mem::take(&mut self.firsts));
                    self.next_chunk += 1;
                }
                return None;
            }
            self.next_chunk += 1;
            // Read around the cache: a whole pass would only evict what readers use.
            match self.baseline.read_chunk(i) {
                Ok(chunk) => {
                    if let Some((first, _)) = chunk.first() {
                        self.firsts.push((i, first.as_slice().into()));
                    }
                    self.chunk = chunk.into_iter();
                }
                Err(e) => {
                    self.next_chunk = usize::MAX;
                    return Some(Err(e));
                }
            }
        };
        if let Some(last) = &self.last
            && path_from_bytes(last) >= path_from_bytes(&path)
        {
            // Signed, so written like this: by a kubefim with a bug, or a signer's own tool.
            self.next_chunk = usize::MAX;
            self.chunk = Vec::new().into_iter();
            return Some(Err(Error::Untrusted {
                path: self.baseline.path().to_owned(),
                reason: format!(
                    "its records are out of path order ({} after {}, in record chunk {}); make a new one with `kubefim baseline create`",
                    path_from_bytes(&path).display(),
                    path_from_bytes(last).display(),
                    self.next_chunk.min(self.baseline.chunks.len()).saturating_sub(1),
                ),
            }));
        }
        self.last = Some(path.clone());
        Some(Ok((path, record)))
    }
}

/// Takes the current state of `paths` (all, if empty) into a new signed baseline that keeps
/// every other record as it was.
pub fn accept(
    host: &HostRoot,
    db: &Path,
    key: &SigningKey,
    public: &PublicKey,
    paths: &[PathBuf],
    progress: &ScanProgress,
) -> Result<ScanSummary> {
    // Held until the new baseline is installed: two accepts at once would each start from the
    // same baseline and the second to finish would drop what the first accepted.
    let _lock = crate::lock::Lock::for_rewrite(db, "accept")?;
    let trusted = TrustedBaseline::open(db, public)?;
    if paths.is_empty() {
        let policy = trusted.policy.clone();
        drop(trusted);
        return create(&policy, host, db, key, progress);
    }
    let mut roots = Vec::new();
    for p in paths {
        let abs = std::path::absolute(p).ok().and_then(|a| crate::policy::normalise_absolute(&a)).ok_or_else(|| {
            Error::Store {
                path: db.to_owned(),
                message: format!("cannot accept {}: give the path without `..`", p.display()),
            }
        })?;
        if trusted.policy.rule_index_for(&abs).is_none() {
            return Err(Error::Store {
                path: db.to_owned(),
                message: format!("{} is not covered by the baseline's policy; nothing to accept there", abs.display()),
            });
        }
        roots.push(abs);
    }
    let records = trusted.records_in_order("accepted path by path")?;
    write_baseline(db, key, |store| {
        let under_accepted = |k: &[u8]| roots.iter().any(|r| path_from_bytes(k).starts_with(r));
        let mut kept = 0u64;
        let kept_records = records.filter(|r| !r.as_ref().is_ok_and(|(k, _)| under_accepted(k))).map(|r| {
            let (k, record) = r?;
            if let (true, Some(hash)) = (record.content_stored, record.hash())
                && let Some(content) = trusted.content(hash)?
            {
                store.put_content(hash, &content)?;
            }
            kept += 1;
            Ok((k, record))
        });
        let scan =
            Scan::paths(&trusted.policy, roots.clone()).under(host).skip(db).skip(&lock_path(db)).skip(store.path());
        let summary = scan_into(&mut ChunkWriter::new(store), &scan, progress, kept_records)?;
        let accepted = roots.iter().map(|r| r.display().to_string()).collect();
        Ok((manifest(&trusted.policy, kept + summary.entries, &summary, accepted), summary))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A baseline of a small tree, with its keys.
    fn fixture() -> (tempfile::TempDir, PathBuf, SigningKey, PublicKey) {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("a"), "alpha\n").unwrap();
        std::fs::write(tree.join("sub/b"), "beta\n").unwrap();
        let yaml = format!(
            "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: t}}\nspec:\n  rules:\n    - path: {}\n      diff: true\n",
            tree.display()
        );
        let policy = Policy::from_yaml(&yaml, "test").unwrap();
        let (k, p) = crate::sign::generate(&dir.path().join("keys")).unwrap();
        let (key, public) = (SigningKey::load(&k).unwrap(), PublicKey::load(&p).unwrap());
        let db = dir.path().join("db");
        create(&policy, &HostRoot::identity(), &db, &key, &ScanProgress::default()).unwrap();
        (dir, db, key, public)
    }

    /// Edits the database in place, then re-seals its files with the right key: only the
    /// canonical digest inside the database can catch what happened.
    fn tamper_and_reseal(db: &Path, key: &SigningKey, edit: impl FnOnce(&Store)) {
        let store = Store::open(db).unwrap();
        edit(&store);
        store.flush().unwrap();
        drop(store);
        seal::reseal_for_tests(db, key).unwrap();
    }

    fn first_chunk(store: &Store) -> (Vec<u8>, Vec<PathRecord>) {
        let mut first = None;
        store
            .for_each_entry(|tree, k, v| {
                if tree == TreeKind::Records && first.is_none() {
                    first = Some((k.to_vec(), v.to_vec()));
                }
                Ok(())
            })
            .unwrap();
        let (k, v) = first.unwrap();
        (k, decode_chunk(&v).unwrap())
    }

    fn assert_untrusted(db: &Path, public: &PublicKey, why: &str) {
        match TrustedBaseline::open(db, public) {
            Err(e) => assert!(e.is_untrusted() && e.to_string().contains(why), "{e}"),
            Ok(_) => panic!("a tampered baseline was trusted"),
        }
    }

    #[test]
    fn resealed_edits_are_caught_by_the_canonical_digest() {
        type Edit = fn(&Store);
        let edits: [(&str, Edit); 5] = [
            ("edited record", |s| {
                let (k, mut entries) = first_chunk(s);
                entries[0].1.uid += 1;
                s.put(TreeKind::Records, &k, &encode_chunk(&entries)).unwrap();
            }),
            ("inserted record", |s| {
                let (_, entries) = first_chunk(s);
                s.put(TreeKind::Records, &u64::MAX.to_be_bytes(), &encode_chunk(&entries[..1])).unwrap();
            }),
            ("deleted record", |s| {
                let (k, mut entries) = first_chunk(s);
                entries.remove(0);
                s.put(TreeKind::Records, &k, &encode_chunk(&entries)).unwrap();
            }),
            ("edited content", |s| s.put(TreeKind::Content, &[0; 32], b"x").unwrap()),
            ("edited manifest", |s| {
                let m = s.get(TreeKind::Meta, MANIFEST_KEY).unwrap().unwrap();
                let m = String::from_utf8(m).unwrap().replace("\"host\":\"", "\"host\":\"x");
                s.put(TreeKind::Meta, MANIFEST_KEY, m.as_bytes()).unwrap();
            }),
        ];
        for (what, edit) in edits {
            let (_dir, db, key, public) = fixture();
            TrustedBaseline::open(&db, &public).unwrap_or_else(|e| panic!("fresh baseline untrusted: {e}"));
            tamper_and_reseal(&db, &key, edit);
            assert_untrusted(&db, &public, "signature does not verify");
            eprintln!("{what}: caught");
        }
        let (_dir, db, key, public) = fixture();
        tamper_and_reseal(&db, &key, |s| s.remove(TreeKind::Meta, SIGNATURE_KEY).unwrap());
        assert_untrusted(&db, &public, "no signature");
    }

    #[test]
    fn seal_catches_any_byte_and_any_key_mix_up() {
        let (dir, db, _key, public) = fixture();
        let file = db.join("db");
        let mut bytes = std::fs::read(&file).unwrap();
        // A byte far into the file, where sled keeps nothing it would read.
        let at = bytes.len() - 10;
        bytes[at] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        assert_untrusted(&db, &public, "file \"db\" was modified");
        let (_, other_pub) = crate::sign::generate(&dir.path().join("other")).unwrap();
        let (_dir2, db2, _, _) = fixture();
        assert_untrusted(&db2, &PublicKey::load(&other_pub).unwrap(), "seal does not verify");
    }

    #[test]
    fn records_are_read_by_location_and_checked_on_every_read() {
        let (_dir, db, _key, public) = fixture();
        let trusted = TrustedBaseline::open(&db, &public).unwrap();
        let mut seen = Vec::new();
        trusted
            .for_each_record(|loc, path, record| {
                seen.push((loc, path.to_vec(), record.clone()));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen.len() as u64, trusted.len());
        for (loc, path, record) in &seen {
            assert_eq!(trusted.record(*loc).unwrap(), (path.clone(), record.clone()));
        }
        // The private copy edited behind the reader's back: the next read that is not
        // served from the cache refuses it.
        let (key, _) = trusted.chunks[0].clone();
        trusted.store.put(TreeKind::Records, &key, &encode_chunk(&[])).unwrap();
        trusted.cache.lock().unwrap().clear();
        let err = trusted.record(seen[0].0).unwrap_err();
        assert!(err.is_untrusted() && err.to_string().contains("changed after its signature was checked"), "{err}");
    }

    /// Edits the database and signs it anew with the right key, as a signer's own tool with a
    /// bug would: everything verifies, only what was signed is wrong.
    fn edit_and_resign(db: &Path, key: &SigningKey, edit: impl FnOnce(&Store)) {
        tamper_and_reseal(db, key, |s| {
            edit(s);
            // The digest is of everything but the signature, as `seal` takes it.
            s.remove(TreeKind::Meta, SIGNATURE_KEY).unwrap();
            s.put(TreeKind::Meta, SIGNATURE_KEY, &key.sign(&canonical_digest(s).unwrap())).unwrap();
        });
    }

    #[test]
    fn signed_records_out_of_path_order_are_an_error_not_a_miss() {
        let (_dir, db, key, public) = fixture();
        edit_and_resign(&db, &key, |s| {
            let (k, mut entries) = first_chunk(s);
            entries.swap(0, 1);
            s.put(TreeKind::Records, &k, &encode_chunk(&entries)).unwrap();
        });
        let trusted = TrustedBaseline::open(&db, &public).expect("the signature verifies");
        let err = crate::verify::verify(&trusted, &HostRoot::identity(), &ScanProgress::default()).unwrap_err();
        assert!(err.is_untrusted() && err.to_string().contains("out of path order"), "{err}");
    }

    #[test]
    fn an_older_format_is_watched_but_not_verified_and_a_new_baseline_is_the_way_out() {
        let (dir, db, key, public) = fixture();
        edit_and_resign(&db, &key, |s| {
            let m = s.get(TreeKind::Meta, MANIFEST_KEY).unwrap().unwrap();
            let m = String::from_utf8(m).unwrap().replace("\"format_version\":2", "\"format_version\":1");
            s.put(TreeKind::Meta, MANIFEST_KEY, m.as_bytes()).unwrap();
        });
        let host = HostRoot::identity();
        let trusted = TrustedBaseline::open(&db, &public).expect("format 1 is still trusted (the watcher reads it)");
        assert_eq!(trusted.manifest.format_version, 1);
        let err = crate::verify::verify(&trusted, &host, &ScanProgress::default()).unwrap_err();
        assert!(matches!(err, Error::OldFormat { version: 1, .. }), "{err}");
        assert!(err.to_string().contains("kubefim baseline create"), "{err}");
        drop(trusted);
        let tree = dir.path().join("tree");
        let err = accept(&host, &db, &key, &public, &[tree.join("a")], &ScanProgress::default()).unwrap_err();
        assert!(matches!(err, Error::OldFormat { .. }), "{err}");
        let err = crate::verify::verify_db(&db, &public, &host, &ScanProgress::default()).err().unwrap();
        assert!(matches!(err, Error::OldFormat { .. }), "{err}");
        accept(&host, &db, &key, &public, &[], &ScanProgress::default()).unwrap();
        let (trusted, report) = crate::verify::verify_db(&db, &public, &host, &ScanProgress::default()).unwrap();
        assert_eq!(trusted.manifest.format_version, FORMAT_VERSION);
        assert!(report.is_clean(), "{:?}", report.changes);
    }

    #[test]
    fn records_are_found_by_path_in_their_chunk() {
        let (dir, db, _key, public) = fixture();
        let trusted = TrustedBaseline::open(&db, &public).unwrap();
        let tree = dir.path().join("tree");
        for p in [tree.clone(), tree.join("a"), tree.join("sub"), tree.join("sub/b")] {
            assert!(trusted.find(&p).unwrap().is_some(), "{}", p.display());
        }
        for p in [dir.path().to_owned(), tree.join("a.txt"), tree.join("sub/c"), tree.join("zz")] {
            assert!(trusted.find(&p).unwrap().is_none(), "{}", p.display());
        }
    }

    #[test]
    fn accept_takes_only_the_given_paths() {
        let (dir, db, key, public) = fixture();
        let tree = dir.path().join("tree");
        std::fs::write(tree.join("a"), "alpha 2\n").unwrap();
        std::fs::write(tree.join("sub/b"), "beta 2\n").unwrap();
        let host = HostRoot::identity();
        accept(&host, &db, &key, &public, &[tree.join("a")], &ScanProgress::default()).unwrap();
        let trusted = TrustedBaseline::open(&db, &public).unwrap();
        let report = crate::verify::verify(&trusted, &host, &ScanProgress::default()).unwrap();
        let paths: Vec<_> = report.changes.iter().map(|c| c.path.clone()).collect();
        assert_eq!(paths, vec![tree.join("sub/b")]);
        assert!(report.changes[0].diff.as_deref().unwrap().contains("+beta 2"));
    }
}
