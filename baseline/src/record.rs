//! What kubefim records of one file: [`FileRecord`], the versioned, compressed chunks in
//! which the store keeps records, and the comparison of two records attribute by attribute.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::hash::{ContentDigest, Hash};
use crate::policy::{Attribute, AttributeSet};

/// The version byte in front of every stored chunk of records. 2 added
/// [`FileRecord::flags`]; chunks of format 1 are still read (their records have no flags).
pub const CHUNK_FORMAT: u8 = 2;

/// The chunk format before inode flags were recorded.
pub(crate) const CHUNK_FORMAT_1: u8 = 1;

/// How many records a stored chunk holds. The store keeps records in chunks, not one per
/// key: sled's cost is per key (a 133k-file tree took 2 s of CPU and 67 MB as single
/// records), and a baseline is only ever read whole.
pub const CHUNK_RECORDS: usize = 1024;

/// A path (raw bytes) and its record.
pub type PathRecord = (Vec<u8>, FileRecord);

/// Where a record is in a trusted baseline: its chunk (in stored order) and its place in the
/// chunk, packed in 32 bits (22 for the chunk, 10 for the place: [`CHUNK_RECORDS`] is 1024),
/// so that a reader keeping a million of them pays 4 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordLoc(u32);

/// Bits of [`RecordLoc`] that hold the place in the chunk.
const LOC_INDEX_BITS: u32 = CHUNK_RECORDS.trailing_zeros();
const _: () = assert!(CHUNK_RECORDS.is_power_of_two());

impl RecordLoc {
    /// The location of record `index` of chunk `chunk`; `None` when either is out of range.
    pub fn new(chunk: usize, index: usize) -> Option<RecordLoc> {
        let chunk = u32::try_from(chunk).ok().filter(|c| *c < 1 << (32 - LOC_INDEX_BITS))?;
        let index = u32::try_from(index).ok().filter(|i| (*i as usize) < CHUNK_RECORDS)?;
        Some(RecordLoc(chunk << LOC_INDEX_BITS | index))
    }

    /// The chunk, in stored order.
    pub fn chunk(self) -> usize {
        (self.0 >> LOC_INDEX_BITS) as usize
    }

    /// The place in the chunk.
    pub fn index(self) -> usize {
        (self.0 & ((1 << LOC_INDEX_BITS) - 1)) as usize
    }

    /// The packed form.
    pub fn to_bits(self) -> u32 {
        self.0
    }

    /// From the packed form.
    pub fn from_bits(bits: u32) -> RecordLoc {
        RecordLoc(bits)
    }
}

/// Encodes a chunk of records: the format byte, then zstd-compressed postcard.
pub fn encode_chunk(entries: &[PathRecord]) -> Vec<u8> {
    let raw = postcard::to_stdvec(entries).expect("records serialise");
    let mut out = vec![CHUNK_FORMAT];
    out.extend(zstd::bulk::compress(&raw, 1).expect("compressing into memory does not fail"));
    out
}

/// Decodes a stored chunk of this format or of format 1; `None` if it is neither. Only call
/// it on bytes whose signature has been checked: decompression trusts the input's sizes.
pub fn decode_chunk(bytes: &[u8]) -> Option<Vec<PathRecord>> {
    let (&format, packed) = bytes.split_first()?;
    if format != CHUNK_FORMAT && format != CHUNK_FORMAT_1 {
        return None;
    }
    let raw = zstd::stream::decode_all(packed).ok()?;
    if format == CHUNK_FORMAT_1 {
        let old: Vec<(Vec<u8>, FileRecordV1)> = postcard::from_bytes(&raw).ok()?;
        return Some(old.into_iter().map(|(path, r)| (path, r.into())).collect());
    }
    postcard::from_bytes(&raw).ok()
}

/// The type of a file system entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// A named pipe (never opened).
    Fifo,
    /// A Unix socket (never opened).
    Socket,
    /// A character device (never opened).
    Char,
    /// A block device (never opened).
    Block,
}

impl FileKind {
    /// The kind from `st_mode`.
    pub fn from_mode(mode: u32) -> FileKind {
        match mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            0o020000 => FileKind::Char,
            _ => FileKind::Block,
        }
    }

    /// The name used in reports (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::Char => "char",
            FileKind::Block => "block",
        }
    }
}

/// Everything recorded of one path (the path itself is the store key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File type.
    pub kind: FileKind,
    /// Size in bytes (`st_size`).
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Device the entry lives on (not compared: it can change across reboots; kept so the
    /// watcher can key its in-kernel filter by (device, inode)).
    pub dev: u64,
    /// Inode number.
    pub inode: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Target of a symlink.
    pub link_target: Option<Vec<u8>>,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// BLAKE3 of the content and the chaining values of its 64 KiB subtrees; `None` when
    /// the content is not monitored, not a regular file, or could not be read (see `error`).
    pub digest: Option<ContentDigest>,
    /// Whether the content is in the content store (a `diff: true` rule and a text file).
    pub content_stored: bool,
    /// Index of the governing rule in the baseline's policy.
    pub rule: u32,
    /// Why the entry could not be fully recorded, if it could not.
    pub error: Option<String>,
    /// Inode flags (`FS_IOC_GETFLAGS`, the `chattr` bits in [`FLAGS_RECORDED`]): `None` when
    /// not monitored, not readable on this entry (a symlink, a device, a file system without
    /// them), or recorded by a kubefim that did not record them (chunk format 1).
    pub flags: Option<u32>,
}

/// The inode flags recorded: those a user sets with `chattr` or that change what the file
/// guarantees (include/uapi/linux/fs.h, 6.18): SECRM, UNRM, COMPR, SYNC, IMMUTABLE (`i`),
/// APPEND (`a`), NODUMP, NOATIME, NOCOMP, ENCRYPT, JOURNAL_DATA, NOTAIL, DIRSYNC, TOPDIR,
/// VERITY, NOCOW, DAX, PROJINHERIT, CASEFOLD. Not the ones the file system keeps for itself
/// (EXTENTS, INDEX, INLINE_DATA, HUGE_FILE...), which change as a file or directory grows.
pub const FLAGS_RECORDED: u32 = 0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x80
    | 0x400
    | 0x800
    | 0x4000
    | 0x8000
    | 0x1_0000
    | 0x2_0000
    | 0x10_0000
    | 0x80_0000
    | 0x200_0000
    | 0x2000_0000
    | 0x4000_0000;

/// A record as chunk format 1 stored it (before [`FileRecord::flags`]).
#[derive(Deserialize)]
struct FileRecordV1 {
    kind: FileKind,
    size: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    ctime_ns: i64,
    dev: u64,
    inode: u64,
    nlink: u64,
    link_target: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    digest: Option<ContentDigest>,
    content_stored: bool,
    rule: u32,
    error: Option<String>,
}

impl From<FileRecordV1> for FileRecord {
    fn from(r: FileRecordV1) -> FileRecord {
        FileRecord {
            kind: r.kind,
            size: r.size,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            mtime_ns: r.mtime_ns,
            ctime_ns: r.ctime_ns,
            dev: r.dev,
            inode: r.inode,
            nlink: r.nlink,
            link_target: r.link_target,
            xattrs: r.xattrs,
            digest: r.digest,
            content_stored: r.content_stored,
            rule: r.rule,
            error: r.error,
            flags: None,
        }
    }
}

impl FileRecord {
    /// The content hash, if the content was read.
    pub fn hash(&self) -> Option<&Hash> {
        self.digest.as_ref().map(|d| &d.hash)
    }

    /// 64 bits of BLAKE3 over the whole record: two records with the same fingerprint are
    /// equal (a second preimage of 64 bits of BLAKE3 is out of reach), so a rescan can
    /// compare a million entries with what is known without holding a million records.
    pub fn fingerprint(&self) -> u64 {
        let bytes = postcard::to_stdvec(self).expect("records serialise");
        let hash = blake3::hash(&bytes);
        u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
    }

    /// The attributes of `attrs` whose values differ between `self` (baseline) and `now`.
    pub fn changed_attributes(&self, now: &FileRecord, attrs: AttributeSet) -> Vec<Attribute> {
        attrs
            .iter()
            .filter(|a| match a {
                Attribute::Type => self.kind != now.kind,
                // Unknown content on either side is no match; a read error now makes the entry
                // unverified on top of that (see verify).
                Attribute::Content => self.hash() != now.hash(),
                Attribute::Size => self.size != now.size,
                Attribute::Mode => self.mode != now.mode,
                Attribute::Uid => self.uid != now.uid,
                Attribute::Gid => self.gid != now.gid,
                Attribute::Mtime => self.mtime_ns != now.mtime_ns,
                Attribute::Ctime => self.ctime_ns != now.ctime_ns,
                Attribute::Inode => self.inode != now.inode,
                Attribute::Nlink => self.nlink != now.nlink,
                Attribute::LinkTarget => self.link_target != now.link_target,
                Attribute::Xattrs => self.xattrs != now.xattrs,
                // Compared when both sides have them: a baseline recorded before flags were
                // (format 1) has none to compare.
                Attribute::Flags => self.flags.is_some() && now.flags.is_some() && self.flags != now.flags,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FileRecord {
        FileRecord {
            kind: FileKind::File,
            size: 3,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 1,
            ctime_ns: 2,
            dev: 3,
            inode: 4,
            nlink: 1,
            link_target: None,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
            digest: Some(crate::hash::digest_bytes(b"abc")),
            content_stored: false,
            rule: 0,
            error: None,
            flags: Some(0x10),
        }
    }

    #[test]
    fn chunks_round_trip() {
        let entries = vec![(b"/a".to_vec(), sample()), (b"/b\xff".to_vec(), sample())];
        assert_eq!(decode_chunk(&encode_chunk(&entries)).as_ref(), Some(&entries));
        assert_eq!(decode_chunk(b"\x07garbage"), None);
        let mut truncated = encode_chunk(&entries);
        truncated.truncate(truncated.len() - 3);
        assert_eq!(decode_chunk(&truncated), None);
    }

    #[test]
    fn chunks_of_format_1_are_read_without_flags() {
        #[derive(Serialize)]
        struct V1<'a>(
            &'a [u8],
            FileKind,
            u64,
            u32,
            u32,
            u32,
            i64,
            i64,
            u64,
            u64,
            u64,
            Option<Vec<u8>>,
            Vec<(Vec<u8>, Vec<u8>)>,
            Option<ContentDigest>,
            bool,
            u32,
            Option<String>,
        );
        let r = sample();
        let old = V1(
            b"/a",
            r.kind,
            r.size,
            r.mode,
            r.uid,
            r.gid,
            r.mtime_ns,
            r.ctime_ns,
            r.dev,
            r.inode,
            r.nlink,
            r.link_target.clone(),
            r.xattrs.clone(),
            r.digest.clone(),
            r.content_stored,
            r.rule,
            r.error.clone(),
        );
        let raw = postcard::to_stdvec(&vec![old]).unwrap();
        let mut bytes = vec![CHUNK_FORMAT_1];
        bytes.extend(zstd::bulk::compress(&raw, 1).unwrap());
        let decoded = decode_chunk(&bytes).expect("a format-1 chunk decodes");
        assert_eq!(decoded, vec![(b"/a".to_vec(), FileRecord { flags: None, ..r })]);
        assert_eq!(encode_chunk(&decoded)[0], CHUNK_FORMAT);
    }

    #[test]
    fn flags_are_compared_only_when_both_sides_have_them() {
        let a = sample();
        let mut b = sample();
        b.flags = Some(0x10 | 0x20);
        assert_eq!(a.changed_attributes(&b, AttributeSet::all()), vec![Attribute::Flags]);
        let old = FileRecord { flags: None, ..sample() };
        assert!(old.changed_attributes(&b, AttributeSet::all()).is_empty());
    }

    #[test]
    fn locations_pack_and_unpack() {
        let loc = RecordLoc::new(3_000_000, 1023).unwrap();
        assert_eq!((loc.chunk(), loc.index()), (3_000_000, 1023));
        assert_eq!(RecordLoc::from_bits(loc.to_bits()), loc);
        assert_eq!(RecordLoc::new(0, CHUNK_RECORDS), None);
        assert_eq!(RecordLoc::new(1 << 22, 0), None);
    }

    #[test]
    fn fingerprints_tell_records_apart() {
        let a = sample();
        let mut b = sample();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.ctime_ns += 1;
        assert_ne!(a.fingerprint(), b.fingerprint());
    }

    #[test]
    fn compares_only_monitored_attributes() {
        let a = sample();
        let mut b = sample();
        b.mode = 0o600;
        b.ctime_ns = 9;
        assert_eq!(a.changed_attributes(&b, AttributeSet::all()), vec![Attribute::Mode, Attribute::Ctime]);
        let only_content: AttributeSet = [Attribute::Content].into_iter().collect();
        assert!(a.changed_attributes(&b, only_content).is_empty());
    }
}
