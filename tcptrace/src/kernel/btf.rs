//! A small, self-contained reader for the kernel's BTF (BPF Type Format).
//!
//! The kernel program is written in Rust and so gets no CO-RE relocations;
//! instead user space looks up the byte offsets of the few struct members it
//! needs in the running kernel's BTF (`/sys/kernel/btf/vmlinux`) and passes
//! them to the program at load time.
//!
//! Only what that needs is implemented: the header, the string section, and
//! the type section (every kind is stepped over so that type ids stay right,
//! but only struct/union members, modifiers and typedefs are kept). The
//! format is described in the kernel's `Documentation/bpf/btf.rst`.
//!
//! Input is untrusted: every read is bounds-checked, loops over
//! attacker-controlled chains are bounded, and malformed data yields a
//! [`BtfError`], never a panic.
//!
//! Why by hand, not a BTF crate: the agent needs member offsets of a few
//! structs, nothing else, and parses the file as root; a reader this small
//! is fuzzed whole (`cargo xtask fuzz`, target `btf`), where a general one
//! would bring code paths the agent never uses into that attack surface.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the running kernel exposes its own BTF.
const SYS_FS_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// `btf_header.magic`.
const BTF_MAGIC: u16 = 0xEB9F;
/// The only BTF version there is.
const BTF_VERSION: u8 = 1;
/// Size of `struct btf_header` as first defined; `hdr_len` may be larger.
const HEADER_LEN: usize = 24;
/// Size of `struct btf_type`.
const TYPE_LEN: usize = 12;
/// Size of `struct btf_member`.
const MEMBER_LEN: usize = 12;

/// Longest typedef/modifier chain followed before declaring a cycle.
const MAX_MODIFIER_CHAIN: usize = 64;
/// Deepest nesting of anonymous struct/union members searched.
const MAX_ANON_DEPTH: usize = 32;
/// Most members visited in one member search (guards against hostile
/// fan-out through anonymous members).
const MAX_MEMBER_VISITS: usize = 1 << 20;

/// BTF kinds (`BTF_KIND_*`).
mod kind {
    pub const INT: u32 = 1;
    pub const PTR: u32 = 2;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const FLOAT: u32 = 16;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

fn kind_name(k: u32) -> &'static str {
    match k {
        kind::INT => "int",
        kind::PTR => "pointer",
        kind::ARRAY => "array",
        kind::STRUCT => "struct",
        kind::UNION => "union",
        kind::ENUM => "enum",
        kind::FWD => "forward declaration",
        kind::TYPEDEF => "typedef",
        kind::VOLATILE => "volatile",
        kind::CONST => "const",
        kind::RESTRICT => "restrict",
        kind::FUNC => "function",
        kind::FUNC_PROTO => "function prototype",
        kind::VAR => "variable",
        kind::DATASEC => "data section",
        kind::FLOAT => "float",
        kind::DECL_TAG => "decl tag",
        kind::TYPE_TAG => "type tag",
        kind::ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

/// Why BTF could not be read or a member offset could not be found.
#[derive(Debug)]
#[non_exhaustive]
pub enum BtfError {
    /// The BTF file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The data does not start with the BTF magic number.
    BadMagic {
        /// The first two bytes, read little endian.
        found: u16,
    },
    /// The data is big-endian BTF, which this reader does not handle.
    BigEndian,
    /// The header announces a BTF version this reader does not know.
    UnsupportedVersion {
        /// The version byte.
        version: u8,
    },
    /// The data ends before something it announces.
    Truncated {
        /// What was being read.
        what: String,
        /// Bytes needed (from the start of the data or section).
        needed: u64,
        /// Bytes available.
        available: usize,
    },
    /// The data is inconsistent (bad string offset, unknown kind, cycle, ...).
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// No struct or union (nor typedef of one) has the requested name.
    TypeNotFound {
        /// The requested name.
        name: String,
    },
    /// A struct or union lacks the requested member.
    MemberNotFound {
        /// The searched type, e.g. `struct sock`.
        container: String,
        /// The missing member.
        member: String,
        /// The whole lookup (`type.a.b`) when the path has several steps.
        lookup: String,
    },
    /// A path step names a member whose type has no members.
    NotAStruct {
        /// The member reached so far, as `type.a.b`.
        at: String,
        /// Its (resolved) type, e.g. `int`.
        found: String,
        /// The member that was to be looked up inside it.
        member: String,
    },
    /// The member is a bitfield or otherwise not byte aligned.
    Bitfield {
        /// The containing type, e.g. `struct sock`.
        container: String,
        /// The member.
        member: String,
        /// The whole lookup (`type.a.b`) when the path has several steps.
        lookup: String,
    },
    /// The member path is empty or contains an empty name.
    InvalidPath {
        /// The type the lookup started from.
        type_name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl fmt::Display for BtfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BtfError::Io { path, source } => {
                write!(f, "cannot read BTF from {}: {source}", path.display())
            }
            BtfError::BadMagic { found } => {
                write!(
                    f,
                    "not BTF: magic is {found:#06x}, expected {BTF_MAGIC:#06x}"
                )
            }
            BtfError::BigEndian => write!(f, "big-endian BTF is not supported"),
            BtfError::UnsupportedVersion { version } => {
                write!(
                    f,
                    "unsupported BTF version {version} (expected {BTF_VERSION})"
                )
            }
            BtfError::Truncated {
                what,
                needed,
                available,
            } => write!(
                f,
                "BTF truncated: {what} needs {needed} bytes, only {available} available"
            ),
            BtfError::Malformed { reason } => write!(f, "malformed BTF: {reason}"),
            BtfError::TypeNotFound { name } => {
                write!(f, "BTF has no struct or union named {name}")
            }
            BtfError::MemberNotFound {
                container,
                member,
                lookup,
            } => {
                write!(f, "{container} has no member {member}")?;
                if !lookup.is_empty() {
                    write!(f, " (resolving {lookup})")?;
                }
                Ok(())
            }
            BtfError::NotAStruct { at, found, member } => write!(
                f,
                "{at} is {found}, not a struct or union, so it has no member {member}"
            ),
            BtfError::Bitfield {
                container,
                member,
                lookup,
            } => {
                write!(
                    f,
                    "{member} in {container} is a bitfield (not byte aligned)"
                )?;
                if !lookup.is_empty() {
                    write!(f, " (resolving {lookup})")?;
                }
                Ok(())
            }
            BtfError::InvalidPath { type_name, reason } => {
                write!(f, "invalid member path in {type_name}: {reason}")
            }
        }
    }
}

impl std::error::Error for BtfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BtfError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn malformed(reason: impl Into<String>) -> BtfError {
    BtfError::Malformed {
        reason: reason.into(),
    }
}

/// One `struct btf_type`, plus the little kind-specific data kept.
#[derive(Clone, Copy, Debug)]
struct TypeRec {
    name_off: u32,
    info: u32,
    /// `size` or `type`, depending on the kind.
    size_or_type: u32,
    /// For INT: the encoding word (bits, offset, signedness).
    int_data: u32,
    /// For STRUCT/UNION: index of the first member in `Btf::members`.
    first_member: usize,
}

impl TypeRec {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 != 0
    }

    fn is_composite(&self) -> bool {
        matches!(self.kind(), kind::STRUCT | kind::UNION)
    }
}

/// One `struct btf_member`.
#[derive(Clone, Copy, Debug)]
struct MemberRec {
    name_off: u32,
    type_id: u32,
    offset: u32,
}

/// A member found by [`Btf::find_member`].
#[derive(Clone, Copy, Debug)]
struct Found {
    /// Bit offset from the start of the searched struct.
    bit_offset: u64,
    /// Non-zero for bitfields declared through `kind_flag`.
    bitfield_size: u32,
    type_id: u32,
}

/// Parsed kernel BTF, enough to look up struct member offsets.
#[derive(Debug, Clone)]
pub struct Btf {
    /// The string section.
    strings: Vec<u8>,
    /// Types; type id `n` is at index `n - 1` (id 0 is `void`).
    types: Vec<TypeRec>,
    /// Members of all structs and unions, in order.
    members: Vec<MemberRec>,
}

fn read_u32(buf: &[u8], off: usize) -> Option<u32> {
    let end = off.checked_add(4)?;
    let b: [u8; 4] = buf.get(off..end)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// The section `[hdr_len + off, hdr_len + off + len)` of `bytes`.
fn section<'a>(
    bytes: &'a [u8],
    hdr_len: u32,
    off: u32,
    len: u32,
    what: &str,
) -> Result<&'a [u8], BtfError> {
    let start = u64::from(hdr_len) + u64::from(off);
    let end = start + u64::from(len);
    let truncated = || BtfError::Truncated {
        what: format!("{what} section"),
        needed: end,
        available: bytes.len(),
    };
    let start = usize::try_from(start).map_err(|_| truncated())?;
    let end = usize::try_from(end).map_err(|_| truncated())?;
    bytes.get(start..end).ok_or_else(truncated)
}

impl Btf {
    /// Parse raw BTF bytes (the contents of `/sys/kernel/btf/vmlinux`, or a
    /// `.BTF` ELF section). Only little-endian BTF is accepted.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let header_truncated = || BtfError::Truncated {
            what: "header".to_string(),
            needed: HEADER_LEN as u64,
            available: bytes.len(),
        };
        let magic = match bytes.get(0..2) {
            Some(&[a, b]) => [a, b],
            _ => return Err(header_truncated()),
        };
        if u16::from_le_bytes(magic) != BTF_MAGIC {
            if u16::from_be_bytes(magic) == BTF_MAGIC {
                return Err(BtfError::BigEndian);
            }
            return Err(BtfError::BadMagic {
                found: u16::from_le_bytes(magic),
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(header_truncated());
        }
        let version = bytes.get(2).copied().ok_or_else(header_truncated)?;
        if version != BTF_VERSION {
            return Err(BtfError::UnsupportedVersion { version });
        }
        let field = |off| read_u32(bytes, off).ok_or_else(header_truncated);
        let hdr_len = field(4)?;
        let type_off = field(8)?;
        let type_len = field(12)?;
        let str_off = field(16)?;
        let str_len = field(20)?;
        if (hdr_len as usize) < HEADER_LEN {
            return Err(malformed(format!(
                "header length {hdr_len} is less than {HEADER_LEN}"
            )));
        }
        if hdr_len as usize > bytes.len() {
            return Err(BtfError::Truncated {
                what: "header".to_string(),
                needed: u64::from(hdr_len),
                available: bytes.len(),
            });
        }
        let type_sec = section(bytes, hdr_len, type_off, type_len, "type")?;
        let strings = section(bytes, hdr_len, str_off, str_len, "string")?.to_vec();

        let mut btf = Btf {
            strings,
            types: Vec::new(),
            members: Vec::new(),
        };
        btf.parse_types(type_sec)?;
        Ok(btf)
    }

    /// Read and parse `/sys/kernel/btf/vmlinux`, the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_file(Path::new(SYS_FS_VMLINUX))
    }

    fn from_file(path: &Path) -> Result<Btf, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| BtfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes)
    }

    fn parse_types(&mut self, sec: &[u8]) -> Result<(), BtfError> {
        let mut pos = 0usize;
        while pos < sec.len() {
            let id = self.types.len() + 1;
            let truncated = |needed: usize| BtfError::Truncated {
                what: format!("type id {id} (at type section offset {pos})"),
                needed: needed as u64,
                available: sec.len(),
            };
            let rec_end = pos + TYPE_LEN;
            let (Some(name_off), Some(info), Some(size_or_type)) = (
                read_u32(sec, pos),
                read_u32(sec, pos + 4),
                read_u32(sec, pos + 8),
            ) else {
                return Err(truncated(rec_end));
            };
            let mut rec = TypeRec {
                name_off,
                info,
                size_or_type,
                int_data: 0,
                first_member: self.members.len(),
            };
            self.check_name(name_off, || format!("name of type id {id}"))?;
            let vlen = rec.vlen();
            let extra = match rec.kind() {
                kind::INT => 4,
                kind::ARRAY => 12,
                kind::STRUCT | kind::UNION => vlen * MEMBER_LEN,
                kind::ENUM | kind::FUNC_PROTO => vlen * 8,
                kind::VAR | kind::DECL_TAG => 4,
                kind::DATASEC | kind::ENUM64 => vlen * 12,
                kind::PTR
                | kind::FWD
                | kind::TYPEDEF
                | kind::VOLATILE
                | kind::CONST
                | kind::RESTRICT
                | kind::FUNC
                | kind::FLOAT
                | kind::TYPE_TAG => 0,
                k => {
                    return Err(malformed(format!(
                        "type id {id} has unknown kind {k} (at type section offset {pos})"
                    )))
                }
            };
            let data = rec_end;
            let end = data + extra;
            if end > sec.len() {
                return Err(truncated(end));
            }
            match rec.kind() {
                kind::INT => {
                    rec.int_data = read_u32(sec, data).ok_or_else(|| truncated(end))?;
                }
                kind::STRUCT | kind::UNION => {
                    for i in 0..vlen {
                        let m = data + i * MEMBER_LEN;
                        let (Some(name_off), Some(type_id), Some(offset)) =
                            (read_u32(sec, m), read_u32(sec, m + 4), read_u32(sec, m + 8))
                        else {
                            return Err(truncated(end));
                        };
                        self.check_name(name_off, || {
                            format!("name of member {i} of type id {id}")
                        })?;
                        self.members.push(MemberRec {
                            name_off,
                            type_id,
                            offset,
                        });
                    }
                }
                _ => {}
            }
            self.types.push(rec);
            pos = end;
        }
        Ok(())
    }

    /// Fails unless `off` starts a NUL-terminated string in the string section.
    fn check_name(&self, off: u32, what: impl FnOnce() -> String) -> Result<(), BtfError> {
        if self.name_bytes(off).is_some() {
            Ok(())
        } else {
            Err(malformed(format!(
                "{} has string offset {off}, outside the string section or unterminated",
                what()
            )))
        }
    }

    /// The string at `off`; offset 0 is always the empty string.
    fn name_bytes(&self, off: u32) -> Option<&[u8]> {
        if off == 0 {
            return Some(b"");
        }
        let rest = self.strings.get(usize::try_from(off).ok()?..)?;
        let nul = rest.iter().position(|&b| b == 0)?;
        rest.get(..nul)
    }

    /// The string at `off`; invalid offsets (rejected by `parse`) read as "".
    fn name(&self, off: u32) -> &[u8] {
        self.name_bytes(off).unwrap_or_default()
    }

    /// The type with id `id` (not 0, which is `void`).
    fn get(&self, id: u32) -> Result<&TypeRec, BtfError> {
        usize::try_from(id)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.types.get(i))
            .ok_or_else(|| {
                malformed(format!(
                    "reference to type id {id}, but there are {} types",
                    self.types.len()
                ))
            })
    }

    fn members_of(&self, t: &TypeRec) -> &[MemberRec] {
        self.members
            .get(t.first_member..t.first_member + t.vlen())
            .unwrap_or_default()
    }

    /// Follows typedef, const, volatile, restrict and type tags from `id`.
    /// Returns the id reached (0 for `void`).
    fn resolve(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_MODIFIER_CHAIN {
            if id == 0 {
                return Ok(0);
            }
            let t = self.get(id)?;
            match t.kind() {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "typedef/modifier chain longer than {MAX_MODIFIER_CHAIN} (cycle?) at type id {id}"
        )))
    }

    /// Human-readable description of type `id`, e.g. `struct sock`.
    fn describe(&self, id: u32) -> String {
        if id == 0 {
            return "void".to_string();
        }
        let Ok(t) = self.get(id) else {
            return format!("invalid type id {id}");
        };
        let name = String::from_utf8_lossy(self.name(t.name_off));
        let kind = kind_name(t.kind());
        match t.kind() {
            kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FWD
                if name.is_empty() =>
            {
                format!("anonymous {kind} (type id {id})")
            }
            kind::STRUCT | kind::UNION | kind::ENUM | kind::ENUM64 | kind::FWD => {
                format!("{kind} {name}")
            }
            _ if name.is_empty() => format!("{kind} (type id {id})"),
            kind::INT | kind::FLOAT => name.into_owned(),
            _ => format!("{kind} {name}"),
        }
    }

    /// The id of the struct/union named `name`: a STRUCT/UNION with members
    /// first, then an empty one, then a typedef resolving to a struct/union.
    fn find_composite(&self, name: &str) -> Result<u32, BtfError> {
        let name = name.as_bytes();
        let mut empty = None;
        let mut typedef = None;
        for (i, t) in self.types.iter().enumerate() {
            if self.name(t.name_off) != name {
                continue;
            }
            let Ok(id) = u32::try_from(i + 1) else { break };
            if t.is_composite() {
                if t.vlen() > 0 {
                    return Ok(id);
                }
                empty.get_or_insert(id);
            } else if t.kind() == kind::TYPEDEF && typedef.is_none() {
                if let Ok(r) = self.resolve(id) {
                    if r != 0 && self.get(r).is_ok_and(TypeRec::is_composite) {
                        typedef = Some(r);
                    }
                }
            }
        }
        empty.or(typedef).ok_or_else(|| BtfError::TypeNotFound {
            name: String::from_utf8_lossy(name).into_owned(),
        })
    }

    /// Searches struct/union `id` for member `name`, looking through
    /// anonymous struct/union members as C does.
    fn find_member(
        &self,
        id: u32,
        name: &[u8],
        depth: usize,
        budget: &mut usize,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_ANON_DEPTH {
            return Err(malformed(format!(
                "anonymous members nested deeper than {MAX_ANON_DEPTH} (cycle?) at type id {id}"
            )));
        }
        let t = self.get(id)?;
        for m in self.members_of(t) {
            *budget = budget.checked_sub(1).ok_or_else(|| {
                malformed(format!(
                    "more than {MAX_MEMBER_VISITS} members visited looking through anonymous members"
                ))
            })?;
            let (bit_offset, bitfield_size) = if t.kind_flag() {
                (m.offset & 0x00ff_ffff, m.offset >> 24)
            } else {
                (m.offset, 0)
            };
            let mname = self.name(m.name_off);
            if mname == name {
                return Ok(Some(Found {
                    bit_offset: u64::from(bit_offset),
                    bitfield_size,
                    type_id: m.type_id,
                }));
            }
            if mname.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if inner != 0 && self.get(inner)?.is_composite() {
                    if let Some(mut f) = self.find_member(inner, name, depth + 1, budget)? {
                        f.bit_offset += u64::from(bit_offset);
                        return Ok(Some(f));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Whether a found member is a bitfield encoded the old way (no
    /// `kind_flag`: the member's INT type carries bit size/offset).
    fn is_int_bitfield(&self, type_id: u32) -> Result<bool, BtfError> {
        let r = self.resolve(type_id)?;
        if r == 0 {
            return Ok(false);
        }
        let t = self.get(r)?;
        if t.kind() != kind::INT {
            return Ok(false);
        }
        let bits = t.int_data & 0xff;
        let offset = (t.int_data >> 16) & 0xff;
        Ok(offset != 0 || u64::from(bits) != u64::from(t.size_or_type) * 8)
    }

    /// Byte offset of a member reached through `path` inside struct (or
    /// union) `type_name`.
    ///
    /// Each path element names a member of the type reached so far; members
    /// of anonymous struct/union members are searched transparently (as C
    /// allows: `sock_common`'s fields sit in anonymous unions), and
    /// typedef/const/volatile/restrict/type_tag are resolved when
    /// descending. `type_name` may also be a typedef of a struct or union.
    ///
    /// Errors when the type or a member is missing, when a non-final
    /// member is not a struct/union, when the member is a bitfield (offset
    /// not byte aligned), or when `path` is empty.
    pub fn member_offset(&self, type_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        if path.is_empty() {
            return Err(BtfError::InvalidPath {
                type_name: type_name.to_string(),
                reason: "the path is empty",
            });
        }
        if path.iter().any(|p| p.is_empty()) {
            return Err(BtfError::InvalidPath {
                type_name: type_name.to_string(),
                reason: "empty member name",
            });
        }
        let lookup = if path.len() > 1 {
            format!("{type_name}.{}", path.join("."))
        } else {
            String::new()
        };
        let mut current = self.find_composite(type_name)?;
        let mut total_bits: u64 = 0;
        let mut at = type_name.to_string();
        for (i, member) in path.iter().enumerate() {
            let container = self.describe(current);
            let mut budget = MAX_MEMBER_VISITS;
            let found = self
                .find_member(current, member.as_bytes(), 0, &mut budget)?
                .ok_or_else(|| BtfError::MemberNotFound {
                    container: container.clone(),
                    member: member.to_string(),
                    lookup: lookup.clone(),
                })?;
            if found.bitfield_size != 0
                || found.bit_offset % 8 != 0
                || self.is_int_bitfield(found.type_id)?
            {
                return Err(BtfError::Bitfield {
                    container,
                    member: member.to_string(),
                    lookup,
                });
            }
            total_bits += found.bit_offset;
            at.push('.');
            at.push_str(member);
            if let Some(next) = path.get(i + 1) {
                let r = self.resolve(found.type_id)?;
                if r == 0 || !self.get(r)?.is_composite() {
                    return Err(BtfError::NotAStruct {
                        at,
                        found: self.describe(r),
                        member: next.to_string(),
                    });
                }
                current = r;
            }
        }
        u32::try_from(total_bits / 8)
            .map_err(|_| malformed(format!("offset of {at} does not fit in 32 bits")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds little-endian BTF blobs for tests.
    struct Builder {
        strings: Vec<u8>,
        types: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                strings: vec![0],
                types: Vec::new(),
                next_id: 1,
            }
        }

        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn push_u32(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }

        /// A raw type record; `extra` is the kind-specific data.
        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            flag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name_off = self.string(name);
            self.push_u32(name_off);
            self.push_u32((u32::from(flag) << 31) | (kind << 24) | vlen);
            self.push_u32(st);
            for &e in extra {
                self.push_u32(e);
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        fn int(&mut self, name: &str, size: u32, bits: u32, bit_off: u32) -> u32 {
            self.raw(name, kind::INT, false, 0, size, &[(bit_off << 16) | bits])
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.raw("", kind::PTR, false, 0, target, &[])
        }

        fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.raw(name, kind::TYPEDEF, false, 0, target, &[])
        }

        fn modifier(&mut self, kind: u32, target: u32) -> u32 {
            self.raw("", kind, false, 0, target, &[])
        }

        /// A struct or union; members are (name, type, raw offset word).
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut extra = Vec::new();
            for &(n, t, off) in members {
                extra.extend([self.string(n), t, off]);
            }
            self.raw(name, kind, flag, members.len() as u32, size, &extra)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
            out.extend_from_slice(&0u32.to_le_bytes()); // type_off
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A blob resembling `struct sock` / `struct sock_common`, with every
    /// kind present so that skipping kind-specific data is exercised.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let u32_t = b.int("unsigned int", 4, 32, 0);
        let u16_t = b.int("unsigned short", 2, 16, 0);
        let u8_t = b.int("unsigned char", 1, 8, 0);
        // Kinds with trailing data, to be stepped over.
        b.raw("", kind::ARRAY, false, 0, 0, &[u8_t, u32_t, 16]);
        b.raw("e", kind::ENUM, false, 2, 4, &[0, 1, 0, 2]);
        b.raw("", kind::FUNC_PROTO, false, 1, u32_t, &[0, u32_t]);
        let f = b.raw("f", kind::FUNC, false, 0, 6, &[]);
        let v = b.raw("v", kind::VAR, false, 0, u32_t, &[1]);
        b.raw(".data", kind::DATASEC, false, 1, 4, &[v, 0, 4]);
        b.raw("tag", kind::DECL_TAG, false, 0, f, &[u32::MAX]);
        b.raw("e64", kind::ENUM64, false, 1, 8, &[0, 1, 2]);
        b.raw("double", kind::FLOAT, false, 0, 8, &[]);
        b.raw("net", kind::FWD, false, 0, 0, &[]);
        b.raw("sock", kind::STRUCT, false, 0, 0, &[]); // empty duplicate
        let type_tag = b.modifier(kind::TYPE_TAG, u32_t);

        // struct ns_common { unsigned int pad; unsigned int inum; }
        let ns_common = b.composite(
            kind::STRUCT,
            "ns_common",
            8,
            false,
            &[("pad", u32_t, 0), ("inum", type_tag, 32)],
        );
        // struct net { u64 x; struct ns_common ns; }
        let net = b.composite(
            kind::STRUCT,
            "net",
            16,
            false,
            &[("x", u32_t, 0), ("ns", ns_common, 64)],
        );
        let net_ptr = b.ptr(net);
        // typedef struct { struct net *net; } possible_net_t;
        let anon_net = b.composite(kind::STRUCT, "", 8, false, &[("net", net_ptr, 0)]);
        let possible_net_t = b.typedef("possible_net_t", anon_net);
        // A typedef chain: typedef const volatile typedef possible_net_t.
        let c = b.modifier(kind::CONST, possible_net_t);
        let vo = b.modifier(kind::VOLATILE, c);
        let re = b.modifier(kind::RESTRICT, vo);
        let net_chain = b.typedef("net_chain_t", re);
        // Anonymous struct inside an anonymous union:
        // union { u64 addrpair; struct { u32 daddr; u32 rcv_saddr; }; };
        let anon_inner = b.composite(
            kind::STRUCT,
            "",
            8,
            false,
            &[("skc_daddr", u32_t, 0), ("skc_rcv_saddr", u32_t, 32)],
        );
        let anon_union = b.composite(
            kind::UNION,
            "",
            8,
            false,
            &[("skc_addrpair", u32_t, 0), ("", anon_inner, 0)],
        );
        // struct sock_common with a kind_flag bitfield member.
        let sock_common = b.composite(
            kind::STRUCT,
            "sock_common",
            64,
            true,
            &[
                ("", anon_union, 0),
                ("skc_family", u16_t, 128),
                ("skc_reuse", u8_t, (4 << 24) | 144),
                ("skc_net", possible_net_t, 192),
                ("skc_net2", net_chain, 256),
            ],
        );
        // struct sock { struct sock_common __sk_common; u8 old_bf (int bitfield); }
        let old_bf = b.int("unsigned char", 1, 3, 0);
        b.composite(
            kind::STRUCT,
            "sock",
            72,
            false,
            &[
                ("__sk_common", sock_common, 0),
                ("sk_old_bf", old_bf, 512),
                ("sk_unaligned", u8_t, 516),
                ("sk_val", u32_t, 544),
            ],
        );
        // A typedef naming a struct directly.
        b.typedef("sock_t", 0);
        b.build()
    }

    fn sample_btf() -> Btf {
        Btf::parse(&sample()).expect("sample parses")
    }

    #[test]
    fn plain_and_nested_members() {
        let btf = sample_btf();
        assert_eq!(btf.member_offset("sock", &["sk_val"]).unwrap(), 68);
        assert_eq!(btf.member_offset("sock", &["__sk_common"]).unwrap(), 0);
        assert_eq!(
            btf.member_offset("sock", &["__sk_common", "skc_family"])
                .unwrap(),
            16
        );
        assert_eq!(btf.member_offset("net", &["ns", "inum"]).unwrap(), 12);
    }

    #[test]
    fn anonymous_union_members_are_transparent() {
        let btf = sample_btf();
        assert_eq!(
            btf.member_offset("sock_common", &["skc_addrpair"]).unwrap(),
            0
        );
        assert_eq!(
            btf.member_offset("sock_common", &["skc_rcv_saddr"])
                .unwrap(),
            4
        );
        assert_eq!(
            btf.member_offset("sock", &["__sk_common", "skc_rcv_saddr"])
                .unwrap(),
            4
        );
    }

    #[test]
    fn typedef_chain_is_resolved() {
        let btf = sample_btf();
        assert_eq!(
            btf.member_offset("sock", &["__sk_common", "skc_net", "net"])
                .unwrap(),
            24
        );
        assert_eq!(
            btf.member_offset("sock", &["__sk_common", "skc_net2", "net"])
                .unwrap(),
            32
        );
        // A typedef of a struct is accepted as the starting type.
        assert_eq!(btf.member_offset("possible_net_t", &["net"]).unwrap(), 0);
    }

    #[test]
    fn bitfields_are_rejected() {
        let btf = sample_btf();
        for path in [
            &["__sk_common", "skc_reuse"][..],
            &["sk_old_bf"][..],
            &["sk_unaligned"][..],
        ] {
            let e = btf.member_offset("sock", path).unwrap_err();
            assert!(matches!(e, BtfError::Bitfield { .. }), "{path:?}: {e}");
            eprintln!("{path:?}: {e}");
        }
    }

    #[test]
    fn missing_things_are_reported() {
        let btf = sample_btf();
        let e = btf.member_offset("sock", &["skc_net"]).unwrap_err();
        assert!(matches!(e, BtfError::MemberNotFound { .. }));
        assert_eq!(e.to_string(), "struct sock has no member skc_net");

        let e = btf
            .member_offset("sock", &["__sk_common", "nope"])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "struct sock_common has no member nope (resolving sock.__sk_common.nope)"
        );

        let e = btf.member_offset("nosuch", &["x"]).unwrap_err();
        assert!(matches!(e, BtfError::TypeNotFound { .. }));
        assert_eq!(e.to_string(), "BTF has no struct or union named nosuch");

        // Only a FWD and a void typedef carry these names.
        assert!(matches!(
            btf.member_offset("sock_t", &["x"]),
            Err(BtfError::TypeNotFound { .. })
        ));

        let e = btf.member_offset("sock", &["sk_val", "x"]).unwrap_err();
        assert!(matches!(e, BtfError::NotAStruct { .. }));
        eprintln!("{e}");

        assert!(matches!(
            btf.member_offset("sock", &[]),
            Err(BtfError::InvalidPath { .. })
        ));
        assert!(matches!(
            btf.member_offset("sock", &[""]),
            Err(BtfError::InvalidPath { .. })
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let blob = sample();
        for len in 0..blob.len() {
            // The header's lengths always reach the end, so every proper
            // prefix is truncated.
            assert!(Btf::parse(&blob[..len]).is_err(), "prefix {len} parsed");
        }
        assert!(Btf::parse(&blob).is_ok());
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        // Flip each byte of the type section and header to a few values;
        // parsing and lookups must return, Ok or Err.
        let blob = sample();
        for i in 0..blob.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = blob.clone();
                b[i] = v;
                if let Ok(btf) = Btf::parse(&b) {
                    let _ = btf.member_offset("sock", &["__sk_common", "skc_net", "net"]);
                    let _ = btf.member_offset("sock_common", &["skc_rcv_saddr"]);
                    let _ = btf.member_offset("net", &["ns", "inum"]);
                }
            }
        }
    }

    #[test]
    fn cycles_are_errors() {
        let mut b = Builder::new();
        // typedef loop: id 1 -> id 2 -> id 1
        b.typedef("a_t", 2);
        b.typedef("b_t", 1);
        // struct whose anonymous member is itself.
        b.composite(kind::STRUCT, "loop", 4, false, &[("", 3, 0)]);
        b.composite(kind::STRUCT, "holder", 4, false, &[("x", 1, 0)]);
        let btf = Btf::parse(&b.build()).unwrap();
        assert!(matches!(
            btf.member_offset("loop", &["x"]),
            Err(BtfError::Malformed { .. })
        ));
        assert!(matches!(
            btf.member_offset("holder", &["x", "y"]),
            Err(BtfError::Malformed { .. })
        ));
    }

    #[test]
    fn bad_magic_and_endianness() {
        let mut blob = sample();
        blob[0] = 0x12;
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BadMagic { .. })));
        let mut blob = sample();
        blob.swap(0, 1);
        assert!(matches!(Btf::parse(&blob), Err(BtfError::BigEndian)));
        let mut blob = sample();
        blob[2] = 2;
        assert!(matches!(
            Btf::parse(&blob),
            Err(BtfError::UnsupportedVersion { version: 2 })
        ));
        assert!(Btf::parse(b"").is_err());
        assert!(Btf::parse(b"not btf at all, clearly").is_err());
    }

    #[test]
    fn header_longer_than_24_bytes() {
        let blob = sample();
        let mut long = blob[..24].to_vec();
        long[4..8].copy_from_slice(&32u32.to_le_bytes());
        long.extend_from_slice(&[0; 8]);
        long.extend_from_slice(&blob[24..]);
        let btf = Btf::parse(&long).unwrap();
        assert_eq!(btf.member_offset("sock", &["sk_val"]).unwrap(), 68);
    }

    #[test]
    fn real_kernel_offsets() {
        let path = Path::new(SYS_FS_VMLINUX);
        if !path.exists() {
            eprintln!("{SYS_FS_VMLINUX} absent; skipping");
            return;
        }
        let btf = Btf::from_sys_fs().expect("kernel BTF parses");
        eprintln!("kernel BTF: {} types", btf.types.len());
        let cases: &[(&str, &[&str], Option<u32>)] = &[
            ("sock", &["__sk_common", "skc_net", "net"], None),
            // skc_addrpair (8) + skc_hash (4) + skc_portpair (4).
            ("sock", &["__sk_common", "skc_family"], Some(16)),
            ("net", &["ns", "inum"], None),
            ("task_struct", &["files"], None),
            ("files_struct", &["fdt"], None),
            // struct fdtable { unsigned int max_fds; struct file **fd; ... }
            ("fdtable", &["max_fds"], Some(0)),
            ("fdtable", &["fd"], Some(8)),
            ("file", &["private_data"], None),
            ("socket", &["sk"], None),
        ];
        for &(ty, path, expected) in cases {
            let off = btf
                .member_offset(ty, path)
                .unwrap_or_else(|e| panic!("{ty}.{}: {e}", path.join(".")));
            eprintln!("{ty}.{} = {off}", path.join("."));
            assert!(
                off < 8192,
                "{ty}.{}: implausible offset {off}",
                path.join(".")
            );
            if let Some(x) = expected {
                assert_eq!(off, x, "{ty}.{}", path.join("."));
            }
        }
        // Member order sanity: skc_net lies after skc_family in sock_common.
        let family = btf
            .member_offset("sock", &["__sk_common", "skc_family"])
            .unwrap();
        let net = btf
            .member_offset("sock", &["__sk_common", "skc_net"])
            .unwrap();
        assert!(net > family);
        let e = btf.member_offset("sock", &["skc_nope"]).unwrap_err();
        assert_eq!(e.to_string(), "struct sock has no member skc_nope");
    }
}
