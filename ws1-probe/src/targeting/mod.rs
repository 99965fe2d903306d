//! Which processes the collectors observe, and under which `service` label.
//!
//! Raw inputs (CLI selectors, the TOML config file, environment) are parsed in [`selector`] and
//! [`config`], resolved into one [`TargetSpec`], and applied to processes by [`Matcher`]. The
//! kernel side (tgid → service id map) is kept by `collectors::targets`.

pub mod config;
pub mod container;
pub mod matcher;
pub mod process;
pub mod selector;

pub use matcher::{Matcher, ServiceTable};
pub use process::ProcessInfo;

use regex::Regex;

/// One way a process can be selected. All present fields must match (AND).
#[derive(Clone, Debug)]
pub struct Rule {
    /// Service label; `None` labels matching processes by their command name.
    pub service: Option<String>,
    pub pid: Option<u32>,
    /// Regex searched in the command name (`/proc/PID/comm`, at most 15 bytes).
    pub comm: Option<Regex>,
    /// Regex searched in the executable path (`/proc/PID/exe`).
    pub exe: Option<Regex>,
    /// cgroup v2 path, e.g. `/system.slice/trading.service`; descendants match too.
    pub cgroup: Option<String>,
}

impl Rule {
    /// A rule with no condition, to fill in.
    pub fn labeled(service: Option<String>) -> Self {
        Self {
            service,
            pid: None,
            comm: None,
            exe: None,
            cgroup: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pid.is_none() && self.comm.is_none() && self.exe.is_none() && self.cgroup.is_none()
    }

    /// Whether this rule's decision depends on the command name alone.
    pub fn comm_only(&self) -> bool {
        self.comm.is_some() && self.pid.is_none() && self.exe.is_none() && self.cgroup.is_none()
    }
}

/// What to observe.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// No selector and no configured service: every process, labeled by command name (the
    /// exporter keeps the 20 most active names and folds the rest into `other`).
    Host,
    /// Processes matching any rule (first match wins).
    Rules(Vec<Rule>),
}

impl TargetSpec {
    pub fn is_host(&self) -> bool {
        matches!(self, Self::Host)
    }

    /// A one-line description for logs and progress lines.
    pub fn describe(&self) -> String {
        match self {
            Self::Host => "all processes (no selector given)".to_owned(),
            Self::Rules(rules) => {
                let parts: Vec<String> = rules.iter().map(describe_rule).collect();
                parts.join(" or ")
            }
        }
    }
}

fn describe_rule(rule: &Rule) -> String {
    let mut conds = Vec::new();
    if let Some(pid) = rule.pid {
        conds.push(format!("pid {pid}"));
    }
    if let Some(comm) = &rule.comm {
        conds.push(format!("comm ~ /{comm}/"));
    }
    if let Some(exe) = &rule.exe {
        conds.push(format!("exe ~ /{exe}/"));
    }
    if let Some(cgroup) = &rule.cgroup {
        conds.push(format!("cgroup {cgroup}"));
    }
    let conds = conds.join(" and ");
    match &rule.service {
        Some(name) => format!("{name} ({conds})"),
        None => conds,
    }
}
