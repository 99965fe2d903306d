//! `ws1-probe bench-floor` (hidden): the cost floor for `cargo xtask bench syscalls` and
//! `cargo xtask bench alloc`. Attaches two empty raw tracepoint programs on sys_enter/sys_exit
//! (or, with `--uprobe-pid`, an empty uprobe/uretprobe pair on one process's malloc and free), so
//! the benchmark can tell what any such hook costs on this kernel from what the agent's own
//! programs add.

use std::{io::Write as _, num::NonZeroU32, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{ProgramError, UProbe, uprobe::UProbeScope},
};
use ws1_probe::{
    collectors::alloc::allocator_path,
    ebpf::{self, LoadOptions, TRACEFS, attach_reason, load_error},
    preflight,
};
use ws1_probe_common::{
    check::{
        FLOOR_BLOCK_IO_START, FLOOR_BLOCK_RQ_COMPLETE, FLOOR_PID_SYS_ENTER, FLOOR_PID_SYS_EXIT,
        FLOOR_SCHED, FLOOR_SYS_ENTER, FLOOR_SYS_EXIT, FLOOR_UPROBE, FLOOR_URETPROBE,
    },
    hist::DEFAULT_EXPORT_BOUNDS_NS,
};

/// Attach empty sys_enter/sys_exit programs, print `ready`, and wait for SIGTERM/SIGINT
#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    /// Attach programs that only call bpf_get_current_pid_tgid: the floor of any program that
    /// filters by process
    #[arg(long)]
    pub pid_helper: bool,
    /// Instead of the syscall pair, attach an empty uprobe to malloc and free and an empty
    /// uretprobe to malloc in this process's C library, for this process only: the trap floor
    /// of precise allocation tracing
    #[arg(long, conflicts_with = "pid_helper")]
    pub uprobe_pid: Option<NonZeroU32>,
    /// Instead of the syscall pair, attach an empty tp_btf program to sched_switch: the floor
    /// of the run-queue hook
    #[arg(long, conflicts_with_all = ["pid_helper", "uprobe_pid", "block"])]
    pub sched: bool,
    /// Instead of the syscall pair, attach empty tp_btf programs to block_io_start and
    /// block_rq_complete with BPF run-time statistics on, and print each program's run time
    /// and run count (`stat PROGRAM NS RUNS`) when stopped: the floor of the block collector
    #[arg(long, conflicts_with_all = ["pid_helper", "uprobe_pid"])]
    pub block: bool,
}

pub fn run(args: FloorArgs) -> anyhow::Result<()> {
    preflight::check_capabilities()?;
    preflight::ensure_tracefs()?;
    preflight::raise_memlock();
    let opts = LoadOptions {
        host_mode: false,
        offsets: ebpf::read_offsets(Path::new(TRACEFS)),
        bounds_ns: DEFAULT_EXPORT_BOUNDS_NS.to_vec(),
        profile: ws1_probe_common::profile::ProfileSettings::FALLBACK,
        sample_rate_hz: 0,
        map_entries: Vec::new(),
    };
    let mut object = ebpf::load(&opts)?;
    let mut stats = None;
    if args.sched {
        let btf = aya::Btf::from_sys_fs().context("cannot read kernel BTF")?;
        ebpf::attach_btf_tracepoints(&mut object, &FLOOR_SCHED, &btf)
            .map_err(|reason| anyhow::anyhow!("cannot attach the run-queue floor: {reason}"))?;
    } else if args.block {
        stats = Some(
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("cannot enable BPF run-time statistics")?,
        );
        let btf = aya::Btf::from_sys_fs().context("cannot read kernel BTF")?;
        ebpf::attach_btf_tracepoints(
            &mut object,
            &[
                (FLOOR_BLOCK_IO_START, "block_io_start"),
                (FLOOR_BLOCK_RQ_COMPLETE, "block_rq_complete"),
            ],
            &btf,
        )
        .map_err(|reason| anyhow::anyhow!("cannot attach the block floor: {reason}"))?;
    } else if let Some(pid) = args.uprobe_pid {
        let lib = allocator_path(pid.get())?;
        for (program, symbol) in [
            (FLOOR_UPROBE, "malloc"),
            (FLOOR_UPROBE, "free"),
            (FLOOR_URETPROBE, "malloc"),
        ] {
            attach_uprobe(&mut object, program, symbol, &lib, pid)?;
        }
    } else {
        let (enter, exit) = if args.pid_helper {
            (FLOOR_PID_SYS_ENTER, FLOOR_PID_SYS_EXIT)
        } else {
            (FLOOR_SYS_ENTER, FLOOR_SYS_EXIT)
        };
        ebpf::attach_raw_tracepoint(&mut object, enter, "sys_enter")?;
        ebpf::attach_raw_tracepoint(&mut object, exit, "sys_exit")?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Handlers first, then `ready`: a SIGTERM sent right after the line must not kill us.
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut out = std::io::stdout();
        writeln!(out, "ready").context("cannot write to stdout")?;
        out.flush().context("cannot write to stdout")?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    if stats.is_some() {
        let mut out = std::io::stdout();
        for name in [FLOOR_BLOCK_IO_START, FLOOR_BLOCK_RQ_COMPLETE] {
            if let Some(info) = object.program(name).and_then(|p| p.info().ok()) {
                writeln!(
                    out,
                    "stat {name} {} {}",
                    info.run_time().as_nanos(),
                    info.run_count()
                )
                .context("cannot write to stdout")?;
            }
        }
        out.flush().context("cannot write to stdout")?;
    }
    // Dropping the object closes the links, which detaches the programs.
    drop(object);
    drop(stats);
    Ok(())
}

/// Loads `program` (once) and attaches it to `symbol` in `lib`, for process `pid` only.
fn attach_uprobe(
    object: &mut Ebpf,
    program: &str,
    symbol: &str,
    lib: &Path,
    pid: NonZeroU32,
) -> anyhow::Result<()> {
    let prog: &mut UProbe = object
        .program_mut(program)
        .with_context(|| format!("program {program} is not in the eBPF object"))?
        .try_into()
        .map_err(|e: ProgramError| load_error(program, e))?;
    if prog.fd().is_err() {
        prog.load().map_err(|e| load_error(program, e))?;
    }
    prog.attach(symbol, lib, UProbeScope::OneProcess(pid))
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot attach {program} to {symbol} in {}: {}",
                lib.display(),
                attach_reason(&e)
            )
        })?;
    Ok(())
}
