//! `ws1-sim`: the WS1 workload simulator. Four services (`agent-ops`, `trading-engine`,
//! `risk`, `memory-ops`), each its own process under its own command name, call each other
//! over loopback TCP; the trading engine runs pgbench's simple-update transaction against a
//! private PostgreSQL; users drive it at a set rate. Fault switches make one metric of the
//! agent move (and its alert fire). It counts every exchange the way the agent does, so the
//! agent's request counts can be checked exactly.
//!
//! ```text
//! ws1-sim pg-start DIR                      # a private cluster with the pgbench tables
//! ws1-sim run --db-dir DIR --rps 200 --users 20 --duration 60 [--fault latency]...
//! ws1-sim pg-stop DIR
//! ```

mod pg;
mod proto;
mod serve;
mod stats;
mod supervise;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ws1-sim", about = "WS1 workload simulator")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the services and the users; print exact request counts at the end.
    Run(supervise::RunArgs),
    /// Start a private PostgreSQL cluster under DIR (as the postgres user) with pgbench's
    /// tables at scale 1; prints `port N`.
    PgStart { dir: PathBuf },
    /// Stop the cluster under DIR and remove DIR.
    PgStop { dir: PathBuf },
    /// One service process (started by `run`).
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => supervise::run(args),
        Cmd::PgStart { dir } => pg::start(&dir).map(|port| println!("port {port}")),
        Cmd::PgStop { dir } => pg::stop(&dir),
        Cmd::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
