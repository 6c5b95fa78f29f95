//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The eBPF programs read kernel structs (`task_struct`, `file`, `dentry`, ...) at byte offsets.
//! Rust eBPF has no CO-RE field relocations, so those offsets cannot be compiled in: user space
//! computes them here at load time from the kernel's own type information and hands them to the
//! programs. The reader is hand-written and minimal because aya-obj 0.3 keeps its BTF types
//! crate-private and btf-rs is LGPL, which does not fit kubefim's Apache-2.0 licence. It walks the
//! type section only far enough to index structs and unions by name and to read their members;
//! the format is described in the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

/// Where the running kernel exposes its own BTF (kernels built with `CONFIG_DEBUG_INFO_BTF=y`).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Bounds typedef chains and anonymous-member nesting, so a cyclic (corrupt) blob is an error
/// instead of a stack overflow. Real kernels nest a handful of levels.
const MAX_DEPTH: u32 = 32;

/// Why an offset could not be read from kernel BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read; usually the kernel was built without BTF.
    #[error("cannot read kernel BTF at {VMLINUX_BTF}; kubefim watch needs a kernel with CONFIG_DEBUG_INFO_BTF=y")]
    Read(#[source] std::io::Error),
    /// The blob does not start with the little-endian BTF magic.
    #[error("kernel BTF has magic {0:#06x}, not 0xeb9f: not little-endian BTF (big-endian hosts are unsupported)")]
    BadMagic(u16),
    /// A header field, type record or name points outside the blob, or types refer to each other
    /// in a cycle.
    #[error("kernel BTF is malformed ({0}): the file is truncated or corrupt")]
    Malformed(&'static str),
    /// A type has a kind this reader does not know, so the records after it cannot be located.
    #[error("kernel BTF type {id} has unknown kind {kind}: this kernel is newer than kubefim's BTF reader (btf.rs)")]
    UnknownKind { id: u32, kind: u32 },
    /// No struct or union of that name exists in this kernel.
    #[error("kernel BTF at {VMLINUX_BTF} has no struct {0}: this kernel is not supported")]
    NoStruct(String),
    /// The struct exists but has no such member, not even inside an anonymous struct or union.
    #[error("struct {name} in kernel BTF at {VMLINUX_BTF} has no member {member}: this kernel is not supported")]
    NoMember { name: String, member: String },
    /// The member is a bitfield, which has no byte offset the probes could read at.
    #[error("{name}.{member} is a bitfield in kernel BTF, not readable at a byte offset: this kernel is not supported")]
    Bitfield { name: String, member: String },
}

/// Parsed kernel BTF: the raw blob plus where each type record starts and a struct name index.
pub struct KernelBtf {
    bytes: Vec<u8>,
    /// The string section, as a range of `bytes`.
    strings: std::ops::Range<usize>,
    /// Start of each type record in `bytes`; type id `n` is at index `n - 1` (id 0 is `void`).
    records: Vec<usize>,
    /// Struct and union type ids (with their kind) by name. FWD declarations are not indexed.
    by_name: HashMap<String, (u32, u32)>,
}

/// Widens a u32 from the blob; `usize::MAX` (impossible on 64-bit) makes the next bounds check fail.
fn at(x: u32) -> usize {
    usize::try_from(x).unwrap_or(usize::MAX)
}

fn u32_at(bytes: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(pos..pos.checked_add(4)?)?.try_into().ok()?))
}

/// The NUL-terminated name at `off` in the string section (empty for anonymous types).
fn name_at<'a>(bytes: &'a [u8], strings: &std::ops::Range<usize>, off: u32) -> Option<&'a [u8]> {
    let s = bytes.get(strings.start.checked_add(at(off))?..strings.end)?;
    s.get(..s.iter().position(|&b| b == 0)?)
}

impl KernelBtf {
    /// Reads and parses the running kernel's BTF from [`VMLINUX_BTF`].
    pub fn from_sys_fs() -> Result<KernelBtf, BtfError> {
        let bytes = std::fs::read(VMLINUX_BTF).map_err(BtfError::Read)?;
        Self::parse(bytes)
    }

    /// Parses a BTF blob: validates the header, locates every type record and indexes structs.
    pub fn parse(bytes: Vec<u8>) -> Result<KernelBtf, BtfError> {
        match bytes.get(..2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes) {
            Some(MAGIC) => {}
            Some(other) => return Err(BtfError::BadMagic(other)),
            None => return Err(BtfError::Malformed("no header")),
        }
        let field = |i: usize| u32_at(&bytes, 4 + 4 * i).ok_or(BtfError::Malformed("header cut short"));
        let (hdr_len, type_off, type_len, str_off, str_len) = (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        // Section offsets are relative to the end of the header, whose length the header states.
        let section = |off: u32, len: u32, what| {
            let start = at(hdr_len).checked_add(at(off)).ok_or(BtfError::Malformed(what))?;
            let end = start.checked_add(at(len)).filter(|&end| end <= bytes.len()).ok_or(BtfError::Malformed(what))?;
            Ok::<_, BtfError>(start..end)
        };
        let types = section(type_off, type_len, "type section out of bounds")?;
        let strings = section(str_off, str_len, "string section out of bounds")?;

        let (mut records, mut by_name) = (Vec::new(), HashMap::new());
        let mut pos = types.start;
        while pos < types.end {
            let id = u32::try_from(records.len() + 1).map_err(|_| BtfError::Malformed("too many types"))?;
            let (name_off, info) =
                u32_at(&bytes, pos).zip(u32_at(&bytes, pos + 4)).ok_or(BtfError::Malformed("type"))?;
            let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
            // Records have no length field: the kind says how much data follows the 12-byte head.
            let extra = match kind {
                2 | 7..=12 | 16 | 18 => 0,
                1 | 14 | 17 => 4,
                3 => 12,
                6 | 13 => 8 * vlen,
                4 | 5 | 15 | 19 => 12 * vlen,
                _ => return Err(BtfError::UnknownKind { id, kind }),
            };
            let end = pos.checked_add(12 + at(extra)).filter(|&end| end <= types.end);
            let end = end.ok_or(BtfError::Malformed("type record runs past the type section"))?;
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let name = name_at(&bytes, &strings, name_off).ok_or(BtfError::Malformed("type name"))?;
                if let Some(name) = std::str::from_utf8(name).ok().filter(|n| !n.is_empty()) {
                    // A struct wins over a same-named union; otherwise the first definition wins.
                    let slot = by_name.entry(name.to_owned()).or_insert((id, kind));
                    if slot.1 == KIND_UNION && kind == KIND_STRUCT {
                        *slot = (id, kind);
                    }
                }
            }
            records.push(pos);
            pos = end;
        }
        Ok(KernelBtf { bytes, strings, records, by_name })
    }

    /// The value of the enumerator `name` in any (32-bit) enum of the kernel, for constants
    /// the kernel renumbered between versions (`I_DIRTY_PAGES`: 4 before 6.12, 64 in 6.18).
    /// `None` when no enum has it (it may be a `#define` on older kernels).
    pub fn enum_value(&self, name: &str) -> Option<u32> {
        const KIND_ENUM: u32 = 6;
        self.records.iter().find_map(|&pos| {
            let info = u32_at(&self.bytes, pos + 4)?;
            if (info >> 24) & 0x1f != KIND_ENUM {
                return None;
            }
            (0..at(info & 0xffff)).find_map(|i| {
                let entry = pos + 12 + 8 * i;
                let entry_name = name_at(&self.bytes, &self.strings, u32_at(&self.bytes, entry)?)?;
                (entry_name == name.as_bytes()).then(|| u32_at(&self.bytes, entry + 4)).flatten()
            })
        })
    }

    /// Byte offset of `member` in the struct (or union) named `name`, looking through anonymous
    /// struct/union members recursively (e.g. qstr's `name` sits after an anonymous union;
    /// inode/file/dentry fields can be inside anonymous unions). Follows typedef/const/volatile
    /// when descending into an anonymous member's type. Errors if not found or if it is a bitfield.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self.struct_id(name)?;
        match self.find(id, member.as_bytes(), 0)? {
            None => Err(BtfError::NoMember { name: name.to_owned(), member: member.to_owned() }),
            Some((bits, size)) if size != 0 || bits % 8 != 0 => {
                Err(BtfError::Bitfield { name: name.to_owned(), member: member.to_owned() })
            }
            Some((bits, _)) => Ok(bits / 8),
        }
    }

    /// Size in bytes of the struct (or union) named `name`.
    #[cfg(test)]
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.record(self.struct_id(name)?)?.2)
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name.get(name).map(|&(id, _)| id).ok_or_else(|| BtfError::NoStruct(name.to_owned()))
    }

    fn word(&self, pos: usize) -> Result<u32, BtfError> {
        u32_at(&self.bytes, pos).ok_or(BtfError::Malformed("record cut short"))
    }

    /// Start, info word and size-or-type word of type `id`.
    fn record(&self, id: u32) -> Result<(usize, u32, u32), BtfError> {
        let pos = id.checked_sub(1).and_then(|i| self.records.get(at(i))).copied();
        let pos = pos.ok_or(BtfError::Malformed("reference to a type id that does not exist"))?;
        Ok((pos, self.word(pos + 4)?, self.word(pos + 8)?))
    }

    /// Bit offset and bitfield size (0 if none) of `member` in struct/union `id`, if present.
    fn find(&self, id: u32, member: &[u8], depth: u32) -> Result<Option<(u32, u32)>, BtfError> {
        let (pos, info, _) = self.record(id)?;
        let kind_flag = info >> 31 == 1;
        for m in (0..at(info & 0xffff)).map(|i| pos + 12 + 12 * i) {
            let (name_off, ty, raw) = (self.word(m)?, self.word(m + 4)?, self.word(m + 8)?);
            // With kind_flag the offset word packs the bitfield size into its top byte. pahole sets
            // kind_flag on every struct that has bitfields, so without it the word is a bit offset.
            let (bits, size) = if kind_flag { (raw & 0xff_ffff, raw >> 24) } else { (raw, 0) };
            if name_off == 0 {
                // Anonymous members (and unnamed bitfield padding, which is no aggregate) have no
                // name to match; C puts the members of an anonymous struct/union in the outer scope.
                let Some(inner) = self.aggregate(ty, depth)? else { continue };
                if let Some((inner_bits, size)) = self.find(inner, member, depth + 1)? {
                    let bits = bits.checked_add(inner_bits).ok_or(BtfError::Malformed("offset overflow"))?;
                    return Ok(Some((bits, size)));
                }
            } else if name_at(&self.bytes, &self.strings, name_off) == Some(member) {
                return Ok(Some((bits, size)));
            }
        }
        Ok(None)
    }

    /// The struct/union that `ty` is, after typedef/volatile/const/restrict/type tags, if any.
    fn aggregate(&self, mut ty: u32, depth: u32) -> Result<Option<u32>, BtfError> {
        for _ in depth..MAX_DEPTH {
            let (_, info, next) = self.record(ty)?;
            match (info >> 24) & 0x1f {
                KIND_STRUCT | KIND_UNION => return Ok(Some(ty)),
                8..=11 | 18 => ty = next,
                _ => return Ok(None),
            }
        }
        Err(BtfError::Malformed("types nest too deeply or refer to themselves"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// The running kernel's BTF, parsed once for all tests (it exists on dev machines and CI).
    fn kernel() -> &'static KernelBtf {
        static BTF: OnceLock<KernelBtf> = OnceLock::new();
        BTF.get_or_init(|| KernelBtf::from_sys_fs().expect("these tests need /sys/kernel/btf/vmlinux"))
    }

    /// Every member the probes read, as `struct.member`.
    const PROBED: &str = "task_struct.files task_struct.fs task_struct.tgid task_struct.real_parent files_struct.fdt \
        fdtable.max_fds fdtable.fd file.f_inode file.f_path file.f_mode path.mnt path.dentry inode.i_ino inode.i_sb \
        inode.i_mode super_block.s_dev dentry.d_parent dentry.d_inode dentry.d_name qstr.name fs_struct.root \
        fs_struct.pwd io_kiocb.file";

    #[test]
    fn offsets_the_probes_need_resolve() {
        let mut found: Vec<(&str, &str, u32)> = Vec::new();
        for (name, member) in PROBED.split_whitespace().filter_map(|p| p.split_once('.')) {
            let (offset, size) = (kernel().member_offset(name, member).unwrap(), kernel().struct_size(name).unwrap());
            eprintln!("{name}.{member} = {offset} (size {size})");
            assert!(offset < size, "{name}.{member} at {offset} is outside the struct's {size} bytes");
            // Distinct members of one struct cannot share an offset (none of these sit in a common union).
            let clash = found.iter().find(|&&(n, _, o)| n == name && o == offset);
            assert!(clash.is_none(), "{name}.{member} and {clash:?} share offset {offset}");
            found.push((name, member, offset));
        }
        assert_eq!(found.len(), 23);
    }

    #[test]
    fn layouts_fixed_by_the_c_source() {
        let btf = kernel();
        assert_eq!((btf.member_offset("path", "mnt").unwrap(), btf.member_offset("path", "dentry").unwrap()), (0, 8));
        assert_eq!(btf.struct_size("path").unwrap(), 16);
        // qstr { union { struct { u32 hash; u32 len; }; u64 hash_len; }; const char *name; }:
        // `len` is two anonymous levels deep, `name` follows the 8-byte union.
        assert_eq!(btf.member_offset("qstr", "hash").unwrap(), 0);
        assert_eq!(btf.member_offset("qstr", "len").unwrap(), 4);
        assert_eq!(btf.member_offset("qstr", "name").unwrap(), 8);
        // `struct path root, pwd;` are adjacent.
        let root = btf.member_offset("fs_struct", "root").unwrap();
        assert_eq!(btf.member_offset("fs_struct", "pwd").unwrap(), root + 16);
    }

    /// Cross-check against a layout user space knows independently: the x86-64 `struct stat` ABI.
    #[test]
    #[cfg(target_arch = "x86_64")]
    #[allow(deprecated)] // std::os::linux::raw is deprecated in favour of libc, which this module does not need.
    fn stat_matches_the_user_space_abi() {
        use std::{mem::offset_of, os::linux::raw::stat};
        let btf = kernel();
        assert_eq!(btf.struct_size("stat").unwrap(), u32::try_from(size_of::<stat>()).unwrap());
        let std_offsets = [
            ("st_ino", offset_of!(stat, st_ino)),
            ("st_mode", offset_of!(stat, st_mode)),
            ("st_size", offset_of!(stat, st_size)),
            ("st_mtime", offset_of!(stat, st_mtime)),
        ];
        for (member, offset) in std_offsets {
            assert_eq!(btf.member_offset("stat", member).unwrap(), u32::try_from(offset).unwrap(), "stat.{member}");
        }
    }

    #[test]
    fn enum_values_of_the_running_kernel() {
        // Stable across versions: the dirty bits are distinct powers of two.
        let k = kernel();
        let pages = k.enum_value("I_DIRTY_PAGES");
        if let Some(pages) = pages {
            assert!(pages.is_power_of_two());
            assert_ne!(Some(pages), k.enum_value("I_DIRTY_SYNC"));
        }
        assert_eq!(k.enum_value("NO_SUCH_ENUMERATOR_KUBEFIM"), None);
    }

    #[test]
    fn unknown_names_are_errors() {
        let err = kernel().member_offset("kubefim_no_such_struct", "x").unwrap_err();
        assert!(matches!(err, BtfError::NoStruct(_)) && err.to_string().contains("kubefim_no_such_struct"), "{err}");
        let err = kernel().member_offset("task_struct", "kubefim_no_such_member").unwrap_err();
        assert!(matches!(err, BtfError::NoMember { .. }) && err.to_string().contains("task_struct"), "{err}");
        assert!(matches!(kernel().struct_size("kubefim_no_such_struct"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn garbage_and_truncated_blobs_are_errors() {
        assert!(matches!(KernelBtf::parse(b"not BTF at all, just some bytes".to_vec()), Err(BtfError::BadMagic(_))));
        let real = std::fs::read(VMLINUX_BTF).unwrap();
        for len in [0, 1, 2, 10, 23, 24, 100, 4096, real.len() / 2, real.len() - 1] {
            assert!(KernelBtf::parse(real.get(..len).unwrap().to_vec()).is_err(), "parsed {len} bytes");
        }
    }

    /// A BTF blob with the given type words and string section.
    fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = u32::try_from(types.len() * 4).unwrap();
        let mut out = [MAGIC.to_le_bytes(), [1, 0]].concat();
        for word in [24, 0, type_len, type_len, u32::try_from(strings.len()).unwrap()].iter().chain(types) {
            out.extend(word.to_le_bytes());
        }
        out.extend(strings);
        out
    }

    #[test]
    fn synthetic_blobs() {
        #[rustfmt::skip]
        let types = [
            1, 7 << 24, 0,               // 1: FWD s
            1, 1 << 31 | 4 << 24 | 3, 8, // 2: STRUCT s, kind_flag, 3 members, 8 bytes:
            5, 3, 0,                     //    int x at bit 0
            3, 3, 3 << 24 | 32,          //    int b:3 at bit 32
            0, 4, 0,                     //    an anonymous member of type 4
            0, 1 << 24, 4, 32,           // 3: INT, 4 bytes, 32 bits
            0, 8 << 24, 4,               // 4: TYPEDEF of itself (a cycle)
        ];
        let btf = KernelBtf::parse(blob(&types, b"\0s\0b\0x\0")).unwrap();
        assert_eq!(btf.struct_size("s").unwrap(), 8, "the complete struct, not the FWD, must be found");
        assert_eq!(btf.member_offset("s", "x").unwrap(), 0);
        assert!(matches!(btf.member_offset("s", "b"), Err(BtfError::Bitfield { .. })));
        assert!(matches!(btf.member_offset("s", "zzz"), Err(BtfError::Malformed(_))), "the typedef cycle must end");
        // A kind this reader does not know, and a struct whose members are missing.
        assert!(matches!(
            KernelBtf::parse(blob(&[0, 25 << 24, 0], b"\0")),
            Err(BtfError::UnknownKind { id: 1, kind: 25 })
        ));
        assert!(matches!(KernelBtf::parse(blob(&[0, 4 << 24 | 3, 8], b"\0")), Err(BtfError::Malformed(_))));
    }
}
