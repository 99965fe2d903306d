//! Userspace DWARF unwinding of sampled user stacks.
//!
//! Most binaries (glibc, Rust release builds) keep no frame pointers, so the kernel cannot walk
//! their stacks. For those, the kernel program copies the top of the user stack and the user
//! registers (ip, sp, bp) of each sample, and this module turns them into return addresses with
//! [framehop], using the `.eh_frame` (or `.debug_frame`) call frame information of the binaries
//! mapped in the sampled process.
//!
//! Per process, a framehop unwinder holds one module per executable file mapping. Binaries are
//! read through `/proc/PID/map_files`, which reaches binaries inside containers and deleted
//! files, and each distinct binary is parsed once: its unwind sections are shared by every
//! process that maps it. The `[vdso]` is the same image for every 64-bit process of the running
//! kernel, so the copy mapped into this process stands in for all of them.

use std::{
    collections::HashMap,
    fs::File,
    io,
    ops::Range,
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use super::binary::{BinaryId, ByteLru, CacheBudgets, CacheStat};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Architecture, CompressionFormat, Object, ObjectSection, ObjectSegment, SegmentFlags};

/// Default limit on frames per stack, leaf included. Deeper stacks are cut and reported as
/// incomplete; the kernel side uses the same depth for frame-pointer stacks.
pub const MAX_FRAMES: usize = 127;

/// Estimated bytes of a cached binary besides its unwind sections (segments, ranges, the entry).
const BINARY_OVERHEAD: usize = 512;

/// Processes whose module lists are kept. Callers are expected to [`DwarfUnwinder::forget`]
/// exited processes; the bound protects against a caller that does not.
const MAX_PROCESSES: usize = 1024;

/// How often processes that exited unnoticed are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Entries of the table of binaries in use past which dead ones are swept out.
const LIVE_SWEEP_AT: usize = 256;

/// Estimated bytes of a process's unwinder besides its modules.
const PROCESS_OVERHEAD: usize = 256;
/// Estimated bytes of one module (mapping) of a process's unwinder, without the shared sections.
const MODULE_OVERHEAD: usize = 320;

/// Minimum time between two reads of one process's maps: an address in no known module (JIT
/// code, a library loaded since) would otherwise re-read the maps on every sample.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Lines of `/proc/PID/maps` read at most (the kernel's default `vm.max_map_count` is 65530).
const MAX_MAPS_LINES: usize = 1 << 20;
/// x86_64 page size: mappings start at page-aligned file offsets.
const PAGE_SIZE: u64 = 4096;

/// Why a process's modules, or one of its binaries, could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("failed to read /proc/{pid}/maps")]
    ReadMaps {
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// Both ways to reach a mapped binary failed; `source` is the second failure.
    #[error("failed to open {path} and {fallback}")]
    Open {
        path: PathBuf,
        fallback: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse ELF file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("failed to map {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an x86_64 ELF file")]
    NotX86_64 { path: PathBuf },
    #[error("{path} failed to parse earlier and is not retried")]
    KnownBad { path: PathBuf },
    #[error("{path} has no loadable segment at file offset {offset:#x}")]
    NoSegment { path: PathBuf, offset: u64 },
    #[error("failed to read the vdso of this process")]
    ReadVdso {
        #[source]
        source: io::Error,
    },
    /// The vdso could not be read or parsed before; it is not retried.
    #[error("the vdso of this process is not usable")]
    VdsoUnusable,
}

/// The user registers the kernel program records with each sampled stack.
#[derive(Clone, Copy, Debug, Default)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// An unwound user stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unwound {
    /// Leaf first. Addresses for symbolization: the sampled ip as is, then each return address
    /// minus one, so that a call at the very end of a function still names that function.
    pub frames: Vec<u64>,
    /// The call frame information said there is no caller (the thread's or process's entry
    /// point). False when unwinding stopped on an error, an address in no known binary, the end
    /// of the copied stack bytes, or the frame limit.
    pub complete: bool,
}

/// Counters for self-monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindStats {
    /// Stacks unwound.
    pub unwinds: u64,
    /// Stacks that reached their outermost frame.
    pub complete: u64,
    /// Reads of a known process's maps after an address in no known module.
    pub maps_reloads: u64,
    /// Binaries parsed (cache misses).
    pub binaries_parsed: u64,
}

/// A binary's identity (shared with symbolization and the frame-pointer check).
type FileKey = BinaryId;

/// A PT_LOAD segment, to translate a mapping's file offset into the binary's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    executable: bool,
}

/// The parts of one ELF binary that unwinding needs. Section data is reference counted so that
/// the modules of every process mapping the binary share one copy.
#[derive(Debug, Default)]
struct Binary {
    segments: Vec<Segment>,
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    eh_frame_svma: Option<Range<u64>>,
    eh_frame_hdr_svma: Option<Range<u64>>,
    eh_frame: Option<SectionBytes>,
    eh_frame_hdr: Option<SectionBytes>,
    debug_frame: Option<SectionBytes>,
}

/// What went wrong in [`Binary::parse`], before the caller adds the path.
enum ParseError {
    Object(object::Error),
    NotX86_64,
}

impl From<object::Error> for ParseError {
    fn from(e: object::Error) -> Self {
        Self::Object(e)
    }
}

impl Binary {
    /// Heap bytes held: the copied sections and the segment list.
    fn bytes(&self) -> usize {
        let len = |s: &Option<SectionBytes>| s.as_ref().map_or(0, |s| s.len());
        len(&self.eh_frame)
            + len(&self.eh_frame_hdr)
            + len(&self.debug_frame)
            + self.segments.len() * std::mem::size_of::<Segment>()
    }

    /// Reads segments and finds the unwind sections in `image`, which the sections then refer to
    /// (nothing is copied: of a mapped file, only the pages unwinding touches become resident).
    fn parse(image: &Arc<Image>) -> Result<Self, ParseError> {
        let data = image.bytes();
        let file = object::File::parse(data)?;
        if file.architecture() != Architecture::X86_64 || !file.is_64() {
            return Err(ParseError::NotX86_64);
        }
        let mut binary = Binary {
            segments: file
                .segments()
                .map(|s| {
                    let (offset, filesz) = s.file_range();
                    let executable = match s.flags() {
                        SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
                        _ => false,
                    };
                    Segment {
                        offset,
                        vaddr: s.address(),
                        filesz,
                        executable,
                    }
                })
                .collect(),
            ..Binary::default()
        };
        let mut debug_frame = None;
        for section in file.sections() {
            let svma = section.address()..section.address().saturating_add(section.size());
            let bytes = || -> Result<Option<SectionBytes>, object::Error> {
                // Loaded sections (`.eh_frame*`) are never compressed.
                if section.compressed_file_range()?.format != CompressionFormat::None {
                    return Ok(None);
                }
                Ok(SectionBytes::within(image, section.data()?))
            };
            match section.name_bytes()? {
                b".text" => binary.text_svma = Some(svma),
                b".got" => binary.got_svma = Some(svma),
                b".eh_frame" => {
                    binary.eh_frame_svma = Some(svma);
                    binary.eh_frame = bytes()?;
                }
                b".eh_frame_hdr" => {
                    binary.eh_frame_hdr_svma = Some(svma);
                    binary.eh_frame_hdr = bytes()?;
                }
                b".debug_frame" | b".zdebug_frame" => debug_frame = Some(section.index()),
                _ => {}
            }
        }
        // framehop reads one of the two sections: `.eh_frame` when there is one. A binary
        // built with `-fno-asynchronous-unwind-tables -g` has both, `.eh_frame` holding only
        // the C runtime's few functions and `.debug_frame` the program's; then the section
        // that describes more code is the one given (`leaf::fde_coverage`).
        if let Some(index) = debug_frame {
            let section = file.section_by_index(index)?;
            let data = if section.compressed_file_range()?.format == CompressionFormat::None {
                SectionBytes::within(image, section.data()?)
            } else {
                // Go binaries carry only `.debug_frame`, zlib-compressed: an owned copy,
                // bounded like every call frame section read from an observed process's file.
                super::leaf::section_data(&section)
                    .ok()
                    .map(|data| SectionBytes::owned(data.into_owned()))
            };
            let eh_covers = binary.eh_frame.as_ref().map_or(0, |eh| {
                super::leaf::fde_coverage(
                    Some((
                        &eh[..],
                        binary.eh_frame_svma.as_ref().map_or(0, |r| r.start),
                    )),
                    None,
                )
            });
            if let Some(data) = data
                && super::leaf::fde_coverage(None, Some(&data[..])) > eh_covers
            {
                binary.eh_frame = None;
                binary.eh_frame_svma = None;
                binary.eh_frame_hdr = None;
                binary.eh_frame_hdr_svma = None;
                binary.debug_frame = Some(data);
            }
        }
        Ok(binary)
    }

    /// The load bias of a mapping of this binary that starts at `map_start` with file offset
    /// `map_offset`: the value added to the binary's own (stated) addresses to get addresses in
    /// the process. framehop calls it the module's base address, with the ELF base at zero.
    ///
    /// A mapping starts at the page-aligned offset at or before its segment's `p_offset`, and
    /// the byte at offset `x` of a segment sits at `p_vaddr + (x - p_offset)`. Non-PIE
    /// executables get a bias of zero; the arithmetic wraps because intermediate values may be
    /// "negative".
    fn base_avma(&self, map_start: u64, map_offset: u64) -> Option<u64> {
        let covers = |s: &&Segment| {
            s.offset & !(PAGE_SIZE - 1) <= map_offset
                && map_offset < s.offset.saturating_add(s.filesz.max(1))
        };
        let segment = self
            .segments
            .iter()
            .filter(covers)
            .max_by_key(|s| s.executable)?;
        let svma_at_start = segment
            .vaddr
            .wrapping_add(map_offset)
            .wrapping_sub(segment.offset);
        Some(map_start.wrapping_sub(svma_at_start))
    }

    fn module(&self, name: &str, avma: Range<u64>, base_avma: u64) -> Module<SectionBytes> {
        Module::new(
            name.to_owned(),
            avma,
            base_avma,
            ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: self.text_svma.clone(),
                got_svma: self.got_svma.clone(),
                eh_frame_svma: self.eh_frame_svma.clone(),
                eh_frame: self.eh_frame.clone(),
                eh_frame_hdr_svma: self.eh_frame_hdr_svma.clone(),
                eh_frame_hdr: self.eh_frame_hdr.clone(),
                debug_frame: self.debug_frame.clone(),
                ..ExplicitModuleSectionInfo::default()
            },
        )
    }
}

/// The bytes unwind sections are read from: a binary file mapped read-only (only the pages
/// unwinding touches become resident, and they are the page cache's, shared with the processes
/// running the binary), or an owned copy (the vdso, read from this process's memory).
enum Image {
    Mapped { ptr: *const u8, len: usize },
    Owned(Vec<u8>),
}

// SAFETY: a mapped image is read-only memory that nothing writes to while it is mapped; it is
// unmapped only when the last reference is dropped. Reading it from several threads is fine.
unsafe impl Send for Image {}
// SAFETY: as above; `&Image` only gives out shared byte slices.
unsafe impl Sync for Image {}

impl Image {
    /// Maps all of `file` read-only.
    fn map(file: &File) -> io::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty file"));
        }
        // SAFETY: a new private read-only mapping of a file descriptor we own, at an address the
        // kernel picks; the result is checked for MAP_FAILED before use. The mapping outlives
        // the descriptor, which may be closed afterwards.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::Mapped {
            ptr: ptr.cast::<u8>().cast_const(),
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        match self {
            // SAFETY: `ptr` is a live mapping of `len` readable bytes (see `map`), unmapped only
            // in `drop`, so it outlives the returned borrow of `self`.
            Self::Mapped { ptr, len } => unsafe { std::slice::from_raw_parts(*ptr, *len) },
            Self::Owned(bytes) => bytes,
        }
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if let Self::Mapped { ptr, len } = *self {
            // SAFETY: the mapping made in `map`, unmapped once: no slice of it outlives `self`.
            unsafe { libc::munmap(ptr.cast_mut().cast(), len) };
        }
    }
}

/// A section of an [`Image`], shared by every module that uses it.
#[derive(Clone)]
pub struct SectionBytes {
    image: Arc<Image>,
    range: Range<usize>,
}

impl SectionBytes {
    /// `section`, a slice of `image`'s bytes, as a range of it; `None` if it is not inside.
    fn within(image: &Arc<Image>, section: &[u8]) -> Option<Self> {
        let base = image.bytes().as_ptr() as usize;
        let start = (section.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(section.len())?;
        (end <= image.bytes().len()).then(|| Self {
            image: Arc::clone(image),
            range: start..end,
        })
    }
}

impl SectionBytes {
    /// Bytes held in memory (a decompressed section).
    fn owned(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self {
            image: Arc::new(Image::Owned(bytes)),
            range: 0..len,
        }
    }
}

/// No bytes (framehop's section info has a default for sections a binary lacks).
impl Default for SectionBytes {
    fn default() -> Self {
        Self {
            image: Arc::new(Image::Owned(Vec::new())),
            range: 0..0,
        }
    }
}

impl std::ops::Deref for SectionBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.image
            .bytes()
            .get(self.range.clone())
            .unwrap_or_default()
    }
}

impl std::fmt::Debug for SectionBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SectionBytes({:?})", self.range)
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    pub path: &'a str,
}

pub(crate) fn parse_maps_line(line: &str) -> Option<MapsLine<'_>> {
    let mut rest = line;
    let mut field = || {
        rest = rest.trim_start_matches(' ');
        let end = rest.find(' ').unwrap_or(rest.len());
        let (f, r) = rest.split_at(end);
        rest = r;
        f
    };
    let (start, end) = field().split_once('-')?;
    let perms = field().as_bytes();
    let offset = field();
    let (major, minor) = field().split_once(':')?;
    let inode = field();
    Some(MapsLine {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        executable: perms.get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: rest.trim_start_matches(' '),
    })
}

/// An executable mapping of a process, as last read from its maps.
#[derive(Clone, Debug)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: u64,
    inode: u64,
    /// A framehop module was added for it. Mappings whose binary could not be loaded are kept
    /// too, so that a maps reload does not retry them.
    has_module: bool,
}

impl Mapping {
    fn same_as(&self, other: &Mapping) -> bool {
        (self.start, self.end, self.offset, self.dev, self.inode)
            == (other.start, other.end, other.offset, other.dev, other.inode)
    }
}

/// The modules of one process.
struct Process {
    unwinder: UnwinderX86_64<SectionBytes>,
    /// Sorted by start address, as in the maps file.
    mappings: Vec<Mapping>,
    /// Anonymous executable mappings (JIT code), as last read from the maps.
    anon_exec: Vec<(u64, u64)>,
    last_load: Instant,
    last_used: u64,
}

impl Process {
    /// Whether the unwinder can step from `addr`: a known module, or with `trampolines`
    /// anonymous executable memory.
    fn walkable(&self, addr: u64, trampolines: bool) -> bool {
        self.knows(addr) || (trampolines && self.in_anon_exec(addr))
    }

    /// Whether `addr` lies in anonymous executable memory.
    fn in_anon_exec(&self, addr: u64) -> bool {
        self.anon_exec.iter().any(|&(s, e)| (s..e).contains(&addr))
    }

    /// Whether `addr` lies in a mapping the unwinder has a module for.
    fn knows(&self, addr: u64) -> bool {
        let i = self.mappings.partition_point(|m| m.start <= addr);
        i > 0 && {
            let m = &self.mappings[i - 1];
            addr < m.end && m.has_module
        }
    }

    /// Reads the maps and brings the module list up to date: modules of mappings that are gone
    /// are removed first (a new mapping may reuse the start address), then new mappings are
    /// added. Returns how many mappings have modules.
    fn refresh(&mut self, pid: u32, loader: &mut Loader) -> Result<usize, UnwindError> {
        self.last_load = Instant::now();
        // Streamed line by line: a process decides how big its maps file is (up to
        // vm.max_map_count mappings with paths of up to PATH_MAX bytes, hundreds of MiB), and
        // only its executable file mappings are kept.
        let file = File::open(format!("/proc/{pid}/maps"))
            .map_err(|source| UnwindError::ReadMaps { pid, source })?;
        let mut reader = io::BufReader::with_capacity(64 * 1024, file);
        let mut line = std::mem::take(&mut loader.maps_buf);
        let mut fresh = Vec::with_capacity(self.mappings.len());
        let mut new: Vec<(usize, String)> = Vec::new();
        let mut anon_exec = Vec::new();
        let mut lines = 0usize;
        loop {
            line.clear();
            match io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) => break,
                Ok(_) => {}
                Err(source) => {
                    loader.maps_buf = line;
                    return Err(UnwindError::ReadMaps { pid, source });
                }
            }
            lines += 1;
            if lines > MAX_MAPS_LINES {
                break;
            }
            let Some(parsed) = parse_maps_line(line.trim_end_matches('\n')) else {
                continue;
            };
            if parsed.executable && parsed.path.is_empty() {
                anon_exec.push((parsed.start, parsed.end));
            }
            if !parsed.executable || !(parsed.path.starts_with('/') || parsed.path == "[vdso]") {
                continue;
            }
            let mut mapping = Mapping {
                start: parsed.start,
                end: parsed.end,
                offset: parsed.offset,
                dev: parsed.dev,
                inode: parsed.inode,
                has_module: false,
            };
            match self.mappings.iter().find(|old| old.same_as(&mapping)) {
                Some(old) => mapping.has_module = old.has_module,
                None => new.push((fresh.len(), parsed.path.to_owned())),
            }
            fresh.push(mapping);
        }
        // The line buffer is reused, but not kept large.
        line.clear();
        line.shrink_to(4096);
        loader.maps_buf = line;
        for old in self.mappings.iter().filter(|m| m.has_module) {
            if !fresh.iter().any(|m| m.same_as(old)) {
                self.unwinder.remove_module(old.start);
            }
        }
        for (i, path) in new {
            let path = path.as_str();
            let mapping = &mut fresh[i];
            match loader.module(pid, mapping, path) {
                Ok(module) => {
                    self.unwinder.add_module(module);
                    mapping.has_module = true;
                }
                Err(e) => tracing::debug!("no unwind information for {path} in pid {pid}: {e}"),
            }
        }
        self.mappings = fresh;
        self.anon_exec = anon_exec;
        Ok(self.mappings.iter().filter(|m| m.has_module).count())
    }
}

enum Vdso {
    NotRead,
    Ready(Arc<Binary>),
    Unavailable,
}

/// Loads binaries for processes; kept apart from the processes so both can be borrowed at once.
struct Loader {
    /// Parsed binaries, or `None` for the memory that one failed to parse. Sized by their unwind
    /// sections. Modules of live processes hold their own references, so eviction only costs a
    /// re-parse for the next process that maps the binary.
    binaries: ByteLru<FileKey, Option<Arc<Binary>>>,
    /// Every binary parsed that may still be in use by a process's modules.
    live: HashMap<FileKey, Weak<Binary>>,
    vdso: Vdso,
    /// Reused for every maps read.
    maps_buf: String,
    binaries_parsed: u64,
}

impl Loader {
    fn module(
        &mut self,
        pid: u32,
        mapping: &Mapping,
        path: &str,
    ) -> Result<Module<SectionBytes>, UnwindError> {
        let binary = if path == "[vdso]" {
            self.vdso()?
        } else {
            self.binary(pid, mapping, path)?
        };
        let base = binary
            .base_avma(mapping.start, mapping.offset)
            .ok_or_else(|| UnwindError::NoSegment {
                path: PathBuf::from(path),
                offset: mapping.offset,
            })?;
        Ok(binary.module(path, mapping.start..mapping.end, base))
    }

    /// The binary behind a file mapping, from the cache or parsed now.
    fn binary(
        &mut self,
        pid: u32,
        mapping: &Mapping,
        path: &str,
    ) -> Result<Arc<Binary>, UnwindError> {
        // `map_files` names use unpadded hex, unlike the maps file.
        let primary = PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            mapping.start, mapping.end
        ));
        let fallback = PathBuf::from(format!("/proc/{pid}/root{path}"));
        // The fallback path goes through the process's root, which it controls.
        let file = crate::untrusted::open_binary(&primary)
            .or_else(|_| crate::untrusted::open_binary(&fallback))
            .map_err(|source| UnwindError::Open {
                path: primary,
                fallback,
                source,
            })?;
        let path = PathBuf::from(path);
        let key = file
            .metadata()
            .map(|m| BinaryId::of(&m))
            .map_err(|source| UnwindError::Stat {
                path: path.clone(),
                source,
            })?;

        if let Some(cached) = self.binaries.get(&key) {
            return cached.clone().ok_or(UnwindError::KnownBad { path });
        }

        self.binaries_parsed += 1;
        // A binary a live process still has a module of is shared, even when the cache let go
        // of it: one copy per binary, however many processes map it.
        if let Some(binary) = self.live.get(&key).and_then(Weak::upgrade) {
            let bytes = binary.bytes() + BINARY_OVERHEAD;
            drop(self.binaries.insert(key, Some(Arc::clone(&binary)), bytes));
            return Ok(binary);
        }
        let parsed = Image::map(&file)
            .map_err(|source| UnwindError::Map {
                path: path.clone(),
                source,
            })
            .and_then(|image| {
                Binary::parse(&Arc::new(image)).map_err(|e| match e {
                    ParseError::NotX86_64 => UnwindError::NotX86_64 { path: path.clone() },
                    ParseError::Object(source) => UnwindError::Parse {
                        path: path.clone(),
                        source,
                    },
                })
            })
            .map(Arc::new);
        if self.live.len() >= LIVE_SWEEP_AT {
            self.live.retain(|_, w| w.strong_count() > 0);
        }
        if let Ok(binary) = &parsed {
            self.live.insert(key, Arc::downgrade(binary));
        }
        let cached = parsed.as_ref().ok().cloned();
        let bytes = cached.as_deref().map_or(0, Binary::bytes) + BINARY_OVERHEAD;
        drop(self.binaries.insert(key, cached, bytes));
        parsed
    }

    /// The vdso image mapped into this process, which every 64-bit process of this kernel maps
    /// too. It is read once from our own memory.
    fn vdso(&mut self) -> Result<Arc<Binary>, UnwindError> {
        match &self.vdso {
            Vdso::Ready(binary) => return Ok(binary.clone()),
            Vdso::Unavailable => return Err(UnwindError::VdsoUnusable),
            Vdso::NotRead => {}
        }
        let image = match read_own_vdso() {
            Ok(image) => image,
            Err(source) => {
                self.vdso = Vdso::Unavailable;
                return Err(UnwindError::ReadVdso { source });
            }
        };
        match Binary::parse(&Arc::new(Image::Owned(image))) {
            Ok(binary) => {
                let binary = Arc::new(binary);
                self.vdso = Vdso::Ready(binary.clone());
                Ok(binary)
            }
            Err(_) => {
                self.vdso = Vdso::Unavailable;
                Err(UnwindError::VdsoUnusable)
            }
        }
    }
}

/// Copies this process's `[vdso]` mapping. The vdso is built so that its file layout equals its
/// memory layout, so the copy parses as an ELF file.
fn read_own_vdso() -> io::Result<Vec<u8>> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let line = maps
        .lines()
        .filter_map(parse_maps_line)
        .find(|l| l.path == "[vdso]")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no [vdso] mapping"))?;
    let len = usize::try_from(line.end - line.start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "vdso mapping too large"))?;
    let mut image = vec![0u8; len];
    File::open("/proc/self/mem")?.read_exact_at(&mut image, line.start)?;
    Ok(image)
}

/// Unwinds sampled user stacks of many processes with their binaries' call frame information.
pub struct DwarfUnwinder {
    processes: HashMap<u32, Process>,
    loader: Loader,
    /// framehop's rule cache, shared by all processes (framehop keys it by module generation).
    cache: CacheX86_64,
    max_frames: usize,
    reload_interval: Duration,
    /// CPython processes: their anonymous executable code may be `-X perf` trampolines, which
    /// are stepped across (see [`frame_pointers_in_jit`](Self::frame_pointers_in_jit)).
    fp_in_jit: std::collections::HashSet<u32>,
    tick: u64,
    last_sweep: Instant,
    stats: UnwindStats,
}

impl Default for DwarfUnwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl DwarfUnwinder {
    /// An unwinder with the default frame limit, [`MAX_FRAMES`].
    pub fn new() -> Self {
        Self::with_max_frames(MAX_FRAMES)
    }

    /// An unwinder that stops after `max_frames` frames (at least one: the sampled ip).
    pub fn with_max_frames(max_frames: usize) -> Self {
        Self::with_budget(max_frames, CacheBudgets::default().unwind_binaries)
    }

    /// An unwinder whose cache of parsed binaries keeps within `budget` bytes.
    pub fn with_budget(max_frames: usize, budget: usize) -> Self {
        Self {
            processes: HashMap::new(),
            loader: Loader {
                binaries: ByteLru::new("unwind_binaries", budget),
                live: HashMap::new(),
                vdso: Vdso::NotRead,
                maps_buf: String::new(),
                binaries_parsed: 0,
            },
            cache: CacheX86_64::new(),
            max_frames: max_frames.max(1),
            reload_interval: RELOAD_INTERVAL,
            fp_in_jit: std::collections::HashSet::new(),
            tick: 0,
            last_sweep: Instant::now(),
            stats: UnwindStats::default(),
        }
    }

    /// The most frames one stack yields.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// Counters since creation, for self-monitoring.
    pub fn stats(&self) -> UnwindStats {
        UnwindStats {
            binaries_parsed: self.loader.binaries_parsed,
            ..self.stats
        }
    }

    /// Loads (or re-reads, ignoring the rate limit) the modules of `pid` now, so that its first
    /// sample does not pay for parsing binaries. Returns the number of modules.
    pub fn preload(&mut self, pid: u32) -> Result<usize, UnwindError> {
        if let Some(process) = self.processes.get_mut(&pid) {
            return process.refresh(pid, &mut self.loader);
        }
        self.insert_process(pid)
    }

    /// Size of the cache of parsed binaries, and of the processes' module lists (bounded by the
    /// live processes, which [`forget`](Self::forget) drops as they exit).
    pub fn cache_stats(&self) -> Vec<CacheStat> {
        let modules: usize = self.processes.values().map(|p| p.mappings.len()).sum();
        vec![
            self.loader.binaries.stat(),
            CacheStat {
                name: "unwind_processes",
                bytes: (self.processes.len() * PROCESS_OVERHEAD + modules * MODULE_OVERHEAD) as u64,
                entries: self.processes.len() as u64,
                budget: 0,
                evictions: 0,
            },
        ]
    }

    /// Drops what is kept for an exited process. A later process with a reused pid starts over.
    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
        self.fp_in_jit.remove(&pid);
    }

    /// Steps across the anonymous executable code of `pid` as CPython's `-X perf` trampolines
    /// (3.12 `Python/asm_trampoline.S`: `push rbp; mov rbp, rsp; call *rcx; pop rbp; ret`)
    /// instead of ending its stacks there: at the trampoline's return address the stack holds
    /// the saved rbp and then its caller's return address. Only the stack pointer, which the
    /// callee's CFI restored, is relied on (the interpreter uses rbp as a general register).
    pub fn frame_pointers_in_jit(&mut self, pid: u32) {
        self.fp_in_jit.insert(pid);
    }

    /// Unwinds one sample of `pid`: `stack` holds the bytes copied from `regs.sp` upwards.
    /// Never fails: at worst the stack is the sampled ip alone, marked incomplete. The modules
    /// of a process seen for the first time are loaded now, which costs milliseconds; see
    /// [`preload`](Self::preload).
    pub fn unwind(&mut self, pid: u32, regs: UserRegs, stack: &[u8]) -> Unwound {
        let mut out = Unwound {
            frames: Vec::with_capacity(32),
            complete: false,
        };
        self.unwind_into(pid, regs, stack, &mut out);
        out
    }

    /// Like [`unwind`](Self::unwind), reusing `out`'s frame buffer.
    pub fn unwind_into(&mut self, pid: u32, regs: UserRegs, stack: &[u8], out: &mut Unwound) {
        out.frames.clear();
        out.complete = false;
        self.stats.unwinds += 1;
        self.tick += 1;
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            // Processes that exited without the caller's `forget` (between two of its updates).
            self.last_sweep = Instant::now();
            self.processes
                .retain(|pid, _| super::symbols::process_alive(*pid));
        }
        if !self.processes.contains_key(&pid)
            && let Err(e) = self.insert_process(pid)
        {
            tracing::debug!("cannot unwind pid {pid}: {e}");
        }
        let Some(process) = self.processes.get_mut(&pid) else {
            out.frames.push(regs.ip);
            return;
        };
        process.last_used = self.tick;
        let fp_jit = self.fp_in_jit.contains(&pid);

        // Reads outside the copied bytes fail the step, which ends the stack as truncated.
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let start = usize::try_from(addr.checked_sub(regs.sp).ok_or(())?).map_err(|_| ())?;
            let bytes = stack
                .get(start..start.checked_add(8).ok_or(())?)
                .ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let mut fh_regs = UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp);
        let mut address = FrameAddress::from_instruction_pointer(regs.ip);
        loop {
            let lookup = address.address_for_lookup();
            out.frames.push(lookup);
            // framehop would guess with frame pointers in unknown code, which mostly yields
            // garbage for the binaries this unwinder exists for; stop instead, after giving a
            // library loaded since the last maps read a chance.
            // (Except in the JIT code of a process marked by `frame_pointers_in_jit`.)
            if !process.walkable(lookup, fp_jit) {
                if process.last_load.elapsed() < self.reload_interval {
                    break;
                }
                self.stats.maps_reloads += 1;
                if let Err(e) = process.refresh(pid, &mut self.loader) {
                    tracing::debug!("cannot reload modules of pid {pid}: {e}");
                }
                if !process.walkable(lookup, fp_jit) {
                    break;
                }
            }
            if out.frames.len() >= self.max_frames {
                break;
            }
            if fp_jit
                && !process.knows(lookup)
                && process.in_anon_exec(lookup)
                && let FrameAddress::ReturnAddress(_) = address
            {
                let sp = fh_regs.sp();
                let (Ok(bp), Ok(ra)) = (read_stack(sp), read_stack(sp.wrapping_add(8))) else {
                    break;
                };
                fh_regs.set_sp(sp + 16);
                fh_regs.set_bp(bp);
                fh_regs.set_ip(ra);
                match FrameAddress::from_return_address(ra) {
                    Some(next) => {
                        address = next;
                        continue;
                    }
                    None => break,
                }
            }
            match process.unwinder.unwind_frame(
                address,
                &mut fh_regs,
                &mut self.cache,
                &mut read_stack,
            ) {
                Ok(Some(return_address)) => match FrameAddress::from_return_address(return_address)
                {
                    Some(next) => address = next,
                    None => {
                        out.complete = true;
                        break;
                    }
                },
                Ok(None) => {
                    out.complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
        if out.complete {
            self.stats.complete += 1;
        }
    }

    fn insert_process(&mut self, pid: u32) -> Result<usize, UnwindError> {
        if self.processes.len() >= MAX_PROCESSES
            && let Some(oldest) = self
                .processes
                .iter()
                .min_by_key(|(_, p)| p.last_used)
                .map(|(pid, _)| *pid)
        {
            self.processes.remove(&oldest);
        }
        let mut process = Process {
            unwinder: UnwinderX86_64::new(),
            mappings: Vec::new(),
            anon_exec: Vec::new(),
            last_load: Instant::now(),
            last_used: self.tick,
        };
        let modules = process.refresh(pid, &mut self.loader)?;
        self.processes.insert(pid, process);
        Ok(modules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::Symbolizer;
    use object::ObjectSymbol;
    use std::{ffi::c_void, hint::black_box};

    /// What the kernel program copies: 16 KiB of stack from the stack pointer.
    const STACK_COPY: usize = 16 * 1024;

    /// Held by tests that change this process's executable mappings (dlopen) and by tests that
    /// need them unchanged for a while; tests run in parallel threads of one process.
    static MAPS_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    struct Capture {
        regs: UserRegs,
        stack: Vec<u8>,
    }

    /// Records the current function's ip, sp and bp and copies its stack, as the kernel
    /// program does for a sample taken at this point of the function.
    macro_rules! capture {
        () => {{
            let (ip, sp, bp): (u64, u64, u64);
            // SAFETY: the instructions only copy rip, rsp and rbp into output registers; they
            // touch no memory and leave the stack alone.
            unsafe {
                std::arch::asm!(
                    "lea {ip}, [rip]",
                    "mov {sp}, rsp",
                    "mov {bp}, rbp",
                    ip = out(reg) ip,
                    sp = out(reg) sp,
                    bp = out(reg) bp,
                    options(nomem, nostack, preserves_flags),
                )
            };
            Capture {
                regs: UserRegs { ip, sp, bp },
                stack: copy_own_stack(sp),
            }
        }};
    }

    /// Copies up to [`STACK_COPY`] bytes from `sp`, stopping where the stack mapping ends. The
    /// copy runs in frames below `sp`, so the copied bytes are the capturing function's and
    /// its callers'.
    fn copy_own_stack(sp: u64) -> Vec<u8> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let end = maps
            .lines()
            .filter_map(parse_maps_line)
            .find(|l| l.start <= sp && sp < l.end)
            .expect("stack mapping")
            .end;
        let mut stack = vec![0u8; (end - sp).min(STACK_COPY as u64) as usize];
        File::open("/proc/self/mem")
            .unwrap()
            .read_exact_at(&mut stack, sp)
            .unwrap();
        stack
    }

    /// Runs `f` on a thread with a stack far bigger than the copy.
    fn on_big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[inline(never)]
    fn unwind_probe_outer() -> Capture {
        black_box(unwind_probe_middle())
    }

    #[inline(never)]
    fn unwind_probe_middle() -> Capture {
        black_box(unwind_probe_inner())
    }

    #[inline(never)]
    fn unwind_probe_inner() -> Capture {
        capture!()
    }

    #[inline(never)]
    fn unwind_probe_recurse(depth: u32) -> Capture {
        if depth == 0 {
            return capture!();
        }
        black_box(unwind_probe_recurse(black_box(depth - 1)))
    }

    /// Function names of `frames`, one address at a time: blazesym fails a whole batch when
    /// one binary cannot be read (this machine's libc has zlib-compressed debug sections).
    fn names(frames: &[u64]) -> Vec<String> {
        let symbolizer = Symbolizer::new();
        frames
            .iter()
            .map(|&addr| {
                symbolizer
                    .user_frames(std::process::id(), &[addr])
                    .pop()
                    .and_then(|f| f.function)
                    .unwrap_or_default()
            })
            .collect()
    }

    fn position(names: &[String], function: &str) -> Option<usize> {
        names.iter().position(|n| n.ends_with(function))
    }

    #[test]
    fn parses_maps_lines() {
        let line = "00400000-00452000 r-xp 00001000 fd:01 1234567    /usr/bin/my prog";
        assert_eq!(
            parse_maps_line(line),
            Some(MapsLine {
                start: 0x400000,
                end: 0x452000,
                executable: true,
                offset: 0x1000,
                dev: (0xfd << 32) | 1,
                inode: 1234567,
                path: "/usr/bin/my prog",
            })
        );
        let vdso = parse_maps_line("7ffd1b7f0000-7ffd1b7f2000 r-xp 00000000 00:00 0   [vdso]");
        assert_eq!(
            vdso.map(|l| (l.start, l.path)),
            Some((0x7ffd1b7f0000, "[vdso]"))
        );
        let anon = parse_maps_line("7f0000000000-7f0000021000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(!anon.executable);
        assert_eq!(anon.path, "");
        assert_eq!(parse_maps_line("garbage"), None);
    }

    #[test]
    fn computes_load_bias_from_segments() {
        let segment = |offset, vaddr, filesz, executable| Segment {
            offset,
            vaddr,
            filesz,
            executable,
        };
        // PIE / shared library, linked with separate code segments (GNU ld).
        let pie = Binary {
            segments: vec![
                segment(0, 0, 0x800, false),
                segment(0x1000, 0x1000, 0x3000, true),
                segment(0x4000, 0x4000, 0x500, false),
            ],
            ..Binary::default()
        };
        assert_eq!(
            pie.base_avma(0x5555_5555_6000, 0x1000),
            Some(0x5555_5555_5000)
        );
        // Non-PIE executable: addresses are absolute, the bias is zero.
        let fixed = Binary {
            segments: vec![
                segment(0, 0x400000, 0x800, false),
                segment(0x1000, 0x401000, 0x3000, true),
            ],
            ..Binary::default()
        };
        assert_eq!(fixed.base_avma(0x401000, 0x1000), Some(0));
        // lld: the code segment's address is its offset plus a page, and its offset is not
        // page aligned, so its mapping starts at offset 0, one page after the read-only one
        // that also covers offset 0.
        let lld = Binary {
            segments: vec![
                segment(0, 0, 0x540, false),
                segment(0x540, 0x1540, 0x2000, true),
            ],
            ..Binary::default()
        };
        assert_eq!(lld.base_avma(0x7f00_0000_1000, 0), Some(0x7f00_0000_0000));
        assert_eq!(
            lld.base_avma(0x7f00_0000_2000, 0x1000),
            Some(0x7f00_0000_0000)
        );
        assert_eq!(lld.base_avma(0x7f00_0000_4000, 0x9000), None);
    }

    #[test]
    fn unwinds_own_stack_to_thread_entry() {
        let capture = on_big_stack(unwind_probe_outer);
        let mut unwinder = DwarfUnwinder::new();
        let out = unwinder.unwind(std::process::id(), capture.regs, &capture.stack);
        let names = names(&out.frames);
        assert_eq!(out.frames[0], capture.regs.ip);
        assert_eq!(position(&names, "unwind_probe_inner"), Some(0), "{names:?}");
        assert_eq!(
            position(&names, "unwind_probe_middle"),
            Some(1),
            "{names:?}"
        );
        assert_eq!(position(&names, "unwind_probe_outer"), Some(2), "{names:?}");
        assert!(out.complete, "{names:?}");
        assert_eq!(unwinder.stats().complete, 1);

        // A process mapping the same binaries (here: this one, loaded afresh) reuses the
        // parsed binaries.
        let _maps_unchanged = MAPS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        unwinder.preload(std::process::id()).unwrap();
        let parsed = unwinder.stats().binaries_parsed;
        assert!(parsed >= 2, "the test binary and libc at least");
        unwinder.forget(std::process::id());
        let again = unwinder.unwind(std::process::id(), capture.regs, &capture.stack);
        assert_eq!(again, out);
        assert_eq!(unwinder.stats().binaries_parsed, parsed);
    }

    #[test]
    fn short_stack_copy_is_incomplete() {
        let capture = on_big_stack(unwind_probe_outer);
        let mut unwinder = DwarfUnwinder::new();
        let pid = std::process::id();
        let full = unwinder.unwind(pid, capture.regs, &capture.stack);
        let short = unwinder.unwind(pid, capture.regs, &capture.stack[..64]);
        assert!(!short.complete);
        assert!(
            short.frames.len() < full.frames.len(),
            "{short:?} vs {full:?}"
        );
        assert_eq!(short.frames[..], full.frames[..short.frames.len()]);

        let mut limited = DwarfUnwinder::with_max_frames(2);
        let cut = limited.unwind(pid, capture.regs, &capture.stack);
        assert_eq!(cut.frames[..], full.frames[..2]);
        assert!(!cut.complete);
    }

    #[test]
    fn ip_in_no_module_gives_one_frame() {
        let mut unwinder = DwarfUnwinder::new();
        let pid = std::process::id();
        let regs = UserRegs {
            ip: 0x10,
            sp: 0x1000,
            bp: 0x1010,
        };
        let stack = [0u8; 64];
        let expected = Unwound {
            frames: vec![0x10],
            complete: false,
        };
        assert_eq!(unwinder.unwind(pid, regs, &stack), expected);
        // The maps were read a moment ago: no reload yet.
        assert_eq!(unwinder.stats().maps_reloads, 0);
        unwinder.reload_interval = Duration::ZERO;
        assert_eq!(unwinder.unwind(pid, regs, &stack), expected);
        assert_eq!(unwinder.stats().maps_reloads, 1);

        // A process that does not exist (above the largest pid_max) is not kept.
        assert_eq!(unwinder.unwind(0x7fff_fff0, regs, &stack), expected);
        assert!(!unwinder.processes.contains_key(&0x7fff_fff0));
        assert!(matches!(
            unwinder.preload(0x7fff_fff0),
            Err(UnwindError::ReadMaps { .. })
        ));
    }

    #[test]
    fn unwinds_from_the_vdso() {
        let image = read_own_vdso().expect("vdso");
        let file = object::File::parse(&image[..]).unwrap();
        let function = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok("__vdso_clock_gettime"))
            .map(|s| s.address())
            .expect("__vdso_clock_gettime");
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let vdso_start = maps
            .lines()
            .filter_map(parse_maps_line)
            .find(|l| l.path == "[vdso]")
            .unwrap()
            .start;

        // A sample on the first instruction of clock_gettime called from the captured point:
        // the return address is on top of the stack.
        let capture = on_big_stack(unwind_probe_outer);
        let mut stack = capture.regs.ip.to_le_bytes().to_vec();
        stack.extend_from_slice(&capture.stack);
        let regs = UserRegs {
            ip: vdso_start + function,
            sp: capture.regs.sp - 8,
            bp: capture.regs.bp,
        };
        let out = DwarfUnwinder::new().unwind(std::process::id(), regs, &stack);
        assert_eq!(out.frames[0], vdso_start + function);
        assert_eq!(out.frames[1], capture.regs.ip - 1);
        let names = names(&out.frames);
        assert_eq!(position(&names, "unwind_probe_inner"), Some(1), "{names:?}");
        assert_eq!(position(&names, "unwind_probe_outer"), Some(3), "{names:?}");
        assert!(out.complete);
    }

    type CFrame = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, i64) -> i64;

    extern "C" fn unwind_probe_callback(slot: *mut c_void) {
        // SAFETY: `slot` is the `Option<Capture>` that unwind_probe_through_c passes to the C
        // function, which passes it here unchanged while that caller waits.
        let slot = unsafe { &mut *slot.cast::<Option<Capture>>() };
        *slot = Some(unwind_probe_inner());
    }

    #[inline(never)]
    fn unwind_probe_through_c(c_frame: CFrame) -> Capture {
        let mut slot: Option<Capture> = None;
        // SAFETY: `c_frame` is unwind_c_frame from the test library, whose signature CFrame
        // matches; it calls the callback once with the slot pointer and returns.
        let sum = unsafe { c_frame(unwind_probe_callback, (&raw mut slot).cast::<c_void>(), 3) };
        black_box(sum);
        slot.expect("callback ran")
    }

    /// A library loaded after the unwinder read the maps, built without frame pointers, so
    /// only its call frame information leads through it.
    #[test]
    fn finds_library_loaded_later() {
        unwinds_through_library(
            "libunwindtest.so",
            &["-O2", "-fomit-frame-pointer", "-shared", "-fPIC"],
        );
    }

    /// The same with the library's functions described only by `.debug_frame` (its `.eh_frame`
    /// is empty; `-gz` leaves a section this small uncompressed): the section framehop is
    /// given is the one that describes more code. (Compressed sections: `leaf.rs`'s tests.)
    #[test]
    fn unwinds_with_debug_frame_where_eh_frame_lacks_the_function() {
        unwinds_through_library(
            "libunwinddbg.so",
            &[
                "-O2",
                "-fomit-frame-pointer",
                "-shared",
                "-fPIC",
                "-g",
                "-gz=zlib",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
            ],
        );
    }

    fn unwinds_through_library(file: &str, flags: &[&str]) {
        const LIBRARY: &str = r#"
typedef void (*callback)(void *);
__attribute__((noinline)) long unwind_c_frame(callback cb, void *arg, long n) {
    volatile long buf[32];
    for (long i = 0; i < 32; i++) buf[i] = i * n;
    cb(arg);
    long s = 0;
    for (long i = 0; i < 32; i++) s += buf[i];
    return s;
}
"#;
        let dir =
            std::env::temp_dir().join(format!("ws1-unwind-dlopen-{}-{file}", std::process::id()));
        let Some(library) = crate::profile::fpcheck::compile_c(&dir, file, LIBRARY, flags) else {
            return;
        };
        let pid = std::process::id();
        let mut unwinder = DwarfUnwinder::new();
        unwinder.preload(pid).unwrap();
        unwinder.reload_interval = Duration::ZERO;

        let path = std::ffi::CString::new(library.as_os_str().as_encoded_bytes()).unwrap();
        let maps_change = MAPS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `path` is a NUL-terminated path of a library with no initializers.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        assert!(!handle.is_null(), "dlopen {library:?}");
        // SAFETY: `handle` is a live handle from dlopen and the name is NUL-terminated.
        let symbol = unsafe { libc::dlsym(handle, c"unwind_c_frame".as_ptr()) };
        assert!(!symbol.is_null());
        // SAFETY: the symbol is the C function above, whose signature CFrame matches.
        let c_frame = unsafe { std::mem::transmute::<*mut c_void, CFrame>(symbol) };
        drop(maps_change);

        let capture = on_big_stack(move || unwind_probe_through_c(c_frame));
        let out = unwinder.unwind(pid, capture.regs, &capture.stack);
        let names = names(&out.frames);
        let order: Vec<Option<usize>> = [
            "unwind_probe_inner",
            "unwind_probe_callback",
            "unwind_c_frame",
            "unwind_probe_through_c",
        ]
        .iter()
        .map(|f| position(&names, f))
        .collect();
        assert_eq!(order, [Some(0), Some(1), Some(2), Some(3)], "{names:?}");
        assert!(out.complete, "{names:?}");
        assert_eq!(unwinder.stats().maps_reloads, 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn unwinds_deep_stacks_and_reports_cost() {
        const DEPTH: u32 = 20;
        let capture = on_big_stack(|| unwind_probe_recurse(DEPTH));
        let mut unwinder = DwarfUnwinder::new();
        let pid = std::process::id();
        let started = Instant::now();
        let out = unwinder.unwind(pid, capture.regs, &capture.stack);
        let first = started.elapsed();
        let names = names(&out.frames);
        let recursions = names
            .iter()
            .filter(|n| n.ends_with("unwind_probe_recurse"))
            .count();
        assert_eq!(recursions, DEPTH as usize + 1, "{names:?}");
        assert!(out.complete, "{names:?}");

        const ROUNDS: u32 = 2000;
        let mut reused = Unwound::default();
        let started = Instant::now();
        for _ in 0..ROUNDS {
            unwinder.unwind_into(pid, capture.regs, &capture.stack, &mut reused);
        }
        let warm = started.elapsed() / ROUNDS;
        assert_eq!(reused, out);
        // With an empty rule cache each frame's rule comes from its FDE, as for stacks never
        // seen before.
        let started = Instant::now();
        for _ in 0..ROUNDS {
            unwinder.cache = CacheX86_64::new();
            unwinder.unwind_into(pid, capture.regs, &capture.stack, &mut reused);
        }
        let cold = started.elapsed() / ROUNDS;
        assert_eq!(reused, out);
        eprintln!(
            "{} frames: first unwind (loading modules) {first:?}, then {warm:?} each with \
             cached rules, {cold:?} each without",
            out.frames.len()
        );
    }

    /// Property tests: `/proc/PID/maps` lines and ELF files are what observed processes make.
    mod fuzz {
        use super::*;
        use crate::untrusted::fuzz::{config, mutated, small_elf};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(config(256))]

            #[test]
            fn maps_lines_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
                let _ = parse_maps_line(&String::from_utf8_lossy(&bytes));
            }

            #[test]
            fn maps_lines_round_trip(
                start in any::<u64>(),
                end in any::<u64>(),
                x in any::<bool>(),
                offset in any::<u64>(),
                major in 0u64..0x1000,
                minor in 0u64..0x100000,
                inode in any::<u64>(),
                path in proptest::collection::vec(0x20u8..0x7f, 0..60),
            ) {
                let path = String::from_utf8(path).unwrap();
                let path = path.trim_start_matches(' ');
                let perms = if x { "r-xp" } else { "rw-p" };
                let line = format!(
                    "{start:08x}-{end:08x} {perms} {offset:08x} {major:02x}:{minor:02x} {inode}    {path}"
                );
                let parsed = parse_maps_line(&line).unwrap();
                prop_assert_eq!(
                    parsed,
                    MapsLine { start, end, executable: x, offset, dev: (major << 32) | minor, inode, path }
                );
            }

            /// A damaged or truncated ELF file is an error or a binary with sections inside the
            /// image; unwinding through it ends, never panics.
            #[test]
            fn damaged_elf_never_panics(bytes in mutated(small_elf())) {
                let image = Arc::new(Image::Owned(bytes));
                let Ok(binary) = Binary::parse(&image) else {
                    return Ok(());
                };
                let _ = binary.bytes();
                let Some(base) = binary.base_avma(0x5555_0000_0000, 0) else {
                    return Ok(());
                };
                let text = binary.text_svma.clone().unwrap_or(0..0x1000);
                let avma = 0x5555_0000_0000..0x5555_0000_0000 + text.end.clamp(0x1000, 1 << 30);
                let mut unwinder = UnwinderX86_64::new();
                unwinder.add_module(binary.module("fuzz", avma, base));
                let mut cache = CacheX86_64::new();
                let stack = [0u8; 256];
                let sp = 0x7fff_0000_0000u64;
                let mut read_stack = |addr: u64| -> Result<u64, ()> {
                    let at = usize::try_from(addr.checked_sub(sp).ok_or(())?).map_err(|_| ())?;
                    let b = stack.get(at..at + 8).ok_or(())?;
                    Ok(u64::from_le_bytes(b.try_into().map_err(|_| ())?))
                };
                for pc in [text.start, text.start + (text.end - text.start) / 2] {
                    let mut regs = UnwindRegsX86_64::new(base.wrapping_add(pc), sp, sp);
                    let _ = unwinder.unwind_frame(
                        FrameAddress::from_instruction_pointer(base.wrapping_add(pc)),
                        &mut regs,
                        &mut cache,
                        &mut read_stack,
                    );
                }
            }
        }
    }
}
