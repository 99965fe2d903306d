//! `ws1-probe check`: which hooks this kernel allows and which collector will use which.

use std::process::ExitCode;

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
    if args.json {
        let json = JsonReport {
            report: &report,
            can_run: verdict.is_ok(),
            problem: verdict.clone().err(),
        };
        let text = serde_json::to_string_pretty(&json).context("cannot encode the report")?;
        println!("{text}");
    } else {
        print!("{}", report.render_text());
    }
    Ok(if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
