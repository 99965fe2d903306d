//! Applies a [`TargetSpec`] to processes and hands out service ids.

use std::collections::HashMap;

use ws1_probe_common::targets::{COMM_ENTRIES, SERVICE_OTHER};

use crate::hostlabels::KERNEL_LABEL;

use super::{
    ProcessInfo, Rule, TargetSpec,
    process::{Needs, cgroup_contains},
};

/// Service id ↔ label. Id 0 is `other`; configured services come next in file order; command
/// names (for comm-labeled rules and host mode) are added as they are first seen, up to a cap,
/// after which new names share `other`.
#[derive(Clone, Debug)]
pub struct ServiceTable {
    names: Vec<String>,
    by_name: HashMap<String, u32>,
    cap: usize,
    /// Names that got `SERVICE_OTHER` because the table was full.
    refused: u64,
}

impl ServiceTable {
    pub fn new(cap: usize) -> Self {
        let mut table = Self {
            names: Vec::new(),
            by_name: HashMap::new(),
            cap: cap.max(1),
            refused: 0,
        };
        table.intern("other");
        table
    }

    /// Id of `name`, allocating one if there is room; `SERVICE_OTHER` when full.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.by_name.get(name) {
            return *id;
        }
        if self.names.len() >= self.cap {
            self.refused += 1;
            return SERVICE_OTHER;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.by_name.insert(name.to_owned(), id);
        id
    }

    /// Label of a service id (`other` for ids it never handed out).
    pub fn name(&self, id: u32) -> &str {
        self.names.get(id as usize).map_or("other", String::as_str)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Capacity of the table (service ids it hands out, `other` included).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// How many times a new name got `other` because every id was taken.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Decides, for a process, whether it is observed and under which service id.
#[derive(Clone, Debug)]
pub struct Matcher {
    spec: TargetSpec,
    services: ServiceTable,
}

impl Matcher {
    pub fn new(spec: TargetSpec) -> Self {
        let mut services = ServiceTable::new(COMM_ENTRIES as usize);
        match &spec {
            TargetSpec::Rules(rules) => {
                for name in rules.iter().filter_map(|r| r.service.as_deref()) {
                    services.intern(name);
                }
            }
            // Every kernel thread shares one service in host mode.
            TargetSpec::Host => {
                services.intern(KERNEL_LABEL);
            }
        }
        Self { spec, services }
    }

    /// Replaces the rules (a configuration reload), keeping every id handed out so far: a
    /// service or command name keeps its id, and with it the counts the kernel holds for it.
    pub fn respec(&mut self, spec: TargetSpec) {
        if let TargetSpec::Rules(rules) = &spec {
            for name in rules.iter().filter_map(|r| r.service.as_deref()) {
                self.services.intern(name);
            }
        }
        self.spec = spec;
    }

    pub fn spec(&self) -> &TargetSpec {
        &self.spec
    }

    /// Ids of the configured (named) services, which always keep their own label.
    pub fn configured_ids(&self) -> Vec<u32> {
        match &self.spec {
            TargetSpec::Host => {
                let mut table = self.services.clone();
                vec![table.intern(KERNEL_LABEL)]
            }
            TargetSpec::Rules(rules) => {
                let mut table = self.services.clone();
                rules
                    .iter()
                    .filter_map(|r| r.service.as_deref())
                    .map(|name| table.intern(name))
                    .collect()
            }
        }
    }

    pub fn services(&self) -> &ServiceTable {
        &self.services
    }

    /// What must be read from /proc to decide.
    pub fn needs(&self) -> Needs {
        match &self.spec {
            TargetSpec::Host => Needs {
                kthread: true,
                ..Needs::default()
            },
            TargetSpec::Rules(rules) => Needs {
                exe: rules.iter().any(|r| r.exe.is_some()),
                cgroup: rules.iter().any(|r| r.cgroup.is_some()),
                kthread: false,
            },
        }
    }

    /// Whether every decision depends on the command name alone, so the kernel may cache it per
    /// comm and decide later execs of that name without asking the agent.
    pub fn comm_only(&self) -> bool {
        match &self.spec {
            TargetSpec::Host => true,
            TargetSpec::Rules(rules) => rules.iter().all(Rule::comm_only),
        }
    }

    /// Service id for the process, or `None` if it is not observed.
    pub fn decide(&mut self, p: &ProcessInfo) -> Option<u32> {
        let rule = match &self.spec {
            TargetSpec::Host if p.kthread => return Some(self.services.intern(KERNEL_LABEL)),
            TargetSpec::Host => return Some(self.services.intern(&p.comm)),
            TargetSpec::Rules(rules) => rules.iter().find(|r| rule_matches(r, p))?,
        };
        Some(match &rule.service {
            Some(name) => self.services.intern(name),
            None => self.services.intern(&p.comm),
        })
    }
}

fn rule_matches(rule: &Rule, p: &ProcessInfo) -> bool {
    if rule.pid.is_some_and(|pid| pid != p.pid) {
        return false;
    }
    if rule.comm.as_ref().is_some_and(|re| !re.is_match(&p.comm)) {
        return false;
    }
    if let Some(re) = &rule.exe {
        match &p.exe {
            Some(exe) if re.is_match(&exe.to_string_lossy()) => {}
            _ => return false,
        }
    }
    if let Some(cg) = &rule.cgroup {
        match &p.cgroup {
            Some(path) if cgroup_contains(cg, path) => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use regex::Regex;

    fn proc(pid: u32, comm: &str, exe: &str, cgroup: &str) -> ProcessInfo {
        ProcessInfo {
            pid,
            comm: comm.into(),
            exe: Some(exe.into()),
            cgroup: Some(cgroup.into()),
            kthread: false,
        }
    }

    #[test]
    fn host_mode_labels_by_comm() {
        let mut m = Matcher::new(TargetSpec::Host);
        let a = m.decide(&proc(1, "bash", "/bin/bash", "/")).unwrap();
        let b = m.decide(&proc(2, "nginx", "/usr/sbin/nginx", "/")).unwrap();
        assert_ne!(a, b);
        assert_eq!(m.decide(&proc(3, "bash", "/bin/bash", "/")), Some(a));
        assert_eq!(m.services().name(a), "bash");
        assert!(m.comm_only());
        let kworker = ProcessInfo {
            kthread: true,
            ..proc(4, "kworker/0:1", "", "/")
        };
        let ksoftirqd = ProcessInfo {
            kthread: true,
            ..proc(5, "ksoftirqd/0", "", "/")
        };
        let k = m.decide(&kworker).unwrap();
        assert_eq!(m.decide(&ksoftirqd), Some(k), "kernel threads are grouped");
        assert_eq!(m.services().name(k), "kernel");
        assert_eq!(m.configured_ids(), vec![k], "and keep their label");
    }

    #[test]
    fn config_rules_first_match_wins_and_all_fields_must_match() {
        let mut trading = Rule::labeled(Some("trading-engine".into()));
        trading.comm = Some(Regex::new("^trad").unwrap());
        trading.cgroup = Some("/system.slice/trading.service".into());
        let mut risk = Rule::labeled(Some("risk".into()));
        risk.exe = Some(Regex::new("/risk$").unwrap());
        let mut m = Matcher::new(TargetSpec::Rules(vec![trading, risk]));
        assert_eq!(m.services().name(1), "trading-engine");
        assert_eq!(m.services().name(2), "risk");
        assert_eq!(m.configured_ids(), vec![1, 2]);
        let cg = "/system.slice/trading.service";
        assert_eq!(m.decide(&proc(10, "trader", "/x", cg)), Some(1));
        assert_eq!(m.decide(&proc(11, "trader", "/x", "/user.slice")), None);
        assert_eq!(m.decide(&proc(12, "r", "/opt/risk", "/")), Some(2));
        assert_eq!(m.decide(&proc(13, "r", "/opt/risky", "/")), None);
        assert!(m.needs().exe && m.needs().cgroup);
        assert!(!m.comm_only());
    }

    #[test]
    fn cli_selectors_label_by_comm() {
        let mut pid = Rule::labeled(None);
        pid.pid = Some(42);
        let mut m = Matcher::new(TargetSpec::Rules(vec![pid]));
        let id = m.decide(&proc(42, "worker", "/w", "/")).unwrap();
        assert_eq!(m.services().name(id), "worker");
        assert_eq!(m.decide(&proc(43, "worker", "/w", "/")), None);
        assert!(!m.comm_only());

        let mut comm = Rule::labeled(None);
        comm.comm = Some(Regex::new("^redis").unwrap());
        let m = Matcher::new(TargetSpec::Rules(vec![comm]));
        assert!(m.comm_only());
    }

    #[test]
    fn service_table_caps_into_other() {
        let mut t = ServiceTable::new(3);
        assert_eq!(t.intern("a"), 1);
        assert_eq!(t.intern("b"), 2);
        assert_eq!(t.intern("c"), SERVICE_OTHER);
        assert_eq!(t.intern("a"), 1);
        assert_eq!(t.refused(), 1);
        assert_eq!(t.name(SERVICE_OTHER), "other");
        assert_eq!(t.name(99), "other");
    }
}
