//! A TCP request/response load the network tests drive line by line on stdin, so every
//! connection and request the tests count is one they asked for. Replies go to stdout, one line
//! per command.
//!
//! A request is 8 bytes: the server's delay in milliseconds (u32, little endian) and a u32 the
//! server echoes; the server reads a whole request, sleeps the delay, and writes an 8-byte
//! reply. Commands:
//! - `listen ADDR [pin]`: listen on ADDR (e.g. `127.0.0.1:0`) and serve every connection on its
//!   own thread; replies `ok <port>`. With `pin`, the thread of the k-th accepted connection
//!   runs only on CPU k mod (number of CPUs)
//! - `pooled ADDR N MS`: one connection, N requests with delay MS; replies with each request's
//!   wall time in nanoseconds (write start → reply read)
//! - `unpooled ADDR N MS`: N connections with one request each; replies like `pooled`
//! - `connect ADDR N`: N connections that close without a request
//! - `refused ADDR N`: N connects expected to be refused; replies `ok <refused count>`
//! - `rate ADDR C N [pin]`: C connections in parallel threads, N requests without delay on
//!   each; replies `ok <elapsed ns>` (the benchmark's load). With `pin`, connection i's thread
//!   runs only on CPU i mod (number of CPUs): against a pinned listener and with C a multiple
//!   of the CPU count, both ends of a connection share one CPU, so every CPU runs one
//!   request/response loop and no wake-up crosses CPUs

//! - `stream ADDR N MS`: one connection, N requests without delay written MS ms apart whose
//!   replies are never read; the connection stays open until `close`; replies `ok`
//! - `close`: closes the connections `stream` left open; replies `ok`
//! - `exit`: exit 0

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

const REQUEST: usize = 8;

fn serve(mut stream: TcpStream) {
    let mut req = [0u8; REQUEST];
    while stream.read_exact(&mut req).is_ok() {
        let ms = u32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(u64::from(ms)));
        }
        if stream.write_all(&req).is_err() {
            return;
        }
    }
}

/// Restricts the calling thread to CPU `index` mod the number of CPUs.
fn pin_to(index: usize) -> Result<(), String> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it, and
    // sched_setaffinity(0, ..) applies to the calling thread and reads the set it is given.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(index % cpus, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    match rc {
        0 => Ok(()),
        _ => Err(format!(
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        )),
    }
}

fn listen(addr: &str, pin: bool) -> Result<String, String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    std::thread::spawn(move || {
        for (k, stream) in listener.incoming().flatten().enumerate() {
            std::thread::spawn(move || {
                if pin && pin_to(k).is_err() {
                    return;
                }
                serve(stream);
            });
        }
    });
    Ok(format!("ok {port}"))
}

/// One request on `stream`; returns its wall time in nanoseconds.
fn request(stream: &mut TcpStream, ms: u32, seq: u32) -> Result<u128, String> {
    let mut req = [0u8; REQUEST];
    req[..4].copy_from_slice(&ms.to_le_bytes());
    req[4..].copy_from_slice(&seq.to_le_bytes());
    let started = Instant::now();
    stream.write_all(&req).map_err(|e| format!("write: {e}"))?;
    let mut reply = [0u8; REQUEST];
    stream
        .read_exact(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    let wall = started.elapsed().as_nanos();
    if reply != req {
        return Err("reply does not echo the request".to_owned());
    }
    Ok(wall)
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    // Requests are one small write each; no Nagle delay between them.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// Connections `stream` keeps open until `close`.
static OPEN: std::sync::Mutex<Vec<TcpStream>> = std::sync::Mutex::new(Vec::new());

fn run(words: &[&str]) -> Result<String, String> {
    let addr = || -> Result<SocketAddr, String> {
        let w = words.get(1).ok_or("missing address")?;
        w.parse().map_err(|e| format!("bad address {w}: {e}"))
    };
    let num = |i: usize| -> Result<u32, String> {
        let w = words.get(i).ok_or("missing number")?;
        w.parse().map_err(|e| format!("bad number {w}: {e}"))
    };
    match words.first().copied() {
        Some("listen") => listen(
            words.get(1).ok_or("missing address")?,
            words.get(2) == Some(&"pin"),
        ),
        Some("pooled") => {
            let mut stream = connect(addr()?)?;
            let mut reply = "ok".to_owned();
            for seq in 0..num(2)? {
                reply.push_str(&format!(" {}", request(&mut stream, num(3)?, seq)?));
            }
            Ok(reply)
        }
        Some("unpooled") => {
            let mut reply = "ok".to_owned();
            for seq in 0..num(2)? {
                let mut stream = connect(addr()?)?;
                reply.push_str(&format!(" {}", request(&mut stream, num(3)?, seq)?));
            }
            Ok(reply)
        }
        Some("connect") => {
            for _ in 0..num(2)? {
                drop(connect(addr()?)?);
            }
            Ok("ok".to_owned())
        }
        Some("refused") => {
            let mut refused = 0;
            for _ in 0..num(2)? {
                if let Err(e) = TcpStream::connect(addr()?)
                    && e.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    refused += 1;
                }
            }
            Ok(format!("ok {refused}"))
        }
        Some("stream") => {
            let mut stream = connect(addr()?)?;
            let (n, ms) = (num(2)?, num(3)?);
            for seq in 0..n {
                if seq > 0 {
                    std::thread::sleep(Duration::from_millis(u64::from(ms)));
                }
                let mut req = [0u8; REQUEST];
                req[4..].copy_from_slice(&seq.to_le_bytes());
                stream.write_all(&req).map_err(|e| format!("write: {e}"))?;
            }
            OPEN.lock().map_err(|_| "lock poisoned")?.push(stream);
            Ok("ok".to_owned())
        }
        Some("close") => {
            OPEN.lock().map_err(|_| "lock poisoned")?.clear();
            Ok("ok".to_owned())
        }
        Some("rate") => {
            let (addr, conns, n) = (addr()?, num(2)?, num(3)?);
            let pin = words.get(4) == Some(&"pin");
            let mut streams = Vec::new();
            for _ in 0..conns {
                streams.push(connect(addr)?);
            }
            let started = Instant::now();
            let threads: Vec<_> = streams
                .into_iter()
                .enumerate()
                .map(|(i, mut s)| {
                    std::thread::spawn(move || -> Result<(), String> {
                        if pin {
                            pin_to(i)?;
                        }
                        for seq in 0..n {
                            request(&mut s, 0, seq)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for t in threads {
                t.join().map_err(|_| "client thread panicked")??;
            }
            Ok(format!("ok {}", started.elapsed().as_nanos()))
        }
        _ => Err(format!("unknown command {:?}", words.join(" "))),
    }
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"exit") {
            let _ = writeln!(out, "ok");
            let _ = out.flush();
            return;
        }
        let reply = run(&words).unwrap_or_else(|e| format!("error {e}"));
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
