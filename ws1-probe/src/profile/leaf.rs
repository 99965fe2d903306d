//! Callers of frameless leaf functions in frame-pointer mode.
//!
//! A leaf function that sets up no frame (Go's leaves with a frame size of 0, C built with
//! `-momit-leaf-frame-pointer`, hand-written assembly such as `memcpy`) leaves `rbp` pointing at
//! its caller's frame, so the kernel's frame-pointer walk reads the caller's *own* return
//! address next and skips the caller: Go stacks read `runtime.main;main.matchOrders` instead of
//! `runtime.main;main.main;main.matchOrders`, and the caller's inclusive time is lost.
//!
//! The return address of such a leaf is the word at the stack pointer, or a few words above
//! when it pushed registers (a C leaf saving `rbx` and `r12` to use them). For processes the
//! agent lists in `PROFILE_LEAF` (their main executable has frameless code), the kernel program
//! reads the four words at the stack pointer and puts the first that is an address in the
//! executable's text into the sample's key, with its slot (0 when none, so samples in framed
//! functions, where the words are data, do not multiply the keys). Here, when the call frame
//! information at the sampled ip says the canonical frame address is `rsp + N`, N in 8, 16,
//! 24, 32, and `(N - 8) / 8` is the recorded slot — so that word is the return address — it
//! becomes the leaf's caller, between the leaf and the rest of the walk. A word from another
//! slot (a pushed register that held a code address) is ignored: the stack stays as walked.
//!
//! The rule comes from `.eh_frame` and `.debug_frame` (Go binaries carry only the second,
//! usually zlib-compressed: `SHF_COMPRESSED`, or `.zdebug_frame` from older linkers), or for a
//! Go binary without `.debug_frame` (linked with `-w`) from the SP deltas of `.gopclntab`
//! ([`gopclntab`](super::gopclntab), Go 1.18+; Go's frameless functions push nothing). Not
//! handled in frame-pointer mode: leaves with CFA = `rsp + N`, N > 32 (four registers pushed
//! or more, or a stack adjustment), whose return address is past the words the kernel reads;
//! those stacks stay as the walk found them. DWARF mode unwinds every frame from CFI and needs
//! none of this.
//!
//! Per binary the frameless address ranges are computed once (one pass over the FDEs) and kept
//! in a [`ByteLru`]; per process the executable mappings, dropped by [`LeafResolver::forget`].

use std::{
    borrow::Cow,
    collections::HashMap,
    fs::File,
    io::{self, Read},
    ops::Range,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, LittleEndian, UnwindContext,
    UnwindSection, X86_64,
};
use object::{
    Architecture, CompressionFormat, Object, ObjectSection, ObjectSegment, ReadCache, ReadRef,
    SegmentFlags,
};
use ws1_probe_common::profile::{LEAF_RANGES, LEAF_SLOTS, LeafText, leaf_ret_word};

use super::binary::{BinaryId, ByteLru, CacheStat};
use super::unwind::parse_maps_line;

/// Most frameless ranges kept for one binary (16 bytes each): a binary claiming more is
/// treated as having none beyond the first ones.
pub const MAX_RANGES: usize = 1 << 20;
/// Largest call frame section read (compressed or not), and largest decompressed size.
pub const MAX_CFI_BYTES: u64 = 256 << 20;
/// Rows of one FDE evaluated at most.
const MAX_ROWS_PER_FDE: usize = 1 << 16;
/// Estimated bytes of a cached binary besides its ranges.
const BINARY_OVERHEAD: usize = 256;
/// Minimum time between two reads of one process's maps.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Lines of `/proc/PID/maps` read at most.
const MAX_MAPS_LINES: usize = 1 << 20;
/// x86_64 page size: mappings start at page-aligned file offsets.
const PAGE_SIZE: u64 = 4096;

/// Why a binary's frameless ranges could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    #[error("failed to open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse ELF file")]
    Parse(#[from] object::Error),
    #[error("not an x86_64 ELF file")]
    NotX86_64,
    #[error("call frame section of {0} bytes is over the limit")]
    TooLarge(u64),
    #[error("failed to decompress a call frame section")]
    Decompress(#[source] io::Error),
    #[error("unsupported compression of a call frame section")]
    Compression,
}

/// Address ranges of one binary (its own, stated addresses) where the canonical frame address
/// is `rsp + N` for N in 8, 16, 24, 32: no frame, `N / 8 - 1` registers pushed, the return
/// address in the stack slot of that index (`rsp + N - 8`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FramelessRanges {
    /// Sorted, disjoint, adjacent ones of one slot merged; with the slot of the return address.
    ranges: Vec<(Range<u64>, u8)>,
}

/// The slot (`(N - 8) / 8`) of the return address where the CFA is `rsp + N`, for the
/// [`LEAF_SLOTS`] slots the kernel reads.
fn slot_of_cfa_offset(offset: i64) -> Option<u8> {
    if offset < 8 || offset % 8 != 0 {
        return None;
    }
    let slot = (offset - 8) / 8;
    (slot < LEAF_SLOTS as i64).then_some(slot as u8)
}

impl FramelessRanges {
    /// From call frame sections: `eh_frame` at address `eh_frame_svma`, and `debug_frame`.
    /// Malformed entries are skipped; an unreadable section contributes what came before.
    pub fn from_sections(
        eh_frame: Option<(&[u8], u64)>,
        debug_frame: Option<&[u8]>,
        text_svma: u64,
    ) -> Self {
        let mut ranges = Vec::new();
        if let Some((data, svma)) = eh_frame {
            let section = EhFrame::new(data, LittleEndian);
            let bases = BaseAddresses::default()
                .set_eh_frame(svma)
                .set_text(text_svma);
            collect(&section, &bases, &mut ranges);
        }
        if let Some(data) = debug_frame {
            let mut section = DebugFrame::new(data, LittleEndian);
            section.set_address_size(8);
            collect(&section, &BaseAddresses::default(), &mut ranges);
        }
        Self::from_slotted(ranges)
    }

    /// Sorts and merges `ranges`, all with the return address at the stack pointer (slot 0).
    pub fn from_ranges(ranges: Vec<Range<u64>>) -> Self {
        Self::from_slotted(ranges.into_iter().map(|r| (r, 0)).collect())
    }

    /// Sorts and merges `ranges` (with their slots). Where two overlap, the one that starts
    /// first keeps the overlap, whatever the other's slot: sections that agree never do.
    pub fn from_slotted(mut ranges: Vec<(Range<u64>, u8)>) -> Self {
        ranges.retain(|(r, _)| r.start < r.end);
        ranges.sort_unstable_by_key(|(r, _)| r.start);
        let mut merged: Vec<(Range<u64>, u8)> = Vec::with_capacity(ranges.len());
        for (mut r, slot) in ranges {
            if let Some((last, last_slot)) = merged.last_mut()
                && r.start <= last.end
            {
                if *last_slot == slot {
                    last.end = last.end.max(r.end);
                    continue;
                }
                r.start = last.end;
                if r.start >= r.end {
                    continue;
                }
            }
            merged.push((r, slot));
        }
        merged.shrink_to_fit();
        Self { ranges: merged }
    }

    /// Reads the call frame sections of an ELF file (through `data`, which may be a
    /// [`ReadCache`] so that only headers and these sections are read).
    pub fn from_elf<'a, R: ReadRef<'a>>(data: R) -> Result<Self, LeafError> {
        let file = object::File::parse(data)?;
        if file.architecture() != Architecture::X86_64 || !file.is_64() {
            return Err(LeafError::NotX86_64);
        }
        let mut eh_frame = None;
        let mut debug_frame = None;
        let mut pclntab = None;
        let mut text_svma = 0;
        for section in file.sections() {
            match section.name_bytes()? {
                b".text" => text_svma = section.address(),
                b".eh_frame" => eh_frame = Some((section_data(&section)?, section.address())),
                b".debug_frame" | b".zdebug_frame" => debug_frame = Some(section_data(&section)?),
                b".gopclntab" => pclntab = Some(section.index()),
                _ => {}
            }
        }
        let mut found = Self::from_sections(
            eh_frame.as_ref().map(|(d, a)| (d.as_ref(), *a)),
            debug_frame.as_deref(),
            text_svma,
        );
        // A Go binary without `.debug_frame` (linked with `-w`): the same facts from the
        // runtime's own table.
        if debug_frame.is_none()
            && let Some(index) = pclntab
        {
            let section = file.section_by_index(index)?;
            let data = section_data(&section)?;
            match super::gopclntab::frameless_ranges(&data, text_svma, MAX_RANGES) {
                Ok(ranges) => {
                    // Go's frameless functions push nothing: SP delta 0.
                    found.ranges.extend(ranges.into_iter().map(|r| (r, 0)));
                    found = Self::from_slotted(found.ranges);
                }
                Err(e) => tracing::debug!("no frameless ranges from .gopclntab: {e}"),
            }
        }
        Ok(found)
    }

    /// Whether `svma` (an address of the binary) is frameless.
    pub fn contains(&self, svma: u64) -> bool {
        self.slot(svma).is_some()
    }

    /// The stack slot of the return address at `svma` (an address of the binary) when it is
    /// frameless there.
    pub fn slot(&self, svma: u64) -> Option<u8> {
        let i = self.ranges.partition_point(|(r, _)| r.start <= svma);
        let (r, slot) = self.ranges.get(i.checked_sub(1)?)?;
        (svma < r.end).then_some(*slot)
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    fn bytes(&self) -> usize {
        self.ranges.len() * std::mem::size_of::<(Range<u64>, u8)>()
    }
}

/// Bytes of code the FDEs of an `.eh_frame` (with its address) or a `.debug_frame` describe;
/// the DWARF unwinder gives framehop the section that describes more.
pub(crate) fn fde_coverage(eh_frame: Option<(&[u8], u64)>, debug_frame: Option<&[u8]>) -> u64 {
    fn sum<'a, S>(section: &S, bases: &BaseAddresses) -> u64
    where
        S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
    {
        let mut total = 0u64;
        let mut entries = section.entries(bases);
        while let Ok(Some(entry)) = entries.next() {
            if let CieOrFde::Fde(partial) = entry
                && let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o))
            {
                total = total.saturating_add(fde.len());
            }
        }
        total
    }
    let mut total = 0;
    if let Some((data, svma)) = eh_frame {
        let bases = BaseAddresses::default().set_eh_frame(svma);
        total += sum(&EhFrame::new(data, LittleEndian), &bases);
    }
    if let Some(data) = debug_frame {
        let mut section = DebugFrame::new(data, LittleEndian);
        section.set_address_size(8);
        total += sum(&section, &BaseAddresses::default());
    }
    total
}

/// Adds the rows of every FDE of `section` whose CFA is `rsp + N`, N in 8, 16, 24, 32, to
/// `out`, with the slot of their return address.
fn collect<'a, S>(section: &S, bases: &BaseAddresses, out: &mut Vec<(Range<u64>, u8)>)
where
    S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>,
{
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    // A malformed entry ends the pass (its length is what finds the next one).
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else {
            continue;
        };
        let mut rows = 0;
        while let Ok(Some(row)) = table.next_row() {
            rows += 1;
            if rows > MAX_ROWS_PER_FDE || out.len() >= MAX_RANGES {
                break;
            }
            if let CfaRule::RegisterAndOffset { register, offset } = row.cfa()
                && *register == X86_64::RSP
                && let Some(slot) = slot_of_cfa_offset(*offset)
            {
                out.push((row.start_address()..row.end_address(), slot));
            }
        }
        if out.len() >= MAX_RANGES {
            break;
        }
    }
}

/// A section's bytes, decompressed when it is compressed with zlib (ELF `SHF_COMPRESSED` or a
/// GNU `.zdebug_*` section), within [`MAX_CFI_BYTES`] either way.
pub(crate) fn section_data<'a, S: ObjectSection<'a>>(
    section: &S,
) -> Result<Cow<'a, [u8]>, LeafError> {
    let compressed = section.compressed_data()?;
    if compressed.data.len() as u64 > MAX_CFI_BYTES {
        return Err(LeafError::TooLarge(compressed.data.len() as u64));
    }
    match compressed.format {
        CompressionFormat::None => Ok(Cow::Borrowed(compressed.data)),
        CompressionFormat::Zlib => {
            if compressed.uncompressed_size > MAX_CFI_BYTES {
                return Err(LeafError::TooLarge(compressed.uncompressed_size));
            }
            // The stated size is the file's word: it bounds the allocation, and the read stops
            // there whatever the stream holds.
            let mut out = Vec::with_capacity(compressed.uncompressed_size as usize);
            flate2::read::ZlibDecoder::new(compressed.data)
                .take(compressed.uncompressed_size)
                .read_to_end(&mut out)
                .map_err(LeafError::Decompress)?;
            Ok(Cow::Owned(out))
        }
        _ => Err(LeafError::Compression),
    }
}

/// Inserts the caller of a frameless leaf: `user` is a frame-pointer stack of lookup addresses
/// (the sampled ip first), `leaf_ret` the return address read at the stack pointer. The caller
/// goes right after the leaf, as a lookup address (return address minus one), unless the walk
/// already has it there. Returns whether it was inserted.
pub fn insert_caller(user: &mut Vec<u64>, leaf_ret: u64) -> bool {
    if user.is_empty() || leaf_ret == 0 {
        return false;
    }
    let caller = leaf_ret - 1;
    if user.get(1) == Some(&caller) {
        return false;
    }
    user.insert(1, caller);
    true
}

/// Whether the CFI at the sampled ip (`frameless`, from [`LeafResolver::frameless_at`]) puts
/// the return address in the stack slot the kernel found the word in.
fn slot_matches(frameless: Option<Option<u8>>, slot: usize) -> bool {
    frameless.flatten().is_some_and(|s| usize::from(s) == slot)
}

/// Translates a mapping's addresses to the binary's: the value added to the binary's stated
/// addresses in the process (see `unwind.rs`'s `Binary::base_avma`, which framehop needs in
/// the same form).
fn load_bias(segments: &[(u64, u64, u64, bool)], map_start: u64, map_offset: u64) -> Option<u64> {
    let (offset, vaddr, _, _) = segments
        .iter()
        .filter(|(offset, _, filesz, _)| {
            offset & !(PAGE_SIZE - 1) <= map_offset
                && map_offset < offset.saturating_add((*filesz).max(1))
        })
        .max_by_key(|s| s.3)?;
    let svma_at_start = vaddr.wrapping_add(map_offset).wrapping_sub(*offset);
    Some(map_start.wrapping_sub(svma_at_start))
}

/// A parsed binary: its PT_LOAD segments (offset, vaddr, filesz, executable) and ranges.
#[derive(Debug)]
struct LeafBinary {
    segments: Vec<(u64, u64, u64, bool)>,
    frameless: FramelessRanges,
}

/// An executable mapping of a process.
#[derive(Debug)]
struct LeafMapping {
    start: u64,
    end: u64,
    bias: u64,
    main: bool,
    binary: Option<Arc<LeafBinary>>,
}

#[derive(Debug, Default)]
struct LeafProcess {
    mappings: Vec<LeafMapping>,
    last_load: Option<Instant>,
}

/// Counters for self-monitoring and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafStats {
    /// Callers inserted.
    pub inserted: u64,
    /// Stacks with a word at the stack pointer that the CFI at the ip did not confirm.
    pub rejected: u64,
}

/// Frameless ranges of the binaries mapped by observed processes.
pub struct LeafResolver {
    binaries: ByteLru<BinaryId, Option<Arc<LeafBinary>>>,
    processes: HashMap<u32, LeafProcess>,
    stats: LeafStats,
}

impl LeafResolver {
    /// A resolver whose cache of parsed binaries keeps within `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            binaries: ByteLru::new("leaf_binaries", budget),
            processes: HashMap::new(),
            stats: LeafStats::default(),
        }
    }

    pub fn stats(&self) -> LeafStats {
        self.stats
    }

    pub fn stat(&self) -> CacheStat {
        self.binaries.stat()
    }

    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// The text ranges of `pid`'s main executable, for `PROFILE_LEAF`, when it has frameless
    /// code (`None` otherwise, or when it cannot be read). At most [`LEAF_RANGES`] mappings.
    pub fn text_ranges(&mut self, pid: u32) -> Option<LeafText> {
        self.refresh(pid);
        let process = self.processes.get(&pid)?;
        let mut text = LeafText::default();
        let mut n = 0;
        for m in process.mappings.iter().filter(|m| m.main) {
            if m.binary.as_ref().is_none_or(|b| b.frameless.is_empty()) {
                continue;
            }
            if n == LEAF_RANGES {
                break;
            }
            text.ranges[n] = [m.start, m.end];
            n += 1;
        }
        (n > 0).then_some(text)
    }

    /// Inserts the caller of a frameless leaf into `user` (see [`insert_caller`]) when the CFI
    /// of the binary mapped at the sampled ip says it is frameless there with the return
    /// address in the stack slot the kernel found the word in (`leaf_ret`, see
    /// [`leaf_ret_word`]); a word from another slot is a pushed register that held a code
    /// address, and is ignored.
    pub fn fix(&mut self, pid: u32, user: &mut Vec<u64>, leaf_ret: u64) -> bool {
        let Some(&ip) = user.first() else {
            return false;
        };
        let (word, slot) = leaf_ret_word(leaf_ret);
        if word == 0 {
            return false;
        }
        let mut frameless = self.frameless_at(pid, ip);
        if frameless.is_none() {
            // A library loaded since the last read of the maps.
            self.refresh(pid);
            frameless = self.frameless_at(pid, ip);
        }
        if slot_matches(frameless, slot) && insert_caller(user, word) {
            self.stats.inserted += 1;
            true
        } else {
            self.stats.rejected += 1;
            false
        }
    }

    /// `None` when `ip` is in no known executable mapping of `pid`, else the slot of the
    /// return address when `ip` is frameless.
    fn frameless_at(&self, pid: u32, ip: u64) -> Option<Option<u8>> {
        let process = self.processes.get(&pid)?;
        let i = process.mappings.partition_point(|m| m.start <= ip);
        let m = process.mappings.get(i.checked_sub(1)?)?;
        if ip >= m.end {
            return None;
        }
        Some(
            m.binary
                .as_ref()
                .and_then(|b| b.frameless.slot(ip.wrapping_sub(m.bias))),
        )
    }

    /// Re-reads `pid`'s executable mappings (at most once per [`RELOAD_INTERVAL`]).
    fn refresh(&mut self, pid: u32) {
        let process = self.processes.entry(pid).or_default();
        if process
            .last_load
            .is_some_and(|t| t.elapsed() < RELOAD_INTERVAL)
        {
            return;
        }
        process.last_load = Some(Instant::now());
        let main_id = std::fs::metadata(format!("/proc/{pid}/exe"))
            .ok()
            .map(|m| BinaryId::of(&m));
        let Ok(maps) = File::open(format!("/proc/{pid}/maps")) else {
            return;
        };
        let mut reader = io::BufReader::new(maps);
        let mut line = String::new();
        let mut found = Vec::new();
        for _ in 0..MAX_MAPS_LINES {
            line.clear();
            match io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let Some(m) = parse_maps_line(line.trim_end_matches('\n')) else {
                continue;
            };
            if m.executable && m.path.starts_with('/') {
                found.push((m.start, m.end, m.offset, m.path.to_owned()));
            }
        }
        let mut mappings = Vec::with_capacity(found.len());
        for (start, end, offset, path) in found {
            let (binary, id) = self.binary(pid, start, end, &path);
            let bias = binary
                .as_ref()
                .and_then(|b| load_bias(&b.segments, start, offset))
                .unwrap_or(0);
            mappings.push(LeafMapping {
                start,
                end,
                bias,
                main: id.is_some() && id == main_id,
                binary,
            });
        }
        if let Some(process) = self.processes.get_mut(&pid) {
            process.mappings = mappings;
        }
    }

    /// The parsed binary behind a mapping (cached by identity), and that identity.
    fn binary(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        path: &str,
    ) -> (Option<Arc<LeafBinary>>, Option<BinaryId>) {
        let primary = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
        let fallback = PathBuf::from(format!("/proc/{pid}/root{path}"));
        // The fallback path goes through the process's root, which it controls.
        let Ok(file) = crate::untrusted::open_binary(&primary)
            .or_else(|_| crate::untrusted::open_binary(&fallback))
        else {
            return (None, None);
        };
        let Ok(id) = file.metadata().map(|m| BinaryId::of(&m)) else {
            return (None, None);
        };
        if let Some(cached) = self.binaries.get(&id) {
            return (cached.clone(), Some(id));
        }
        let parsed = parse_binary(file)
            .map_err(|e| tracing::debug!("no frameless ranges for {path} in pid {pid}: {e}"))
            .ok()
            .map(Arc::new);
        let bytes = parsed.as_ref().map_or(0, |b| {
            b.frameless.bytes() + b.segments.len() * std::mem::size_of::<(u64, u64, u64, bool)>()
        }) + BINARY_OVERHEAD;
        drop(self.binaries.insert(id, parsed.clone(), bytes));
        (parsed, Some(id))
    }
}

fn parse_binary(file: File) -> Result<LeafBinary, LeafError> {
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache)?;
    let segments = elf
        .segments()
        .map(|s| {
            let (offset, filesz) = s.file_range();
            let executable = match s.flags() {
                SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                _ => false,
            };
            (offset, s.address(), filesz, executable)
        })
        .collect();
    Ok(LeafBinary {
        segments,
        frameless: FramelessRanges::from_elf(&cache)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_answer() {
        let r = FramelessRanges::from_ranges(vec![30..40, 10..20, 20..25, 50..50]);
        assert_eq!(r.ranges, vec![(10..25, 0), (30..40, 0)]);
        assert!(r.contains(10) && r.contains(24) && r.contains(30) && r.contains(39));
        assert!(!r.contains(9) && !r.contains(25) && !r.contains(40) && !r.contains(50));
        assert!(!FramelessRanges::default().contains(0));
    }

    #[test]
    fn ranges_keep_their_slots() {
        // Adjacent ranges of different slots stay apart; an overlap goes to the first one.
        let r = FramelessRanges::from_slotted(vec![
            (10..11, 0),
            (11..12, 1),
            (12..13, 2),
            (13..30, 2),
            (25..40, 3),
            (30..35, 3),
            (50..60, 1),
            (52..55, 0),
        ]);
        assert_eq!(
            r.ranges,
            vec![
                (10..11, 0),
                (11..12, 1),
                (12..30, 2),
                (30..40, 3),
                (50..60, 1)
            ]
        );
        assert_eq!(r.slot(10), Some(0));
        assert_eq!(r.slot(11), Some(1));
        assert_eq!(r.slot(29), Some(2));
        assert_eq!(r.slot(30), Some(3));
        assert_eq!(r.slot(53), Some(1));
        assert_eq!(r.slot(40), None);
        assert_eq!(r.slot(9), None);
        assert_eq!(r.slot(u64::MAX), None);
        assert_eq!(FramelessRanges::default().slot(0), None);
    }

    #[test]
    fn cfa_offsets_to_slots() {
        assert_eq!(slot_of_cfa_offset(8), Some(0));
        assert_eq!(slot_of_cfa_offset(16), Some(1));
        assert_eq!(slot_of_cfa_offset(24), Some(2));
        assert_eq!(slot_of_cfa_offset(32), Some(3));
        // Beyond the words the kernel reads, misaligned, or below the return address.
        for offset in [40, 12, 0, -8, 7, i64::MIN, i64::MAX] {
            assert_eq!(slot_of_cfa_offset(offset), None, "{offset}");
        }
    }

    #[test]
    fn only_the_slot_the_cfi_names_is_a_return_address() {
        use ws1_probe_common::profile::leaf_ret_of;
        for slot in 0..LEAF_SLOTS {
            let (word, at) = leaf_ret_word(leaf_ret_of(0x7fff_ffff_f000, slot));
            assert_eq!((word, at), (0x7fff_ffff_f000, slot));
            assert!(slot_matches(Some(Some(slot as u8)), at));
            // A pushed register that held a code address: another slot than the CFI's.
            for other in (0..LEAF_SLOTS).filter(|o| *o != slot) {
                assert!(!slot_matches(Some(Some(other as u8)), at));
            }
            // Not frameless at the ip, or the ip in no known mapping.
            assert!(!slot_matches(Some(None), at));
            assert!(!slot_matches(None, at));
        }
    }

    #[test]
    fn caller_goes_after_the_leaf() {
        let mut user = vec![0x1000, 0x3000 - 1];
        assert!(insert_caller(&mut user, 0x2000));
        assert_eq!(user, vec![0x1000, 0x1fff, 0x2fff]);
        // Already there (a walk that did not skip it), no word, or no stack: unchanged.
        assert!(!insert_caller(&mut user, 0x2000));
        assert!(!insert_caller(&mut user, 0));
        assert!(!insert_caller(&mut Vec::new(), 0x2000));
        assert_eq!(user.len(), 3);
    }

    #[test]
    fn load_bias_of_pie_and_fixed_executables() {
        // Fixed address (Go): text segment at file offset 0x1000, vaddr 0x401000.
        let segs = [
            (0, 0x400000, 0x1000, false),
            (0x1000, 0x401000, 0x80000, true),
        ];
        assert_eq!(load_bias(&segs, 0x401000, 0x1000), Some(0));
        // PIE mapped at 0x5555_5555_4000 + 0x1000.
        let pie = [(0, 0, 0x600, false), (0x1000, 0x1000, 0x200, true)];
        assert_eq!(
            load_bias(&pie, 0x5555_5555_5000, 0x1000),
            Some(0x5555_5555_4000)
        );
    }

    /// Hand-written `.debug_frame`: a CIE (CFA = rsp + 8, return address at CFA - 8) and three
    /// FDEs, one frameless (no instructions), one that pushes one register after one byte and
    /// one that pushes four, one a byte.
    fn debug_frame() -> Vec<u8> {
        let mut out = Vec::new();
        // CIE: length, id 0xffffffff, version 3, augmentation "", code align 1, data align -8
        // (sleb 0x78), return register 16, DW_CFA_def_cfa rsp(7) 8, DW_CFA_offset r16 1.
        let cie_body: Vec<u8> = [
            &0xffff_ffffu32.to_le_bytes()[..],
            &[3, 0, 1, 0x78, 16, 0x0c, 7, 8, 0x90, 1],
        ]
        .concat();
        let mut cie = (cie_body.len() as u32 + 2).to_le_bytes().to_vec();
        cie.extend(&cie_body);
        cie.extend([0, 0]); // DW_CFA_nop padding
        out.extend(&cie);
        let fde = |start: u64, len: u64, insns: &[u8]| {
            let mut body = 0u32.to_le_bytes().to_vec(); // CIE offset 0
            body.extend(start.to_le_bytes());
            body.extend(len.to_le_bytes());
            body.extend(insns);
            while !(body.len() + 4).is_multiple_of(8) {
                body.push(0);
            }
            let mut f = (body.len() as u32).to_le_bytes().to_vec();
            f.extend(body);
            f
        };
        out.extend(fde(0x1000, 0x20, &[]));
        // DW_CFA_advance_loc 1, DW_CFA_def_cfa_offset 16.
        out.extend(fde(0x2000, 0x40, &[0x41, 0x0e, 16]));
        // DW_CFA_advance_loc 1, DW_CFA_def_cfa_offset 16, 24, 32, 40.
        out.extend(fde(
            0x3000,
            0x10,
            &[
                0x41, 0x0e, 16, 0x41, 0x0e, 24, 0x41, 0x0e, 32, 0x41, 0x0e, 40,
            ],
        ));
        out
    }

    #[test]
    fn debug_frame_rows_with_cfa_rsp_plus_n() {
        let r = FramelessRanges::from_sections(None, Some(&debug_frame()), 0);
        assert_eq!(
            r.ranges,
            vec![
                (0x1000..0x1020, 0),
                (0x2000..0x2001, 0),
                (0x2001..0x2040, 1),
                (0x3000..0x3001, 0),
                (0x3001..0x3002, 1),
                (0x3002..0x3003, 2),
                (0x3003..0x3004, 3),
            ]
        );
        assert!(r.contains(0x1010) && r.contains(0x2000) && r.contains(0x2001));
        // CFA = rsp + 40: beyond the four words the kernel reads.
        assert!(!r.contains(0x3004) && !r.contains(0x300f));
    }

    const C_LEAVES: &str = r#"
__attribute__((noinline)) unsigned long leaf(unsigned long n) {
    unsigned long s = 0;
    for (unsigned long i = 0; i < n; i++) { s += i ^ (s >> 3); __asm__ volatile("" : "+r"(s)); }
    return s;
}
__attribute__((noinline)) unsigned long pushing(unsigned long n) {
    unsigned long s = 0;
    __asm__ volatile("" ::: "rbx", "r12");
    for (unsigned long i = 0; i < n; i++) { s += i ^ (s >> 3); __asm__ volatile("" : "+r"(s)); }
    return s;
}
__attribute__((noinline)) unsigned long framed(unsigned long n) {
    volatile unsigned long buf[64];
    for (unsigned long i = 0; i < 64; i++) buf[i] = leaf(n + i) + pushing(i);
    return buf[n % 64] + leaf(n);
}
int main(int argc, char **argv) { (void)argv; return (int)framed((unsigned long)argc); }
"#;

    /// (address, size) of the function `name` in the ELF file at `path`.
    fn function(path: &std::path::Path, name: &str) -> (u64, u64) {
        use object::ObjectSymbol;
        let data = std::fs::read(path).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let sym = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
        (sym.address(), sym.size())
    }

    /// The frameless leaf and the body of a framed function, as `.eh_frame` and as compressed
    /// `.debug_frame` tell them.
    #[test]
    fn c_leaves_from_eh_frame_and_compressed_debug_frame() {
        let dir = std::env::temp_dir().join(format!("ws1-leaf-unit-{}", std::process::id()));
        let common = [
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-momit-leaf-frame-pointer",
        ];
        let eh = [&common[..], &["-fasynchronous-unwind-tables"]].concat();
        let debug = [
            &common[..],
            &[
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
                "-gz=zlib",
            ],
        ]
        .concat();
        for (name, args, compressed) in [("eh", eh, false), ("dbg", debug, true)] {
            let Some(bin) = crate::profile::fpcheck::compile_c(&dir, name, C_LEAVES, &args) else {
                return;
            };
            let data = std::fs::read(&bin).unwrap();
            let file = object::File::parse(&*data).unwrap();
            let (leaf, leaf_size) = function(&bin, "leaf");
            if compressed {
                let s = file.section_by_name(".debug_frame").expect(".debug_frame");
                assert_eq!(
                    s.compressed_file_range().unwrap().format,
                    CompressionFormat::Zlib
                );
                // Only the compressed section describes the program's own functions.
                let eh = file
                    .section_by_name(".eh_frame")
                    .map(|s| (s.data().unwrap(), s.address()));
                assert!(!FramelessRanges::from_sections(eh, None, 0).contains(leaf));
            }
            let r = FramelessRanges::from_elf(&*data).unwrap();
            let (framed, framed_size) = function(&bin, "framed");
            for at in [leaf, leaf + leaf_size / 2, leaf + leaf_size - 1] {
                assert_eq!(r.slot(at), Some(0), "{name}: leaf+{:#x}", at - leaf);
            }
            // rbx and r12 pushed: the return address two words up in the body, at the stack
            // pointer at the entry.
            let (pushing, pushing_size) = function(&bin, "pushing");
            assert_eq!(r.slot(pushing), Some(0), "{name}: pushing entry");
            assert_eq!(
                r.slot(pushing + pushing_size / 2),
                Some(2),
                "{name}: pushing body"
            );
            // At its entry a framed function has pushed nothing either; in its body it has.
            assert!(r.contains(framed), "{name}: framed entry");
            assert!(!r.contains(framed + framed_size / 2), "{name}: framed body");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_sections_yield_what_parsed() {
        let good = debug_frame();
        for cut in [0, 3, 10, 20, good.len() - 5] {
            let r = FramelessRanges::from_sections(None, Some(&good[..cut]), 0);
            assert!(r.len() <= 7);
        }
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let r = FramelessRanges::from_sections(Some((&junk, 0)), Some(&junk), 0);
        assert!(r.len() <= MAX_RANGES);
    }
}
