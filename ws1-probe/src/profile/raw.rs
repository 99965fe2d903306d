//! Profiles before symbolization: what the profile collector reads out of the kernel (and
//! unwinds in userspace), as addresses, and the step that turns them into a [`Profile`]'s stacks.
//!
//! It lives here, below the collectors, so that [`windows`](super::windows) and the CLI can
//! symbolize without depending on the collector that produced the addresses.
//!
//! [`Profile`]: super::Profile

use std::collections::HashMap;

use super::{ProfFrame, StackSample, runtime::Runtime, symbols::ProfileSymbolizer};
use crate::symbolize::cut_at_first_unknown;

/// A stack with its totals, before symbolization. Addresses are lookup addresses (the sampled
/// instruction, then return addresses minus one), leaf first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub tgid: u32,
    pub service: u32,
    pub user: Vec<u64>,
    /// `Some(complete)` for DWARF-unwound stacks (whether the unwinder reached the outermost
    /// frame); `None` for frame-pointer stacks, judged by their outermost function instead.
    pub dwarf_complete: Option<bool>,
    pub kernel: Vec<u64>,
    /// Python frame words from the kernel's walk of the thread state (see `python.rs`), empty
    /// for other processes.
    pub python: Vec<u64>,
    pub samples: u64,
    pub value_ns: u64,
}

/// Raw stacks of one drain.
#[derive(Clone, Debug, Default)]
pub struct RawProfile {
    pub cpu: Vec<RawStack>,
    pub off_cpu: Vec<RawStack>,
    /// The runtime of each process in the stacks (absent: [`Runtime::Unknown`]).
    pub runtimes: HashMap<u32, Runtime>,
}

/// Functions a complete user stack ends in: the process entry and thread entries of glibc and
/// musl, and Go's: every goroutine's stack ends in `runtime.goexit` (the return address its
/// first function was started with), the main goroutine's in `runtime.main` above it, and the
/// scheduler's system stacks in `runtime.mstart` / `runtime.rt0_go`.
const ROOT_FUNCTIONS: &[&str] = &[
    "_start",
    "__libc_start_main",
    "__libc_start_call_main",
    "start_thread",
    "clone",
    "clone3",
    "__clone",
    "__clone3",
    "thread_start",
    "runtime.goexit",
    "runtime.main",
    "runtime.mstart",
    "runtime.rt0_go",
    // The symbol table's names of Go's assembly functions (what a binary without DWARF shows).
    "runtime.goexit.abi0",
    "runtime.mstart.abi0",
    "runtime.rt0_go.abi0",
];

/// Whether a frame-pointer user stack (leaf first) reached an outermost function.
pub fn reaches_root(frames: &[ProfFrame]) -> bool {
    frames.last().is_some_and(|f| {
        // Versioned names (`clone3@GLIBC_2.34`) count as their base name.
        let base = f.function.split('@').next().unwrap_or_default();
        ROOT_FUNCTIONS.contains(&base)
    })
}

/// Symbolizes raw stacks into profile stacks. `service_name` labels service ids.
pub fn symbolize<'a>(
    raw: &[RawStack],
    sym: &mut ProfileSymbolizer,
    service_name: impl Fn(u32) -> &'a str,
) -> Vec<StackSample> {
    // One symbolizer call per process: each call reads the process's memory map once.
    let mut by_pid: HashMap<u32, Vec<usize>> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        by_pid.entry(r.tgid).or_default().push(i);
    }
    let mut user_frames: Vec<Vec<Vec<ProfFrame>>> = vec![Vec::new(); raw.len()];
    for (pid, stacks) in by_pid {
        let addrs: Vec<u64> = stacks
            .iter()
            .flat_map(|&i| raw[i].user.iter().copied())
            .collect();
        let mut frames = sym.user(pid, &addrs).into_iter();
        for i in stacks {
            user_frames[i] = frames.by_ref().take(raw[i].user.len()).collect();
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    for (r, user) in raw.iter().zip(user_frames) {
        let mut user: Vec<ProfFrame> = user.into_iter().flatten().collect();
        let mut truncated = match r.dwarf_complete {
            Some(complete) => !complete,
            None => {
                // Unnamed frames outside every mapping are where frame-pointer walks go astray.
                cut_at_first_unknown(&mut user, |f| f.function.starts_with("[unknown]"));
                !reaches_root(&user)
            }
        };
        if !r.python.is_empty() {
            let (calls, complete) = sym.python.frames(r.tgid, &r.python);
            let (merged, left_over) = super::python::interleave(user, calls);
            user = merged;
            // A native walk that stopped inside Python code (a `-X perf` trampoline) is
            // completed by the thread state's chain; a chain cut at the kernel's limit is not.
            truncated = !complete || (truncated && !left_over);
        }
        let mut frames = sym.kernel(&r.kernel);
        frames.extend(user);
        out.push(StackSample {
            service: service_name(r.service).to_owned(),
            pid: r.tgid,
            frames,
            samples: r.samples,
            value_ns: r.value_ns,
            truncated,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_and_garbage() {
        let f = |n: &str| ProfFrame::named(n);
        assert!(reaches_root(&[
            f("work"),
            f("main"),
            f("__libc_start_call_main")
        ]));
        assert!(!reaches_root(&[f("work"), f("main")]));
        assert!(reaches_root(&[
            f("main.matchOrders"),
            f("main.main"),
            f("runtime.main"),
            f("runtime.goexit")
        ]));
        assert!(reaches_root(&[f("main.main"), f("runtime.main")]));
        assert!(!reaches_root(&[f("main.matchOrders"), f("main.main")]));
        assert!(!reaches_root(&[]));
        let mut frames = vec![f("a"), f("[unknown]+0x10"), f("b"), f("[unknown]+0x20")];
        cut_at_first_unknown(&mut frames, |f: &ProfFrame| {
            f.function.starts_with("[unknown]")
        });
        assert_eq!(frames, vec![f("a")]);
    }
}
