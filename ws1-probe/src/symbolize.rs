//! Turning user-space addresses into function names and source locations, with blazesym.
//!
//! One `Symbolizer` is kept for a whole report: blazesym caches parsed ELF and DWARF data per
//! file, so the second stack in the same binary costs little. Binaries are read through
//! `/proc/PID/map_files`, which also reaches binaries inside containers.

use blazesym::{
    Pid,
    symbolize::{Input, Symbolized, Symbolizer as Blaze, source::Process, source::Source},
};

/// One symbolized frame.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    pub addr: u64,
    /// Demangled function name, when known.
    pub function: Option<String>,
    /// `file:line`, when debug information has it.
    pub location: Option<String>,
}

impl Frame {
    /// `function (file:line)`, or the address when nothing is known.
    pub fn display(&self) -> String {
        match (&self.function, &self.location) {
            (Some(f), Some(l)) => format!("{f} ({l})"),
            (Some(f), None) => f.clone(),
            (None, _) => format!("{:#x}", self.addr),
        }
    }
}

/// Cuts a frame-pointer stack at the first frame after the top that no mapped binary contains:
/// without frame pointers the kernel's walk continues into garbage after the first frame.
pub fn trim_unknown_tail(frames: &mut Vec<Frame>) {
    cut_at_first_unknown(frames, |f| f.function.is_none());
}

/// Keeps the frames before the first one below the top that `unknown` says no binary named
/// (the frame-pointer walk's garbage starts there), for any frame type.
pub fn cut_at_first_unknown<T>(frames: &mut Vec<T>, unknown: impl Fn(&T) -> bool) {
    if let Some(cut) = frames.iter().skip(1).position(unknown) {
        frames.truncate(cut + 1);
    }
}

/// Whether two symbolized stacks print the same (unknown frames never compare equal).
pub fn same_stack(a: &[Frame], b: &[Frame]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.function.is_some() && x.function == y.function && x.location == y.location
        })
}

pub struct Symbolizer {
    inner: Blaze,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            inner: Blaze::new(),
        }
    }

    /// Symbolizes addresses of process `pid`. Never fails: unknown frames keep their address.
    pub fn user_frames(&self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let src = Source::Process(Process::new(Pid::from(pid)));
        let symbolized = match self.inner.symbolize(&src, Input::AbsAddr(addrs)) {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!("cannot symbolize addresses of pid {pid}: {err}");
                Vec::new()
            }
        };
        addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| match symbolized.get(i) {
                Some(Symbolized::Sym(sym)) => Frame {
                    addr: *addr,
                    function: Some(sym.name.to_string()),
                    location: sym.code_info.as_ref().map(|ci| {
                        let file = ci.file.to_string_lossy();
                        match ci.line {
                            Some(line) => format!("{file}:{line}"),
                            None => file.into_owned(),
                        }
                    }),
                },
                _ => Frame {
                    addr: *addr,
                    function: None,
                    location: None,
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn marker_function_for_symbolization() -> u64 {
        marker_function_for_symbolization as *const () as u64
    }

    #[test]
    fn symbolizes_own_function() {
        let addr = marker_function_for_symbolization();
        let frames = Symbolizer::new().user_frames(std::process::id(), &[addr, 1]);
        let name = frames[0].function.as_deref().unwrap_or("");
        assert!(
            name.ends_with("marker_function_for_symbolization"),
            "{frames:?}"
        );
        assert_eq!(frames[1].function, None);
        assert_eq!(frames[1].display(), "0x1");
    }
}
