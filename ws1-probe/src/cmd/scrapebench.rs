//! `ws1-probe bench-scrape` (hidden): what rendering `/metrics` costs at a given number of
//! series, for `cargo xtask bench scrape`. The series are syscall histograms of a synthetic
//! snapshot (services × syscalls, every bucket filled), the agent's largest family; the render
//! is the agent's own code path: the families, the text encoder, and gzip.

use std::time::Instant;

use ws1_probe::{
    collectors::syscalls::SyscallSnapshot, histogram::Histogram, metrics, server::gzip,
};
use ws1_probe_common::hist::DEFAULT_EXPORT_BOUNDS_NS;

/// Render N series of syscall histograms and print the render time, bytes and gzip size as
/// JSON
#[derive(clap::Args, Debug)]
pub struct ScrapebenchArgs {
    /// Series to render (each histogram is its buckets, +Inf, _sum and _count)
    #[arg(long, default_value_t = 10_000)]
    pub series: usize,
    /// Renders to time; the median is printed
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
}

pub fn run(args: ScrapebenchArgs) -> anyhow::Result<()> {
    let bounds = &DEFAULT_EXPORT_BOUNDS_NS;
    // `le` buckets (one per bound, plus +Inf), _sum and _count.
    let per_histogram = bounds.len() + 3;
    let histograms = args.series.div_ceil(per_histogram).max(1);
    let mut snap = SyscallSnapshot::default();
    let mut h = Histogram::default();
    for (i, b) in bounds.iter().enumerate() {
        for _ in 0..=i {
            h.observe(bounds, *b);
        }
    }
    // 300 syscalls per service, as many services as needed.
    for i in 0..histograms {
        let (service, nr) = ((i / 300) as u32, (i % 300) as u32);
        snap.hists.insert((service, nr), h.clone());
    }
    let names: Vec<String> = (0..=histograms / 300)
        .map(|s| format!("service-{s}"))
        .collect();
    let label = |id: u32| names.get(id as usize).map_or("other", String::as_str);
    let mut times = Vec::with_capacity(args.rounds);
    let mut gzip_times = Vec::with_capacity(args.rounds);
    let (mut bytes, mut gzipped, mut samples) = (0, 0, 0);
    for _ in 0..args.rounds.max(1) {
        let started = Instant::now();
        let text = metrics::encode(&metrics::syscalls::families(&snap, label, bounds));
        times.push(started.elapsed().as_secs_f64() * 1e3);
        let started = Instant::now();
        let zipped = gzip(text.as_bytes());
        gzip_times.push(started.elapsed().as_secs_f64() * 1e3);
        bytes = text.len();
        gzipped = zipped.len();
        samples = text.lines().filter(|l| !l.starts_with('#')).count();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"series\":{samples},\"render_ms\":{:.3},\"gzip_ms\":{:.3},\"bytes\":{bytes},\"gzip_bytes\":{gzipped}}}",
        median(&mut times),
        median(&mut gzip_times)
    );
    Ok(())
}
