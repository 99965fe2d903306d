//! `ws1-probe allocs`: allocation rate, size histogram and top allocating stacks of the selected
//! processes (precise mode, for a while).

use std::time::Duration;

use ws1_probe::{
    report::allocs::{self, size_rows},
    units,
};

use super::{
    CommonArgs,
    leaks::{AllocatorArgs, MapEntriesArgs, allocators_json, trace},
};

/// Show allocation rate, size histogram and top allocating stacks
#[derive(clap::Args, Debug)]
pub struct AllocsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub allocator: AllocatorArgs,
    #[command(flatten)]
    pub maps: MapEntriesArgs,
    /// How long to trace (e.g. 10s, 1m); Ctrl-C stops early
    #[arg(long, short = 'd', default_value = "10s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Stacks to report
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: AllocsArgs) -> anyhow::Result<()> {
    let session = trace(&args.common, &args.allocator, &args.maps, args.duration, "")?;
    let total = session.total();
    let services = session.probe.targets.matcher().services();
    let pairs = session.probe.targets.targeted_pairs();
    let pid_of = |service: u32| {
        pairs
            .iter()
            .find(|(pid, s)| *s == service && session.allocs.pids.contains(pid))
            .map(|(pid, _)| *pid)
    };
    let mut sites = allocs::sites(
        &session.allocs.sites(),
        |id| services.name(id),
        pid_of,
        |id| session.allocs.stack(id),
    );
    sites.truncate(args.top);
    let seconds = session.elapsed.as_secs_f64();
    if args.json {
        let sizes: Vec<serde_json::Value> = size_rows(&total)
            .into_iter()
            .map(|(le, n)| serde_json::json!({ "size": le, "calls": n }))
            .collect();
        let out = serde_json::json!({
            "targets": session.what,
            "allocators": allocators_json(&session.allocs),
            "cost": session.cost_json(),
            "duration_seconds": seconds,
            "interrupted": session.interrupted,
            "alloc_bytes": total.alloc_bytes,
            "allocs": total.allocs,
            "free_bytes": total.free_bytes,
            "frees": total.frees,
            "failed": total.failed,
            "untracked": total.untracked,
            "sizes": sizes,
            "top_stacks": sites,
        });
        println!("{out}");
    } else {
        print!(
            "{}",
            ws1_probe::report::leaks::render_allocators(&session.allocs.processes)
        );
        print!("{}", session.cost());
        print!("{}", allocs::render(&total, seconds, &sites, 12));
    }
    Ok(())
}
