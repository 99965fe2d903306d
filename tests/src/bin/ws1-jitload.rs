//! A "JIT" the untrusted-input tests drive line by line on stdin: it copies a small loop of
//! machine code into an anonymous executable mapping and runs it on a thread of its own, so the
//! profiler samples addresses no file names, and writes its perf map (`/tmp/perf-PID.map`) as
//! the tests ask.
//!
//! Commands (replies `ok`):
//! - `map NAME`: a fresh map (new file) naming the code NAME
//! - `huge MB NAME`: a fresh map naming the code NAME, then extended to MB MiB (sparse: the rest
//!   reads as zeros, one endless line, and costs no disk)
//! - `lines N NAME`: a fresh map of N distinct 128-byte lines for other addresses, then the
//!   line naming the code NAME (about N × 128 bytes on disk)
//! - `link TARGET`: the map path becomes a symbolic link to TARGET
//! - `remove`: removes the map
//!
//! It prints `ready <pid> <code address in hex>` first. The map is the test's to remove (a
//! killed workload cannot).

use std::{
    io::{BufRead, Write},
    path::PathBuf,
};

/// `mov ecx, 0x100000; 1: dec ecx; jnz 1b; ret`: a million iterations per call.
const CODE: [u8; 10] = [0xb9, 0x00, 0x00, 0x10, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xc3];
/// The size the map gives the code.
const CODE_SIZE: u64 = 0x40;

fn map_path() -> PathBuf {
    PathBuf::from(format!("/tmp/perf-{}.map", std::process::id()))
}

/// Copies [`CODE`] into a new anonymous mapping and makes it executable.
fn load_code() -> Result<usize, String> {
    // SAFETY: a new private anonymous mapping at an address the kernel picks, checked for
    // MAP_FAILED; the copy stays inside its 4096 bytes; mprotect changes only that mapping.
    unsafe {
        let page = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if page == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        std::ptr::copy_nonoverlapping(CODE.as_ptr(), page.cast::<u8>(), CODE.len());
        if libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_EXEC) != 0 {
            return Err(format!("mprotect: {}", std::io::Error::last_os_error()));
        }
        Ok(page as usize)
    }
}

fn fresh(text: &str) -> std::io::Result<std::fs::File> {
    let path = map_path();
    let _ = std::fs::remove_file(&path);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(text.as_bytes())?;
    Ok(f)
}

fn run(cmd: &str, code: usize) -> Result<(), String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let line = |name: &str| format!("{code:x} {CODE_SIZE:x} {name}\n");
    let io = |e: std::io::Error| e.to_string();
    match words.as_slice() {
        ["map", name] => {
            fresh(&line(name)).map_err(io)?;
        }
        ["huge", mb, name] => {
            let mb: u64 = mb.parse().map_err(|_| format!("bad size {mb}"))?;
            let f = fresh(&line(name)).map_err(io)?;
            f.set_len(mb << 20).map_err(io)?;
        }
        ["lines", n, name] => {
            let n: u64 = n.parse().map_err(|_| format!("bad count {n}"))?;
            let mut f = std::io::BufWriter::new(fresh("").map_err(io)?);
            for i in 0..n {
                // 128 bytes a line, at addresses far below the code.
                writeln!(
                    f,
                    "{:012x} 10 ws1_filler_{i:010}_{}",
                    0x1000 + i * 0x10,
                    "x".repeat(89)
                )
                .map_err(io)?;
            }
            f.write_all(line(name).as_bytes()).map_err(io)?;
            f.flush().map_err(io)?;
        }
        ["link", target] => {
            let _ = std::fs::remove_file(map_path());
            std::os::unix::fs::symlink(target, map_path()).map_err(io)?;
        }
        ["remove"] => {
            std::fs::remove_file(map_path()).map_err(io)?;
        }
        _ => return Err(format!("unknown command {cmd:?}")),
    }
    Ok(())
}

fn main() {
    let code = match load_code() {
        Ok(code) => code,
        Err(e) => {
            println!("error {e}");
            std::process::exit(1);
        }
    };
    std::thread::spawn(move || {
        // SAFETY: `code` holds CODE, a complete function of the C ABI that takes no arguments,
        // touches only ecx and returns; the mapping is never unmapped.
        let f: extern "C" fn() = unsafe { std::mem::transmute::<usize, extern "C" fn()>(code) };
        loop {
            f();
        }
    });
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let _ = writeln!(out, "ready {} {code:x}", std::process::id());
    let _ = out.flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match run(line.trim(), code) {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error {e}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
}
