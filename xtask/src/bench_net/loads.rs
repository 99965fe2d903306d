//! The loads `bench net` drives: `ws1-netload`'s pinned echo and nginx answering wrk.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{Agent, SAMPLES};
use crate::{apt, util};

/// Echo: requests per connection per sample.
const ECHO_REQUESTS: u64 = 20_000;
/// HTTP: seconds per sample, and wrk connections per client CPU.
const HTTP_SECONDS: u64 = 1;
const HTTP_CONNS_PER_CPU: usize = 16;

/// A request/response load the bench drives.
pub trait Load {
    /// One line saying what the load is.
    fn describe(&self) -> String;
    /// One measurement: requests per second and requests made.
    fn sample(&mut self) -> Result<(f64, u64)>;
    /// Agent arguments selecting the load's server and client processes.
    fn select(&self) -> Vec<String>;
    /// Agent arguments selecting the load's server processes only: the service, with the load
    /// generator unobserved, as the agent runs in production.
    fn select_server(&self) -> Vec<String>;
    /// Compares what the agent counted over a block with what the load made: `made` requests,
    /// `warmup` of them in the block's first sample. Returns a report line.
    fn sanity(&self, agent: &Agent, made: u64, warmup: u64) -> Result<String>;
}

/// A `ws1-netload` driven over stdin/stdout.
struct NetLoad {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl NetLoad {
    fn spawn(bin: &Path) -> Result<NetLoad> {
        let mut child = Command::new(bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdin = child.stdin.take().context("netload stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("netload stdout")?);
        let mut n = NetLoad {
            child,
            stdin,
            stdout,
        };
        let ready = n.line()?;
        ensure!(ready.starts_with("ready "), "ws1-netload said {ready:?}");
        Ok(n)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .context("cannot read from ws1-netload")?;
        Ok(line.trim_end().to_owned())
    }

    /// One command; returns the first number of its `ok` reply.
    fn cmd(&mut self, command: &str) -> Result<u64> {
        writeln!(self.stdin, "{command}")
            .and_then(|()| self.stdin.flush())
            .context("cannot write to ws1-netload")?;
        let reply = self.line()?;
        let value = reply.strip_prefix("ok ").and_then(|v| v.parse().ok());
        value.with_context(|| format!("ws1-netload: {command} -> {reply:?}"))
    }
}

impl Drop for NetLoad {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ws1-netload` echo load: one pinned connection per CPU.
pub struct Echo {
    server: NetLoad,
    client: NetLoad,
    addr: String,
    conns: u64,
}

impl Echo {
    pub fn start(netload: &Path) -> Result<Echo> {
        let mut server = NetLoad::spawn(netload)?;
        let port = server.cmd("listen 127.0.0.1:0 pin")?;
        let client = NetLoad::spawn(netload)?;
        Ok(Echo {
            server,
            client,
            addr: format!("127.0.0.1:{port}"),
            conns: cpus() as u64,
        })
    }
}

impl Load for Echo {
    fn describe(&self) -> String {
        format!(
            "echo: ws1-netload, {} pinned connections × {ECHO_REQUESTS} 8-byte requests per sample",
            self.conns
        )
    }

    fn sample(&mut self) -> Result<(f64, u64)> {
        let made = self.conns * ECHO_REQUESTS;
        let command = format!("rate {} {} {ECHO_REQUESTS} pin", self.addr, self.conns);
        let ns = self.client.cmd(&command)?;
        Ok((made as f64 / (ns as f64 / 1e9), made))
    }

    fn select(&self) -> Vec<String> {
        let pids = [self.server.child.id(), self.client.child.id()];
        pids.iter()
            .flat_map(|p| ["--pid".to_owned(), p.to_string()])
            .collect()
    }

    fn select_server(&self) -> Vec<String> {
        vec!["--pid".to_owned(), self.server.child.id().to_string()]
    }

    fn sanity(&self, agent: &Agent, made: u64, _warmup: u64) -> Result<String> {
        // Every request completes before `rate` returns: the count is exact.
        let counted = agent.requests("client")?;
        let verdict = match (counted - made as f64).abs() < 0.5 {
            true => "match",
            false => "MISMATCH",
        };
        Ok(format!(
            "agent counted {counted} client requests, the load made {made}: {verdict}"
        ))
    }
}

/// nginx serving `200 ok` to wrk, each on its own half of the CPUs.
pub struct Http {
    nginx: Child,
    dir: PathBuf,
    port: u16,
    client_cpus: String,
    threads: usize,
    conns: usize,
}

impl Http {
    pub fn start(dir: &Path) -> Result<Http> {
        apt::ensure_packages(&[("nginx", "nginx"), ("wrk", "wrk")])?;
        let n = cpus();
        // Server CPUs [n/2, n), client CPUs [0, n/2); one CPU: both share it.
        let (servers, first) = if n > 1 { (n - n / 2, n / 2) } else { (1, 0) };
        let affinity: Vec<String> = (first..first + servers)
            .map(|cpu| {
                let mut mask = vec!['0'; n];
                mask[n - 1 - cpu] = '1';
                mask.into_iter().collect()
            })
            .collect();
        let threads = (n / 2).max(1);
        let client_cpus = match n {
            1 => "0".to_owned(),
            _ => format!("0-{}", n / 2 - 1),
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("no free loopback port")?
            .port();
        fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let d = dir.display();
        let conf = format!(
            "worker_processes {servers};\nworker_cpu_affinity {};\ndaemon off;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            affinity.join(" ")
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf)
            .with_context(|| format!("cannot write {}", conf_path.display()))?;
        let log = fs::File::create(dir.join("nginx.log"))
            .with_context(|| format!("cannot create {}/nginx.log", d))?;
        let nginx = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start nginx")?;
        let mut http = Http {
            nginx,
            dir: dir.to_owned(),
            port,
            client_cpus,
            threads,
            conns: HTTP_CONNS_PER_CPU * threads,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = http.nginx.try_wait()? {
                bail!("nginx exited ({status}); see {d}/nginx.log");
            }
            ensure!(
                started.elapsed() < Duration::from_secs(10),
                "nginx not listening on port {port} after 10 s; see {d}/nginx.log"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(http)
    }
}

/// `(requests per second, requests)` from wrk's report.
fn parse_wrk(out: &str) -> Option<(f64, u64)> {
    let rate = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let made = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))?
        .0
        .trim()
        .parse()
        .ok()?;
    Some((rate, made))
}

impl Load for Http {
    fn describe(&self) -> String {
        format!(
            "http: nginx `return 200` on the other CPUs, wrk -t{} -c{} on CPUs {}, {HTTP_SECONDS} s per sample",
            self.threads, self.conns, self.client_cpus
        )
    }

    fn sample(&mut self) -> Result<(f64, u64)> {
        let out = util::capture(
            Command::new("taskset")
                .args(["-c", &self.client_cpus, "wrk"])
                .arg(format!("-t{}", self.threads))
                .arg(format!("-c{}", self.conns))
                .arg(format!("-d{HTTP_SECONDS}s"))
                .arg(format!("http://127.0.0.1:{}/", self.port)),
        )?;
        parse_wrk(&out).with_context(|| format!("cannot read wrk's report: {out}"))
    }

    fn select(&self) -> Vec<String> {
        vec!["--comm".to_owned(), "^(nginx|wrk)$".to_owned()]
    }

    fn select_server(&self) -> Vec<String> {
        vec!["--comm".to_owned(), "^nginx$".to_owned()]
    }

    fn sanity(&self, agent: &Agent, made: u64, warmup: u64) -> Result<String> {
        // wrk counts responses it read; requests in flight when a sample ends (at most one per
        // connection) reached nginx but not wrk's count. The nginx workers are observed from
        // the agent's start; the first wrk of a block is an exec of a name the agent has not
        // decided yet, so its connections may open before it is observed (later execs of
        // `wrk` are decided in the kernel at once).
        let (server, client) = (agent.requests("server")?, agent.requests("client")?);
        let slack = (self.conns * (SAMPLES + 1)) as f64;
        let (made, warmup) = (made as f64, warmup as f64);
        let server_ok = server >= made && server <= made + slack;
        let client_ok = client >= made - warmup && client <= made + slack;
        let verdict = match server_ok && client_ok {
            true => "match",
            false => "MISMATCH",
        };
        Ok(format!(
            "agent counted {server} server and {client} client requests; wrk read {made} responses, {warmup} of them in the warm-up, and at most {slack} were in flight: {verdict}"
        ))
    }
}

impl Drop for Http {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would leave them running).
        let _ = Command::new("kill")
            .args(["-TERM", &self.nginx.id().to_string()])
            .status();
        let _ = self.nginx.wait();
        let _ = fs::remove_file(self.dir.join("nginx.pid"));
    }
}

pub fn cpus() -> usize {
    thread::available_parallelism().map_or(2, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_reports() {
        let out = "Running 1s test @ http://127.0.0.1:18080/\n  1 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.40ms    1.98ms  12.35ms   84.79%\n    Req/Sec    23.28k     3.26k   28.17k    72.73%\n  25446 requests in 1.10s, 3.64MB read\nRequests/sec:  23126.04\nTransfer/sec:      3.31MB\n";
        assert_eq!(parse_wrk(out), Some((23126.04, 25446)));
        assert_eq!(parse_wrk("unable to connect to 127.0.0.1:1"), None);
    }
}
