//! One simulated process (`ws1-sim serve --role ROLE`), run by the supervisor through a link
//! named after the role so the kernel gives it that command name.
//!
//! - `agent-ops` serves the users: quotes and orders go to `trading-engine`, memory stores and
//!   recalls to `memory-ops`.
//! - `trading-engine` answers quotes itself; an order is a risk check at `risk`, then
//!   pgbench's simple-update transaction at PostgreSQL (when `--db-port` is given).
//! - `risk` checks an order; `memory-ops` stores and recalls agent memory.
//! - `users` is the load: `--users` connections to `agent-ops`, `--rps` requests per second in
//!   all, paced.
//!
//! Every server runs a thread per connection and each handler keeps its own upstream
//! connections (a pool of one per handler); the DB has a shared pool of `--db-conns`.
//! Commands arrive on stdin: `fault NAME` switches a fault on, `stop` (or end of input) stops:
//! no new requests, wait for the clients to hang up, close the upstream connections, print the
//! final report and exit.

use std::{
    io::{BufRead as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    pg::{self, PgConn},
    proto::{self, CallError, Upstream},
    stats::{Hist, SLOW_MS, Side, Stats, render_endpoints},
};

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    pub role: String,
    /// Upstream ports.
    #[arg(long)]
    pub te: Option<u16>,
    #[arg(long)]
    pub mo: Option<u16>,
    #[arg(long)]
    pub risk: Option<u16>,
    #[arg(long)]
    pub ao: Option<u16>,
    /// A loopback port nothing listens on (the "risk replica that is down" of the errors fault).
    #[arg(long)]
    pub dead: Option<u16>,
    #[arg(long)]
    pub db_port: Option<u16>,
    #[arg(long, default_value_t = 4)]
    pub db_conns: usize,
    #[arg(long, default_value_t = 100.0)]
    pub rps: f64,
    #[arg(long, default_value_t = 10)]
    pub users: usize,
    #[arg(long, default_value_t = 1000)]
    pub report_ms: u64,
    /// CPU hog: threads (default: one per CPU) and CPU seconds in all (default: until stop).
    #[arg(long)]
    pub hog_threads: Option<usize>,
    #[arg(long)]
    pub hog_seconds: Option<f64>,
    /// Bound on what the leak keeps, in MiB.
    #[arg(long, default_value_t = LEAK_MAX_MIB)]
    pub leak_max_mib: u64,
}

/// Extra delay of one in ten of risk's requests under the latency fault: over the plan's
/// 100 ms threshold, so risk's (and its callers') p99 crosses it.
pub const SPIKE_MS: u64 = 150;
/// Bytes memory-ops keeps (touched) per request under the leak fault, and the bound in all.
pub const LEAK_PER_REQUEST: usize = 256 * 1024;
pub const LEAK_MAX_MIB: u64 = 2048;

#[derive(Default)]
struct Faults {
    latency: AtomicBool,
    leak: AtomicBool,
    cpu: AtomicBool,
    errors: AtomicBool,
    churn: AtomicBool,
}

struct Ctx {
    args: ServeArgs,
    stats: Stats,
    faults: Faults,
    stopping: AtomicBool,
    handlers: AtomicUsize,
    /// Requests served by this process (drives the fault schedules: every n-th request).
    served: AtomicU64,
    orders: AtomicU64,
    leaked: Mutex<Vec<Vec<u8>>>,
    leaked_bytes: AtomicU64,
    hog_ns: AtomicU64,
    /// Requests the latency fault delayed.
    spiked: AtomicU64,
    /// Server-side latency (request read → reply written); the users' is end to end.
    latency: Hist,
    db: DbPool,
    /// memory-ops' store: a bounded ring of 1 KiB records.
    memory: Mutex<(Vec<Vec<u8>>, usize)>,
}

/// The trading engine's DB pool: at most `max` connections, shared by its handlers.
#[derive(Default)]
struct DbPool {
    idle: Mutex<(Vec<PgConn>, usize)>,
    freed: Condvar,
}

impl Ctx {
    fn churn(&self) -> bool {
        self.faults.churn.load(Relaxed)
    }

    fn db_get(&self, port: u16) -> std::io::Result<PgConn> {
        let mut g = self.db.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if !self.churn()
                && let Some(c) = g.0.pop()
            {
                return Ok(c);
            }
            if g.1 < self.args.db_conns.max(1) {
                g.1 += 1;
                drop(g);
                let conn = PgConn::connect(port);
                let ok = conn.is_ok();
                self.stats.add(Side::Client, port, |c| {
                    if ok {
                        c.connects += 1;
                        c.handshakes += 2;
                    } else {
                        c.failed += 1;
                    }
                });
                if !ok {
                    self.db_drop();
                }
                return conn;
            }
            g = self.db.freed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn db_put(&self, conn: PgConn) {
        if self.churn() || self.stopping.load(Relaxed) {
            conn.close();
            self.db_drop();
            return;
        }
        self.db
            .idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .push(conn);
        self.db.freed.notify_one();
    }

    fn db_drop(&self) {
        self.db.idle.lock().unwrap_or_else(|e| e.into_inner()).1 -= 1;
        self.db.freed.notify_one();
    }
}

/// A small xorshift generator: deterministic per thread, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Some CPU work standing in for pricing or risk arithmetic (~`rounds` × a few ns).
fn compute(seed: u64, rounds: u32) -> u64 {
    let mut x = seed | 1;
    for _ in 0..rounds {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    std::hint::black_box(x)
}

pub fn run(args: ServeArgs) -> Result<()> {
    // The supervisor dies → so do we (its stdin pipe closing stops us gracefully too).
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        stats: Stats::default(),
        faults: Faults::default(),
        stopping: AtomicBool::new(false),
        handlers: AtomicUsize::new(0),
        served: AtomicU64::new(0),
        orders: AtomicU64::new(0),
        leaked: Mutex::new(Vec::new()),
        leaked_bytes: AtomicU64::new(0),
        hog_ns: AtomicU64::new(0),
        spiked: AtomicU64::new(0),
        latency: Hist::default(),
        db: DbPool::default(),
        memory: Mutex::new((Vec::new(), 0)),
    });
    let mut workers = Vec::new();
    if args.role == "users" {
        let port = args.ao.context("users need --ao")?;
        let users = args.users.max(1);
        // Each user sends every `users / rps` seconds, offset so the load is even.
        let interval = Duration::from_secs_f64(users as f64 / args.rps.max(0.001));
        let start = Instant::now();
        for i in 0..users {
            let ctx = Arc::clone(&ctx);
            let first = start + interval.mul_f64(i as f64 / users as f64);
            workers.push(std::thread::spawn(move || {
                user(&ctx, port, i as u64, first, interval)
            }));
        }
        println!("listening 0");
    } else {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
        let port = listener.local_addr()?.port();
        let ctx2 = Arc::clone(&ctx);
        std::thread::spawn(move || accept(&ctx2, listener, port));
        println!("listening {port}");
    }
    let _ = std::io::stdout().flush();
    let reporter = {
        let ctx = Arc::clone(&ctx);
        std::thread::spawn(move || {
            let every = Duration::from_millis(ctx.args.report_ms.max(100));
            let mut next = Instant::now() + every;
            while !ctx.stopping.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if Instant::now() >= next {
                    report(&ctx, "report");
                    next += every;
                }
            }
        })
    };
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["stop"] => break,
            ["fault", name] => fault(&ctx, name)?,
            _ => eprintln!("ws1-sim {}: unknown command {line:?}", args.role),
        }
    }
    // Stop: users finish their current request; servers wait for their clients to hang up.
    ctx.stopping.store(true, Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while ctx.handlers.load(Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = reporter.join();
    // Close the DB pool (Terminate gets no answer, so it is no exchange).
    let idle = std::mem::take(&mut ctx.db.idle.lock().unwrap_or_else(|e| e.into_inner()).0);
    for c in idle {
        c.close();
    }
    report(&ctx, "final");
    Ok(())
}

fn fault(ctx: &Arc<Ctx>, name: &str) -> Result<()> {
    let f = &ctx.faults;
    match name {
        "latency" => f.latency.store(true, Relaxed),
        "leak" => f.leak.store(true, Relaxed),
        "errors" => f.errors.store(true, Relaxed),
        "churn" => f.churn.store(true, Relaxed),
        "cpu" => {
            if !f.cpu.swap(true, Relaxed) && ctx.args.role == "trading-engine" {
                let threads = ctx
                    .args
                    .hog_threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                    .max(1);
                let each = ctx.args.hog_seconds.map(|s| s / threads as f64);
                for _ in 0..threads {
                    let ctx = Arc::clone(ctx);
                    std::thread::spawn(move || hog(&ctx, each));
                }
            }
        }
        other => bail!("unknown fault {other}"),
    }
    Ok(())
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Burns CPU until `seconds` of this thread's CPU time (or until stop).
fn hog(ctx: &Ctx, seconds: Option<f64>) {
    let limit = seconds.map(|s| (s * 1e9) as u64);
    let start = thread_cpu_ns();
    let mut last = 0;
    let mut x = 1u64;
    while !ctx.stopping.load(Relaxed) {
        x = compute(x, 100_000);
        let used = thread_cpu_ns() - start;
        ctx.hog_ns.fetch_add(used - last, Relaxed);
        last = used;
        if limit.is_some_and(|l| used >= l) {
            break;
        }
    }
}

fn accept(ctx: &Arc<Ctx>, listener: TcpListener, port: u16) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        ctx.stats.add(Side::Server, port, |c| c.connects += 1);
        ctx.handlers.fetch_add(1, Relaxed);
        let ctx = Arc::clone(ctx);
        std::thread::spawn(move || {
            handle(&ctx, stream, port);
            ctx.handlers.fetch_sub(1, Relaxed);
        });
    }
}

/// A handler's upstream connections.
struct Ups {
    te: Option<Upstream>,
    mo: Option<Upstream>,
    risk: Option<Upstream>,
    dead: Option<Upstream>,
    reply: Vec<u8>,
    rng: Rng,
}

fn handle(ctx: &Ctx, mut stream: TcpStream, port: u16) {
    let _ = stream.set_nodelay(true);
    let a = &ctx.args;
    let mut ups = Ups {
        te: a.te.map(Upstream::new),
        mo: a.mo.map(Upstream::new),
        risk: a.risk.map(Upstream::new),
        dead: a.dead.map(Upstream::new),
        reply: Vec::new(),
        rng: Rng(0x9e37_79b9_7f4a_7c15
            ^ u64::from(port)
            ^ (ctx.handlers.load(Relaxed) as u64) << 32),
    };
    let mut buf = Vec::new();
    let mut out = Vec::new();
    loop {
        let kind = match proto::read_frame(&mut stream, &mut buf) {
            Ok(Some(kind)) => kind,
            _ => return,
        };
        let started = Instant::now();
        let n = ctx.served.fetch_add(1, Relaxed);
        let Some((status, len)) = serve_one(ctx, &mut ups, kind, &buf, n) else {
            // The errors fault: abort the connection with a reset instead of answering.
            ctx.stats.add(Side::Server, port, |c| c.resets += 1);
            proto::abort(stream);
            return;
        };
        if proto::write_frame(&mut stream, status, 0, len, &mut out).is_err() {
            return;
        }
        let took = started.elapsed();
        ctx.latency.record(took.as_nanos() as u64);
        let slow = took > Duration::from_millis(SLOW_MS);
        ctx.stats.add(Side::Server, port, |c| {
            c.requests += 1;
            c.slow += u64::from(slow);
        });
    }
}

/// One request: (reply status, reply body length), or `None` to abort the connection.
fn serve_one(ctx: &Ctx, ups: &mut Ups, kind: u8, body: &[u8], n: u64) -> Option<(u8, usize)> {
    let churn = ctx.churn();
    let f = &ctx.faults;
    match ctx.args.role.as_str() {
        "risk" => {
            if f.errors.load(Relaxed) && n % 10 == 7 {
                return None;
            }
            if f.latency.load(Relaxed) && n.is_multiple_of(10) {
                std::thread::sleep(Duration::from_millis(SPIKE_MS));
                ctx.spiked.fetch_add(1, Relaxed);
            }
            compute(n, 2_000);
            Some((0, 16))
        }
        "memory-ops" => {
            if f.leak.load(Relaxed)
                && ctx.leaked_bytes.load(Relaxed) + LEAK_PER_REQUEST as u64
                    <= ctx.args.leak_max_mib << 20
            {
                // Touched, so it is resident: a cache that is never evicted.
                let block = vec![1u8; LEAK_PER_REQUEST];
                ctx.leaked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(block);
                ctx.leaked_bytes.fetch_add(LEAK_PER_REQUEST as u64, Relaxed);
            }
            let mut mem = ctx.memory.lock().unwrap_or_else(|e| e.into_inner());
            if kind == b'S' {
                let (ring, next) = &mut *mem;
                let record = body.to_vec();
                if ring.len() < 1024 {
                    ring.push(record);
                } else {
                    ring[*next % 1024] = record;
                }
                *next += 1;
                Some((0, 16))
            } else {
                Some((0, 4096))
            }
        }
        "trading-engine" => match kind {
            b'O' => Some((order(ctx, ups, churn), 16)),
            _ => {
                compute(n, 5_000);
                Some((0, 64))
            }
        },
        "agent-ops" => {
            let op = body.first().copied().unwrap_or(0);
            let (up, kind, len) = match op {
                0 => (ups.te.as_mut(), b'Q', 32),
                1 => (ups.te.as_mut(), b'O', 128),
                2 => (ups.mo.as_mut(), b'S', 1024),
                _ => (ups.mo.as_mut(), b'G', 32),
            };
            let status = match up {
                Some(up) => match up.call(&ctx.stats, kind, 0, len, churn, &mut ups.reply) {
                    Ok(s) => s,
                    Err(_) => {
                        ctx.stats.add(Side::Client, up.port, |c| c.failed += 1);
                        1
                    }
                },
                None => 1,
            };
            Some((status, 256))
        }
        _ => Some((1, 0)),
    }
}

/// An order: (errors fault: every second one tries the risk replica that is down first), a risk
/// check (retried on a new connection after a reset, up to 3 times), then the DB transaction.
fn order(ctx: &Ctx, ups: &mut Ups, churn: bool) -> u8 {
    let k = ctx.orders.fetch_add(1, Relaxed);
    if ctx.faults.errors.load(Relaxed)
        && k.is_multiple_of(2)
        && let Some(dead) = ups.dead.as_mut()
    {
        let _ = dead.call(&ctx.stats, b'R', 0, 96, true, &mut ups.reply);
    }
    let Some(risk) = ups.risk.as_mut() else {
        return 1;
    };
    let mut ok = false;
    for _ in 0..3 {
        match risk.call(&ctx.stats, b'R', 0, 96, churn, &mut ups.reply) {
            Ok(_) => {
                ok = true;
                break;
            }
            Err(CallError::Reset) => continue,
            Err(_) => break,
        }
    }
    if !ok {
        ctx.stats.add(Side::Client, risk.port, |c| c.failed += 1);
        return 1;
    }
    let Some(port) = ctx.args.db_port else {
        return 0;
    };
    let aid = ups.rng.below(100_000) as u32 + 1;
    let tid = ups.rng.below(10) as u32 + 1;
    let delta = ups.rng.below(10_001) as i32 - 5_000;
    let Ok(mut conn) = ctx.db_get(port) else {
        return 1;
    };
    for sql in pg::simple_update(aid, tid, 1, delta) {
        match conn.query(&sql) {
            Ok(()) => ctx.stats.add(Side::Client, port, |c| c.requests += 1),
            Err(e) if e.kind() == std::io::ErrorKind::Other => {
                // An error response is still one exchange.
                ctx.stats.add(Side::Client, port, |c| c.requests += 1);
            }
            Err(_) => {
                ctx.stats.add(Side::Client, port, |c| c.failed += 1);
                ctx.db_drop();
                return 1;
            }
        }
    }
    ctx.db_put(conn);
    0
}

/// One user: a connection to agent-ops (a new one per request under churn), paced requests.
/// Requests cycle quote, quote, order, store, recall.
fn user(ctx: &Ctx, port: u16, id: u64, first: Instant, interval: Duration) {
    let mut up = Upstream::new(port);
    let mut reply = Vec::new();
    let mut next = first;
    let mut k = id;
    while !ctx.stopping.load(Relaxed) {
        let now = Instant::now();
        if next > now {
            // Sleep in slices so stop is seen promptly.
            std::thread::sleep((next - now).min(Duration::from_millis(100)));
            continue;
        }
        // Behind by more than a second (a fault slowed us): skip ahead rather than burst.
        if now.duration_since(next) > Duration::from_secs(1) {
            next = now;
        }
        next += interval;
        let op = [0u8, 0, 1, 2, 3][(k % 5) as usize];
        k += 1;
        // The op travels as the body's first byte (the body is otherwise filler).
        let started = Instant::now();
        if up
            .call(&ctx.stats, b'A', op, 200, ctx.churn(), &mut reply)
            .is_err()
        {
            ctx.stats.add(Side::Client, port, |c| c.failed += 1);
        } else {
            ctx.latency.record(started.elapsed().as_nanos() as u64);
        }
    }
}

/// Process CPU seconds (user + system) of this process.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn report(ctx: &Ctx, what: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{what} {}", ctx.args.role);
    for line in render_endpoints(&ctx.stats.snapshot()) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(
        out,
        "x cpu_seconds={:.3} leaked_bytes={} hog_cpu_seconds={:.3} spiked={}",
        cpu_seconds(),
        ctx.leaked_bytes.load(Relaxed),
        ctx.hog_ns.load(Relaxed) as f64 / 1e9,
        ctx.spiked.load(Relaxed)
    );
    if let (Some(p50), Some(p99)) = (ctx.latency.quantile(0.5), ctx.latency.quantile(0.99)) {
        let _ = writeln!(out, "x p50_ms={:.4} p99_ms={:.4}", p50 / 1e6, p99 / 1e6);
    }
    let _ = writeln!(out, "end");
    let _ = out.flush();
}
