//! `ws1-probe check`: which hooks this kernel allows and which collector will use which.

use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;
use serde::Serialize;
use ws1_probe::check::{self, CheckReport};

/// Report which hooks this kernel allows
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// The JSON form: the report's fields, then the verdict.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a CheckReport,
    can_run: bool,
    problem: Option<String>,
}

/// Prints the report; exit code 0 when the agent can run here, 1 otherwise.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let report = check::run_checks();
    let verdict = report.can_run();
    let text = if args.json {
        let json = JsonReport {
            report: &report,
            can_run: verdict.is_ok(),
            problem: verdict.clone().err(),
        };
        serde_json::to_string_pretty(&json).context("cannot encode the report")? + "\n"
    } else {
        report.render_text()
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A closed pipe (`| head`) is not an error worth reporting.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(e).context("cannot write the report");
        }
        _ => {}
    }
    Ok(if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
