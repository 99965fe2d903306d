//! Struct member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`), for the few kernel
//! struct fields a program reads that no tracepoint carries. aya has no CO-RE field
//! relocations and its BTF type lookups are private, so this is a small reader of the BTF
//! format (include/uapi/linux/btf.h): it walks the type section once and answers "byte offset
//! of member M of struct S".

use std::path::Path;

/// `struct btf_header` magic.
const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: {source} (kernel built without CONFIG_DEBUG_INFO_BTF?)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a BTF blob (bad magic or truncated header)")]
    Header,
    #[error("BTF type section is truncated at byte {at}")]
    Truncated { at: usize },
    #[error("unknown BTF kind {kind}")]
    UnknownKind { kind: u32 },
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// Byte offsets of the named members of the named structs. A member may also sit in an
/// anonymous struct or union inside the struct (as C lets it be named, e.g.
/// `tcp_skb_cb.tcp_gso_segs`); its offset is then the sum of the offsets on the way. The type
/// section is walked once to index the types by id; the named structs are then searched.
pub fn member_offsets(data: &[u8], wanted: &[(&str, &str)]) -> Result<Vec<Option<u32>>, BtfError> {
    if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
        return Err(BtfError::Header);
    }
    let hdr_len = u32_at(data, 4).ok_or(BtfError::Header)? as usize;
    let type_off = u32_at(data, 8).ok_or(BtfError::Header)? as usize;
    let type_len = u32_at(data, 12).ok_or(BtfError::Header)? as usize;
    let str_off = u32_at(data, 16).ok_or(BtfError::Header)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let end = types + type_len;
    if end > data.len() || strings > data.len() {
        return Err(BtfError::Truncated { at: data.len() });
    }
    let btf = Types {
        data,
        strings,
        starts: index_types(data, types, end)?,
    };
    let mut out = vec![None; wanted.len()];
    for (id, &at) in btf.starts.iter().enumerate().skip(1) {
        let t = btf.header(at);
        if t.kind != KIND_STRUCT {
            continue;
        }
        let struct_name = btf.name(t.name_off);
        for (slot, (s, member)) in out.iter_mut().zip(wanted) {
            if slot.is_none() && struct_name == s.as_bytes() {
                *slot = btf.find_member(id as u32, member.as_bytes(), MAX_ANON_DEPTH);
            }
        }
    }
    Ok(out)
}

/// How deep anonymous structs and unions are searched (the kernel nests two or three).
const MAX_ANON_DEPTH: u32 = 4;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// The common header of a BTF type record.
struct TypeHeader {
    name_off: u32,
    vlen: usize,
    kind: u32,
    kflag: bool,
    /// For modifiers and typedefs: the type they refer to.
    type_id: u32,
}

/// Start of each type's record, indexed by type id (id 0 is `void` and has none).
fn index_types(data: &[u8], mut at: usize, end: usize) -> Result<Vec<usize>, BtfError> {
    let mut starts = vec![0];
    while at + 12 <= end {
        let info = u32_at(data, at + 4).ok_or(BtfError::Truncated { at })?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
            KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
            2 | 7..=12 | 16 | 18 => 0,
            _ => return Err(BtfError::UnknownKind { kind }),
        };
        if at + 12 + extra > end {
            return Err(BtfError::Truncated { at });
        }
        starts.push(at);
        at += 12 + extra;
    }
    Ok(starts)
}

/// An indexed BTF blob; every record in `starts` was checked to lie inside `data`.
struct Types<'a> {
    data: &'a [u8],
    strings: usize,
    starts: Vec<usize>,
}

impl Types<'_> {
    fn word(&self, at: usize) -> u32 {
        u32_at(self.data, at).unwrap_or_default()
    }

    fn header(&self, at: usize) -> TypeHeader {
        let info = self.word(at + 4);
        TypeHeader {
            name_off: self.word(at),
            vlen: (info & 0xffff) as usize,
            kind: (info >> 24) & 0x1f,
            kflag: info >> 31 == 1,
            type_id: self.word(at + 8),
        }
    }

    fn name(&self, off: u32) -> &[u8] {
        let start = self.strings + off as usize;
        let rest = self.data.get(start..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// Byte offset of `member` in the struct or union `id`, looking into its anonymous
    /// struct and union members down to `depth` levels; `None` when it is absent or not
    /// byte-aligned.
    fn find_member(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        // Id 0 is `void`.
        let at = *self.starts.get(id as usize).filter(|_| id != 0)?;
        let t = self.header(at);
        if t.kind != KIND_STRUCT && t.kind != KIND_UNION {
            return None;
        }
        let members = (0..t.vlen).map(|i| {
            let m = at + 12 + i * 12;
            let bits = self.word(m + 8);
            // With kind_flag the low 24 bits are the bit offset (the high 8 the bitfield size).
            let bits = if t.kflag { bits & 0x00ff_ffff } else { bits };
            (self.word(m), self.word(m + 4), bits)
        });
        // A named match at this level wins over one inside an anonymous member.
        let mut nested = None;
        for (name_off, type_id, bits) in members {
            let name = self.name(name_off);
            if name == member {
                return (bits % 8 == 0).then_some(bits / 8);
            }
            if name.is_empty() && depth > 0 && nested.is_none() && bits % 8 == 0 {
                nested = self
                    .find_member(self.strip_modifiers(type_id), member, depth - 1)
                    .map(|inner| bits / 8 + inner);
            }
        }
        nested
    }

    /// The type behind typedefs and qualifiers (bounded, in case of a malformed loop).
    fn strip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..8 {
            let Some(&at) = self.starts.get(id as usize).filter(|_| id != 0) else {
                return id;
            };
            let t = self.header(at);
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.type_id;
                }
                _ => return id,
            }
        }
        id
    }
}

/// [`member_offsets`] of the running kernel's BTF.
pub fn kernel_member_offsets(wanted: &[(&str, &str)]) -> Result<Vec<Option<u32>>, BtfError> {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    let data = std::fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    member_offsets(&data, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct s { int a; int b; }`, a bitfield struct, and
    /// `struct u { int d; union { int e; const struct { int f; int a; }; }; }`.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0t\0c\0u\0d\0e\0f\0".to_vec();
        let mut types = Vec::new();
        let mut push = |words: &[u32]| {
            for w in words {
                types.extend_from_slice(&w.to_le_bytes());
            }
        };
        // [1] int: name "int", kind INT, size 4, encoding word.
        push(&[1, KIND_INT << 24, 4, 32]);
        // [2] struct s { a at bit 0, b at bit 32 }, size 8.
        push(&[5, (KIND_STRUCT << 24) | 2, 8, 7, 1, 0, 9, 1, 32]);
        // [3] struct t with kind_flag: member c is a 3-bit field at bit 40 (not byte-aligned
        // would be skipped; this one is at bit 64 → byte 8).
        push(&[
            11,
            (1 << 31) | (KIND_STRUCT << 24) | 1,
            16,
            13,
            1,
            (3 << 24) | 64,
        ]);
        // [4] struct { f at bit 0, a at bit 32 }, anonymous, size 8.
        push(&[0, (KIND_STRUCT << 24) | 2, 8, 21, 1, 0, 7, 1, 32]);
        // [5] const [4].
        push(&[0, KIND_CONST << 24, 4]);
        // [6] union { e; [5] }, anonymous, size 8.
        push(&[0, (KIND_UNION << 24) | 2, 8, 19, 1, 0, 0, 5, 0]);
        // [7] struct u { d at bit 0, [6] at bit 64 }, size 16.
        push(&[15, (KIND_STRUCT << 24) | 2, 16, 17, 1, 0, 0, 6, 64]);
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_in_a_synthetic_blob() {
        let got = member_offsets(
            &blob(),
            &[
                ("s", "b"),
                ("s", "a"),
                ("t", "c"),
                ("s", "zz"),
                ("nope", "a"),
            ],
        )
        .unwrap();
        assert_eq!(got, vec![Some(4), Some(0), Some(8), None, None]);
        // Members of anonymous unions and structs, through a qualifier: offsets add up.
        let got = member_offsets(
            &blob(),
            &[("u", "d"), ("u", "e"), ("u", "f"), ("u", "a"), ("u", "zz")],
        )
        .unwrap();
        assert_eq!(got, vec![Some(0), Some(8), Some(8), Some(12), None]);
        assert!(matches!(member_offsets(b"xx", &[]), Err(BtfError::Header)));
        let mut cut = blob();
        cut.truncate(40);
        assert!(member_offsets(&cut, &[("s", "a")]).is_err());
    }

    #[test]
    fn finds_tcp_sock_srtt_in_the_running_kernel() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            if std::env::var_os("CI").is_some() {
                panic!("no readable /sys/kernel/btf/vmlinux in CI");
            }
            eprintln!("skipping test - /sys/kernel/btf/vmlinux not readable");
            return;
        };
        let got = member_offsets(
            &data,
            &[
                ("tcp_sock", "srtt_us"),
                ("sock_common", "skc_family"),
                ("tcp_skb_cb", "tcp_gso_segs"),
            ],
        )
        .unwrap();
        // srtt_us lies well inside tcp_sock (after inet_connection_sock); skc_family is at
        // byte 16 of sock_common on every 64-bit kernel since 4.x.
        let srtt = got[0].expect("tcp_sock.srtt_us");
        assert!((1000..4000).contains(&srtt), "{srtt}");
        assert_eq!(got[1], Some(16));
        // tcp_gso_segs sits in an anonymous struct in an anonymous union after `seq` and
        // `end_seq` (include/net/tcp.h, since 4.x).
        assert_eq!(got[2], Some(8));
    }

    /// Property tests: a BTF blob is trusted as far as its header and record counts go, no
    /// further.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::untrusted::fuzz::config(512))]

            #[test]
            fn damaged_blob_never_panics(
                keep in any::<prop::sample::Index>(),
                edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..12),
            ) {
                let mut data = blob();
                data.truncate(keep.index(data.len() + 1));
                for (at, value) in edits {
                    if !data.is_empty() {
                        let i = at.index(data.len());
                        data[i] = value;
                    }
                }
                let _ = member_offsets(&data, &[("s", "a"), ("u", "f"), ("t", "c"), ("u", "e")]);
            }

            #[test]
            fn random_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..512)) {
                if data.len() >= 2 {
                    data[..2].copy_from_slice(&MAGIC.to_le_bytes());
                }
                let _ = member_offsets(&data, &[("s", "a")]);
            }
        }
    }
}
