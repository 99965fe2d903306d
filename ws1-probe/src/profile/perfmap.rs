//! Perf map files: the symbol tables that JIT runtimes (V8 with `--perf-basic-prof`, the JVM
//! with an agent, Python 3.12+ with `-X perf`) write for code they generate into anonymous
//! memory, where no ELF file can name it.
//!
//! The format is one `START SIZE name` line per code region, START and SIZE in hexadecimal with or
//! without `0x`, the name running to the end of the line (it may contain spaces). A runtime that
//! recompiles a function appends a new line for the new code, which may reuse the address range
//! of code it freed, so a later line wins over the earlier lines it overlaps.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use crate::untrusted::{self, OpenError, Reason};

/// Failure to read a perf map file.
#[derive(Debug, thiserror::Error)]
pub enum PerfMapError {
    #[error("cannot read perf map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not read at all (or no longer kept): the process controls it, and it failed
    /// the checks of [`untrusted::open`] or the bounds of [`PerfMapLimits`].
    #[error("refused perf map {path}: {detail}")]
    Refused {
        path: PathBuf,
        reason: Reason,
        detail: String,
    },
}

impl PerfMapError {
    /// What an operator can do about a refusal, for the log line.
    pub fn advice(reason: Reason) -> &'static str {
        match reason {
            Reason::Symlink | Reason::NotRegularFile | Reason::ForeignOwner => {
                "the agent reads, as perf does, only a regular file owned by the process's user or root; JIT frames of this process stay unnamed until the runtime writes its map itself (check who created the file)"
            }
            Reason::TooLarge | Reason::TooManyLines => {
                "JIT frames of this process stay unnamed; make the runtime write a smaller map (restart it to start a new one, or limit what it records)"
            }
            Reason::OverBudget => {
                "JIT frames of this process stay unnamed; raise --profile-cache-bytes (perf maps get an eighth of it) or make the runtime write a smaller map"
            }
        }
    }
}

/// How much of a perf map is read and kept. The file belongs to the observed process, which may
/// write anything into it: without bounds any user could make the agent read and hold gigabytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerfMapLimits {
    /// Bytes of the file read, from its start: a larger file is refused without reading it.
    pub read_bytes: u64,
    /// Lines read, from its start.
    pub lines: u64,
    /// A longer line is skipped as malformed (and never buffered beyond this).
    pub line_bytes: usize,
    /// Longer names are cut to this (at a character boundary).
    pub name_bytes: usize,
    /// Estimated bytes the parsed map may hold ([`PerfMap::bytes`]): the perf-map share of the
    /// profiler's cache budget.
    pub kept_bytes: usize,
}

impl PerfMapLimits {
    /// 64 MiB read, 2 M lines, 4 KiB lines, 1 KiB names, 64 MiB kept. A V8 with
    /// `--perf-basic-prof` writes a few MB an hour; tens of MB are a runtime up for weeks.
    pub const DEFAULT: PerfMapLimits = PerfMapLimits {
        read_bytes: 64 << 20,
        lines: 2 << 20,
        line_bytes: 4096,
        name_bytes: 1024,
        kept_bytes: 64 << 20,
    };

    /// The defaults, keeping at most `kept_bytes`.
    pub fn keeping(kept_bytes: usize) -> Self {
        Self {
            kept_bytes: kept_bytes.min(Self::DEFAULT.kept_bytes),
            ..Self::DEFAULT
        }
    }
}

impl Default for PerfMapLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A parsed perf map: regions keyed by start address and not overlapping, so a lookup is one
/// ordered-map search. Overlaps are resolved as lines are added, in favour of the later line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMap {
    /// `start -> (end, name)`.
    regions: BTreeMap<u64, (u64, Arc<str>)>,
    skipped: usize,
    /// [`Self::bytes`], kept as regions come and go.
    bytes: usize,
}

/// Estimated heap bytes of one region: its tree entry and its name.
fn region_bytes(name: &str) -> usize {
    64 + name.len()
}

impl PerfMap {
    /// Parses perf map text. Malformed lines are skipped (and counted, see [`Self::skipped`])
    /// rather than failing the whole map: one bad line does not make the others wrong.
    pub fn parse(text: &str) -> PerfMap {
        let mut map = PerfMap::default();
        map.extend(text);
        map
    }

    /// Adds the lines of `text` as if they followed the lines already parsed, which is how a
    /// runtime appends to its map: each new region cuts the part it covers out of the regions
    /// already there, so what remains is exactly "the last line covering an address wins".
    pub fn extend(&mut self, text: &str) {
        for line in text.lines() {
            self.add_line(line, PerfMapLimits::DEFAULT.name_bytes);
        }
    }

    /// Adds one line (without its line end), its name cut to `name_bytes`.
    pub fn add_line(&mut self, line: &str, name_bytes: usize) {
        if line.trim().is_empty() {
            return;
        }
        let Some((start, size, name)) = parse_line(line) else {
            self.skipped += 1;
            return;
        };
        if size == 0 {
            // Well formed but covers nothing: no address can ever resolve to it.
            return;
        }
        let Some(end) = start.checked_add(size) else {
            self.skipped += 1;
            return;
        };
        let mut cut = name.len().min(name_bytes);
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        self.insert_region(start, end, Arc::from(&name[..cut]));
    }

    /// Adds `start..end` to the non-overlapping regions, trimming or splitting the ones it covers.
    fn insert_region(&mut self, start: u64, end: u64, name: Arc<str>) {
        // Regions are disjoint, so sorted by start they are sorted by end too: walking back from
        // the last region starting before `end`, the first one ending at or before `start` ends
        // the overlapping run.
        let overlapping: Vec<u64> = self
            .regions
            .range(..end)
            .rev()
            .take_while(|(_, (r_end, _))| *r_end > start)
            .map(|(r_start, _)| *r_start)
            .collect();
        for r_start in overlapping {
            let Some((r_end, r_name)) = self.regions.remove(&r_start) else {
                continue;
            };
            self.bytes -= region_bytes(&r_name);
            if r_start < start {
                self.bytes += region_bytes(&r_name);
                self.regions.insert(r_start, (start, Arc::clone(&r_name)));
            }
            if r_end > end {
                self.bytes += region_bytes(&r_name);
                self.regions.insert(end, (r_end, r_name));
            }
        }
        self.bytes += region_bytes(&name);
        self.regions.insert(start, (end, name));
    }

    /// The name of the region that contains `addr` (start inclusive, end exclusive).
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let (_, (end, name)) = self.regions.range(..=addr).next_back()?;
        (addr < *end).then_some(&**name)
    }

    /// Number of distinct regions after overlaps were resolved (a region cut in two by a later
    /// line counts twice).
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether the map names no address.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Estimated heap bytes: per region a tree entry and its name.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of malformed lines that were skipped.
    pub fn skipped(&self) -> usize {
        self.skipped
    }
}

/// A perf map file followed while its process appends to it. JIT maps grow for as long as the
/// runtime compiles, to hundreds of megabytes for a long-lived V8 with `--perf-basic-prof`;
/// re-parsing all of it whenever a line is added would cost far more than reading just the
/// new lines.
#[derive(Clone, Debug, Default)]
pub struct PerfMapReader {
    map: PerfMap,
    /// Device and inode of the file read, to notice a replaced file.
    file: Option<(u64, u64)>,
    /// Bytes parsed so far: whole lines only, so a line still being written is read when it is
    /// complete rather than counted as malformed.
    consumed: u64,
    /// The last bytes parsed (at most [`TAIL_BYTES`], ending with a line end), to tell a file
    /// that grew by an append from one rewritten in place to a larger size.
    tail: Vec<u8>,
    /// Lines parsed so far.
    lines: u64,
    /// Size and mtime when last read, to skip reading an unchanged file.
    stamp: Option<(u64, Option<SystemTime>)>,
    /// The file refused, as the path itself (not followed) was then: it is not looked at
    /// again, nor refused (counted, logged) again, until the path names another file.
    refused: Option<Refused>,
}

/// What is kept of a refused file to know it again: device, inode and type of the path, and
/// its size then. A file that only grew since (a runtime appending) is the same file; one of
/// another type or smaller is another file (a deleted file's inode is soon reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Refused {
    dev: u64,
    ino: u64,
    mode: u32,
    size: u64,
}

impl Refused {
    fn of(md: &fs::Metadata) -> Self {
        Self {
            dev: md.dev(),
            ino: md.ino(),
            mode: md.mode() & libc::S_IFMT,
            size: md.len(),
        }
    }

    fn same_file(&self, now: &Refused) -> bool {
        (self.dev, self.ino, self.mode) == (now.dev, now.ino, now.mode) && now.size >= self.size
    }
}

impl PerfMapReader {
    /// The map as read so far.
    pub fn map(&self) -> &PerfMap {
        &self.map
    }

    /// Brings the map up to date with the file at `path`, which a process running as one of
    /// `uids` controls: reads only what was appended when the file grew, and everything again
    /// when it was replaced, truncated or rewritten. Returns whether the file was read at all
    /// (it is not when unchanged, or when it was refused before).
    ///
    /// The file is opened with [`untrusted::open`] and read within `limits`; what fails either is
    /// [`PerfMapError::Refused`] once, after which the reader holds an empty map and leaves the
    /// file alone until the path names another file.
    pub fn update(
        &mut self,
        path: &Path,
        uids: &[u32],
        limits: &PerfMapLimits,
    ) -> Result<bool, PerfMapError> {
        let err = |source| PerfMapError::Read {
            path: path.to_owned(),
            source,
        };
        let link = fs::symlink_metadata(path).map_err(err)?;
        let link_id = Refused::of(&link);
        if self.refused.is_some_and(|r| r.same_file(&link_id)) {
            return Ok(false);
        }
        let refuse = |this: &mut Self, reason: Reason, detail: String| {
            *this = PerfMapReader {
                refused: Some(link_id),
                ..PerfMapReader::default()
            };
            Err(PerfMapError::Refused {
                path: path.to_owned(),
                reason,
                detail,
            })
        };
        let mut file = match untrusted::open(path, uids) {
            Ok(file) => file,
            Err(OpenError::Io { source }) => return Err(err(source)),
            Err(OpenError::Refused { reason, detail }) => return refuse(self, reason, detail),
        };
        let md = file.metadata().map_err(err)?;
        if md.len() > limits.read_bytes {
            return refuse(
                self,
                Reason::TooLarge,
                format!(
                    "it holds {} bytes, more than the {} read of a perf map",
                    md.len(),
                    limits.read_bytes
                ),
            );
        }
        let stamp = (md.len(), md.modified().ok());
        let id = (md.dev(), md.ino());
        if self.file == Some(id) && self.stamp == Some(stamp) {
            return Ok(false);
        }
        // Appending only ever makes the file longer; anything else (same size but touched,
        // shorter, another file) is a rewrite, read from the start.
        let grew = self.file == Some(id)
            && self.stamp.is_some_and(|(size, _)| md.len() > size)
            && md.len() >= self.consumed;
        if !(grew && same_tail(&mut file, self.consumed, &self.tail).map_err(err)?) {
            *self = PerfMapReader::default();
        }
        file.seek(SeekFrom::Start(self.consumed)).map_err(err)?;
        // Never past the read limit, even if the file grew since the check above.
        let left = limits.read_bytes.saturating_sub(self.consumed);
        let mut reader = BufReader::with_capacity(64 * 1024, file.take(left));
        let mut line = Vec::with_capacity(256);
        let mut overlong = false;
        // Bytes of the line being read, over one or more buffer fills.
        let mut pending = 0u64;
        loop {
            let buf = reader.fill_buf().map_err(err)?;
            if buf.is_empty() {
                break;
            }
            let (chunk, ends_line) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            let n = chunk.len();
            let body = if ends_line { &chunk[..n - 1] } else { chunk };
            if !overlong {
                if line.len() + body.len() > limits.line_bytes {
                    overlong = true;
                    line.clear();
                } else {
                    line.extend_from_slice(body);
                }
            }
            reader.consume(n);
            pending += n as u64;
            if !ends_line {
                continue;
            }
            // A whole line: it counts as read whatever becomes of it.
            self.consumed += std::mem::take(&mut pending);
            self.lines += 1;
            if overlong {
                self.map.skipped += 1;
            } else {
                self.map
                    .add_line(&String::from_utf8_lossy(&line), limits.name_bytes);
            }
            line.clear();
            overlong = false;
            if self.lines > limits.lines {
                return refuse(
                    self,
                    Reason::TooManyLines,
                    format!("it has more than {} lines", limits.lines),
                );
            }
            if self.map.bytes() > limits.kept_bytes {
                return refuse(
                    self,
                    Reason::OverBudget,
                    format!(
                        "its symbols take more than the {} bytes perf maps may keep",
                        limits.kept_bytes
                    ),
                );
            }
        }
        let mut file = reader.into_inner().into_inner();
        self.tail = read_tail(&mut file, self.consumed).map_err(err)?;
        self.file = Some(id);
        self.stamp = Some(stamp);
        Ok(true)
    }
}

/// Bytes kept of the end of what was parsed, see [`PerfMapReader::tail`].
const TAIL_BYTES: u64 = 128;

/// The up to [`TAIL_BYTES`] bytes before `offset`.
fn read_tail(file: &mut File, offset: u64) -> std::io::Result<Vec<u8>> {
    let n = offset.min(TAIL_BYTES);
    let mut tail = vec![0u8; n as usize];
    file.seek(SeekFrom::Start(offset - n))?;
    file.read_exact(&mut tail)?;
    Ok(tail)
}

/// Whether the bytes before `offset` are still `tail`, the end of what was parsed (true at
/// offset 0). A file that grew is usually a runtime appending; but a map rewritten in place
/// (`jcmd PID Compiler.perfmap` truncates and writes the whole map again) can grow too, and
/// reading on from `offset` would then keep stale lines and start mid-line or at a line that
/// only happens to be there. `tail` ends with a line end, so this also checks that `offset`
/// still starts a line. A rewrite that leaves the last [`TAIL_BYTES`] bytes read unchanged at
/// the same offset is taken for an append (lines of a rewritten map that shift by even one byte
/// are noticed).
fn same_tail(file: &mut File, offset: u64, tail: &[u8]) -> std::io::Result<bool> {
    if offset == 0 {
        return Ok(true);
    }
    if tail.len() as u64 != offset.min(TAIL_BYTES) {
        return Ok(false);
    }
    Ok(read_tail(file, offset)? == tail)
}

/// Splits one line into START, SIZE and name; `None` when it is malformed.
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let line = line.trim_end();
    let (start, rest) = line.split_once(|c: char| c.is_ascii_whitespace())?;
    let rest = rest.trim_start();
    let (size, name) = rest.split_once(|c: char| c.is_ascii_whitespace())?;
    // Exactly the separator is removed: leading spaces that remain are part of the name, as the
    // runtime wrote it.
    if name.trim().is_empty() {
        return None;
    }
    Some((parse_hex(start)?, parse_hex(size)?, name))
}

/// A hexadecimal number with or without a `0x` prefix.
fn parse_hex(s: &str) -> Option<u64> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    // from_str_radix accepts a leading `+`, which no perf map writer emits.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// The innermost process id on the `NSpid:` line of a `/proc/PID/status` text: the id the
/// process sees itself as, in its own pid namespace. A runtime in a container names its perf
/// map after that id. `None` when the line is missing (kernels before 4.1) or malformed.
pub fn innermost_ns_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_ascii_whitespace().last()?.parse().ok()
}

/// Where the process `pid` writes its perf map, reached from this (host) mount namespace:
/// `/tmp/perf-NSPID.map` inside the process's own root, so a containerised runtime's map, which
/// lives in the container's `/tmp` and carries its namespace pid, is found too. Falls back to
/// `pid` when the status cannot be read or has no `NSpid:` line.
pub fn path_for(pid: u32) -> PathBuf {
    locate(pid).0
}

/// [`path_for`], and the uids the process runs as (from the same `/proc/PID/status` read), which
/// the file must be owned by, or root.
pub fn locate(pid: u32) -> (PathBuf, Vec<u32>) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let ns_pid = innermost_ns_pid(&status).unwrap_or(pid);
    (
        PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map")),
        untrusted::status_uids(&status),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_with_and_without_prefix() {
        let map =
            PerfMap::parse("0x1000 0x10 with_prefix\n2000 20 without_prefix\n0X3000 8 upper\n");
        assert_eq!(map.len(), 3);
        assert_eq!(map.skipped(), 0);
        assert_eq!(map.lookup(0x1000), Some("with_prefix"));
        assert_eq!(map.lookup(0x200f), Some("without_prefix"));
        assert_eq!(map.lookup(0x3007), Some("upper"));
    }

    #[test]
    fn names_keep_their_spaces() {
        let map = PerfMap::parse(
            "7f0000001000 40 LazyCompile:*render /srv/app/index.js:12:3\n\
             7f0000002000 40 py::handle_request:/srv/app/main.py\n\
             7f0000003000 10 Interpreter  two  spaces \r\n",
        );
        assert_eq!(
            map.lookup(0x7f0000001010),
            Some("LazyCompile:*render /srv/app/index.js:12:3")
        );
        assert_eq!(
            map.lookup(0x7f0000002000),
            Some("py::handle_request:/srv/app/main.py")
        );
        // Inner spaces stay; trailing white space and the carriage return do not.
        assert_eq!(map.lookup(0x7f0000003000), Some("Interpreter  two  spaces"));
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let map = PerfMap::parse(
            "1000 10 good\n\
             zzzz 10 bad_start\n\
             2000 xyz bad_size\n\
             3000 10\n\
             4000\n\
             \n\
             0x 10 empty_hex\n\
             +5000 10 plus_sign\n\
             ffffffffffffffff 2 overflows\n\
             6000 10 also good\n\
             7000 1",
        );
        assert_eq!(map.skipped(), 8);
        assert_eq!(map.len(), 2);
        assert_eq!(map.lookup(0x1000), Some("good"));
        assert_eq!(map.lookup(0x6000), Some("also good"));
        assert_eq!(map.lookup(0x2000), None);
        assert_eq!(map.lookup(0x3000), None);
    }

    #[test]
    fn start_is_inclusive_end_is_exclusive() {
        let map = PerfMap::parse("1000 100 a\n1100 100 b\n");
        assert_eq!(map.lookup(0xfff), None);
        assert_eq!(map.lookup(0x1000), Some("a"));
        assert_eq!(map.lookup(0x10ff), Some("a"));
        assert_eq!(map.lookup(0x1100), Some("b"));
        assert_eq!(map.lookup(0x11ff), Some("b"));
        assert_eq!(map.lookup(0x1200), None);
        assert_eq!(map.lookup(0), None);
        assert_eq!(map.lookup(u64::MAX), None);
        assert!(PerfMap::parse("").is_empty());
        assert_eq!(PerfMap::parse("").lookup(0x1000), None);
    }

    #[test]
    fn later_lines_win_over_overlapping_earlier_ones() {
        // `old` covers 0x1000..0x1400; `new` is re-emitted into its middle, `tail` over its end
        // and past it, and `whole` finally replaces everything from 0x3000 on.
        let map = PerfMap::parse(
            "1000 400 old\n\
             1100 100 new\n\
             1300 200 tail\n\
             3000 100 first\n\
             3100 100 second\n\
             2f00 400 whole\n",
        );
        assert_eq!(map.lookup(0x1000), Some("old"));
        assert_eq!(map.lookup(0x10ff), Some("old"));
        assert_eq!(map.lookup(0x1100), Some("new"));
        assert_eq!(map.lookup(0x11ff), Some("new"));
        assert_eq!(map.lookup(0x1200), Some("old"));
        assert_eq!(map.lookup(0x12ff), Some("old"));
        assert_eq!(map.lookup(0x1300), Some("tail"));
        assert_eq!(map.lookup(0x14ff), Some("tail"));
        assert_eq!(map.lookup(0x1500), None);
        assert_eq!(map.lookup(0x2f00), Some("whole"));
        assert_eq!(map.lookup(0x3150), Some("whole"));
        assert_eq!(map.lookup(0x32ff), Some("whole"));
        assert_eq!(map.lookup(0x3300), None);
        // old (split in two), new, tail, whole.
        assert_eq!(map.len(), 5);
    }

    #[test]
    fn identical_re_emit_replaces_the_name() {
        let map = PerfMap::parse("1000 10 v1\n1000 10 v2\n");
        assert_eq!(map.len(), 1);
        assert_eq!(map.lookup(0x1000), Some("v2"));
    }

    #[test]
    fn ns_pid_is_the_innermost() {
        let host =
            "Name:\tpython3\nTgid:\t4242\nNgid:\t0\nPid:\t4242\nNSpid:\t4242\nNSpgid:\t4242\n";
        assert_eq!(innermost_ns_pid(host), Some(4242));
        let nested = "Pid:\t4242\nNSpid:\t4242\t310\t7\nNSpgid:\t4242\t310\t7\n";
        assert_eq!(innermost_ns_pid(nested), Some(7));
        assert_eq!(innermost_ns_pid("Pid:\t4242\n"), None);
        assert_eq!(innermost_ns_pid("NSpid:\t\n"), None);
        assert_eq!(innermost_ns_pid("NSpid:\tabc\n"), None);
    }

    #[test]
    fn path_for_own_process_is_in_own_root() {
        // This process runs in the pid namespace it is looked at from, so its namespace pid is
        // its pid.
        let pid = std::process::id();
        assert_eq!(
            path_for(pid),
            PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{pid}.map"))
        );
        // A pid that does not exist falls back to itself.
        assert_eq!(
            path_for(u32::MAX),
            PathBuf::from(format!("/proc/{}/root/tmp/perf-{}.map", u32::MAX, u32::MAX))
        );
    }

    #[test]
    fn reader_follows_appends_and_rewrites() {
        use std::io::Write as _;

        let path = std::env::temp_dir().join(format!("perf-reader-{}.map", std::process::id()));
        fs::write(&path, "1000 10 first\n2000 10 torn").unwrap();
        let mut reader = PerfMapReader::default();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x1000), Some("first"));
        // The line being written is not read yet, nor counted as malformed.
        assert_eq!(reader.map().lookup(0x2000), None);
        assert_eq!(reader.map().skipped(), 0);
        assert!(
            !reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap(),
            "unchanged file read again"
        );

        // The runtime finishes the line and appends more: only the new bytes are parsed.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"_line\n1000 10 recompiled\nbad line\n")
            .unwrap();
        drop(f);
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x2000), Some("torn_line"));
        assert_eq!(reader.map().lookup(0x1000), Some("recompiled"));
        assert_eq!(reader.map().skipped(), 1);
        assert_eq!(reader.map().len(), 2);

        // A new process with the same pid truncates and writes its own map.
        fs::write(&path, "3000 10 other\n").unwrap();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x1000), None);
        assert_eq!(reader.map().lookup(0x3000), Some("other"));
        assert_eq!(reader.map().skipped(), 0);

        fs::remove_file(&path).unwrap();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .is_err()
        );
    }

    #[test]
    fn a_map_rewritten_larger_in_place_is_read_again() {
        let path = temp_map("rewrite", b"1000 10 aaaa\n");
        let mut reader = PerfMapReader::default();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x1000), Some("aaaa"));
        // Truncated and written again (same file, larger), with a line end exactly where the
        // old content ended: an append would read on from there and keep `aaaa`.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"2000 10 bbbb\n1000 10 cccc\n").unwrap();
        drop(f);
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x2000), Some("bbbb"));
        assert_eq!(reader.map().lookup(0x1000), Some("cccc"));
        assert_eq!(reader.map().len(), 2);
        // A true append after that is still read as one.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"3000 10 dddd\n").unwrap();
        drop(f);
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        assert_eq!(reader.map().lookup(0x3000), Some("dddd"));
        assert_eq!(reader.map().lookup(0x1000), Some("cccc"));
        assert_eq!(reader.map().len(), 3);
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn update_reports_missing_file() {
        let err = PerfMapReader::default()
            .update(
                Path::new("/nonexistent/perf-1.map"),
                &uids(),
                &PerfMapLimits::DEFAULT,
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read perf map /nonexistent/perf-1.map")
        );
    }

    fn uids() -> Vec<u32> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        vec![unsafe { libc::geteuid() }]
    }

    fn temp_map(name: &str, text: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("perf-{name}-{}.map", std::process::id()));
        fs::write(&path, text).unwrap();
        path
    }

    fn refusal(r: Result<bool, PerfMapError>) -> Reason {
        match r {
            Err(PerfMapError::Refused { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_file_over_the_read_limit_is_refused_once_and_left_alone() {
        let path = temp_map("large", b"1000 10 a\n2000 10 b\n");
        let limits = PerfMapLimits {
            read_bytes: 15,
            ..PerfMapLimits::DEFAULT
        };
        let mut reader = PerfMapReader::default();
        assert_eq!(
            refusal(reader.update(&path, &uids(), &limits)),
            Reason::TooLarge
        );
        assert!(reader.map().is_empty());
        // The same file is not read (nor refused) again, even when it grows.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        std::io::Write::write_all(&mut f, b"3000 10 c\n").unwrap();
        assert!(!reader.update(&path, &uids(), &limits).unwrap());
        // Another file at the path is.
        fs::remove_file(&path).unwrap();
        fs::write(&path, "4000 8 d\n").unwrap();
        assert!(reader.update(&path, &uids(), &limits).unwrap());
        assert_eq!(reader.map().lookup(0x4000), Some("d"));
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn lines_and_kept_bytes_are_bounded() {
        let text: String = (0..100)
            .map(|i| format!("{:x} 10 f{i}\n", 0x1000 + i * 0x10))
            .collect();
        let path = temp_map("lines", text.as_bytes());
        let mut reader = PerfMapReader::default();
        let limits = PerfMapLimits {
            lines: 50,
            ..PerfMapLimits::DEFAULT
        };
        assert_eq!(
            refusal(reader.update(&path, &uids(), &limits)),
            Reason::TooManyLines
        );
        assert!(reader.map().is_empty());

        let mut reader = PerfMapReader::default();
        let limits = PerfMapLimits::keeping(10 * 70);
        assert_eq!(
            refusal(reader.update(&path, &uids(), &limits)),
            Reason::OverBudget
        );
        assert!(reader.map().is_empty());

        // Within both, all of it.
        let mut reader = PerfMapReader::default();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::keeping(100 * 70))
                .unwrap()
        );
        assert_eq!(reader.map().len(), 100);
        assert_eq!(reader.map().lookup(0x1000 + 99 * 0x10), Some("f99"));
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn long_lines_are_skipped_and_long_names_cut() {
        let mut text = format!("1000 10 {}\n", "x".repeat(10_000)).into_bytes();
        text.extend_from_slice(format!("2000 10 {}é\n", "y".repeat(1023)).as_bytes());
        text.extend_from_slice(b"3000 10 short\n");
        let path = temp_map("long", &text);
        let mut reader = PerfMapReader::default();
        assert!(
            reader
                .update(&path, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        let map = reader.map();
        assert_eq!(map.lookup(0x1000), None);
        assert_eq!(map.skipped(), 1);
        // 1023 ASCII bytes and a two-byte character do not fit 1024 bytes: the character goes.
        assert_eq!(map.lookup(0x2000), Some("y".repeat(1023).as_str()));
        assert_eq!(map.lookup(0x3000), Some("short"));
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn symlinks_are_refused() {
        let target = temp_map("target", b"1000 10 secret\n");
        let link = std::env::temp_dir().join(format!("perf-link-{}.map", std::process::id()));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let mut reader = PerfMapReader::default();
        assert_eq!(
            refusal(reader.update(&link, &uids(), &PerfMapLimits::DEFAULT)),
            Reason::Symlink
        );
        assert_eq!(reader.map().lookup(0x1000), None);
        assert!(
            !reader
                .update(&link, &uids(), &PerfMapLimits::DEFAULT)
                .unwrap()
        );
        fs::remove_file(&link).unwrap();
        fs::remove_file(&target).unwrap();
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// Lines that are mostly well formed, with overlapping ranges in a small space, and
        /// some garbage.
        fn line() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => (0u64..0x400, 0u64..0x80, 0u8..26).prop_map(|(start, size, c)| {
                    format!("{start:x} {size:x} f{}", char::from(b'a' + c))
                }),
                1 => proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Any bytes: no panic, and the byte estimate matches the regions.
            #[test]
            fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
                let map = PerfMap::parse(&String::from_utf8_lossy(&bytes));
                let sum: usize = map.regions.values().map(|(_, n)| region_bytes(n)).sum();
                prop_assert_eq!(map.bytes(), sum);
                for (start, (end, _)) in &map.regions {
                    prop_assert!(start < end);
                }
            }

            /// Every address resolves to the last line that covers it, as a brute-force model
            /// over the same lines says, and regions never overlap.
            #[test]
            fn last_line_wins(lines in proptest::collection::vec(line(), 0..40)) {
                let map = PerfMap::parse(&lines.join("\n"));
                let parsed: Vec<(u64, u64, String)> = lines
                    .iter()
                    .filter_map(|l| parse_line(l).map(|(s, z, n)| (s, z, n.to_owned())))
                    .collect();
                for addr in 0..0x480u64 {
                    let want = parsed
                        .iter()
                        .rev()
                        .find(|(s, z, _)| *s <= addr && addr < s + z)
                        .map(|(_, _, n)| n.as_str());
                    prop_assert_eq!(map.lookup(addr), want, "addr {:x}", addr);
                }
                let mut last_end = 0;
                for (start, (end, _)) in &map.regions {
                    prop_assert!(*start >= last_end);
                    last_end = *end;
                }
            }

            /// The file reader, fed the same text in appended pieces, ends with the map parsing
            /// the whole text gives, within any limits it was not refused by.
            #[test]
            fn reader_matches_parse(
                lines in proptest::collection::vec(line(), 0..30),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
                kept in 0usize..3000,
            ) {
                let text = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
                let path = std::env::temp_dir().join(format!(
                    "perf-prop-{}-{:?}.map",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let limits = PerfMapLimits::keeping(kept);
                let mut reader = PerfMapReader::default();
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
                points.push(text.len());
                points.sort_unstable();
                let _ = fs::remove_file(&path);
                fs::write(&path, "").unwrap();
                let mut refused = false;
                let mut written = 0;
                for p in points {
                    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
                    std::io::Write::write_all(&mut f, &text.as_bytes()[written..p]).unwrap();
                    drop(f);
                    written = p;
                    // Appends within one second keep the mtime; the size tells them apart.
                    match reader.update(&path, &uids(), &limits) {
                        Ok(_) => {}
                        Err(PerfMapError::Refused { reason, .. }) => {
                            prop_assert_eq!(reason, Reason::OverBudget);
                            refused = true;
                            break;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                fs::remove_file(&path).unwrap();
                let whole = PerfMap::parse(&text);
                if refused {
                    prop_assert!(reader.map().is_empty());
                } else {
                    prop_assert!(reader.map().bytes() <= kept);
                    prop_assert_eq!(&reader.map().regions, &whole.regions);
                    prop_assert_eq!(reader.map().skipped(), whole.skipped());
                }
            }
        }
    }
}
