//! `cargo xtask bench load [-- --rps 1000 --users 100 --seconds 30]`: the WS1 simulator
//! (`ws1-sim`, with a private PostgreSQL) at the given load, once without the agent and once
//! under it with every collector on and BPF statistics enabled. Prints the agent's cost as %
//! of one core (its process CPU from /proc plus its BPF programs' run time from the kernel's
//! BPF statistics, which the agent exports with `--bpf-stats`), its RSS, each service's p50/p99
//! as the simulator measured it in both runs, and the request accounting: every (service,
//! side, port) count of the simulator against the agent's.

use std::{collections::BTreeMap, fs, path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::{
    bench_util::{Agent, rss_kib},
    run, tools, util,
};

struct Opts {
    rps: f64,
    users: usize,
    seconds: f64,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        rps: 1000.0,
        users: 100,
        seconds: 30.0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--rps" => o.rps = v.parse().context("--rps: a number")?,
            "--users" => o.users = v.parse().context("--users: a number")?,
            "--seconds" => o.seconds = v.parse().context("--seconds: a number")?,
            _ => bail!("bench load takes --rps N --users N --seconds S (got {a})"),
        }
    }
    Ok(o)
}

/// Parsed `final`/`final-x` lines: (service, side, port) → counts, service → extras.
type Finals = (
    BTreeMap<(String, String, String), BTreeMap<String, f64>>,
    BTreeMap<String, BTreeMap<String, f64>>,
);

fn finals(out: &str) -> Finals {
    let mut eps = BTreeMap::new();
    let mut xs = BTreeMap::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let kind = words.next();
        let mut kv: BTreeMap<String, String> = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let num = |kv: BTreeMap<String, String>| -> BTreeMap<String, f64> {
            kv.into_iter()
                .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
                .collect()
        };
        match kind {
            Some("final") => {
                let key = (
                    kv.remove("service").unwrap_or_default(),
                    kv.remove("side").unwrap_or_default(),
                    kv.remove("port").unwrap_or_default(),
                );
                eps.insert(key, num(kv));
            }
            Some("final-x") => {
                let service = kv.remove("service").unwrap_or_default();
                xs.insert(service, num(kv));
            }
            _ => {}
        }
    }
    (eps, xs)
}

/// Sum of the samples of `name` whose label set contains every `labels` pair.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz.max(1.0))
}

const SERVICES: [&str; 4] = ["agent-ops", "trading-engine", "risk", "memory-ops"];

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    tools::ensure_postgres()?;
    run::cargo_build_release(&["ws1-probe", "ws1-sim"])?;
    let release = util::target_dir().join("release");
    let (probe, sim) = (release.join("ws1-probe"), release.join("ws1-sim"));
    let logs = util::target_dir().join("bench-load");
    let _ = fs::remove_dir_all(&logs);
    fs::create_dir_all(&logs)?;
    let pg = logs.join("pg");
    let out = util::capture(Command::new(&sim).arg("pg-start").arg(&pg))?;
    let result = (|| -> Result<()> {
        let port: u16 = out
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("pg-start said {out:?}"))?;
        bench(&o, &probe, &sim, &logs, port)
    })();
    let _ = Command::new(&sim).arg("pg-stop").arg(&pg).output();
    result
}

fn bench(o: &Opts, probe: &Path, sim: &Path, logs: &Path, pg_port: u16) -> Result<()> {
    let mut cfg = String::new();
    for s in SERVICES {
        cfg.push_str(&format!(
            "[[service]]\nname = \"{s}\"\nmatch = {{ comm = \"^{s}$\" }}\n"
        ));
    }
    cfg.push_str(&format!(
        "[[service]]\nname = \"db\"\nmatch = {{ comm = \"^postgres$\" }}\n\
         [[dependency]]\nname = \"postgres\"\nport = {pg_port}\nhandshake_exchanges = 2\n"
    ));
    let cfg_path = logs.join("ws1.toml");
    fs::write(&cfg_path, cfg)?;
    let run_sim = || -> Result<(String, f64)> {
        let started = Instant::now();
        let out = util::capture(
            Command::new(sim)
                .arg("run")
                .args(["--db-port", &pg_port.to_string()])
                .args(["--rps", &o.rps.to_string(), "--users", &o.users.to_string()])
                .args(["--duration", &o.seconds.to_string(), "--warmup", "1"])
                .args(["--report-every", "10"])
                .env("TMPDIR", logs),
        )?;
        Ok((out, started.elapsed().as_secs_f64()))
    };

    eprintln!(
        "bench load: {} req/s, {} users, {} s without the agent",
        o.rps, o.users, o.seconds
    );
    let (base_out, _) = run_sim()?;
    let (_, base_x) = finals(&base_out);

    eprintln!("bench load: the same under the agent (every collector, --bpf-stats)");
    let cfg_arg = cfg_path.display().to_string();
    let mut agent =
        Agent::start_with(probe, &["--config", &cfg_arg, "--bpf-stats"], logs, "agent")?;
    let pid = agent.proc.pid();
    let before = agent.scrape()?;
    let (cpu0, bpf0) = (
        cpu_seconds(pid)?,
        sum(&before, "ws1_probe_bpf_program_run_seconds_total", &[]),
    );
    let (out, wall) = run_sim()?;
    let after = agent.scrape()?;
    let (cpu1, bpf1) = (
        cpu_seconds(pid)?,
        sum(&after, "ws1_probe_bpf_program_run_seconds_total", &[]),
    );
    let rss = rss_kib(&mut agent.proc)?;
    let (eps, xs) = finals(&out);

    // Request accounting: every endpoint of the four services, and PostgreSQL's server side.
    let (mut exact, mut off) = (0, Vec::new());
    let mut requests = 0.0;
    for ((service, side, port), c) in &eps {
        if !SERVICES.contains(&service.as_str()) {
            continue;
        }
        let l = [
            ("service", service.as_str()),
            ("side", side.as_str()),
            ("port", port.as_str()),
        ];
        let want = c.get("requests").copied().unwrap_or(0.0);
        let got = sum(&after, "ws1_probe_request_duration_seconds_count", &l);
        requests += want;
        if want == got {
            exact += 1;
        } else {
            off.push(format!(
                "{service} {side} :{port} simulator {want} agent {got}"
            ));
        }
        if port == &pg_port.to_string() {
            let db = [
                ("service", "db"),
                ("side", "server"),
                ("port", port.as_str()),
            ];
            let want = want + c.get("handshakes").copied().unwrap_or(0.0);
            let got = sum(&after, "ws1_probe_request_duration_seconds_count", &db);
            if want == got {
                exact += 1;
            } else {
                off.push(format!("db server :{port} simulator {want} agent {got}"));
            }
        }
    }

    // BPF run time per program over the run, largest first.
    let per_program = |text: &str| -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for l in text
            .lines()
            .filter(|l| l.starts_with("ws1_probe_bpf_program_run_seconds_total{"))
        {
            let name = l
                .split("program=\"")
                .nth(1)
                .and_then(|r| r.split('"').next());
            let value = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(n), Some(v)) = (name, value) {
                *m.entry(n.to_owned()).or_insert(0.0) += v;
            }
        }
        m
    };
    let (p0, p1) = (per_program(&before), per_program(&after));
    let mut programs: Vec<(String, f64)> = p1
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                (v - p0.get(n).copied().unwrap_or(0.0)) / wall * 100.0,
            )
        })
        .filter(|(_, pct)| *pct > 0.0)
        .collect();
    programs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let agent_cpu = (cpu1 - cpu0) / wall * 100.0;
    let bpf = (bpf1 - bpf0) / wall * 100.0;
    println!();
    println!(
        "load: {} req/s from {} users for {} s ({} s with start and stop); {} exchanges counted by the simulator across all services and sides",
        o.rps,
        o.users,
        o.seconds,
        wall.round(),
        requests
    );
    println!(
        "agent: process CPU {agent_cpu:.2} % of one core + BPF programs {bpf:.2} % = {:.2} % (goal <= 1 %: {})",
        agent_cpu + bpf,
        if agent_cpu + bpf <= 1.0 {
            "PASS"
        } else {
            "MISS"
        }
    );
    println!(
        "agent: RSS {:.1} MiB (goal < 100 MiB: {}), ready in {:.0} ms",
        rss as f64 / 1024.0,
        if rss < 100 * 1024 { "PASS" } else { "MISS" },
        agent.ready.as_secs_f64() * 1e3
    );
    let top: Vec<String> = programs
        .iter()
        .take(6)
        .map(|(n, pct)| format!("{n} {pct:.2} %"))
        .collect();
    println!("agent: BPF time by program: {}", top.join(", "));
    println!();
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>12}",
        "SERVICE", "P50 WITHOUT", "P50 WITH", "P99 WITHOUT", "P99 WITH"
    );
    for s in SERVICES.iter().chain(["sim-users"].iter()) {
        let q = |x: &BTreeMap<String, BTreeMap<String, f64>>, k: &str| {
            x.get(*s)
                .and_then(|m| m.get(k))
                .map_or("-".to_owned(), |v| format!("{v:.3} ms"))
        };
        let name = if *s == "sim-users" {
            "users (end to end)"
        } else {
            s
        };
        println!(
            "{name:<16} {:>12} {:>12} {:>12} {:>12}",
            q(&base_x, "p50_ms"),
            q(&xs, "p50_ms"),
            q(&base_x, "p99_ms"),
            q(&xs, "p99_ms")
        );
    }
    println!();
    println!(
        "accounting: {exact} endpoint counts equal the agent's, {} differ{}",
        off.len(),
        if off.is_empty() {
            String::new()
        } else {
            format!(": {}", off.join("; "))
        }
    );
    let _ = agent.proc.stop();
    Ok(())
}
