//! `cargo xtask bench alloc`: what precise allocation tracing costs, and how its leak report
//! compares with valgrind's, measured in one run.
//!
//! Pair cost: `ws1-allocload` times a tight `free(malloc(S))` loop (`time-malloc N S`) under
//! (a) no probe, (b) the trap floor (`ws1-probe bench-floor --uprobe-pid`: empty uprobe and
//! uretprobe on malloc, empty uprobe on free, that process only), (c) `ws1-probe leaks --pid`
//! and (d) the always-on agent (`ws1-probe agent --pid`: no allocation hooks, so its goal is
//! "within noise"). Rounds interleave baseline blocks as in `bench syscalls` (`bench_util::added`).
//!
//! Leak report: the workload of the `leaks_are_reported_exactly_at_their_call_sites` test, run
//! once under `ws1-probe leaks` and once under valgrind memcheck, compared per leaking function.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::{
    apt,
    bench_util::{Agent, Block, Proc, added, median, other_tracers},
    run, util,
};

/// malloc/free pairs per sample, bytes per block, samples per block, rounds.
const N: u64 = 50_000;
const SIZE: u64 = 64;
const SAMPLES: usize = 5;
const ROUNDS: usize = 3;
const CONFIGS: [(&str, &str); 4] = [
    ("a", "no probe (baseline)"),
    ("b", "floor: empty uprobe+uretprobe pair"),
    ("c", "ws1-probe leaks --pid <bench>"),
    ("d", "always-on: agent --pid <bench>"),
];
/// The leak workload: the same commands as the integration test.
const K: u64 = 7;
const S: u64 = 1024;
/// Each is leaked through `leak-<how>`, in the function `leak_with_<how>`.
const HOWS: [&str; 4] = ["malloc", "calloc", "realloc", "memalign"];

pub fn run(args: &[String]) -> Result<()> {
    ensure!(
        args.is_empty(),
        "bench alloc takes no arguments (got {args:?})"
    );
    apt::ensure_packages(&[("valgrind", "valgrind")])?;
    run::cargo_build_release(&["ws1-probe", "ws1-probe-tests"])?;
    let release = util::target_dir().join("release");
    let logs = util::target_dir().join("bench");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let t = Tools {
        probe: release.join("ws1-probe"),
        load: release.join("ws1-allocload"),
        logs,
    };

    let mut w = Proc::spawn("ws1-allocload", &mut Command::new(&t.load), &t.logs)?;
    w.wait_for_line("ready ", 10)?;
    let mut pairs = Pairs {
        w,
        made: 0,
        blocks: Vec::new(),
        sanity: Vec::new(),
        load: Vec::new(),
    };
    for round in 1..=ROUNDS {
        for (key, label) in &CONFIGS[1..] {
            eprintln!("bench: round {round}/{ROUNDS}: (a) baseline, then ({key}) {label}");
            pairs.block("a")?;
            pairs.config(&t, key)?;
        }
    }
    pairs.block("a")?;
    pairs.w.request("exit")?;
    pairs.w.wait_exit(Duration::from_secs(10))?;

    eprintln!("bench: leak workload with no tool, under ws1-probe leaks, under valgrind");
    let plain = leak_run(&t, Tool::None)?;
    let probe = leak_run(&t, Tool::Probe)?;
    let valgrind = leak_run(&t, Tool::Valgrind)?;

    pairs.report()?;
    report_leaks(&plain, &probe, &valgrind);
    Ok(())
}

struct Tools {
    probe: PathBuf,
    load: PathBuf,
    logs: PathBuf,
}

struct Pairs {
    /// The workload, and how many malloc/free pairs it has made.
    w: Proc,
    made: u64,
    blocks: Vec<Block>,
    /// (c): (allocs counted, frees counted, pairs made while attached), per start.
    sanity: Vec<(u64, u64, u64)>,
    load: Vec<String>,
}

impl Pairs {
    /// A warm-up batch (a quarter of a sample), then the samples.
    fn block(&mut self, key: &'static str) -> Result<()> {
        if key == "a" {
            let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
            let load = load.split(' ').next().unwrap_or("?").to_owned();
            self.load.push(load + &other_tracers());
        }
        self.time_malloc(N / 4)?;
        let mut ns = Vec::new();
        for _ in 0..SAMPLES {
            ns.push(self.time_malloc(N)?);
        }
        self.blocks.push(Block { key, ns });
        Ok(())
    }

    /// `n` pairs timed by the workload; returns ns per pair.
    fn time_malloc(&mut self, n: u64) -> Result<f64> {
        let reply = self.w.request(&format!("time-malloc {n} {SIZE}"))?;
        self.made += n;
        let total = reply
            .strip_prefix("ok ")
            .and_then(|t| t.trim().parse::<u64>().ok());
        let total = total.with_context(|| format!("workload: time-malloc said {reply:?}"))?;
        Ok(total as f64 / n as f64)
    }

    fn config(&mut self, t: &Tools, key: &'static str) -> Result<()> {
        let pid = self.w.pid().to_string();
        let mut cmd = Command::new(&t.probe);
        if key == "b" {
            cmd.args(["bench-floor", "--uprobe-pid", &pid]);
            let mut floor = Proc::spawn("bench-floor-uprobe", &mut cmd, &t.logs)?;
            floor.wait_for_line("ready", 20)?;
            self.block(key)?;
            let (status, tail) = (floor.stop()?, floor.log_tail());
            ensure!(status.success(), "bench-floor exited with {status}: {tail}");
            return Ok(());
        }
        if key == "d" {
            let mut agent = Agent::start(&t.probe, self.w.pid(), &t.logs, "agent-alloc")?;
            self.block(key)?;
            let (status, tail) = (agent.proc.stop()?, agent.proc.log_tail());
            ensure!(status.success(), "agent exited with {status}: {tail}");
            return Ok(());
        }
        let mut leaks = start_leaks(t, &pid, "leaks-bench")?;
        let before = self.made;
        self.block(key)?;
        let report = finish_leaks(&mut leaks)?;
        let stats = report["stats"].as_object().into_iter().flatten();
        let stats: Vec<&Value> = stats.map(|(_, s)| s).collect();
        let sum = |field: &str| -> u64 { stats.iter().filter_map(|s| s[field].as_u64()).sum() };
        ensure!(sum("failed") == 0, "leaks: failed allocations: {report}");
        self.sanity
            .push((sum("allocs"), sum("frees"), self.made - before));
        Ok(())
    }

    fn report(&self) -> Result<()> {
        println!(
            "\nmalloc+free pair cost per configuration ({ROUNDS} rounds x {SAMPLES} samples of \
             {N} pairs of {SIZE} bytes):"
        );
        println!(
            "configuration                             median ns         min..max ns   added ns   added per round"
        );
        let mut add = BTreeMap::new();
        for (key, label) in CONFIGS {
            let blocks = self.blocks.iter().filter(|b| b.key == key);
            let mut ns: Vec<f64> = blocks.flat_map(|b| b.ns.iter().copied()).collect();
            ns.sort_by(f64::total_cmp);
            let (Some(lo), Some(hi)) = (ns.first(), ns.last()) else {
                bail!("no samples for ({key})")
            };
            let mut per_round = added(&self.blocks, key);
            per_round.sort_by(f64::total_cmp);
            let (mut added_ns, mut range) = ("-".to_owned(), "-".to_owned());
            if let (Some(l), Some(h), true) = (per_round.first(), per_round.last(), key != "a") {
                add.insert(key, median(&per_round));
                added_ns = format!("{:+.1}", median(&per_round));
                range = format!("{l:+.0}..{h:+.0}");
            }
            let (label, spread) = (format!("({key}) {label}"), format!("{lo:.1}..{hi:.1}"));
            let med = median(&ns);
            println!("{label:<40} {med:>10.1} {spread:>19} {added_ns:>10} {range:>17}");
        }
        let base: Vec<f64> = self
            .blocks
            .iter()
            .filter(|b| b.key == "a")
            .map(|b| median(&b.ns))
            .collect();
        let drift: Vec<String> = base.iter().map(|m| format!("{m:.1}")).collect();
        println!(
            "baseline block medians in run order (ns): {}",
            drift.join(" ")
        );
        let load = self.load.join(" ");
        println!("1-min load average at each baseline block [other tracers running]: {load}");
        if load.contains('[') {
            println!("WARNING: other tracers ran; their hooks cost every row, the baseline too");
        }
        for (allocs, frees, made) in &self.sanity {
            let verdict = if allocs == made { "match" } else { "MISMATCH" };
            println!(
                "sanity (c): leaks counted {allocs} allocations ({frees} frees) vs {made} \
                 malloc/free pairs made while attached: {verdict}"
            );
        }
        let (Some(&b), Some(&c), Some(&d)) = (add.get("b"), add.get("c"), add.get("d")) else {
            bail!("missing configurations in the results")
        };
        // Noise: how far the baseline blocks' medians spread over the run.
        let noise = base.iter().fold(f64::MIN, |m, &v| m.max(v))
            - base.iter().fold(f64::MAX, |m, &v| m.min(v));
        println!("\ngoals (added ns per malloc+free pair: medians over rounds):");
        let goals = [
            ("(c) <= 1.5 x (b)", c, 1.5 * b, "precise mode"),
            (
                "|(d)| <= baseline spread",
                d.abs(),
                noise,
                "always-on mode, within noise",
            ),
        ];
        for (name, value, limit, what) in goals {
            let verdict = if value <= limit { "PASS" } else { "MISS" };
            println!("  {verdict}  {name:<26} {value:>10.1} ns (limit {limit:.1} ns): {what}");
        }
        println!("  (c)/(b) = {:.2}", c / b);
        println!(
            "\ncontext: the three traps per pair (malloc entry and return, free entry) cost {b:.0} \
             ns; the precise-mode programs add {:.0} ns over them",
            c - b
        );
        Ok(())
    }
}

/// `ws1-probe leaks --pid <pid>`, returned once its probes are attached (its stderr line).
fn start_leaks(t: &Tools, pid: &str, name: &str) -> Result<Proc> {
    let mut cmd = Command::new(&t.probe);
    cmd.args(["leaks", "--pid", pid, "--duration", "3600s"])
        .args(["--min-age", "0s", "--json", "--top", "50"]);
    let mut p = Proc::spawn(name, &mut cmd, &t.logs)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        if log.lines().any(|l| l.starts_with("collecting allocations")) {
            return Ok(p);
        }
        p.fail_if_exited()?;
        ensure!(
            Instant::now() < deadline,
            "{name}: not attached after 30 s: {}",
            p.log_tail()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Ctrl-C, then the JSON report it prints.
fn finish_leaks(p: &mut Proc) -> Result<Value> {
    let (status, tail) = (p.interrupt()?, p.log_tail());
    ensure!(status.success(), "{} exited with {status}: {tail}", p.name);
    let line = p.next_line(Duration::from_secs(5))?;
    serde_json::from_str(&line).with_context(|| format!("{}: report is not JSON: {line}", p.name))
}

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    None,
    Probe,
    Valgrind,
}

/// One run of the leak workload: per leaking function (bytes, blocks), the total, and the wall
/// time of its commands and of the whole process.
#[derive(Default)]
struct LeakRun {
    by_function: BTreeMap<String, (u64, u64)>,
    total: (u64, u64),
    commands: Duration,
    lifetime: Duration,
}

fn leak_run(t: &Tools, tool: Tool) -> Result<LeakRun> {
    let (name, mut cmd) = match tool {
        Tool::Valgrind => {
            let valgrind = util::find_in_path("valgrind").context("valgrind not on PATH")?;
            let mut cmd = Command::new(valgrind);
            cmd.args([
                "--leak-check=full",
                "--show-leak-kinds=definite",
                "--error-exitcode=0",
            ])
            .arg(&t.load);
            ("allocload-valgrind", cmd)
        }
        Tool::Probe => ("allocload-leaks", Command::new(&t.load)),
        Tool::None => ("allocload-plain", Command::new(&t.load)),
    };
    let started = Instant::now();
    let mut w = Proc::spawn(name, &mut cmd, &t.logs)?;
    w.wait_for_line("ready ", 120)?;
    let mut leaks = match tool {
        Tool::Probe => Some(start_leaks(t, &w.pid().to_string(), "leaks-compare")?),
        _ => None,
    };
    let mut run = LeakRun::default();
    let begun = Instant::now();
    for how in HOWS {
        w.request(&format!("leak-{how} {K} {S}"))?;
    }
    w.request(&format!("balanced 500 {S}"))?;
    run.commands = begun.elapsed();
    if let Some(leaks) = &mut leaks {
        // Before the workload exits, which would remove its blocks from the report.
        let report = finish_leaks(leaks)?;
        run.total.1 = report["outstanding_blocks"].as_u64().unwrap_or(0);
        for group in report["leaks"].as_array().into_iter().flatten() {
            let function = group["stack"][0]["function"].as_str().unwrap_or("?");
            let bytes = group["bytes"].as_u64().unwrap_or(0);
            let e = run.by_function.entry(short(function)).or_default();
            e.0 += bytes;
            e.1 += group["count"].as_u64().unwrap_or(0);
            run.total.0 += bytes;
        }
    }
    w.request("exit")?;
    let (status, tail) = (w.wait_exit(Duration::from_secs(120))?, w.log_tail());
    run.lifetime = started.elapsed();
    ensure!(status.success(), "{name} exited with {status}: {tail}");
    if tool == Tool::Valgrind {
        let text =
            fs::read_to_string(&w.log).with_context(|| format!("reading {}", w.log.display()))?;
        parse_valgrind(&text, &mut run).with_context(|| format!("in {}", w.log.display()))?;
    }
    Ok(run)
}

/// Fills `run` from valgrind's "definitely lost" loss records and its LEAK SUMMARY.
fn parse_valgrind(text: &str, run: &mut LeakRun) -> Result<()> {
    // Lines look like "==123==    by 0x10F2A3: ws1_allocload::leak_with_malloc (x.rs:22)".
    let lines = text.lines().map(|l| match l.strip_prefix("==") {
        Some(rest) => rest.split_once("==").map_or(rest, |(_, l)| l).trim(),
        None => l.trim(),
    });
    let mut record: Option<(u64, u64)> = None;
    let mut summary = None;
    for line in lines {
        if line.contains("are definitely lost in loss record") {
            record = Some((first_number(line), number_before(line, "blocks")));
        } else if let Some(rest) = line.strip_prefix("definitely lost:") {
            summary = Some((first_number(rest), number_before(rest, "blocks")));
        } else if line.is_empty() {
            record = None;
        } else if let (Some((bytes, blocks)), Some(frame)) = (record, frame_function(line)) {
            let e = run.by_function.entry(short(frame)).or_default();
            e.0 += bytes;
            e.1 += blocks;
            record = None;
        }
    }
    run.total = summary.context("no \"definitely lost:\" line in valgrind's LEAK SUMMARY")?;
    Ok(())
}

/// The function of an `at`/`by` stack line outside valgrind's own allocator replacements.
fn frame_function(line: &str) -> Option<&str> {
    let rest = line
        .strip_prefix("at ")
        .or_else(|| line.strip_prefix("by "))?;
    let (_, rest) = rest.split_once(": ")?;
    let (function, place) = rest.split_once(" (").unwrap_or((rest, ""));
    let own = place.contains("vgpreload") || place.contains("vg_replace_malloc");
    (!own).then_some(function)
}

/// Digits (commas allowed) of the first number in `text`.
fn first_number(text: &str) -> u64 {
    let start = text.trim_start();
    let digits: String = start
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .collect();
    digits.replace(',', "").parse().unwrap_or(0)
}

/// The number right before the word `word`.
fn number_before(text: &str, word: &str) -> u64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    let at = words.iter().position(|w| *w == word);
    at.and_then(|i| words.get(i.checked_sub(1)?))
        .map_or(0, |w| first_number(w))
}

/// A function name reduced to its leaking function's name when it is one of ours.
fn short(function: &str) -> String {
    let leakers = HOWS.map(|how| format!("leak_with_{how}"));
    let known = leakers.into_iter().find(|l| function.ends_with(l.as_str()));
    known.unwrap_or_else(|| function.to_owned())
}

fn report_leaks(plain: &LeakRun, probe: &LeakRun, valgrind: &LeakRun) {
    println!(
        "\nleak report vs valgrind (definitely lost), same workload: leak-{{malloc,calloc,realloc,\
         memalign}} {K} {S} each, then balanced 500 {S}:"
    );
    println!(
        "function                   expected   ws1-probe bytes/blocks   valgrind bytes/blocks"
    );
    let mut names: Vec<String> = HOWS.map(|how| format!("leak_with_{how}")).to_vec();
    for name in probe.by_function.keys().chain(valgrind.by_function.keys()) {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let cell = |r: &LeakRun, name: &str| {
        let (bytes, blocks) = r.by_function.get(name).copied().unwrap_or((0, 0));
        format!("{bytes}/{blocks}")
    };
    for name in &names {
        let leaker = name
            .strip_prefix("leak_with_")
            .is_some_and(|h| HOWS.contains(&h));
        let expected = if leaker {
            format!("{}/{K}", K * S)
        } else {
            "0/0".to_owned()
        };
        let (p, v) = (cell(probe, name), cell(valgrind, name));
        let same = if p == v && p == expected {
            ""
        } else {
            "  DIFFERENT"
        };
        println!("{name:<25} {expected:>9} {p:>24} {v:>23}{same}");
    }
    let total = |r: &LeakRun| format!("{}/{}", r.total.0, r.total.1);
    let expected = format!("{}/{}", 4 * K * S, 4 * K);
    let (p, v) = (total(probe), total(valgrind));
    println!("{:<25} {expected:>9} {p:>24} {v:>23}", "total");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "\nworkload wall time of those commands: no tool {:.1} ms, under ws1-probe leaks {:.1} ms, \
         under valgrind {:.1} ms",
        ms(plain.commands),
        ms(probe.commands),
        ms(valgrind.commands)
    );
    println!(
        "whole process (start to exit, incl. valgrind's start-up and leak check): no tool {:.1} ms, \
         under valgrind {:.1} ms",
        ms(plain.lifetime),
        ms(valgrind.lifetime)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valgrind_records() {
        let text = "==9== 7,168 bytes in 7 blocks are definitely lost in loss record 5 of 6
==9==    at 0x4846990: memalign (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==9==    by 0x4846AED: posix_memalign (in /usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so)
==9==    by 0x11D645: ws1_allocload::leak_with_memalign (ws1-allocload.rs:53)
==9==    by 0x11DBF6: ws1_allocload::main (ws1-allocload.rs:115)
==9==
==9== LEAK SUMMARY:
==9==    definitely lost: 28,672 bytes in 28 blocks
";
        let mut run = LeakRun::default();
        parse_valgrind(text, &mut run).unwrap();
        assert_eq!(run.total, (28_672, 28));
        assert_eq!(run.by_function.get("leak_with_memalign"), Some(&(7168, 7)));
        assert_eq!(run.by_function.len(), 1);
    }
}
