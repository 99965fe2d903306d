//! Python stacks without application changes, for CPython 3.11 and 3.12.
//!
//! The agent finds a process's interpreter (the executable or a mapped `libpython3.N.so`), reads
//! its version (`Py_Version`) and the address of `_PyRuntime` from the binary's dynamic symbols
//! plus the mapping's load bias, and hands the kernel the address and the structure offsets of
//! that version ([`PyProc`], map `PY_PROCS`). On each sample the kernel walks the thread's frame
//! chain and records code object addresses (see `ws1-probe-ebpf/src/python.rs`); here they are
//! named from the process's memory (`co_qualname`, `co_filename`, `co_firstlineno`, read with
//! `process_vm_readv`, bounded and checked against `PyCode_Type`), and put in place of the
//! interpreter's `_PyEval_EvalFrameDefault` frames, each replaced by the Python frames it ran.
//!
//! This is the approach of py-spy and of the OpenTelemetry and Parca eBPF profilers (a thread
//! state's frame chain, per-version offsets); the offsets below were measured with `offsetof()`
//! against each version's headers (`Include/internal/pycore_*.h`, built with `Py_BUILD_CORE`):
//! pyenv 3.11.7 (Debian's 3.11.2 headers give the same) and pyenv 3.12.1.

use std::{
    collections::HashMap,
    io::Read,
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object, ObjectSegment, ObjectSymbol};
use ws1_probe_common::python::{
    PY_CHAIN_TRUNCATED, PY_FRAME_ENTRY, PY_FRAME_FLAGS, PY_FRAME_SHIM, PyOffsets, PyProc,
};

use super::ProfFrame;
use crate::untrusted;

/// Offsets of the code and string objects the agent reads to name a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    /// `PyObject.ob_type`
    pub ob_type: u32,
    /// `PyCodeObject.co_filename`, `co_name`, `co_qualname`, `co_firstlineno`
    pub filename: u32,
    pub name: u32,
    pub qualname: u32,
    pub firstlineno: u32,
    /// `PyASCIIObject.length`, `.state`; `sizeof(PyASCIIObject)`, `sizeof(PyCompactUnicodeObject)`
    pub str_length: u32,
    pub str_state: u32,
    pub ascii_size: u32,
    pub compact_size: u32,
}

/// Everything version-specific.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub walker: PyOffsets,
    pub code: CodeLayout,
}

/// CPython 3.11 (pyenv 3.11.7 headers; Debian 3.11.2's are the same).
pub const PY311: Layout = Layout {
    walker: PyOffsets {
        runtime_interpreters_head: 40,
        interp_threads_head: 16,
        tstate_next: 8,
        tstate_native_thread_id: 160,
        tstate_cframe: 56,
        cframe_current_frame: 8,
        frame_code: 32,
        frame_previous: 48,
        frame_owner: 69,
        frame_is_entry: 68,
    },
    code: CodeLayout {
        ob_type: 8,
        filename: 112,
        name: 120,
        qualname: 128,
        firstlineno: 72,
        str_length: 16,
        str_state: 32,
        ascii_size: 48,
        compact_size: 72,
    },
};

/// CPython 3.12 (pyenv 3.12.1 headers): `_PyInterpreterFrame` starts with `f_code`, entry
/// frames are C-stack shims (`owner == FRAME_OWNED_BY_CSTACK`) instead of an `is_entry` flag,
/// and unicode objects lost their `wstr` pointer.
pub const PY312: Layout = Layout {
    walker: PyOffsets {
        runtime_interpreters_head: 40,
        interp_threads_head: 72,
        tstate_next: 8,
        tstate_native_thread_id: 144,
        tstate_cframe: 56,
        cframe_current_frame: 0,
        frame_code: 0,
        frame_previous: 8,
        frame_owner: 70,
        frame_is_entry: PyOffsets::ABSENT,
    },
    code: CodeLayout {
        ob_type: 8,
        filename: 112,
        name: 120,
        qualname: 128,
        firstlineno: 68,
        str_length: 16,
        str_state: 32,
        ascii_size: 40,
        compact_size: 56,
    },
};

/// The layout of a `PY_VERSION_HEX`, when supported.
pub fn layout_for(version_hex: u32) -> Option<Layout> {
    match (version_hex >> 24, (version_hex >> 16) & 0xff) {
        (3, 11) => Some(PY311),
        (3, 12) => Some(PY312),
        _ => None,
    }
}

/// `3.11.7` from a `PY_VERSION_HEX`.
pub fn version_string(version_hex: u32) -> String {
    format!(
        "{}.{}.{}",
        version_hex >> 24,
        (version_hex >> 16) & 0xff,
        (version_hex >> 8) & 0xff
    )
}

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot read /proc/{pid}/maps: {source}")]
    Maps { pid: u32, source: std::io::Error },
    #[error("cannot read {path}: {reason}")]
    Binary { path: String, reason: String },
    #[error(
        "{path} has no dynamic symbol `{symbol}` (a CPython built without it is not supported)"
    )]
    Symbol { path: String, symbol: &'static str },
    #[error("cannot read the interpreter version from pid {pid}'s memory: {source}")]
    Memory { pid: u32, source: std::io::Error },
    #[error(
        "CPython {version} is not supported (3.11 and 3.12 are): its stacks show interpreter frames only"
    )]
    Unsupported { version: String },
}

/// A CPython process the kernel walks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyTarget {
    pub pid: u32,
    /// What the kernel gets.
    pub proc_: PyProc,
    pub layout: Layout,
    /// Address of `PyCode_Type` in the process: code objects are checked against it.
    pub code_type: u64,
    /// The binary holding the interpreter (as the process sees it).
    pub binary: String,
}

impl PyTarget {
    pub fn version(&self) -> String {
        version_string(self.proc_.version)
    }
}

/// One line of /proc/PID/maps that maps a file.
#[derive(Debug, PartialEq, Eq)]
struct MapLine<'a> {
    start: u64,
    offset: u64,
    path: &'a str,
}

fn parse_map_line(line: &str) -> Option<MapLine<'_>> {
    let mut fields = line.splitn(6, ' ');
    let (start, _) = fields.next()?.split_once('-')?;
    let _perms = fields.next()?;
    let offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let path = fields.next()?.trim_start();
    if !path.starts_with('/') {
        return None;
    }
    Some(MapLine {
        start: u64::from_str_radix(start, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        path,
    })
}

/// Whether a file name is a CPython interpreter or its shared library (`python3.11`,
/// `libpython3.12.so.1.0`).
pub fn is_interpreter_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or_default();
    let digits = |r: &str| r.bytes().take_while(u8::is_ascii_digit).count();
    if let Some(r) = name.strip_prefix("libpython3.") {
        let d = digits(r);
        d > 0 && r[d..].starts_with(".so")
    } else if let Some(r) = name.strip_prefix("python3.") {
        let d = digits(r);
        d > 0 && d == r.len()
    } else {
        false
    }
}

/// The interpreter mapping of a process: its path and the address its file offset 0 is
/// mapped at (the lowest mapping of the file). A `libpython` wins over the executable.
fn find_interpreter(maps: &str) -> Option<(String, u64)> {
    let mut best: Option<(String, u64, bool)> = None;
    for m in maps.lines().filter_map(parse_map_line) {
        let path = m.path.trim_end_matches(" (deleted)");
        if m.offset != 0 || !is_interpreter_file(path) {
            continue;
        }
        let lib = path
            .rsplit('/')
            .next()
            .is_some_and(|n| n.starts_with("lib"));
        match &best {
            Some((_, _, true)) => {}
            Some((_, _, false)) if !lib => {}
            _ => best = Some((path.to_owned(), m.start, lib)),
        }
    }
    best.map(|(p, s, _)| (p, s))
}

/// Symbols of an interpreter binary (link-time addresses) and where its first segment goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BinarySymbols {
    runtime: u64,
    version: u64,
    code_type: u64,
    /// `p_vaddr - p_offset` of the first loadable segment.
    base: u64,
}

/// Largest interpreter binary read (Debian's python3.11 is 6.6 MB, libpython ~25 MB with
/// symbols).
const MAX_BINARY_BYTES: u64 = 256 << 20;

/// Interpreter binaries whose symbols were read, by (device, inode, mtime, size): every Python
/// process of a host maps one of a few, and reading one is tens of MB.
static SYMBOLS: std::sync::Mutex<Vec<(FileKey, BinarySymbols)>> = std::sync::Mutex::new(Vec::new());
/// (device, inode, mtime, size) of a file.
type FileKey = (u64, u64, i64, u64);
/// Binaries remembered in [`SYMBOLS`].
const MAX_CACHED_BINARIES: usize = 32;

fn read_symbols(path: &Path) -> Result<BinarySymbols, String> {
    use std::os::unix::fs::MetadataExt;
    let file = untrusted::open_binary(path).map_err(|e| e.to_string())?;
    let key = file
        .metadata()
        .map(|m| (m.dev(), m.ino(), m.mtime(), m.size()))
        .map_err(|e| e.to_string())?;
    if let Ok(cache) = SYMBOLS.lock()
        && let Some((_, syms)) = cache.iter().find(|(k, _)| *k == key)
    {
        return Ok(*syms);
    }
    let syms = parse_symbols(file)?;
    if let Ok(mut cache) = SYMBOLS.lock() {
        if cache.len() >= MAX_CACHED_BINARIES {
            cache.remove(0);
        }
        cache.push((key, syms));
    }
    Ok(syms)
}

fn parse_symbols(file: std::fs::File) -> Result<BinarySymbols, String> {
    let mut data = Vec::new();
    file.take(MAX_BINARY_BYTES)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    let elf = object::File::parse(&*data).map_err(|e| e.to_string())?;
    let mut runtime = None;
    let mut version = None;
    let mut code_type = None;
    for sym in elf.dynamic_symbols() {
        match sym.name() {
            Ok("_PyRuntime") => runtime = Some(sym.address()),
            Ok("Py_Version") => version = Some(sym.address()),
            Ok("PyCode_Type") => code_type = Some(sym.address()),
            _ => {}
        }
    }
    let base = elf
        .segments()
        .map(|s| {
            let (offset, _) = s.file_range();
            s.address().wrapping_sub(offset)
        })
        .next()
        .unwrap_or(0);
    let missing = |s: &'static str| format!("no dynamic symbol `{s}`");
    Ok(BinarySymbols {
        runtime: runtime.ok_or_else(|| missing("_PyRuntime"))?,
        version: version.ok_or_else(|| missing("Py_Version (CPython 3.11+)"))?,
        code_type: code_type.ok_or_else(|| missing("PyCode_Type"))?,
        base,
    })
}

/// Reads `buf.len()` bytes of process `pid` at `addr`.
pub fn read_memory(pid: u32, addr: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which is writable for its length; the remote range is
    // checked by the kernel.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    }
    Ok(())
}

/// Finds the CPython interpreter of `pid`. `Ok(None)` for a process without one.
pub fn detect(pid: u32) -> Result<Option<PyTarget>, PythonError> {
    let maps_path = format!("/proc/{pid}/maps");
    let mut maps = String::new();
    std::fs::File::open(&maps_path)
        .and_then(|f| f.take(16 << 20).read_to_string(&mut maps))
        .map_err(|source| PythonError::Maps { pid, source })?;
    let Some((binary, start)) = find_interpreter(&maps) else {
        return Ok(None);
    };
    let open_path = PathBuf::from(format!("/proc/{pid}/root")).join(binary.trim_start_matches('/'));
    let syms = read_symbols(&open_path).map_err(|reason| PythonError::Binary {
        path: binary.clone(),
        reason,
    })?;
    let bias = start.wrapping_sub(syms.base);
    let mut v = [0u8; 4];
    read_memory(pid, syms.version.wrapping_add(bias), &mut v)
        .map_err(|source| PythonError::Memory { pid, source })?;
    let version = u32::from_le_bytes(v);
    let layout = layout_for(version).ok_or_else(|| PythonError::Unsupported {
        version: version_string(version),
    })?;
    Ok(Some(PyTarget {
        pid,
        proc_: PyProc {
            runtime: syms.runtime.wrapping_add(bias),
            offsets: layout.walker,
            version,
            _pad: 0,
        },
        layout,
        code_type: syms.code_type.wrapping_add(bias),
        binary,
    }))
}

/// What `ws1-probe check --pid` says about a process's Python stacks: the interpreter found,
/// and the thread states the profiler's walk reaches from `_PyRuntime` (read here the same way
/// the kernel reads them, so wrong offsets show as no thread of the process found).
pub fn inspect(pid: u32) -> String {
    let t = match detect(pid) {
        Ok(Some(t)) => t,
        Ok(None) => return "no CPython interpreter mapped: native frames only".to_owned(),
        Err(err) => return format!("no Python stacks: {err}"),
    };
    let tids: std::collections::HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let o = &t.proc_.offsets;
    let read = |addr: u64| -> Option<u64> {
        let mut b = [0u8; 8];
        read_memory(pid, addr, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let (mut states, mut matched) = (0u32, 0u32);
    let interp = read(t.proc_.runtime + u64::from(o.runtime_interpreters_head)).unwrap_or(0);
    let mut ts = if interp == 0 {
        0
    } else {
        read(interp + u64::from(o.interp_threads_head)).unwrap_or(0)
    };
    while ts != 0 && states < ws1_probe_common::python::PY_MAX_THREADS {
        states += 1;
        if read(ts + u64::from(o.tstate_native_thread_id)).is_some_and(|id| tids.contains(&id)) {
            matched += 1;
        }
        ts = read(ts + u64::from(o.tstate_next)).unwrap_or(0);
    }
    let head = format!("CPython {} in {}", t.version(), t.binary);
    if matched == 0 {
        format!("{head}: no thread state of this process found from _PyRuntime: no Python stacks")
    } else {
        format!(
            "{head}: Python stacks ({matched} of {states} thread states are threads of the process)"
        )
    }
}

/// Times a targeted process is looked at for an interpreter (a process just started may not
/// have mapped its `libpython` yet).
const DETECT_TRIES: u8 = 3;

/// The CPython processes among the profiler's targets.
#[derive(Debug, Default)]
pub struct PyTargets {
    found: HashMap<u32, PyTarget>,
    /// Processes without a usable interpreter, and how often they were looked at.
    misses: HashMap<u32, u8>,
}

/// What the kernel's `PY_PROCS` map must gain and lose.
#[derive(Debug, Default)]
pub struct PyChanges {
    pub add: Vec<(u32, PyProc)>,
    pub remove: Vec<u32>,
}

impl PyTargets {
    /// Looks at new targets (`(pid, service)` pairs) and forgets those gone.
    pub fn update(&mut self, targets: &[(u32, u32)]) -> PyChanges {
        let live: std::collections::HashSet<u32> = targets.iter().map(|(p, _)| *p).collect();
        let mut changes = PyChanges::default();
        self.found.retain(|pid, _| {
            let keep = live.contains(pid);
            if !keep {
                changes.remove.push(*pid);
            }
            keep
        });
        self.misses.retain(|pid, _| live.contains(pid));
        for &(pid, _) in targets {
            if self.found.contains_key(&pid) {
                continue;
            }
            let tries = self.misses.entry(pid).or_insert(0);
            if *tries >= DETECT_TRIES {
                continue;
            }
            *tries += 1;
            match detect(pid) {
                Ok(Some(t)) => {
                    tracing::debug!(
                        "pid {pid}: CPython {} in {}: Python frames from its thread states",
                        t.version(),
                        t.binary
                    );
                    self.misses.remove(&pid);
                    changes.add.push((pid, t.proc_));
                    self.found.insert(pid, t);
                }
                Ok(None) => {}
                Err(err) => {
                    // Not worth retrying: the binary or version will not change.
                    *tries = DETECT_TRIES;
                    tracing::info!("pid {pid}: {err}");
                }
            }
        }
        changes
    }

    /// Stops following `pid` (its kernel entry could not be written).
    pub fn drop_target(&mut self, pid: u32) {
        self.found.remove(&pid);
        self.misses.insert(pid, DETECT_TRIES);
    }

    /// The processes with Python stacks, by pid.
    pub fn processes(&self) -> Vec<&PyTarget> {
        let mut v: Vec<&PyTarget> = self.found.values().collect();
        v.sort_by_key(|t| t.pid);
        v
    }
}

/// "Python stacks: pid 12 (CPython 3.11.2, /usr/bin/python3.11)", or empty without any.
pub fn describe(targets: &[&PyTarget]) -> String {
    if targets.is_empty() {
        return String::new();
    }
    let list: Vec<String> = targets
        .iter()
        .map(|t| format!("pid {} (CPython {}, {})", t.pid, t.version(), t.binary))
        .collect();
    format!("Python stacks: {}", list.join(", "))
}

/// A named Python function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFunction {
    pub qualname: String,
    pub file: String,
    pub line: u32,
}

impl PyFunction {
    pub fn frame(&self) -> ProfFrame {
        ProfFrame {
            function: self.qualname.clone(),
            module: Some(self.file.clone()),
            location: Some(format!("{}:{}", self.file, self.line)),
            kernel: false,
        }
    }
}

/// Longest name read (characters).
const MAX_NAME_CHARS: u64 = 1024;

/// Decodes a compact unicode object's characters (`kind` bytes each).
pub fn decode_chars(bytes: &[u8], kind: u32) -> Option<String> {
    match kind {
        1 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        2 => bytes
            .chunks_exact(2)
            .map(|c| char::from_u32(u32::from(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        4 => bytes
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// Where a compact `str`'s characters are and how wide: (data offset, kind, length), from the
/// header bytes (at least `compact_size` long). `None` for a non-compact or odd string.
pub fn str_shape(header: &[u8], code: &CodeLayout) -> Option<(u32, u32, u64)> {
    let at = |off: u32, n: usize| header.get(off as usize..off as usize + n);
    let length = i64::from_le_bytes(at(code.str_length, 8)?.try_into().ok()?);
    let state = u32::from_le_bytes(at(code.str_state, 4)?.try_into().ok()?);
    let kind = (state >> 2) & 7;
    let compact = (state >> 5) & 1 == 1;
    let ascii = (state >> 6) & 1 == 1;
    if !compact || !(0..=MAX_NAME_CHARS as i64 * 64).contains(&length) {
        return None;
    }
    let data = if ascii {
        code.ascii_size
    } else {
        code.compact_size
    };
    Some((data, kind, (length as u64).min(MAX_NAME_CHARS)))
}

fn read_str(pid: u32, code: &CodeLayout, addr: u64) -> Option<String> {
    let mut header = [0u8; 80];
    let n = (code.compact_size as usize).min(header.len());
    read_memory(pid, addr, &mut header[..n]).ok()?;
    let (data, kind, len) = str_shape(&header[..n], code)?;
    let mut bytes = vec![0u8; (len * u64::from(kind)) as usize];
    read_memory(pid, addr + u64::from(data), &mut bytes).ok()?;
    decode_chars(&bytes, kind)
}

/// Code objects named so far, per process.
const MAX_CACHED_CODES: usize = 100_000;

/// Names code objects of Python processes, caching them per (pid, address).
#[derive(Default)]
pub struct PySymbolizer {
    /// Processes looked at: their interpreter, or `None` when none was found.
    targets: HashMap<u32, Option<PyTarget>>,
    names: HashMap<(u32, u64), Option<Arc<PyFunction>>>,
}

impl PySymbolizer {
    /// Drops what is kept for process `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.targets.remove(&pid);
        self.names.retain(|(p, _), _| *p != pid);
    }

    /// The interpreter of `pid`, found on first use.
    pub fn target(&mut self, pid: u32) -> Option<&PyTarget> {
        self.targets
            .entry(pid)
            .or_insert_with(|| match detect(pid) {
                Ok(t) => t,
                Err(err) => {
                    tracing::debug!("pid {pid}: no Python frames: {err}");
                    None
                }
            })
            .as_ref()
    }

    /// Names the code object at `addr` of `pid`.
    pub fn function(&mut self, pid: u32, addr: u64) -> Option<Arc<PyFunction>> {
        if let Some(f) = self.names.get(&(pid, addr)) {
            return f.clone();
        }
        let f = read_code(pid, self.target(pid)?, addr).map(Arc::new);
        if self.names.len() >= MAX_CACHED_CODES {
            self.names.clear();
        }
        self.names.insert((pid, addr), f.clone());
        f
    }

    /// The Python frames of a raw chain, per `_PyEval_EvalFrameDefault` call, innermost first,
    /// and whether the chain reached its outermost frame.
    pub fn frames(&mut self, pid: u32, words: &[u64]) -> (Vec<Vec<ProfFrame>>, bool) {
        let (calls, complete) = split_calls(words);
        let named = calls
            .iter()
            .map(|call| {
                call.iter()
                    .map(|&addr| match self.function(pid, addr) {
                        Some(f) => f.frame(),
                        None => ProfFrame::named(&format!("[python code 0x{addr:x}]")),
                    })
                    .collect()
            })
            .collect();
        (named, complete)
    }
}

fn read_code(pid: u32, t: &PyTarget, addr: u64) -> Option<PyFunction> {
    let c = &t.layout.code;
    let mut head = [0u8; 136];
    read_memory(pid, addr, &mut head).ok()?;
    let word = |off: u32| -> Option<u64> {
        Some(u64::from_le_bytes(
            head.get(off as usize..off as usize + 8)?.try_into().ok()?,
        ))
    };
    if word(c.ob_type)? != t.code_type {
        return None;
    }
    let line = u32::from_le_bytes(
        head.get(c.firstlineno as usize..c.firstlineno as usize + 4)?
            .try_into()
            .ok()?,
    );
    let qualname =
        read_str(pid, c, word(c.qualname)?).or_else(|| read_str(pid, c, word(c.name)?))?;
    let file = read_str(pid, c, word(c.filename)?).unwrap_or_default();
    Some(PyFunction {
        qualname,
        file,
        line,
    })
}

/// Splits a raw chain (innermost first) into the code objects run by each
/// `_PyEval_EvalFrameDefault` call, innermost call first. Also returns whether the chain is
/// complete (not cut at the kernel's frame limit).
pub fn split_calls(words: &[u64]) -> (Vec<Vec<u64>>, bool) {
    let mut calls = Vec::new();
    let mut current = Vec::new();
    let mut complete = true;
    for &w in words {
        if w == PY_CHAIN_TRUNCATED {
            complete = false;
            break;
        }
        if w & PY_FRAME_SHIM != 0 {
            // 3.12: the shim closes the call whose frames came before it.
            calls.push(std::mem::take(&mut current));
            continue;
        }
        current.push(w & !PY_FRAME_FLAGS);
        if w & PY_FRAME_ENTRY != 0 {
            // 3.11: the entry frame is the outermost one of its call.
            calls.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        calls.push(current);
    }
    (calls, complete)
}

/// The interpreter's frame that runs Python code.
pub const EVAL_FUNCTION: &str = "_PyEval_EvalFrameDefault";

/// Puts Python frames into a native stack (leaf first): each `_PyEval_EvalFrameDefault` frame
/// is replaced by the frames its call ran (`calls`, innermost call first); calls left over
/// (the native walk stopped early, e.g. at a `-X perf` trampoline) go after the last one, or
/// at the end. `py::` perf-trampoline frames are dropped: the Python frames name them.
/// Returns whether calls were left over (the native stack ended inside Python code).
pub fn interleave(native: Vec<ProfFrame>, calls: Vec<Vec<ProfFrame>>) -> (Vec<ProfFrame>, bool) {
    let mut out = Vec::with_capacity(native.len() + calls.iter().map(Vec::len).sum::<usize>());
    let mut calls = calls.into_iter();
    let mut last_eval = None;
    for f in native {
        if f.function.starts_with("py::") {
            continue;
        }
        if f.function == EVAL_FUNCTION
            && let Some(call) = calls.next()
        {
            out.extend(call);
            last_eval = Some(out.len());
            continue;
        }
        out.push(f);
    }
    let rest: Vec<ProfFrame> = calls.flatten().collect();
    let left_over = !rest.is_empty();
    let at = last_eval.unwrap_or(out.len());
    out.splice(at..at, rest);
    (out, left_over)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(frames: &[ProfFrame]) -> Vec<&str> {
        frames.iter().map(|f| f.function.as_str()).collect()
    }

    #[test]
    fn frame_fields_lie_in_the_bytes_the_kernel_reads() {
        use ws1_probe_common::python::PY_FRAME_BYTES;
        for l in [PY311, PY312] {
            let w = l.walker;
            assert!(w.frame_code + 8 <= PY_FRAME_BYTES && w.frame_previous + 8 <= PY_FRAME_BYTES);
            assert!(w.frame_owner < PY_FRAME_BYTES);
            assert!(w.frame_is_entry < PY_FRAME_BYTES || w.frame_is_entry == PyOffsets::ABSENT);
        }
    }

    #[test]
    fn versions_and_layouts() {
        assert_eq!(layout_for(0x030b02f0), Some(PY311));
        assert_eq!(layout_for(0x030c01f0), Some(PY312));
        assert_eq!(layout_for(0x030d00f0), None);
        assert_eq!(layout_for(0x020712f0), None);
        assert_eq!(version_string(0x030b07f0), "3.11.7");
    }

    /// Prints the offsets the tables hold, measured with `offsetof()` against a CPython's
    /// internal headers.
    const OFFSETS_C: &str = r#"
#define Py_BUILD_CORE 1
#include <Python.h>
#include <stddef.h>
#include <stdio.h>
#include "internal/pycore_runtime.h"
#include "internal/pycore_interp.h"
#include "internal/pycore_frame.h"
#define P(v) printf("%zu\n", (size_t)(v))
int main(void) {
  P(offsetof(_PyRuntimeState, interpreters.head));
  P(offsetof(PyInterpreterState, threads.head));
  P(offsetof(PyThreadState, next));
  P(offsetof(PyThreadState, native_thread_id));
  P(offsetof(PyThreadState, cframe));
  P(offsetof(_PyCFrame, current_frame));
  P(offsetof(_PyInterpreterFrame, f_code));
  P(offsetof(_PyInterpreterFrame, previous));
  P(offsetof(_PyInterpreterFrame, owner));
#if PY_MINOR_VERSION == 11
  P(offsetof(_PyInterpreterFrame, is_entry));
#else
  P(0xffffffffu);
  if (FRAME_OWNED_BY_CSTACK != 3) return 1;
#endif
  P(offsetof(PyObject, ob_type));
  P(offsetof(PyCodeObject, co_filename));
  P(offsetof(PyCodeObject, co_name));
  P(offsetof(PyCodeObject, co_qualname));
  P(offsetof(PyCodeObject, co_firstlineno));
  P(offsetof(PyASCIIObject, length));
  P(offsetof(PyASCIIObject, state));
  P(sizeof(PyASCIIObject));
  P(sizeof(PyCompactUnicodeObject));
  return 0;
}
"#;

    fn table(l: &Layout) -> Vec<u64> {
        let (w, c) = (&l.walker, &l.code);
        [
            w.runtime_interpreters_head,
            w.interp_threads_head,
            w.tstate_next,
            w.tstate_native_thread_id,
            w.tstate_cframe,
            w.cframe_current_frame,
            w.frame_code,
            w.frame_previous,
            w.frame_owner,
            w.frame_is_entry,
            c.ob_type,
            c.filename,
            c.name,
            c.qualname,
            c.firstlineno,
            c.str_length,
            c.str_state,
            c.ascii_size,
            c.compact_size,
        ]
        .into_iter()
        .map(u64::from)
        .collect()
    }

    /// The include directory of pyenv's newest CPython 3.`minor`.
    fn pyenv_include(minor: u32) -> Option<std::path::PathBuf> {
        let root = std::env::var_os("PYENV_ROOT")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| "/root/.pyenv".into());
        let mut found: Vec<_> = std::fs::read_dir(root.join("versions"))
            .ok()?
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("3.{minor}."))
            })
            .map(|e| e.path().join(format!("include/python3.{minor}")))
            .filter(|p| p.join("internal/pycore_frame.h").exists())
            .collect();
        found.sort();
        found.pop()
    }

    /// The tables against the headers of the CPython builds on this machine (pyenv's; Debian's
    /// when python3-dev is installed).
    #[test]
    fn offset_tables_match_the_headers() {
        let dir = std::env::temp_dir().join(format!("ws1-py-offsets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("offsets.c");
        std::fs::write(&src, OFFSETS_C).unwrap();
        let mut checked = 0;
        let debian = std::path::PathBuf::from("/usr/include/python3.11");
        let mut includes = vec![
            (pyenv_include(11), PY311, "pyenv 3.11"),
            (pyenv_include(12), PY312, "pyenv 3.12"),
        ];
        if debian.join("internal/pycore_frame.h").exists() {
            includes.push((Some(debian), PY311, "Debian 3.11"));
        }
        for (include, layout, what) in includes {
            let Some(include) = include else {
                if std::env::var_os("CI").is_some() {
                    panic!("no {what} headers under ~/.pyenv/versions to check the offsets with");
                }
                eprintln!("skipping {what} - no headers under ~/.pyenv/versions");
                continue;
            };
            let bin = dir.join(format!("offsets-{checked}"));
            let built = std::process::Command::new("cc")
                .arg(format!("-I{}", include.display()))
                .arg(format!("-I{}", include.join("internal").display()))
                .arg(&src)
                .arg("-o")
                .arg(&bin)
                .output()
                .expect("run cc");
            assert!(
                built.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&built.stderr)
            );
            let out = std::process::Command::new(&bin).output().unwrap();
            assert!(
                out.status.success(),
                "{what}: FRAME_OWNED_BY_CSTACK is not 3"
            );
            let measured: Vec<u64> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.parse().unwrap())
                .collect();
            assert_eq!(measured, table(&layout), "{what} ({})", include.display());
            checked += 1;
        }
        std::fs::remove_dir_all(&dir).unwrap();
        eprintln!("{checked} header sets checked");
    }

    #[test]
    fn a_process_without_python_is_not_a_target() {
        assert!(detect(std::process::id()).unwrap().is_none());
        assert!(inspect(std::process::id()).starts_with("no CPython interpreter"));
    }

    /// Debian's interpreter, when installed: a non-PIE executable with the symbols exported.
    #[test]
    fn interpreter_symbols_of_debians_python() {
        let path = Path::new("/usr/bin/python3.11");
        if !path.exists() {
            eprintln!("skipping - no /usr/bin/python3.11");
            return;
        }
        let syms = read_symbols(path).unwrap();
        assert_eq!(syms.base, 0x400000, "{syms:x?}");
        assert!(syms.runtime > syms.base && syms.version > syms.base && syms.code_type > syms.base);
    }

    #[test]
    fn interpreter_files() {
        assert!(is_interpreter_file("/usr/bin/python3.11"));
        assert!(is_interpreter_file("/x/lib/libpython3.12.so.1.0"));
        assert!(is_interpreter_file("/x/lib/libpython3.12.so"));
        assert!(!is_interpreter_file("/usr/bin/python3"));
        assert!(!is_interpreter_file("/x/libpython3.so"));
        assert!(!is_interpreter_file("/x/python3.11-config"));
        assert!(!is_interpreter_file(
            "/x/lib/python3.11/lib-dynload/_json.cpython-311.so"
        ));
    }

    #[test]
    fn libpython_wins_over_the_executable() {
        let maps = "\
55d0c8a00000-55d0c8a01000 r--p 00000000 08:01 100 /root/.pyenv/versions/3.12.1/bin/python3.12
55d0c8a01000-55d0c8a02000 r-xp 00001000 08:01 100 /root/.pyenv/versions/3.12.1/bin/python3.12
7f2cb0a00000-7f2cb0b00000 r--p 00000000 08:01 200 /root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0
7f2cb0b00000-7f2cb0c00000 r-xp 00100000 08:01 200 /root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
";
        assert_eq!(
            find_interpreter(maps),
            Some((
                "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0".to_owned(),
                0x7f2cb0a00000
            ))
        );
        let exe = "00400000-00420000 r--p 00000000 08:01 5 /usr/bin/python3.11\n";
        assert_eq!(
            find_interpreter(exe),
            Some(("/usr/bin/python3.11".to_owned(), 0x400000))
        );
        assert_eq!(
            find_interpreter("00400000-00420000 r--p 00000000 08:01 5 /bin/sh\n"),
            None
        );
        assert_eq!(find_interpreter("garbage\n\n-\n"), None);
    }

    #[test]
    fn chains_split_per_eval_call() {
        // 3.11: is_entry marks the outermost frame of each call.
        let w311 = [0x100, 0x200 | PY_FRAME_ENTRY, 0x300, 0x400 | PY_FRAME_ENTRY];
        assert_eq!(
            split_calls(&w311),
            (vec![vec![0x100, 0x200], vec![0x300, 0x400]], true)
        );
        // 3.12: a shim follows each call's frames.
        let w312 = [
            0x100,
            0x200,
            0x900 | PY_FRAME_SHIM,
            0x300,
            0x900 | PY_FRAME_SHIM,
        ];
        assert_eq!(
            split_calls(&w312),
            (vec![vec![0x100, 0x200], vec![0x300]], true)
        );
        assert_eq!(
            split_calls(&[0x100, PY_CHAIN_TRUNCATED]),
            (vec![vec![0x100]], false)
        );
        assert_eq!(split_calls(&[]), (vec![], true));
    }

    #[test]
    fn python_frames_replace_eval_frames() {
        let f = ProfFrame::named;
        let native = vec![
            f("_PyEval_EvalFrameDefault"),
            f("cfunction_call"),
            f("_PyEval_EvalFrameDefault"),
            f("PyEval_EvalCode"),
            f("main"),
        ];
        let calls = vec![
            vec![f("inner"), f("middle")],
            vec![f("outer"), f("<module>")],
        ];
        let (out, left) = interleave(native, calls);
        assert_eq!(
            names(&out),
            [
                "inner",
                "middle",
                "cfunction_call",
                "outer",
                "<module>",
                "PyEval_EvalCode",
                "main"
            ]
        );
        assert!(!left);
        // A native walk cut at a perf trampoline: the callers come from the thread state.
        let native = vec![
            f("work"),
            f("_PyEval_EvalFrameDefault"),
            f("py::inner:x.py"),
        ];
        let calls = vec![vec![f("inner")], vec![f("middle"), f("outer")]];
        let (out, left) = interleave(native, calls);
        assert_eq!(names(&out), ["work", "inner", "middle", "outer"]);
        assert!(left);
        // No eval frame at all: the Python frames go last.
        let (out, _) = interleave(vec![f("x")], vec![vec![f("a")]]);
        assert_eq!(names(&out), ["x", "a"]);
    }

    #[test]
    fn strings_decode_by_kind() {
        assert_eq!(decode_chars(b"outer", 1).as_deref(), Some("outer"));
        assert_eq!(decode_chars(&[0xe9], 1).as_deref(), Some("é"));
        assert_eq!(
            decode_chars(&[0x3b, 0x04, 0x61, 0x00], 2).as_deref(),
            Some("лa")
        );
        assert_eq!(decode_chars(&[0, 0, 0x11, 0], 4), None);
        assert_eq!(decode_chars(b"x", 3), None);
    }

    #[test]
    fn string_headers() {
        let c = &PY312.code;
        let mut h = [0u8; 56];
        h[16..24].copy_from_slice(&5i64.to_le_bytes());
        // kind 1, compact, ascii
        h[32..36].copy_from_slice(&((1u32 << 2) | (1 << 5) | (1 << 6)).to_le_bytes());
        assert_eq!(str_shape(&h, c), Some((40, 1, 5)));
        // Not compact: refused.
        h[32..36].copy_from_slice(&(1u32 << 2).to_le_bytes());
        assert_eq!(str_shape(&h, c), None);
        // Negative length: refused.
        h[32..36].copy_from_slice(&((1u32 << 2) | (1 << 5)).to_le_bytes());
        h[16..24].copy_from_slice(&(-1i64).to_le_bytes());
        assert_eq!(str_shape(&h, c), None);
        // Huge lengths are cut to the name limit.
        h[16..24].copy_from_slice(&5000i64.to_le_bytes());
        assert_eq!(str_shape(&h, c), Some((56, 1, MAX_NAME_CHARS)));
        assert_eq!(str_shape(&h[..8], c), None);
    }
}
