//! A workload the integration tests drive line by line on stdin, so every syscall the tests
//! count is one they asked for. Replies go to stdout, one line per command.
//!
//! Commands:
//! - `getppid N`: N raw getppid syscalls
//! - `time-getppid N`: N raw getppid syscalls, timed; replies `ok <elapsed ns in total>`
//! - `openat-missing N`: N openat calls on a path that does not exist (ENOENT)
//! - `enosys N [BASE]`: N raw syscalls numbered BASE, BASE+1, … (default 1000), numbers no
//!   kernel has, so each fails with ENOSYS and is its own (service, syscall) pair; replies with
//!   how many failed so
//! - `nanosleep MS N`: N raw nanosleep syscalls of MS milliseconds; replies with each call's
//!   wall time in nanoseconds
//! - `fork-hold N`: fork a child that makes N getppid calls and then waits; replies with its pid
//! - `release`: let the held child exit and reap it
//! - `spin MS`: burn CPU for MS milliseconds
//! - `grow MB`: allocate MB MiB, touch every page and keep it (resident memory grows by MB MiB)
//! - `exit`: exit 0

use std::{
    ffi::CString,
    io::{BufRead, Write},
    time::{Duration, Instant},
};

fn getppid_n(n: u64) {
    for _ in 0..n {
        // SAFETY: getppid has no arguments and cannot fail.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut held: Option<(libc::pid_t, libc::c_int)> = None;
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            words
                .get(i)
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let reply = match words.first().copied() {
            Some("getppid") => {
                getppid_n(num(1));
                "ok".to_owned()
            }
            Some("time-getppid") => {
                let n = num(1);
                let started = Instant::now();
                getppid_n(n);
                format!("ok {}", started.elapsed().as_nanos())
            }
            Some("openat-missing") => {
                let path = CString::new("/nonexistent-ws1-probe-test/missing").unwrap_or_default();
                let mut failed = 0;
                for _ in 0..num(1) {
                    // SAFETY: a valid NUL-terminated path; the call fails with ENOENT.
                    let fd = unsafe { libc::openat(libc::AT_FDCWD, path.as_ptr(), libc::O_RDONLY) };
                    if fd < 0
                        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)
                    {
                        failed += 1;
                    }
                }
                format!("ok {failed}")
            }
            Some("enosys") => {
                let base = if words.len() > 2 { num(2) } else { 1000 };
                let mut failed = 0;
                for nr in base..base + num(1) {
                    // SAFETY: a syscall number the kernel does not implement; it only returns.
                    let r = unsafe { libc::syscall(nr as libc::c_long) };
                    if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS)
                    {
                        failed += 1;
                    }
                }
                format!("ok {failed}")
            }
            Some("nanosleep") => {
                let ts = libc::timespec {
                    tv_sec: (num(1) / 1000) as libc::time_t,
                    tv_nsec: ((num(1) % 1000) * 1_000_000) as libc::c_long,
                };
                // Each call's wall time as seen from here: an upper bound of what the kernel
                // measures between sys_enter and sys_exit (the request is the lower bound).
                let mut reply = "ok".to_owned();
                for _ in 0..num(2) {
                    let started = Instant::now();
                    // SAFETY: valid timespec pointer; null remainder.
                    unsafe {
                        libc::syscall(
                            libc::SYS_nanosleep,
                            &ts as *const libc::timespec,
                            std::ptr::null_mut::<libc::timespec>(),
                        )
                    };
                    reply.push_str(&format!(" {}", started.elapsed().as_nanos()));
                }
                reply
            }
            Some("fork-hold") => fork_hold(num(1), &mut held),
            Some("release") => match held.take() {
                Some((pid, wfd)) => {
                    // SAFETY: closing our end of the pipe wakes the child, which exits.
                    unsafe { libc::close(wfd) };
                    let mut status = 0;
                    // SAFETY: reaping our own child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    "ok".to_owned()
                }
                None => "error no child".to_owned(),
            },
            Some("spin") => {
                let until = Instant::now() + Duration::from_millis(num(1));
                let mut x = 0u64;
                while Instant::now() < until {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
                "ok".to_owned()
            }
            Some("grow") => {
                let block = vec![1u8; (num(1) as usize) << 20];
                // Kept for the life of the process: the test watches resident memory grow.
                std::mem::forget(block);
                "ok".to_owned()
            }
            Some("exit") => {
                let _ = writeln!(out, "ok");
                let _ = out.flush();
                return;
            }
            _ => format!("error unknown command {line:?}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}

/// Forks a child that makes `n` getppid calls, reports back through a pipe, then blocks until
/// the parent closes the other pipe.
fn fork_hold(n: u64, held: &mut Option<(libc::pid_t, libc::c_int)>) -> String {
    let mut done = [0; 2];
    let mut hold = [0; 2];
    // SAFETY: valid arrays of two fds.
    if unsafe { libc::pipe(done.as_mut_ptr()) } != 0
        || unsafe { libc::pipe(hold.as_mut_ptr()) } != 0
    {
        return "error pipe".to_owned();
    }
    // SAFETY: the child only makes async-signal-safe calls before _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        getppid_n(n);
        let byte = [1u8];
        let mut buf = [0u8; 1];
        // SAFETY: fds from pipe(); the buffers are valid.
        unsafe {
            libc::close(hold[1]);
            libc::write(done[1], byte.as_ptr().cast(), 1);
            libc::read(hold[0], buf.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    let mut buf = [0u8; 1];
    // SAFETY: fds from pipe(); the buffer is valid.
    unsafe {
        libc::close(done[1]);
        libc::close(hold[0]);
        libc::read(done[0], buf.as_mut_ptr().cast(), 1);
        libc::close(done[0]);
    }
    *held = Some((pid, hold[1]));
    format!("ok {pid}")
}
