//! Reader for the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The daemon reads kernel memory with `bpf_probe_read_kernel`, so it must
//! know struct layouts and enum numbering of *this* kernel rather than of
//! the headers it was built against. aya parses BTF too but keeps the
//! lookups we need private, so this is a deliberately small parser that
//! answers exactly two questions: where is a member (and how big), and what
//! are an enum's value names.
//!
//! The input is untrusted in the sense that a truncated or corrupt file must
//! produce an error: every read is bounds-checked, allocations are bounded by
//! the input size, and type graph walks are depth-limited so that a cyclic
//! (hostile) type graph cannot recurse forever.
//!
//! Format reference: the kernel's `Documentation/bpf/btf.rst`.

use std::{
    collections::HashMap,
    fmt,
    fs::File,
    io::Read as _,
    ops::Range,
    path::{Path, PathBuf},
};

/// Where the kernel exports its own BTF.
pub const SYS_FS_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// vmlinux BTF is ~5-6 MB today; the cap only exists so that pointing the
/// daemon at something like `/dev/zero` fails instead of eating memory.
const MAX_FILE_LEN: u64 = 256 << 20;

const MAGIC: u16 = 0xEB9F;
const SUPPORTED_VERSION: u8 = 1;
/// `struct btf_header`; newer kernels may append fields, hence `hdr_len`.
const MIN_HEADER_LEN: usize = 24;
/// `struct btf_type`: name_off, info, size/type.
const TYPE_HEADER_LEN: usize = 12;
/// Real kernels nest a handful of levels; anything deeper is a cycle or an
/// attack, and bounding it keeps recursion off the danger zone.
const MAX_DEPTH: usize = 64;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        0 => "void",
        KIND_INT => "int",
        KIND_PTR => "pointer",
        KIND_ARRAY => "array",
        KIND_STRUCT => "struct",
        KIND_UNION => "union",
        KIND_ENUM => "enum",
        KIND_FWD => "forward declaration",
        KIND_TYPEDEF => "typedef",
        KIND_VOLATILE => "volatile",
        KIND_CONST => "const",
        KIND_RESTRICT => "restrict",
        KIND_FUNC => "function",
        KIND_FUNC_PROTO => "function prototype",
        KIND_VAR => "variable",
        KIND_DATASEC => "data section",
        KIND_FLOAT => "float",
        KIND_DECL_TAG => "decl tag",
        KIND_TYPE_TAG => "type tag",
        KIND_ENUM64 => "enum64",
        _ => "unknown kind",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading BTF from {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("BTF file {} is larger than {limit} bytes", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("bad BTF magic {found:#06x} (expected {MAGIC:#06x})")]
    BadMagic { found: u16 },
    #[error("BTF is big-endian; only little-endian BTF is supported")]
    BigEndian,
    #[error("unsupported BTF version {0} (expected {SUPPORTED_VERSION})")]
    UnsupportedVersion(u8),
    #[error("truncated BTF: {what} needs bytes {start}..{end}, but the data ends at byte {limit}")]
    Truncated {
        what: &'static str,
        start: u64,
        end: u64,
        limit: u64,
    },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("unknown BTF kind {kind} at type id {id}")]
    UnknownKind { kind: u32, id: u32 },
    #[error("BTF type id {0} is out of range")]
    TypeIdOutOfRange(u32),
    #[error("invalid BTF string at offset {0}")]
    BadString(u32),
    #[error("BTF type chain starting at type id {0} is too deep (cyclic?)")]
    TooDeep(u32),
    #[error("invalid member path `{0}` (expected `type.member[.member...]`)")]
    BadPath(String),
    #[error("type not found `{kind} {name}`")]
    TypeNotFound { kind: &'static str, name: String },
    #[error("member not found `{0}`")]
    MemberNotFound(String),
    #[error("member `{0}` is a bitfield")]
    Bitfield(String),
    #[error("member `{path}` is at bit offset {bit_offset}, which is not byte aligned")]
    Unaligned { path: String, bit_offset: u64 },
    #[error(
        "member `{path}` is a {kind}, not a struct or union, so `{next}` cannot be looked up in it"
    )]
    NotComposite {
        path: String,
        kind: &'static str,
        next: String,
    },
    #[error("member `{path}` has type of kind {kind}, which has no size")]
    NoSize { path: String, kind: &'static str },
    #[error("`{0}` is ambiguous: several kernel types of that name disagree")]
    Ambiguous(String),
}

/// Decoded `struct btf_type` plus where its kind-specific data starts.
#[derive(Clone, Copy)]
struct Ty {
    name_off: u32,
    info: u32,
    /// `size` for sized kinds, `type` for reference kinds.
    size_or_type: u32,
    /// Absolute offset into `KernelBtf::bytes` of the trailing data.
    data: usize,
}

impl Ty {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }

    fn is_composite(&self) -> bool {
        matches!(self.kind(), KIND_STRUCT | KIND_UNION)
    }
}

/// A struct/union member with the kind_flag encoding already undone.
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield_size: u32,
}

/// Result of finding a member, offset relative to the searched composite.
struct Found {
    bit_offset: u64,
    type_id: u32,
    bitfield: bool,
}

pub struct KernelBtf {
    bytes: Vec<u8>,
    /// Absolute range of the string section within `bytes`.
    strs: Range<usize>,
    /// Indexed by type id; id 0 is the implicit `void`.
    types: Vec<Ty>,
    /// Struct, union, enum, enum64 and typedef names to type ids. Names are
    /// not unique in vmlinux BTF (different compilation units may define
    /// different `struct console`s), hence a list.
    by_name: HashMap<String, Vec<u32>>,
    /// BTF does not record pointer width; `long` has the same width on every
    /// Linux ABI, so it is taken from the kernel's own `long` type.
    ptr_size: u32,
}

impl fmt::Debug for KernelBtf {
    // The raw bytes are megabytes of noise in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelBtf")
            .field("len", &self.bytes.len())
            .field("types", &self.types.len())
            .field("names", &self.by_name.len())
            .finish()
    }
}

fn read_u16(bytes: &[u8], off: usize) -> Option<u16> {
    let b = bytes.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes(b.try_into().ok()?))
}

fn read_u32(bytes: &[u8], off: usize) -> Option<u32> {
    let b = bytes.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

fn truncated(what: &'static str, start: u64, len: u64, limit: usize) -> BtfError {
    BtfError::Truncated {
        what,
        start,
        end: start.saturating_add(len),
        limit: limit as u64,
    }
}

/// Raw NUL-terminated string at `off` in the string section. A free
/// function so the parser can borrow the bytes while filling the index.
fn name_bytes<'a>(bytes: &'a [u8], strs: &Range<usize>, off: u32) -> Result<&'a [u8], BtfError> {
    let strs = bytes.get(strs.clone()).ok_or(BtfError::BadString(off))?;
    let tail = strs.get(off as usize..).ok_or(BtfError::BadString(off))?;
    let end = tail
        .iter()
        .position(|&b| b == 0)
        .ok_or(BtfError::BadString(off))?;
    tail.get(..end).ok_or(BtfError::BadString(off))
}

fn str_at<'a>(bytes: &'a [u8], strs: &Range<usize>, off: u32) -> Result<&'a str, BtfError> {
    std::str::from_utf8(name_bytes(bytes, strs, off)?).map_err(|_| BtfError::BadString(off))
}

/// Absolute range of a header-described section, checked against the file.
fn section(
    what: &'static str,
    hdr_len: usize,
    off: u32,
    len: u32,
    file_len: usize,
) -> Result<Range<usize>, BtfError> {
    // u64 so that hostile offsets cannot overflow on any target.
    let start = hdr_len as u64 + u64::from(off);
    let end = start + u64::from(len);
    if end > file_len as u64 {
        return Err(truncated(what, start, u64::from(len), file_len));
    }
    // Both fit in usize because they are <= file_len.
    Ok(start as usize..end as usize)
}

impl KernelBtf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(SYS_FS_VMLINUX))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let io_err = |source| BtfError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut bytes = Vec::new();
        // sysfs reports a size but a regular read to EOF is what is
        // guaranteed to work; `take` bounds it for non-regular files.
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(BtfError::TooLarge {
                path: path.to_owned(),
                limit: MAX_FILE_LEN,
            });
        }
        Self::parse(bytes)
    }

    pub fn parse(bytes: Vec<u8>) -> Result<Self, BtfError> {
        let file_len = bytes.len();
        let hdr = |off: usize| read_u32(&bytes, off);
        let magic = read_u16(&bytes, 0).ok_or_else(|| truncated("header", 0, 2, file_len))?;
        if magic != MAGIC {
            return Err(if magic == MAGIC.swap_bytes() {
                BtfError::BigEndian
            } else {
                BtfError::BadMagic { found: magic }
            });
        }
        let fixed = || truncated("header", 0, MIN_HEADER_LEN as u64, file_len);
        let version = *bytes.get(2).ok_or_else(fixed)?;
        if version != SUPPORTED_VERSION {
            return Err(BtfError::UnsupportedVersion(version));
        }
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (hdr(4), hdr(8), hdr(12), hdr(16), hdr(20))
        else {
            return Err(fixed());
        };
        if (hdr_len as usize) < MIN_HEADER_LEN {
            return Err(BtfError::Malformed(format!(
                "header length {hdr_len} is shorter than {MIN_HEADER_LEN}"
            )));
        }
        if u64::from(hdr_len) > file_len as u64 {
            return Err(truncated("header", 0, u64::from(hdr_len), file_len));
        }
        let hdr_len = hdr_len as usize;
        let type_sec = section("type section", hdr_len, type_off, type_len, file_len)?;
        let str_sec = section("string section", hdr_len, str_off, str_len, file_len)?;
        if type_sec.start < str_sec.end && str_sec.start < type_sec.end {
            return Err(BtfError::Malformed(
                "type and string sections overlap".into(),
            ));
        }
        // Offset 0 must be the empty string (anonymous names point there) and
        // a trailing NUL guarantees every string terminates inside the section.
        let strings = bytes.get(str_sec.clone()).unwrap_or_default();
        if strings.first() != Some(&0) || strings.last() != Some(&0) {
            return Err(BtfError::Malformed(
                "string section must start and end with NUL".into(),
            ));
        }

        let mut btf = KernelBtf {
            strs: str_sec,
            // Bounded by the input: every type record is at least 12 bytes.
            types: Vec::with_capacity(type_sec.len() / TYPE_HEADER_LEN + 1),
            by_name: HashMap::new(),
            ptr_size: std::mem::size_of::<usize>() as u32,
            bytes,
        };
        btf.types.push(Ty {
            name_off: 0,
            info: 0,
            size_or_type: 0,
            data: type_sec.start,
        });
        let mut long_size = None;
        let mut pos = type_sec.start;
        while pos < type_sec.end {
            let id = u32::try_from(btf.types.len())
                .map_err(|_| BtfError::Malformed("too many types".into()))?;
            let remaining = type_sec.end - pos;
            if remaining < TYPE_HEADER_LEN {
                return Err(truncated(
                    "type record",
                    pos as u64,
                    TYPE_HEADER_LEN as u64,
                    type_sec.end,
                ));
            }
            let word = |off| {
                read_u32(&btf.bytes, off)
                    .ok_or_else(|| truncated("type record", off as u64, 4, file_len))
            };
            let ty = Ty {
                name_off: word(pos)?,
                info: word(pos + 4)?,
                size_or_type: word(pos + 8)?,
                data: pos + TYPE_HEADER_LEN,
            };
            let vlen = ty.vlen();
            let trailing = match ty.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                kind => return Err(BtfError::UnknownKind { kind, id }),
            };
            if remaining - TYPE_HEADER_LEN < trailing {
                return Err(truncated(
                    "type data",
                    ty.data as u64,
                    trailing as u64,
                    type_sec.end,
                ));
            }
            match ty.kind() {
                KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_TYPEDEF
                    if ty.name_off != 0 =>
                {
                    let name = str_at(&btf.bytes, &btf.strs, ty.name_off)?;
                    match btf.by_name.get_mut(name) {
                        Some(ids) => ids.push(id),
                        None => {
                            btf.by_name.insert(name.to_owned(), vec![id]);
                        }
                    }
                }
                KIND_INT
                    if long_size.is_none()
                        && name_bytes(&btf.bytes, &btf.strs, ty.name_off)? == b"long int" =>
                {
                    long_size = Some(ty.size_or_type);
                }
                _ => {}
            }
            btf.types.push(ty);
            pos = ty.data + trailing;
        }
        if let Some(size) = long_size {
            btf.ptr_size = size;
        }
        Ok(btf)
    }

    /// Byte offset of the member named by `path` (`"sk_buff.network_header"`,
    /// `"net_device.nd_net.net"`), counted from the start of the outermost
    /// struct. Members of anonymous structs/unions are found as if they were
    /// direct members, as C sees them.
    pub fn member_offset(&self, path: &str) -> Result<u32, BtfError> {
        self.resolve_unique(path, |_, offset| Ok(offset))
    }

    /// Size in bytes of the member's type with typedefs and qualifiers
    /// stripped.
    pub fn member_size(&self, path: &str) -> Result<u32, BtfError> {
        self.resolve_unique(path, |type_id, _| self.type_size(type_id, path))
    }

    /// Value names and numbers of `enum name` (ENUM or ENUM64), in
    /// declaration order. Unsigned 64-bit values above `i64::MAX` are
    /// returned with their bits reinterpreted as `i64`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let not_found = || BtfError::TypeNotFound {
            kind: "enum",
            name: name.to_owned(),
        };
        let mut chosen: Option<Vec<(String, i64)>> = None;
        for &id in self.by_name.get(name).ok_or_else(not_found)? {
            let ty = self.ty(id)?;
            if !matches!(ty.kind(), KIND_ENUM | KIND_ENUM64) {
                continue;
            }
            let values = self.read_enum(ty, name)?;
            // An empty ENUM is how BTF spells a forward declaration, so it
            // neither conflicts with nor wins over a full definition.
            let replace = match &chosen {
                None => true,
                Some(prev) if values.is_empty() || *prev == values => false,
                Some(prev) if prev.is_empty() => true,
                Some(_) => return Err(BtfError::Ambiguous(format!("enum {name}"))),
            };
            if replace {
                chosen = Some(values);
            }
        }
        chosen.ok_or_else(not_found)
    }

    fn read_enum(&self, ty: Ty, name: &str) -> Result<Vec<(String, i64)>, BtfError> {
        let signed = ty.kind_flag();
        let is64 = ty.kind() == KIND_ENUM64;
        let stride = if is64 { 12 } else { 8 };
        let mut out = Vec::with_capacity(ty.vlen());
        for i in 0..ty.vlen() {
            let at = ty.data + i * stride;
            let name_off = self.word(at)?;
            let lo = self.word(at + 4)?;
            let value = if is64 {
                let raw = u64::from(self.word(at + 8)?) << 32 | u64::from(lo);
                // Bit reinterpretation is intended for unsigned values above
                // i64::MAX: the caller wants names, and no bits are lost.
                raw as i64
            } else if signed {
                i64::from(lo as i32)
            } else {
                i64::from(lo)
            };
            let value_name = self.str_at(name_off)?;
            if value_name.is_empty() {
                return Err(BtfError::Malformed(format!(
                    "enum {name} has a value without a name"
                )));
            }
            out.push((value_name.to_owned(), value));
        }
        Ok(out)
    }

    /// Resolves `path` against every composite of the root's name and
    /// insists they agree, because picking one arbitrarily could hand the
    /// BPF side a wrong offset without any error.
    fn resolve_unique<T: PartialEq>(
        &self,
        path: &str,
        finish: impl Fn(u32, u32) -> Result<T, BtfError>,
    ) -> Result<T, BtfError> {
        let segments: Vec<&str> = path.split('.').collect();
        let Some((root, members)) = segments.split_first() else {
            return Err(BtfError::BadPath(path.to_owned()));
        };
        if members.is_empty() || segments.iter().any(|s| s.is_empty()) {
            return Err(BtfError::BadPath(path.to_owned()));
        }
        let roots = self.composite_roots(root)?;
        let mut result: Option<T> = None;
        let mut first_err = None;
        for root_id in roots {
            match self
                .walk(root_id, path, members)
                .and_then(|(type_id, offset)| finish(type_id, offset))
            {
                Ok(value) => match &result {
                    Some(prev) if *prev != value => {
                        return Err(BtfError::Ambiguous(path.to_owned()))
                    }
                    Some(_) => {}
                    None => result = Some(value),
                },
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match (result, first_err) {
            (Some(value), _) => Ok(value),
            (None, Some(e)) => Err(e),
            (None, None) => Err(BtfError::TypeNotFound {
                kind: "struct",
                name: (*root).to_owned(),
            }),
        }
    }

    /// Type ids a path root may refer to: structs, then unions, then
    /// typedefs of either (e.g. `possible_net_t`).
    fn composite_roots(&self, name: &str) -> Result<Vec<u32>, BtfError> {
        let ids = self.by_name.get(name).map(Vec::as_slice).unwrap_or(&[]);
        for kind in [KIND_STRUCT, KIND_UNION] {
            let mut found = Vec::new();
            for &id in ids {
                if self.ty(id)?.kind() == kind {
                    found.push(id);
                }
            }
            if !found.is_empty() {
                return Ok(found);
            }
        }
        let mut found = Vec::new();
        for &id in ids {
            if self.ty(id)?.kind() == KIND_TYPEDEF {
                let (target, ty) = self.skip_modifiers(id)?;
                if ty.is_composite() {
                    found.push(target);
                }
            }
        }
        if found.is_empty() {
            return Err(BtfError::TypeNotFound {
                kind: "struct",
                name: name.to_owned(),
            });
        }
        Ok(found)
    }

    /// Returns the final member's type id and byte offset.
    fn walk(&self, root: u32, path: &str, members: &[&str]) -> Result<(u32, u32), BtfError> {
        let mut composite = root;
        let mut bit_offset: u64 = 0;
        // Length of `path` up to and including the current segment, so that
        // errors name exactly the part that failed.
        let mut prefix_len = path.len() - members.iter().map(|m| m.len() + 1).sum::<usize>();
        let prefix = |len: usize| path.get(..len).unwrap_or(path).to_owned();
        for (i, name) in members.iter().enumerate() {
            prefix_len += 1 + name.len();
            let found = self
                .find_member(composite, name, 0)?
                .ok_or_else(|| BtfError::MemberNotFound(prefix(prefix_len)))?;
            if found.bitfield {
                return Err(BtfError::Bitfield(prefix(prefix_len)));
            }
            // Saturating: an absurd sum then fails the u32 conversion below
            // instead of overflowing.
            bit_offset = bit_offset.saturating_add(found.bit_offset);
            let Some(next) = members.get(i + 1) else {
                if !bit_offset.is_multiple_of(8) {
                    return Err(BtfError::Unaligned {
                        path: prefix(prefix_len),
                        bit_offset,
                    });
                }
                let bytes = u32::try_from(bit_offset / 8).map_err(|_| {
                    BtfError::Malformed(format!("offset of `{path}` does not fit in u32"))
                })?;
                return Ok((found.type_id, bytes));
            };
            let (id, ty) = self.skip_modifiers(found.type_id)?;
            if !ty.is_composite() {
                return Err(BtfError::NotComposite {
                    path: prefix(prefix_len),
                    kind: kind_name(ty.kind()),
                    next: (*next).to_owned(),
                });
            }
            composite = id;
        }
        // `members` is non-empty, so the loop always returns.
        Err(BtfError::BadPath(path.to_owned()))
    }

    /// Looks for `name` among the members of `composite`, descending into
    /// anonymous struct/union members the way C name lookup does.
    fn find_member(
        &self,
        composite: u32,
        name: &str,
        depth: usize,
    ) -> Result<Option<Found>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(BtfError::TooDeep(composite));
        }
        let ty = self.ty(composite)?;
        for i in 0..ty.vlen() {
            let m = self.member(ty, i)?;
            if m.name_off != 0 {
                if self.name_bytes(m.name_off)? == name.as_bytes() {
                    let bitfield = m.bitfield_size != 0 || self.is_int_bitfield(m.type_id)?;
                    return Ok(Some(Found {
                        bit_offset: u64::from(m.bit_offset),
                        type_id: m.type_id,
                        bitfield,
                    }));
                }
                continue;
            }
            let (inner, inner_ty) = self.skip_modifiers(m.type_id)?;
            if inner_ty.is_composite() {
                if let Some(mut found) = self.find_member(inner, name, depth + 1)? {
                    found.bit_offset = found.bit_offset.saturating_add(u64::from(m.bit_offset));
                    return Ok(Some(found));
                }
            }
        }
        Ok(None)
    }

    /// Without kind_flag, BTF encodes bitfields as members whose INT type
    /// has fewer bits than its storage (or a bit offset), so both encodings
    /// must be checked.
    fn is_int_bitfield(&self, type_id: u32) -> Result<bool, BtfError> {
        let (_, ty) = self.skip_modifiers(type_id)?;
        if ty.kind() != KIND_INT {
            return Ok(false);
        }
        let encoding = self.word(ty.data)?;
        let bits = encoding & 0xff;
        let offset = (encoding >> 16) & 0xff;
        Ok(offset != 0 || u64::from(bits) != u64::from(ty.size_or_type) * 8)
    }

    fn member(&self, composite: Ty, index: usize) -> Result<Member, BtfError> {
        let at = composite.data + index * 12;
        let raw_offset = self.word(at + 8)?;
        let (bit_offset, bitfield_size) = if composite.kind_flag() {
            (raw_offset & 0x00ff_ffff, raw_offset >> 24)
        } else {
            (raw_offset, 0)
        };
        Ok(Member {
            name_off: self.word(at)?,
            type_id: self.word(at + 4)?,
            bit_offset,
            bitfield_size,
        })
    }

    fn type_size(&self, type_id: u32, path: &str) -> Result<u32, BtfError> {
        let overflow = || BtfError::Malformed(format!("size of `{path}` overflows"));
        let mut elements: u32 = 1;
        let mut id = type_id;
        for _ in 0..MAX_DEPTH {
            let (_, ty) = self.skip_modifiers(id)?;
            let unit = match ty.kind() {
                KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                    ty.size_or_type
                }
                KIND_PTR => self.ptr_size,
                KIND_ARRAY => {
                    let nelems = self.word(ty.data + 8)?;
                    elements = elements.checked_mul(nelems).ok_or_else(overflow)?;
                    id = self.word(ty.data)?;
                    continue;
                }
                kind => {
                    return Err(BtfError::NoSize {
                        path: path.to_owned(),
                        kind: kind_name(kind),
                    })
                }
            };
            return elements.checked_mul(unit).ok_or_else(overflow);
        }
        Err(BtfError::TooDeep(type_id))
    }

    /// Follows typedef/qualifier/type-tag links to the underlying type.
    fn skip_modifiers(&self, type_id: u32) -> Result<(u32, Ty), BtfError> {
        let mut id = type_id;
        for _ in 0..MAX_DEPTH {
            let ty = self.ty(id)?;
            match ty.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok((id, ty)),
            }
        }
        Err(BtfError::TooDeep(type_id))
    }

    fn ty(&self, id: u32) -> Result<Ty, BtfError> {
        self.types
            .get(id as usize)
            .copied()
            .ok_or(BtfError::TypeIdOutOfRange(id))
    }

    /// Reads kind-specific data; the parser already bounds-checked it, so a
    /// failure here means an internal inconsistency, reported not panicked.
    fn word(&self, at: usize) -> Result<u32, BtfError> {
        read_u32(&self.bytes, at)
            .ok_or_else(|| truncated("type data", at as u64, 4, self.bytes.len()))
    }

    /// Comparing raw bytes avoids UTF-8 validation in the hot member-lookup
    /// loop.
    fn name_bytes(&self, off: u32) -> Result<&[u8], BtfError> {
        name_bytes(&self.bytes, &self.strs, off)
    }

    fn str_at(&self, off: u32) -> Result<&str, BtfError> {
        str_at(&self.bytes, &self.strs, off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Assembles BTF the way the kernel lays it out, so tests can describe
    /// types symbolically and get real bytes.
    struct Blob {
        types: Vec<u8>,
        strs: Vec<u8>,
        next_id: u32,
        /// Byte offsets within the type section where records start.
        boundaries: Vec<usize>,
    }

    /// kind_flag member offset encoding.
    fn bf(bit_offset: u32, bits: u32) -> u32 {
        bits << 24 | bit_offset
    }

    impl Blob {
        fn new() -> Self {
            Blob {
                types: Vec::new(),
                strs: vec![0],
                next_id: 1,
                boundaries: vec![0],
            }
        }

        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strs.len() as u32;
            self.strs.extend_from_slice(name.as_bytes());
            self.strs.push(0);
            off
        }

        fn raw(
            &mut self,
            name: &str,
            kind: u32,
            kind_flag: bool,
            vlen: u32,
            size_or_type: u32,
            data: &[u32],
        ) -> u32 {
            let name_off = self.s(name);
            let info = u32::from(kind_flag) << 31 | kind << 24 | vlen;
            for w in [name_off, info, size_or_type].iter().chain(data) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.boundaries.push(self.types.len());
            self.next_id += 1;
            self.next_id - 1
        }

        fn int(&mut self, name: &str, size: u32, bits: u32) -> u32 {
            self.raw(name, KIND_INT, false, 0, size, &[bits])
        }

        fn ptr(&mut self, target: u32) -> u32 {
            self.raw("", KIND_PTR, false, 0, target, &[])
        }

        fn modifier(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.raw(name, kind, false, 0, target, &[])
        }

        fn array(&mut self, elem: u32, index: u32, nelems: u32) -> u32 {
            self.raw("", KIND_ARRAY, false, 0, 0, &[elem, index, nelems])
        }

        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut data = Vec::new();
            for &(m, ty, off) in members {
                data.extend([self.s(m), ty, off]);
            }
            self.raw(name, kind, kind_flag, members.len() as u32, size, &data)
        }

        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) -> u32 {
            self.composite(KIND_STRUCT, name, size, false, members)
        }

        fn enum32(&mut self, name: &str, signed: bool, values: &[(&str, i32)]) -> u32 {
            let mut data = Vec::new();
            for &(v, val) in values {
                data.extend([self.s(v), val as u32]);
            }
            self.raw(name, KIND_ENUM, signed, values.len() as u32, 4, &data)
        }

        fn enum64(&mut self, name: &str, signed: bool, values: &[(&str, u64)]) -> u32 {
            let mut data = Vec::new();
            for &(v, val) in values {
                data.extend([self.s(v), val as u32, (val >> 32) as u32]);
            }
            self.raw(name, KIND_ENUM64, signed, values.len() as u32, 8, &data)
        }

        fn build_with_header_len(&self, hdr_len: u32) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.push(SUPPORTED_VERSION);
            out.push(0);
            let type_len = self.types.len() as u32;
            for w in [hdr_len, 0, type_len, type_len, self.strs.len() as u32] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.resize(hdr_len as usize, 0);
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strs);
            out
        }

        fn build(&self) -> Vec<u8> {
            self.build_with_header_len(MIN_HEADER_LEN as u32)
        }
    }

    /// A miniature kernel: every BTF kind first (so that any wrong trailing
    /// size misplaces everything after it), then an sk_buff-like struct
    /// with the shapes the daemon meets in real kernels.
    fn mini() -> Blob {
        let mut b = Blob::new();
        let u8_ = b.int("unsigned char", 1, 8);
        let u16_ = b.int("short unsigned int", 2, 16);
        let u32_ = b.int("unsigned int", 4, 32);
        b.int("long int", 8, 64);
        b.raw("fwd", KIND_FWD, false, 0, 0, &[]);
        let proto = b.raw(
            "",
            KIND_FUNC_PROTO,
            false,
            2,
            u32_,
            &[b.strs.len() as u32, u32_, 0, u16_],
        );
        b.s("arg");
        b.raw("func", KIND_FUNC, false, 1, proto, &[]);
        let var = b.raw("var", KIND_VAR, false, 0, u32_, &[1]);
        b.raw(".data", KIND_DATASEC, false, 1, 4, &[var, 0, 4]);
        b.raw("double", KIND_FLOAT, false, 0, 8, &[]);
        b.raw("tag", KIND_DECL_TAG, false, 0, var, &[u32::MAX]);
        b.composite(
            KIND_UNION,
            "ulike",
            4,
            false,
            &[("a", u32_, 0), ("b", u16_, 0)],
        );
        b.enum32("e32s", true, &[("NEG", -5), ("POS", 7)]);
        b.enum32("e32u", false, &[("BIG", -1)]);
        b.enum64("e64s", true, &[("MIN", i64::MIN as u64), ("M1", u64::MAX)]);
        b.enum64("e64u", false, &[("HUGE", u64::MAX), ("LARGE", 1 << 40)]);

        // u16 behind every kind of link skip_modifiers knows.
        let td1 = b.modifier(KIND_TYPEDEF, "__u16", u16_);
        let td2 = b.modifier(KIND_TYPEDEF, "u16", td1);
        let c = b.modifier(KIND_CONST, "", td2);
        let v = b.modifier(KIND_VOLATILE, "", c);
        let tt = b.modifier(KIND_TYPE_TAG, "rcu", v);
        let chained_u16 = b.modifier(KIND_RESTRICT, "", tt);

        // struct_group(headers, ...): an anonymous struct and a named copy
        // of it, inside an anonymous union.
        let grp = b.strukt(
            "",
            4,
            &[
                ("transport_header", u16_, 0),
                ("network_header", chained_u16, 16),
            ],
        );
        let grp_union = b.composite(
            KIND_UNION,
            "",
            4,
            false,
            &[("", grp, 0), ("headers", grp, 0)],
        );
        let net = b.strukt("net", 16, &[("pad", u32_, 0), ("inum", u32_, 64)]);
        let net_ptr = b.ptr(net);
        let pnet_struct = b.strukt("", 8, &[("net", net_ptr, 0)]);
        let pnet = b.modifier(KIND_TYPEDEF, "possible_net_t", pnet_struct);
        let arr = b.array(u32_, u32_, 3);
        let triple = b.modifier(KIND_TYPEDEF, "triple", arr);
        let u8_ptr = b.ptr(u8_);
        let const_pnet = b.modifier(KIND_CONST, "", pnet);
        b.composite(
            KIND_STRUCT,
            "sk_buff",
            48,
            true,
            &[
                ("head", u8_ptr, 0),
                ("", grp_union, 64),
                ("flags", u8_, bf(96, 3)),
                ("more", u8_, bf(99, 5)),
                ("proto", u8_, 104),
                ("nd_net", const_pnet, 128),
                ("vals", triple, 192),
            ],
        );

        // Pre-kind_flag encoding: the bitfield width lives in the INT.
        let u3 = b.int("u3", 1, 3);
        b.strukt(
            "old",
            2,
            &[("bits", u3, 0), ("nibble", u8_, 4), ("whole", u8_, 8)],
        );

        b.strukt("twin", 8, &[("a", u32_, 0), ("b", u32_, 32)]);
        b.strukt(
            "twin",
            8,
            &[("a", u32_, 0), ("b", u32_, 0), ("c", u32_, 32)],
        );
        b.raw("dup", KIND_ENUM, false, 0, 4, &[]);
        b.enum32("dup", false, &[("ONE", 1)]);
        b.enum32("clash", false, &[("X", 1)]);
        b.enum32("clash", false, &[("X", 2)]);
        b.strukt("last", 8, &[("x", u32_, 32)]);
        b
    }

    fn parse_mini() -> KernelBtf {
        KernelBtf::parse(mini().build()).expect("mini BTF parses")
    }

    #[test]
    fn every_kind_is_skipped_with_its_trailing_size() {
        let btf = parse_mini();
        assert_eq!(btf.member_offset("last.x").unwrap(), 4);
        assert_eq!(btf.member_size("last.x").unwrap(), 4);
    }

    #[test]
    fn anonymous_members_are_descended_transparently() {
        let btf = parse_mini();
        assert_eq!(btf.member_offset("sk_buff.head").unwrap(), 0);
        assert_eq!(btf.member_offset("sk_buff.transport_header").unwrap(), 8);
        assert_eq!(btf.member_offset("sk_buff.network_header").unwrap(), 10);
        assert_eq!(
            btf.member_offset("sk_buff.headers.network_header").unwrap(),
            10
        );
        assert_eq!(btf.member_offset("sk_buff.proto").unwrap(), 13);
        assert_eq!(btf.member_offset("ulike.b").unwrap(), 0);
    }

    #[test]
    fn typedef_and_qualifier_chains_are_resolved() {
        let btf = parse_mini();
        assert_eq!(btf.member_size("sk_buff.network_header").unwrap(), 2);
        assert_eq!(btf.member_offset("sk_buff.nd_net.net").unwrap(), 16);
        assert_eq!(btf.member_size("sk_buff.nd_net.net").unwrap(), 8);
        assert_eq!(btf.member_size("sk_buff.nd_net").unwrap(), 8);
        assert_eq!(btf.member_size("sk_buff.vals").unwrap(), 12);
        assert_eq!(btf.member_offset("sk_buff.vals").unwrap(), 24);
        assert_eq!(btf.member_offset("possible_net_t.net").unwrap(), 0);
        assert_eq!(btf.member_offset("net.inum").unwrap(), 8);
    }

    #[test]
    fn pointers_are_not_descended() {
        let btf = parse_mini();
        let err = btf.member_offset("sk_buff.nd_net.net.inum").unwrap_err();
        assert!(
            matches!(&err, BtfError::NotComposite { path, kind: "pointer", next }
                if path == "sk_buff.nd_net.net" && next == "inum"),
            "{err}"
        );
    }

    #[test]
    fn bitfields_and_unaligned_members_are_rejected() {
        let btf = parse_mini();
        for path in ["sk_buff.flags", "sk_buff.more", "old.bits"] {
            let err = btf.member_offset(path).unwrap_err();
            assert_eq!(err.to_string(), format!("member `{path}` is a bitfield"));
            assert!(btf.member_size(path).is_err());
        }
        let err = btf.member_offset("old.nibble").unwrap_err();
        assert!(
            matches!(err, BtfError::Unaligned { bit_offset: 4, .. }),
            "{err}"
        );
        assert_eq!(btf.member_offset("old.whole").unwrap(), 1);
    }

    #[test]
    fn lookup_errors_name_what_is_missing() {
        let btf = parse_mini();
        let msg = |p: &str| btf.member_offset(p).unwrap_err().to_string();
        assert_eq!(msg("sk_buf.head"), "type not found `struct sk_buf`");
        assert_eq!(msg("sk_buff.foo"), "member not found `sk_buff.foo`");
        assert_eq!(
            msg("sk_buff.nd_net.foo"),
            "member not found `sk_buff.nd_net.foo`"
        );
        // Anonymous groups must not leak their fields' names elsewhere.
        assert_eq!(
            msg("net.transport_header"),
            "member not found `net.transport_header`"
        );
        for bad in ["", "sk_buff", "sk_buff.", ".head", "sk_buff..head"] {
            assert!(
                matches!(btf.member_offset(bad), Err(BtfError::BadPath(_))),
                "{bad}"
            );
        }
        // An enum is not a path root.
        assert!(matches!(
            btf.member_offset("e32s.NEG"),
            Err(BtfError::TypeNotFound { kind: "struct", .. })
        ));
    }

    #[test]
    fn same_named_structs_must_agree() {
        let btf = parse_mini();
        assert_eq!(btf.member_offset("twin.a").unwrap(), 0);
        assert_eq!(btf.member_offset("twin.c").unwrap(), 4);
        assert!(matches!(
            btf.member_offset("twin.b"),
            Err(BtfError::Ambiguous(_))
        ));
    }

    #[test]
    fn enum_values_cover_enum_and_enum64_signedness() {
        let btf = parse_mini();
        let vals = |n: &str| btf.enum_values(n).unwrap();
        let owned = |v: &[(&str, i64)]| -> Vec<(String, i64)> {
            v.iter().map(|&(n, x)| (n.to_owned(), x)).collect()
        };
        assert_eq!(vals("e32s"), owned(&[("NEG", -5), ("POS", 7)]));
        assert_eq!(vals("e32u"), owned(&[("BIG", 0xffff_ffff)]));
        assert_eq!(vals("e64s"), owned(&[("MIN", i64::MIN), ("M1", -1)]));
        assert_eq!(vals("e64u"), owned(&[("HUGE", -1), ("LARGE", 1 << 40)]));
        assert_eq!(vals("dup"), owned(&[("ONE", 1)]));
        assert!(matches!(
            btf.enum_values("clash"),
            Err(BtfError::Ambiguous(_))
        ));
        assert_eq!(
            btf.enum_values("sk_buff").unwrap_err().to_string(),
            "type not found `enum sk_buff`"
        );
        assert!(btf.enum_values("nope").is_err());
    }

    #[test]
    fn pointer_size_follows_the_kernels_long() {
        let mut b = Blob::new();
        let long = b.int("long int", 4, 32);
        let p = b.ptr(long);
        b.strukt("s", 4, &[("p", p, 0)]);
        let btf = KernelBtf::parse(b.build()).unwrap();
        assert_eq!(btf.member_size("s.p").unwrap(), 4);
    }

    #[test]
    fn longer_headers_from_newer_kernels_are_accepted() {
        let btf = KernelBtf::parse(mini().build_with_header_len(32)).unwrap();
        assert_eq!(btf.member_offset("sk_buff.network_header").unwrap(), 10);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = mini().build();
        for len in 0..bytes.len() {
            assert!(
                KernelBtf::parse(bytes[..len].to_vec()).is_err(),
                "len {len}"
            );
        }
    }

    #[test]
    fn type_section_cut_mid_record_is_truncated() {
        let blob = mini();
        let bytes = blob.build();
        for cut in 0..blob.types.len() {
            let mut b = bytes.clone();
            b[12..16].copy_from_slice(&(cut as u32).to_le_bytes());
            let res = KernelBtf::parse(b);
            if blob.boundaries.contains(&cut) {
                assert!(res.is_ok(), "cut {cut}: {:?}", res.err());
            } else {
                assert!(matches!(res, Err(BtfError::Truncated { .. })), "cut {cut}");
            }
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let bytes = mini().build();
        for i in 0..bytes.len() {
            for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
                let mut b = bytes.clone();
                b[i] = v;
                let Ok(btf) = KernelBtf::parse(b) else {
                    continue;
                };
                for p in [
                    "sk_buff.network_header",
                    "sk_buff.nd_net.net",
                    "sk_buff.vals",
                    "twin.b",
                    "old.bits",
                    "last.x",
                ] {
                    let _ = btf.member_offset(p);
                    let _ = btf.member_size(p);
                }
                for e in ["e32s", "e64u", "dup", "clash"] {
                    let _ = btf.enum_values(e);
                }
            }
        }
    }

    #[test]
    fn cyclic_types_are_errors_not_stack_overflows() {
        let mut b = Blob::new();
        let self_id = b.next_id;
        b.strukt("loop", 4, &[("", self_id, 0)]);
        let td = b.next_id;
        b.modifier(KIND_TYPEDEF, "td_loop", td);
        b.strukt("uses", 4, &[("x", td, 0)]);
        let btf = KernelBtf::parse(b.build()).unwrap();
        assert!(matches!(
            btf.member_offset("loop.x"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_size("uses.x"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("uses.x.y"),
            Err(BtfError::TooDeep(_))
        ));
        assert!(matches!(
            btf.member_offset("td_loop.x"),
            Err(BtfError::TooDeep(_))
        ));
    }

    #[test]
    fn dangling_type_ids_are_errors() {
        let mut b = Blob::new();
        b.strukt("s", 4, &[("x", 999, 0)]);
        let btf = KernelBtf::parse(b.build()).unwrap();
        // Even the offset needs the type, to rule out an INT-encoded bitfield.
        assert!(matches!(
            btf.member_offset("s.x"),
            Err(BtfError::TypeIdOutOfRange(999))
        ));
        assert!(matches!(
            btf.member_size("s.x"),
            Err(BtfError::TypeIdOutOfRange(999))
        ));
    }

    #[test]
    fn header_problems_are_reported() {
        let good = mini().build();
        let err = |b: Vec<u8>| KernelBtf::parse(b).unwrap_err().to_string();

        let mut b = good.clone();
        b[0] = 0x00;
        assert_eq!(err(b), "bad BTF magic 0xeb00 (expected 0xeb9f)");
        let mut b = good.clone();
        b[..2].copy_from_slice(&MAGIC.to_be_bytes());
        assert!(err(b).contains("big-endian"));
        let mut b = good.clone();
        b[2] = 2;
        assert!(err(b).contains("unsupported BTF version 2"));
        let mut b = good.clone();
        b[4..8].copy_from_slice(&20u32.to_le_bytes());
        assert!(err(b).contains("header length 20"));
        // Lengths far beyond the file must fail without allocating them.
        let mut b = good.clone();
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            KernelBtf::parse(b),
            Err(BtfError::Truncated { .. })
        ));
        let mut b = good.clone();
        b[16..20].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(b).contains("overlap"));
        let mut b = good.clone();
        b[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert!(err(b).contains("string section"));
        assert!(matches!(
            KernelBtf::parse(Vec::new()),
            Err(BtfError::Truncated { .. })
        ));
    }

    #[test]
    fn unknown_kinds_name_the_type_id() {
        for kind in [0, 20, 31] {
            let mut b = Blob::new();
            b.int("int", 4, 32);
            b.raw("x", kind, false, 0, 0, &[]);
            let err = KernelBtf::parse(b.build()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("unknown BTF kind {kind} at type id 2")
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = KernelBtf::from_file(Path::new("/nonexistent/btf")).unwrap_err();
        assert!(matches!(err, BtfError::Io { .. }));
        assert!(err
            .to_string()
            .starts_with("reading BTF from /nonexistent/btf: "));
    }

    /// Runs against the machine's own kernel on purpose: this is the only
    /// test that proves the parser agrees with what the kernel emits. No
    /// skip if the file is missing; a CI without BTF must fail loudly.
    #[test]
    fn running_kernel_layouts() {
        let bytes = std::fs::read(SYS_FS_VMLINUX).expect("reading /sys/kernel/btf/vmlinux");
        let len = bytes.len();
        let start = std::time::Instant::now();
        let btf = KernelBtf::parse(bytes).expect("parsing vmlinux BTF");
        eprintln!(
            "parsed {len} bytes of vmlinux BTF in {:?}: {btf:?}",
            start.elapsed()
        );

        let sizes: &[(&str, Option<u32>)] = &[
            ("sk_buff.head", Some(8)),
            ("sk_buff.data", Some(8)),
            ("sk_buff.len", Some(4)),
            ("sk_buff.network_header", Some(2)),
            ("sk_buff.transport_header", Some(2)),
            ("sk_buff.dev", Some(8)),
            ("sk_buff.sk", Some(8)),
            ("sk_buff._nfct", Some(8)),
            ("net_device.nd_net.net", Some(8)),
            ("sock_common.skc_net.net", Some(8)),
            ("net.ns.inum", Some(4)),
            ("nf_conn.status", Some(8)),
            ("nf_conn.tuplehash", None),
        ];
        for &(path, size) in sizes {
            let offset = btf
                .member_offset(path)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            let actual = btf
                .member_size(path)
                .unwrap_or_else(|e| panic!("{path}: {e}"));
            eprintln!("{path}: offset {offset} size {actual}");
            if let Some(size) = size {
                assert_eq!(actual, size, "{path}");
            }
        }
        assert!(matches!(
            btf.member_offset("sk_buff.cloned"),
            Err(BtfError::Bitfield(_))
        ));

        let reasons = btf
            .enum_values("skb_drop_reason")
            .expect("enum skb_drop_reason");
        let number = |name: &str| reasons.iter().find(|(n, _)| n == name).map(|&(_, v)| v);
        for name in [
            "SKB_DROP_REASON_NETFILTER_DROP",
            "SKB_DROP_REASON_NO_SOCKET",
            "SKB_DROP_REASON_NOT_SPECIFIED",
            "SKB_DROP_REASON_SOCKET_RCVBUFF",
        ] {
            eprintln!("{name} = {:?}", number(name));
        }
        assert!(number("SKB_DROP_REASON_NETFILTER_DROP").is_some());
        assert!(number("SKB_DROP_REASON_NO_SOCKET").is_some());
    }
}
