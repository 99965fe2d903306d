//! The resources workload: holds what the tests count exactly. Driven line by line on stdin,
//! one reply line per command.
//!
//! Commands:
//! - `fork N`: fork N children that sleep until this process dies (they get SIGKILL then);
//!   replies `ok PID…`
//! - `threads K`: start K threads that sleep; replies `ok`
//! - `open N`: open /dev/null N times and keep the descriptors; replies `ok FDS`, the number of
//!   open descriptors now (from /proc/self/fd)
//! - `spin MS`: burn MS milliseconds of CPU time in this thread
//! - `spin-thread`: burn CPU in a new thread until exit
//! - `exit`: exit 0

use std::{
    io::{BufRead, Write},
    time::Duration,
};

fn open_fds() -> usize {
    // The directory's own descriptor is one of the entries.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Burns MS milliseconds of this thread's CPU time (not wall time: on a loaded host the
/// amount stays what the tests expect).
fn spin(ms: u64) {
    let until = thread_cpu() + Duration::from_millis(ms);
    let mut x = 0u64;
    while thread_cpu() < until {
        for i in 0..10_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }
}

fn main() {
    let mut held = Vec::new();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let reply = match words.first().copied() {
            Some("fork") => {
                let mut pids = Vec::new();
                for _ in 0..num(1) {
                    // SAFETY: the child only calls async-signal-safe functions (prctl, pause,
                    // _exit).
                    let pid = unsafe { libc::fork() };
                    if pid == 0 {
                        // SAFETY: as above.
                        unsafe {
                            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                            loop {
                                libc::pause();
                            }
                        }
                    }
                    pids.push(pid.to_string());
                }
                format!("ok {}", pids.join(" "))
            }
            Some("threads") => {
                for _ in 0..num(1) {
                    std::thread::spawn(|| {
                        loop {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                    });
                }
                "ok".to_owned()
            }
            Some("open") => {
                for _ in 0..num(1) {
                    match std::fs::File::open("/dev/null") {
                        Ok(f) => held.push(f),
                        Err(e) => {
                            let _ = writeln!(out, "error {e}");
                            continue;
                        }
                    }
                }
                format!("ok {}", open_fds())
            }
            Some("spin") => {
                spin(num(1));
                "ok".to_owned()
            }
            Some("spin-thread") => {
                std::thread::spawn(|| {
                    loop {
                        spin(1000);
                    }
                });
                "ok".to_owned()
            }
            Some("exit") => std::process::exit(0),
            _ => format!("error unknown command {line:?}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
