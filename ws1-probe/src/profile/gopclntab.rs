//! Frameless code of Go binaries from `.gopclntab`, for binaries without `.debug_frame` (built
//! with `-ldflags=-w`, as release images often are): the runtime's own table of functions
//! keeps, per function, the stack pointer's offset from its value at entry at every pc (the
//! `pcsp` table). Where it is 0 nothing is pushed and the return address is at the stack
//! pointer, as `leaf.rs` needs.
//!
//! Read for Go 1.18 and later (header magic `0xfffffff0`, and `0xfffffff1` from Go 1.20; the
//! layout both use: `runtime/symtab.go`'s `pcHeader`, `functab` and `_func`). Older tables are
//! not read. Everything is bounds-checked: the table is an observed process's file.

use std::ops::Range;

const MAGIC_GO118: u32 = 0xffff_fff0;
const MAGIC_GO120: u32 = 0xffff_fff1;
/// Bytes of the 8-byte-pointer header: magic, two pads, minLC, ptrSize, then 8 words.
const HEADER_BYTES: usize = 8 + 8 * 8;
/// Offset of `pcsp` in `_func` (after entryOff, nameOff, args, deferreturn).
const FUNC_PCSP: usize = 16;

/// Why a table was not read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PclntabError {
    #[error("not a Go 1.18+ pclntab for 64-bit x86 (magic {0:#x})")]
    Unsupported(u32),
    #[error("the pclntab is truncated or inconsistent")]
    Malformed,
}

fn u32_at(d: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        d.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(d: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        d.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// An unsigned LEB128 varint of at most 32 bits, and the bytes after it.
fn varint(d: &[u8]) -> Option<(u32, &[u8])> {
    let mut v: u32 = 0;
    for (i, &b) in d.iter().enumerate().take(5) {
        v |= u32::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &d[i + 1..]));
        }
    }
    None
}

/// Address ranges (text addresses of the binary, from `text_start`, the address of `.text`
/// when the header's own is 0) where a function's SP delta is 0. At most `max_ranges`.
pub fn frameless_ranges(
    tab: &[u8],
    text_start: u64,
    max_ranges: usize,
) -> Result<Vec<Range<u64>>, PclntabError> {
    let magic = u32_at(tab, 0).ok_or(PclntabError::Malformed)?;
    if !(magic == MAGIC_GO118 || magic == MAGIC_GO120) || tab.get(7) != Some(&8) {
        return Err(PclntabError::Unsupported(magic));
    }
    if tab.len() < HEADER_BYTES {
        return Err(PclntabError::Malformed);
    }
    let min_lc = u64::from(tab[6].max(1));
    let word = |i: usize| u64_at(tab, 8 + 8 * i).ok_or(PclntabError::Malformed);
    let nfunc = usize::try_from(word(0)?).map_err(|_| PclntabError::Malformed)?;
    let text = match word(2)? {
        0 => text_start,
        t => t,
    };
    let pctab = usize::try_from(word(6)?).map_err(|_| PclntabError::Malformed)?;
    let pcln = usize::try_from(word(7)?).map_err(|_| PclntabError::Malformed)?;
    let functab = tab.get(pcln..).ok_or(PclntabError::Malformed)?;
    // nfunc + 1 (entryoff, funcoff) pairs: the last entry ends the last function.
    if nfunc
        .checked_add(1)
        .and_then(|n| n.checked_mul(8))
        .is_none_or(|b| b > functab.len())
    {
        return Err(PclntabError::Malformed);
    }
    let mut out = Vec::new();
    for i in 0..nfunc {
        let (Some(entry), Some(funcoff), Some(end)) = (
            u32_at(functab, 8 * i),
            u32_at(functab, 8 * i + 4),
            u32_at(functab, 8 * i + 8),
        ) else {
            break;
        };
        // Offset 0 is "no table" (the runtime reserves pctab's first byte).
        let Some(pcsp) = u32_at(functab, funcoff as usize + FUNC_PCSP).filter(|o| *o != 0) else {
            continue;
        };
        let Some(mut p) = tab.get(pctab.saturating_add(pcsp as usize)..) else {
            continue;
        };
        // runtime.pcvalue: from the entry, value -1, pairs of (zigzag value delta, pc delta).
        let (mut pc, end) = (u64::from(entry), u64::from(end));
        let mut val: i64 = -1;
        let mut first = true;
        while pc < end {
            let Some((uvdelta, rest)) = varint(p) else {
                break;
            };
            if uvdelta == 0 && !first {
                break;
            }
            first = false;
            val += i64::from((uvdelta >> 1) as i32 ^ -((uvdelta & 1) as i32));
            let Some((pcdelta, rest)) = varint(rest) else {
                break;
            };
            p = rest;
            let next = pc.saturating_add(u64::from(pcdelta) * min_lc).min(end);
            if val == 0 && next > pc {
                if out.len() >= max_ranges {
                    return Ok(out);
                }
                out.push(text + pc..text + next);
            }
            pc = next;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pclntab of two functions at text offsets 0x0 (0x10 bytes, SP delta 0 throughout) and
    /// 0x10 (0x30 bytes: delta 0 for 4 bytes, then 0x18).
    pub(super) fn table() -> Vec<u8> {
        let mut t = Vec::new();
        t.extend(MAGIC_GO118.to_le_bytes());
        t.extend([0, 0, 1, 8]);
        let pcln = HEADER_BYTES as u64;
        let functab_len = 3 * 8;
        let func_at = functab_len; // two _func of 20 bytes (up to and with pcsp)
        let pctab = pcln + functab_len + 2 * 20;
        for w in [2u64, 0, 0x40_1000, 0, 0, 0, pctab, pcln] {
            t.extend(w.to_le_bytes());
        }
        // functab: (entryoff, funcoff) × 2, then the end.
        for (e, f) in [(0u32, func_at), (0x10, func_at + 20), (0x40, 0)] {
            t.extend(e.to_le_bytes());
            t.extend((f as u32).to_le_bytes());
        }
        // _func: entryOff, nameOff, args, deferreturn, pcsp.
        for (entry, pcsp) in [(0u32, 1u32), (0x10, 4)] {
            for v in [entry, 0, 0, 0, pcsp] {
                t.extend(v.to_le_bytes());
            }
        }
        // pcsp tables: +1 (→0) for 0x10 bytes, end; +1 (→0) for 4 bytes, +0x18 for 0x2c, end.
        t.push(0);
        t.extend([0x02, 0x10, 0x00]);
        t.extend([0x02, 0x04, 0x30, 0x2c, 0x00]);
        t
    }

    #[test]
    fn sp_delta_zero_ranges() {
        let r = frameless_ranges(&table(), 0, 100).unwrap();
        assert_eq!(r, vec![0x40_1000..0x40_1010, 0x40_1010..0x40_1014]);
        assert_eq!(frameless_ranges(&table(), 0, 1).unwrap().len(), 1);
    }

    #[test]
    fn other_versions_and_damage() {
        let mut old = table();
        old[..4].copy_from_slice(&0xffff_fffau32.to_le_bytes());
        assert_eq!(
            frameless_ranges(&old, 0, 100),
            Err(PclntabError::Unsupported(0xffff_fffa))
        );
        let good = table();
        for cut in 0..good.len() {
            // Never panics; a cut table yields a prefix of the ranges or an error.
            if let Ok(r) = frameless_ranges(&good[..cut], 0, 100) {
                assert!(r.len() <= 2);
            }
        }
        let mut huge = table();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            frameless_ranges(&huge, 0, 100),
            Err(PclntabError::Malformed)
        );
    }

    #[test]
    fn varints() {
        assert_eq!(varint(&[0x05, 9]), Some((5, &[9u8][..])));
        assert_eq!(varint(&[0x80, 0x01]), Some((128, &[][..])));
        assert_eq!(varint(&[0x80; 6]), None);
        assert_eq!(varint(&[]), None);
    }
}
