//! `ws1-probe bench-floor` (hidden): the cost floor for `cargo xtask bench syscalls`. Attaches
//! two empty raw tracepoint programs on sys_enter/sys_exit, so the benchmark can tell what any
//! per-syscall hook costs on this kernel from what the agent's own programs add.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use ws1_probe::{
    ebpf::{self, LoadOptions, TRACEFS},
    preflight,
};
use ws1_probe_common::{
    check::{FLOOR_PID_SYS_ENTER, FLOOR_PID_SYS_EXIT, FLOOR_SYS_ENTER, FLOOR_SYS_EXIT},
    hist::DEFAULT_EXPORT_BOUNDS_NS,
};

/// Attach empty sys_enter/sys_exit programs, print `ready`, and wait for SIGTERM/SIGINT
#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    /// Attach programs that only call bpf_get_current_pid_tgid: the floor of any program that
    /// filters by process
    #[arg(long)]
    pub pid_helper: bool,
}

pub fn run(args: FloorArgs) -> anyhow::Result<()> {
    preflight::check_capabilities()?;
    preflight::ensure_tracefs()?;
    preflight::raise_memlock();
    let opts = LoadOptions {
        host_mode: false,
        offsets: ebpf::read_offsets(Path::new(TRACEFS)),
        bounds_ns: DEFAULT_EXPORT_BOUNDS_NS.to_vec(),
    };
    let mut object = ebpf::load(&opts)?;
    let (enter, exit) = if args.pid_helper {
        (FLOOR_PID_SYS_ENTER, FLOOR_PID_SYS_EXIT)
    } else {
        (FLOOR_SYS_ENTER, FLOOR_SYS_EXIT)
    };
    ebpf::attach_raw_tracepoint(&mut object, enter, "sys_enter")?;
    ebpf::attach_raw_tracepoint(&mut object, exit, "sys_exit")?;

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
    // Dropping the object closes the links, which detaches both programs.
    drop(object);
    Ok(())
}
