//! `ws1-probe check`: learns which hooks this kernel allows by loading and attaching the empty
//! `check_*` programs of the embedded object (links are dropped right away), and plans which
//! collector can run. Planning and the verdict are pure, so they unit-test without root.
//!
//! A hook-kind row attaches only to what the agent cannot start without (the points essential
//! collectors require), so the verdict stays right on kernels that lack a point some collector
//! can do without. Those points are probed one by one (`CheckReport::points`) and decide only
//! their collector's plan: `unavailable` without a required hook, `degraded` without an
//! optional one (the metrics it feeds are missing, the rest works).

use std::{collections::BTreeMap, path::Path};

use aya::Btf;
use serde::Serialize;
use ws1_probe_common::net::NetOffsets;

mod probe;

pub use probe::attach_failure;
use probe::{chain, probe_hooks};

use crate::{
    ebpf::{self, NET_TRACEPOINTS, TRACEFS, net_hook_usable},
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
/// The hint for an attach point probed by itself (the kind works, or its row says why not).
const ABSENT: &str = "absent from this kernel?";
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const LOCKDOWN: &str = "/sys/kernel/security/lockdown";

/// A collector and the hooks it attaches, each written `<kind> [<attach point>]`.
pub struct CollectorNeeds {
    pub name: &'static str,
    /// Hooks the collector cannot run without.
    pub hooks: &'static [&'static str],
    /// Hooks the collector logs and skips when the kernel lacks them: it runs without the
    /// metrics they feed.
    pub optional: &'static [OptionalHook],
    /// Whether a missing one of `hooks` stops the agent (the profiler's stop `profile` and
    /// `top`; beside other collectors the agent turns the profiler off). The tracepoint and
    /// raw_tp attach points of essential collectors make up the hook-kind rows, which decide
    /// [`CheckReport::can_run`]; those of other collectors, and every optional hook, are
    /// probed one by one and decide only their collector's plan.
    pub essential: bool,
}

/// A hook a collector can do without; the first of `hooks` that attaches is used.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct OptionalHook {
    /// Alternatives in order of preference, each `<kind> <attach point>`.
    pub hooks: &'static [&'static str],
    /// The metrics lost when none of them attaches.
    pub feeds: &'static str,
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
        optional: &[],
        essential: true,
    },
    CollectorNeeds {
        name: "syscalls",
        hooks: &["raw_tp sys_enter", "raw_tp sys_exit"],
        optional: &[],
        essential: true,
    },
    CollectorNeeds {
        name: "memory",
        hooks: &["perf_event software page-faults"],
        optional: &[],
        essential: true,
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
        optional: &[],
        essential: true,
    },
    CollectorNeeds {
        name: "alloc",
        hooks: &[
            "uprobe allocation entry points of the detected allocator (`check --pid N` names them)",
            "uprobe its free entry points",
        ],
        optional: &[],
        essential: true,
    },
    // `NetCollector::attach` logs and skips every hook the kernel lacks, so none of these stops
    // the agent; without inet_sock_set_state no socket is observed and the collector is idle.
    CollectorNeeds {
        name: "net",
        hooks: &["tracepoint sock:inet_sock_set_state"],
        optional: &[
            // All seven `tp_btf` programs at once (`ebpf::NET_BTF_PROGRAMS`), as the agent
            // attaches them; without them the tracepoints below do the same work.
            OptionalHook {
                hooks: &[NET_BTF_HOOK],
                feeds: "speed only (the tracepoints do the same work, with a process filter and a hash lookup more per send and receive)",
            },
            // Requests complete on the opposite direction, so each of the pair feeds them.
            OptionalHook {
                hooks: &[
                    "raw_tp sock_send_length",
                    "tracepoint sock:sock_send_length",
                ],
                feeds: "bytes sent, requests, request latency, connection reuse",
            },
            OptionalHook {
                hooks: &[
                    "raw_tp sock_recv_length",
                    "tracepoint sock:sock_recv_length",
                ],
                feeds: "bytes received, requests, request latency, connection reuse",
            },
            OptionalHook {
                hooks: &["tracepoint tcp:tcp_probe"],
                feeds: "rtt where BTF lacks tcp_sock.srtt_us",
            },
            OptionalHook {
                hooks: &["tracepoint tcp:tcp_retransmit_skb"],
                feeds: "retransmits",
            },
            OptionalHook {
                hooks: &["tracepoint tcp:tcp_send_reset"],
                feeds: "resets sent",
            },
            OptionalHook {
                hooks: &["tracepoint tcp:tcp_receive_reset"],
                feeds: "resets received",
            },
        ],
        essential: false,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// Every hook works.
    Ok,
    /// The required hooks work, some optional ones do not: the collector runs without the
    /// metrics those feed.
    Degraded,
    /// A required hook does not work: the collector cannot run.
    Unavailable,
}

/// A hook a collector cannot use here, and what that costs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MissingHook {
    /// The metrics lost, for an optional hook; `None` for a required one (everything is lost).
    pub feeds: Option<&'static str>,
    /// Why: the failed hook kind (`tracepoint`), or the failed attach point
    /// (`tracepoint tcp:tcp_probe`); for an optional hook, every alternative that failed.
    pub failed: Vec<HookStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CollectorPlan {
    pub name: &'static str,
    /// The required hooks.
    pub hooks: Vec<&'static str>,
    pub optional: &'static [OptionalHook],
    /// Whether the collector can run (`ok` or `degraded`).
    pub available: bool,
    pub status: PlanStatus,
    /// `ok`, `degraded: no <metrics> (<failed>)[; ...]` or `unavailable: <failed>`, where a
    /// failure is a hook kind or an attach point.
    pub detail: String,
    /// The required hooks that failed when unavailable, else the optional ones that failed.
    pub missing: Vec<MissingHook>,
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
    /// One per hook kind in [`HOOKS`].
    pub hooks: Vec<HookStatus>,
    /// The attach points probed one by one (see [`CollectorNeeds::essential`]), each written
    /// `<kind> <attach point>`.
    pub points: Vec<HookStatus>,
    pub collectors: Vec<CollectorPlan>,
}

/// Which collectors can run, given the probed hook kinds and attach points.
pub fn plan_collectors(hooks: &[HookStatus], points: &[HookStatus]) -> Vec<CollectorPlan> {
    COLLECTORS.iter().map(|c| plan(c, hooks, points)).collect()
}

fn plan(needs: &CollectorNeeds, hooks: &[HookStatus], points: &[HookStatus]) -> CollectorPlan {
    let mut missing: Vec<MissingHook> = Vec::new();
    for failed in needs.hooks.iter().filter_map(|h| failure(h, hooks, points)) {
        let known = missing.iter().flat_map(|m| &m.failed);
        if !known.into_iter().any(|f| f.hook == failed.hook) {
            let failed = vec![failed];
            missing.push(MissingHook {
                feeds: None,
                failed,
            });
        }
    }
    let status = if !missing.is_empty() {
        PlanStatus::Unavailable
    } else {
        for o in needs.optional.iter().filter(|o| !o.hooks.is_empty()) {
            // Lost only when every alternative fails.
            let failed: Option<Vec<HookStatus>> =
                o.hooks.iter().map(|h| failure(h, hooks, points)).collect();
            if let Some(failed) = failed {
                missing.push(MissingHook {
                    feeds: Some(o.feeds),
                    failed,
                });
            }
        }
        match missing.is_empty() {
            true => PlanStatus::Ok,
            false => PlanStatus::Degraded,
        }
    };
    let names = |m: &MissingHook| {
        m.failed
            .iter()
            .map(|f| f.hook)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let detail = match status {
        PlanStatus::Ok => "ok".to_owned(),
        PlanStatus::Degraded => {
            let lost = missing.iter().map(|m| {
                let feeds = m.feeds.unwrap_or_default();
                format!("no {feeds} ({})", names(m))
            });
            format!("degraded: {}", lost.collect::<Vec<_>>().join("; "))
        }
        PlanStatus::Unavailable => {
            let failed = missing.iter().map(names).collect::<Vec<_>>();
            format!("unavailable: {}", failed.join(", "))
        }
    };
    CollectorPlan {
        name: needs.name,
        hooks: needs.hooks.to_vec(),
        optional: needs.optional,
        available: status != PlanStatus::Unavailable,
        status,
        detail,
        missing,
    }
}

/// Why `hook` cannot be used here: its kind failed (or was not probed), or its attach point,
/// when probed by itself, failed. `None` when it works.
fn failure(hook: &'static str, hooks: &[HookStatus], points: &[HookStatus]) -> Option<HookStatus> {
    let kind = hook.split(' ').next().unwrap_or(hook);
    match hooks.iter().find(|s| s.hook == kind) {
        Some(s) if !s.available => Some(s.clone()),
        Some(_) => points
            .iter()
            .find(|p| p.hook == hook && !p.available)
            .cloned(),
        None => Some(HookStatus::new(kind, Err("not probed".to_owned()))),
    }
}

/// The attach points of one hook kind that its row attaches together: those the essential
/// collectors require.
fn collector_points(needs: &[CollectorNeeds], kind: &str) -> Vec<&'static str> {
    let hooks = needs.iter().filter(|c| c.essential).flat_map(|c| c.hooks);
    let points = hooks.filter_map(|h| h.strip_prefix(kind)?.strip_prefix(' '));
    let mut out: Vec<&'static str> = Vec::new();
    for point in points {
        if !out.contains(&point) {
            out.push(point);
        }
    }
    out
}

/// Hook kinds whose attach points can be probed by name, one by one.
const BY_POINT: [&str; 3] = ["tracepoint", "raw_tp", "tp_btf"];

/// The network collector's fast path as one optional hook: its `tp_btf` programs with
/// socket-local storage, loaded and attached together as the agent does.
pub const NET_BTF_HOOK: &str = "tp_btf network programs with socket storage";

/// The hooks probed one by one, as `<kind> <attach point>`: every hook of a collector that is
/// not essential, and every optional hook. Kinds outside [`BY_POINT`] are judged by their row.
fn single_points(needs: &[CollectorNeeds]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for c in needs {
        let required = c.hooks.iter().filter(|_| !c.essential);
        for &hook in required.chain(c.optional.iter().flat_map(|o| o.hooks)) {
            let by_point = hook
                .split_once(' ')
                .is_some_and(|(kind, _)| BY_POINT.contains(&kind));
            if by_point && !out.contains(&hook) {
                out.push(hook);
            }
        }
    }
    out
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

    /// Aligned tables (system, hooks, collectors), then a verdict line. A collector's row
    /// lists its required hooks; lines under it name what failed and its optional hooks.
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
        for c in &self.collectors {
            let status = match c.status {
                PlanStatus::Ok => "ok",
                PlanStatus::Degraded => "degraded",
                PlanStatus::Unavailable => "unavailable",
            };
            collectors.push(row(c.name, status.to_owned(), &c.hooks.join(", ")));
            // Continuation lines, under HOOKS.
            let more = |text: String| row("", String::new(), &text);
            let lost = |m: &MissingHook| m.failed.iter().map(failed_text).collect::<Vec<_>>();
            let required = c.missing.iter().filter(|m| m.feeds.is_none());
            let required: Vec<String> = required.flat_map(lost).collect();
            if !required.is_empty() {
                collectors.push(more(format!("missing: {}", required.join(", "))));
            }
            for o in c.optional {
                let gone = c.missing.iter().find(|m| m.feeds == Some(o.feeds));
                collectors.push(more(match gone {
                    None => format!("optional for {}: {}", o.feeds, o.hooks.join(" or ")),
                    Some(m) => format!("optional for {}, missing: {}", o.feeds, lost(m).join(", ")),
                }));
            }
        }
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

/// A failed hook kind by name (the hook table says why); a failed attach point with why.
fn failed_text(failed: &HookStatus) -> String {
    match failed.hook.contains(' ') {
        true => format!("{} ({})", failed.hook, failed.detail),
        false => failed.hook.to_owned(),
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
    let (hooks, mut points) = match missing_capabilities {
        Some(_) => not_probed(COLLECTORS, "not probed: missing capabilities"),
        None => probe_hooks(parsed.as_ref().ok(), COLLECTORS),
    };
    if tracefs.is_ok() {
        // The same field check the agent makes before it attaches a network hook.
        mark_missing_fields(&mut points, &ebpf::read_net_offsets(Path::new(TRACEFS)));
    }
    CheckReport {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_owned()),
        btf: HookStatus::new("btf", btf),
        lockdown: lockdown(),
        capabilities: names.map(|(name, cap)| (name, caps.has(cap))).collect(),
        missing_capabilities,
        tracefs: HookStatus::new("tracefs", tracefs),
        collectors: plan_collectors(&hooks, &points),
        hooks,
        points,
    }
}

/// Marks the network attach points whose tracepoint lacks a field the collector reads as
/// unavailable: the agent skips those hooks (raw tracepoint included) even though they attach.
fn mark_missing_fields(points: &mut [HookStatus], off: &NetOffsets) {
    for point in points.iter_mut().filter(|p| p.available) {
        // `tracepoint sock:sock_send_length` or `raw_tp sock_send_length`.
        let event = point.hook.rsplit(' ').next().unwrap_or_default();
        let name = event.rsplit(':').next().unwrap_or_default();
        let Some((category, name, program)) = NET_TRACEPOINTS.iter().find(|t| t.1 == name) else {
            continue;
        };
        if !net_hook_usable(off, program) {
            point.available = false;
            point.detail = format!(
                "attaches, but {TRACEFS}/events/{category}/{name}/format lacks a field the network collector reads"
            );
        }
    }
}

/// Every hook kind, and every attach point `needs` probes by itself, failed with `why`.
fn not_probed(needs: &[CollectorNeeds], why: &str) -> (Vec<HookStatus>, Vec<HookStatus>) {
    let status = |hook| HookStatus::new(hook, Err(why.to_owned()));
    let points = single_points(needs).into_iter().map(status).collect();
    (HOOKS.split(' ').map(status).collect(), points)
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
    use std::io;

    use aya::{programs::ProgramError, sys::SyscallError};

    use super::{probe::kind_points, *};

    /// Every hook available except those in `down`.
    fn hooks(down: &[&str]) -> Vec<HookStatus> {
        let result = |h| (!down.contains(&h)).then(|| "y".into()).ok_or("x".into());
        let status = |h| HookStatus::new(h, result(h));
        HOOKS.split(' ').map(status).collect()
    }

    /// Every attach point probed by itself attached, except those in `down`.
    fn points(down: &[&str]) -> Vec<HookStatus> {
        let result = |h| {
            (!down.contains(&h))
                .then(|| "attached".into())
                .ok_or("x".into())
        };
        let status = |h| HookStatus::new(h, result(h));
        single_points(COLLECTORS).into_iter().map(status).collect()
    }

    fn report(down: &[&str]) -> CheckReport {
        report_with(down, &[])
    }

    fn report_with(down: &[&str], points_down: &[&str]) -> CheckReport {
        let hooks = hooks(down);
        let points = points(points_down);
        CheckReport {
            kernel: "6.8.0".to_owned(),
            btf: HookStatus::new("btf", Ok(BTF_PATH.to_owned())),
            lockdown: "none".to_owned(),
            capabilities: [("CAP_BPF", true)].into(),
            missing_capabilities: None,
            tracefs: HookStatus::new("tracefs", Ok(TRACEFS.to_owned())),
            collectors: plan_collectors(&hooks, &points),
            hooks,
            points,
        }
    }

    fn net_plan(r: &CheckReport) -> &CollectorPlan {
        let net = r.collectors.iter().find(|c| c.name == "net");
        net.unwrap_or_else(|| panic!("no net plan in {:?}", r.collectors))
    }

    #[test]
    fn plans() {
        let all = plan_collectors(&hooks(&[]), &points(&[]));
        assert!(all.iter().all(|c| c.available && c.detail == "ok"));
        assert!(
            all.iter()
                .all(|c| c.status == PlanStatus::Ok && c.missing.is_empty())
        );
        assert_eq!(all[1].hooks, ["raw_tp sys_enter", "raw_tp sys_exit"]);
        let some = plan_collectors(&hooks(&["ringbuf", "tracepoint", "kprobe"]), &points(&[]));
        assert_eq!(some[0].detail, "unavailable: tracepoint, ringbuf");
        assert!(!some[0].available && some[1].available);
        assert_eq!(some[5].detail, "unavailable: tracepoint");
        assert_eq!(plan_collectors(&[], &[])[1].detail, "unavailable: raw_tp");
    }

    #[test]
    fn verdict() {
        let err = |down: &[&str]| report(down).can_run().unwrap_err();
        let ok = |down: &[&str]| report(down).can_run().is_ok();
        assert!(ok(&[]) && ok(&["kprobe", "fentry", "tp_btf", "uprobe", "perf_event"]));
        assert!(err(&["raw_tp"]).starts_with("raw_tp unavailable (x): needs linux 4.17+"));
        assert!(err(&["ringbuf"]).contains("ring buffers"));
        let mut r = report(&[]);
        (r.hooks, r.points) = not_probed(COLLECTORS, "not probed: missing capabilities");
        assert_eq!(r.points.len(), single_points(COLLECTORS).len());
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
        assert!(lines.contains(&"net         ok      tracepoint sock:inet_sock_set_state"));
        assert!(lines.contains(&"                    optional for rtt where BTF lacks tcp_sock.srtt_us: tracepoint tcp:tcp_probe"));
        let json = serde_json::to_value(report(&[])).unwrap_or_default();
        assert_eq!(json["hooks"][7]["hook"], "ringbuf");
        assert_eq!(json["collectors"][0]["available"], true);
        assert_eq!(
            json["points"][0]["hook"],
            "tracepoint sock:inet_sock_set_state"
        );
        assert_eq!(json["collectors"][5]["status"], "ok");
        assert_eq!(
            json["collectors"][5]["optional"][3]["feeds"],
            "rtt where BTF lacks tcp_sock.srtt_us"
        );
        let json = serde_json::to_value(report_with(&[], &["tracepoint tcp:tcp_probe"]));
        let json = json.unwrap_or_default();
        assert_eq!(json["collectors"][5]["status"], "degraded");
        let missing = &json["collectors"][5]["missing"][0];
        assert_eq!(missing["feeds"], "rtt where BTF lacks tcp_sock.srtt_us");
        assert_eq!(missing["failed"][0]["hook"], "tracepoint tcp:tcp_probe");
        assert_eq!(missing["failed"][0]["available"], false);
    }

    #[test]
    fn missing_optional_net_hook_degrades_net_only() {
        let r = report_with(&[], &["tracepoint tcp:tcp_probe"]);
        let net = net_plan(&r);
        assert_eq!(
            net.detail,
            "degraded: no rtt where BTF lacks tcp_sock.srtt_us (tracepoint tcp:tcp_probe)"
        );
        assert!(net.available && net.status == PlanStatus::Degraded);
        let failed = HookStatus::new("tracepoint tcp:tcp_probe", Err("x".into()));
        let missing = MissingHook {
            feeds: Some("rtt where BTF lacks tcp_sock.srtt_us"),
            failed: vec![failed],
        };
        assert_eq!(net.missing, [missing]);
        let others = r.collectors.iter().filter(|c| c.name != "net");
        assert!(others.into_iter().all(|c| c.status == PlanStatus::Ok));
        assert_eq!(r.can_run(), Ok(()));
        let text = r.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"net         degraded  tracepoint sock:inet_sock_set_state"));
        let lost = "                      optional for rtt where BTF lacks tcp_sock.srtt_us, missing: tracepoint tcp:tcp_probe (x)";
        assert!(lines.contains(&lost), "{text}");
        assert_eq!(lines.last(), Some(&"ok: the agent can run on this kernel"));

        // A fallback that attaches makes up for the preferred hook.
        let r = report_with(&[], &["raw_tp sock_send_length"]);
        assert_eq!(net_plan(&r).detail, "ok");
        let r = report_with(
            &[],
            &[
                "tracepoint tcp:tcp_send_reset",
                "raw_tp sock_send_length",
                "tracepoint sock:sock_send_length",
            ],
        );
        let detail = "degraded: no bytes sent, requests, request latency, connection reuse \
            (raw_tp sock_send_length, tracepoint sock:sock_send_length); \
            no resets sent (tracepoint tcp:tcp_send_reset)";
        assert_eq!(net_plan(&r).detail, detail);
        assert_eq!(net_plan(&r).missing[0].failed.len(), 2);
        assert_eq!(r.can_run(), Ok(()));
    }

    #[test]
    fn missing_required_net_hook_leaves_the_agent_running() {
        let down = [
            "tracepoint sock:inet_sock_set_state",
            "tracepoint tcp:tcp_probe",
        ];
        let r = report_with(&[], &down);
        let net = net_plan(&r);
        assert_eq!(
            net.detail,
            "unavailable: tracepoint sock:inet_sock_set_state"
        );
        assert!(!net.available && net.status == PlanStatus::Unavailable);
        // Optional hooks do not matter to a collector that cannot run.
        assert_eq!(net.missing.len(), 1);
        assert_eq!(net.missing[0].feeds, None);
        let others = r.collectors.iter().filter(|c| c.name != "net");
        assert!(others.into_iter().all(|c| c.status == PlanStatus::Ok));
        assert_eq!(r.can_run(), Ok(()));
        let text = r.render_text();
        let lines: Vec<&str> = text.lines().collect();
        let row = "net         unavailable  tracepoint sock:inet_sock_set_state";
        assert!(lines.contains(&row), "{text}");
        let why = "                         missing: tracepoint sock:inet_sock_set_state (x)";
        assert!(lines.contains(&why), "{text}");
        assert_eq!(lines.last(), Some(&"ok: the agent can run on this kernel"));
        // A failed kind is named by itself: the hook table says why.
        let r = report_with(&["ringbuf", "tracepoint"], &[]);
        let text = r.render_text();
        assert!(text.contains("\n                         missing: tracepoint, ringbuf\n"));
        assert!(text.contains("\nnet         unavailable  tracepoint sock:inet_sock_set_state\n"));
        assert!(r.can_run().is_err());
    }

    #[test]
    fn kind_rows_hold_only_what_the_agent_needs() {
        // The points of the net collector never fail a hook-kind row (and so the verdict).
        let rows = collector_points(COLLECTORS, "tracepoint");
        let essential = [
            "task:task_newtask",
            "sched:sched_process_exec",
            "sched:sched_process_exit",
            "sched:sched_switch",
        ];
        assert_eq!(rows, essential);
        let rows = collector_points(COLLECTORS, "raw_tp");
        assert_eq!(rows, ["sys_enter", "sys_exit", "sched_switch"]);
        let singles = single_points(COLLECTORS);
        assert_eq!(singles.len(), 10);
        assert_eq!(singles[0], "tracepoint sock:inet_sock_set_state");
        assert_eq!(singles[1], NET_BTF_HOOK);
        assert_eq!(
            kind_points(COLLECTORS, "tp_btf").collect::<Vec<_>>(),
            [(NET_BTF_HOOK, "network programs with socket storage")]
        );
        let raw: Vec<_> = kind_points(COLLECTORS, "raw_tp").collect();
        let send = ("raw_tp sock_send_length", "sock_send_length");
        assert_eq!(raw, [send, ("raw_tp sock_recv_length", "sock_recv_length")]);
        assert_eq!(kind_points(COLLECTORS, "tracepoint").count(), 7);
        // Optional hooks of an essential collector are probed by themselves too; kinds
        // without a by-name probe are judged by their row.
        let needs = [CollectorNeeds {
            name: "t",
            hooks: &["raw_tp sys_enter"],
            optional: &[
                OptionalHook {
                    hooks: &["tracepoint a:b"],
                    feeds: "ab",
                },
                OptionalHook {
                    hooks: &["uprobe libc free"],
                    feeds: "frees",
                },
            ],
            essential: true,
        }];
        assert_eq!(single_points(&needs), ["tracepoint a:b"]);
        assert_eq!(collector_points(&needs, "raw_tp"), ["sys_enter"]);
        let plan = plan(&needs[0], &hooks(&["uprobe"]), &[]);
        assert_eq!(plan.detail, "degraded: no frees (uprobe)");
        // Render matches optional hooks to what is missing by what they feed.
        for c in COLLECTORS {
            let feeds: Vec<_> = c.optional.iter().map(|o| o.feeds).collect();
            let distinct = feeds
                .iter()
                .all(|f| feeds.iter().filter(|g| *g == f).count() == 1);
            assert!(distinct, "{}: {feeds:?}", c.name);
        }
    }

    #[test]
    fn points_whose_tracepoint_lacks_fields_are_unavailable() {
        let ok = |hook| HookStatus::new(hook, Ok("attached".to_owned()));
        let mut points = vec![
            ok("tracepoint tcp:tcp_retransmit_skb"),
            ok("raw_tp sock_send_length"),
            ok("tracepoint sock:sock_send_length"),
            ok("raw_tp sys_enter"),
        ];
        let mut off = NetOffsets::FALLBACK;
        mark_missing_fields(&mut points, &off);
        assert!(points.iter().all(|p| p.available), "{points:?}");
        off.retransmit_skaddr = u32::MAX;
        off.send_sk = u32::MAX;
        mark_missing_fields(&mut points, &off);
        let available: Vec<bool> = points.iter().map(|p| p.available).collect();
        assert_eq!(available, [false, false, false, true]);
        assert_eq!(
            points[0].detail,
            "attaches, but /sys/kernel/tracing/events/tcp/tcp_retransmit_skb/format lacks a field the network collector reads"
        );
        // The plan then names what is lost, and the agent can still run.
        let plans = plan_collectors(&hooks(&[]), &points);
        let net = plans.iter().find(|c| c.name == "net").expect("net");
        assert_eq!(net.status, PlanStatus::Degraded);
        assert!(net.detail.contains("no retransmits"), "{}", net.detail);
        assert!(net.detail.contains("no bytes sent"), "{}", net.detail);
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
