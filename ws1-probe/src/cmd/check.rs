//! `ws1-probe check`: which hooks this kernel allows and which collector will use which.

use std::{io::Write as _, process::ExitCode};

use anyhow::Context as _;
use serde::Serialize;
use ws1_probe::{
    allocator::{self, Inspection},
    check::{self, CheckReport},
    report::leaks::render_allocators,
};

/// Report which hooks this kernel allows
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Also say which allocator this process uses and which of its entry points precise
    /// allocation tracing (`leaks`, `allocs`, `--precise-alloc`) would hook, and whether the
    /// profiler gets Python stacks from it; repeatable
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
}

/// The JSON form: the report's fields, then the verdict.
#[derive(Serialize)]
struct JsonReport<'a> {
    #[serde(flatten)]
    report: &'a CheckReport,
    can_run: bool,
    problem: Option<String>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    allocators: std::collections::BTreeMap<u32, Inspection>,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    python: std::collections::BTreeMap<u32, String>,
}

/// The allocator of each pid, or why it cannot be inspected.
fn allocators(pids: &[u32]) -> std::collections::BTreeMap<u32, Inspection> {
    pids.iter()
        .map(|&pid| {
            let found =
                allocator::inspect(pid, &allocator::Override::default()).unwrap_or_else(|err| {
                    Inspection::NotObserved {
                        reason: format!("{err}: is pid {pid} running?"),
                    }
                });
            (pid, found)
        })
        .collect()
}

/// Prints the report; exit code 0 when the agent can run here, 1 otherwise.
pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let report = check::run_checks();
    let verdict = report.can_run();
    let allocators = allocators(&args.pids);
    let python: std::collections::BTreeMap<u32, String> = args
        .pids
        .iter()
        .map(|&pid| (pid, ws1_probe::profile::python::inspect(pid)))
        .collect();
    let text = if args.json {
        let json = JsonReport {
            report: &report,
            can_run: verdict.is_ok(),
            problem: verdict.clone().err(),
            allocators,
            python,
        };
        serde_json::to_string_pretty(&json).context("cannot encode the report")? + "\n"
    } else if allocators.is_empty() {
        report.render_text()
    } else {
        let python: String = python
            .iter()
            .map(|(pid, what)| format!("  pid {pid}: {what}\n"))
            .collect();
        format!(
            "{}\nallocators (precise allocation tracing):\n{}\nPython stacks (profiler):\n{python}",
            report.render_text(),
            render_allocators(&allocators)
        )
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
