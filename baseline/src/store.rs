//! The baseline database, and the only module that knows it is sled. A baseline is a sled
//! directory with three trees: `records` (chunks of path + `FileRecord`, see
//! [`crate::record::encode_chunk`]), `content`
//! (BLAKE3 hash -> zstd-compressed text, for `diff: true` rules, deduplicated by hash) and
//! `meta` (the manifest and the signature). A new baseline is written to a temporary
//! directory beside the target and moved into place only once it is flushed and signed, so
//! a create killed at any point leaves either no baseline or the previous one.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hash::Hash;

/// sled's page cache: small, because records are written once and read once per run.
const CACHE_BYTES: u64 = 32 << 20;
/// The page cache of a store opened for reading: its entries are read once, in order (the
/// long-running watcher keeps it open for diffs, so what it caches is what it costs).
const READ_CACHE_BYTES: u64 = 4 << 20;

/// Version byte in front of every stored content blob.
const CONTENT_FORMAT: u8 = 1;

/// zstd level for stored content: fast, and text compresses well at any level.
const ZSTD_LEVEL: i32 = 3;

/// The trees of a baseline, in the order the canonical digest visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeKind {
    /// Manifest and signature.
    Meta,
    /// Path -> record.
    Records,
    /// Content hash -> compressed content.
    Content,
}

impl TreeKind {
    /// Every tree, in digest order.
    pub const ALL: [TreeKind; 3] = [TreeKind::Meta, TreeKind::Records, TreeKind::Content];

    /// The sled tree name.
    pub fn name(self) -> &'static str {
        match self {
            TreeKind::Meta => "meta",
            TreeKind::Records => "records",
            TreeKind::Content => "content",
        }
    }
}

/// The key of the signature in the meta tree; the only entry the digest leaves out.
pub const SIGNATURE_KEY: &[u8] = b"signature";

/// An open baseline database (being written or being read).
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    /// The private copy a reader works on; removed when the store is dropped.
    _snapshot: Option<Snapshot>,
}

/// A reader's private copy of a baseline in the temporary directory, and the lock that says
/// it is in use. A process killed before it could remove its copy (SIGKILL, the OOM killer)
/// leaves the copy, as big as the database, behind; the lock is what tells the next reader
/// it may remove it ([`remove_stale_snapshots`]), whichever PID namespace either ran in.
struct Snapshot {
    dir: tempfile::TempDir,
    /// Holds the `flock` on `dir/lock`; dropped after `dir` is removed.
    _lock: std::fs::File,
}

/// The name prefix of the private copies in the temporary directory.
const SNAPSHOT_PREFIX: &str = "kubefim-baseline-";
/// A copy without a lock file is left alone this long: it is being made (the lock follows
/// its directory within microseconds), or it was left by a version that made no lock.
const UNLOCKED_SNAPSHOT_AGE: std::time::Duration = std::time::Duration::from_secs(60);

fn store_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Store { path: path.to_owned(), message: e.to_string() }
}

fn untrusted(path: &Path, reason: impl Into<String>) -> Error {
    Error::Untrusted { path: path.to_owned(), reason: reason.into() }
}

/// sled can panic on a garbled file; a panic while opening or reading is corruption.
fn guarded<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
}

impl Store {
    /// Starts a new baseline that will replace `target` when it is installed.
    pub fn create_beside(target: &Path) -> Result<Store> {
        if target.exists() && !looks_like_store(target) {
            return Err(store_err(
                target,
                "exists and is not a kubefim baseline; remove it or choose another --db path",
            ));
        }
        let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create the directory", parent, e))?;
        remove_stale_temporaries(target);
        let name = target.file_name().ok_or_else(|| store_err(target, "the --db path has no file name"))?;
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = parent.join(format!(".{}.tmp-{}-{stamp}", name.to_string_lossy(), std::process::id()));
        let db = sled::Config::new()
            .path(&tmp)
            .cache_capacity(CACHE_BYTES)
            .mode(sled::Mode::HighThroughput)
            // No background flusher: once the store is closed its files are final and can be
            // sealed.
            .flush_every_ms(None)
            .create_new(true)
            .open()
            .map_err(|e| store_err(&tmp, e))?;
        Ok(Store { db, path: tmp, _snapshot: None })
    }

    /// Opens a baseline in place. Only for tools that edit a database on purpose (the
    /// tamper tests): sled writes to what it opens, so readers use [`Store::open_snapshot`].
    pub fn open(path: &Path) -> Result<Store> {
        if !looks_like_store(path) {
            return Err(untrusted(path, NO_BASELINE));
        }
        let store = Store { db: open_sled(path, path)?, path: path.to_owned(), _snapshot: None };
        store.check_layout()?;
        Ok(store)
    }

    /// Opens a private copy of the baseline at `path` once `check` has approved the copy's
    /// files, so what is read is byte for byte what was checked, and the baseline itself is
    /// never written (it may be on a read-only mount).
    pub fn open_snapshot(path: &Path, check: impl FnOnce(&Path) -> Result<()>) -> Result<Store> {
        if !looks_like_store(path) {
            return Err(untrusted(path, NO_BASELINE));
        }
        let tmp = std::env::temp_dir();
        remove_stale_snapshots(&tmp);
        let snapshot = Snapshot::new(&tmp)?;
        let copy = snapshot.dir.path().join("db");
        copy_dir(path, &copy).map_err(|e| untrusted(path, format!("cannot be read: {e}")))?;
        check(&copy)?;
        let store = Store { db: open_sled(&copy, path)?, path: path.to_owned(), _snapshot: Some(snapshot) };
        store.check_layout()?;
        Ok(store)
    }

    fn check_layout(&self) -> Result<()> {
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name != "__sled__default" && !TreeKind::ALL.iter().any(|t| t.name() == name) {
                return Err(untrusted(&self.path, format!("unexpected tree {name:?} in the database")));
            }
        }
        if !self.db.is_empty() {
            return Err(untrusted(&self.path, "unexpected entries in the default tree"));
        }
        Ok(())
    }

    /// The baseline this store is (or will be installed as).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn tree(&self, kind: TreeKind) -> Result<sled::Tree> {
        self.db.open_tree(kind.name()).map_err(|e| store_err(&self.path, e))
    }

    /// Writes a raw entry.
    pub fn put(&self, kind: TreeKind, key: &[u8], value: &[u8]) -> Result<()> {
        self.tree(kind)?.insert(key, value).map(drop).map_err(|e| store_err(&self.path, e))
    }

    /// Removes an entry.
    pub fn remove(&self, kind: TreeKind, key: &[u8]) -> Result<()> {
        self.tree(kind)?.remove(key).map(drop).map_err(|e| store_err(&self.path, e))
    }

    /// Reads a raw entry.
    pub fn get(&self, kind: TreeKind, key: &[u8]) -> Result<Option<Vec<u8>>> {
        guarded(|| self.tree(kind)?.get(key).map_err(|e| untrusted(&self.path, format!("corrupt database: {e}"))))
            .map_err(|_| untrusted(&self.path, "corrupt database: the store failed to read it"))?
            .map(|v| v.map(|v| v.to_vec()))
    }

    /// Stores text content under its hash, once.
    pub fn put_content(&self, hash: &Hash, content: &[u8]) -> Result<()> {
        let tree = self.tree(TreeKind::Content)?;
        if tree.contains_key(hash).map_err(|e| store_err(&self.path, e))? {
            return Ok(());
        }
        let mut blob = vec![CONTENT_FORMAT];
        blob.extend(zstd::bulk::compress(content, ZSTD_LEVEL).map_err(|e| store_err(&self.path, e))?);
        tree.insert(hash, blob).map(drop).map_err(|e| store_err(&self.path, e))
    }

    /// Reads stored content and checks it against its hash.
    pub fn content(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let Some(blob) = self.get(TreeKind::Content, hash)? else { return Ok(None) };
        let bad = || untrusted(&self.path, format!("stored content {} is corrupt", hex::encode(hash)));
        let Some((&CONTENT_FORMAT, packed)) = blob.split_first() else { return Err(bad()) };
        let limit = usize::try_from(crate::policy::MAX_DIFF_CONTENT).expect("1 MiB fits") + 1;
        let content = zstd::bulk::decompress(packed, limit).map_err(|_| bad())?;
        if blake3::hash(&content).as_bytes() != hash {
            return Err(bad());
        }
        Ok(Some(content))
    }

    /// Visits every entry of every tree in canonical order (trees in [`TreeKind::ALL`]
    /// order, keys in byte order). Errors and panics of the store are corruption.
    pub fn for_each_entry(&self, mut f: impl FnMut(TreeKind, &[u8], &[u8]) -> Result<()>) -> Result<()> {
        let corrupt = |e: String| untrusted(&self.path, format!("corrupt database: {e}"));
        guarded(|| {
            for kind in TreeKind::ALL {
                for item in self.tree(kind)?.iter() {
                    let (k, v) = item.map_err(|e| corrupt(e.to_string()))?;
                    f(kind, &k, &v)?;
                }
            }
            Ok(())
        })
        .map_err(|_| corrupt("the store failed while reading it".into()))?
    }

    /// Flushes everything to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(drop).map_err(|e| store_err(&self.path, e))
    }

    /// Flushes and closes a store being written; returns its directory, whose files are
    /// final from now on (ready for [`file_listing`] and [`install`]).
    pub fn close(self) -> Result<PathBuf> {
        self.flush()?;
        Ok(self.path.clone())
    }

    /// Abandons a baseline being written.
    pub fn discard(self) {
        let path = self.path.clone();
        drop(self.db);
        let _ = std::fs::remove_dir_all(path);
    }
}

const NO_BASELINE: &str = "no baseline database there (create one with `kubefim baseline create`)";

fn open_sled(dir: &Path, shown: &Path) -> Result<sled::Db> {
    match guarded(|| sled::Config::new().path(dir).cache_capacity(READ_CACHE_BYTES).flush_every_ms(None).open()) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(untrusted(shown, format!("corrupt database: {e}"))),
        Err(_) => Err(untrusted(shown, "corrupt database: the store failed to open it")),
    }
}

/// The name of the file-level seal inside a baseline directory (written by the caller).
pub const SEAL_FILE: &str = "kubefim.seal";

/// The name of the unsigned seal body inside a baseline waiting to be signed elsewhere.
pub const REQUEST_FILE: &str = "kubefim.request";

/// A canonical listing of the files of a closed baseline directory, except the seal (and the
/// request of one waiting for its signature): one
/// line per file, `<blake3 hex> <size> <relative path>`, sorted by path. Signing it makes
/// every byte of every file count, including bytes the store itself would ignore.
pub fn file_listing(dir: &Path) -> std::io::Result<Vec<u8>> {
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let rel = rel.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                walk(&entry.path(), &rel, out)?;
            } else if rel != Path::new(SEAL_FILE) && rel != Path::new(REQUEST_FILE) {
                out.push((rel, entry.path()));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, Path::new(""), &mut files)?;
    files.sort();
    let mut listing = Vec::new();
    for (rel, full) in files {
        let mut hasher = blake3::Hasher::new();
        hasher.update_reader(std::fs::File::open(&full)?)?;
        let len = std::fs::metadata(&full)?.len();
        listing.extend_from_slice(format!("{} {len} ", hasher.finalize().to_hex()).as_bytes());
        listing.extend_from_slice(crate::policy::path_bytes(&rel));
        listing.push(b'\n');
    }
    Ok(listing)
}

/// Moves a closed, sealed new baseline directory into place at `target`, atomically
/// replacing any previous one, then removes the previous one.
pub fn install(tmp: &Path, target: &Path) -> Result<()> {
    let had_previous = target.exists();
    let flags = if had_previous { rustix::fs::RenameFlags::EXCHANGE } else { rustix::fs::RenameFlags::NOREPLACE };
    rustix::fs::renameat_with(rustix::fs::CWD, tmp, rustix::fs::CWD, target, flags)
        .map_err(|e| store_err(target, format!("cannot move the new baseline into place: {e}")))?;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        // Make the rename durable before the old baseline goes.
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    if had_previous {
        std::fs::remove_dir_all(tmp).map_err(|e| Error::io("remove the replaced baseline", tmp, e))?;
    }
    Ok(())
}

impl Snapshot {
    /// A new, locked, empty copy directory in `tmp`.
    fn new(tmp: &Path) -> Result<Snapshot> {
        let err = |e| Error::io("make a private copy of the baseline in", tmp, e);
        let dir = tempfile::Builder::new().prefix(SNAPSHOT_PREFIX).tempdir_in(tmp).map_err(err)?;
        let lock = std::fs::File::create_new(dir.path().join("lock")).map_err(err)?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| err(e.into()))?;
        Ok(Snapshot { dir, _lock: lock })
    }
}

/// Removes the private copies in `tmp` that no live reader holds: their lock can be taken
/// (its holder is gone, however it ended), or they have no lock and are older than
/// [`UNLOCKED_SNAPSHOT_AGE`]. Errors are ignored: a copy that cannot be removed now is
/// tried again by the next reader.
fn remove_stale_snapshots(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else { return };
    for entry in entries.flatten() {
        // `file_type` does not follow a symlink planted at a matching name.
        if !entry.file_name().as_encoded_bytes().starts_with(SNAPSHOT_PREFIX.as_bytes())
            || !entry.file_type().is_ok_and(|t| t.is_dir())
        {
            continue;
        }
        let dir = entry.path();
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join("lock"));
        let stale = match &lock {
            Ok(file) => rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > UNLOCKED_SNAPSHOT_AGE)),
            Err(_) => false,
        };
        if stale {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A sled directory has a `conf` and a `db` file.
fn looks_like_store(path: &Path) -> bool {
    path.is_dir() && path.join("db").is_file() && path.join("conf").is_file()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

/// Temporaries left by a killed create: `.NAME.tmp-PID-STAMP` whose process is gone.
fn remove_stale_temporaries(target: &Path) {
    let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else { return };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn copies_left_by_dead_readers_are_removed_and_live_or_foreign_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let live = Snapshot::new(tmp.path()).unwrap();
        // A reader that died: its copy and lock file stay, its lock went with it.
        let Snapshot { dir, _lock } = Snapshot::new(tmp.path()).unwrap();
        let dead = dir.keep();
        drop(_lock);
        let fresh = tmp.path().join(format!("{SNAPSHOT_PREFIX}being-made"));
        let old = tmp.path().join(format!("{SNAPSHOT_PREFIX}left-by-an-old-version"));
        for d in [&fresh, &old] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("db"), b"copy").unwrap();
        }
        std::fs::File::open(&old).unwrap().set_modified(SystemTime::now() - 2 * UNLOCKED_SNAPSHOT_AGE).unwrap();
        // Not ours, or not a directory: never touched, never followed.
        let foreign = tmp.path().join("other-tool");
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(&foreign).unwrap();
        let link = tmp.path().join(format!("{SNAPSHOT_PREFIX}link"));
        std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();

        remove_stale_snapshots(tmp.path());

        assert!(live.dir.path().join("lock").exists(), "a live reader's copy was removed");
        assert!(!dead.exists(), "a dead reader's copy was left");
        assert!(fresh.join("db").exists(), "a copy being made was removed");
        assert!(!old.exists(), "an old unlocked copy was left");
        assert!(foreign.exists() && link.symlink_metadata().is_ok() && elsewhere.path().exists());
    }
}
