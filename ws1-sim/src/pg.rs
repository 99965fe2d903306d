//! The DB: a private cluster of Debian's PostgreSQL (`pg-start`/`pg-stop`), and the few
//! messages of its frontend protocol the trading engine speaks.
//!
//! Why not the `postgres` crate: the request accounting must be exact, and that crate's
//! `execute` uses the extended protocol (parse, then bind/execute: two exchanges per
//! statement, plus type look-ups on first use) and needs an async runtime underneath. The
//! simulator speaks what libpq and pgbench's default (simple) protocol send: an SSL request
//! (answered `N` by a server without TLS) and the start-up packet (answered with
//! authentication-ok up to ready-for-query under `trust`), two exchanges per connection, then
//! one `Query` message per statement, answered up to ready-for-query. That is what
//! `handshake_exchanges = 2` in the example config describes.

use std::{
    io::{self, BufRead as _, BufReader, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// One connection to the server.
pub struct PgConn {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    buf: Vec<u8>,
}

/// SSLRequest's code (protocol 1234.5679).
const SSL_REQUEST: u32 = 80_877_103;
/// Protocol 3.0.
const PROTOCOL: u32 = 196_608;

impl PgConn {
    /// Connects and completes the two start-up exchanges as user and database `postgres`.
    pub fn connect(port: u16) -> io::Result<PgConn> {
        let stream = crate::proto::connect(port)?;
        let mut conn = PgConn {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            buf: Vec::with_capacity(512),
        };
        // Exchange 1: the SSL request, answered with one byte.
        let mut msg = Vec::with_capacity(64);
        msg.extend_from_slice(&8u32.to_be_bytes());
        msg.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        conn.stream.write_all(&msg)?;
        let mut answer = [0u8; 1];
        conn.reader.read_exact(&mut answer)?;
        if answer[0] != b'N' {
            return Err(io::Error::other(
                "the server offers TLS; start it with ssl=off",
            ));
        }
        // Exchange 2: the start-up packet, answered up to ready-for-query.
        msg.clear();
        let mut body = Vec::with_capacity(64);
        body.extend_from_slice(&PROTOCOL.to_be_bytes());
        for s in [
            "user",
            "postgres",
            "database",
            "postgres",
            "application_name",
            "trading-engine",
        ] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
        body.push(0);
        msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        msg.extend_from_slice(&body);
        conn.stream.write_all(&msg)?;
        conn.until_ready()?;
        Ok(conn)
    }

    /// Reads messages up to ready-for-query; an error response is returned as an error after
    /// the server is ready again (the exchange still happened).
    fn until_ready(&mut self) -> io::Result<()> {
        let mut failed = None;
        loop {
            let mut hdr = [0u8; 5];
            self.reader.read_exact(&mut hdr)?;
            let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
            if !(4..=(1 << 24)).contains(&len) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad message length",
                ));
            }
            self.buf.resize(len - 4, 0);
            self.reader.read_exact(&mut self.buf)?;
            match hdr[0] {
                b'Z' => break,
                b'E' => {
                    let text: String = String::from_utf8_lossy(&self.buf)
                        .split('\0')
                        .find_map(|f| f.strip_prefix('M').map(str::to_owned))
                        .unwrap_or_default();
                    failed = Some(text);
                }
                b'R' if self.buf.get(..4) != Some(&[0, 0, 0, 0]) => {
                    return Err(io::Error::other(
                        "the server asks for a password; the cluster must use trust authentication",
                    ));
                }
                _ => {}
            }
        }
        match failed {
            Some(text) => Err(io::Error::other(format!("postgres: {text}"))),
            None => Ok(()),
        }
    }

    /// One statement with the simple query protocol: one exchange.
    pub fn query(&mut self, sql: &str) -> io::Result<()> {
        let mut msg = Vec::with_capacity(sql.len() + 6);
        msg.push(b'Q');
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg)?;
        self.until_ready()
    }

    /// Says goodbye (a Terminate message, which gets no answer) and closes.
    pub fn close(mut self) {
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]);
    }
}

/// The statements of pgbench's built-in "simple-update" transaction (`pgbench -N`), one
/// exchange each; `aid`, `tid`, `bid` and `delta` as pgbench draws them at scale 1.
pub fn simple_update(aid: u32, tid: u32, bid: u32, delta: i32) -> [String; 5] {
    [
        "BEGIN;".to_owned(),
        format!("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"),
        format!("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"),
        format!(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
        ),
        "END;".to_owned(),
    ]
}

/// The newest PostgreSQL server binaries Debian installed (`/usr/lib/postgresql/<major>/bin`).
fn bindir() -> Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed: install Debian's postgresql package (`cargo xtask test` does)")?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "pgbench"]
                .iter()
                .all(|b| bin.join(b).is_file())
                .then_some((major, bin))
        })
        .collect();
    dirs.sort();
    match dirs.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "no initdb, pg_ctl and pgbench under /usr/lib/postgresql/*/bin: install Debian's postgresql package"
        ),
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn as_postgres(dir: &Path, bin: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(args[0]))
        .args(&args[1..])
        .current_dir(dir))
}

/// Starts a private cluster under `dir` (created; must not hold one yet) on a free loopback
/// port, as the `postgres` user (initdb and pg_ctl refuse root), with the pgbench tables at
/// scale 1. Returns the port, also written to `dir/port`.
pub fn start(dir: &Path) -> Result<u16> {
    let bin = bindir()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    run(Command::new("chown").arg("postgres:postgres").arg(dir))?;
    let data = dir.join("data").display().to_string();
    as_postgres(
        dir,
        &bin,
        &[
            "initdb",
            "-D",
            &data,
            "--auth=trust",
            "-U",
            "postgres",
            "--no-sync",
            "--no-instructions",
        ],
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("no free loopback port")?
        .port();
    let options = format!(
        "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={} -c fsync=off -c synchronous_commit=off -c ssl=off -c max_connections=200",
        dir.display()
    );
    as_postgres(
        dir,
        &bin,
        &[
            "pg_ctl",
            "-D",
            &data,
            "-l",
            &dir.join("log").display().to_string(),
            "-o",
            &options,
            "-w",
            "start",
        ],
    )?;
    std::fs::write(dir.join("port"), port.to_string())
        .with_context(|| format!("cannot write {}/port", dir.display()))?;
    run(Command::new(bin.join("pgbench"))
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(["-U", "postgres", "postgres"])
        .env("PGSSLMODE", "disable"))?;
    Ok(port)
}

/// Stops the cluster under `dir` (immediately; SIGKILL to the postmaster if pg_ctl cannot) and
/// removes the directory.
pub fn stop(dir: &Path) -> Result<()> {
    let bin = bindir()?;
    let data = dir.join("data");
    if data.join("postmaster.pid").exists() {
        let stopped = as_postgres(
            Path::new("/"),
            &bin,
            &[
                "pg_ctl",
                "-D",
                &data.display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        if stopped.is_err() {
            let pid = std::fs::read_to_string(data.join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: kill has no memory preconditions; the pid is the cluster's postmaster.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// Reads the port `start` wrote.
pub fn port_of(dir: &Path) -> Result<u16> {
    let text = std::fs::read_to_string(dir.join("port")).with_context(|| {
        format!(
            "no cluster under {}: run `ws1-sim pg-start` first",
            dir.display()
        )
    })?;
    let mut line = String::new();
    BufReader::new(text.as_bytes()).read_line(&mut line)?;
    line.trim()
        .parse()
        .with_context(|| format!("bad port file {}/port", dir.display()))
}
