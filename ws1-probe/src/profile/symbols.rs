//! Turning profile addresses into [`ProfFrame`]s: user addresses through the binaries they are in
//! (ELF symbols and DWARF, with inline frames and `file:line`), JIT code through perf maps, and
//! kernel addresses through `/proc/kallsyms`.
//!
//! Everything is local and lazy: a binary is opened the first time one of its addresses is
//! asked for, and what it said is cached by (build id, file offset). Keying on the build id
//! rather than on the process or the path means the same libc code sampled in a hundred
//! processes, or in a hundred successive reports, is symbolized once; binaries without a build
//! id fall back to their file identity (device, inode, size, mtime).
//!
//! Binaries are reached through `/proc/PID/map_files`, which opens the very file a process
//! mapped even when it lives in a container's mount namespace or was deleted since (a package
//! upgrade). Without the capability that needs, the process's own root (`/proc/PID/root`) is used.
//!
//! A frame nothing can name keeps what is needed to name it later, `[build-id]+0xOFFSET` (or
//! `file+0xOFFSET`, or `[unknown]+0xADDR` outside any mapping), and is counted in
//! [`ProfileSymbolizer::errors`], which the agent exports as a metric.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    Pid,
    normalize::{NormalizeOpts, Normalizer, UserMeta},
    symbolize::{
        CodeInfo, Input, Reason, Sym, Symbolized, Symbolizer as Blaze, evict,
        source::{Elf, Source},
    },
};

use super::{
    ProfFrame,
    binary::{BinaryId, ByteLru, CacheBudgets, CacheStat},
    kallsyms::KallsymsIndex,
    perfmap::{self, PerfMapError, PerfMapLimits, PerfMapReader},
};
use crate::untrusted;

/// Binaries kept open (with their parsed symbols and DWARF) at once. blazesym keeps a file
/// descriptor for each, so this stays well under the usual limit of 1024.
const MAX_BINARIES: usize = 256;
/// A binary no address was found in for this long is closed.
const BINARY_IDLE: Duration = Duration::from_secs(600);
/// How often idle binaries, and processes that exited unnoticed, are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// A process's perf map is checked for changes at most this often: JITs append to it constantly,
/// and re-reading it for every batch of addresses would cost more than the lookups.
const PERF_MAP_RECHECK: Duration = Duration::from_secs(1);
/// A kernel address that kallsyms does not name makes it re-read, but not more often than this:
/// modules and BPF programs loaded since it was read are then found.
const KALLSYMS_REFRESH: Duration = Duration::from_secs(60);
/// Where kernel symbols are read from.
const KALLSYMS: &str = "/proc/kallsyms";
/// Estimated bytes of a process's perf map state without its map.
const PERF_MAP_STATE_BYTES: usize = 128;
/// See [`untrusted::MAX_ELF_SYMBOL_TABLE_BYTES`].
const MAX_SYMBOL_TABLE_BYTES: usize = untrusted::MAX_ELF_SYMBOL_TABLE_BYTES as usize;
/// Binaries refused as too large remembered at once (so each is refused and logged once).
const MAX_REFUSED: usize = 1024;
/// Module of frames named by a perf map.
const PERF_MAP_MODULE: &str = "[perf-map]";
/// Module of kernel frames.
const KERNEL_MODULE: &str = "[kernel]";
/// Module of frames in the vDSO (the kernel-provided `clock_gettime` and friends).
const VDSO_MODULE: &str = "[vdso]";

/// Why part of a symbolization failed. None of these fail a call: the affected frames come out
/// unnamed, the failure is counted and logged at debug level.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("cannot read the mappings of pid {pid}: {source}")]
    Normalize {
        pid: u32,
        #[source]
        source: blazesym::Error,
    },
    #[error("cannot open binary {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot symbolize addresses in {path}: {source}")]
    Symbolize {
        path: PathBuf,
        #[source]
        source: blazesym::Error,
    },
    #[error("cannot symbolize {count} addresses in {path}: blazesym reported errors it folded")]
    Folded { path: PathBuf, count: usize },
    #[error("cannot read /proc/kallsyms: {source}")]
    Kernel {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    PerfMap(#[from] PerfMapError),
}

/// Counters of a [`ProfileSymbolizer`], for self-metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SymbolizerStats {
    /// Frames returned without a name (`[build-id]+0x…`, `[unknown]+0x…`, `[kernel]+0x…`), one
    /// per address asked for, cached or not.
    pub unnamed_frames: u64,
    /// Calls into blazesym (or reads of a perf map) that failed as a whole: a process gone
    /// before its mappings were read, a binary that could not be opened or parsed.
    pub failures: u64,
    /// User addresses answered from the cache.
    pub cache_hits: u64,
    /// User addresses (distinct per call) that had to be symbolized.
    pub cache_misses: u64,
}

type FileId = BinaryId;

/// The key symbolization results are cached under, with the file offset: the same build id is
/// the same code wherever the file lives.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum BinKey {
    BuildId(Arc<[u8]>),
    File(FileId),
}

/// A binary seen in some process.
struct Binary {
    key: BinKey,
    /// File name, for [`ProfFrame::module`].
    name: String,
    /// Build id in hex, for naming frames it has no symbols for.
    build_id: Option<String>,
    /// Read its DWARF: the symbolizer reads debug information and this binary's fits the
    /// budget (a large binary's parsed DWARF takes tens of MiB; it is named from its symbol
    /// table instead).
    debug: bool,
    /// The one path blazesym knows this binary by. blazesym caches parsed files by path; giving
    /// it one path per binary (rather than each process's `map_files` path) lets every process
    /// share one parse. `None` after the path was taken back (see `forget_path`).
    path: Option<PathBuf>,
    last_used: Instant,
    /// Live processes it was found in; when the last is forgotten the binary is closed.
    pids: Vec<u32>,
}

/// What one call needs of a binary, copied out so the registry can change meanwhile.
struct CallBinary {
    id: FileId,
    key: BinKey,
    name: String,
    build_id: Option<String>,
    debug: bool,
    /// The path blazesym knows the binary by.
    path: PathBuf,
    /// The path this call reached the binary through (differs from `path` when another
    /// process's path was registered first).
    reached: PathBuf,
    /// Not in the registry (over the budget on its own): evicted from blazesym after use.
    transient: bool,
}

/// Where a user address turned out to be.
enum Place {
    /// In a file-backed mapping of the binary at this index of the call's binaries.
    File { bin: usize, offset: u64 },
    /// Already named while normalizing (the vDSO).
    Named(ProfFrame),
    /// In no file: anonymous memory (JIT code), or no mapping at all.
    Nowhere,
}

/// A process's perf map and when it was last looked at.
struct PerfMapState {
    /// `None` until first read.
    checked: Option<Instant>,
    reader: PerfMapReader,
}

/// Symbolizes profile stacks; keep one for the whole agent (or report) so its caches pay off.
///
/// Not `Send`: blazesym's symbolizer is single-threaded. Keep it on one thread (the agent's
/// runtime is current-thread) or behind `spawn_blocking` on a thread of its own.
pub struct ProfileSymbolizer {
    /// blazesym for user binaries. Auto-reload is off: a path here always names one file
    /// contents (see [`Binary::path`]), so the `stat` it would do on every call is wasted.
    blaze: Blaze,
    /// Kernel function names; re-read when an address is not in it and it is older than
    /// [`KALLSYMS_REFRESH`].
    kallsyms: KallsymsIndex,
    /// When `kallsyms` was read.
    kernel_loaded: Option<Instant>,
    normalizer: Normalizer,
    /// Reach binaries through `/proc/PID/root/PATH` instead of `/proc/PID/map_files`, because
    /// opening map_files is refused (it needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).
    /// Decided on first use.
    root_paths: Option<bool>,
    /// Binaries open in blazesym, sized by an estimate of what parsing them costs.
    binaries: ByteLru<FileId, Binary>,
    /// Which binary each path registered with blazesym belongs to.
    paths: HashMap<PathBuf, FileId>,
    last_sweep: Instant,
    /// Frames by (binary, file offset); an empty slice means the binary could not name it.
    cache: ByteLru<(BinKey, u64), Arc<[ProfFrame]>>,
    /// Read DWARF (file:line, inline frames, names of functions missing from the symbol
    /// table). Off, only ELF symbol tables are read: the long-running agent keeps its memory
    /// small that way (parsed DWARF of a large binary is tens of MiB).
    debug_syms: bool,
    perf_maps: ByteLru<u32, PerfMapState>,
    /// Binaries refused for their size ([`MAX_SYMBOL_TABLE_BYTES`]).
    refused: std::collections::HashSet<FileId>,
    stats: SymbolizerStats,
    /// Names of Python code objects (see `python.rs`).
    pub python: super::python::PySymbolizer,
}

impl Default for ProfileSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl ProfileSymbolizer {
    /// A symbolizer with empty caches; nothing is read until addresses are asked for.
    pub fn new() -> Self {
        Self::with_debug_info(true)
    }

    /// A symbolizer that reads DWARF when `debug_syms`, only ELF symbol tables otherwise, with
    /// unbounded caches (one-shot use; the agent uses [`with_budgets`](Self::with_budgets)).
    pub fn with_debug_info(debug_syms: bool) -> Self {
        Self::with_budgets(debug_syms, CacheBudgets::unbounded())
    }

    /// A symbolizer whose caches keep within `budgets`.
    pub fn with_budgets(debug_syms: bool, budgets: CacheBudgets) -> Self {
        Self {
            debug_syms,
            blaze: Blaze::builder()
                .enable_auto_reload(false)
                .enable_code_info(debug_syms)
                .enable_inlined_fns(debug_syms)
                .build(),
            kallsyms: KallsymsIndex::default(),
            kernel_loaded: None,
            // Build ids are read here, once per file, instead of by the normalizer: its cache
            // is keyed by path and never shrinks, and map_files paths are per process.
            normalizer: Normalizer::builder().enable_build_ids(false).build(),
            root_paths: None,
            binaries: ByteLru::new("symbol_binaries", budgets.symbol_binaries),
            paths: HashMap::new(),
            last_sweep: Instant::now(),
            cache: ByteLru::new("symbol_frames", budgets.frames),
            perf_maps: ByteLru::new("perf_maps", budgets.perf_maps),
            refused: std::collections::HashSet::new(),
            stats: SymbolizerStats::default(),
            python: super::python::PySymbolizer::default(),
        }
    }

    /// Symbolization errors so far: frames returned unnamed plus failed blazesym calls. Exported
    /// as a metric; a rising count means binaries without symbols, JITs without perf maps, or
    /// processes that exited before their stacks were symbolized.
    pub fn errors(&self) -> u64 {
        self.stats.unnamed_frames + self.stats.failures
    }

    /// All counters.
    pub fn stats(&self) -> SymbolizerStats {
        self.stats
    }

    /// Number of user addresses cached.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Sizes of the caches, for `ws1_probe_agent_cache_*`.
    pub fn cache_stats(&self) -> Vec<CacheStat> {
        vec![
            self.binaries.stat(),
            self.cache.stat(),
            self.perf_maps.stat(),
            CacheStat {
                name: "kernel_symbols",
                bytes: self.kallsyms.bytes() as u64,
                entries: self.kallsyms.len() as u64,
                budget: 0,
                evictions: 0,
            },
        ]
    }

    /// Drops what is kept for process `pid`; call it when the process exits. Its perf map goes,
    /// and binaries no other live process was found in are closed, with their cached frames.
    pub fn forget(&mut self, pid: u32) {
        self.perf_maps.remove(&pid);
        self.python.forget(pid);
        let mut unused = Vec::new();
        for (id, bin) in self.binaries.iter() {
            if bin.pids.contains(&pid) && bin.pids.len() == 1 {
                unused.push(*id);
            }
        }
        for bin in self.binaries.values_mut() {
            bin.pids.retain(|p| *p != pid);
        }
        for id in unused {
            if let Some(bin) = self.binaries.remove(&id) {
                self.close(bin);
            }
        }
    }

    /// Takes a binary out of blazesym and drops its cached frames.
    fn close(&mut self, bin: Binary) {
        if let Some(path) = &bin.path {
            self.forget_path(path);
        }
        let key = bin.key;
        self.cache.retain(|(k, _), _| *k != key);
    }

    /// The frames each address of process `pid` stands for, innermost first: several when the
    /// address is in code inlined into its caller, one otherwise. Addresses are lookup
    /// addresses (a return address minus one, or the sampled instruction pointer).
    ///
    /// Pass all addresses of a process at once: the process's mappings are read once a call.
    pub fn user(&mut self, pid: u32, addrs: &[u64]) -> Vec<Vec<ProfFrame>> {
        if addrs.is_empty() {
            return Vec::new();
        }
        self.sweep_binaries();
        let (places, mut bins) = self.locate(pid, addrs);

        // Answer from the cache what it has; gather the rest per binary.
        let mut known: Vec<Option<Arc<[ProfFrame]>>> = vec![None; addrs.len()];
        let mut pending: HashMap<usize, Vec<u64>> = HashMap::new();
        for (i, place) in places.iter().enumerate() {
            if let Place::File { bin, offset } = place {
                match self.cache.get(&(bins[*bin].key.clone(), *offset)) {
                    Some(frames) => {
                        self.stats.cache_hits += 1;
                        known[i] = Some(Arc::clone(frames));
                    }
                    None => pending.entry(*bin).or_default().push(*offset),
                }
            }
        }
        let mut fresh: HashMap<(usize, u64), Arc<[ProfFrame]>> = HashMap::new();
        for (bin, mut offsets) in pending {
            offsets.sort_unstable();
            offsets.dedup();
            self.stats.cache_misses += offsets.len() as u64;
            let results = self.symbolize_binary(&mut bins[bin], &offsets);
            if bins[bin].transient {
                let path = bins[bin].path.clone();
                self.forget_path(&path);
            }
            for (offset, result) in offsets.into_iter().zip(results) {
                let frames = match result {
                    Some(frames) => {
                        let bytes = frames_bytes(&frames);
                        self.cache.insert(
                            (bins[bin].key.clone(), offset),
                            Arc::clone(&frames),
                            bytes,
                        );
                        frames
                    }
                    // A failure is not cached: it may be transient (a binary being replaced).
                    None => Arc::from([]),
                };
                fresh.insert((bin, offset), frames);
            }
        }

        let mut out = Vec::with_capacity(addrs.len());
        for ((i, place), &addr) in places.into_iter().enumerate().zip(addrs) {
            let frames = match place {
                Place::Named(frame) => vec![frame],
                Place::File { bin, offset } => {
                    let b = &bins[bin];
                    let found = known[i]
                        .take()
                        .or_else(|| fresh.get(&(bin, offset)).cloned())
                        .unwrap_or_else(|| Arc::from([]));
                    if found.is_empty() {
                        // Code in a file can still be JIT output (a runtime mapping a memfd or
                        // a file it wrote), so the perf map gets a say first.
                        let unnamed = unnamed_in_file(b.build_id.as_deref(), &b.name, offset);
                        vec![self.perf_map_frame(pid, addr).unwrap_or_else(|| {
                            self.stats.unnamed_frames += 1;
                            unnamed
                        })]
                    } else {
                        found
                            .iter()
                            .map(|f| ProfFrame {
                                module: Some(b.name.clone()),
                                ..f.clone()
                            })
                            .collect()
                    }
                }
                Place::Nowhere => vec![self.perf_map_frame(pid, addr).unwrap_or_else(|| {
                    self.stats.unnamed_frames += 1;
                    unnamed_nowhere(addr)
                })],
            };
            out.push(frames);
        }
        out
    }

    /// Finds, for each address, the binary and file offset it is at, registering binaries not
    /// seen before. An address whose process or binary cannot be read is [`Place::Nowhere`].
    fn locate(&mut self, pid: u32, addrs: &[u64]) -> (Vec<Place>, Vec<CallBinary>) {
        let root_paths = *self.root_paths.get_or_insert_with(|| {
            let usable = map_files_usable();
            if !usable {
                tracing::info!(
                    "/proc/PID/map_files cannot be opened (it needs CAP_SYS_ADMIN); binaries are read through /proc/PID/root, which misses deleted ones"
                );
            }
            !usable
        });
        let opts = NormalizeOpts {
            map_files: !root_paths,
            ..Default::default()
        };
        let normalized =
            match self
                .normalizer
                .normalize_user_addrs_opts(Pid::from(pid), addrs, &opts)
            {
                Ok(normalized) => normalized,
                Err(source) => {
                    self.fail(SymbolsError::Normalize { pid, source });
                    return (addrs.iter().map(|_| Place::Nowhere).collect(), Vec::new());
                }
            };
        // Owned copies, so the normalizer is no longer borrowed while binaries register.
        let metas: Vec<Meta> = normalized
            .meta
            .iter()
            .map(|meta| match meta {
                UserMeta::Elf(elf) => Meta::File(elf.path.clone()),
                UserMeta::Sym(sym) => Meta::Named(ProfFrame {
                    function: sym.name.to_string(),
                    module: Some(VDSO_MODULE.to_owned()),
                    location: None,
                    kernel: false,
                }),
                _ => Meta::Nowhere,
            })
            .collect();
        let outputs = normalized.outputs;

        let mut bins = Vec::new();
        let mut meta_bin: Vec<Option<usize>> = vec![None; metas.len()];
        for (idx, meta) in metas.iter().enumerate() {
            let Meta::File(path) = meta else { continue };
            match self.binary(pid, path, root_paths) {
                Ok(bin) => {
                    meta_bin[idx] = Some(bins.len());
                    bins.push(bin);
                }
                Err(err) => self.fail(err),
            }
        }
        let places = outputs
            .into_iter()
            .map(|(offset, idx)| match metas.get(idx) {
                Some(Meta::File(_)) => match meta_bin[idx] {
                    Some(bin) => Place::File { bin, offset },
                    None => Place::Nowhere,
                },
                Some(Meta::Named(frame)) => Place::Named(frame.clone()),
                _ => Place::Nowhere,
            })
            .collect();
        (places, bins)
    }

    /// The binary behind `path` (a map_files path, or the path the process sees when
    /// `root_paths`), read for its build id the first time its contents are seen.
    fn binary(
        &mut self,
        pid: u32,
        path: &Path,
        root_paths: bool,
    ) -> Result<CallBinary, SymbolsError> {
        let reached = if root_paths {
            root_path(pid, path)
        } else {
            path.to_owned()
        };
        let md = fs::metadata(&reached).map_err(|source| SymbolsError::Open {
            path: reached.clone(),
            source,
        })?;
        if !md.file_type().is_file() {
            // A FIFO or device where the process's root path names its binary: blazesym, the
            // build id and the cost estimate would block on it or read without end.
            untrusted::refuse(
                untrusted::Kind::Elf,
                untrusted::Reason::NotRegularFile,
                &reached.display().to_string(),
                "it is not a regular file",
                "frames in it stay unnamed; nothing to do unless the process replaced a mapped binary on purpose",
            );
            return Err(SymbolsError::Open {
                path: reached,
                source: std::io::Error::new(ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        let id = FileId::from(&md);
        // A path can come back naming another file: a new process got the old one's pid and
        // maps something else at the same range. blazesym must not answer from the old file.
        if self.paths.get(&reached).is_some_and(|old| *old != id) {
            self.forget_path(&reached);
        }
        let now = Instant::now();
        if !self.binaries.contains(&id) {
            let build_id = read_build_id(&reached);
            let name = if root_paths {
                file_name(path)
            } else {
                // The map_files link points at the path the process mapped.
                fs::read_link(&reached)
                    .map(|target| file_name(&target))
                    .unwrap_or_else(|_| file_name(path))
            };
            let (symbols, dwarf) = parse_cost(&reached);
            if symbols > MAX_SYMBOL_TABLE_BYTES {
                // The file is the process's (a library it wrote and loaded): a symbol table of
                // gigabytes would become an index of gigabytes. Refused once per file.
                if self.refused.len() >= MAX_REFUSED {
                    self.refused.clear();
                }
                if self.refused.insert(id) {
                    untrusted::refuse(
                        untrusted::Kind::Elf,
                        untrusted::Reason::TooLarge,
                        &reached.display().to_string(),
                        &format!(
                            "its symbol tables would take about {symbols} bytes, more than the {MAX_SYMBOL_TABLE_BYTES} the agent parses of one binary"
                        ),
                        "frames in it keep [build-id]+offset; symbolize them offline with the binary",
                    );
                }
                return Err(SymbolsError::Open {
                    path: reached,
                    source: std::io::Error::new(
                        ErrorKind::InvalidData,
                        "symbol tables too large to parse",
                    ),
                });
            }
            let debug = self.debug_syms && symbols + dwarf <= self.binaries.budget();
            let bytes = if debug { symbols + dwarf } else { symbols };
            let evicted = self.binaries.insert(
                id,
                Binary {
                    key: match &build_id {
                        Some(b) => BinKey::BuildId(Arc::clone(b)),
                        None => BinKey::File(id),
                    },
                    name,
                    build_id: build_id.map(|b| hex(&b)),
                    debug,
                    path: None,
                    last_used: now,
                    pids: Vec::new(),
                },
                bytes,
            );
            for (_, old) in evicted {
                self.close(old);
            }
            // blazesym keeps a file descriptor per open binary.
            while self.binaries.len() > MAX_BINARIES {
                match self.binaries.pop_lru() {
                    Some((_, old)) => self.close(old),
                    None => break,
                }
            }
        }
        // A binary larger than the whole budget is not kept; it is symbolized without the
        // registry (and blazesym forgets it again after the call).
        let Some(bin) = self.binaries.get_mut(&id) else {
            return Ok(CallBinary {
                id,
                key: BinKey::File(id),
                name: file_name(path),
                build_id: None,
                debug: false,
                path: reached.clone(),
                reached,
                transient: true,
            });
        };
        bin.last_used = now;
        if !bin.pids.contains(&pid) {
            bin.pids.push(pid);
        }
        let registered = match &bin.path {
            Some(p) => p.clone(),
            None => {
                bin.path = Some(reached.clone());
                self.paths.insert(reached.clone(), id);
                reached.clone()
            }
        };
        Ok(CallBinary {
            id,
            key: bin.key.clone(),
            name: bin.name.clone(),
            build_id: bin.build_id.clone(),
            debug: bin.debug,
            path: registered,
            reached,
            transient: false,
        })
    }

    /// Symbolizes file offsets of one binary: per offset, its frames (empty when the binary
    /// cannot name it), or `None` when blazesym failed.
    fn symbolize_binary(
        &mut self,
        bin: &mut CallBinary,
        offsets: &[u64],
    ) -> Vec<Option<Arc<[ProfFrame]>>> {
        let mut result = self.symbolize_file(&bin.path, bin.debug, offsets);
        if result.is_err() && bin.path != bin.reached {
            // The registered path may belong to a process that exited before blazesym ever
            // opened it; the path this call came through is alive.
            self.forget_path(&bin.path.clone());
            if let Some(b) = self.binaries.get_mut(&bin.id) {
                b.path = Some(bin.reached.clone());
                self.paths.insert(bin.reached.clone(), bin.id);
            }
            bin.path = bin.reached.clone();
            result = self.symbolize_file(&bin.path, bin.debug, offsets);
        }
        match result {
            Ok(frames) => frames,
            Err(err) => {
                self.fail(err);
                vec![None; offsets.len()]
            }
        }
    }

    fn symbolize_file(
        &mut self,
        path: &Path,
        debug: bool,
        offsets: &[u64],
    ) -> Result<Vec<Option<Arc<[ProfFrame]>>>, SymbolsError> {
        let mut elf = Elf::new(path);
        elf.debug_syms = debug;
        let src = Source::Elf(elf);
        let symbolized = self
            .blaze
            .symbolize(&src, Input::FileOffset(offsets))
            .map_err(|source| SymbolsError::Symbolize {
                path: path.to_owned(),
                source,
            })?;
        let mut folded = 0;
        let frames = symbolized
            .iter()
            .map(|s| match s {
                Symbolized::Sym(sym) => Some(frames_of(sym)),
                Symbolized::Unknown(Reason::IgnoredError) => {
                    folded += 1;
                    None
                }
                Symbolized::Unknown(_) => Some(Arc::from([])),
            })
            .collect();
        if folded > 0 {
            self.fail(SymbolsError::Folded {
                path: path.to_owned(),
                count: folded,
            });
        }
        Ok(frames)
    }

    /// Takes `path` back from blazesym, closing the file unless another path still names it.
    fn forget_path(&mut self, path: &Path) {
        if let Some(id) = self.paths.remove(path)
            && let Some(bin) = self.binaries.get_mut(&id)
            && bin.path.as_deref() == Some(path)
        {
            bin.path = None;
        }
        if let Err(err) = self.blaze.evict(&evict::Evict::Elf(evict::Elf::new(path))) {
            tracing::debug!("cannot evict {}: {err}", path.display());
        }
    }

    /// Closes binaries unused for [`BINARY_IDLE`] (the byte budget and [`MAX_BINARIES`] are
    /// kept as they are added), so parsed DWARF and open files do not linger.
    fn sweep_binaries(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        // Processes that exited between two updates of the caller's process list were never
        // forgotten; find them here.
        let mut pids: Vec<u32> = self.perf_maps.iter().map(|(p, _)| *p).collect();
        pids.extend(
            self.binaries
                .iter()
                .flat_map(|(_, b)| b.pids.iter().copied()),
        );
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if !process_alive(pid) {
                self.forget(pid);
            }
        }
        let idle = self
            .binaries
            .retain(|_, b| now.duration_since(b.last_used) < BINARY_IDLE);
        for (_, bin) in idle {
            self.close(bin);
        }
    }

    /// The frame the perf map of `pid` gives `addr`, if it has one.
    fn perf_map_frame(&mut self, pid: u32, addr: u64) -> Option<ProfFrame> {
        let now = Instant::now();
        if !self.perf_maps.contains(&pid) {
            let evicted = self.perf_maps.insert(
                pid,
                PerfMapState {
                    checked: None,
                    reader: PerfMapReader::default(),
                },
                PERF_MAP_STATE_BYTES,
            );
            drop(evicted);
        }
        let limits =
            PerfMapLimits::keeping(self.perf_maps.budget().saturating_sub(PERF_MAP_STATE_BYTES));
        let state = self.perf_maps.get_mut(&pid)?;
        let mut failed = None;
        let mut resized = None;
        if state
            .checked
            .is_none_or(|t| now.duration_since(t) >= PERF_MAP_RECHECK)
        {
            state.checked = Some(now);
            // Recomputed each time: the namespace pid in the path belongs to whichever process
            // has this pid now.
            let (path, uids) = perfmap::locate(pid);
            match state.reader.update(&path, &uids, &limits) {
                Ok(true) => {
                    resized = Some(PERF_MAP_STATE_BYTES + state.reader.map().bytes());
                }
                Ok(false) => {}
                Err(PerfMapError::Refused {
                    path,
                    reason,
                    detail,
                }) => {
                    // The reader keeps the refusal (and nothing else), so this file is not
                    // read, counted or logged again.
                    resized = Some(PERF_MAP_STATE_BYTES);
                    untrusted::refuse(
                        untrusted::Kind::PerfMap,
                        reason,
                        &format!("{} of pid {pid}", path.display()),
                        &detail,
                        PerfMapError::advice(reason),
                    );
                }
                Err(err @ PerfMapError::Read { .. }) => {
                    state.reader = PerfMapReader::default();
                    resized = Some(PERF_MAP_STATE_BYTES);
                    // Most processes have no perf map; that is not an error.
                    if let PerfMapError::Read { source, .. } = &err
                        && source.kind() != ErrorKind::NotFound
                    {
                        failed = Some(err);
                    }
                }
            }
        }
        let frame = state.reader.map().lookup(addr).map(|name| ProfFrame {
            function: name.to_owned(),
            module: Some(PERF_MAP_MODULE.to_owned()),
            location: None,
            kernel: false,
        });
        if let Some(bytes) = resized {
            drop(self.perf_maps.resize(&pid, bytes));
        }
        if let Some(err) = failed {
            self.fail(err.into());
        }
        frame
    }

    /// Kernel addresses to frames, one each, through `/proc/kallsyms` (never a vmlinux: looking
    /// for one scans the disk, and kallsyms already names every function). An address it does
    /// not name becomes `[kernel]+0xADDR`.
    pub fn kernel(&mut self, addrs: &[u64]) -> Vec<ProfFrame> {
        if addrs.is_empty() {
            return Vec::new();
        }
        let stale = self
            .kernel_loaded
            .is_none_or(|t| t.elapsed() >= KALLSYMS_REFRESH);
        if self.kernel_loaded.is_none()
            || (stale && addrs.iter().any(|a| self.kallsyms.name(*a).is_none()))
        {
            // Something unnamed in an old kallsyms snapshot: a module or BPF program may have
            // been loaded since.
            self.kernel_loaded = Some(Instant::now());
            self.kallsyms = match KallsymsIndex::read(Path::new(KALLSYMS)) {
                Ok(index) => index,
                Err(source) => {
                    self.fail(SymbolsError::Kernel { source });
                    KallsymsIndex::default()
                }
            };
        }
        addrs
            .iter()
            .map(|addr| {
                let function = match self.kallsyms.name(*addr) {
                    Some(name) => name.to_owned(),
                    None => {
                        self.stats.unnamed_frames += 1;
                        format!("{KERNEL_MODULE}+0x{addr:x}")
                    }
                };
                ProfFrame {
                    function,
                    module: Some(KERNEL_MODULE.to_owned()),
                    location: None,
                    kernel: true,
                }
            })
            .collect()
    }

    fn fail(&mut self, err: SymbolsError) {
        self.stats.failures += 1;
        tracing::debug!("symbolization: {err}");
    }
}

/// Whether process `pid` exists (a pid reused since counts as alive; its state is refreshed
/// anyway when its mappings no longer match).
pub(crate) fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Estimated bytes of a cached frames entry: the key, the slice and the strings.
fn frames_bytes(frames: &[ProfFrame]) -> usize {
    96 + frames
        .iter()
        .map(|f| {
            std::mem::size_of::<ProfFrame>()
                + f.function.len()
                + f.location.as_ref().map_or(0, String::len)
                + f.module.as_ref().map_or(0, String::len)
        })
        .sum::<usize>()
}

/// Estimated bytes blazesym holds for the binary at `path` once it has symbolized in it: the
/// symbol tables it reads (mapped pages count in the agent's RSS) plus its sorted index of them,
/// and apart the DWARF sections it reads when asked for debug information. An estimate, not a
/// measurement: it is an upper bound when few DWARF units are needed, as blazesym parses them
/// lazily, and a lower bound for the unit index of a large binary.
fn parse_cost(path: &Path) -> (usize, usize) {
    use object::{Object as _, ObjectSection as _};
    const FLOOR: usize = 4096;
    let Ok(file) = fs::File::open(path) else {
        return (FLOOR, 0);
    };
    let cache = object::ReadCache::new(file);
    // Parsing reads the symbol table into the cache: look at what it claims first.
    if let Some(claimed) = untrusted::elf_symbol_table_bytes(&cache)
        && claimed > untrusted::MAX_ELF_SYMBOL_TABLE_BYTES
    {
        return (usize::try_from(claimed).unwrap_or(usize::MAX), 0);
    }
    let Ok(elf) = object::File::parse(&cache) else {
        return (FLOOR, 0);
    };
    let (mut symbols, mut dwarf) = (FLOOR, 0usize);
    for section in elf.sections() {
        let size = usize::try_from(section.size()).unwrap_or(usize::MAX);
        match section.name_bytes() {
            // Symbol entries (24 bytes) become sorted index entries of about the same size.
            Ok(b".symtab" | b".dynsym") => symbols = symbols.saturating_add(size.saturating_mul(2)),
            Ok(b".strtab" | b".dynstr") => symbols = symbols.saturating_add(size),
            Ok(name) if name.starts_with(b".debug_") || name.starts_with(b".zdebug_") => {
                // Compressed sections are inflated onto the heap when read.
                let inflated = section
                    .compressed_file_range()
                    .ok()
                    .and_then(|r| usize::try_from(r.uncompressed_size).ok())
                    .unwrap_or(size);
                dwarf = dwarf.saturating_add(inflated.max(size));
            }
            _ => {}
        }
    }
    (symbols, dwarf)
}

/// Normalizer meta information, owned.
enum Meta {
    File(PathBuf),
    Named(ProfFrame),
    Nowhere,
}

/// Frames of one blazesym symbol, innermost first: blazesym lists inlined calls outermost
/// first after the function they were inlined into, each with the location inside it.
fn frames_of(sym: &Sym<'_>) -> Arc<[ProfFrame]> {
    let frame = |name: &str, code_info: Option<&CodeInfo<'_>>| ProfFrame {
        function: name.to_owned(),
        module: None,
        location: code_info.map(location),
        kernel: false,
    };
    sym.inlined
        .iter()
        .rev()
        .map(|inl| frame(&inl.name, inl.code_info.as_ref()))
        .chain(std::iter::once(frame(&sym.name, sym.code_info.as_deref())))
        .collect()
}

/// `file:line`, or the file alone when the line is not known.
fn location(ci: &CodeInfo<'_>) -> String {
    let file = ci.file.to_string_lossy();
    match ci.line {
        Some(line) => format!("{file}:{line}"),
        None => file.into_owned(),
    }
}

/// The frame for `offset` in a binary that cannot name it: `[build-id]+0xOFFSET`, which a later
/// symbolization with the binary's debug file can resolve, or `file+0xOFFSET` without a build id.
fn unnamed_in_file(build_id: Option<&str>, name: &str, offset: u64) -> ProfFrame {
    let function = match build_id {
        Some(id) => format!("[{id}]+0x{offset:x}"),
        None => format!("{name}+0x{offset:x}"),
    };
    ProfFrame {
        function,
        module: Some(name.to_owned()),
        location: None,
        kernel: false,
    }
}

/// The frame for an address in no file and in no perf map.
fn unnamed_nowhere(addr: u64) -> ProfFrame {
    ProfFrame {
        function: format!("[unknown]+0x{addr:x}"),
        module: None,
        location: None,
        kernel: false,
    }
}

/// The build id of the ELF file at `path`; `None` when it has none or is not ELF.
fn read_build_id(path: &Path) -> Option<Arc<[u8]>> {
    match blazesym::helper::read_elf_build_id(path) {
        Ok(Some(id)) if !id.is_empty() => Some(Arc::from(&*id)),
        Ok(_) => None,
        Err(err) => {
            tracing::debug!("no build id for {}: {err}", path.display());
            None
        }
    }
}

/// Whether `/proc/PID/map_files` links can be opened, tried on this process's first mapping.
/// Opening them needs CAP_SYS_ADMIN (or CAP_CHECKPOINT_RESTORE) whichever process they belong
/// to, so one answer holds for all.
fn map_files_usable() -> bool {
    let maps = fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.split_ascii_whitespace()
        .next()
        .is_some_and(|range| fs::metadata(format!("/proc/self/map_files/{range}")).is_ok())
}

/// `path` as the process `pid` sees it, reached through its root.
fn root_path(pid: u32, path: &Path) -> PathBuf {
    let relative = path.strip_prefix("/").unwrap_or(path);
    Path::new(&format!("/proc/{pid}/root")).join(relative)
}

/// The last component of `path`, without the ` (deleted)` the kernel appends to unlinked files.
fn file_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string_lossy().into_owned());
    match name.strip_suffix(" (deleted)") {
        Some(stripped) => stripped.to_owned(),
        None => name,
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::{
        ffi::c_void,
        process::{Child, Command},
        thread::sleep,
    };

    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    /// Whether kallsyms can be read with addresses; without them (not root, or
    /// `kptr_restrict`) the kernel test cannot run, which CI must not accept.
    fn kallsyms_or_skip(test: &str) -> Option<String> {
        let text = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        if text.lines().any(|l| !l.starts_with("0000000000000000")) {
            return Some(text);
        }
        if std::env::var_os("CI").is_some() {
            panic!("{test}: /proc/kallsyms shows no addresses (not root?), and CI must not skip");
        }
        println!("skipping test - {test}: /proc/kallsyms shows no addresses (not root?)");
        None
    }

    fn own_exe_name() -> String {
        file_name(&std::env::current_exe().unwrap())
    }

    #[inline(never)]
    fn profile_symbols_marker() -> u64 {
        std::hint::black_box(profile_symbols_marker as *const () as u64)
    }

    #[inline(always)]
    fn inlined_leaf(x: u64) -> u64 {
        x.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(7) ^ 0x55
    }

    #[inline(never)]
    fn inline_host(x: u64) -> u64 {
        inlined_leaf(std::hint::black_box(x)).wrapping_add(1)
    }

    /// Function symbols of this test binary with their run-time addresses, through the `object`
    /// crate rather than blazesym, so the tests compare two readings of the binary.
    fn own_functions() -> Vec<(String, u64, u64)> {
        let data = fs::read(std::env::current_exe().unwrap()).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let marker = file
            .symbols()
            .find(|s| {
                s.name()
                    .is_ok_and(|n| n.contains("22profile_symbols_marker17h"))
            })
            .expect("marker symbol in the test binary");
        let bias = profile_symbols_marker().wrapping_sub(marker.address());
        file.symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0 && s.address() > 0)
            .filter_map(|s| {
                let name = s.name().ok()?.to_owned();
                Some((name, s.address().wrapping_add(bias), s.size()))
            })
            .collect()
    }

    #[test]
    fn names_own_function_then_answers_from_cache() {
        let pid = std::process::id();
        let addr = profile_symbols_marker();
        let mut s = ProfileSymbolizer::new();
        let frames = s.user(pid, &[addr]);
        assert_eq!(frames.len(), 1);
        let f = frames[0].last().unwrap();
        assert!(f.function.ends_with("profile_symbols_marker"), "{frames:?}");
        assert_eq!(f.module.as_deref(), Some(own_exe_name().as_str()));
        let loc = f.location.as_deref().unwrap_or("");
        assert!(loc.starts_with("symbols.rs:"), "{loc}");
        assert!(!f.kernel);
        assert_eq!(s.cache_len(), 1);
        assert_eq!(s.stats().cache_misses, 1);
        assert_eq!(s.stats().cache_hits, 0);

        let again = s.user(pid, &[addr, addr]);
        assert_eq!(again, vec![frames[0].clone(), frames[0].clone()]);
        assert_eq!(s.stats().cache_hits, 2);
        assert_eq!(s.stats().cache_misses, 1);
        assert_eq!(s.cache_len(), 1);
        assert_eq!(s.errors(), 0);

        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // Root reads binaries through map_files, which reach deleted and containerised ones.
            assert_eq!(s.root_paths, Some(false));
            let registered: Vec<&PathBuf> = s.paths.keys().collect();
            assert_eq!(registered.len(), 1);
            assert!(registered[0].starts_with(format!("/proc/{pid}/map_files/")));
        }
    }

    #[test]
    fn a_binary_over_the_budget_is_named_from_its_symbol_table() {
        let pid = std::process::id();
        // 24 KiB for open binaries: less than this test binary's symbol table.
        let mut s = ProfileSymbolizer::with_budgets(true, CacheBudgets::split(64 * 1024));
        let frames = s.user(pid, &[profile_symbols_marker()]);
        let f = frames[0].last().unwrap();
        assert!(f.function.ends_with("profile_symbols_marker"), "{frames:?}");
        assert_eq!(f.location, None);
        // Not kept: neither in the registry nor in blazesym.
        assert!(s.binaries.is_empty());
        assert!(s.paths.is_empty());
    }

    #[test]
    fn forgetting_the_last_process_closes_its_binaries() {
        let pid = std::process::id();
        let mut s = ProfileSymbolizer::new();
        s.user(pid, &[profile_symbols_marker()]);
        assert_eq!(s.binaries.len(), 1);
        assert_eq!(s.cache_len(), 1);
        s.forget(pid + 1);
        assert_eq!(s.binaries.len(), 1);
        s.forget(pid);
        assert!(s.binaries.is_empty());
        assert!(s.paths.is_empty());
        assert_eq!(s.cache_len(), 0);
        assert_eq!(s.cache_stats()[0].bytes, 0);
    }

    #[test]
    fn reaches_binaries_through_process_root() {
        // What an agent without CAP_SYS_ADMIN does, and the path a container's binaries are
        // reached through.
        let pid = std::process::id();
        let mut s = ProfileSymbolizer::new();
        s.root_paths = Some(true);
        let frames = s.user(pid, &[profile_symbols_marker()]);
        let f = frames[0].last().unwrap();
        assert!(f.function.ends_with("profile_symbols_marker"), "{frames:?}");
        assert_eq!(f.module.as_deref(), Some(own_exe_name().as_str()));
        assert_eq!(s.errors(), 0);
        let registered: Vec<&PathBuf> = s.paths.keys().collect();
        assert_eq!(registered.len(), 1);
        assert!(registered[0].starts_with(format!("/proc/{pid}/root/")));
    }

    #[test]
    fn inline_frames_come_innermost_first() {
        let pid = std::process::id();
        assert_ne!(inline_host(3), 0);
        let (_, start, size) = own_functions()
            .into_iter()
            .find(|(name, _, _)| name.contains("11inline_host17h"))
            .expect("inline_host symbol");
        let addrs: Vec<u64> = (start..start + size).collect();
        let mut s = ProfileSymbolizer::new();
        let all = s.user(pid, &addrs);
        for frames in &all {
            assert!(
                frames.last().unwrap().function.ends_with("inline_host"),
                "{frames:?}"
            );
        }
        // `black_box` is inlined into `inline_host` too; look for the leaf's addresses.
        let inlined = all
            .iter()
            .find(|frames| frames.len() == 2 && frames[0].function.ends_with("inlined_leaf"))
            .unwrap_or_else(|| panic!("no address with an inline frame: {all:?}"));
        assert!(inlined[0].function.ends_with("inlined_leaf"), "{inlined:?}");
        assert!(inlined[1].function.ends_with("inline_host"), "{inlined:?}");
        for f in inlined {
            assert!(
                f.location
                    .as_deref()
                    .unwrap_or("")
                    .starts_with("symbols.rs:"),
                "{f:?}"
            );
            assert_eq!(f.module.as_deref(), Some(own_exe_name().as_str()));
        }
        assert_eq!(s.errors(), 0);
    }

    /// An anonymous executable mapping and a perf map file, removed again even on failure.
    struct FakeJit {
        base: *mut c_void,
        len: usize,
        map: PathBuf,
    }

    impl Drop for FakeJit {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.map);
            // SAFETY: `base` and `len` are exactly the mapping made in the test, unmapped once.
            unsafe { libc::munmap(self.base, self.len) };
        }
    }

    #[test]
    fn jit_code_is_named_by_the_perf_map() {
        let pid = std::process::id();
        let len = 0x4000;
        // SAFETY: a new private anonymous mapping at an address of the kernel's choosing; it
        // aliases nothing and is only ever looked at by address.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let jit = FakeJit {
            base,
            len,
            map: PathBuf::from(format!("/tmp/perf-{pid}.map")),
        };
        let start = base as u64;
        let _ = fs::remove_file(&jit.map);
        // Profiling starts before the runtime wrote its map (a JIT writes it as it compiles):
        // the code is unnamed, and no error, since most processes have no map at all.
        let mut s = ProfileSymbolizer::new();
        let frames = s.user(pid, &[start + 0x140]);
        assert_eq!(frames[0], vec![unnamed_nowhere(start + 0x140)]);
        fs::write(
            &jit.map,
            format!(
                "{:x} 100 stale\n{:#x} 80 py::handle:/srv/app.py\n",
                start + 0x100,
                start + 0x100
            ),
        )
        .unwrap();
        // The missing map is looked for again once PERF_MAP_RECHECK has passed.
        sleep(PERF_MAP_RECHECK + Duration::from_millis(100));
        let frames = s.user(pid, &[start + 0x140, start + 0x1000]);
        assert_eq!(
            frames[0],
            vec![ProfFrame {
                function: "py::handle:/srv/app.py".to_owned(),
                module: Some("[perf-map]".to_owned()),
                location: None,
                kernel: false,
            }]
        );
        assert_eq!(frames[1], vec![unnamed_nowhere(start + 0x1000)]);
        assert_eq!(s.errors(), 2);

        // The runtime compiles more code and appends its line: the new code is named at the
        // next look, the earlier lines stay (only the appended bytes are read).
        {
            use std::io::Write as _;
            let mut f = fs::OpenOptions::new().append(true).open(&jit.map).unwrap();
            writeln!(f, "{:x} 40 JS:*render /srv/app.js:3:1", start + 0x1000).unwrap();
        }
        sleep(PERF_MAP_RECHECK + Duration::from_millis(100));
        let frames = s.user(pid, &[start + 0x140, start + 0x1010]);
        assert_eq!(frames[0][0].function, "py::handle:/srv/app.py");
        assert_eq!(frames[1][0].function, "JS:*render /srv/app.js:3:1");

        // The runtime recompiles into the same range; the map is re-read once a second has
        // passed since it was last looked at.
        fs::write(
            &jit.map,
            format!(
                "{:x} 80 py::handle:/srv/app.py [recompiled]\n",
                start + 0x100
            ),
        )
        .unwrap();
        sleep(PERF_MAP_RECHECK + Duration::from_millis(100));
        let frames = s.user(pid, &[start + 0x140]);
        assert_eq!(frames[0][0].function, "py::handle:/srv/app.py [recompiled]");

        // An exited process's map is forgotten: the state is rebuilt from the file.
        s.forget(pid);
        assert!(s.perf_maps.is_empty());
        drop(jit);
    }

    #[test]
    fn address_in_no_mapping_is_unknown_and_counted() {
        let pid = std::process::id();
        let mut s = ProfileSymbolizer::new();
        assert_eq!(s.user(pid, &[0x1]), vec![vec![unnamed_nowhere(0x1)]]);
        assert_eq!(s.user(pid, &[0x1])[0][0].function, "[unknown]+0x1");
        assert_eq!(s.errors(), 2);
        assert_eq!(s.stats().failures, 0);
        assert_eq!(s.stats().unnamed_frames, 2);
    }

    #[test]
    fn process_that_does_not_exist_is_a_failure() {
        // Above pid_max (at most 2^22), so no process has it.
        let pid = 1 << 23;
        let mut s = ProfileSymbolizer::new();
        let frames = s.user(pid, &[0x1000, 0x2000]);
        assert_eq!(frames[0], vec![unnamed_nowhere(0x1000)]);
        assert_eq!(frames[1], vec![unnamed_nowhere(0x2000)]);
        assert_eq!(s.stats().failures, 1);
        assert_eq!(s.stats().unnamed_frames, 2);
        assert_eq!(s.errors(), 3);
        assert!(s.user(pid, &[]).is_empty());
    }

    #[test]
    fn kernel_addresses_are_named_by_kallsyms() {
        let Some(kallsyms) = kallsyms_or_skip("kernel_addresses_are_named_by_kallsyms") else {
            return;
        };
        // A text symbol alone at its address, so the expected name is unambiguous;
        // do_sys_openat2 when the kernel has it.
        let syms: Vec<(u64, &str, &str)> = kallsyms
            .lines()
            .filter_map(|l| {
                let mut it = l.split_ascii_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                Some((addr, it.next()?, it.next()?))
            })
            .collect();
        let alone = |i: usize| {
            let addr = syms[i].0;
            matches!(syms[i].1, "T" | "t")
                && addr != 0
                && syms.iter().filter(|s| s.0 == addr).count() == 1
        };
        let pick = (0..syms.len())
            .find(|&i| syms[i].2 == "do_sys_openat2" && alone(i))
            .or_else(|| (0..syms.len()).find(|&i| alone(i)))
            .expect("a text symbol in kallsyms");
        let (addr, _, name) = syms[pick];

        let mut s = ProfileSymbolizer::new();
        let frames = s.kernel(&[addr, addr + 1, 0x1]);
        assert_eq!(
            frames[0],
            ProfFrame {
                function: name.to_owned(),
                module: Some("[kernel]".to_owned()),
                location: None,
                kernel: true,
            }
        );
        assert_eq!(frames[1].function, name);
        assert_eq!(frames[2].function, "[kernel]+0x1");
        assert!(frames[2].kernel);
        assert_eq!(s.errors(), 1);
        assert!(!s.kallsyms.is_empty());
        // Answered from the index read once.
        let loaded = s.kernel_loaded;
        assert_eq!(s.kernel(&[addr])[0].function, name);
        assert_eq!(s.kernel_loaded, loaded);
        assert_eq!(s.errors(), 1);
    }

    /// A small C program running until killed; killed on drop.
    struct Program {
        child: Child,
        path: PathBuf,
    }

    impl Drop for Program {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A directory of this test process, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ws1-probe-{name}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Builds a C program that waits in `wait_here`, stripped or not, or `None` when there is
    /// no C compiler (which CI must have).
    fn build_program(dir: &Path, name: &str, build_id: &str, strip: bool) -> Option<PathBuf> {
        let src = dir.join("waits.c");
        fs::write(
            &src,
            "#include <unistd.h>\n\
             __attribute__((noinline)) static void wait_here(void) { for (;;) pause(); }\n\
             int main(void) { wait_here(); return 0; }\n",
        )
        .unwrap();
        let path = dir.join(name);
        let built = Command::new("cc")
            .arg("-O1")
            .arg(format!("-Wl,--build-id={build_id}"))
            .arg("-o")
            .arg(&path)
            .arg(&src)
            .status();
        match built {
            Ok(status) => assert!(status.success(), "cc failed"),
            Err(err) if std::env::var_os("CI").is_none() => {
                println!("skipping test - no C compiler: {err}");
                return None;
            }
            Err(err) => panic!("no C compiler, and CI must not skip: {err}"),
        }
        if strip {
            let stripped = Command::new("strip").arg(&path).status().unwrap();
            assert!(stripped.success());
        }
        Some(path)
    }

    /// Starts the program at `path` and waits until it runs.
    fn start(path: &Path) -> Program {
        let child = Command::new(path).spawn().unwrap();
        let program = Program {
            child,
            path: path.to_owned(),
        };
        // Wait until the program's code is mapped: /proc/PID/exe already names it while exec
        // is still mapping segments.
        let maps = PathBuf::from(format!("/proc/{}/maps", program.child.id()));
        let wanted = path.to_string_lossy().into_owned();
        for _ in 0..200 {
            let text = fs::read_to_string(&maps).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.ends_with(&*wanted) && l.contains(" r-xp "))
            {
                return program;
            }
            sleep(Duration::from_millis(10));
        }
        panic!("{} did not start", program.path.display());
    }

    /// An address in the executable mapping of `path` in process `pid`, and its file offset.
    fn text_address(pid: u32, path: &Path) -> (u64, u64) {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let line = maps
            .lines()
            .find(|l| l.ends_with(&*path.to_string_lossy()) && l.contains(" r-xp "))
            .unwrap_or_else(|| panic!("no executable mapping of {}: {maps}", path.display()));
        let mut fields = line.split_ascii_whitespace();
        let (start, end) = fields.next().unwrap().split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let offset = u64::from_str_radix(fields.nth(1).unwrap(), 16).unwrap();
        let addr = start + 0x10;
        assert!(addr < end);
        (addr, addr - start + offset)
    }

    #[test]
    fn stripped_binary_keeps_build_id_and_offset() {
        let dir = TempDir::new("stripped");
        let Some(with_id) = build_program(&dir.0, "waits", "sha1", true) else {
            return;
        };
        let Some(without_id) = build_program(&dir.0, "waits-no-id", "none", true) else {
            return;
        };
        let (with_id, without_id) = (start(&with_id), start(&without_id));
        let data = fs::read(&with_id.path).unwrap();
        let build_id = object::File::parse(&*data)
            .unwrap()
            .build_id()
            .unwrap()
            .expect("a build id");
        assert_eq!(build_id.len(), 20);

        let mut s = ProfileSymbolizer::new();
        let pid = with_id.child.id();
        let (addr, offset) = text_address(pid, &with_id.path);
        let frames = s.user(pid, &[addr]);
        assert_eq!(
            frames,
            vec![vec![ProfFrame {
                function: format!("[{}]+0x{offset:x}", hex(build_id)),
                module: Some("waits".to_owned()),
                location: None,
                kernel: false,
            }]]
        );
        assert_eq!(s.errors(), 1);

        let pid = without_id.child.id();
        let (addr, offset) = text_address(pid, &without_id.path);
        let frames = s.user(pid, &[addr]);
        assert_eq!(frames[0][0].function, format!("waits-no-id+0x{offset:x}"));
        assert_eq!(frames[0][0].module.as_deref(), Some("waits-no-id"));
        assert_eq!(s.errors(), 2);
    }

    #[test]
    fn one_binary_in_many_processes_is_opened_once() {
        let dir = TempDir::new("shared");
        let Some(path) = build_program(&dir.0, "waits-shared", "sha1", false) else {
            return;
        };
        // Where wait_here is in the file, read with `object`.
        let data = fs::read(&path).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let sym = elf
            .symbols()
            .find(|s| s.name() == Ok("wait_here"))
            .expect("wait_here in the unstripped program");
        let text = elf.section_by_name(".text").unwrap();
        let file_off = sym.address() - text.address() + text.file_range().unwrap().0;
        let runtime = |pid: u32, delta: u64| {
            let (addr, offset) = text_address(pid, &path);
            addr - offset + file_off + delta
        };
        let (a, b, c) = (start(&path), start(&path), start(&path));
        let (a_pid, b_pid, c_pid) = (a.child.id(), b.child.id(), c.child.id());
        let (a_addr, b_addr, c_addr) = (runtime(a_pid, 0), runtime(b_pid, 0), runtime(c_pid, 0));
        let named = |frames: &[Vec<ProfFrame>]| {
            assert_eq!(frames[0].len(), 1, "{frames:?}");
            assert_eq!(frames[0][0].function, "wait_here", "{frames:?}");
            assert_eq!(frames[0][0].module.as_deref(), Some("waits-shared"));
        };

        // The binary is registered with blazesym under a's path, and stays usable through it
        // after a exits, because blazesym holds the file open.
        let mut s = ProfileSymbolizer::new();
        named(&s.user(a_pid, &[a_addr]));
        let registered: Vec<PathBuf> = s.paths.keys().cloned().collect();
        drop(a);
        named(&s.user(b_pid, &[b_addr + 1]));
        assert_eq!(s.paths.keys().cloned().collect::<Vec<_>>(), registered);
        assert_eq!(s.binaries.len(), 1);
        assert_eq!(s.errors(), 0);

        // Registered under c's path but never opened (say, every address was cached), then c
        // exits: the next process's own path takes over.
        let mut s = ProfileSymbolizer::new();
        let (places, _) = s.locate(c_pid, &[c_addr]);
        assert!(matches!(places[0], Place::File { .. }));
        drop(c);
        named(&s.user(b_pid, &[b_addr]));
        assert_eq!(s.errors(), 0);
        assert_eq!(s.paths.len(), 1);
        assert!(
            !s.paths
                .keys()
                .any(|p| p.starts_with(format!("/proc/{c_pid}/")))
        );
        drop(b);
    }

    #[test]
    fn unnamed_forms() {
        assert_eq!(
            unnamed_in_file(Some("ab12"), "libfoo.so", 0x1234).function,
            "[ab12]+0x1234"
        );
        assert_eq!(
            unnamed_in_file(None, "libfoo.so", 0x1234).function,
            "libfoo.so+0x1234"
        );
        assert_eq!(unnamed_nowhere(0xdead).function, "[unknown]+0xdead");
        assert_eq!(hex(&[0x00, 0xab, 0x7f]), "00ab7f");
        assert_eq!(
            file_name(Path::new("/usr/lib/libc.so.6 (deleted)")),
            "libc.so.6"
        );
        assert_eq!(
            root_path(42, Path::new("/usr/bin/python3")),
            PathBuf::from("/proc/42/root/usr/bin/python3")
        );
    }

    /// Measures cold and warm symbolization of many distinct addresses of this (large) test
    /// binary; run with `--nocapture` to see the times.
    #[test]
    fn many_addresses_cold_then_warm() {
        let pid = std::process::id();
        let mut funcs = own_functions();
        funcs.sort_by_key(|f| f.1);
        funcs.dedup_by_key(|f| f.1);
        let step = (funcs.len() / 1000).max(1);
        let addrs: Vec<u64> = funcs.iter().step_by(step).take(1000).map(|f| f.1).collect();

        let rss_kib = |key: &str| {
            let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let mut s = ProfileSymbolizer::new();
        let (anon_before, file_before) = (rss_kib("RssAnon:"), rss_kib("RssFile:"));
        let t = Instant::now();
        let cold = s.user(pid, &addrs);
        let cold_time = t.elapsed();
        let anon_growth = rss_kib("RssAnon:").saturating_sub(anon_before);
        let file_growth = rss_kib("RssFile:").saturating_sub(file_before);
        let t = Instant::now();
        let warm = s.user(pid, &addrs);
        let warm_time = t.elapsed();
        // Memory growth is only indicative: other tests run in this process meanwhile. Anonymous
        // memory is what the parsed symbols cost; file pages are the binary, mapped.
        println!(
            "{} addresses of {}: cold {cold_time:?}, warm {warm_time:?}, \
             anonymous memory +{anon_growth} KiB, file pages +{file_growth} KiB",
            addrs.len(),
            own_exe_name()
        );
        assert_eq!(cold, warm);
        assert_eq!(s.stats().cache_hits, addrs.len() as u64);
        let unnamed = cold
            .iter()
            .filter(|frames| frames[0].function.contains("+0x"))
            .count();
        assert_eq!(unnamed as u64, s.stats().unnamed_frames / 2);
        // Every address is a function's first byte, so every one has a name.
        assert_eq!(
            unnamed,
            0,
            "{:?}",
            cold.iter().find(|f| f[0].function.contains("+0x"))
        );
    }

    /// A minimal x86-64 ELF whose `.symtab` (at offset 4096, zeros) takes `symtab_size` bytes:
    /// a sparse file, so a gigabyte of it costs no disk.
    fn write_elf_with_symtab(path: &Path, symtab_size: u64) {
        let mut out = Vec::new();
        out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&3u16.to_le_bytes()); // ET_DYN
        out.extend_from_slice(&62u16.to_le_bytes()); // x86-64
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // entry
        out.extend_from_slice(&0u64.to_le_bytes()); // phoff
        out.extend_from_slice(&64u64.to_le_bytes()); // shoff
        out.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 0, 64, 3, 2] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let section =
            |out: &mut Vec<u8>,
             (name, ty, offset, size, link, entsize): (u32, u32, u64, u64, u32, u64)| {
                out.extend_from_slice(&name.to_le_bytes());
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&0u64.to_le_bytes()); // flags
                out.extend_from_slice(&0u64.to_le_bytes()); // addr
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&link.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes()); // info
                out.extend_from_slice(&8u64.to_le_bytes()); // addralign
                out.extend_from_slice(&entsize.to_le_bytes());
            };
        out.extend_from_slice(&[0u8; 64]);
        section(&mut out, (1, 2, 4096, symtab_size, 2, 24));
        let names = b"\0.symtab\0.shstrtab\0";
        section(&mut out, (9, 3, 256, names.len() as u64, 0, 0));
        out.extend_from_slice(names);
        let f = fs::File::create(path).unwrap();
        std::io::Write::write_all(&mut &f, &out).unwrap();
        f.set_len(4096 + symtab_size).unwrap();
    }

    fn peak_rss() -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    }

    #[test]
    fn a_binary_with_gigantic_symbol_tables_is_refused_once() {
        let path = std::env::temp_dir().join(format!("ws1-huge-symtab-{}", std::process::id()));
        // 1 GiB of (sparse) symbols.
        write_elf_with_symtab(&path, 1 << 30);
        let peak = peak_rss();
        let (symbols, _) = parse_cost(&path);
        assert!(symbols > MAX_SYMBOL_TABLE_BYTES, "{symbols}");
        let mut s = ProfileSymbolizer::new();
        let before = untrusted::refused(untrusted::Kind::Elf, untrusted::Reason::TooLarge);
        for _ in 0..3 {
            assert!(matches!(
                s.binary(std::process::id(), &path, true),
                Err(SymbolsError::Open { .. })
            ));
        }
        // Nothing read the table (other tests run meanwhile, hence the margin).
        let grew = peak_rss().saturating_sub(peak);
        assert!(grew < 256 << 20, "peak RSS grew {grew} bytes");
        // The counter is process-wide (other tests may refuse too), but this file is refused
        // once.
        assert!(untrusted::refused(untrusted::Kind::Elf, untrusted::Reason::TooLarge) > before);
        assert_eq!(s.refused.len(), 1);
        assert!(s.binaries.is_empty());
        // A normal table is parsed as before.
        write_elf_with_symtab(&path, 24 * 100);
        let (symbols, _) = parse_cost(&path);
        assert!(symbols < 64 * 1024, "{symbols}");
        fs::remove_file(&path).unwrap();
    }

    /// Property tests: the binaries blazesym, the build-id reader and the cost estimate open
    /// are files observed processes may have written.
    mod fuzz {
        use super::*;
        use crate::untrusted::fuzz::{config, mutated, small_elf};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(config(64))]

            #[test]
            fn damaged_elf_never_panics(bytes in mutated(small_elf())) {
                let path = std::env::temp_dir().join(format!(
                    "ws1-fuzz-elf-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                fs::write(&path, &bytes).unwrap();
                let _ = parse_cost(&path);
                let _ = read_build_id(&path);
                let blaze = Blaze::new();
                let mut elf = Elf::new(&path);
                elf.debug_syms = true;
                let offsets = [0x0u64, 0x1000, 0x2000, 0x3000, 0x4000];
                let _ = blaze.symbolize(&Source::Elf(elf), Input::FileOffset(&offsets));
                fs::remove_file(&path).unwrap();
            }
        }
    }
}
