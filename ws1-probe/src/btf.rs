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

/// Byte offsets of the named members of the named structs, found in one pass.
pub fn member_offsets(data: &[u8], wanted: &[(&str, &str)]) -> Result<Vec<Option<u32>>, BtfError> {
    let magic = u16::from_le_bytes([*data.first().ok_or(BtfError::Header)?, data[1]]);
    if magic != MAGIC || data.len() < 24 {
        return Err(BtfError::Header);
    }
    let hdr_len = u32_at(data, 4).ok_or(BtfError::Header)? as usize;
    let type_off = u32_at(data, 8).ok_or(BtfError::Header)? as usize;
    let type_len = u32_at(data, 12).ok_or(BtfError::Header)? as usize;
    let str_off = u32_at(data, 16).ok_or(BtfError::Header)? as usize;
    let types = hdr_len + type_off;
    let strings = hdr_len + str_off;
    let name = |off: u32| -> &[u8] {
        let start = strings + off as usize;
        let rest = data.get(start..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        &rest[..end]
    };
    let mut out = vec![None; wanted.len()];
    let end = types + type_len;
    if end > data.len() || strings > data.len() {
        return Err(BtfError::Truncated { at: data.len() });
    }
    let mut at = types;
    while at + 12 <= end {
        let name_off = u32_at(data, at).ok_or(BtfError::Truncated { at })?;
        let info = u32_at(data, at + 4).ok_or(BtfError::Truncated { at })?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kflag = info >> 31 == 1;
        let body = at + 12;
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
            KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
            2 | 7..=12 | 16 | 18 => 0,
            _ => return Err(BtfError::UnknownKind { kind }),
        };
        if body + extra > end {
            return Err(BtfError::Truncated { at });
        }
        if kind == KIND_STRUCT {
            let struct_name = name(name_off);
            for (slot, (s, member)) in out.iter_mut().zip(wanted) {
                if slot.is_some() || struct_name != s.as_bytes() {
                    continue;
                }
                for i in 0..vlen {
                    let m = body + i * 12;
                    let m_name = u32_at(data, m).ok_or(BtfError::Truncated { at: m })?;
                    if name(m_name) == member.as_bytes() {
                        let bits = u32_at(data, m + 8).ok_or(BtfError::Truncated { at: m })?;
                        // With kind_flag the low 24 bits are the bit offset (the high 8 the
                        // bitfield size).
                        let bits = if kflag { bits & 0x00ff_ffff } else { bits };
                        if bits % 8 == 0 {
                            *slot = Some(bits / 8);
                        }
                    }
                }
            }
        }
        at = body + extra;
    }
    Ok(out)
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

    /// A BTF blob with `struct s { int a; int b; }` and a bitfield struct.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0t\0c\0".to_vec();
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
            &[("tcp_sock", "srtt_us"), ("sock_common", "skc_family")],
        )
        .unwrap();
        // srtt_us lies well inside tcp_sock (after inet_connection_sock); skc_family is at
        // byte 16 of sock_common on every 64-bit kernel since 4.x.
        let srtt = got[0].expect("tcp_sock.srtt_us");
        assert!((1000..4000).contains(&srtt), "{srtt}");
        assert_eq!(got[1], Some(16));
    }
}
