//! A scheduler workload the integration tests drive line by line on stdin.
//!
//! Commands (replies `ok ...`):
//! - `children ok|error|segv N`: forks N children, one at a time, that exit 0, exit 3, or die
//!   of SIGSEGV (with core dumps off), and reaps each; replies `ok <pids>`
//! - `contend T MS`: runs T threads pinned to CPU 0 that spin for MS milliseconds each, so
//!   they wait for each other on that CPU's run queue; replies `ok`
//! - `pingpong N`: two threads pinned to CPU 0 pass a byte back and forth over two pipes N
//!   times (2N context switches at least); replies `ok <elapsed ns>` (the benchmark's loop)
//! - `exit`: replies `ok` and exits 0
//!
//! The workload prints `ready <pid>` first.

use std::{
    io::{BufRead, Write},
    time::{Duration, Instant},
};

fn pin_to_cpu0() -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "sched_setaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// Forks a child that ends as `how` says and reaps it; returns its pid.
fn child(how: &str) -> Result<u32, String> {
    // SAFETY: the child only calls async-signal-safe functions (setrlimit, signal, raise,
    // _exit) before it ends.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns into Rust code.
        unsafe {
            match how {
                "ok" => libc::_exit(0),
                "error" => libc::_exit(3),
                _ => {
                    let none = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::setrlimit(libc::RLIMIT_CORE, &none);
                    libc::signal(libc::SIGSEGV, libc::SIG_DFL);
                    libc::raise(libc::SIGSEGV);
                    libc::_exit(99)
                }
            }
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
        return Err(format!("waitpid: {}", std::io::Error::last_os_error()));
    }
    Ok(pid as u32)
}

fn contend(threads: usize, ms: u64) -> Result<(), String> {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || -> Result<(), String> {
                pin_to_cpu0()?;
                let until = Instant::now() + Duration::from_millis(ms);
                let mut x = 0u64;
                while Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| "a spinning thread panicked")??;
    }
    Ok(())
}

fn pingpong(n: u64) -> Result<u128, String> {
    let pipe = || -> Result<(i32, i32), String> {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into the array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(format!("pipe: {}", std::io::Error::last_os_error()));
        }
        Ok((fds[0], fds[1]))
    };
    let (a_read, a_write) = pipe()?;
    let (b_read, b_write) = pipe()?;
    let step = |from: i32, to: i32| -> Result<(), String> {
        let mut byte = [0u8; 1];
        // SAFETY: one-byte reads and writes on our own pipes.
        unsafe {
            if libc::read(from, byte.as_mut_ptr().cast(), 1) != 1
                || libc::write(to, byte.as_ptr().cast(), 1) != 1
            {
                return Err(format!("pipe i/o: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(())
    };
    pin_to_cpu0()?;
    let echo = std::thread::spawn(move || -> Result<(), String> {
        pin_to_cpu0()?;
        for _ in 0..n {
            step(a_read, b_write)?;
        }
        Ok(())
    });
    let started = Instant::now();
    let byte = [1u8; 1];
    let mut result = Ok(());
    for _ in 0..n {
        // SAFETY: a one-byte write on our own pipe.
        if unsafe { libc::write(a_write, byte.as_ptr().cast(), 1) } != 1 {
            result = Err(format!("pipe write: {}", std::io::Error::last_os_error()));
            break;
        }
        let mut back = [0u8; 1];
        // SAFETY: a one-byte read on our own pipe.
        if unsafe { libc::read(b_read, back.as_mut_ptr().cast(), 1) } != 1 {
            result = Err(format!("pipe read: {}", std::io::Error::last_os_error()));
            break;
        }
    }
    let elapsed = started.elapsed().as_nanos();
    // SAFETY: closing our own descriptors; the echo thread then sees EOF if it still waits.
    unsafe {
        for fd in [a_read, a_write, b_read, b_write] {
            libc::close(fd);
        }
    }
    let echoed = echo.join().map_err(|_| "the echo thread panicked")?;
    result?;
    echoed?;
    Ok(elapsed)
}

fn run(line: &str) -> Result<String, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        words
            .get(i)
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| format!("argument {i} of {line:?} is not a number"))
    };
    match words.first().copied() {
        Some("children") => {
            let how = words.get(1).copied().unwrap_or("");
            if !matches!(how, "ok" | "error" | "segv") {
                return Err(format!("children {how:?}: expected ok, error or segv"));
            }
            let pids = (0..num(2)?)
                .map(|_| child(how).map(|p| p.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(format!("ok {}", pids.join(" ")))
        }
        Some("contend") => {
            contend(num(1)? as usize, num(2)?)?;
            Ok("ok".to_owned())
        }
        Some("pingpong") => Ok(format!("ok {}", pingpong(num(1)?)?)),
        Some("exit") => Ok("ok".to_owned()),
        _ => Err(format!("unknown command {line:?}")),
    }
}

fn main() {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = run(&line).unwrap_or_else(|e| format!("error {e}"));
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
        if line.trim() == "exit" {
            break;
        }
    }
}
