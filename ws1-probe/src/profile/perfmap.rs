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
    io::{Read, Seek, SeekFrom},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

/// Failure to read a perf map file.
#[derive(Debug, thiserror::Error)]
pub enum PerfMapError {
    #[error("cannot read perf map {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A parsed perf map: regions keyed by start address and not overlapping, so a lookup is one
/// ordered-map search. Overlaps are resolved as lines are added, in favour of the later line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PerfMap {
    /// `start -> (end, name)`.
    regions: BTreeMap<u64, (u64, Arc<str>)>,
    skipped: usize,
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
            if line.trim().is_empty() {
                continue;
            }
            let Some((start, size, name)) = parse_line(line) else {
                self.skipped += 1;
                continue;
            };
            if size == 0 {
                // Well formed but covers nothing: no address can ever resolve to it.
                continue;
            }
            let Some(end) = start.checked_add(size) else {
                self.skipped += 1;
                continue;
            };
            insert_region(&mut self.regions, start, end, Arc::from(name));
        }
    }

    /// Reads and parses the whole perf map file at `path`. Names that are not UTF-8 are kept
    /// with replacement characters instead of dropping the line.
    pub fn read(path: &Path) -> Result<PerfMap, PerfMapError> {
        let bytes = fs::read(path).map_err(|source| PerfMapError::Read {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&bytes)))
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
        self.regions.values().map(|(_, name)| 64 + name.len()).sum()
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
    /// Size and mtime when last read, to skip reading an unchanged file.
    stamp: Option<(u64, Option<SystemTime>)>,
}

impl PerfMapReader {
    /// The map as read so far.
    pub fn map(&self) -> &PerfMap {
        &self.map
    }

    /// Brings the map up to date with the file at `path`: reads only what was appended when the
    /// file grew, and everything again when it was replaced, truncated or rewritten. Returns
    /// whether the file was read at all (it is not when unchanged).
    pub fn update(&mut self, path: &Path) -> Result<bool, PerfMapError> {
        let err = |source| PerfMapError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(err)?;
        let md = file.metadata().map_err(err)?;
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
        if !(grew && follows_a_line_end(&mut file, self.consumed).map_err(err)?) {
            *self = PerfMapReader::default();
        }
        file.seek(SeekFrom::Start(self.consumed)).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.map.extend(&String::from_utf8_lossy(&bytes[..whole]));
        self.consumed += whole as u64;
        self.file = Some(id);
        self.stamp = Some(stamp);
        Ok(true)
    }
}

/// Whether the byte before `offset` ends a line (true at offset 0): when it does not, the file
/// was rewritten under us and reading on from `offset` would start mid-line.
fn follows_a_line_end(file: &mut File, offset: u64) -> std::io::Result<bool> {
    if offset == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::Start(offset - 1))?;
    let mut last = [0u8];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
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

/// Adds `start..end` to non-overlapping `live` regions, trimming or splitting the ones it covers.
fn insert_region(live: &mut BTreeMap<u64, (u64, Arc<str>)>, start: u64, end: u64, name: Arc<str>) {
    // Regions are disjoint, so sorted by start they are sorted by end too: walking back from
    // the last region starting before `end`, the first one ending at or before `start` ends the
    // overlapping run.
    let overlapping: Vec<u64> = live
        .range(..end)
        .rev()
        .take_while(|(_, (r_end, _))| *r_end > start)
        .map(|(r_start, _)| *r_start)
        .collect();
    for r_start in overlapping {
        let Some((r_end, r_name)) = live.remove(&r_start) else {
            continue;
        };
        if r_start < start {
            live.insert(r_start, (start, Arc::clone(&r_name)));
        }
        if r_end > end {
            live.insert(end, (r_end, r_name));
        }
    }
    live.insert(start, (end, name));
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
    let ns_pid = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| innermost_ns_pid(&status))
        .unwrap_or(pid);
    PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"))
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
        assert!(reader.update(&path).unwrap());
        assert_eq!(reader.map().lookup(0x1000), Some("first"));
        // The line being written is not read yet, nor counted as malformed.
        assert_eq!(reader.map().lookup(0x2000), None);
        assert_eq!(reader.map().skipped(), 0);
        assert!(!reader.update(&path).unwrap(), "unchanged file read again");

        // The runtime finishes the line and appends more: only the new bytes are parsed.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"_line\n1000 10 recompiled\nbad line\n")
            .unwrap();
        drop(f);
        assert!(reader.update(&path).unwrap());
        assert_eq!(reader.map().lookup(0x2000), Some("torn_line"));
        assert_eq!(reader.map().lookup(0x1000), Some("recompiled"));
        assert_eq!(reader.map().skipped(), 1);
        assert_eq!(reader.map().len(), 2);

        // A new process with the same pid truncates and writes its own map.
        fs::write(&path, "3000 10 other\n").unwrap();
        assert!(reader.update(&path).unwrap());
        assert_eq!(reader.map().lookup(0x1000), None);
        assert_eq!(reader.map().lookup(0x3000), Some("other"));
        assert_eq!(reader.map().skipped(), 0);

        fs::remove_file(&path).unwrap();
        assert!(reader.update(&path).is_err());
    }

    #[test]
    fn read_reports_missing_file() {
        let err = PerfMap::read(Path::new("/nonexistent/perf-1.map")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read perf map /nonexistent/perf-1.map")
        );
    }
}
