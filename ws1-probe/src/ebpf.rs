//! Loading the embedded eBPF object and attaching its programs, with errors that name the
//! program, the hook and the fix.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    programs::{BtfTracePoint, Program, ProgramError, RawTracePoint, TracePoint},
};
use ws1_probe_common::{
    hist::{EXPORT_BOUND_SLOTS, MAX_EXPORT_BOUNDS},
    net::NetOffsets,
    targets::TracepointOffsets,
};

/// The kernel programs, built by build.rs from `ws1-probe-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ws1-probe"));

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot load the eBPF object: {source}")]
    Object {
        #[source]
        source: aya::EbpfError,
    },
    #[error("program {program} is missing from the eBPF object (rebuild with `cargo xtask build`)")]
    MissingProgram { program: String },
    #[error("map {map} is missing from the eBPF object (rebuild with `cargo xtask build`)")]
    MissingMap { map: String },
    #[error("{name}={value:?} is not a known setting: use {expected}")]
    Setting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("the kernel verifier rejected program {program}: {tail}")]
    Verifier { program: String, tail: String },
    #[error("cannot load program {program}: {source}")]
    Load {
        program: String,
        #[source]
        source: ProgramError,
    },
    #[error("cannot attach program {program} to {hook}: {reason}")]
    Attach {
        program: String,
        hook: String,
        reason: String,
    },
    #[error("map {map}: {source}")]
    Map {
        map: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Load-time settings written into the object's globals (no recompiles).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub host_mode: bool,
    pub offsets: TracepointOffsets,
    pub bounds_ns: Vec<u64>,
    /// Profiler threshold and `sched_switch` offsets.
    pub profile: ws1_probe_common::profile::ProfileSettings,
    /// Stack samples per second per CPU the DWARF ring buffer is sized for.
    pub sample_rate_hz: u64,
    /// Capacities set with `--map-entries` (names from [`crate::drops::RESIZABLE`]).
    pub map_entries: Vec<(String, u32)>,
}

/// Loads the object (maps are created; programs are loaded later, one by one, on attach).
pub fn load(opts: &LoadOptions) -> Result<Ebpf, LoadError> {
    let host_mode: u32 = opts.host_mode.into();
    let mut bounds = [u64::MAX; EXPORT_BOUND_SLOTS];
    for (slot, b) in bounds
        .iter_mut()
        .zip(opts.bounds_ns.iter().take(MAX_EXPORT_BOUNDS))
    {
        *slot = *b;
    }
    // Read here rather than passed in: every load needs them, and the net collector reads the
    // same files again to learn which hooks exist.
    let net_offsets = net_offsets();
    let mmap_offsets = read_mmap_offsets(Path::new(TRACEFS));
    let sched = crate::collectors::sched::kernel_settings();
    let mut loader = EbpfLoader::new();
    for (map, entries) in &opts.map_entries {
        loader.map_max_entries(map, *entries);
        // BLOCK_BYTES holds BLOCK_HIST's keys.
        if map == "BLOCK_HIST" {
            loader.map_max_entries("BLOCK_BYTES", *entries);
        }
    }
    let block_offsets = crate::collectors::block::offsets(Path::new(TRACEFS));
    loader
        .map_max_entries("TARGET_FILTER", pid_max())
        .map_max_entries(
            "PROFILE_SAMPLES",
            sample_ring_bytes(possible_cpus(), opts.sample_rate_hz),
        )
        .override_global("HOST_MODE", &host_mode, true)
        .override_global("TP_OFFSETS", &opts.offsets, true)
        .override_global("SYSCALL_BOUNDS_NS", &bounds, true)
        .override_global("NET_BOUNDS_NS", &bounds, true)
        .override_global("NET_OFFSETS", &net_offsets, true)
        .override_global("MMAP_OFFSETS", &mmap_offsets, true)
        .override_global("PROFILE_SETTINGS", &opts.profile, true)
        .override_global("RUNQ_BOUNDS_NS", &bounds, true)
        .override_global("SCHED_SETTINGS", &sched, true)
        // aya 0.14 has no type for task storage (`RUNQ_START`); the map is created and
        // relocated all the same.
        .allow_unsupported_maps()
        .override_global("BLOCK_BOUNDS_NS", &bounds, true)
        .override_global("BLOCK_OFFSETS", &block_offsets, true)
        .load(OBJECT)
        .map_err(|source| LoadError::Object { source })
}

/// The network programs' offsets: tracepoint fields from tracefs, socket fields from BTF.
pub fn net_offsets() -> NetOffsets {
    let mut off = read_net_offsets(Path::new(TRACEFS));
    let kernel = kernel_offsets();
    off.tcp_sock_srtt_us = kernel.tcp_sock_srtt_us;
    off.sock_protocol = kernel.sock_protocol;
    off.sock_v6_daddr = kernel.sock_v6_daddr;
    off.sock_bpf_storage = kernel.sock_bpf_storage;
    off.skb_gso_segs = kernel.skb_gso_segs;
    off
}

/// The kernel struct member offsets some programs read, from the kernel's BTF in one pass,
/// once per process; `u32::MAX` for each one BTF does not have.
#[derive(Clone, Copy, Debug)]
pub struct KernelOffsets {
    /// `tcp_sock.srtt_us`: accept-side handshakes, and RTT sampled by the send/receive hooks.
    pub tcp_sock_srtt_us: u32,
    /// `task_struct.pid`: the raw `sched_switch` of the off-CPU profiler.
    pub task_struct_pid: u32,
    /// `sock.sk_protocol` and `sock_common.skc_v6_daddr`: the `tp_btf` network state change.
    pub sock_protocol: u32,
    pub sock_v6_daddr: u32,
    /// `sock.sk_bpf_storage`: lets the `tp_btf` send/receive hooks skip sockets without
    /// local storage before the helper call.
    pub sock_bpf_storage: u32,
    /// `sk_buff.cb` + `tcp_skb_cb.tcp_gso_segs`: the segments of a retransmitted skb.
    pub skb_gso_segs: u32,
}

/// `tcp_gso_segs`'s offset in an skb from those of `sk_buff.cb` and `tcp_skb_cb.tcp_gso_segs`,
/// `u32::MAX` unless both are known and the field lies inside the 48-byte control buffer.
fn skb_gso_segs_offset(cb: Option<u32>, segs: Option<u32>) -> u32 {
    match (cb, segs) {
        (Some(cb), Some(segs)) if segs + 2 <= 48 => cb + segs,
        _ => u32::MAX,
    }
}

pub fn kernel_offsets() -> KernelOffsets {
    static OFFSETS: std::sync::OnceLock<KernelOffsets> = std::sync::OnceLock::new();
    *OFFSETS.get_or_init(|| {
        let wanted = [
            ("tcp_sock", "srtt_us"),
            ("task_struct", "pid"),
            ("sock", "sk_protocol"),
            ("sock_common", "skc_v6_daddr"),
            ("sock", "sk_bpf_storage"),
            ("sk_buff", "cb"),
            ("tcp_skb_cb", "tcp_gso_segs"),
        ];
        match crate::btf::kernel_member_offsets(&wanted) {
            Ok(found) => {
                let get = |i: usize| found.get(i).copied().flatten().unwrap_or(u32::MAX);
                let offsets = KernelOffsets {
                    tcp_sock_srtt_us: get(0),
                    task_struct_pid: get(1),
                    sock_protocol: get(2),
                    sock_v6_daddr: get(3),
                    sock_bpf_storage: get(4),
                    skb_gso_segs: skb_gso_segs_offset(
                        found.get(5).copied().flatten(),
                        found.get(6).copied().flatten(),
                    ),
                };
                if offsets.tcp_sock_srtt_us == u32::MAX {
                    tracing::warn!(
                        "kernel BTF has no tcp_sock.srtt_us: accept-side handshake latency is not measured (a kernel built with CONFIG_DEBUG_INFO_BTF=y and a newer release has it)"
                    );
                }
                if offsets.skb_gso_segs == u32::MAX {
                    tracing::warn!(
                        "kernel BTF has no sk_buff.cb or tcp_skb_cb.tcp_gso_segs: retransmits count one segment per retransmitted packet (exact segment counts need a kernel whose BTF has these fields)"
                    );
                }
                offsets
            }
            Err(err) => {
                tracing::warn!(
                    "accept-side handshake latency is not measured, RTT and off-CPU use the classic tracepoints, retransmits count one segment per retransmitted packet: {err}; make /sys/kernel/btf/vmlinux readable (a kernel built with CONFIG_DEBUG_INFO_BTF=y) and run `ws1-probe check`"
                );
                KernelOffsets {
                    tcp_sock_srtt_us: u32::MAX,
                    task_struct_pid: u32::MAX,
                    sock_protocol: u32::MAX,
                    sock_v6_daddr: u32::MAX,
                    sock_bpf_storage: u32::MAX,
                    skb_gso_segs: u32::MAX,
                }
            }
        }
    })
}

/// Offset of `srtt_us` in `struct tcp_sock`, `u32::MAX` when unknown.
pub fn tcp_sock_srtt_offset() -> u32 {
    kernel_offsets().tcp_sock_srtt_us
}

/// Number of possible CPUs (1 when it cannot be read).
pub fn possible_cpus() -> u32 {
    aya::util::nr_cpus()
        .ok()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// Loads perf_event program `program` and attaches it to the software event `event` on every
/// online CPU, sampling by `policy`; `hook` names the event in errors (e.g. "cpu-clock").
pub fn attach_perf_all_cpus(
    ebpf: &mut Ebpf,
    program: &str,
    event: aya::programs::perf_event::SoftwareEvent,
    policy: aya::programs::perf_event::SamplePolicy,
    hook: &str,
) -> Result<(), LoadError> {
    use aya::programs::{
        PerfEvent,
        perf_event::{PerfEventConfig, PerfEventScope},
    };
    let prog: &mut PerfEvent = program_mut(ebpf, program)?
        .try_into()
        .map_err(|e| load_error(program, e))?;
    prog.load().map_err(|e| load_error(program, e))?;
    let cpus = aya::util::online_cpus().map_err(|(what, err)| LoadError::Attach {
        program: program.to_owned(),
        hook: format!("perf software {hook}"),
        reason: format!("{what}: {err}"),
    })?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(event),
            PerfEventScope::AllProcessesOneCpu { cpu },
            policy,
            false,
        )
        .map_err(|e| LoadError::Attach {
            program: program.to_owned(),
            hook: format!("perf software {hook} on cpu {cpu}"),
            reason: attach_reason(&e),
        })?;
    }
    Ok(())
}

/// Largest sample ring buffer: past it, DWARF samples that do not fit are counted as dropped.
pub const MAX_SAMPLE_RING_BYTES: u32 = 256 << 20;

/// Size of the DWARF sample ring buffer for `rate_hz` samples per second per CPU: 300 ms of
/// samples of every CPU (three of the 100 ms polling intervals), at least the compiled-in
/// size, rounded up to a power of two as ring buffers require. The pages are mapped into the
/// agent, so they count in its RSS: 1 MiB at 19 Hz on a few CPUs, 16 MiB at 997 Hz on two.
pub fn sample_ring_bytes(cpus: u32, rate_hz: u64) -> u32 {
    let record = std::mem::size_of::<ws1_probe_common::profile::StackSampleEvent>() as u64 + 8;
    let want = u64::from(cpus) * rate_hz * 3 / 10 * record;
    let min = u64::from(ws1_probe_common::profile::SAMPLE_RINGBUF_BYTES);
    let bytes = want.max(min).next_power_of_two();
    u32::try_from(bytes.min(u64::from(MAX_SAMPLE_RING_BYTES))).unwrap_or(MAX_SAMPLE_RING_BYTES)
}

/// Field offsets of the mmap/munmap/brk syscall tracepoints (precise allocation mode), field
/// by field falling back to the Linux 6.x layout.
pub fn read_mmap_offsets(tracefs: &Path) -> ws1_probe_common::alloc::MmapOffsets {
    let mut off = ws1_probe_common::alloc::MmapOffsets::FALLBACK;
    let read = |event: &str| {
        std::fs::read_to_string(tracefs.join("events/syscalls").join(event).join("format")).ok()
    };
    if let Some(fmt) = read("sys_enter_mmap") {
        off.mmap_len = parse_format_offset(&fmt, "len").unwrap_or(off.mmap_len);
        off.mmap_flags = parse_format_offset(&fmt, "flags").unwrap_or(off.mmap_flags);
    }
    if let Some(fmt) = read("sys_enter_munmap") {
        off.munmap_addr = parse_format_offset(&fmt, "addr").unwrap_or(off.munmap_addr);
        off.munmap_len = parse_format_offset(&fmt, "len").unwrap_or(off.munmap_len);
    }
    if let Some(fmt) = read("sys_exit_mmap") {
        off.exit_ret = parse_format_offset(&fmt, "ret").unwrap_or(off.exit_ret);
    }
    off
}

/// `kernel.pid_max`: the size of the tgid-indexed filter array. Falls back to the largest value
/// Linux allows (2^22) when it cannot be read.
pub fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 22)
}

/// Turns a program load failure into a one-line error; verifier rejections keep the log's tail.
pub fn load_error(program: &str, err: ProgramError) -> LoadError {
    match err {
        ProgramError::LoadError { verifier_log, .. } => LoadError::Verifier {
            program: program.to_owned(),
            tail: log_tail(&verifier_log.to_string(), 3),
        },
        source => LoadError::Load {
            program: program.to_owned(),
            source,
        },
    }
}

/// The last `n` meaningful lines of a verifier log, joined on one line. The statistics the
/// verifier appends (`processed N insns`, `verification time`, `stack depth`) say nothing about
/// the rejection, so they are skipped.
pub fn log_tail(log: &str, n: usize) -> String {
    let stats = ["processed ", "verification time", "stack depth"];
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !stats.iter().any(|s| l.starts_with(s)))
        .collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(empty verifier log)".to_owned()
    } else {
        tail
    }
}

/// What kind of failure an attach was, from the errno in its source chain (not its text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachFailure {
    /// EPERM/EACCES: missing capabilities (or a lockdown/LSM refusal).
    PermissionDenied,
    /// ENOENT: the kernel has no such hook.
    MissingHook,
    Other,
}

impl AttachFailure {
    /// Classifies `err` by the first `io::Error` among it and its sources.
    pub fn of(err: &(dyn std::error::Error + 'static)) -> Self {
        let io = std::iter::successors(Some(err), |e| e.source())
            .find_map(|e| e.downcast_ref::<std::io::Error>());
        match io.and_then(std::io::Error::raw_os_error) {
            Some(libc::EPERM | libc::EACCES) => Self::PermissionDenied,
            Some(libc::ENOENT) => Self::MissingHook,
            _ => Self::Other,
        }
    }
}

/// Why an attach failed, with the fix where one is known.
pub fn attach_reason(err: &ProgramError) -> String {
    let text = format!("{err}");
    let source = std::error::Error::source(err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    match AttachFailure::of(err) {
        AttachFailure::PermissionDenied => {
            format!("{text} (permission denied: run as root or with CAP_BPF and CAP_PERFMON)")
        }
        AttachFailure::MissingHook => format!("{text} (this kernel lacks the hook)"),
        AttachFailure::Other if source.is_empty() => text,
        AttachFailure::Other => format!("{text}: {source}"),
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Program, LoadError> {
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::MissingProgram {
            program: name.to_owned(),
        })
}

fn wrong_type(program: &str, source: ProgramError) -> LoadError {
    LoadError::Load {
        program: program.to_owned(),
        source,
    }
}

/// Loads and attaches a classic tracepoint program to `category:name`.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    program: &str,
    category: &str,
    name: &str,
) -> Result<(), LoadError> {
    let prog: &mut TracePoint = program_mut(ebpf, program)?
        .try_into()
        .map_err(|e| wrong_type(program, e))?;
    prog.load().map_err(|e| load_error(program, e))?;
    prog.attach(category, name).map_err(|e| LoadError::Attach {
        program: program.to_owned(),
        hook: format!("tracepoint {category}:{name}"),
        reason: attach_reason(&e),
    })?;
    Ok(())
}

/// Loads every `tp_btf` program of `programs` (name, tracepoint) against the kernel's BTF and
/// attaches them: all or none. On the first failure the programs loaded so far are unloaded
/// again (which detaches them) and the reason is returned, naming the tracepoint.
pub fn attach_btf_tracepoints(
    ebpf: &mut Ebpf,
    programs: &[(&str, &str)],
    btf: &aya::Btf,
) -> Result<(), String> {
    let mut loaded = Vec::new();
    for &(program, tp) in programs {
        if let Err(reason) = load_attach_btf(ebpf, program, tp, btf, &mut loaded) {
            for program in loaded {
                let prog = ebpf
                    .program_mut(program)
                    .map(<&mut BtfTracePoint>::try_from);
                if let Some(Ok(prog)) = prog {
                    let _ = prog.unload();
                }
            }
            return Err(reason);
        }
    }
    Ok(())
}

/// One step of [`attach_btf_tracepoints`]: `program` is pushed to `loaded` once it is loaded.
fn load_attach_btf<'a>(
    ebpf: &mut Ebpf,
    program: &'a str,
    tp: &str,
    btf: &aya::Btf,
    loaded: &mut Vec<&'a str>,
) -> Result<(), String> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| format!("program {program} is missing from the object"))?
        .try_into()
        .map_err(|e| format!("{program}: {e}"))?;
    prog.load(tp, btf)
        .map_err(|e| format!("tp_btf {tp}: {}", load_error(program, e)))?;
    loaded.push(program);
    prog.attach()
        .map_err(|e| format!("tp_btf {tp}: {}", attach_reason(&e)))?;
    Ok(())
}

/// Loads and attaches a raw tracepoint program.
pub fn attach_raw_tracepoint(ebpf: &mut Ebpf, program: &str, tp: &str) -> Result<(), LoadError> {
    let prog: &mut RawTracePoint = program_mut(ebpf, program)?
        .try_into()
        .map_err(|e| wrong_type(program, e))?;
    prog.load().map_err(|e| load_error(program, e))?;
    prog.attach(tp).map_err(|e| LoadError::Attach {
        program: program.to_owned(),
        hook: format!("raw_tracepoint {tp}"),
        reason: attach_reason(&e),
    })?;
    Ok(())
}

/// Reads a field's offset from a tracefs `format` file's text.
pub fn parse_format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        // The declaration ends with the field name, possibly followed by an array suffix.
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?
            .split('[')
            .next()?;
        if name != field {
            return None;
        }
        let offset = line.split("offset:").nth(1)?.split(';').next()?;
        offset.trim().parse().ok()
    })
}

/// Reads the targeting tracepoints' field offsets from tracefs; falls back field by field to the
/// Linux 6.x layout and says so.
pub fn read_offsets(tracefs: &Path) -> TracepointOffsets {
    let read = |event: &str| {
        std::fs::read_to_string(tracefs.join("events").join(event).join("format")).ok()
    };
    let mut off = TracepointOffsets::FALLBACK;
    match read("task/task_newtask") {
        Some(fmt) => {
            if let (Some(pid), Some(flags)) = (
                parse_format_offset(&fmt, "pid"),
                parse_format_offset(&fmt, "clone_flags"),
            ) {
                off.newtask_pid = pid;
                off.newtask_clone_flags = flags;
            }
        }
        None => {
            tracing::warn!(
                "cannot read task:task_newtask format; assuming the Linux 6.x layout (mount tracefs at /sys/kernel/tracing and run `ws1-probe check`)"
            )
        }
    }
    match read("sched/sched_process_exit") {
        Some(fmt) => {
            off.exit_group_dead = parse_format_offset(&fmt, "group_dead").unwrap_or(u32::MAX);
        }
        None => tracing::warn!(
            "cannot read sched:sched_process_exit format; assuming the Linux 6.x layout (mount tracefs at /sys/kernel/tracing and run `ws1-probe check`)"
        ),
    }
    off
}

/// The network tracepoints: (category, name, program).
pub const NET_TRACEPOINTS: [(&str, &str, &str); 7] = [
    ("sock", "inet_sock_set_state", "inet_sock_set_state"),
    ("sock", "sock_send_length", "sock_send_length"),
    ("sock", "sock_recv_length", "sock_recv_length"),
    ("tcp", "tcp_probe", "tcp_probe"),
    ("tcp", "tcp_retransmit_skb", "tcp_retransmit_skb"),
    ("tcp", "tcp_send_reset", "tcp_send_reset"),
    ("tcp", "tcp_receive_reset", "tcp_receive_reset"),
];

/// The network collector's `tp_btf` programs: (program, tracepoint). Where they load, the agent
/// attaches these instead of every hook in [`NET_TRACEPOINTS`] (the socket state then lives in
/// socket-local storage; see the kernel's `net/store.rs`). `inet_sock_set_state` has two: the
/// second takes the state changes that interrupt the first on its CPU (see the kernel's
/// `NET_STATE_LAST`). They are attached in this order, and the order matters: a tracepoint runs
/// its programs in the order they were attached, and the second must run after the first.
pub const NET_BTF_PROGRAMS: [(&str, &str); 7] = [
    ("inet_sock_set_state_btf", "inet_sock_set_state"),
    ("inet_sock_set_state_btf_nested", "inet_sock_set_state"),
    ("sock_send_length_btf", "sock_send_length"),
    ("sock_recv_length_btf", "sock_recv_length"),
    ("tcp_retransmit_skb_btf", "tcp_retransmit_skb"),
    ("tcp_send_reset_btf", "tcp_send_reset"),
    ("tcp_receive_reset_btf", "tcp_receive_reset"),
];

/// Offsets of the network tracepoints' fields from their format texts (`format(event)` returns
/// the text of `category/name`, `None` when the kernel lacks the event). A hook whose format
/// is missing, or lacks a field, gets `u32::MAX` in its first field and is not attached.
pub fn net_offsets_from(format: impl Fn(&str) -> Option<String>) -> NetOffsets {
    let mut off = NetOffsets::FALLBACK;
    let fields = |event: &str, names: &[&str]| -> Option<Vec<u32>> {
        let text = format(event)?;
        names
            .iter()
            .map(|n| parse_format_offset(&text, n))
            .collect()
    };
    match fields(
        "sock/inet_sock_set_state",
        &[
            "skaddr", "oldstate", "newstate", "sport", "dport", "protocol",
        ],
    )
    .as_deref()
    {
        Some(&[sk, old, new, sport, dport, proto]) => {
            off.state_skaddr = sk;
            off.state_oldstate = old;
            off.state_newstate = new;
            off.state_sport = sport;
            off.state_dport = dport;
            off.state_protocol = proto;
        }
        _ => off.state_skaddr = u32::MAX,
    }
    // Optional: without it the hook still works, only remote addresses are not exported.
    off.state_daddr_v6 = fields("sock/inet_sock_set_state", &["daddr_v6"])
        .and_then(|f| f.first().copied())
        .unwrap_or(u32::MAX);
    match fields("sock/sock_send_length", &["sk", "ret", "flags"]).as_deref() {
        Some(&[sk, ret, flags]) => (off.send_sk, off.send_ret, off.send_flags) = (sk, ret, flags),
        _ => off.send_sk = u32::MAX,
    }
    match fields("sock/sock_recv_length", &["sk", "ret", "flags"]).as_deref() {
        Some(&[sk, ret, flags]) => (off.recv_sk, off.recv_ret, off.recv_flags) = (sk, ret, flags),
        _ => off.recv_sk = u32::MAX,
    }
    match fields("tcp/tcp_probe", &["skaddr", "srtt"]).as_deref() {
        Some(&[sk, srtt]) => (off.probe_skaddr, off.probe_srtt) = (sk, srtt),
        _ => off.probe_skaddr = u32::MAX,
    }
    let single = |event: &str| match fields(event, &["skaddr"]).as_deref() {
        Some(&[sk]) => sk,
        _ => u32::MAX,
    };
    off.retransmit_skaddr = single("tcp/tcp_retransmit_skb");
    off.retransmit_err = fields("tcp/tcp_retransmit_skb", &["err"])
        .and_then(|f| f.first().copied())
        .unwrap_or(u32::MAX);
    // Optional: without it each retransmitted skb counts one segment.
    off.retransmit_skbaddr = fields("tcp/tcp_retransmit_skb", &["skbaddr"])
        .and_then(|f| f.first().copied())
        .unwrap_or(u32::MAX);
    off.send_reset_skaddr = single("tcp/tcp_send_reset");
    off.receive_reset_skaddr = single("tcp/tcp_receive_reset");
    off
}

/// [`net_offsets_from`] over tracefs.
pub fn read_net_offsets(tracefs: &Path) -> NetOffsets {
    net_offsets_from(|event| {
        std::fs::read_to_string(tracefs.join("events").join(event).join("format")).ok()
    })
}

/// Whether the hook of `program` (a name in [`NET_TRACEPOINTS`]) has its offsets.
pub fn net_hook_usable(off: &NetOffsets, program: &str) -> bool {
    let first = match program {
        "inet_sock_set_state" => off.state_skaddr,
        "sock_send_length" => off.send_sk,
        "sock_recv_length" => off.recv_sk,
        "tcp_probe" => off.probe_skaddr,
        "tcp_retransmit_skb" => off.retransmit_skaddr,
        "tcp_send_reset" => off.send_reset_skaddr,
        "tcp_receive_reset" => off.receive_reset_skaddr,
        _ => u32::MAX,
    };
    first != u32::MAX
}

#[cfg(test)]
mod tests {

    #[test]
    fn sample_ring_scales_with_cpus() {
        // Agent: 19 Hz on 2 CPUs needs 11 samples (186 KiB): the 1 MiB floor.
        assert_eq!(sample_ring_bytes(2, 19), 1 << 20);
        // 997 Hz on 2 CPUs: 598 samples of 16.1 KiB = 9.6 MiB → 16 MiB.
        assert_eq!(sample_ring_bytes(2, 997), 16 << 20);
        // 99 Hz on 64 CPUs: 1900 samples = 30 MiB → 32 MiB.
        assert_eq!(sample_ring_bytes(64, 99), 32 << 20);
        assert_eq!(sample_ring_bytes(4096, 997), MAX_SAMPLE_RING_BYTES);
    }

    use super::*;

    const NEWTASK: &str = "name: task_newtask
ID: 205
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;
\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;
";

    #[test]
    fn format_offsets() {
        assert_eq!(parse_format_offset(NEWTASK, "pid"), Some(8));
        assert_eq!(parse_format_offset(NEWTASK, "comm"), Some(12));
        assert_eq!(parse_format_offset(NEWTASK, "clone_flags"), Some(32));
        assert_eq!(parse_format_offset(NEWTASK, "common_pid"), Some(4));
        assert_eq!(parse_format_offset(NEWTASK, "flags"), None);
    }

    #[test]
    fn net_offsets_from_formats_and_missing_hooks() {
        let send = "format:
\tfield:void * sk;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 family;\toffset:16;\tsize:2;\tsigned:0;
\tfield:int ret;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int flags;\toffset:24;\tsize:4;\tsigned:1;
";
        let probe = "format:
\tfield:__u32 srtt;\toffset:100;\tsize:4;\tsigned:0;
\tfield:const void * skaddr;\toffset:136;\tsize:8;\tsigned:0;
";
        let off = net_offsets_from(|event| match event {
            "sock/sock_send_length" => Some(send.to_owned()),
            "tcp/tcp_probe" => Some(probe.to_owned()),
            // A format without the field the probe needs.
            "tcp/tcp_send_reset" => Some("format:\n".to_owned()),
            _ => None,
        });
        assert_eq!((off.send_sk, off.send_ret, off.send_flags), (8, 20, 24));
        // No inet_sock_set_state format: no remote addresses either.
        assert_eq!(off.state_daddr_v6, u32::MAX);
        assert_eq!((off.probe_skaddr, off.probe_srtt), (136, 100));
        assert!(net_hook_usable(&off, "sock_send_length"));
        assert!(net_hook_usable(&off, "tcp_probe"));
        for missing in ["inet_sock_set_state", "sock_recv_length", "tcp_send_reset"] {
            assert!(!net_hook_usable(&off, missing), "{missing}");
        }
    }

    /// `sock:inet_sock_set_state` as Linux 6.18 prints it (fields only).
    const SET_STATE: &str = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:60;\tsize:16;\tsigned:0;
";

    #[test]
    fn remote_address_offset_is_optional() {
        let with = net_offsets_from(|event| {
            (event == "sock/inet_sock_set_state").then(|| SET_STATE.to_owned())
        });
        // Read from the text (60 here, 56 in the fallback), not assumed.
        assert_eq!(with.state_daddr_v6, 60);
        assert_eq!((with.state_skaddr, with.state_protocol), (8, 30));
        assert!(net_hook_usable(&with, "inet_sock_set_state"));
        // A kernel whose format lacks `daddr_v6`: the hook still attaches, without addresses.
        let without = net_offsets_from(|event| {
            (event == "sock/inet_sock_set_state")
                .then(|| SET_STATE.replace("daddr_v6[16]", "daddr_other[16]"))
        });
        assert_eq!(without.state_daddr_v6, u32::MAX);
        assert!(net_hook_usable(&without, "inet_sock_set_state"));
    }

    /// `tcp:tcp_retransmit_skb` as Linux 6.18 prints it (the fields the collector reads).
    const RETRANSMIT: &str = "format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;
";

    #[test]
    fn retransmit_skb_and_segment_offsets_are_optional() {
        let with = net_offsets_from(|event| {
            (event == "tcp/tcp_retransmit_skb").then(|| RETRANSMIT.to_owned())
        });
        assert_eq!(
            (
                with.retransmit_skaddr,
                with.retransmit_skbaddr,
                with.retransmit_err
            ),
            (16, 8, 76)
        );
        // Without `skbaddr` the hook still attaches; each event then counts one segment.
        let without = net_offsets_from(|event| {
            (event == "tcp/tcp_retransmit_skb").then(|| RETRANSMIT.replace("skbaddr", "skbother"))
        });
        assert_eq!(without.retransmit_skbaddr, u32::MAX);
        assert!(net_hook_usable(&without, "tcp_retransmit_skb"));
        // sk_buff.cb is at 40 on 6.x, tcp_gso_segs at 8 in tcp_skb_cb.
        assert_eq!(skb_gso_segs_offset(Some(40), Some(8)), 48);
        assert_eq!(skb_gso_segs_offset(None, Some(8)), u32::MAX);
        assert_eq!(skb_gso_segs_offset(Some(40), None), u32::MAX);
        // Past the 48-byte control buffer: a layout this reader does not understand.
        assert_eq!(skb_gso_segs_offset(Some(40), Some(47)), u32::MAX);
    }

    #[test]
    fn verifier_rejection_names_program_and_log_tail() {
        let err = ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            verifier_log: aya_obj::VerifierLog::new(
                "0: R1=ctx() R10=fp0\n0: (79) r0 = *(u64 *)(r1 +8)\ninvalid bpf_context access off=8 size=8\nprocessed 1 insns (limit 1000000)\n".to_owned(),
            ),
        };
        let line = load_error("sys_enter", err).to_string();
        assert_eq!(
            line,
            "the kernel verifier rejected program sys_enter: 0: R1=ctx() R10=fp0 | 0: (79) r0 = *(u64 *)(r1 +8) | invalid bpf_context access off=8 size=8"
        );
        assert!(!line.contains('\n'));
    }

    #[test]
    fn attach_failures_are_classified_by_errno() {
        let sys = |errno| {
            ProgramError::SyscallError(aya::sys::SyscallError {
                call: "perf_event_open",
                io_error: std::io::Error::from_raw_os_error(errno),
            })
        };
        assert_eq!(
            AttachFailure::of(&sys(libc::EPERM)),
            AttachFailure::PermissionDenied
        );
        assert_eq!(
            AttachFailure::of(&sys(libc::EACCES)),
            AttachFailure::PermissionDenied
        );
        assert_eq!(
            AttachFailure::of(&sys(libc::ENOENT)),
            AttachFailure::MissingHook
        );
        assert_eq!(AttachFailure::of(&sys(libc::EINVAL)), AttachFailure::Other);
        assert!(attach_reason(&sys(libc::ENOENT)).ends_with("(this kernel lacks the hook)"));
        assert!(attach_reason(&sys(libc::EPERM)).contains("run as root or with CAP_BPF"));
    }

    #[test]
    fn verifier_tail_is_one_line() {
        let log = "0: (b7) r0 = 0\n\n1: (95) exit\nR0 !read_ok\nprocessed 2 insns\n";
        assert_eq!(
            log_tail(log, 3),
            "0: (b7) r0 = 0 | 1: (95) exit | R0 !read_ok"
        );
        assert_eq!(log_tail("", 3), "(empty verifier log)");
    }

    #[test]
    fn object_is_embedded() {
        // An ELF file for the BPF machine (EM_BPF = 247).
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }

    /// Property tests: tracefs format files are the kernel's, but a reader must not trust any
    /// file's shape.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn format_line() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u8..26, 0u32..512, 1u32..16).prop_map(|(c, off, size)| format!(
                    "\tfield:int {}x;\toffset:{off};\tsize:{size};\tsigned:1;",
                    char::from(b'a' + c)
                )),
                proptest::collection::vec(any::<u8>(), 0..60)
                    .prop_map(|b| String::from_utf8_lossy(&b).replace('\n', " ")),
                Just("\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;".to_owned()),
                Just("field:;offset:;".to_owned()),
            ]
        }

        proptest! {
            #![proptest_config(crate::untrusted::fuzz::config(256))]

            /// Any text: no panic, and a well-formed line's offset is found as written (the
            /// first line naming the field wins).
            #[test]
            fn format_offsets(lines in proptest::collection::vec(format_line(), 0..20), c in 0u8..26) {
                let text = lines.join("\n");
                let field = format!("{}x", char::from(b'a' + c));
                let got = parse_format_offset(&text, &field);
                let want = lines.iter().find_map(|l| {
                    let rest = l.strip_prefix(&format!("\tfield:int {field};\toffset:"))?;
                    rest.split(';').next()?.parse::<u32>().ok()
                });
                if let Some(w) = want {
                    // A garbage line before it may name the field too; when none does, the
                    // well-formed one is what is found.
                    let earlier_garbage = lines
                        .iter()
                        .take_while(|l| !l.starts_with(&format!("\tfield:int {field};")))
                        .any(|l| l.contains(&field));
                    if !earlier_garbage {
                        prop_assert_eq!(got, Some(w));
                    }
                }
                let _ = parse_format_offset(&text, "comm");
            }
        }
    }
}
