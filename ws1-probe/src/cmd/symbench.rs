//! `ws1-probe bench-symbolize` (hidden): what symbolizing a large binary costs, for
//! `cargo xtask bench profile`. The binary is this one: a release build of the agent is the
//! largest binary the profiler is likely to meet in a service, and symbolizing its own process
//! needs no second program to keep alive.
//!
//! Function start addresses come from the symbol table (read with `object`, not blazesym, so
//! the figures do not depend on the code being measured), spread evenly over it so the lookups
//! touch many compilation units rather than the few around one address. Three calls are timed:
//! cold (a new [`ProfileSymbolizer`], so the binary is opened and parsed), warm (the same
//! addresses again, answered from the cache), and new addresses in the already parsed binary
//! (the per-lookup cost once the parse is paid).

use std::{fs, io::Write as _, os::unix::fs::MetadataExt as _, path::Path, time::Instant};

use anyhow::{Context as _, bail, ensure};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ObjectSymbol as _};
use ws1_probe::profile::{ProfFrame, symbols::ProfileSymbolizer};

/// Symbolize N function addresses of this binary, cold and warm, and print the times as JSON
#[derive(clap::Args, Debug)]
pub struct SymbenchArgs {
    /// How many distinct function start addresses to symbolize per call
    #[arg(long, default_value_t = 1000)]
    pub addresses: usize,
}

/// A function of the executable: its symbol name and run-time address.
struct Function {
    name: String,
    addr: u64,
}

/// What the executable file holds, read before anything is measured.
struct Exe {
    size: u64,
    /// Bytes of `.debug_*` sections (as stored, so compressed when they are).
    debug_bytes: u64,
    /// Distinct function start addresses, sorted.
    functions: Vec<Function>,
}

pub fn run(args: SymbenchArgs) -> anyhow::Result<()> {
    ensure!(
        args.addresses > 0,
        "--addresses 0: ask for at least one address (the default is 1000)"
    );
    let exe_path = std::env::current_exe().context("cannot find this executable's path")?;
    let exe = read_exe(&exe_path)?;
    let (a, b) = pick(&exe.functions, args.addresses);
    ensure!(
        !a.is_empty() && !b.is_empty(),
        "{}: only {} function symbols, too few to benchmark (is the binary stripped?)",
        exe_path.display(),
        exe.functions.len()
    );
    let addrs = |set: &[&Function]| set.iter().map(|f| f.addr).collect::<Vec<u64>>();
    let (addrs_a, addrs_b) = (addrs(&a), addrs(&b));

    let pid = std::process::id();
    // The file's bytes are freed by now (a large buffer goes back to the system at once), so
    // the growth below is the symbolizer's.
    let before = Rss::read()?;
    let mut sym = ProfileSymbolizer::new();
    let t = Instant::now();
    let cold = sym.user(pid, &addrs_a);
    let cold_ms = ms(t);
    let unnamed_cold = sym.stats().unnamed_frames;
    let after_cold = Rss::read()?;
    let t = Instant::now();
    let warm = sym.user(pid, &addrs_a);
    let warm_ms = ms(t);
    let t = Instant::now();
    let fresh = sym.user(pid, &addrs_b);
    let fresh_ms = ms(t);
    let after = Rss::read()?;
    ensure!(
        cold == warm,
        "the cached answers differ from the first ones: the symbolizer's cache is broken"
    );

    let agreeing = |set: &[&Function], answers: &[Vec<ProfFrame>]| {
        set.iter()
            .zip(answers)
            .filter(|(f, frames)| agrees(&f.name, frames))
            .count()
    };
    // A few disagreements, so a reader can tell aliases from wrong answers.
    let disagreeing: Vec<(String, String)> = a
        .iter()
        .zip(&cold)
        .filter(|(f, frames)| !agrees(&f.name, frames))
        .take(3)
        .map(|(f, frames)| {
            let named = frames.last().map_or("", |fr| fr.function.as_str());
            (f.name.clone(), named.to_owned())
        })
        .collect();
    let report = serde_json::json!({
        "binary": exe_path.display().to_string(),
        "binary_bytes": exe.size,
        "debug_section_bytes": exe.debug_bytes,
        "functions_in_symtab": exe.functions.len(),
        "addresses": addrs_a.len(),
        "named": (addrs_a.len() as u64).saturating_sub(unnamed_cold),
        "agreeing_with_symtab": agreeing(&a, &cold),
        "disagreeing_examples": disagreeing,
        "cold_ms": cold_ms,
        "warm_ms": warm_ms,
        "new_addresses": addrs_b.len(),
        "new_addresses_ms": fresh_ms,
        "unnamed_new": sym.stats().unnamed_frames - unnamed_cold,
        "agreeing_new": agreeing(&b, &fresh),
        "rss_before_kib": before.total,
        "rss_growth_cold_kib": after_cold.total.saturating_sub(before.total),
        "rss_growth_kib": after.total.saturating_sub(before.total),
        "anon_growth_kib": after.anon.saturating_sub(before.anon),
        "file_growth_kib": after.file.saturating_sub(before.file),
        "cache_entries": sym.cache_len(),
    });
    let mut out = std::io::stdout().lock();
    writeln!(out, "{report}")
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// Reads the symbol table and section sizes of `path`, this process's executable, and turns
/// function addresses into run-time ones through the process's own mappings.
fn read_exe(path: &Path) -> anyhow::Result<Exe> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("cannot parse {} as an object file", path.display()))?;
    let debug_bytes = file
        .sections()
        .filter(|s| s.name().is_ok_and(|n| n.starts_with(".debug_")))
        .map(|s| s.file_range().map_or(0, |(_, size)| size))
        .sum();
    // (p_vaddr, p_offset, p_filesz) of each loadable segment.
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .filter_map(|s| {
            let (offset, size) = s.file_range();
            Some((s.address(), offset, size)).filter(|_| size > 0)
        })
        .collect();
    let maps = own_mappings(path)?;
    let mut functions = Vec::new();
    for s in file.symbols() {
        if s.kind() != object::SymbolKind::Text || s.size() == 0 || !s.is_definition() {
            continue;
        }
        let (Ok(name), vaddr) = (s.name(), s.address()) else {
            continue;
        };
        let Some(offset) = segments
            .iter()
            .find(|(start, _, size)| (*start..start + size).contains(&vaddr))
            .map(|(start, offset, _)| vaddr - start + offset)
        else {
            continue;
        };
        let Some(addr) = maps
            .iter()
            .find(|m| (m.offset..m.offset + (m.end - m.start)).contains(&offset))
            .map(|m| m.start + (offset - m.offset))
        else {
            continue;
        };
        functions.push(Function {
            name: name.to_owned(),
            addr,
        });
    }
    functions.sort_by_key(|f| f.addr);
    functions.dedup_by_key(|f| f.addr);
    Ok(Exe {
        size: data.len() as u64,
        debug_bytes,
        functions,
    })
}

/// A file mapping of this process: `start..end` maps file bytes from `offset`.
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
}

/// The mappings of `exe` in /proc/self/maps, recognised by inode (the path there may carry
/// " (deleted)" when the file was rebuilt since).
fn own_mappings(exe: &Path) -> anyhow::Result<Vec<Mapping>> {
    let ino = fs::metadata("/proc/self/exe")
        .with_context(|| format!("cannot stat {}", exe.display()))?
        .ino();
    let maps = fs::read_to_string("/proc/self/maps").context("cannot read /proc/self/maps")?;
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let mut found = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [range, _, offset, _, inode, ..] = fields[..] else {
            continue;
        };
        if inode.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        let (Some((start, end)), Some(offset)) = (range.split_once('-'), hex(offset)) else {
            continue;
        };
        if let (Some(start), Some(end)) = (hex(start), hex(end)) {
            found.push(Mapping { start, end, offset });
        }
    }
    if found.is_empty() {
        bail!(
            "no mapping of {} (inode {ino}) in /proc/self/maps",
            exe.display()
        );
    }
    Ok(found)
}

/// 2n functions spread evenly over the address-sorted list, dealt alternately into two sets of
/// n (or all of them, halved, when there are fewer).
fn pick(functions: &[Function], n: usize) -> (Vec<&Function>, Vec<&Function>) {
    let want = (2 * n).min(functions.len());
    let chosen = (0..want).map(|i| &functions[i * functions.len() / want]);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for (i, f) in chosen.enumerate() {
        let set = if i % 2 == 0 { &mut a } else { &mut b };
        set.push(f);
    }
    (a, b)
}

/// Whether the outermost frame names the function the symbol table has at that address: its
/// last identifier appears in the (possibly mangled) symbol name. Loose on purpose, with no
/// demangler of its own; aliases folded onto one address can still disagree.
fn agrees(symbol: &str, frames: &[ProfFrame]) -> bool {
    let Some(frame) = frames.last() else {
        return false;
    };
    let last = frame
        .function
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .rfind(|w| !w.is_empty());
    last.is_some_and(|w| symbol.contains(w))
}

/// VmRSS and its anonymous and file-backed parts, in KiB.
struct Rss {
    total: u64,
    anon: u64,
    file: u64,
}

impl Rss {
    fn read() -> anyhow::Result<Rss> {
        let status =
            fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .with_context(|| format!("no {key} line in /proc/self/status"))
        };
        Ok(Rss {
            total: kib("VmRSS:")?,
            anon: kib("RssAnon:")?,
            file: kib("RssFile:")?,
        })
    }
}
