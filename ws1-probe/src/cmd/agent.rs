//! `ws1-probe agent`: attach the collectors and serve Prometheus metrics until stopped.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use anyhow::Context as _;
use tokio::{io::unix::AsyncFd, net::TcpListener};
use ws1_probe::{
    collectors::profile::{AGENT_FREQUENCY_HZ, UnwindMode},
    metrics::agent::own_usage,
    probe::Probe,
    profile::{binary::DEFAULT_CACHE_BYTES, pprof},
    server::{ProfileFn, Response},
    targeting::config::{Collectors, Settings},
};

use super::CommonArgs;

/// Run the agent
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address to serve /metrics, /healthz and /readyz on (also: WS1_PROBE_LISTEN)
    /// [default: 127.0.0.1:9479]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// TLS and basic authentication for the endpoint, in the web config format of Prometheus'
    /// exporters (tls_server_config, basic_auth_users with bcrypt hashes)
    #[arg(long, value_name = "FILE", env = "WS1_PROBE_WEB_CONFIG")]
    pub web_config: Option<std::path::PathBuf>,
    /// Turn on kernel BPF run-time statistics (kernel.bpf_stats_enabled) while the agent runs,
    /// so per-program run time and count are exported; costs ~20 ns per program run
    #[arg(long)]
    pub bpf_stats: bool,
    /// Trace allocations of every selected process with uprobes (alloc metrics, leak suspects);
    /// costs a few microseconds per malloc/free. Per service: `precise_alloc = true` in the config
    #[arg(long)]
    pub precise_alloc: bool,
    #[command(flatten)]
    pub allocator: super::leaks::AllocatorArgs,
    /// Split the network series of every selected process by remote address (a `remote`
    /// label); needs a selector. Per service: `remote_addresses = true` in the config
    #[arg(long)]
    pub remote_addresses: bool,
    /// Keep every capability after start-up (by default the agent keeps only those it uses at
    /// run time: CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH,
    /// CAP_CHECKPOINT_RESTORE, CAP_SYSLOG, and CAP_SYS_ADMIN with precise allocation tracing)
    #[arg(long)]
    pub keep_capabilities: bool,
    /// Collectors to run, comma-separated: syscalls, net, memory, profile, sched, block,
    /// resources, host (or all)
    #[arg(long, default_value = "all", value_parser = Collectors::parse)]
    pub collectors: Collectors,
    /// Continuous on-CPU profiling rate, samples per second per CPU (0 turns it off); profiles
    /// are served at /debug/pprof/profile?seconds=N
    #[arg(long, default_value_t = AGENT_FREQUENCY_HZ)]
    pub profile_frequency: u64,
    /// User stack unwinding of the continuous profiler
    #[arg(long, value_enum, default_value = "auto")]
    pub unwind: UnwindMode,
    /// Symbolize profiles from ELF symbol tables only, without DWARF: saves the tens of MiB
    /// parsed DWARF of a large binary takes, but loses file:line, inline frames and functions
    /// only DWARF names (e.g. glibc's process entry, so more stacks count as truncated)
    #[arg(long)]
    pub profile_symbols_only: bool,
    /// Host mode: a command name's own `service` label retires after this long without
    /// activity (its series stop; later counts go to `other`), freeing the slot for a name that
    /// became busy
    #[arg(long, default_value = "5m", value_parser = ws1_probe::units::parse_duration)]
    pub label_idle_retire: std::time::Duration,
    /// Capacity of a kernel map, NAME=ENTRIES (repeatable), e.g. SYSCALL_HIST=8192; a full
    /// map's warning names the one to raise
    #[arg(long, value_name = "NAME=ENTRIES", value_parser = ws1_probe::drops::parse_map_entries)]
    pub map_entries: Vec<(String, u32)>,
    /// Bytes the profiler's symbolization and unwinding caches may hold together (split between
    /// them; least recently used binaries are dropped past it, and a binary's entries go when its
    /// last process exits). Sizes are exported as ws1_probe_agent_cache_bytes
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CACHE_BYTES)]
    pub profile_cache_bytes: u64,
}

type Shared = Arc<Mutex<Option<Probe>>>;

/// Flags, environment and config file resolved into settings; at start and at each SIGHUP.
fn resolve(args: &AgentArgs) -> anyhow::Result<Settings> {
    let mut settings = super::settings_with(
        &args.common,
        ws1_probe::targeting::config::FlagOverrides {
            listen: args.listen.clone(),
            bpf_stats: args.bpf_stats,
            precise_alloc: args.precise_alloc,
            remote_addresses: args.remote_addresses,
            allocator: ws1_probe::targeting::config::AllocatorConfig {
                lib: args.allocator.alloc_lib.clone(),
                prefix: args.allocator.alloc_prefix.clone(),
            },
            ..Default::default()
        },
    )?;
    settings.collectors = args.collectors;
    settings.profile.frequency_hz = args.profile_frequency;
    settings.profile.unwind = args.unwind;
    settings.profile.debug_info = !args.profile_symbols_only;
    settings.profile.cache_bytes = args.profile_cache_bytes;
    settings.labels.idle_retire = args.label_idle_retire;
    settings.map_entries = args.map_entries.clone();
    Ok(settings)
}

/// SIGHUP: reads the configuration again and applies it; an invalid one keeps the running
/// configuration and says why in one line.
async fn reload(args: &AgentArgs, shared: &Shared) {
    let settings = match resolve(args) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!("reload failed, keeping the running configuration: {err:#}");
            return;
        }
    };
    let state = Arc::clone(shared);
    let applied = tokio::task::spawn_blocking(move || {
        lock(&state).as_mut().map(|probe| probe.reload(&settings))
    })
    .await;
    match applied {
        Ok(Some(Ok(r))) => {
            tracing::info!(
                "reloaded the configuration: {} of {} processes targeted",
                r.scan.targeted,
                r.scan.seen
            );
            if !r.needs_restart.is_empty() {
                tracing::warn!(
                    "changed but not applied until the agent restarts: {}; restart the agent to apply them",
                    r.needs_restart.join(", ")
                );
            }
        }
        Ok(Some(Err(err))) => {
            tracing::error!("reload failed, keeping the running configuration: {err}");
        }
        Ok(None) => tracing::warn!(
            "reload ignored: the collectors are still starting; send SIGHUP again once /readyz answers 200"
        ),
        Err(err) => tracing::error!("reload failed: {err}"),
    }
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    // glibc gives each thread that allocates its own arena (64 MiB of address space, and freed
    // memory that stays resident in it); the agent's few threads gain nothing from them.
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if args.profile_frequency > 10_000 {
        anyhow::bail!(
            "invalid --profile-frequency {}: use 0 (off) to 10000; 19 is cheap enough to leave on",
            args.profile_frequency
        );
    }
    let settings = resolve(&args)?;
    let web = match &args.web_config {
        Some(path) => ws1_probe::webconfig::WebConfig::load(path)?,
        None => ws1_probe::webconfig::WebConfig::default(),
    };
    for name in &web.ignored {
        tracing::warn!(
            "web config: {name} is accepted for compatibility but has no effect here (rustls keeps its own safe defaults); remove it to silence this"
        );
    }
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let protection = match (&web.tls, &web.auth, web.client_cert_required) {
        (_, _, true) => ", client certificates required",
        (_, Some(_), _) => ", basic authentication",
        _ => "",
    };
    let web = Arc::new(web);
    let profiling = settings.collectors.profile && args.profile_frequency > 0;
    // Two workers, so `/healthz` is answered while the other waits for the probe's lock; map
    // reads and renders run on the (small) blocking pool.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut signals = Signals::register()?;
        // Bind first: a port in use fails fast, before anything is loaded into the kernel.
        let listener = TcpListener::bind(settings.listen).await.map_err(|err| {
            if err.kind() == std::io::ErrorKind::AddrInUse {
                anyhow::anyhow!(
                    "cannot listen on {}: address already in use; stop the other process or pick another address with --listen",
                    settings.listen
                )
            } else {
                anyhow::anyhow!("cannot listen on {}: {err}", settings.listen)
            }
        })?;
        let shared: Shared = Arc::new(Mutex::new(None));
        let ready = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let render_state = Arc::clone(&shared);
        let mut server_stop = stop_rx.clone();
        let profile_state = Arc::clone(&shared);
        let profile: Option<Arc<ProfileFn>> = profiling.then(|| {
            let f: Arc<ProfileFn> = Arc::new(move |seconds| {
                let state = Arc::clone(&profile_state);
                Box::pin(profile_window(state, seconds))
            });
            f
        });
        let server = tokio::spawn(ws1_probe::server::serve(
            listener,
            Arc::clone(&ready),
            move || render(&render_state),
            profile,
            Arc::clone(&web),
            async move {
                let _ = server_stop.wait_for(|stop| *stop).await;
            },
        ));

        let load_settings = settings.clone();
        let mut probe = tokio::task::spawn_blocking(move || -> anyhow::Result<Probe> {
            let mut probe = Probe::start(&load_settings).context("cannot start the collectors")?;
            let n = probe
                .attach_precise_alloc(&load_settings.precise_alloc)
                .context("cannot attach the allocation probes")?;
            if n > 0 {
                tracing::info!("precise allocation tracing on {n} process(es)");
            }
            Ok(probe)
        })
        .await
        .context("loader task failed")??;
        // Start-up reads large files once (kernel BTF, executables checked for frame
        // pointers); give the freed heap back instead of keeping it in the allocator's arenas.
        // SAFETY: malloc_trim only releases free memory; it has no preconditions.
        unsafe { libc::malloc_trim(0) };
        if !args.keep_capabilities {
            drop_capabilities(
                settings.precise_alloc != ws1_probe::targeting::config::PreciseAlloc::Off,
            );
        }
        tracing::info!(
            "observing {}: {} of {} processes targeted",
            settings.targets.describe(),
            probe.scan.targeted,
            probe.scan.seen
        );
        let ring = probe.take_exec_ring();
        // Read the maps once before declaring readiness. This read does not rank services for
        // the label cap: the first scrape does, once there is activity to rank by.
        let _ = probe.syscalls.snapshot();
        // Profile windows are kept only while a /debug/pprof/profile request waits for them.
        probe.profiles.keep_only_for_readers();
        *lock(&shared) = Some(probe);
        if let Some(ring) = ring {
            let follow_state = Arc::clone(&shared);
            let mut follow_stop = stop_rx.clone();
            // SAFETY: the ring buffer owns its fd, and the AsyncFd owns the ring buffer, so the fd
            // stays open for as long as it is registered.
            let mut fd = unsafe { AsyncFd::register(ring) }
                .map_err(|e| anyhow::anyhow!("cannot poll the exec event ring buffer: {e}"))?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = follow_stop.wait_for(|stop| *stop) => return,
                        guard = fd.readable_mut() => {
                            let Ok(mut guard) = guard else { return };
                            if let Some(probe) = lock(&follow_state).as_mut() {
                                probe.drain_execs(guard.get_inner_mut());
                            }
                            guard.clear_ready();
                        }
                    }
                }
            });
        }
        // The always-on memory signal samples every few seconds, scraped or not, so its growth
        // slope does not depend on the scrape interval.
        let sample_state = Arc::clone(&shared);
        let mut sample_stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ws1_probe::collectors::memory::SAMPLE_EVERY);
            loop {
                tokio::select! {
                    () = stopped(&mut sample_stop) => return,
                    _ = tick.tick() => {
                        let state = Arc::clone(&sample_state);
                        let _ = tokio::task::spawn_blocking(move || {
                            if let Some(probe) = lock(&state).as_mut() {
                                probe.tick();
                            }
                        })
                        .await;
                    }
                }
            }
        });
        if profiling {
            // Streamed samples (DWARF mode) fill their ring buffer in seconds: unwind them often.
            let poll_state = Arc::clone(&shared);
            let mut poll_stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
                loop {
                    tokio::select! {
                        () = stopped(&mut poll_stop) => return,
                        _ = tick.tick() => {
                            let state = Arc::clone(&poll_state);
                            let _ = tokio::task::spawn_blocking(move || {
                                if let Some(probe) = lock(&state).as_mut() {
                                    probe.poll_streams();
                                }
                            })
                            .await;
                        }
                    }
                }
            });
        }
        ready.store(true, Ordering::Release);
        let rss = own_usage().map_or(0, |(_, rss)| rss);
        tracing::info!(
            "ready in {} ms: serving {scheme}://{}/metrics{protection} (agent RSS {:.1} MiB)",
            started.elapsed().as_millis(),
            settings.listen,
            rss as f64 / (1 << 20) as f64
        );

        signals.wait(|| reload(&args, &shared)).await;
        tracing::info!("stopping: detaching programs");
        let _ = stop_tx.send(true);
        let _ = server.await;
        // Dropping the probe closes the links and maps, which detaches every program.
        drop(lock(&shared).take());
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves once the agent is stopping (the guard `wait_for` returns is not `Send`).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Option<Probe>> {
    // A panic while holding the lock cannot leave the probe inconsistent (map reads only).
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `/debug/pprof/profile?seconds=N`: drains the profiler so the window starts now, waits,
/// drains again, and serves the windows in between as gzipped pprof.
async fn profile_window(state: Shared, seconds: u64) -> Response {
    let reader = match lock(&state).as_mut() {
        Some(probe) => {
            if !probe.profile_drain() {
                return Response::text(404, "profiling is off\n");
            }
            probe.profiles.open()
        }
        None => return Response::text(503, "not ready: programs are still loading\n"),
    };
    tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    let profile = match lock(&state).as_mut() {
        Some(probe) => {
            probe.profile_drain();
            probe.profiles.take(reader).0
        }
        None => return Response::text(503, "stopping\n"),
    };
    match pprof::encode_gzip(&profile) {
        Ok(body) => Response {
            status: 200,
            content_type: "application/octet-stream",
            encoding: None,
            headers: "",
            body,
        },
        Err(err) => Response::text(500, &format!("cannot encode the profile: {err}\n")),
    }
}

fn render(shared: &Shared) -> String {
    let body = match lock(shared).as_mut() {
        Some(probe) => probe.render(),
        None => String::new(),
    };
    // A render builds every series and throws them away; give that heap back rather than keep
    // the peak of the largest scrape resident.
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
    body
}

/// The signals the agent handles, registered at start so a SIGHUP during loading is queued
/// rather than fatal.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            hup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Waits for SIGTERM or SIGINT; each SIGHUP runs `on_hup` (a reload) meanwhile.
    async fn wait<F, Fut>(&mut self, mut on_hup: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        loop {
            tokio::select! {
                _ = self.term.recv() => {
                    tracing::info!("received SIGTERM");
                    return;
                }
                _ = self.int.recv() => {
                    tracing::info!("received SIGINT");
                    return;
                }
                _ = self.hup.recv() => {
                    tracing::info!("received SIGHUP: reloading the configuration");
                    on_hup().await;
                }
            }
        }
    }
}

/// Keeps only the capabilities the agent uses at run time, in every thread
/// ([`ws1_probe::privileges`]); a failure is logged, not fatal (the agent works, with more
/// privilege than it needs).
fn drop_capabilities(uprobes: bool) {
    use ws1_probe::privileges;
    let last = privileges::last_cap();
    let mask = privileges::kept_mask(last, uprobes);
    match privileges::drop_all_threads(mask, last) {
        Ok(()) => tracing::info!(
            "dropped capabilities; kept {}",
            privileges::names(mask).join(", ")
        ),
        Err(err) => tracing::warn!(
            "{err}; the agent runs with more privilege than it needs (report this; --keep-capabilities silences it)"
        ),
    }
}
