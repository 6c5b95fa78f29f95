//! Content hashing: the standard BLAKE3 hash of a file (equal to what `b3sum` prints) and, from
//! the same pass, the chaining values of its 64 KiB subtrees, so that two versions of a large
//! file can say which byte ranges changed. The subtrees are real nodes of the BLAKE3 tree
//! (blake3's `hazmat` module), merged into the root hash, so nothing is hashed twice.
//! Reads use `read(2)` into a reused buffer, never mmap: a file truncated under a mapping
//! kills the process with SIGBUS, and the files we hash may be changing.

use std::io::{self, Read};

use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// A 32-byte BLAKE3 output.
pub type Hash = [u8; 32];

/// The size of the subtrees whose chaining values a digest keeps: a power of two times
/// blake3's 1 KiB chunk, so every subtree is a node of the BLAKE3 tree.
pub const SUBTREE_LEN: usize = 64 * 1024;

/// Below this many full subtrees in one buffer, hashing them on one thread is cheaper than
/// handing them to rayon.
const PARALLEL_MIN_SUBTREES: usize = 8;

/// A file's BLAKE3 hash and the chaining values of its 64 KiB subtrees (empty when the
/// content fits in one subtree: then the hash itself says everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContentDigest {
    /// The standard BLAKE3 hash of the whole content.
    pub hash: Hash,
    /// Chaining value of each 64 KiB subtree, in order.
    pub subtrees: Vec<Hash>,
}

impl ContentDigest {
    /// The hash as lowercase hex, as `b3sum` prints it.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }
}

/// Incremental builder of a [`ContentDigest`]: feed it bytes in any pieces.
pub struct DigestBuilder {
    subtrees: Vec<ChainingValue>,
    leaf: blake3::Hasher,
    leaf_len: usize,
    total: u64,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        DigestBuilder { subtrees: Vec::new(), leaf: blake3::Hasher::new(), leaf_len: 0, total: 0 }
    }
}

fn subtree_cv(offset: u64, data: &[u8]) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(data);
    h.finalize_non_root()
}

impl DigestBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Closes the current leaf when it is full and more input follows (a full leaf that
    /// ends the input may be the root, so it is closed only once we know it is not).
    fn close_full_leaf(&mut self) {
        if self.leaf_len == SUBTREE_LEN {
            self.subtrees.push(self.leaf.finalize_non_root());
            self.leaf = blake3::Hasher::new();
            self.leaf.set_input_offset(self.total);
            self.leaf_len = 0;
        }
    }

    /// Feeds more content.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            self.close_full_leaf();
            if self.leaf_len == 0 && data.len() > SUBTREE_LEN {
                // Whole subtrees in the middle of the input: hash them side by side. Keep at
                // least one byte back so the last subtree of the input stays open.
                let whole = (data.len() - 1) / SUBTREE_LEN;
                let (body, rest) = data.split_at(whole * SUBTREE_LEN);
                let base = self.total;
                let cv = |(i, piece): (usize, &[u8])| subtree_cv(base + (i * SUBTREE_LEN) as u64, piece);
                if whole >= PARALLEL_MIN_SUBTREES {
                    let mut cvs = Vec::with_capacity(whole);
                    body.par_chunks(SUBTREE_LEN).enumerate().map(cv).collect_into_vec(&mut cvs);
                    self.subtrees.extend(cvs);
                } else {
                    self.subtrees.extend(body.chunks(SUBTREE_LEN).enumerate().map(cv));
                }
                self.total += body.len() as u64;
                self.leaf = blake3::Hasher::new();
                self.leaf.set_input_offset(self.total);
                data = rest;
                continue;
            }
            let take = (SUBTREE_LEN - self.leaf_len).min(data.len());
            self.leaf.update(&data[..take]);
            self.leaf_len += take;
            self.total += take as u64;
            data = &data[take..];
        }
    }

    /// The digest of everything fed.
    pub fn finish(mut self) -> ContentDigest {
        if self.subtrees.is_empty() {
            return ContentDigest { hash: *self.leaf.finalize().as_bytes(), subtrees: Vec::new() };
        }
        self.subtrees.push(self.leaf.finalize_non_root());
        let hash = merge_root(&self.subtrees, self.total);
        ContentDigest { hash, subtrees: self.subtrees }
    }
}

/// Merges subtree chaining values into the root hash, following BLAKE3's left-balanced tree:
/// the left child of every node covers the largest power-of-two number of chunks that leaves
/// something for the right, which is always a whole number of our 64 KiB subtrees.
fn merge_root(cvs: &[ChainingValue], len: u64) -> Hash {
    let (left, right, left_len) = split(cvs, len);
    *merge_subtrees_root(&merge(left, left_len), &merge(right, len - left_len), Mode::Hash).as_bytes()
}

fn merge(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right, left_len) = split(cvs, len);
    merge_subtrees_non_root(&merge(left, left_len), &merge(right, len - left_len), Mode::Hash)
}

fn split(cvs: &[ChainingValue], len: u64) -> (&[ChainingValue], &[ChainingValue], u64) {
    let left_len = left_subtree_len(len);
    let n = usize::try_from(left_len / SUBTREE_LEN as u64).expect("subtree count fits in memory");
    (&cvs[..n], &cvs[n..], left_len)
}

/// The digest of an in-memory buffer.
pub fn digest_bytes(data: &[u8]) -> ContentDigest {
    let mut b = DigestBuilder::new();
    b.update(data);
    b.finish()
}

/// What [`digest_reader`] read.
pub struct ReadDigest {
    /// The digest.
    pub digest: ContentDigest,
    /// Bytes read until end of file.
    pub len: u64,
    /// The whole content, when it was no longer than the `keep` limit.
    pub content: Option<Vec<u8>>,
}

/// Hashes everything `reader` yields until end of file, reading into `buf` (whose capacity
/// sets the read size). Keeps the content when it is at most `keep` bytes.
pub fn digest_reader(reader: &mut impl Read, buf: &mut Vec<u8>, keep: Option<u64>) -> io::Result<ReadDigest> {
    let cap = buf.capacity().max(SUBTREE_LEN);
    buf.resize(cap, 0);
    let mut builder = DigestBuilder::new();
    let mut kept: Option<Vec<u8>> = keep.map(|_| Vec::new());
    loop {
        let n = match reader.read(&mut buf[..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        builder.update(&buf[..n]);
        if let (Some(limit), Some(k)) = (keep, kept.as_mut()) {
            if builder.len() <= limit {
                k.extend_from_slice(&buf[..n]);
            } else {
                kept = None;
            }
        }
    }
    let len = builder.len();
    Ok(ReadDigest { digest: builder.finish(), len, content: kept })
}

/// The byte ranges `[start, end)` in which two versions of a content differ, at the
/// granularity of the 64 KiB subtrees (the whole content when either fits in one).
pub fn changed_ranges(old: &ContentDigest, old_len: u64, new: &ContentDigest, new_len: u64) -> Vec<[u64; 2]> {
    if old.hash == new.hash {
        return Vec::new();
    }
    let end = old_len.max(new_len);
    if old.subtrees.is_empty() || new.subtrees.is_empty() {
        return vec![[0, end]];
    }
    let n = old.subtrees.len().max(new.subtrees.len());
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    for i in 0..n {
        if old.subtrees.get(i) == new.subtrees.get(i) {
            continue;
        }
        let start = (i * SUBTREE_LEN) as u64;
        let stop = (start + SUBTREE_LEN as u64).min(end);
        match ranges.last_mut() {
            Some(last) if last[1] == start => last[1] = stop,
            _ => ranges.push([start, stop]),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i * 31 % 251).expect("below 251")).collect()
    }

    #[test]
    fn equals_standard_blake3_at_every_boundary() {
        let k = SUBTREE_LEN;
        for len in [
            0,
            1,
            1023,
            1024,
            1025,
            k - 1,
            k,
            k + 1,
            2 * k,
            2 * k + 1,
            3 * k,
            5 * k + 7,
            8 * k,
            9 * k + 1,
            17 * k,
            33 * k - 1,
        ] {
            let d = data(len);
            assert_eq!(digest_bytes(&d).hash, *blake3::hash(&d).as_bytes(), "len {len}");
            // Fed in odd pieces, the answer is the same.
            for piece in [1, 1000, k - 3, k, 3 * k + 5] {
                let mut b = DigestBuilder::new();
                d.chunks(piece).for_each(|c| b.update(c));
                assert_eq!(b.finish().hash, *blake3::hash(&d).as_bytes(), "len {len} piece {piece}");
            }
        }
    }

    #[test]
    fn reader_matches_and_keeps_small_content() {
        let d = data(3 * SUBTREE_LEN + 11);
        let mut buf = Vec::with_capacity(SUBTREE_LEN);
        let r = digest_reader(&mut &d[..], &mut buf, Some(1 << 20)).unwrap();
        assert_eq!(r.digest, digest_bytes(&d));
        assert_eq!(r.len, d.len() as u64);
        assert_eq!(r.content.as_deref(), Some(&d[..]));
        let r = digest_reader(&mut &d[..], &mut buf, Some(10)).unwrap();
        assert!(r.content.is_none());
    }

    #[test]
    fn ranges_point_at_the_changed_subtree() {
        let a = data(20 * SUBTREE_LEN);
        let mut b = a.clone();
        b[300_000] ^= 1;
        let (da, db) = (digest_bytes(&a), digest_bytes(&b));
        let n = a.len() as u64;
        assert_eq!(changed_ranges(&da, n, &db, n), vec![[262_144, 327_680]]);
        b.truncate(2 * SUBTREE_LEN);
        let db = digest_bytes(&b);
        let ranges = changed_ranges(&da, n, &db, b.len() as u64);
        assert_eq!(ranges, vec![[2 * SUBTREE_LEN as u64, n]]);
        let small = digest_bytes(b"x");
        assert_eq!(changed_ranges(&small, 1, &digest_bytes(b"y"), 1), vec![[0, 1]]);
    }
}
