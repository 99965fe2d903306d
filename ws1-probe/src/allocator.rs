//! Which allocator a process uses, and which of its entry points precise mode hooks.
//!
//! Detection reads two things, both untrusted and read with bounds: the file-backed paths of
//! `/proc/PID/maps` (a shared `libjemalloc.so*`, `libtcmalloc*.so*`, `libmimalloc*.so*`, the C
//! library) and the defined function symbols of the executable (a static allocator: jemalloc
//! with any prefix, found by its `<prefix>mallocx`; gperftools' `tc_malloc`; the newer tcmalloc's
//! `TCMallocInternal*`; mimalloc's `mi_malloc`; or a plain `malloc`). [`detect`] and [`plan`] are
//! pure; [`inspect`] does the reading.
//!
//! Every candidate that serves allocations is hooked: a Rust program with a prefixed jemalloc
//! still allocates through the C library from C code, so the C library is hooked too unless an
//! earlier candidate exports an unprefixed `malloc` (which then interposes it).

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSymbol, ReadCache, SymbolKind};
use serde::Serialize;

/// An allocator implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Glibc,
    Jemalloc,
    /// gperftools' tcmalloc (`tc_*`).
    Tcmalloc,
    /// Google's newer tcmalloc (`TCMallocInternal*`, usually linked statically).
    #[serde(rename = "tcmalloc-google")]
    TcmallocGoogle,
    Mimalloc,
    /// A `malloc`/`free` pair in the executable that is none of the above (static C library).
    Malloc,
    /// Named with `--alloc-lib`/`--alloc-prefix`.
    Configured,
}

impl Kind {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Glibc => "glibc",
            Self::Jemalloc => "jemalloc",
            Self::Tcmalloc => "tcmalloc",
            Self::TcmallocGoogle => "tcmalloc-google",
            Self::Mimalloc => "mimalloc",
            Self::Malloc => "malloc",
            Self::Configured => "configured",
        }
    }
}

/// Where an allocator lives in a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Binary {
    /// The executable itself (statically linked allocator).
    Exe,
    /// A mapped file, by the path the process sees.
    Lib(String),
}

impl Binary {
    /// The file as seen from this mount namespace.
    pub fn open_path(&self, pid: u32) -> PathBuf {
        match self {
            Self::Exe => PathBuf::from(format!("/proc/{pid}/exe")),
            Self::Lib(path) => {
                Path::new(&format!("/proc/{pid}/root")).join(path.trim_start_matches('/'))
            }
        }
    }

    /// Short name for reports: `exe` or the file name.
    pub fn short(&self) -> &str {
        match self {
            Self::Exe => "exe",
            Self::Lib(path) => path.rsplit('/').next().unwrap_or(path),
        }
    }
}

/// An allocator found in a process, before its symbols are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub kind: Kind,
    pub binary: Binary,
    /// Prefix of the malloc-family names (`_rjem_` for tikv-jemallocator, `je_`, or none).
    pub prefix: String,
}

/// Function symbols of one binary that precise mode may hook: name → file offset. Only names
/// that end with a known entry point's name are kept, at most [`Symbols::MAX`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Symbols {
    by_name: BTreeMap<String, u64>,
}

impl Symbols {
    /// Most symbols kept per binary (hostile or huge binaries cannot grow it further).
    pub const MAX: usize = 8_192;
    /// Longest name kept.
    const MAX_NAME: usize = 256;

    /// Keeps `name` if it could be an entry point (with any prefix).
    pub fn add(&mut self, name: &str, offset: u64) {
        if self.by_name.len() >= Self::MAX || name.len() > Self::MAX_NAME || !interesting(name) {
            return;
        }
        self.by_name.entry(name.to_owned()).or_insert(offset);
    }

    pub fn get(&self, name: &str) -> Option<u64> {
        self.by_name.get(name).copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

impl<'a> FromIterator<(&'a str, u64)> for Symbols {
    fn from_iter<I: IntoIterator<Item = (&'a str, u64)>>(iter: I) -> Self {
        let mut symbols = Self::default();
        for (name, offset) in iter {
            symbols.add(name, offset);
        }
        symbols
    }
}

/// A name worth keeping: a known entry point, possibly prefixed, or a detection marker.
fn interesting(name: &str) -> bool {
    name.starts_with("TCMallocInternal")
        || GROUPS
            .iter()
            .flat_map(|g| g.entries.iter())
            .flat_map(|(_, names)| names.iter())
            .any(|base| name.ends_with(base))
}

/// A set of entry points: `(entry program, names)`. The entry program decides where size and
/// pointer are read; the return program follows from it ([`return_program`]).
struct Group {
    /// Whether the names take the allocator's prefix (C names do; C++ and `tc_`/`mi_` names
    /// are fixed).
    prefixed: bool,
    entries: &'static [(&'static str, &'static [&'static str])],
}

/// The C malloc family, every allocator's.
const MALLOC: Group = Group {
    prefixed: true,
    entries: &[
        ("alloc_malloc", &["malloc", "valloc", "pvalloc"]),
        ("alloc_calloc", &["calloc"]),
        ("alloc_realloc", &["realloc"]),
        ("alloc_reallocarray", &["reallocarray"]),
        ("alloc_aligned", &["aligned_alloc", "memalign"]),
        ("alloc_posix_memalign", &["posix_memalign"]),
        (
            "alloc_free",
            &["free", "cfree", "free_sized", "free_aligned_sized"],
        ),
    ],
};

/// jemalloc's non-standard API (the newer tcmalloc has `sdallocx` too):
/// `mallocx(size, flags)`, `rallocx(ptr, size, flags)`, `xallocx(ptr, size, extra, flags)`,
/// `sdallocx(ptr, size, flags)`, `dallocx(ptr, flags)`.
const JEMALLOC: Group = Group {
    prefixed: true,
    entries: &[
        ("alloc_malloc", &["mallocx"]),
        ("alloc_realloc", &["rallocx"]),
        ("alloc_xallocx", &["xallocx"]),
        ("alloc_free", &["sdallocx", "dallocx"]),
    ],
};

/// C++ `operator new`/`delete` (x86-64 Itanium names), for allocators that define them
/// without going through their own hooked `malloc`.
const CXX: Group = Group {
    prefixed: false,
    entries: &[
        (
            "alloc_malloc",
            &[
                "_Znwm",
                "_Znam",
                "_ZnwmRKSt9nothrow_t",
                "_ZnamRKSt9nothrow_t",
                "_ZnwmSt11align_val_t",
                "_ZnamSt11align_val_t",
                "_ZnwmSt11align_val_tRKSt9nothrow_t",
                "_ZnamSt11align_val_tRKSt9nothrow_t",
            ],
        ),
        (
            "alloc_free",
            &[
                "_ZdlPv",
                "_ZdaPv",
                "_ZdlPvm",
                "_ZdaPvm",
                "_ZdlPvRKSt9nothrow_t",
                "_ZdaPvRKSt9nothrow_t",
                "_ZdlPvSt11align_val_t",
                "_ZdaPvSt11align_val_t",
                "_ZdlPvmSt11align_val_t",
                "_ZdaPvmSt11align_val_t",
                "_ZdlPvSt11align_val_tRKSt9nothrow_t",
                "_ZdaPvSt11align_val_tRKSt9nothrow_t",
            ],
        ),
    ],
};

/// gperftools' `tc_*` API.
const TC: Group = Group {
    prefixed: false,
    entries: &[
        (
            "alloc_malloc",
            &[
                "tc_malloc",
                "tc_malloc_skip_new_handler",
                "tc_valloc",
                "tc_pvalloc",
                "tc_new",
                "tc_new_nothrow",
                "tc_newarray",
                "tc_newarray_nothrow",
                "tc_new_aligned",
                "tc_new_aligned_nothrow",
                "tc_newarray_aligned",
                "tc_newarray_aligned_nothrow",
            ],
        ),
        ("alloc_calloc", &["tc_calloc"]),
        ("alloc_realloc", &["tc_realloc"]),
        ("alloc_aligned", &["tc_memalign"]),
        ("alloc_posix_memalign", &["tc_posix_memalign"]),
        (
            "alloc_free",
            &[
                "tc_free",
                "tc_free_sized",
                "tc_free_aligned_sized",
                "tc_cfree",
                "tc_delete",
                "tc_delete_sized",
                "tc_delete_nothrow",
                "tc_deletearray",
                "tc_deletearray_sized",
                "tc_deletearray_nothrow",
                "tc_delete_aligned",
                "tc_delete_sized_aligned",
                "tc_delete_aligned_nothrow",
                "tc_deletearray_aligned",
                "tc_deletearray_sized_aligned",
                "tc_deletearray_aligned_nothrow",
            ],
        ),
    ],
};

/// mimalloc's `mi_*` API (not the `mi_heap_*` functions, which the ones below call: hooking
/// both would nest calls).
const MI: Group = Group {
    prefixed: false,
    entries: &[
        (
            "alloc_malloc",
            &[
                "mi_malloc",
                "mi_zalloc",
                "mi_malloc_small",
                "mi_zalloc_small",
                "mi_malloc_aligned",
                "mi_malloc_aligned_at",
                "mi_zalloc_aligned",
                "mi_zalloc_aligned_at",
                "mi_new",
                "mi_new_aligned",
                "mi_new_nothrow",
                "mi_new_aligned_nothrow",
                "mi_valloc",
                "mi_pvalloc",
            ],
        ),
        (
            "alloc_calloc",
            &[
                "mi_calloc",
                "mi_mallocn",
                "mi_calloc_aligned",
                "mi_calloc_aligned_at",
                "mi_new_n",
            ],
        ),
        (
            "alloc_realloc",
            &[
                "mi_realloc",
                "mi_reallocf",
                "mi_rezalloc",
                "mi_realloc_aligned",
                "mi_realloc_aligned_at",
                "mi_rezalloc_aligned",
                "mi_rezalloc_aligned_at",
                "mi_new_realloc",
            ],
        ),
        (
            "alloc_reallocarray",
            &[
                "mi_reallocn",
                "mi_recalloc",
                "mi_new_reallocn",
                "mi_recalloc_aligned",
                "mi_recalloc_aligned_at",
            ],
        ),
        ("alloc_aligned", &["mi_aligned_alloc", "mi_memalign"]),
        ("alloc_posix_memalign", &["mi_posix_memalign"]),
        (
            "alloc_free",
            &[
                "mi_free",
                "mi_cfree",
                "mi_free_size",
                "mi_free_aligned",
                "mi_free_size_aligned",
            ],
        ),
    ],
};

const GROUPS: [&Group; 5] = [&MALLOC, &JEMALLOC, &CXX, &TC, &MI];

/// The entry-point groups hooked for an allocator.
fn groups(kind: Kind) -> &'static [&'static Group] {
    match kind {
        Kind::Glibc | Kind::Malloc => &[&MALLOC],
        Kind::Jemalloc | Kind::TcmallocGoogle => &[&MALLOC, &JEMALLOC, &CXX],
        Kind::Tcmalloc => &[&MALLOC, &TC, &CXX],
        Kind::Mimalloc => &[&MALLOC, &MI, &CXX],
        Kind::Configured => &GROUPS,
    }
}

/// The return program paired with an entry program (`None`: the entry needs no return).
pub fn return_program(entry: &str) -> Option<&'static str> {
    match entry {
        "alloc_free" => None,
        "alloc_posix_memalign" => Some("alloc_return_posix_memalign"),
        "alloc_xallocx" => Some("alloc_return_xallocx"),
        _ => Some("alloc_return"),
    }
}

/// One function to hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hook {
    /// The entry program (`alloc_malloc`, `alloc_free`, …).
    pub program: &'static str,
    pub symbol: String,
    /// File offset of the function in its binary.
    #[serde(skip)]
    pub offset: u64,
}

impl Hook {
    pub fn frees(&self) -> bool {
        self.program == "alloc_free"
    }
}

/// An allocator and the entry points to hook in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub kind: Kind,
    pub binary: Binary,
    pub prefix: String,
    pub hooks: Vec<Hook>,
}

impl Plan {
    /// `jemalloc in libjemalloc.so.2` / `jemalloc (prefix _rjem_) in exe`.
    pub fn describe(&self) -> String {
        let prefix = if self.prefix.is_empty() {
            String::new()
        } else {
            format!(" (prefix {})", self.prefix)
        };
        format!("{}{prefix} in {}", self.kind.name(), self.binary.short())
    }

    /// Whether it can be observed at all: something allocates and something frees.
    pub fn usable(&self) -> bool {
        self.hooks.iter().any(|h| !h.frees()) && self.hooks.iter().any(Hook::frees)
    }

    /// Hooks the unprefixed `malloc`, which then interposes the C library's.
    fn interposes_malloc(&self) -> bool {
        self.hooks.iter().any(|h| h.symbol == "malloc")
    }
}

/// The file name of a mapped path, if it names an allocator library.
pub fn lib_kind(path: &str) -> Option<Kind> {
    let name = path.rsplit('/').next().unwrap_or(path);
    let so = |stem: &str| {
        name.strip_prefix(stem)
            .is_some_and(|rest| rest.contains(".so"))
    };
    if so("libjemalloc") {
        Some(Kind::Jemalloc)
    } else if so("libtcmalloc") {
        Some(Kind::Tcmalloc)
    } else if so("libmimalloc") {
        Some(Kind::Mimalloc)
    } else if name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so")) {
        Some(Kind::Glibc)
    } else {
        None
    }
}

/// The prefix of a jemalloc whose `<prefix>mallocx` and `<prefix>free` (or `sdallocx`) are
/// defined: the shortest such prefix, so an unprefixed jemalloc wins.
pub fn jemalloc_prefix(symbols: &Symbols) -> Option<String> {
    symbols
        .names()
        .filter_map(|name| name.strip_suffix("mallocx"))
        .filter(|prefix| {
            // `rallocx`/`nallocx` do not end with `mallocx`, but `je_mallocx`-like names must
            // come with the matching free.
            symbols.has(&format!("{prefix}free")) || symbols.has(&format!("{prefix}sdallocx"))
        })
        .min_by_key(|prefix| prefix.len())
        .map(str::to_owned)
}

/// An allocator linked into the executable, from its symbols.
pub fn static_allocator(exe: &Symbols) -> Option<Candidate> {
    let exe_candidate = |kind, prefix: &str| Candidate {
        kind,
        binary: Binary::Exe,
        prefix: prefix.to_owned(),
    };
    if exe.names().any(|n| n.starts_with("TCMallocInternal")) {
        return Some(exe_candidate(Kind::TcmallocGoogle, ""));
    }
    if let Some(prefix) = jemalloc_prefix(exe) {
        return Some(exe_candidate(Kind::Jemalloc, &prefix));
    }
    if exe.has("tc_malloc") {
        return Some(exe_candidate(Kind::Tcmalloc, ""));
    }
    if exe.has("mi_malloc") || exe.has("mi_free") {
        return Some(exe_candidate(Kind::Mimalloc, ""));
    }
    if exe.has("malloc") && exe.has("free") {
        return Some(exe_candidate(Kind::Malloc, ""));
    }
    None
}

/// The allocators a process may use, most specific first: one linked into the executable, an
/// allocator library it maps, its C library. `maps` is the text of /proc/PID/maps.
pub fn detect(maps: &str, exe: &Symbols) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = static_allocator(exe).into_iter().collect();
    let mut seen = Vec::new();
    for path in maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
    {
        let Some(kind) = lib_kind(path) else {
            continue;
        };
        if seen.contains(&kind) {
            continue;
        }
        seen.push(kind);
        out.push(Candidate {
            kind,
            binary: Binary::Lib(path.to_owned()),
            prefix: String::new(),
        });
    }
    // The C library last: an allocator library interposes its malloc.
    out.sort_by_key(|c| c.kind == Kind::Glibc);
    out
}

/// The hooks for one candidate: every known entry point its binary defines, one per function
/// (aliases at the same offset, such as tcmalloc's `free`/`tc_free`/`_ZdlPv`, are hooked once).
pub fn plan(candidate: &Candidate, symbols: &Symbols) -> Plan {
    let mut hooks: Vec<Hook> = Vec::new();
    for group in groups(candidate.kind) {
        for (program, names) in group.entries {
            for base in *names {
                let symbol = if group.prefixed {
                    format!("{}{base}", candidate.prefix)
                } else {
                    (*base).to_owned()
                };
                let Some(offset) = symbols.get(&symbol) else {
                    continue;
                };
                if hooks.iter().any(|h| h.offset == offset) {
                    continue;
                }
                hooks.push(Hook {
                    program,
                    symbol,
                    offset,
                });
            }
        }
    }
    Plan {
        kind: candidate.kind,
        binary: candidate.binary.clone(),
        prefix: candidate.prefix.clone(),
        hooks,
    }
}

/// Plans for every candidate in order, dropping those an earlier one interposes (an
/// unprefixed `malloc` before the C library) and those with nothing to hook.
pub fn plan_all(candidates: &[(Candidate, Symbols)]) -> Vec<Plan> {
    let mut plans: Vec<Plan> = Vec::new();
    for (candidate, symbols) in candidates {
        if candidate.kind == Kind::Glibc && plans.iter().any(Plan::interposes_malloc) {
            continue;
        }
        let plan = plan(candidate, symbols);
        if plan.usable() {
            plans.push(plan);
        }
    }
    plans
}

/// What precise mode can do with a process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Inspection {
    /// Hooked through these allocators.
    Observed { allocators: Vec<Plan> },
    /// Its allocations cannot be seen; `reason` says why and what to do.
    NotObserved { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Maps {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// An override from `--alloc-lib`/`--alloc-prefix` or the service's config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Override {
    /// Path as the process sees it, or `exe`.
    pub lib: Option<String>,
    pub prefix: String,
}

/// Detects the allocators of `pid` and plans their hooks. An error only when the process is
/// gone (its maps cannot be read).
pub fn inspect(pid: u32, over: &Override) -> Result<Inspection, InspectError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| InspectError::Maps { pid, source })?;
    if let Some(lib) = &over.lib {
        let binary = if lib == "exe" {
            Binary::Exe
        } else {
            Binary::Lib(lib.clone())
        };
        let path = binary.open_path(pid);
        let symbols = match read_symbols(&path) {
            Ok(s) => s,
            Err(err) => {
                return Ok(Inspection::NotObserved {
                    reason: format!(
                        "--alloc-lib {lib}: cannot read {}: {err}; give its path as the process sees it, or `exe`",
                        path.display()
                    ),
                });
            }
        };
        let candidate = Candidate {
            kind: Kind::Configured,
            binary,
            prefix: over.prefix.clone(),
        };
        let plan = plan(&candidate, &symbols);
        return Ok(if plan.usable() {
            Inspection::Observed {
                allocators: vec![plan],
            }
        } else {
            Inspection::NotObserved {
                reason: format!(
                    "{lib} defines no `{p}malloc`/`{p}free` pair to hook: check --alloc-prefix",
                    p = over.prefix
                ),
            }
        });
    }
    let exe = read_symbols(&Binary::Exe.open_path(pid)).unwrap_or_default();
    let mut candidates = detect(&maps, &exe);
    if !over.prefix.is_empty()
        && let Some(first) = candidates.first_mut()
    {
        first.prefix = over.prefix.clone();
    }
    let with_symbols: Vec<(Candidate, Symbols)> = candidates
        .into_iter()
        .map(|c| {
            let symbols = match c.binary {
                Binary::Exe => exe.clone(),
                Binary::Lib(_) => read_symbols(&c.binary.open_path(pid)).unwrap_or_default(),
            };
            (c, symbols)
        })
        .collect();
    let found: Vec<String> = with_symbols
        .iter()
        .map(|(c, _)| format!("{} in {}", c.kind.name(), c.binary.short()))
        .collect();
    let plans = plan_all(&with_symbols);
    Ok(if plans.is_empty() {
        Inspection::NotObserved {
            reason: not_observed_reason(&found),
        }
    } else {
        Inspection::Observed { allocators: plans }
    })
}

/// Why nothing could be hooked, and what to do.
pub fn not_observed_reason(found: &[String]) -> String {
    if found.is_empty() {
        "no known allocator: it maps no libc, jemalloc, tcmalloc or mimalloc and its executable defines no malloc (statically linked and stripped, or a custom allocator?); name the allocator with --alloc-lib PATH|exe and --alloc-prefix PREFIX, or keep the executable's symbol table".to_owned()
    } else {
        format!(
            "found {} but none of its entry points can be hooked (stripped of symbols?); name the allocator with --alloc-lib PATH|exe and --alloc-prefix PREFIX",
            found.join(", ")
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not an ELF file: {0}")]
    Parse(#[from] object::Error),
}

/// Largest symbol table read (a hostile or corrupt header cannot make us read more).
const MAX_SYMTAB_BYTES: u64 = 256 << 20;

/// The hookable function symbols of an ELF file (dynamic and static tables), with their file
/// offsets. Reads only the parts it needs through a read cache, not the whole file.
pub fn read_symbols(path: &Path) -> Result<Symbols, SymbolsError> {
    let file = File::open(path)?;
    let cache = ReadCache::new(file);
    let elf = object::File::parse(&cache)?;
    let mut symbols = Symbols::default();
    let too_big = [".symtab", ".dynsym", ".strtab", ".dynstr"]
        .iter()
        .filter_map(|name| elf.section_by_name(name))
        .any(|s| s.size() > MAX_SYMTAB_BYTES);
    if too_big {
        return Ok(symbols);
    }
    for symbol in elf.dynamic_symbols().chain(elf.symbols()) {
        if symbol.is_undefined() || symbol.kind() != SymbolKind::Text || symbol.address() == 0 {
            continue;
        }
        let Ok(name) = symbol.name() else {
            continue;
        };
        if !interesting(name) || symbols.has(name) {
            continue;
        }
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let Ok(section) = elf.section_by_index(index) else {
            continue;
        };
        let Some((section_offset, _)) = section.file_range() else {
            continue;
        };
        let Some(offset) = symbol
            .address()
            .checked_sub(section.address())
            .and_then(|d| d.checked_add(section_offset))
        else {
            continue;
        };
        symbols.add(name, offset);
    }
    Ok(symbols)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syms(names: &[(&str, u64)]) -> Symbols {
        names.iter().copied().collect()
    }

    const MAPS: &str = "\
55d0-55e0 r-xp 00000000 fe:01 1 /usr/bin/redis-server
7f00-7f10 r-xp 00000000 fe:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2
7f10-7f20 r-xp 00028000 fe:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 rw-p 00000000 00:00 0 [heap]
7f30-7f40 r-xp 00000000 fe:01 4 /usr/lib/x86_64-linux-gnu/libm.so.6";

    #[test]
    fn libraries_are_named_by_file_name() {
        assert_eq!(lib_kind("/usr/lib/libjemalloc.so.2"), Some(Kind::Jemalloc));
        assert_eq!(
            lib_kind("/usr/lib/libtcmalloc_minimal.so.4"),
            Some(Kind::Tcmalloc)
        );
        assert_eq!(
            lib_kind("/usr/lib/libtcmalloc.so.4.5.9"),
            Some(Kind::Tcmalloc)
        );
        assert_eq!(
            lib_kind("/opt/libmimalloc-secure.so.2.0"),
            Some(Kind::Mimalloc)
        );
        assert_eq!(lib_kind("/lib/libc-2.31.so"), Some(Kind::Glibc));
        assert_eq!(lib_kind("/usr/lib/libc.so.6"), Some(Kind::Glibc));
        assert_eq!(lib_kind("/usr/lib/libcrypto.so.3"), None);
        assert_eq!(lib_kind("/usr/lib/libjemalloc_wrapper.a"), None);
        assert_eq!(lib_kind("[heap]"), None);
    }

    #[test]
    fn shared_jemalloc_comes_before_libc_and_interposes_it() {
        let candidates = detect(MAPS, &Symbols::default());
        let kinds: Vec<Kind> = candidates.iter().map(|c| c.kind).collect();
        assert_eq!(kinds, [Kind::Jemalloc, Kind::Glibc]);
        let je = syms(&[
            ("malloc", 0x100),
            ("free", 0x200),
            ("mallocx", 0x300),
            ("sdallocx", 0x400),
            ("rallocx", 0x500),
            ("xallocx", 0x600),
            ("_Znwm", 0x700),
            ("_ZdlPvm", 0x800),
        ]);
        let libc = syms(&[("malloc", 0x10), ("free", 0x20), ("calloc", 0x30)]);
        let plans = plan_all(&[(candidates[0].clone(), je), (candidates[1].clone(), libc)]);
        assert_eq!(plans.len(), 1, "{plans:?}");
        assert_eq!(plans[0].describe(), "jemalloc in libjemalloc.so.2");
        let hooked: Vec<(&str, &str)> = plans[0]
            .hooks
            .iter()
            .map(|h| (h.program, h.symbol.as_str()))
            .collect();
        assert_eq!(
            hooked,
            [
                ("alloc_malloc", "malloc"),
                ("alloc_free", "free"),
                ("alloc_malloc", "mallocx"),
                ("alloc_realloc", "rallocx"),
                ("alloc_xallocx", "xallocx"),
                ("alloc_free", "sdallocx"),
                ("alloc_malloc", "_Znwm"),
                ("alloc_free", "_ZdlPvm"),
            ]
        );
    }

    #[test]
    fn static_prefixed_jemalloc_is_found_and_libc_kept() {
        // A Rust program with tikv-jemallocator: `_rjem_*` in the executable, and internal
        // `_rjem_je_*` names that must not be taken for a prefix.
        let exe = syms(&[
            ("_rjem_mallocx", 1),
            ("_rjem_sdallocx", 2),
            ("_rjem_rallocx", 3),
            ("_rjem_calloc", 4),
            ("_rjem_malloc", 5),
            ("_rjem_free", 6),
            ("_rjem_je_arena_mallocx", 7),
        ]);
        assert_eq!(jemalloc_prefix(&exe).as_deref(), Some("_rjem_"));
        let candidates = detect(MAPS.replace("libjemalloc.so.2", "libz.so.1").as_str(), &exe);
        assert_eq!(candidates.len(), 2);
        assert_eq!(
            candidates[0],
            Candidate {
                kind: Kind::Jemalloc,
                binary: Binary::Exe,
                prefix: "_rjem_".into()
            }
        );
        let libc = syms(&[("malloc", 0x10), ("free", 0x20)]);
        let plans = plan_all(&[(candidates[0].clone(), exe), (candidates[1].clone(), libc)]);
        let described: Vec<String> = plans.iter().map(Plan::describe).collect();
        assert_eq!(
            described,
            ["jemalloc (prefix _rjem_) in exe", "glibc in libc.so.6"]
        );
        assert!(plans[0].hooks.iter().any(|h| h.symbol == "_rjem_sdallocx"));
        assert!(
            plans[0]
                .hooks
                .iter()
                .all(|h| h.symbol.starts_with("_rjem_"))
        );
    }

    #[test]
    fn je_prefix_and_unprefixed_static_allocators() {
        let exe = syms(&[("je_mallocx", 1), ("je_free", 2), ("je_malloc", 3)]);
        assert_eq!(jemalloc_prefix(&exe).as_deref(), Some("je_"));
        // `mallocx` without a matching free is not jemalloc.
        assert_eq!(jemalloc_prefix(&syms(&[("my_mallocx", 1)])), None);
        let tc = syms(&[("tc_malloc", 1), ("malloc", 1), ("free", 2)]);
        assert_eq!(static_allocator(&tc).map(|c| c.kind), Some(Kind::Tcmalloc));
        let google = syms(&[("TCMallocInternalMalloc", 1), ("malloc", 1), ("free", 2)]);
        assert_eq!(
            static_allocator(&google).map(|c| c.kind),
            Some(Kind::TcmallocGoogle)
        );
        let mi = syms(&[("mi_malloc_aligned", 1), ("mi_free", 2)]);
        assert_eq!(static_allocator(&mi).map(|c| c.kind), Some(Kind::Mimalloc));
        let plain = syms(&[("malloc", 1), ("free", 2)]);
        assert_eq!(static_allocator(&plain).map(|c| c.kind), Some(Kind::Malloc));
        assert_eq!(static_allocator(&Symbols::default()), None);
    }

    #[test]
    fn aliases_are_hooked_once() {
        // gperftools: free, tc_free, _ZdlPv are one function.
        let tc = syms(&[
            ("malloc", 0x10),
            ("tc_malloc", 0x10),
            ("free", 0x20),
            ("tc_free", 0x20),
            ("_ZdlPv", 0x20),
            ("tc_free_sized", 0x30),
            ("_ZdlPvm", 0x30),
        ]);
        let candidate = Candidate {
            kind: Kind::Tcmalloc,
            binary: Binary::Lib("/usr/lib/libtcmalloc.so.4".into()),
            prefix: String::new(),
        };
        let plan = plan(&candidate, &tc);
        let hooked: Vec<&str> = plan.hooks.iter().map(|h| h.symbol.as_str()).collect();
        assert_eq!(hooked, ["malloc", "free", "tc_free_sized"]);
    }

    #[test]
    fn nothing_hookable_is_not_observed() {
        // A static, stripped executable: nothing mapped, no symbols.
        let maps = "00400000-00500000 r-xp 00000000 fe:01 1 /usr/local/bin/static-app";
        assert!(detect(maps, &Symbols::default()).is_empty());
        // A stripped allocator library: found but no symbols.
        let candidates = detect(MAPS, &Symbols::default());
        let plans = plan_all(&[(candidates[0].clone(), Symbols::default())]);
        assert!(plans.is_empty());
        assert!(not_observed_reason(&[]).starts_with("no known allocator"));
        assert!(
            not_observed_reason(&["jemalloc in libjemalloc.so.2".into()])
                .starts_with("found jemalloc in libjemalloc.so.2 but none")
        );
    }

    #[test]
    fn symbols_are_bounded_and_filtered() {
        let mut s = Symbols::default();
        s.add("main", 1);
        s.add("printf", 2);
        assert!(!s.has("main") && !s.has("printf"));
        for i in 0..(Symbols::MAX + 10) {
            s.add(&format!("x{i}_malloc"), i as u64);
        }
        assert_eq!(s.names().count(), Symbols::MAX);
        s.add(&format!("{}malloc", "a".repeat(300)), 1);
        assert_eq!(s.names().count(), Symbols::MAX);
    }

    #[test]
    fn own_allocator_is_glibc() {
        let own = inspect(std::process::id(), &Override::default()).unwrap();
        let Inspection::Observed { allocators } = own else {
            panic!("{own:?}");
        };
        assert_eq!(allocators[0].kind, Kind::Glibc, "{allocators:?}");
        assert!(allocators[0].hooks.iter().any(|h| h.symbol == "malloc"));
        assert!(allocators[0].hooks.iter().any(|h| h.symbol == "free"));
    }
}
