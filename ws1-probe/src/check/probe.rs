//! The kernel side of `ws1-probe check`: loads the embedded object once and attaches the empty
//! `check_*` programs to each hook kind and attach point; every link is dropped with the object.

use std::{error::Error, io};

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
use ws1_probe_common::check as progs;

use super::{
    ABSENT, CollectorNeeds, HookStatus, NET_BTF_HOOK, NO_EVENTS, collector_points, not_probed,
    single_points,
};
use crate::{ebpf, preflight};

/// Loads the object once and tries each hook kind, then each attach point of `needs` that is
/// probed by itself; every link is dropped with the object.
pub(super) fn probe_hooks(
    btf: Option<&Btf>,
    needs: &[CollectorNeeds],
) -> (Vec<HookStatus>, Vec<HookStatus>) {
    preflight::raise_memlock();
    let ringbuf = match aya::sys::is_map_supported(MapType::RingBuf) {
        Ok(true) => Ok("BPF_MAP_TYPE_RINGBUF supported".to_owned()),
        Ok(false) => Err("BPF_MAP_TYPE_RINGBUF not supported by this kernel".to_owned()),
        Err(err) => Err(format!("probe failed: {}", chain(&err))),
    };
    // aya 0.14's `EbpfLoader::new` parses BTF itself; ours replaces it for the relocations.
    // Unsupported maps are tolerated so that the program probes still run.
    // The network offsets as the agent sets them: the `tp_btf` programs' socket reads only
    // verify with real offsets.
    let net_offsets = ebpf::net_offsets();
    let mut loader = EbpfLoader::new();
    loader.override_global("NET_OFFSETS", &net_offsets, true);
    let mut ebpf = match loader.btf(btf).allow_unsupported_maps().load(ebpf::OBJECT) {
        Ok(ebpf) => ebpf,
        Err(err) => {
            let why = format!("not probed: cannot load the eBPF object: {}", chain(&err));
            let (hooks, points) = not_probed(needs, &why);
            let hooks = hooks.into_iter().filter(|h| h.hook != "ringbuf");
            let hooks = hooks.chain([HookStatus::new("ringbuf", ringbuf)]).collect();
            return (hooks, points);
        }
    };
    let btf = btf.ok_or_else(|| "not probed: no kernel BTF".to_owned());
    let (tracepoint, mut points) = probe_tracepoint(&mut ebpf, needs);
    let (raw_tp, raw_tp_points) = probe_raw_tp(&mut ebpf, needs);
    points.extend(raw_tp_points);
    points.extend(probe_tp_btf_points(
        &mut ebpf,
        needs,
        btf.as_ref().ok().copied(),
    ));
    let order = single_points(needs);
    points.sort_by_key(|p| order.iter().position(|h| *h == p.hook));
    let hooks = vec![
        HookStatus::new("tracepoint", tracepoint),
        HookStatus::new("raw_tp", raw_tp),
        HookStatus::new("tp_btf", btf.clone().and_then(|b| tp_btf(&mut ebpf, b))),
        HookStatus::new("kprobe", probe_kprobe(&mut ebpf)),
        HookStatus::new("fentry", btf.and_then(|b| probe_fentry(&mut ebpf, b))),
        HookStatus::new("uprobe", probe_uprobe(&mut ebpf)),
        HookStatus::new("perf_event", probe_perf_event(&mut ebpf)),
        HookStatus::new("ringbuf", ringbuf),
    ];
    drop(ebpf); // detaches every link and unloads the programs
    (hooks, points)
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

/// A hook kind's row, and the results of its attach points probed one by one.
type KindProbe = (Result<String, String>, Vec<HookStatus>);

fn probe_tracepoint(ebpf: &mut Ebpf, needs: &[CollectorNeeds]) -> KindProbe {
    let kind = "tracepoint";
    let prog = match loaded(ebpf, progs::PROBE_TRACEPOINT, TracePoint::load) {
        Ok(prog) => prog,
        Err(why) => return kind_failed(needs, kind, why),
    };
    attach_kind(needs, kind, "sched:sched_process_exit", |point| {
        let (category, name) = point.split_once(':').unwrap_or(("", point));
        prog.attach(category, name).map(drop)
    })
}

fn probe_raw_tp(ebpf: &mut Ebpf, needs: &[CollectorNeeds]) -> KindProbe {
    let kind = "raw_tp";
    let prog = match loaded(ebpf, progs::PROBE_RAW_TP, RawTracePoint::load) {
        Ok(prog) => prog,
        Err(why) => return kind_failed(needs, kind, why),
    };
    attach_kind(needs, kind, "sched_process_exit", |point| {
        prog.attach(point).map(drop)
    })
}

/// Attaches the row of `kind` (`first`, then the points essential collectors require)
/// together, then each point of `kind` that is probed by itself, so that a point the kernel
/// lacks fails only its own result.
fn attach_kind(
    needs: &[CollectorNeeds],
    kind: &str,
    first: &'static str,
    mut attach: impl FnMut(&str) -> Result<(), ProgramError>,
) -> KindProbe {
    let rest = collector_points(needs, kind).into_iter();
    let row: Vec<&str> = [first]
        .into_iter()
        .chain(rest.filter(|p| *p != first))
        .collect();
    let row = attach_each(&row, &mut attach);
    let singles = kind_points(needs, kind).map(|(hook, point)| {
        let result = attach(point).map(|()| "attached".to_owned());
        HookStatus::new(hook, result.map_err(|e| attach_failure(&e, ABSENT)))
    });
    (row, singles.collect())
}

/// The row of `kind` and each of its single points failed with `why`.
fn kind_failed(needs: &[CollectorNeeds], kind: &str, why: String) -> KindProbe {
    let points = kind_points(needs, kind).map(|(hook, _)| HookStatus::new(hook, Err(why.clone())));
    let points = points.collect();
    (Err(why), points)
}

/// The hooks of `kind` probed by themselves, with their attach points.
pub(super) fn kind_points<'a>(
    needs: &[CollectorNeeds],
    kind: &'a str,
) -> impl Iterator<Item = (&'static str, &'static str)> + 'a {
    let hooks = single_points(needs).into_iter();
    hooks.filter_map(move |h| Some((h, h.strip_prefix(kind)?.strip_prefix(' ')?)))
}

/// The `tp_btf` hooks probed by themselves: the network collector's programs, loaded and
/// attached all together as the agent does.
fn probe_tp_btf_points(
    ebpf: &mut Ebpf,
    needs: &[CollectorNeeds],
    btf: Option<&Btf>,
) -> Vec<HookStatus> {
    let points: Vec<_> = kind_points(needs, "tp_btf").collect();
    points
        .into_iter()
        .map(|(hook, _)| {
            let result = match btf {
                None => Err("not probed: no kernel BTF".to_owned()),
                Some(_) if hook != NET_BTF_HOOK => Err(format!("no probe for {hook}")),
                Some(btf) => ebpf::attach_btf_tracepoints(ebpf, &ebpf::NET_BTF_PROGRAMS, btf)
                    .map(|()| format!("attached ({} programs)", ebpf::NET_BTF_PROGRAMS.len())),
            };
            HookStatus::new(hook, result)
        })
        .collect()
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

use crate::units::os_text;

/// An error and its sources on one line, without the repeats `#[error(transparent)]` makes.
pub(super) fn chain(err: &(dyn Error + 'static)) -> String {
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
