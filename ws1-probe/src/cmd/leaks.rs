//! `ws1-probe leaks`: trace the malloc family of the selected processes for a while, then report
//! the blocks still outstanding after `--min-age`, grouped by allocation stack. The tracing
//! session is shared with `ws1-probe allocs`.

use std::time::Duration;

use anyhow::{Context as _, bail};
use ws1_probe::{
    collectors::alloc::{self as alloccollector, AllocCollector},
    probe::Probe,
    report::leaks::{self, Rates, format_bytes},
    targeting::config::{AllocatorConfig, Collectors, FlagOverrides, PreciseAlloc},
    units,
};
use ws1_probe_common::alloc::AllocStats;

use super::{CommonArgs, collect};

/// Which allocator to trace, when the one found by itself (glibc, jemalloc, tcmalloc, mimalloc,
/// shared or static) is not the right one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AllocatorArgs {
    /// Binary holding the allocator, as the process sees it (a statically linked program, or
    /// e.g. /usr/lib/libjemalloc.so.2); `exe` for the program itself. Default: found from the
    /// libraries it maps and the symbols of its executable
    #[arg(long, value_name = "PATH")]
    pub alloc_lib: Option<String>,
    /// Prefix of the allocator's function names (e.g. `je_` for je_malloc/je_free)
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub alloc_prefix: String,
}

/// `--map-entries` of the one-shot tracing commands (the agent has its own, for every map).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct MapEntriesArgs {
    /// Capacity of a kernel map, e.g. ALLOC_STACKS=65536 when allocations lose their stacks
    /// (repeatable)
    #[arg(long, value_name = "NAME=ENTRIES", value_parser = ws1_probe::drops::parse_map_entries)]
    pub map_entries: Vec<(String, u32)>,
}

/// Find memory leaks: allocations still outstanding after --min-age, by stack
#[derive(clap::Args, Debug)]
pub struct LeaksArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub allocator: AllocatorArgs,
    #[command(flatten)]
    pub maps: MapEntriesArgs,
    /// How long to trace (e.g. 60s, 2m); Ctrl-C stops early and reports what was seen
    #[arg(long, short = 'd', default_value = "60s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Report blocks outstanding for at least this long
    #[arg(long, default_value = "5s", value_parser = parse_age)]
    pub min_age: Duration,
    /// Stacks to report
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    if text.trim() == "0" || text.trim() == "0s" {
        return Ok(Duration::ZERO);
    }
    units::parse_duration(text)
}

/// A finished precise-mode tracing session.
pub(super) struct Session {
    pub probe: Probe,
    pub allocs: AllocCollector,
    pub what: String,
    pub elapsed: Duration,
    pub interrupted: bool,
    /// The observed processes' activity before tracing and during it (precise mode's cost).
    pub before: Rates,
    pub during: Rates,
}

/// How long the observed processes are watched before tracing, for the cost line.
const BASELINE: Duration = Duration::from_secs(1);

impl Session {
    /// The cost line (see [`leaks::render_cost`]).
    pub fn cost(&self) -> String {
        let total = self.total();
        let calls = (total.allocs + total.frees) as f64 / self.elapsed.as_secs_f64().max(1e-3);
        leaks::render_cost(self.before, self.during, calls)
    }

    pub fn cost_json(&self) -> serde_json::Value {
        let total = self.total();
        let calls = (total.allocs + total.frees) as f64 / self.elapsed.as_secs_f64().max(1e-3);
        serde_json::json!({
            "before": self.before,
            "during": self.during,
            "allocator_calls_per_second": calls,
        })
    }
}

impl Session {
    /// Totals over all services.
    pub fn total(&self) -> AllocStats {
        let mut total = AllocStats::ZERO;
        for s in self.allocs.stats().values() {
            total.add(s);
        }
        total
    }
}

/// Attaches the allocation probes to the selected processes and traces for `duration` (or
/// until Ctrl-C), with a progress line on a terminal.
pub(super) fn trace(
    common: &CommonArgs,
    allocator: &AllocatorArgs,
    maps: &MapEntriesArgs,
    duration: Duration,
    note: &str,
) -> anyhow::Result<Session> {
    let flags = FlagOverrides {
        allocator: AllocatorConfig {
            lib: allocator.alloc_lib.clone(),
            prefix: allocator.alloc_prefix.clone(),
        },
        ..Default::default()
    };
    let mut settings = super::settings_with(common, flags)?;
    if settings.targets.is_host() {
        bail!(
            "precise allocation tracing needs a selector (uprobes on every process would slow the whole host): pass --pid, --comm, --cgroup or --config"
        );
    }
    settings.precise_alloc = PreciseAlloc::All;
    settings
        .map_entries
        .extend(maps.map_entries.iter().cloned());
    // The allocation uprobes attach after start; no other collector runs.
    settings.collectors = Collectors::NONE;
    let mut probe = Probe::start(&settings).context("cannot start the collectors")?;
    if probe.targets.targeted_pids().is_empty() {
        bail!("no running process matches {}", settings.targets.describe());
    }
    // The yardstick of the cost: what the processes do untraced, then traced.
    let pids = probe.targets.targeted_pids();
    let baseline_at = std::time::Instant::now();
    let a0 = alloccollector::activity(&pids);
    std::thread::sleep(BASELINE);
    let before = Rates::between(
        a0,
        alloccollector::activity(&pids),
        baseline_at.elapsed().as_secs_f64(),
    );
    probe
        .attach_precise_alloc(&settings.precise_alloc)
        .context("cannot attach the allocation probes")?;
    let during_at = std::time::Instant::now();
    let d0 = alloccollector::activity(&pids);
    let traced = probe.alloc.as_ref().map_or(0, |a| a.pids.len());
    let what = settings.targets.describe();
    let start_line = format!(
        "collecting allocations of {traced} process(es) ({what}) for {:.0}s{note}",
        duration.as_secs_f64(),
    );
    let collected = collect(&mut probe, duration, &start_line, |probe| {
        let mut total = AllocStats::ZERO;
        for s in probe.alloc.iter().flat_map(|a| a.stats().into_values()) {
            total.add(&s);
        }
        format!(
            "{} allocated, {} freed",
            format_bytes(total.alloc_bytes),
            format_bytes(total.free_bytes)
        )
    })?;
    let during = Rates::between(
        d0,
        alloccollector::activity(&pids),
        during_at.elapsed().as_secs_f64(),
    );
    let Some(allocs) = probe.alloc.take() else {
        bail!("no allocation probe was attached");
    };
    Ok(Session {
        probe,
        allocs,
        what,
        elapsed: collected.elapsed,
        interrupted: collected.interrupted,
        before,
        during,
    })
}

pub fn run(args: LeaksArgs) -> anyhow::Result<()> {
    let note = format!(
        "; leaks are blocks outstanding for {:.1}s or more",
        args.min_age.as_secs_f64()
    );
    let mut session = trace(
        &args.common,
        &args.allocator,
        &args.maps,
        args.duration,
        &note,
    )?;
    let swept = session.allocs.sweep_exited();
    let now = units::monotonic_ns();
    let outstanding = session.allocs.outstanding();
    let mapped = session.allocs.mapped();
    let min_age_ns = args.min_age.as_nanos() as u64;
    let groups = leaks::group(&outstanding, now, min_age_ns);
    let services = session.probe.targets.matcher().services();
    let allocs = &session.allocs;
    let mut reports = leaks::symbolize(&groups, |id| services.name(id), |id| allocs.stack(id));
    let stacks = reports.len();
    let unavailable = leaks::render_unavailable(&reports);
    let unavailable_bytes: u64 = reports
        .iter()
        .filter(|r| r.stack.is_empty())
        .map(|r| r.bytes)
        .sum();
    reports.truncate(args.top);
    if args.json {
        let per_service: serde_json::Map<String, serde_json::Value> = allocs
            .stats()
            .iter()
            .map(|(id, s)| {
                (
                    services.name(*id).to_owned(),
                    serde_json::json!({
                        "alloc_bytes": s.alloc_bytes, "allocs": s.allocs,
                        "free_bytes": s.free_bytes, "frees": s.frees,
                        "failed": s.failed, "untracked": s.untracked,
                        "mmap_bytes": s.mmap_bytes, "munmap_bytes": s.munmap_bytes,
                        "brk_bytes": s.brk_bytes,
                    }),
                )
            })
            .collect();
        let out = serde_json::json!({
            "targets": session.what,
            "allocators": allocators_json(allocs),
            "cost": session.cost_json(),
            "observed": leaks::any_observed(allocs.processes.values()),
            "duration_seconds": session.elapsed.as_secs_f64(),
            "interrupted": session.interrupted,
            "min_age_seconds": args.min_age.as_secs_f64(),
            "outstanding_blocks": outstanding.len(),
            "exited_blocks_removed": swept,
            "mapped_regions": mapped.0,
            "mapped_bytes": mapped.1,
            "stack_unavailable_bytes": unavailable_bytes,
            "leaks": reports,
            "stats": per_service,
        });
        println!("{out}");
    } else {
        print!("{}", leaks::render_allocators(&allocs.processes));
        print!("{}", session.cost());
        let observed = leaks::any_observed(allocs.processes.values());
        print!(
            "{}",
            leaks::render(&reports, stacks, min_age_ns, 12, observed)
        );
        print!("{unavailable}");
        if mapped.0 > 0 {
            println!(
                "\nanonymous mappings made outside the allocator and still mapped: {} in {} regions",
                format_bytes(mapped.1),
                mapped.0
            );
        }
    }
    Ok(())
}

/// Per pid, the allocators hooked (kind, binary, prefix, entry points) or why not.
pub(super) fn allocators_json(allocs: &AllocCollector) -> serde_json::Value {
    allocs
        .processes
        .iter()
        .map(|(pid, found)| {
            (
                pid.to_string(),
                serde_json::to_value(found).unwrap_or_default(),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
