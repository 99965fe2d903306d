//! Developer tasks for ws1-probe: `cargo xtask <bootstrap|build|run|test|demo|bench>`.
//! Every subcommand bootstraps the toolchain first, so a fresh checkout needs only rustup.

mod apt;
mod bench;
mod bench_alloc;
mod bench_block;
mod bench_health;
mod bench_load;
mod bench_net;
mod bench_profile;
mod bench_python;
mod bench_scale;
mod bench_sched;
mod bench_scrape;
mod bench_soak;
mod bench_util;
mod bootstrap;
mod demo;
mod run;
mod tools;
mod util;

use std::{env, ffi::OsString, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "ws1-probe developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check/install nightly + rust-src and bpf-linker linked against nightly's libLLVM.
    Bootstrap,
    /// Build the agent (and its eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build the agent (release) and run `ws1-probe agent <args>` as root.
    Run {
        /// Run the agent with debug logging (WS1_PROBE_LOG=debug).
        #[arg(long)]
        debug: bool,
        /// Arguments for `ws1-probe agent`, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Unit tests, then privileged integration tests when root.
    Test {
        /// Extra arguments for the integration test binary (e.g. test name filters), after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The WS1 workload simulator under the agent, with Prometheus and Alertmanager (as root).
    Demo(demo::DemoArgs),
    /// Run a benchmark as root.
    Bench {
        /// Which benchmark (e.g. syscalls).
        what: String,
        /// Arguments for the benchmark, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A load process of `bench scale` (started by it, not by hand).
    #[command(hide = true)]
    ScaleWorker { args: Vec<String> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the chain reads "<missing piece>: <fix>" and the failing command's
            // output is already on the terminal above it.
            let msg = format!("{err:#}");
            eprintln!(
                "error: {}",
                msg.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Cmd) -> Result<()> {
    match command {
        Cmd::Bootstrap => bootstrap::run(),
        Cmd::Build { release } => run::build(release),
        Cmd::Run { debug, args } => run::run(debug, &args),
        Cmd::Test { args } => run::test(&args),
        Cmd::Demo(args) => {
            bootstrap::run()?;
            as_root()?;
            demo::run(&args)
        }
        Cmd::Bench { what, args } => {
            bootstrap::run()?;
            as_root()?;
            bench::run(&what, &args)
        }
        Cmd::ScaleWorker { args } => bench_scale::worker(&args),
    }
}

/// Re-runs this same xtask command as root unless it is root; the marker skips a second
/// bootstrap, whose toolchain belongs to this user and may not exist for root.
fn as_root() -> Result<()> {
    if !util::is_root()? {
        let exe = env::current_exe()?;
        let args: Vec<OsString> = env::args_os().skip(1).collect();
        let marker = (util::BOOTSTRAPPED_ENV, OsString::from("1"));
        return Err(util::exec_as_root(&exe, &args, &[marker]));
    }
    Ok(())
}
