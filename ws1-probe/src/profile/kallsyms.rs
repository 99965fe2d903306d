//! A compact index of `/proc/kallsyms` for naming kernel addresses.
//!
//! blazesym's kallsyms source keeps a symbol object per line (~8 MB of heap for the ~120k
//! functions of a distribution kernel); this keeps three flat arrays instead: sorted start
//! addresses, the offset of each name, and one string of all names (~4.5 MB for the same
//! kernel). Only functions (`t`/`T`/`w`/`W`) are kept: profile addresses are code. Bounded by
//! [`MAX_SYMBOLS`] and [`MAX_NAME_LEN`], so an unusual kernel cannot make it grow without limit.

use std::{fs::File, io, io::BufRead, io::BufReader, path::Path};

/// Symbols kept at most; a kernel with more loses the ones after (module symbols come last).
pub const MAX_SYMBOLS: usize = 500_000;
/// Longer names are cut to this many bytes (at a character boundary).
pub const MAX_NAME_LEN: usize = 128;

/// Kernel function start addresses and their names, sorted by address.
#[derive(Debug, Default)]
pub struct KallsymsIndex {
    addrs: Vec<u64>,
    /// Start of each name in `names`; a name ends where the next begins.
    name_at: Vec<u32>,
    names: String,
}

impl KallsymsIndex {
    /// Reads `path` (normally `/proc/kallsyms`). A file with no addresses (read without
    /// privileges, or `kptr_restrict`) gives an empty index.
    pub fn read(path: &Path) -> io::Result<Self> {
        Ok(Self::parse(BufReader::new(File::open(path)?)))
    }

    /// Parses kallsyms text, skipping lines it does not understand.
    pub fn parse(reader: impl BufRead) -> Self {
        let mut entries: Vec<(u64, u32, u32)> = Vec::new();
        let mut names = String::new();
        for line in reader.lines() {
            let Ok(line) = line else { break };
            if entries.len() >= MAX_SYMBOLS {
                break;
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(addr), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            if addr == 0 {
                continue;
            }
            let name = truncate(name, MAX_NAME_LEN);
            let (Ok(start), Ok(len)) = (u32::try_from(names.len()), u32::try_from(name.len()))
            else {
                break;
            };
            names.push_str(name);
            entries.push((addr, start, len));
        }
        // kallsyms is sorted within the kernel image and within each module, not across them.
        // Stable, so of aliases at one address the first listed wins (`_stext` comes after the
        // function that starts there).
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        // Names are re-laid in address order so that each ends where the next begins.
        let mut sorted = String::with_capacity(entries.iter().map(|e| e.2 as usize).sum::<usize>());
        let mut addrs = Vec::with_capacity(entries.len());
        let mut name_at = Vec::with_capacity(entries.len());
        for (addr, start, len) in entries {
            let (start, len) = (start as usize, len as usize);
            let Some(name) = names.get(start..start + len) else {
                continue;
            };
            let Ok(at) = u32::try_from(sorted.len()) else {
                break;
            };
            addrs.push(addr);
            name_at.push(at);
            sorted.push_str(name);
        }
        Self {
            addrs,
            name_at,
            names: sorted,
        }
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Heap bytes held.
    pub fn bytes(&self) -> usize {
        self.addrs.capacity() * 8 + self.name_at.capacity() * 4 + self.names.capacity()
    }

    /// The function `addr` is in: the last symbol starting at or before it. Addresses past the
    /// last symbol or before the first have no name.
    pub fn name(&self, addr: u64) -> Option<&str> {
        let i = self.addrs.partition_point(|&a| a <= addr).checked_sub(1)?;
        // Past the last symbol there is no telling where its function ends.
        if i + 1 == self.addrs.len() {
            return None;
        }
        let start = *self.name_at.get(i)? as usize;
        let end = self
            .name_at
            .get(i + 1)
            .map_or(self.names.len(), |&e| e as usize);
        self.names.get(start..end)
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
ffffffff81000000 T _stext
ffffffff81000000 T startup_64
ffffffff81000100 t helper
ffffffff81000200 D some_data
ffffffff81000300 T do_work
0000000000000000 A fixed_percpu_data
ffffffffc0201000 t mod_fn\t[mymod]
ffffffffc0200000 t mod_first\t[mymod]
ffffffffc0202000 T mod_end\t[mymod]
bad line
";

    #[test]
    fn names_addresses_by_the_function_they_are_in() {
        let idx = KallsymsIndex::parse(TEXT.as_bytes());
        // Data and absolute symbols are left out; aliases collapse to the first listed.
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.name(0xffffffff81000000), Some("_stext"));
        assert_eq!(idx.name(0xffffffff810000ff), Some("_stext"));
        assert_eq!(idx.name(0xffffffff81000100), Some("helper"));
        // The data symbol does not end `helper`: only functions are kept.
        assert_eq!(idx.name(0xffffffff81000250), Some("helper"));
        assert_eq!(idx.name(0xffffffff81000301), Some("do_work"));
        // Module symbols listed out of order are sorted.
        assert_eq!(idx.name(0xffffffffc0200010), Some("mod_first"));
        assert_eq!(idx.name(0xffffffffc0201010), Some("mod_fn"));
        assert_eq!(idx.name(0xffffffff80ffffff), None);
        // Past the last symbol: unknown end.
        assert_eq!(idx.name(0xffffffffc0202001), None);
    }

    #[test]
    fn unprivileged_kallsyms_gives_an_empty_index() {
        let idx = KallsymsIndex::parse(
            "0000000000000000 T _stext\n0000000000000000 t helper\n".as_bytes(),
        );
        assert!(idx.is_empty());
        assert_eq!(idx.name(0x1000), None);
    }

    #[test]
    fn long_names_are_cut() {
        let long = "x".repeat(MAX_NAME_LEN + 50);
        let text = format!("1000 T {long}\n2000 T next\n");
        let idx = KallsymsIndex::parse(text.as_bytes());
        assert_eq!(idx.name(0x1000).map(str::len), Some(MAX_NAME_LEN));
        assert_eq!(truncate("héllo", 2), "h");
    }

    #[test]
    fn bytes_are_flat_arrays() {
        let idx = KallsymsIndex::parse(TEXT.as_bytes());
        let names: usize = [
            "_stext",
            "helper",
            "do_work",
            "mod_first",
            "mod_fn",
            "mod_end",
        ]
        .iter()
        .map(|n| n.len())
        .sum();
        assert!(idx.bytes() >= 6 * 12 + names);
    }
}
