//! `ws1-probe net`: collect TCP connection, RTT and request metrics for a while, print a table
//! per endpoint.

use std::time::Duration;

use anyhow::Context as _;
use ws1_probe::{probe::Probe, report, targeting::config::Collectors, units};

use super::{Collected, CommonArgs, collect};

/// Collect TCP connection, RTT, request latency and connection reuse per endpoint
#[derive(clap::Args, Debug)]
pub struct NetArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// How long to collect (e.g. 10s, 500ms, 2m); Ctrl-C stops early and prints what was seen
    #[arg(long, short = 'd', default_value = "10s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Print JSON (one object with an `endpoints` array) instead of a table
    #[arg(long)]
    pub json: bool,
    /// Rows to print in the table
    #[arg(long, default_value_t = 25)]
    pub top: usize,
    /// One row per remote address too (every selected process; needs a selector). Per
    /// service: `remote_addresses = true` in the config
    #[arg(long)]
    pub remote_addresses: bool,
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    let mut settings = super::settings_with(
        &args.common,
        ws1_probe::targeting::config::FlagOverrides {
            remote_addresses: args.remote_addresses,
            ..Default::default()
        },
    )?;
    settings.collectors = Collectors {
        net: true,
        ..Collectors::NONE
    };
    let mut probe = Probe::start(&settings).context("cannot start the network collector")?;
    let what = settings.targets.describe();
    let start_line = format!(
        "collecting TCP activity of {what} for {}s ({} processes now)",
        args.duration.as_secs_f64(),
        probe.scan.targeted
    );
    let Collected {
        interrupted,
        elapsed,
    } = collect(&mut probe, args.duration, &start_line, |probe| {
        let snap = probe.net.snapshot();
        format!(
            "collecting TCP activity of {what}, {} connections, {} requests",
            snap.total_connections(),
            snap.total_requests()
        )
    })?;
    let snap = probe.net.snapshot();
    let services = probe.targets.matcher().services().clone();
    let skipped = probe.net.skipped.clone();
    drop(probe);
    let rows = report::net::rows(&snap, |id| services.name(id));
    if args.json {
        let out = serde_json::json!({
            "targets": what,
            "duration_seconds": elapsed.as_secs_f64(),
            "interrupted": interrupted,
            "skipped_hooks": skipped.iter().map(|(h, _)| h).collect::<Vec<_>>(),
            "endpoints": rows,
        });
        println!("{out}");
    } else {
        eprintln!(
            "TCP activity of {what} over {:.1}s{}",
            elapsed.as_secs_f64(),
            if interrupted { " (interrupted)" } else { "" }
        );
        print!("{}", report::net::render(&rows, args.top));
    }
    Ok(())
}
