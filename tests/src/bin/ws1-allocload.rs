//! An allocation workload the integration tests drive line by line on stdin. Each way of leaking
//! has its own never-inlined function, so the leak report can be checked per call site.
//!
//! Commands (replies `ok`):
//! - `leak-malloc K S`, `leak-calloc K S`, `leak-realloc K S`, `leak-memalign K S`: leak K
//!   blocks of S bytes through that function
//! - `balanced N S`: allocate N blocks of S bytes and free them all
//! - `mmap-leak K S`, `mmap-churn N S`: K anonymous mappings of S bytes kept, or N mapped and
//!   unmapped; `brk-grow S`: raise the program break by S bytes with raw brk calls
//! - `leak-custom K S`, `churn-custom N S`: the same through the program's own prefixed
//!   allocator functions `ws1_malloc`/`ws1_free`
//! - `free-leaks`: free every block leaked so far
//! - `time-malloc N S`: N times `p = malloc(S); free(p)`, timed; replies `ok <elapsed ns in
//!   total>` (the benchmark's tight loop)
//! - `exit`: exit 0 without freeing anything
//!
//! After start-up the workload itself allocates nothing that outlives a command: leaked
//! pointers go into a vector reserved up front, and the input line buffer is reused.

use std::io::{BufRead, Write};

/// Most blocks the workload can hold leaked at once.
const MAX_LEAKED: usize = 1 << 16;

#[inline(never)]
fn leak_with_malloc(k: usize, size: usize, leaked: &mut Vec<usize>) {
    for _ in 0..k {
        // SAFETY: plain malloc; the block is deliberately never freed (until free-leaks).
        leaked.push(unsafe { libc::malloc(size) } as usize);
    }
}

#[inline(never)]
fn leak_with_calloc(k: usize, size: usize, leaked: &mut Vec<usize>) {
    for _ in 0..k {
        // SAFETY: as above; `size` bytes as `size / 8` elements of 8 bytes.
        leaked.push(unsafe { libc::calloc(size / 8, 8) } as usize);
    }
}

#[inline(never)]
fn leak_with_realloc(k: usize, size: usize, leaked: &mut Vec<usize>) {
    for _ in 0..k {
        // SAFETY: a small block grown by realloc, which frees the small one.
        unsafe {
            let small = libc::malloc(16);
            leaked.push(libc::realloc(small, size) as usize);
        }
    }
}

#[inline(never)]
fn leak_with_memalign(k: usize, size: usize, leaked: &mut Vec<usize>) {
    for _ in 0..k {
        let mut p: *mut libc::c_void = std::ptr::null_mut();
        // SAFETY: a valid out pointer; 64 is a power of two and a multiple of the pointer size.
        if unsafe { libc::posix_memalign(&mut p, 64, size) } == 0 {
            leaked.push(p as usize);
        }
    }
}

/// N malloc/free pairs of S bytes; returns the elapsed nanoseconds.
#[inline(never)]
fn time_malloc(n: usize, size: usize) -> u128 {
    let started = std::time::Instant::now();
    for _ in 0..n {
        // SAFETY: allocated and freed at once. black_box keeps the compiler from eliding the pair.
        unsafe {
            libc::free(std::hint::black_box(libc::malloc(std::hint::black_box(
                size,
            ))))
        };
    }
    started.elapsed().as_nanos()
}

/// A "custom allocator" living in the program itself, with prefixed names, the way a statically
/// linked jemalloc exposes `je_malloc`/`je_free`: traced with `--alloc-lib exe --alloc-prefix ws1_`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ws1_malloc(size: usize) -> *mut libc::c_void {
    // SAFETY: plain malloc.
    std::hint::black_box(unsafe { libc::malloc(size) })
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ws1_free(ptr: *mut libc::c_void) {
    // SAFETY: `ptr` came from ws1_malloc.
    unsafe { libc::free(std::hint::black_box(ptr)) }
}

#[inline(never)]
fn leak_with_custom(k: usize, size: usize, leaked: &mut Vec<usize>) {
    for _ in 0..k {
        leaked.push(ws1_malloc(size) as usize);
    }
}

#[inline(never)]
fn churn_custom(n: usize, size: usize) {
    for _ in 0..n {
        ws1_free(ws1_malloc(size));
    }
}

/// Anonymous mappings made directly, outside the allocator.
#[inline(never)]
fn mmap_regions(k: usize, size: usize, keep: bool) {
    for _ in 0..k {
        // SAFETY: an anonymous private mapping; unmapped below unless kept (leaked on purpose).
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if !keep && p != libc::MAP_FAILED {
                libc::munmap(p, size);
            }
        }
    }
}

/// Moves the program break up by `size` bytes with raw brk calls (the first reads it).
#[inline(never)]
fn brk_grow(size: usize) {
    // SAFETY: brk(0) reads the break; raising it maps memory the allocator never hands out.
    unsafe {
        let current = libc::syscall(libc::SYS_brk, 0usize);
        libc::syscall(libc::SYS_brk, current as usize + size);
    }
}

#[inline(never)]
fn balanced_churn(n: usize, size: usize, scratch: &mut Vec<usize>) {
    for _ in 0..n {
        // SAFETY: allocated here, freed below.
        scratch.push(unsafe { libc::malloc(size) } as usize);
    }
    for p in scratch.drain(..) {
        // SAFETY: each pointer came from malloc above and is freed once.
        unsafe { libc::free(p as *mut libc::c_void) };
    }
}

fn main() {
    let mut leaked: Vec<usize> = Vec::with_capacity(MAX_LEAKED);
    let mut scratch: Vec<usize> = Vec::with_capacity(MAX_LEAKED);
    let mut line = String::with_capacity(256);
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready {}", std::process::id());
    let _ = out.flush();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let mut num = || {
            words
                .next()
                .and_then(|w| w.parse::<usize>().ok())
                .unwrap_or(0)
        };
        let (a, b) = (num(), num());
        let room = MAX_LEAKED - leaked.len();
        match cmd {
            "leak-malloc" => leak_with_malloc(a.min(room), b, &mut leaked),
            "leak-calloc" => leak_with_calloc(a.min(room), b, &mut leaked),
            "leak-realloc" => leak_with_realloc(a.min(room), b, &mut leaked),
            "leak-memalign" => leak_with_memalign(a.min(room), b, &mut leaked),
            "balanced" => balanced_churn(a.min(MAX_LEAKED), b, &mut scratch),
            "leak-custom" => leak_with_custom(a.min(room), b, &mut leaked),
            "mmap-leak" => mmap_regions(a, b, true),
            "mmap-churn" => mmap_regions(a, b, false),
            "brk-grow" => brk_grow(a),
            "churn-custom" => churn_custom(a, b),
            "free-leaks" => {
                for p in leaked.drain(..) {
                    // SAFETY: every pointer came from the allocator and is freed once.
                    unsafe { libc::free(p as *mut libc::c_void) };
                }
            }
            "time-malloc" => {
                let ns = time_malloc(a, b);
                let _ = writeln!(out, "ok {ns}");
                let _ = out.flush();
                continue;
            }
            "exit" => {
                let _ = writeln!(out, "ok");
                let _ = out.flush();
                return;
            }
            _ => {
                let _ = writeln!(out, "error unknown command");
                let _ = out.flush();
                continue;
            }
        }
        let _ = writeln!(out, "ok");
        let _ = out.flush();
    }
}
