//! `ws1-probe net`: collect TCP connection, RTT and request metrics for a while, print a table
//! per endpoint.

use std::{
    io::{IsTerminal as _, Write as _},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use ws1_probe::{probe::Probe, report, units};

use super::CommonArgs;

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
}

pub fn run(args: NetArgs) -> anyhow::Result<()> {
    let settings = super::settings(&args.common, None, false)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut probe = Probe::start(&settings).context("cannot start the network collector")?;
    let what = settings.targets.describe();
    let tty = std::io::stderr().is_terminal();
    if !tty {
        eprintln!(
            "collecting TCP activity of {what} for {}s ({} processes now)",
            args.duration.as_secs_f64(),
            probe.scan.targeted
        );
    }
    let mut ring = probe.take_exec_ring();
    let started = Instant::now();
    let interrupted = rt.block_on(async {
        let deadline = tokio::time::Instant::now() + args.duration;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut last_progress = Instant::now() - Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return true,
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = tick.tick() => {
                    if let Some(ring) = ring.as_mut() {
                        probe.targets.drain(ring);
                    }
                    if tty && last_progress.elapsed() >= Duration::from_secs(1) {
                        last_progress = Instant::now();
                        let snap = probe.net.snapshot();
                        eprint!(
                            "\r\x1b[Kcollecting TCP activity of {what}: {:.0}s/{:.0}s, {} connections, {} requests (Ctrl-C to stop)",
                            started.elapsed().as_secs_f64(),
                            args.duration.as_secs_f64(),
                            snap.total_connections(),
                            snap.total_requests(),
                        );
                        let _ = std::io::stderr().flush();
                    }
                }
            }
        }
    });
    if let Some(ring) = ring.as_mut() {
        probe.targets.drain(ring);
    }
    let snap = probe.net.snapshot();
    let services = probe.targets.matcher().services().clone();
    let skipped = probe.net.skipped.clone();
    drop(probe);
    if tty {
        eprint!("\r\x1b[K");
    }
    let elapsed = started.elapsed();
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
