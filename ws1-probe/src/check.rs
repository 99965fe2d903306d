//! `ws1-probe check`: learns which hooks this kernel allows by loading and attaching the empty
//! `check_*` programs of the embedded object (links are dropped right away), and plans which
//! collector can run. Planning and the verdict are pure, so they unit-test without root.

use std::{collections::BTreeMap, error::Error, io, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::MapType,
    programs::{
        BtfTracePoint, FEntry, KProbe, PerfEvent, Program, ProgramError, RawTracePoint, TracePoint,
        UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::UProbeScope,
    },
};
use serde::Serialize;
use ws1_probe_common::check as progs;

use crate::{
    ebpf::{self, TRACEFS},
    preflight::{self, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, Capabilities, PreflightError},
};

/// Every hook kind probed, in report order, separated by spaces.
pub const HOOKS: &str = "tracepoint raw_tp tp_btf kprobe fentry uprobe perf_event ringbuf";
/// Hook kinds the agent cannot run without, with the fix when one is missing.
const REQUIRED: [(&str, &str); 3] = [
    ("tracepoint", "needs a kernel built with CONFIG_BPF_EVENTS"),
    ("raw_tp", "needs linux 4.17+ built with CONFIG_BPF_EVENTS"),
    ("ringbuf", "needs linux 5.8+ for BPF ring buffers"),
];
const NO_EVENTS: &str = "kernel built without CONFIG_BPF_EVENTS?";
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const LOCKDOWN: &str = "/sys/kernel/security/lockdown";

/// A collector and the hooks it attaches, each written `<kind> [<attach point>]`.
pub struct CollectorNeeds {
    pub name: &'static str,
    pub hooks: &'static [&'static str],
}

pub const COLLECTORS: &[CollectorNeeds] = &[
    CollectorNeeds {
        name: "targeting",
        hooks: &[
            "tracepoint task:task_newtask",
            "tracepoint sched:sched_process_exec",
            "tracepoint sched:sched_process_exit",
            "ringbuf",
        ],
    },
    CollectorNeeds {
        name: "syscalls",
        hooks: &["raw_tp sys_enter", "raw_tp sys_exit"],
    },
    CollectorNeeds {
        name: "memory",
        hooks: &["perf_event software page-faults"],
    },
    CollectorNeeds {
        name: "profile",
        hooks: &[
            "perf_event software cpu-clock",
            "raw_tp sched_switch",
            "tracepoint sched:sched_switch",
            "raw_tp sys_exit",
            "ringbuf",
        ],
    },
    CollectorNeeds {
        name: "alloc",
        hooks: &["uprobe libc malloc family", "uprobe libc free"],
    },
];

/// Whether a hook (or a facility: btf, tracefs) works here; `detail` says how or why not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookStatus {
    pub hook: &'static str,
    pub available: bool,
    pub detail: String,
}

impl HookStatus {
    pub fn new(hook: &'static str, result: Result<String, String>) -> Self {
        Self {
            hook,
            available: result.is_ok(),
            detail: result.unwrap_or_else(|e| e),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CollectorPlan {
    pub name: &'static str,
    pub hooks: Vec<&'static str>,
    pub available: bool,
    /// `ok`, or `unavailable: <failed hook kinds>`.
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub kernel: String,
    pub btf: HookStatus,
    pub lockdown: String,
    /// CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN: present or not.
    pub capabilities: BTreeMap<&'static str, bool>,
    /// What is missing to load tracing programs, if anything.
    pub missing_capabilities: Option<String>,
    pub tracefs: HookStatus,
    pub hooks: Vec<HookStatus>,
    pub collectors: Vec<CollectorPlan>,
}

/// Which collectors can run, given the probed hooks.
pub fn plan_collectors(hooks: &[HookStatus]) -> Vec<CollectorPlan> {
    let works = |kind: &str| hooks.iter().any(|s| s.hook == kind && s.available);
    COLLECTORS
        .iter()
        .map(|c| {
            let mut failed: Vec<&str> = Vec::new();
            for kind in c.hooks.iter().filter_map(|h| h.split(' ').next()) {
                if !works(kind) && !failed.contains(&kind) {
                    failed.push(kind);
                }
            }
            let detail = match failed.is_empty() {
                true => "ok".to_owned(),
                false => format!("unavailable: {}", failed.join(", ")),
            };
            CollectorPlan {
                name: c.name,
                hooks: c.hooks.to_vec(),
                available: failed.is_empty(),
                detail,
            }
        })
        .collect()
}

/// The attach points the collectors use for one hook kind.
fn collector_points(kind: &str) -> impl Iterator<Item = &'static str> {
    let hooks = COLLECTORS.iter().flat_map(|c| c.hooks.iter());
    hooks.filter_map(move |h| h.strip_prefix(kind)?.strip_prefix(' '))
}

impl CheckReport {
    /// Whether the agent can run here; the error says why and how to fix it.
    pub fn can_run(&self) -> Result<(), String> {
        if let Some(missing) = self.missing_capabilities.clone() {
            return Err(PreflightError::Capabilities { missing }.to_string());
        }
        if !self.tracefs.available {
            return Err(self.tracefs.detail.clone());
        }
        for (kind, fix) in REQUIRED {
            match self.hooks.iter().find(|h| h.hook == kind) {
                Some(h) if h.available => {}
                Some(h) => return Err(format!("{kind} unavailable ({}): {fix}", h.detail)),
                None => return Err(format!("{kind} was not probed: {fix}")),
            }
        }
        Ok(())
    }

    /// Aligned tables (system, hooks, collectors), then a verdict line.
    pub fn render_text(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" }.to_owned();
        let row = |a: &str, b: String, c: &str| [a.to_owned(), b, c.to_owned()];
        let hook = |h: &HookStatus| row(h.hook, yes(h.available), &h.detail);
        let mut system = vec![row("kernel", self.kernel.clone(), ""), hook(&self.btf)];
        system.push(row("lockdown", self.lockdown.clone(), ""));
        let caps = self.capabilities.iter();
        system.extend(caps.map(|(name, has)| row(name, yes(*has), "")));
        system.push(hook(&self.tracefs));
        let mut hooks = vec![row("HOOK", "AVAILABLE".to_owned(), "DETAIL")];
        hooks.extend(self.hooks.iter().map(hook));
        let mut collectors = vec![row("COLLECTOR", "STATUS".to_owned(), "HOOKS")];
        let plans = self.collectors.iter();
        collectors.extend(plans.map(|c| row(c.name, c.detail.clone(), &c.hooks.join(", "))));
        let all = [system, hooks, collectors];
        let first = all.iter().flatten().map(|r| r[0].len()).max().unwrap_or(0);
        let mut out = String::new();
        for table in &all {
            // Values with nothing after them (kernel, lockdown) do not widen the column.
            let filled = table.iter().filter(|r| !r[2].is_empty());
            let second = filled.map(|r| r[1].len()).max().unwrap_or(0);
            for [a, b, c] in table {
                out.push_str(format!("{a:<first$}  {b:<second$}  {c}").trim_end());
                out.push('\n');
            }
            out.push('\n');
        }
        match self.can_run() {
            Ok(()) => out.push_str("ok: the agent can run on this kernel\n"),
            Err(why) => out.push_str(&format!("cannot run the agent: {why}\n")),
        }
        out
    }
}

/// Probes this kernel for real. Needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to probe hooks;
/// without them the hooks are reported as not probed.
pub fn run_checks() -> CheckReport {
    let caps = Capabilities::current().unwrap_or(Capabilities(0));
    let names = [("CAP_BPF", CAP_BPF), ("CAP_PERFMON", CAP_PERFMON)];
    let names = names.into_iter().chain([("CAP_SYS_ADMIN", CAP_SYS_ADMIN)]);
    let missing_capabilities = caps.missing_for_tracing();
    // Parsed once, shared by the loader and both BTF-typed programs.
    let parsed = Btf::from_sys_fs();
    let btf = match &parsed {
        Ok(_) => Ok(BTF_PATH.to_owned()),
        Err(_) if !Path::new(BTF_PATH).exists() => Err(format!(
            "{BTF_PATH} is absent (kernel built without CONFIG_DEBUG_INFO_BTF?)"
        )),
        Err(err) => Err(format!("cannot parse {BTF_PATH}: {}", chain(err))),
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // /sys/kernel/tracing is root-only: a mounted tracefs looks absent to other users.
    let unreadable = missing_capabilities.is_some() && mounts.contains(" /sys/kernel/tracing ");
    let tracefs = match preflight::ensure_tracefs() {
        Ok(()) => Ok(TRACEFS.to_owned()),
        Err(_) if unreadable => Err(format!("{TRACEFS} is mounted but unreadable by this user")),
        Err(e) => Err(e.to_string()),
    };
    let hooks = match missing_capabilities {
        Some(_) => not_probed("not probed: missing capabilities"),
        None => probe_hooks(parsed.as_ref().ok()),
    };
    CheckReport {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_owned()),
        btf: HookStatus::new("btf", btf),
        lockdown: lockdown(),
        capabilities: names.map(|(name, cap)| (name, caps.has(cap))).collect(),
        missing_capabilities,
        tracefs: HookStatus::new("tracefs", tracefs),
        collectors: plan_collectors(&hooks),
        hooks,
    }
}

fn not_probed(why: &str) -> Vec<HookStatus> {
    let status = |hook| HookStatus::new(hook, Err(why.to_owned()));
    HOOKS.split(' ').map(status).collect()
}

/// Loads the object once and tries each hook kind; every link is dropped with the object.
fn probe_hooks(btf: Option<&Btf>) -> Vec<HookStatus> {
    preflight::raise_memlock();
    let ringbuf = match aya::sys::is_map_supported(MapType::RingBuf) {
        Ok(true) => Ok("BPF_MAP_TYPE_RINGBUF supported".to_owned()),
        Ok(false) => Err("BPF_MAP_TYPE_RINGBUF not supported by this kernel".to_owned()),
        Err(err) => Err(format!("probe failed: {}", chain(&err))),
    };
    // aya 0.14's `EbpfLoader::new` parses BTF itself; ours replaces it for the relocations.
    // Unsupported maps are tolerated so that the program probes still run.
    let mut loader = EbpfLoader::new();
    let mut ebpf = match loader.btf(btf).allow_unsupported_maps().load(ebpf::OBJECT) {
        Ok(ebpf) => ebpf,
        Err(err) => {
            let why = format!("not probed: cannot load the eBPF object: {}", chain(&err));
            let hooks = not_probed(&why).into_iter().filter(|h| h.hook != "ringbuf");
            return hooks.chain([HookStatus::new("ringbuf", ringbuf)]).collect();
        }
    };
    let btf = btf.ok_or_else(|| "not probed: no kernel BTF".to_owned());
    let hooks = vec![
        HookStatus::new("tracepoint", probe_tracepoint(&mut ebpf)),
        HookStatus::new("raw_tp", probe_raw_tp(&mut ebpf)),
        HookStatus::new("tp_btf", btf.clone().and_then(|b| tp_btf(&mut ebpf, b))),
        HookStatus::new("kprobe", probe_kprobe(&mut ebpf)),
        HookStatus::new("fentry", btf.and_then(|b| probe_fentry(&mut ebpf, b))),
        HookStatus::new("uprobe", probe_uprobe(&mut ebpf)),
        HookStatus::new("perf_event", probe_perf_event(&mut ebpf)),
        HookStatus::new("ringbuf", ringbuf),
    ];
    drop(ebpf); // detaches every link and unloads the programs
    hooks
}

/// The named program, loaded by `load`.
fn loaded<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &str,
    load: impl FnOnce(&mut T) -> Result<(), ProgramError>,
) -> Result<&'a mut T, String>
where
    &'a mut T: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| {
        format!("program {name} is missing from the eBPF object (rebuild with `cargo xtask build`)")
    })?;
    let prog: Result<&mut T, _> = prog.try_into();
    let prog = prog.map_err(|e| format!("program {name}: {}", chain(&e)))?;
    match load(prog) {
        Ok(()) => Ok(prog),
        Err(ProgramError::LoadError {
            io_error,
            verifier_log,
        }) => {
            let log = ebpf::log_tail(&verifier_log.to_string(), 2);
            let log = (!log.starts_with("(empty")).then(|| format!(" (verifier: {log})"));
            let log = log.unwrap_or_default();
            Err(format!("load refused: {}{log}", os_text(&io_error)))
        }
        Err(err) => Err(format!("load failed: {}", chain(&err))),
    }
}

/// Attaches to each point in turn; the first failure names its point.
fn attach_each(
    points: &[&str],
    mut attach: impl FnMut(&str) -> Result<(), ProgramError>,
) -> Result<String, String> {
    for point in points {
        attach(point).map_err(|e| format!("{point}: {}", attach_failure(&e, NO_EVENTS)))?;
    }
    Ok(format!("attached to {}", points.join(", ")))
}

fn probe_tracepoint(ebpf: &mut Ebpf) -> Result<String, String> {
    let prog = loaded(ebpf, progs::PROBE_TRACEPOINT, TracePoint::load)?;
    let first = "sched:sched_process_exit";
    let mut points = vec![first];
    points.extend(collector_points("tracepoint").filter(|p| *p != first));
    attach_each(&points, |point| {
        let (category, name) = point.split_once(':').unwrap_or(("", point));
        prog.attach(category, name).map(drop)
    })
}

fn probe_raw_tp(ebpf: &mut Ebpf) -> Result<String, String> {
    let prog = loaded(ebpf, progs::PROBE_RAW_TP, RawTracePoint::load)?;
    let mut points = vec!["sched_process_exit"];
    points.extend(collector_points("raw_tp"));
    attach_each(&points, |point| prog.attach(point).map(drop))
}

fn tp_btf(ebpf: &mut Ebpf, btf: &Btf) -> Result<String, String> {
    let load = |p: &mut BtfTracePoint| p.load("sched_process_exit", btf);
    let link = loaded(ebpf, progs::PROBE_TP_BTF, load)?.attach();
    let hint = "kernel built without CONFIG_DEBUG_INFO_BTF?";
    attached(link, hint, "sched_process_exit")
}

fn probe_kprobe(ebpf: &mut Ebpf) -> Result<String, String> {
    let link = loaded(ebpf, progs::PROBE_KPROBE, KProbe::load)?.attach("do_exit", 0);
    attached(link, "kernel built without CONFIG_KPROBES?", "do_exit")
}

fn probe_fentry(ebpf: &mut Ebpf, btf: &Btf) -> Result<String, String> {
    let load = |p: &mut FEntry| p.load("do_exit", btf);
    let link = loaded(ebpf, progs::PROBE_FENTRY, load)?.attach();
    let hint = "kernel built without CONFIG_DYNAMIC_FTRACE_WITH_DIRECT_CALLS?";
    attached(link, hint, "do_exit")
}

fn probe_uprobe(ebpf: &mut Ebpf) -> Result<String, String> {
    let prog = loaded(ebpf, progs::PROBE_UPROBE, UProbe::load)?;
    let link = prog.attach("getpid", "libc", UProbeScope::CallingProcess);
    let hint = "kernel built without CONFIG_UPROBE_EVENTS?";
    attached(link, hint, "libc getpid (this process only)")
}

fn probe_perf_event(ebpf: &mut Ebpf) -> Result<String, String> {
    let prog = loaded(ebpf, progs::PROBE_PERF_EVENT, PerfEvent::load)?;
    let config = PerfEventConfig::Software(SoftwareEvent::CpuClock);
    let scope = PerfEventScope::AllProcessesOneCpu { cpu: 0 };
    let link = prog.attach(config, scope, SamplePolicy::Frequency(1), false);
    let hint = "check /proc/sys/kernel/perf_event_paranoid";
    attached(link, hint, "software cpu-clock on cpu 0 at 1 Hz")
}

fn attached<L>(link: Result<L, ProgramError>, hint: &str, what: &str) -> Result<String, String> {
    link.map(|_| format!("attached to {what}"))
        .map_err(|e| attach_failure(&e, hint))
}

/// One line for a failed attach: a refusal (EPERM/EACCES) by itself, anything else with `hint`.
pub fn attach_failure(err: &(dyn Error + 'static), hint: &str) -> String {
    let io = sources(err).find_map(|e| e.downcast_ref::<io::Error>());
    match io {
        Some(io) if matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
            format!("attach refused: {}", os_text(io))
        }
        _ => format!("attach failed: {} ({hint})", chain(err)),
    }
}

fn sources<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&e| e.source())
}

/// `Operation not permitted` rather than `Operation not permitted (os error 1)`.
fn os_text(err: &io::Error) -> String {
    let text = err.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_owned()
}

/// An error and its sources on one line, without the repeats `#[error(transparent)]` makes.
fn chain(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in sources(err) {
        let io = e.downcast_ref::<io::Error>();
        let text = io.map_or_else(|| e.to_string(), os_text);
        if parts.last() != Some(&text) && !text.is_empty() {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// The lockdown mode, or why it is unknown.
fn lockdown() -> String {
    preflight::lockdown_mode().unwrap_or_else(|| match Path::new(LOCKDOWN).exists() {
        true => format!("unknown (cannot read {LOCKDOWN})"),
        false => "unknown (securityfs not mounted, or no lockdown lsm)".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use aya::sys::SyscallError;

    use super::*;

    /// Every hook available except those in `down`.
    fn hooks(down: &[&str]) -> Vec<HookStatus> {
        let result = |h| (!down.contains(&h)).then(|| "y".into()).ok_or("x".into());
        let status = |h| HookStatus::new(h, result(h));
        HOOKS.split(' ').map(status).collect()
    }

    fn report(down: &[&str]) -> CheckReport {
        let hooks = hooks(down);
        CheckReport {
            kernel: "6.8.0".to_owned(),
            btf: HookStatus::new("btf", Ok(BTF_PATH.to_owned())),
            lockdown: "none".to_owned(),
            capabilities: [("CAP_BPF", true)].into(),
            missing_capabilities: None,
            tracefs: HookStatus::new("tracefs", Ok(TRACEFS.to_owned())),
            collectors: plan_collectors(&hooks),
            hooks,
        }
    }

    #[test]
    fn plans() {
        let all = plan_collectors(&hooks(&[]));
        assert!(all.iter().all(|c| c.available && c.detail == "ok"));
        assert_eq!(all[1].hooks, ["raw_tp sys_enter", "raw_tp sys_exit"]);
        let some = plan_collectors(&hooks(&["ringbuf", "tracepoint", "kprobe"]));
        assert_eq!(some[0].detail, "unavailable: tracepoint, ringbuf");
        assert!(!some[0].available && some[1].available);
        assert_eq!(plan_collectors(&[])[1].detail, "unavailable: raw_tp");
    }

    #[test]
    fn verdict() {
        let err = |down: &[&str]| report(down).can_run().unwrap_err();
        let ok = |down: &[&str]| report(down).can_run().is_ok();
        assert!(ok(&[]) && ok(&["kprobe", "fentry", "tp_btf", "uprobe", "perf_event"]));
        assert!(err(&["raw_tp"]).starts_with("raw_tp unavailable (x): needs linux 4.17+"));
        assert!(err(&["ringbuf"]).contains("ring buffers"));
        let mut r = report(&[]);
        r.hooks = not_probed("not probed: missing capabilities");
        r.missing_capabilities = Capabilities(0).missing_for_tracing();
        assert!(r.can_run().unwrap_err().contains("CAP_BPF and CAP_PERFMON"));
        let text = r.render_text();
        assert!(text.contains("\ntracepoint  no         not probed: missing capabilities\n"));
        let last = text.lines().last().unwrap_or_default();
        assert!(last.starts_with("cannot run the agent: missing") && last.contains("sudo setcap"));
        r.missing_capabilities = None;
        let why = r.can_run().unwrap_err();
        assert!(why.starts_with("tracepoint unavailable (not probed"));
        let mut r = report(&[]);
        r.tracefs = HookStatus::new("tracefs", Err("tracefs is not mounted".into()));
        assert_eq!(r.can_run(), Err("tracefs is not mounted".into()));
    }

    #[test]
    fn text_and_json() {
        let text = report(&["kprobe"]).render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "kernel      6.8.0");
        assert_eq!(lines[1], "btf         yes  /sys/kernel/btf/vmlinux");
        assert!(lines.contains(&"kprobe      no         x"));
        assert!(lines.contains(&"syscalls    ok      raw_tp sys_enter, raw_tp sys_exit"));
        assert_eq!(lines.last(), Some(&"ok: the agent can run on this kernel"));
        let json = serde_json::to_value(report(&[])).unwrap_or_default();
        assert_eq!(json["hooks"][7]["hook"], "ringbuf");
        assert_eq!(json["collectors"][0]["available"], true);
    }

    #[test]
    fn attach_failures() {
        let err = |errno| {
            let io_error = io::Error::from_raw_os_error(errno);
            ProgramError::SyscallError(SyscallError {
                call: "open",
                io_error,
            })
        };
        let refused = attach_failure(&err(libc::EPERM), "h?");
        assert_eq!(refused, "attach refused: Operation not permitted");
        let failed = attach_failure(&err(libc::ENOENT), "h?");
        assert_eq!(
            failed,
            "attach failed: `open` failed: No such file or directory (h?)"
        );
    }
}
