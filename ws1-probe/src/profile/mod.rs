//! The profiler's userspace side: the symbolized profile model shared by every output, and the
//! pieces that build it (stack unwinding, symbolization) and print it (folded, SVG, pprof, top).
//!
//! The kernel counts on-CPU samples and off-CPU time by (process, user stack, kernel stack);
//! `collectors/profile.rs` reads those maps (and the stream of sampled stacks the DWARF unwinder
//! needs) and turns them into a [`Profile`], one [`StackSample`] per distinct symbolized stack.

pub mod binary;
pub mod flame;
pub mod fold;
pub mod fpcheck;
pub mod gopclntab;
pub mod kallsyms;
pub mod leaf;
pub mod perfmap;
pub mod pprof;
pub mod python;
pub mod raw;
pub mod runtime;
pub mod symbols;
pub mod top;
pub mod unwind;
pub mod windows;

use std::{collections::HashMap, time::Duration};

/// What a profile's values measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileKind {
    /// Sampled on-CPU stacks; `value_ns` is samples × sampling period.
    Cpu,
    /// Blocked (off-CPU) time by stack; `value_ns` is the measured blocked time.
    OffCpu,
}

/// One frame of a symbolized stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ProfFrame {
    /// Demangled function name. A frame nothing could name is `[build-id]+0xOFFSET` (or
    /// `file+0xOFFSET` without a build id), so it can be symbolized later.
    pub function: String,
    /// File name of the binary the frame is in (`[kernel]` for kernel frames), when known.
    pub module: Option<String>,
    /// `file:line` from debug information, when known.
    pub location: Option<String>,
    /// A kernel frame.
    pub kernel: bool,
}

impl ProfFrame {
    /// A frame with only a function name (tests and synthetic roots).
    pub fn named(function: &str) -> Self {
        Self {
            function: function.to_owned(),
            module: None,
            location: None,
            kernel: false,
        }
    }
}

/// One distinct stack of one service and its totals.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StackSample {
    /// Service label of the process the stack was taken in.
    pub service: String,
    /// Process id (the last one seen when stacks of several processes were merged).
    pub pid: u32,
    /// Leaf first: `frames[0]` is where the sample hit (kernel frames come before user frames).
    pub frames: Vec<ProfFrame>,
    /// Number of samples (on-CPU) or of blocked intervals (off-CPU).
    pub samples: u64,
    /// CPU time (on-CPU, samples × period) or blocked time (off-CPU), in nanoseconds.
    pub value_ns: u64,
    /// The user stack did not reach an outermost frame (`_start`, a thread entry): the unwinder
    /// stopped early, so callers are missing.
    pub truncated: bool,
}

/// A symbolized profile of one collection window.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Profile {
    pub kind: ProfileKind,
    /// Sampling frequency per CPU (on-CPU profiles; 0 for off-CPU).
    pub frequency_hz: u64,
    /// Length of the collection window.
    pub duration: Duration,
    /// Start of the window, nanoseconds since the Unix epoch.
    pub start_unix_ns: u64,
    pub stacks: Vec<StackSample>,
}

impl Profile {
    /// An empty profile.
    pub fn new(kind: ProfileKind, frequency_hz: u64, start_unix_ns: u64) -> Self {
        Self {
            kind,
            frequency_hz,
            duration: Duration::ZERO,
            start_unix_ns,
            stacks: Vec::new(),
        }
    }

    /// Sampling period in nanoseconds (on-CPU), 0 when not sampled.
    pub fn period_ns(&self) -> u64 {
        1_000_000_000u64.checked_div(self.frequency_hz).unwrap_or(0)
    }

    /// Sum of `samples` over all stacks.
    pub fn total_samples(&self) -> u64 {
        self.stacks.iter().map(|s| s.samples).sum()
    }

    /// Sum of `value_ns` over all stacks.
    pub fn total_value_ns(&self) -> u64 {
        self.stacks.iter().map(|s| s.value_ns).sum()
    }

    /// Merges stacks of the same service that print the same, adding their totals, and sorts
    /// them by value, largest first (ties by frames, so output is deterministic).
    pub fn merge(&mut self) {
        let mut index: HashMap<(String, Vec<ProfFrame>), usize> = HashMap::new();
        let mut merged: Vec<StackSample> = Vec::with_capacity(self.stacks.len());
        for s in self.stacks.drain(..) {
            match index.get(&(s.service.clone(), s.frames.clone())) {
                Some(&i) => {
                    let m = &mut merged[i];
                    m.samples += s.samples;
                    m.value_ns += s.value_ns;
                    m.truncated |= s.truncated;
                    m.pid = s.pid;
                }
                None => {
                    index.insert((s.service.clone(), s.frames.clone()), merged.len());
                    merged.push(s);
                }
            }
        }
        merged.sort_by(|a, b| {
            b.value_ns
                .cmp(&a.value_ns)
                .then_with(|| a.service.cmp(&b.service))
                .then_with(|| a.frames.cmp(&b.frames))
        });
        self.stacks = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(service: &str, frames: &[&str], samples: u64) -> StackSample {
        StackSample {
            service: service.to_owned(),
            pid: 1,
            frames: frames.iter().map(|f| ProfFrame::named(f)).collect(),
            samples,
            value_ns: samples * 10,
            truncated: false,
        }
    }

    #[test]
    fn merge_adds_equal_stacks_and_sorts() {
        let mut p = Profile::new(ProfileKind::Cpu, 100, 0);
        p.stacks = vec![
            stack("a", &["f", "main"], 1),
            stack("a", &["g", "main"], 5),
            stack("a", &["f", "main"], 2),
            stack("b", &["f", "main"], 1),
        ];
        p.merge();
        assert_eq!(p.stacks.len(), 3);
        assert_eq!(p.stacks[0].samples, 5);
        assert_eq!(p.stacks[1].samples, 3);
        assert_eq!(p.stacks[1].value_ns, 30);
        assert_eq!(p.total_samples(), 9);
        assert_eq!(p.period_ns(), 10_000_000);
    }
}
