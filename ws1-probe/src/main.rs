//! `ws1-probe`: command-line front end. Each subcommand lives in `cmd/`; the work is done by the
//! library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

/// eBPF profiler and metrics agent for WS1 services.
#[derive(Parser, Debug)]
#[command(name = "ws1-probe", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing EnvFilter syntax), e.g. `debug` or `ws1_probe=trace`
    #[arg(long, global = true, env = "WS1_PROBE_LOG", default_value = "info")]
    log: String,
    /// Log line format on stderr: `text` for people, `json` for log shippers (one object per
    /// line with timestamp, level, target and fields)
    #[arg(
        long,
        global = true,
        env = "WS1_PROBE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: attach collectors and serve /metrics, /healthz and /readyz
    Agent(cmd::agent::AgentArgs),
    /// Collect syscall latency for a while and print a table sorted by total time
    Syscalls(cmd::syscalls::SyscallsArgs),
    /// Collect TCP connections, RTT, request latency and connection reuse per endpoint
    Net(cmd::net::NetArgs),
    /// Trace allocations of the selected processes and report blocks still outstanding, by stack
    Leaks(cmd::leaks::LeaksArgs),
    /// Trace allocations of the selected processes: rate, size histogram, top allocating stacks
    Allocs(cmd::allocs::AllocsArgs),
    /// Sample where the selected processes spend CPU time (or block, with --off-cpu): folded
    /// stacks, SVG flame graph, pprof or a table
    Profile(cmd::profile::ProfileArgs),
    /// Live view of the hottest functions of the selected processes (q or Ctrl-C quits)
    Top(cmd::top::TopArgs),
    /// One screen of service health: CPU, memory, threads, fds, latency p99s, exits
    Health(cmd::health::HealthArgs),
    /// Print Prometheus recording and alerting rules (SLO burn rates, thresholds, the agent's
    /// own) for a config file
    Rules(cmd::rules::RulesArgs),
    /// Attainment, error budget left and burn rate of each service's SLO, from Prometheus over
    /// a window or from the agent since it started
    Slo(cmd::slo::SloArgs),
    /// Report which hooks this kernel allows and which collector will use which
    Check(cmd::check::CheckArgs),
    /// Attach empty sys_enter/sys_exit programs (the cost floor for `cargo xtask bench`)
    #[command(hide = true)]
    BenchFloor(cmd::floor::FloorArgs),
    /// Symbolize function addresses of this binary, cold and warm (for `cargo xtask bench`)
    #[command(hide = true)]
    BenchSymbolize(cmd::symbench::SymbenchArgs),
    /// Render N series of /metrics and time it (for `cargo xtask bench scrape`)
    #[command(hide = true)]
    BenchScrape(cmd::scrapebench::ScrapebenchArgs),
    /// Time the procfs sampling of host mode (for `cargo xtask bench health`)
    #[command(hide = true)]
    BenchHealth(cmd::benchhealth::BenchHealthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = cli.log_format == LogFormat::Json;
    if json {
        // One object per line: {"timestamp","level","fields":{"message",...},"target"}.
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        Command::Agent(args) => cmd::agent::run(args).map(|()| ExitCode::SUCCESS),
        Command::Syscalls(args) => cmd::syscalls::run(args).map(|()| ExitCode::SUCCESS),
        Command::Net(args) => cmd::net::run(args).map(|()| ExitCode::SUCCESS),
        Command::Leaks(args) => cmd::leaks::run(args).map(|()| ExitCode::SUCCESS),
        Command::Allocs(args) => cmd::allocs::run(args).map(|()| ExitCode::SUCCESS),
        Command::Profile(args) => cmd::profile::run(args).map(|()| ExitCode::SUCCESS),
        Command::Top(args) => cmd::top::run(args).map(|()| ExitCode::SUCCESS),
        Command::Health(args) => cmd::health::run(args).map(|()| ExitCode::SUCCESS),
        Command::Rules(args) => cmd::rules::run(args).map(|()| ExitCode::SUCCESS),
        Command::Slo(args) => cmd::slo::run(args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => cmd::check::run(args),
        Command::BenchFloor(args) => cmd::floor::run(args).map(|()| ExitCode::SUCCESS),
        Command::BenchSymbolize(args) => cmd::symbench::run(args).map(|()| ExitCode::SUCCESS),
        Command::BenchScrape(args) => cmd::scrapebench::run(args).map(|()| ExitCode::SUCCESS),
        Command::BenchHealth(args) => cmd::benchhealth::run(args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            // One line: the context chain joined with ": " (in JSON mode an error event, so
            // every stderr line stays one JSON object).
            if json {
                tracing::error!("{err:#}");
            } else {
                eprintln!("error: {err:#}");
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// clap's own consistency checks (e.g. two arguments with one long name, which a release
    /// build would not report and would silently give one of them no value).
    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
