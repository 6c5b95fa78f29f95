//! The image's records, cached on disk: what a file of an image layer was recorded as
//! (its BLAKE3, metadata and, where a rule keeps it, content for diffs), keyed by the layer's
//! identity (its directory and that directory's device and inode), the path in the image and
//! what the rule records. Every container of an image compares with the same layer files, so
//! each is read once however many containers use it, and once across restarts of the
//! watcher. An entry is used only while the layer file's inode, size, mtime and ctime are
//! what they were when it was recorded: a layer file changed on the node is read again
//! (its ctime moves with any change). It is a sled database in the state directory; when it
//! cannot be opened (another kubefim holds it), comparisons read the layers instead.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::Stat;
use serde::{Deserialize, Serialize};

use super::overlay::Layer;
use crate::policy::Rule;
use crate::record::FileRecord;

/// Bumped when what is stored changes meaning: older entries are then never matched.
const FORMAT: &[u8] = b"kubefim layer cache v1";

/// The on-disk cache of image layer records.
pub struct LayerCache {
    db: sled::Db,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for LayerCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerCache").field("hits", &self.hits()).field("misses", &self.misses()).finish()
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    ino: u64,
    size: u64,
    mtime: (i64, u64),
    ctime: (i64, u64),
    record: FileRecord,
    content: Option<Vec<u8>>,
}

fn stat_times(st: &Stat) -> ((i64, u64), (i64, u64)) {
    #[allow(clippy::unnecessary_cast)]
    ((st.st_mtime as i64, st.st_mtime_nsec as u64), (st.st_ctime as i64, st.st_ctime_nsec as u64))
}

impl LayerCache {
    /// Opens (or creates) the cache at `path` (a directory).
    pub fn open(path: &Path) -> io::Result<LayerCache> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(8 << 20)
            .open()
            .map_err(|e| io::Error::other(format!("the layer cache {}: {e}", path.display())))?;
        Ok(LayerCache { db, hits: AtomicU64::new(0), misses: AtomicU64::new(0) })
    }

    /// Records taken from the cache since it was opened.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Records that had to be read from a layer (and were stored).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// The record of `path` (in the image) found in `layer` with status `stat`, under
    /// `rule`: from the cache when it holds one for this very file, else `record()`'s,
    /// stored for next time.
    pub fn record(
        &self,
        layer: &Layer,
        path: &Path,
        stat: &Stat,
        rule: &Rule,
        rule_index: usize,
        record: impl FnOnce() -> io::Result<(FileRecord, Option<Vec<u8>>)>,
    ) -> io::Result<(FileRecord, Option<Vec<u8>>)> {
        let key = key(layer, path, rule);
        let (mtime, ctime) = stat_times(stat);
        let cached = self.db.get(&key).ok().flatten().and_then(|v| postcard::from_bytes::<Entry>(&v).ok());
        if let Some(e) = cached
            && e.ino == stat.st_ino
            && e.size == stat.st_size as u64
            && e.mtime == mtime
            && e.ctime == ctime
        {
            self.hits.fetch_add(1, Ordering::Relaxed);
            let mut record = e.record;
            record.rule = u32::try_from(rule_index).unwrap_or(u32::MAX);
            return Ok((record, e.content));
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let (record, content) = record()?;
        // A record that could not be made whole (an unreadable file) is not kept: the next
        // comparison tries again.
        if record.error.is_none() {
            let entry = Entry { ino: stat.st_ino, size: stat.st_size as u64, mtime, ctime, record, content };
            if let Ok(bytes) = postcard::to_allocvec(&entry) {
                // A cache that cannot be written only costs the next reader a read.
                let _ = self.db.insert(key, bytes);
            }
            return Ok((entry.record, entry.content));
        }
        Ok((record, content))
    }

    /// Writes what was stored to disk.
    pub fn flush(&self) {
        let _ = self.db.flush();
    }
}

/// The layer's identity, the path in it and what the rule records (its attributes, whether
/// it keeps content), NUL-separated.
fn key(layer: &Layer, path: &Path, rule: &Rule) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let mut k = FORMAT.to_vec();
    k.push(0);
    k.extend_from_slice(layer.dir.as_os_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&layer.id.0.to_le_bytes());
    k.extend_from_slice(&layer.id.1.to_le_bytes());
    k.extend_from_slice(path.as_os_str().as_bytes());
    k.push(0);
    let attributes: Vec<&str> = rule.attributes.iter().map(|a| a.name()).collect();
    k.extend_from_slice(attributes.join(",").as_bytes());
    k.push(u8::from(rule.diff && !rule.secret));
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    #[test]
    fn a_layer_file_is_read_once_until_it_changes_and_the_cache_outlives_its_opener() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("layer");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/app.conf"), "listen 80\n").unwrap();
        let layer = Layer::at(&dir).unwrap();
        let yaml = "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: t}\nspec:\n  rules:\n    - \
                    {path: /etc, diff: true}\n    - {path: /srv}\n";
        let policy = Policy::from_yaml(yaml, "t").unwrap();
        let (rule, other) = (&policy.rules[0], &policy.rules[1]);
        let path = Path::new("/etc/app.conf");
        let stat = || rustix::fs::stat(dir.join("etc/app.conf")).unwrap();
        let reads = std::cell::Cell::new(0);
        let read = |rule: &Rule| {
            reads.set(reads.get() + 1);
            let etc = rustix::fs::open(dir.join("etc"), rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty())?;
            let r = crate::scan::record_entry(std::os::fd::AsFd::as_fd(&etc), c"app.conf", true, rule, 0, true)?;
            Ok((r.record, r.content))
        };
        let cache_dir = tmp.path().join("cache");
        {
            let cache = LayerCache::open(&cache_dir).unwrap();
            let (r, content) = cache.record(&layer, path, &stat(), rule, 0, || read(rule)).unwrap();
            assert_eq!((r.size, content.as_deref()), (10, Some(&b"listen 80\n"[..])));
            let (again, content) = cache.record(&layer, path, &stat(), rule, 3, || read(rule)).unwrap();
            assert_eq!((again.digest, content.as_deref()), (r.digest, Some(&b"listen 80\n"[..])));
            assert_eq!((reads.get(), cache.hits(), cache.misses()), (1, 1, 1));
            cache.flush();
        }
        // Another opener (a restarted watcher) finds it; a rule that records otherwise does not.
        let cache = LayerCache::open(&cache_dir).unwrap();
        let (r, _) = cache.record(&layer, path, &stat(), rule, 5, || read(rule)).unwrap();
        assert_eq!((reads.get(), r.rule), (1, 5));
        let (_, content) = cache.record(&layer, path, &stat(), other, 1, || read(other)).unwrap();
        assert_eq!((reads.get(), content), (2, None));
        // The layer file changed on the node: read again.
        std::fs::write(dir.join("etc/app.conf"), "listen 81\n").unwrap();
        let (_, content) = cache.record(&layer, path, &stat(), rule, 0, || read(rule)).unwrap();
        assert_eq!((reads.get(), content.as_deref()), (3, Some(&b"listen 81\n"[..])));
    }
}
