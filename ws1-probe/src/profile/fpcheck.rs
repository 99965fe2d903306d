//! Does a binary maintain frame pointers?
//!
//! The kernel walks frame-pointer stacks itself, which is cheaper than copying stack bytes for
//! the userspace DWARF unwinder, but only gives right stacks when the code keeps `%rbp` as a
//! frame pointer. This module tells from a binary's function prologues whether it does: code
//! built with frame pointers starts functions with `push %rbp; mov %rsp,%rbp` (after an
//! `endbr64` when built with control-flow protection).

use super::binary::{BinaryId, ByteLru, CacheStat};

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use object::{
    Object, ObjectSection, ObjectSymbol, ReadCache, ReadRef, SectionIndex, SectionKind, SymbolKind,
};

/// Functions shorter than this are skipped: tiny leaf functions and stubs often have no frame
/// even in frame-pointer builds.
const MIN_FUNCTION_SIZE: u64 = 16;

/// Fewer candidate functions than this say nothing reliable, and the answer is "no".
const MIN_SAMPLE: usize = 8;

/// Prologues read per binary at most, spread evenly over the functions, so that huge binaries
/// cost no more than a few hundred small reads.
const MAX_SAMPLE: usize = 512;

/// Bytes of answers [`FpCache`] keeps: 1024 binaries.
const FP_CACHE_BYTES: usize = 1024 * FP_ENTRY_BYTES;
/// Estimated bytes of one remembered answer (key, value, table and order entries).
const FP_ENTRY_BYTES: usize = 96;

const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

#[derive(Debug, thiserror::Error)]
pub enum FpCheckError {
    #[error("failed to open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to parse ELF file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{path} claims {bytes} bytes of symbol tables; not parsed")]
    TooLarge { path: PathBuf, bytes: u64 },
}

/// Whether `code` (the first bytes of a function) sets up a frame pointer: an optional
/// `endbr64`, then `push %rbp` and `mov %rsp,%rbp` in either of its two encodings.
fn has_fp_prologue(code: &[u8]) -> bool {
    let code = code.strip_prefix(&ENDBR64[..]).unwrap_or(code);
    matches!(
        code,
        [0x55, 0x48, 0x89, 0xe5, ..] | [0x55, 0x48, 0x8b, 0xec, ..]
    )
}

/// Whether the binary at `path` keeps frame pointers: true for Go binaries ([`is_go`]), and
/// otherwise when at least half of its functions
/// of 16 bytes or more (and at least 8 of them) begin with a frame-pointer prologue.
///
/// Functions come from the symbol table, else from the dynamic symbol table. A stripped binary
/// with neither gives `Ok(false)`: without evidence, DWARF unwinding is the safe choice, as it
/// works for frame-pointer code too.
pub fn has_frame_pointers(path: &Path) -> Result<bool, FpCheckError> {
    let file = File::open(path).map_err(|source| FpCheckError::Open {
        path: path.to_owned(),
        source,
    })?;
    // Only headers, symbols and the sampled prologues are read, not the whole file.
    let cache = ReadCache::new(file);
    // Parsing reads the symbol table into the cache: look at what it claims first.
    if let Some(bytes) = crate::untrusted::elf_symbol_table_bytes(&cache)
        && bytes > crate::untrusted::MAX_ELF_SYMBOL_TABLE_BYTES
    {
        crate::untrusted::refuse(
            crate::untrusted::Kind::Elf,
            crate::untrusted::Reason::TooLarge,
            &path.display().to_string(),
            &format!("it claims {bytes} bytes of symbol tables"),
            "its stacks are unwound with DWARF (the safe choice without evidence of frame pointers)",
        );
        return Err(FpCheckError::TooLarge {
            path: path.to_owned(),
            bytes,
        });
    }
    let (sampled, with_fp) = count_prologues(&cache).map_err(|source| FpCheckError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(is_go(&cache) || (sampled >= MIN_SAMPLE && with_fp * 2 >= sampled))
}

/// Whether the binary was linked by Go's toolchain (it has `.gopclntab`). Go keeps frame
/// pointers on x86-64 in every function that has a frame (since Go 1.7), with a prologue the
/// sampled bytes do not show (`sub $n,%rsp; mov %rbp,n-8(%rsp); lea n-8(%rsp),%rbp` after the
/// stack check); its frameless leaves get their callers back from `leaf.rs`. Frame pointers
/// spare every Go sample a stack copy.
fn is_go<'a, R: ReadRef<'a>>(data: R) -> bool {
    object::File::parse(data).is_ok_and(|f| f.section_by_name(".gopclntab").is_some())
}

/// Returns (functions sampled, of which with a frame-pointer prologue).
fn count_prologues<'a, R: ReadRef<'a>>(data: R) -> Result<(usize, usize), object::Error> {
    let file = object::File::parse(data)?;
    // (index, address, file offset) of each executable section with bytes in the file.
    let code_sections: Vec<(SectionIndex, u64, u64, u64)> = file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text)
        .filter_map(|s| {
            let (offset, size) = s.file_range()?;
            Some((s.index(), s.address(), offset, size))
        })
        .collect();
    let mut functions = function_offsets(file.symbols(), &code_sections);
    if functions.is_empty() {
        functions = function_offsets(file.dynamic_symbols(), &code_sections);
    }

    let step = functions.len().div_ceil(MAX_SAMPLE).max(1);
    let mut sampled = 0;
    let mut with_fp = 0;
    for &offset in functions.iter().step_by(step) {
        let Ok(code) = data.read_bytes_at(offset, 8) else {
            continue;
        };
        sampled += 1;
        if has_fp_prologue(code) {
            with_fp += 1;
        }
    }
    Ok((sampled, with_fp))
}

/// File offsets of the first bytes of the defined functions in `symbols` that are big enough
/// and lie in one of `code_sections` ((index, address, file offset, size)), sorted and without
/// aliases.
fn function_offsets<'data, S: ObjectSymbol<'data>>(
    symbols: impl Iterator<Item = S>,
    code_sections: &[(SectionIndex, u64, u64, u64)],
) -> Vec<u64> {
    let mut offsets: Vec<u64> = symbols
        .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
        .filter(|s| s.size() >= MIN_FUNCTION_SIZE)
        .filter_map(|s| {
            let index = s.section_index()?;
            let &(_, address, offset, size) = code_sections.iter().find(|c| c.0 == index)?;
            let within = s.address().checked_sub(address)?;
            // The prologue must lie inside the section's bytes.
            (within.checked_add(8)? <= size).then_some(offset + within)
        })
        .collect();
    offsets.sort_unstable();
    offsets.dedup();
    offsets
}

/// Remembers the answer per binary ([`BinaryId`]), so that many processes of one binary cost one
/// check.
pub struct FpCache {
    answers: ByteLru<BinaryId, bool>,
}

impl Default for FpCache {
    fn default() -> Self {
        Self {
            answers: ByteLru::new("fp_checks", FP_CACHE_BYTES),
        }
    }
}

impl FpCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Size of the cache, for `ws1_probe_agent_cache_*`.
    pub fn stat(&self) -> CacheStat {
        self.answers.stat()
    }

    /// Binaries with a remembered answer.
    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Whether the main binary of `pid` keeps frame pointers. The binary is read through
    /// `/proc/PID/exe`, which reaches binaries inside containers. Errors (an exited process, an
    /// unreadable binary) are not remembered.
    pub fn process_main_binary_has_frame_pointers(
        &mut self,
        pid: u32,
    ) -> Result<bool, FpCheckError> {
        let path = PathBuf::from(format!("/proc/{pid}/exe"));
        let meta = std::fs::metadata(&path).map_err(|source| FpCheckError::Open {
            path: path.clone(),
            source,
        })?;
        let key = BinaryId::of(&meta);
        if let Some(&answer) = self.answers.get(&key) {
            return Ok(answer);
        }
        let answer = has_frame_pointers(&path)?;
        drop(self.answers.insert(key, answer, FP_ENTRY_BYTES));
        Ok(answer)
    }
}

/// Test helper shared with the unwinder's tests: compiles C `source` with `cc` and `args` into
/// `dir/name`. Returns `None` (after saying so) when there is no C compiler, and panics then
/// when `CI` is set, because CI must not skip tests.
#[cfg(test)]
pub(crate) fn compile_c(dir: &Path, name: &str, source: &str, args: &[&str]) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).expect("create test directory");
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).expect("write C source");
    let out = dir.join(name);
    let status = match std::process::Command::new("cc")
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
    {
        Ok(status) => status,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "no C compiler (cc) on a CI machine"
            );
            println!("skipping test - no C compiler");
            return None;
        }
        Err(e) => panic!("cannot run cc: {e}"),
    };
    assert!(status.success(), "cc {args:?} failed for {name}");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten functions big enough to pass the size filter, none of which the compiler can inline
    /// or fold. With an argument the program waits on stdin, so tests can inspect the process.
    const PROGRAM: &str = r#"
#include <stdio.h>
#define F(name, prev, k) \
    __attribute__((noinline)) long name(long x) { \
        volatile long acc = x; \
        for (long i = 0; i < x; i++) acc += i * k + (acc >> 3); \
        return prev(acc & 0xff) + acc; \
    }
__attribute__((noinline)) long f0(long x) { volatile long v = x * 7; return v + 1; }
F(f1, f0, 3) F(f2, f1, 5) F(f3, f2, 7) F(f4, f3, 11) F(f5, f4, 13)
F(f6, f5, 17) F(f7, f6, 19) F(f8, f7, 23) F(f9, f8, 29) F(f10, f9, 31)
int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) getchar();
    return (int)(f10(argc + 5) & 1);
}
"#;

    fn test_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ws1-fpcheck-{name}-{}", std::process::id()))
    }

    #[test]
    fn recognizes_prologues() {
        assert!(has_fp_prologue(&[0x55, 0x48, 0x89, 0xe5, 0x41, 0x57]));
        assert!(has_fp_prologue(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5
        ]));
        assert!(has_fp_prologue(&[0x55, 0x48, 0x8b, 0xec, 0x90, 0x90]));
        // push %rbx; a frameless function.
        assert!(!has_fp_prologue(&[0x53, 0x48, 0x89, 0xfb, 0x90, 0x90]));
        // endbr64 then sub $0x18,%rsp.
        assert!(!has_fp_prologue(&[
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x18
        ]));
        // push %rbp without the mov (rbp used as a general register).
        assert!(!has_fp_prologue(&[0x55, 0x53, 0x48, 0x89, 0xe5, 0x90]));
        assert!(!has_fp_prologue(&[0x55, 0x48]));
    }

    #[test]
    fn tells_frame_pointer_builds_apart() {
        let dir = test_dir("builds");
        let Some(with) = compile_c(
            &dir,
            "with_fp",
            PROGRAM,
            &["-O2", "-fno-omit-frame-pointer"],
        ) else {
            return;
        };
        let without = compile_c(
            &dir,
            "without_fp",
            PROGRAM,
            &["-O2", "-fomit-frame-pointer"],
        )
        .expect("cc worked a moment ago");
        let stripped = compile_c(
            &dir,
            "stripped",
            PROGRAM,
            &["-O2", "-fno-omit-frame-pointer", "-s"],
        )
        .expect("cc worked a moment ago");

        assert!(has_frame_pointers(&with).unwrap());
        assert!(!has_frame_pointers(&without).unwrap());
        // No function symbols left: no evidence, so no.
        assert!(!has_frame_pointers(&stripped).unwrap());

        let missing = dir.join("does-not-exist");
        assert!(matches!(
            has_frame_pointers(&missing),
            Err(FpCheckError::Open { .. })
        ));
        let not_elf = dir.join("with_fp.c");
        assert!(matches!(
            has_frame_pointers(&not_elf),
            Err(FpCheckError::Parse { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn caches_answers_per_binary() {
        let dir = test_dir("cache");
        let Some(with) = compile_c(
            &dir,
            "with_fp",
            PROGRAM,
            &["-O2", "-fno-omit-frame-pointer"],
        ) else {
            return;
        };
        let without = compile_c(
            &dir,
            "without_fp",
            PROGRAM,
            &["-O2", "-fomit-frame-pointer"],
        )
        .expect("cc worked a moment ago");
        let spawn = |path: &Path| {
            std::process::Command::new(path)
                .arg("wait")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .expect("start test program")
        };
        let mut children = [spawn(&with), spawn(&with), spawn(&without)];

        let mut cache = FpCache::new();
        let answers: Vec<bool> = children
            .iter()
            .map(|c| {
                cache
                    .process_main_binary_has_frame_pointers(c.id())
                    .unwrap()
            })
            .collect();
        assert_eq!(answers, [true, true, false]);
        // Two processes of one binary share an entry.
        assert_eq!(cache.len(), 2);

        for child in &mut children {
            drop(child.stdin.take());
            child.wait().expect("test program exits");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    mod fuzz {
        use super::*;
        use crate::untrusted::fuzz::{config, mutated, small_elf};
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(config(256))]

            /// A damaged or truncated executable is an error or an answer, never a panic.
            #[test]
            fn damaged_elf_never_panics(bytes in mutated(small_elf())) {
                if let Ok((sampled, with_fp)) = count_prologues(&bytes[..]) {
                    prop_assert!(with_fp <= sampled && sampled <= MAX_SAMPLE);
                }
            }
        }
    }
}
