//! `ws1-probe profile`: sample stacks for a while and write folded stacks, an SVG flame graph,
//! a pprof profile or a table of the hottest functions.

use std::{io::Write as _, path::PathBuf, time::Duration};

use anyhow::Context as _;
use ws1_probe::{
    collectors::profile::{CLI_FREQUENCY_HZ, ProfileOptions, UnwindMode},
    probe::Probe,
    profile::{Profile, ProfileKind, flame, fold, pprof, runtime::Shares, top},
    targeting::config::{Collectors, Settings},
    units,
};

use super::{Collected, CommonArgs, collect};

/// Output formats of `profile`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Folded stacks, one line per stack (flamegraph.pl / inferno input)
    Folded,
    /// SVG flame graph
    Svg,
    /// pprof protobuf, gzipped (go tool pprof, Parca, Pyroscope, Speedscope)
    Pprof,
    /// Table of the hottest functions, self and total
    Top,
}

/// Flags shared by `profile` and `top`.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Samples per second per CPU
    #[arg(long, short = 'F', default_value_t = CLI_FREQUENCY_HZ)]
    pub frequency: u64,
    /// Profile blocked (off-CPU) time by stack instead of CPU time
    #[arg(long)]
    pub off_cpu: bool,
    /// With --off-cpu: blocks shorter than this are not counted (e.g. 100us, 1ms)
    #[arg(long, default_value = "1ms", value_parser = units::parse_duration)]
    pub min_block: Duration,
    /// User stack unwinding: frame pointers where the binary keeps them and DWARF otherwise
    /// (auto), or one method for every process
    #[arg(long, value_enum, default_value = "auto")]
    pub unwind: UnwindMode,
    /// Do not read Python stacks from CPython 3.11/3.12 thread states (their stacks then show
    /// interpreter frames only)
    #[arg(long)]
    pub no_python: bool,
}

impl SamplingArgs {
    /// Settings with only the profiler on.
    pub fn settings(&self, common: &CommonArgs) -> anyhow::Result<Settings> {
        if !self.off_cpu && !(1..=10_000).contains(&self.frequency) {
            anyhow::bail!(
                "invalid --frequency {}: use 1 to 10000 samples per second (99 is the usual rate)",
                self.frequency
            );
        }
        let mut settings = super::settings(common, None, false)?;
        settings.collectors = Collectors {
            profile: true,
            ..Collectors::NONE
        };
        settings.profile = ProfileOptions {
            // Off-CPU profiles do not need the sampler.
            frequency_hz: if self.off_cpu { 0 } else { self.frequency },
            off_cpu: self.off_cpu,
            offcpu_min_ns: self.min_block.as_nanos() as u64,
            unwind: self.unwind,
            debug_info: true,
            // One-shot: caches need no bound, and every binary gets its DWARF.
            cache_bytes: u64::MAX,
            python: !self.no_python,
        };
        Ok(settings)
    }

    pub fn kind(&self) -> ProfileKind {
        if self.off_cpu {
            ProfileKind::OffCpu
        } else {
            ProfileKind::Cpu
        }
    }
}

/// Sample stacks of the selected processes
#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// How long to sample (e.g. 10s, 500ms, 2m); Ctrl-C stops early and writes what was seen
    #[arg(long, short = 'd', default_value = "10s", value_parser = units::parse_duration)]
    pub duration: Duration,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value = "folded")]
    pub format: Format,
    /// Write to FILE instead of standard output; repeat for several files from one run. A
    /// file's format follows its name (.folded/.txt, .svg, .pb.gz/.pprof), else --format
    #[arg(long = "output", short = 'o', value_name = "FILE")]
    pub outputs: Vec<PathBuf>,
    /// Rows of the `top` format
    #[arg(long, default_value_t = 25)]
    pub rows: usize,
}

/// The format a file name asks for, if its extension names one.
pub fn format_of(path: &std::path::Path) -> Option<Format> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
        Some(Format::Pprof)
    } else if name.ends_with(".svg") {
        Some(Format::Svg)
    } else if name.ends_with(".folded") || name.ends_with(".collapsed") {
        Some(Format::Folded)
    } else {
        None
    }
}

/// What a profile holds, for the summary line; the truncated share is followed by each
/// runtime's own (`(native 0.2% of 5980, node 1.0% of 2400)`).
fn summary(p: &Profile, runtimes: &Shares) -> String {
    let truncated: u64 = p
        .stacks
        .iter()
        .filter(|s| s.truncated)
        .map(|s| s.samples)
        .sum();
    let total = p.total_samples();
    let share = if total > 0 {
        100.0 * truncated as f64 / total as f64
    } else {
        0.0
    };
    let pids: std::collections::BTreeSet<u32> = p.stacks.iter().map(|s| s.pid).collect();
    let by_runtime = match runtimes.describe() {
        d if d.is_empty() => d,
        d => format!(" ({d})"),
    };
    match p.kind {
        ProfileKind::Cpu => format!(
            "{total} samples ({}) from {} process(es), {} distinct stacks, {share:.1}% truncated{by_runtime}",
            units::format_ns(p.total_value_ns()),
            pids.len(),
            p.stacks.len()
        ),
        ProfileKind::OffCpu => format!(
            "{} blocked in {total} blocks from {} process(es), {} distinct stacks, {share:.1}% truncated{by_runtime}",
            units::format_ns(p.total_value_ns()),
            pids.len(),
            p.stacks.len()
        ),
    }
}

/// Encodes a profile in `format`.
pub fn render(p: &Profile, format: Format, title: &str, rows: usize) -> anyhow::Result<Vec<u8>> {
    Ok(match format {
        Format::Folded => fold::folded(p).into_bytes(),
        Format::Svg => flame::svg(p, title).context("cannot draw the flame graph")?,
        Format::Pprof => pprof::encode_gzip(p).context("cannot encode the pprof profile")?,
        Format::Top => top::render(&top::top_functions(p, rows), title, 120).into_bytes(),
    })
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let settings = args.sampling.settings(&args.common)?;
    // Open the outputs first: a bad path fails before anything is loaded.
    let mut outs: Vec<(Box<dyn std::io::Write>, Format)> = Vec::new();
    for path in &args.outputs {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        outs.push((
            Box::new(std::io::BufWriter::new(file)),
            format_of(path).unwrap_or(args.format),
        ));
    }
    if outs.is_empty() {
        if matches!(args.format, Format::Pprof | Format::Svg)
            && std::io::IsTerminal::is_terminal(&std::io::stdout())
        {
            anyhow::bail!(
                "{:?} output is not for a terminal: write it to a file with -o FILE",
                args.format
            );
        }
        outs.push((Box::new(std::io::stdout().lock()), args.format));
    }
    let mut probe = Probe::start(&settings).context("cannot start the profiler")?;
    let what = settings.targets.describe();
    let kind = args.sampling.kind();
    let started = std::time::Instant::now();
    let (dwarf, seen) = probe
        .profile
        .as_ref()
        .map_or((0, 0), |p| p.dwarf_processes());
    let start_line = match kind {
        ProfileKind::Cpu => format!(
            "sampling {what} at {} Hz for {}s ({} processes, {dwarf} unwound with DWARF; Ctrl-C to stop)",
            args.sampling.frequency,
            args.duration.as_secs_f64(),
            seen
        ),
        ProfileKind::OffCpu => format!(
            "measuring blocks of {what} over {} for {}s ({} processes; Ctrl-C to stop)",
            units::format_ns(settings.profile.offcpu_min_ns),
            args.duration.as_secs_f64(),
            seen
        ),
    };
    let Collected {
        interrupted,
        elapsed,
    } = collect(&mut probe, args.duration, &start_line, |probe| {
        let n = probe.profile.as_ref().map_or(0, |p| p.samples_so_far());
        match kind {
            ProfileKind::Cpu => format!("sampling {what}: {n} samples"),
            ProfileKind::OffCpu => format!("measuring blocks of {what}"),
        }
    })?;
    probe.profile_drain();
    let python = probe
        .profile
        .as_ref()
        .map(|p| ws1_probe::profile::python::describe(&p.python.processes()))
        .unwrap_or_default();
    let (cpu, off) = probe.profiles.since(started);
    let errors = probe.profiles.sym.errors();
    let profile = match kind {
        ProfileKind::Cpu => cpu,
        ProfileKind::OffCpu => off,
    };
    let runtimes = probe.profiles.runtime_shares(&profile);
    drop(probe);
    let title = match kind {
        ProfileKind::Cpu => format!("CPU profile of {what}, {:.1}s", elapsed.as_secs_f64()),
        ProfileKind::OffCpu => format!("off-CPU profile of {what}, {:.1}s", elapsed.as_secs_f64()),
    };
    for (out, format) in &mut outs {
        let bytes = render(&profile, *format, &title, args.rows)?;
        out.write_all(&bytes)
            .and_then(|()| out.flush())
            .context("cannot write the profile")?;
    }
    eprintln!(
        "{}{}: {}{}",
        title,
        if interrupted { " (interrupted)" } else { "" },
        summary(&profile, &runtimes),
        if args.outputs.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = args
                .outputs
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            format!(", written to {}", names.join(", "))
        }
    );
    if !python.is_empty() {
        eprintln!("{python}");
    }
    if errors > 0 {
        eprintln!("{errors} addresses could not be symbolized (kept as build id + offset)");
    }
    if profile.stacks.is_empty() {
        eprintln!(
            "no samples: the selected processes did not run{} during the window",
            if kind == ProfileKind::OffCpu {
                " into a block longer than --min-block"
            } else {
                " on a CPU"
            }
        );
    }
    Ok(())
}
