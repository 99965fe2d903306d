//! Files that observed processes control, read by a root agent.
//!
//! In host mode any unprivileged user's process is observed, and it controls what the agent reads
//! about it: its perf map (`/tmp/perf-PID.map`), its executables and their debug information, its
//! /proc entries. Such a file is opened the way perf opens perf maps (no symlink, a regular file
//! owned by the process's user or root, see [`open`]) and read within fixed bounds; whatever
//! fails those checks is refused, counted here (`ws1_probe_untrusted_input_refused_total{kind,
//! reason}`) and logged once per file, rate-limited, with what to do.
//!
//! The counters are process-wide statics, like the standard `process_*` metrics: refusals happen
//! deep in the profiler's symbolizer, which would otherwise need a handle threaded through every
//! layer just to count.

use std::{
    collections::{BTreeSet, VecDeque},
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// What was refused (the `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A JIT perf map, `/tmp/perf-PID.map` in the process's root.
    PerfMap,
    /// A binary (executable or library) a process mapped.
    Elf,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::PerfMap, Kind::Elf];

    pub fn label(self) -> &'static str {
        match self {
            Kind::PerfMap => "perf_map",
            Kind::Elf => "elf",
        }
    }
}

/// Why it was refused (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The path is a symbolic link (which another user may have planted).
    Symlink,
    /// Not a regular file (a FIFO would block the reader, a device never ends).
    NotRegularFile,
    /// Owned by neither the process's user nor root, or hard-linked from elsewhere.
    ForeignOwner,
    /// Larger than the agent reads of such a file.
    TooLarge,
    /// More lines than the agent reads of such a file.
    TooManyLines,
    /// What it would keep does not fit its cache budget.
    OverBudget,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Symlink,
        Reason::NotRegularFile,
        Reason::ForeignOwner,
        Reason::TooLarge,
        Reason::TooManyLines,
        Reason::OverBudget,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Symlink => "symlink",
            Reason::NotRegularFile => "not_regular_file",
            Reason::ForeignOwner => "foreign_owner",
            Reason::TooLarge => "too_large",
            Reason::TooManyLines => "too_many_lines",
            Reason::OverBudget => "over_budget",
        }
    }
}

const KINDS: usize = Kind::ALL.len();
const REASONS: usize = Reason::ALL.len();

static REFUSED: [[AtomicU64; REASONS]; KINDS] =
    [const { [const { AtomicU64::new(0) }; REASONS] }; KINDS];

/// At most this many refusal warnings per [`LOG_WINDOW`]; the rest are counted and summed up in
/// the next warning that is logged.
const LOG_BURST: u32 = 10;
const LOG_WINDOW: Duration = Duration::from_secs(60);
/// Files whose refusal was logged, remembered so each is logged once (the oldest are forgotten
/// first, so the set stays bounded).
const LOGGED_FILES: usize = 1024;

struct LogState {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    logged: BTreeSet<String>,
    order: VecDeque<String>,
}

static LOG: Mutex<LogState> = Mutex::new(LogState {
    window_start: None,
    in_window: 0,
    suppressed: 0,
    logged: BTreeSet::new(),
    order: VecDeque::new(),
});

/// A refusal: counted at once, logged once per `file` (rate-limited) as
/// "refused KIND FILE: DETAIL; ADVICE".
pub fn refuse(kind: Kind, reason: Reason, file: &str, detail: &str, advice: &str) {
    REFUSED[kind as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    let Ok(mut log) = LOG.lock() else {
        return;
    };
    let key = format!("{}:{}:{file}", kind.label(), reason.label());
    if log.logged.contains(&key) {
        return;
    }
    let now = Instant::now();
    if log
        .window_start
        .is_none_or(|t| now.duration_since(t) >= LOG_WINDOW)
    {
        log.window_start = Some(now);
        log.in_window = 0;
    }
    if log.in_window >= LOG_BURST {
        log.suppressed += 1;
        return;
    }
    log.in_window += 1;
    if log.order.len() >= LOGGED_FILES
        && let Some(old) = log.order.pop_front()
    {
        log.logged.remove(&old);
    }
    log.logged.insert(key.clone());
    log.order.push_back(key);
    let suppressed = std::mem::take(&mut log.suppressed);
    drop(log);
    let more = if suppressed > 0 {
        format!(
            " ({suppressed} earlier refusals were not logged; see ws1_probe_untrusted_input_refused_total)"
        )
    } else {
        String::new()
    };
    tracing::warn!(
        kind = kind.label(),
        reason = reason.label(),
        "refused {} {file}: {detail}; {advice}{more}",
        kind.label().replace('_', " ")
    );
}

/// Refusals so far, every (kind, reason) pair, zeros included (so the series exist from the
/// start and `increase()` sees the first refusal).
pub fn refused_counts() -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::with_capacity(KINDS * REASONS);
    for kind in Kind::ALL {
        for reason in Reason::ALL {
            let n = REFUSED[kind as usize][reason as usize].load(Ordering::Relaxed);
            out.push((kind.label(), reason.label(), n));
        }
    }
    out
}

/// Refusals of one (kind, reason) so far (tests).
pub fn refused(kind: Kind, reason: Reason) -> u64 {
    REFUSED[kind as usize][reason as usize].load(Ordering::Relaxed)
}

/// Why [`open`] refused a file, or could not open it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{source}")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("{detail}")]
    Refused { reason: Reason, detail: String },
}

/// Opens a file an observed process controls, as perf opens perf maps: the last component must
/// not be a symbolic link (`O_NOFOLLOW`), and the opened file must be a regular file owned by
/// root or by one of `uids` (the process's real, effective, saved and filesystem uids) with one
/// link (where `fs.protected_hardlinks` is off, a hard link can make a root-owned file appear
/// under the process's path).
/// `O_NONBLOCK` keeps a FIFO planted in its place from blocking the open; it is refused as not
/// regular right after.
///
/// Checks are made on the opened descriptor (`fstat`), so the file cannot be swapped between the
/// check and the read.
pub fn open(path: &Path, uids: &[u32]) -> Result<File, OpenError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => OpenError::Refused {
                reason: Reason::Symlink,
                detail: "it is a symbolic link".to_owned(),
            },
            _ => OpenError::Io { source },
        })?;
    let md = file.metadata().map_err(|source| OpenError::Io { source })?;
    check_metadata(&md, uids)?;
    Ok(file)
}

/// Opens a binary a process mapped, reached by a path the process controls (through its root):
/// `O_NONBLOCK`, so a FIFO put in its place cannot block the agent, and refused unless a regular
/// file. The error is an `io::Error` for callers that report open failures as such; a refusal
/// is counted and logged here.
pub fn open_binary(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        refuse(
            Kind::Elf,
            Reason::NotRegularFile,
            &path.display().to_string(),
            "it is not a regular file",
            "frames in it stay unnamed; nothing to do unless the process replaced a mapped binary on purpose",
        );
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// The checks of [`open`] on a descriptor's metadata.
pub fn check_metadata(md: &std::fs::Metadata, uids: &[u32]) -> Result<(), OpenError> {
    if !md.file_type().is_file() {
        return Err(OpenError::Refused {
            reason: Reason::NotRegularFile,
            detail: "it is not a regular file".to_owned(),
        });
    }
    let owner = md.uid();
    if owner != 0 && !uids.contains(&owner) {
        return Err(OpenError::Refused {
            reason: Reason::ForeignOwner,
            detail: format!(
                "it is owned by uid {owner}, not by the process's user {uids:?} or root"
            ),
        });
    }
    if md.nlink() > 1 {
        return Err(OpenError::Refused {
            reason: Reason::ForeignOwner,
            detail: format!("it has {} hard links", md.nlink()),
        });
    }
    Ok(())
}

/// The uids on the `Uid:` line of a `/proc/PID/status` text: real, effective, saved and
/// filesystem. Empty when the line is missing or malformed.
pub fn status_uids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|rest| {
            rest.split_ascii_whitespace()
                .map_while(|u| u.parse().ok())
                .take(4)
                .collect()
        })
        .unwrap_or_default()
}

/// Estimated bytes of a binary's symbol tables past which it is not parsed at all (Chromium's,
/// among the largest, are about 100 MiB). The file is the process's own (a library it wrote and
/// loaded can claim gigabytes of symbols, sparse on disk): parsers that copy what they read
/// (the `object` crate through a `ReadCache`) would hold all of it.
pub const MAX_ELF_SYMBOL_TABLE_BYTES: u64 = 512 << 20;

/// Bytes the symbol and string tables of a 64-bit ELF file claim, from its section headers
/// alone: through a `ReadCache`, only the headers are read. `None` when it is not a 64-bit ELF
/// file or its headers are damaged (the parsers that follow then fail on their own).
pub fn elf_symbol_table_bytes<'a, R: object::ReadRef<'a>>(data: R) -> Option<u64> {
    use object::read::elf::{FileHeader as _, SectionHeader as _};
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.section_headers(endian, data).ok()?;
    Some(
        sections
            .iter()
            .filter(|s| {
                matches!(
                    s.sh_type(endian),
                    object::elf::SHT_SYMTAB | object::elf::SHT_DYNSYM | object::elf::SHT_STRTAB
                )
            })
            .map(|s| s.sh_size(endian))
            .fold(0u64, u64::saturating_add),
    )
}

/// Shared by the property tests of every parser of such input: a fixed seed (the same cases on
/// every run: a failure is reproducible and never flaky) and no persistence files.
#[cfg(test)]
pub(crate) mod fuzz {
    use proptest::{
        prelude::*,
        test_runner::{Config, RngSeed},
    };

    pub fn config(cases: u32) -> Config {
        Config {
            cases,
            rng_seed: RngSeed::Fixed(0x0077_5331),
            failure_persistence: None,
            ..Config::default()
        }
    }

    /// A small real ELF executable to mutate (coreutils' `true`, on every Linux system).
    pub fn small_elf() -> Vec<u8> {
        std::fs::read("/usr/bin/true").expect("/usr/bin/true")
    }

    /// `base` truncated at a random length and with up to 24 random bytes overwritten, half of
    /// them in the ELF header and program headers (the first 512 bytes) or the section headers
    /// (the last 4 KiB), where a parser's trust in offsets and counts is tested.
    pub fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        let len = base.len();
        (
            prop_oneof![2 => Just(len), 1 => 0..=len],
            proptest::collection::vec(
                (any::<bool>(), any::<prop::sample::Index>(), any::<u8>()),
                0..24,
            ),
        )
            .prop_map(move |(keep, edits)| {
                let mut bytes = base[..keep].to_vec();
                for (headers, at, value) in edits {
                    if bytes.is_empty() {
                        break;
                    }
                    let i = if headers {
                        let at = at.index(512 + 4096);
                        if at < 512 {
                            at.min(bytes.len() - 1)
                        } else {
                            bytes
                                .len()
                                .saturating_sub(4096 + 512 - at)
                                .min(bytes.len() - 1)
                        }
                    } else {
                        at.index(bytes.len())
                    };
                    bytes[i] = value;
                }
                bytes
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::unix::fs::symlink;

    fn test_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ws1-untrusted-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn own_uid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn parses_status_uids() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t5\t5\t5\n";
        assert_eq!(status_uids(status), vec![1000, 1001, 1002, 1003]);
        assert_eq!(status_uids("Name:\tx\n"), Vec::<u32>::new());
        assert_eq!(status_uids("Uid:\tabc\n"), Vec::<u32>::new());
    }

    #[test]
    fn refuses_symlinks_fifos_and_directories() {
        let dir = test_dir("open");
        let target = dir.join("target");
        std::fs::write(&target, "1000 10 f\n").unwrap();
        let uids = [own_uid()];
        assert!(open(&target, &uids).is_ok());

        let link = dir.join("link");
        symlink(&target, &link).unwrap();
        assert!(matches!(
            open(&link, &uids),
            Err(OpenError::Refused {
                reason: Reason::Symlink,
                ..
            })
        ));

        // A FIFO with no writer would block a plain open forever.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open(&fifo, &uids),
            Err(OpenError::Refused {
                reason: Reason::NotRegularFile,
                ..
            })
        ));
        assert!(matches!(
            open(&dir, &uids),
            Err(OpenError::Refused {
                reason: Reason::NotRegularFile,
                ..
            })
        ));
        assert!(matches!(
            open(&dir.join("missing"), &uids),
            Err(OpenError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_files_of_other_users_and_hard_links() {
        let dir = test_dir("owner");
        let file = dir.join("map");
        std::fs::write(&file, "1000 10 f\n").unwrap();
        let me = own_uid();
        let md = std::fs::metadata(&file).unwrap();
        assert!(check_metadata(&md, &[me]).is_ok());
        // A file of another user: made by chown as root, or else this user's own file seen by
        // a process of another user.
        let (owner, stranger) = if me == 0 {
            let c = std::ffi::CString::new(file.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            (65534, 1234)
        } else {
            (me, me + 1)
        };
        let md = std::fs::metadata(&file).unwrap();
        assert!(check_metadata(&md, &[owner]).is_ok());
        assert!(matches!(
            check_metadata(&md, &[stranger, stranger + 1]),
            Err(OpenError::Refused {
                reason: Reason::ForeignOwner,
                ..
            })
        ));
        std::fs::hard_link(&file, dir.join("other")).unwrap();
        let md = std::fs::metadata(&file).unwrap();
        assert!(matches!(
            check_metadata(&md, &[owner]),
            Err(OpenError::Refused {
                reason: Reason::ForeignOwner,
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refusals_are_counted_per_kind_and_reason() {
        let before = refused(Kind::Elf, Reason::TooLarge);
        refuse(Kind::Elf, Reason::TooLarge, "/x", "it is big", "do nothing");
        refuse(Kind::Elf, Reason::TooLarge, "/x", "it is big", "do nothing");
        assert!(refused(Kind::Elf, Reason::TooLarge) >= before + 2);
        let counts = refused_counts();
        assert_eq!(counts.len(), KINDS * REASONS);
        assert!(
            counts
                .iter()
                .any(|(k, r, n)| *k == "elf" && *r == "too_large" && *n >= 2)
        );
    }
}
