//! Block I/O workload for the block tests, driven line by line on stdin like `ws1-workload`:
//! every request the tests count is one they asked for. Replies go to stdout, one per line.
//!
//! Commands:
//! - `open PATH BLOCKS BS`: create PATH, fill it with BLOCKS blocks of BS bytes through the page
//!   cache and fsync it, so later O_DIRECT writes overwrite allocated blocks (no block
//!   allocation, no journal work on their behalf); then open it again with O_DIRECT
//! - `write N`: N synchronous O_DIRECT writes of one block each (blocks 0, 1, … N-1 of the
//!   file), each followed by fdatasync
//! - `read N`: N O_DIRECT reads of one block each
//! - `exit`: remove the file and exit 0

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, Write},
    os::unix::fs::{FileExt, OpenOptionsExt},
};

/// A buffer aligned for O_DIRECT (4096 covers every logical block size Linux supports).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: `layout` has a non-zero size (checked by the caller's block size > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

struct Target {
    path: String,
    file: File,
    blocks: u64,
    buf: Aligned,
}

fn open(path: &str, blocks: u64, bs: usize) -> Result<Target, String> {
    if bs == 0 || !bs.is_multiple_of(512) || blocks == 0 {
        return Err("block size must be a multiple of 512 and blocks > 0".to_owned());
    }
    let mut buf = Aligned::new(bs).ok_or("cannot allocate")?;
    buf.as_mut().fill(0x5a);
    let mut f = File::create(path).map_err(|e| format!("create {path}: {e}"))?;
    for _ in 0..blocks {
        f.write_all(buf.as_mut())
            .map_err(|e| format!("fill: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync: {e}"))?;
    drop(f);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| format!("open O_DIRECT {path}: {e}"))?;
    Ok(Target {
        path: path.to_owned(),
        file,
        blocks,
        buf,
    })
}

fn write_n(t: &mut Target, n: u64) -> Result<(), String> {
    let bs = t.buf.layout.size() as u64;
    for i in 0..n {
        let off = (i % t.blocks) * bs;
        t.file
            .write_all_at(t.buf.as_mut(), off)
            .map_err(|e| format!("write: {e}"))?;
        t.file.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    }
    Ok(())
}

fn read_n(t: &mut Target, n: u64) -> Result<(), String> {
    let bs = t.buf.layout.size() as u64;
    for i in 0..n {
        let off = (i % t.blocks) * bs;
        t.file
            .read_exact_at(t.buf.as_mut(), off)
            .map_err(|e| format!("read: {e}"))?;
    }
    Ok(())
}

fn main() {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut target: Option<Target> = None;
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
        let result = match (words.first().copied(), target.as_mut()) {
            (Some("open"), _) => {
                match open(words.get(1).copied().unwrap_or(""), num(2), num(3) as usize) {
                    Ok(t) => {
                        target = Some(t);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            (Some("write"), Some(t)) => write_n(t, num(1)),
            (Some("read"), Some(t)) => read_n(t, num(1)),
            (Some("write" | "read"), None) => Err("no file open".to_owned()),
            (Some("exit"), _) => {
                if let Some(t) = target.take() {
                    let _ = std::fs::remove_file(&t.path);
                }
                let _ = writeln!(out, "ok");
                let _ = out.flush();
                return;
            }
            _ => Err(format!("unknown command {line:?}")),
        };
        let reply = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("error {e}"),
        };
        let _ = writeln!(out, "{reply}");
        let _ = out.flush();
    }
    if let Some(t) = target {
        let _ = std::fs::remove_file(&t.path);
    }
}
