//! Which language runtime a profiled process runs: native code, Go, CPython, Node.js or a JVM.
//!
//! Each runtime loses stacks in its own way (Go's frameless leaves, the interpreter frames of
//! CPython, JIT code without a perf map, a JVM without frame pointers in its compiled code), so
//! the truncated-stack counts are split by runtime (the `runtime` label of the
//! `ws1_probe_profile_*` families, the profile command's summary line): a high share then says
//! which kind of process to look at.
//!
//! The classification is decided from what the kernel shows of the process — the name of its
//! executable, the files it maps, the sections of its executable — not from its command line
//! (which it can set to anything) nor from its symbols (a stripped Go binary keeps its
//! `.gopclntab`, but not its symbol table). [`classify`] is pure; [`detect`] gathers the facts
//! of a live process.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    io::{BufRead, BufReader},
    path::Path,
};

use object::{Object, ObjectSection, ReadCache};

/// The runtime of a profiled process. Few values, so it is a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Runtime {
    /// C, C++, Rust and anything else compiled ahead of time without a runtime of its own.
    Native,
    /// A Go binary (`.go.buildinfo`, `.gopclntab` or the Go build-id note).
    Go,
    /// CPython: a `python*` executable or one that maps `libpython*`.
    Python,
    /// Node.js: a `node`/`nodejs` executable or one that maps `libnode*`.
    Node,
    /// A HotSpot (or other) JVM: maps `libjvm.so`.
    Jvm,
    /// The process could not be read (it exited, or `/proc` refused): nothing is claimed.
    Unknown,
}

impl Runtime {
    /// Every value, in label order.
    pub const ALL: [Runtime; 6] = [
        Runtime::Native,
        Runtime::Go,
        Runtime::Python,
        Runtime::Node,
        Runtime::Jvm,
        Runtime::Unknown,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Runtime::Native => "native",
            Runtime::Go => "go",
            Runtime::Python => "python",
            Runtime::Node => "node",
            Runtime::Jvm => "jvm",
            Runtime::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// ELF sections only the Go toolchain writes. `.go.buildinfo` is in every Go binary since 1.13
/// and survives `strip`, as does `.gopclntab` (the runtime needs it for its own tracebacks).
const GO_SECTIONS: &[&str] = &[".go.buildinfo", ".gopclntab", ".note.go.buildid"];

/// Libraries that make a process one of the runtimes (file-name prefixes).
const RUNTIME_LIBRARIES: &[&str] = &["libjvm.so", "libpython", "libnode.so"];

/// Lines of `/proc/PID/maps` read at most (the kernel's default `vm.max_map_count` is 65530).
const MAX_MAPS_LINES: usize = 1 << 20;

/// What [`classify`] decides from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts<'a> {
    /// File name of the executable (`python3.11`, `node`, `java`), without its directory.
    pub exe_name: &'a str,
    /// Paths of the files the process maps (from `/proc/PID/maps`), any order.
    pub mapped: Vec<&'a str>,
    /// Section names of the executable.
    pub exe_sections: Vec<&'a str>,
}

/// The runtime these facts show. A runtime embedded in another program counts as that runtime
/// (a JVM loaded by a native launcher, libpython in uWSGI), because its frames are what the
/// samples are in; the JVM is checked first since its launcher can be called anything.
pub fn classify(facts: &ProcessFacts<'_>) -> Runtime {
    let mapped_base = |prefix: &str| {
        facts
            .mapped
            .iter()
            .any(|p| file_name(p).starts_with(prefix))
    };
    if facts.mapped.iter().any(|p| file_name(p) == "libjvm.so") {
        return Runtime::Jvm;
    }
    if is_python_name(facts.exe_name) || mapped_base("libpython") {
        return Runtime::Python;
    }
    if matches!(facts.exe_name, "node" | "nodejs") || mapped_base("libnode.so") {
        return Runtime::Node;
    }
    if facts.exe_sections.iter().any(|s| GO_SECTIONS.contains(s)) {
        return Runtime::Go;
    }
    Runtime::Native
}

/// `python`, `python3`, `python3.12`, `python3.13t`, `python3.11d`; not `pythonista`.
fn is_python_name(name: &str) -> bool {
    name.strip_prefix("python").is_some_and(|rest| {
        rest.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'd' || b == b't')
    })
}

/// The last path component; a deleted file's ` (deleted)` suffix does not count.
fn file_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

/// The runtime of live process `pid`; [`Runtime::Unknown`] when it cannot be read. Reads
/// `/proc/PID/exe` (its section headers only, through a read cache) and `/proc/PID/maps`.
pub fn detect(pid: u32) -> Runtime {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return Runtime::Unknown;
    };
    let Ok(mapped) = runtime_libraries(pid) else {
        return Runtime::Unknown;
    };
    // The magic link opens the executable itself, even when its path was replaced or is in
    // another mount namespace.
    let sections = section_names(Path::new(&format!("/proc/{pid}/exe")));
    let exe = exe.to_string_lossy();
    let exe_name = file_name(&exe);
    classify(&ProcessFacts {
        exe_name,
        mapped: mapped.iter().map(String::as_str).collect(),
        exe_sections: sections.iter().map(String::as_str).collect(),
    })
}

/// The runtime libraries ([`RUNTIME_LIBRARIES`]) among the files `pid` maps executable, each
/// once. Streamed line by line rather than parsed whole (procfs would hold every line): the
/// process decides how large its maps file is (65 530 mappings with 4 KiB paths is hundreds of
/// MiB), and only a few names are kept.
fn runtime_libraries(pid: u32) -> std::io::Result<Vec<String>> {
    let file = File::open(format!("/proc/{pid}/maps"))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut line = String::new();
    let mut found: Vec<String> = Vec::new();
    for _ in 0..MAX_MAPS_LINES {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        if let Some(path) = executable_file(line.trim_end_matches('\n'))
            && RUNTIME_LIBRARIES
                .iter()
                .any(|lib| file_name(path).starts_with(lib))
            && !found.iter().any(|f| f == path)
        {
            found.push(path.to_owned());
        }
    }
    Ok(found)
}

/// The path of a `/proc/PID/maps` line's mapping when it is an executable mapping of a file:
/// `7f..-7f.. r-xp 00001000 08:01 1234   /usr/lib/libjvm.so`.
fn executable_file(line: &str) -> Option<&str> {
    let mut fields = line.splitn(6, ' ');
    let perms = fields.nth(1)?;
    if perms.as_bytes().get(2) != Some(&b'x') {
        return None;
    }
    let path = fields.nth(3)?.trim_start_matches(' ');
    path.starts_with('/').then_some(path)
}

/// Section names of the ELF file at `path`; empty when it is not one (or unreadable). Only the
/// headers are read, whatever the file's size.
fn section_names(path: &Path) -> Vec<String> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let cache = ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return Vec::new();
    };
    elf.sections()
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect()
}

/// Samples and truncated samples by runtime, for the summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shares {
    by_runtime: BTreeMap<Runtime, (u64, u64)>,
}

impl Shares {
    /// Counts `samples`, all truncated or not, of a process of `runtime`.
    pub fn add(&mut self, runtime: Runtime, samples: u64, truncated: bool) {
        let e = self.by_runtime.entry(runtime).or_default();
        e.0 += samples;
        if truncated {
            e.1 += samples;
        }
    }

    /// `(runtime, samples, truncated)` of the runtimes seen, in label order.
    pub fn iter(&self) -> impl Iterator<Item = (Runtime, u64, u64)> + '_ {
        self.by_runtime.iter().map(|(r, (s, t))| (*r, *s, *t))
    }

    /// `node 0.4% of 2480, native 100.0% of 12`: each runtime's truncated share of its own
    /// samples; empty when no samples were counted.
    pub fn describe(&self) -> String {
        self.iter()
            .filter(|(_, samples, _)| *samples > 0)
            .map(|(r, samples, truncated)| {
                format!(
                    "{r} {:.1}% of {samples}",
                    100.0 * truncated as f64 / samples as f64
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(exe: &'a str, mapped: &[&'a str], sections: &[&'a str]) -> ProcessFacts<'a> {
        ProcessFacts {
            exe_name: exe,
            mapped: mapped.to_vec(),
            exe_sections: sections.to_vec(),
        }
    }

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    const ELF: &[&str] = &[".text", ".data", ".eh_frame", ".symtab"];

    #[test]
    fn runtimes_from_their_files() {
        assert_eq!(
            classify(&facts(
                "redis-server",
                &["/usr/bin/redis-server", LIBC],
                ELF
            )),
            Runtime::Native
        );
        // Debian's python3.11 links libpython statically: the name says it.
        assert_eq!(
            classify(&facts("python3.11", &["/usr/bin/python3.11", LIBC], ELF)),
            Runtime::Python
        );
        assert_eq!(classify(&facts("python3.13t", &[], ELF)), Runtime::Python);
        // An embedding program maps the shared library.
        assert_eq!(
            classify(&facts(
                "uwsgi",
                &["/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", LIBC],
                ELF
            )),
            Runtime::Python
        );
        assert_eq!(
            classify(&facts("pythonista", &[LIBC], ELF)),
            Runtime::Native
        );
        assert_eq!(
            classify(&facts("node", &["/usr/bin/node", LIBC], ELF)),
            Runtime::Node
        );
        // Debian's nodejs maps libnode.
        assert_eq!(
            classify(&facts(
                "nodejs",
                &["/usr/lib/x86_64-linux-gnu/libnode.so.108"],
                ELF
            )),
            Runtime::Node
        );
        assert_eq!(
            classify(&facts("electron-app", &["/opt/app/libnode.so.115"], ELF)),
            Runtime::Node
        );
        // The java launcher is native; the JVM it loads is what runs.
        assert_eq!(
            classify(&facts(
                "java",
                &[
                    "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
                    "/usr/lib/jvm/java-17-openjdk-amd64/lib/server/libjvm.so",
                    LIBC
                ],
                ELF
            )),
            Runtime::Jvm
        );
        // Stripped Go keeps .go.buildinfo and .gopclntab; either is enough.
        assert_eq!(
            classify(&facts(
                "orders",
                &["/srv/orders"],
                &[".text", ".gopclntab", ".go.buildinfo"]
            )),
            Runtime::Go
        );
        assert_eq!(
            classify(&facts("orders", &[], &[".note.go.buildid", ".text"])),
            Runtime::Go
        );
        // A replaced library still names its runtime.
        assert_eq!(
            classify(&facts(
                "launcher",
                &["/opt/jdk/lib/server/libjvm.so (deleted)"],
                ELF
            )),
            Runtime::Jvm
        );
        // Nothing known at all: native, not unknown (unknown is for unreadable processes).
        assert_eq!(classify(&ProcessFacts::default()), Runtime::Native);
    }

    #[test]
    fn labels_are_distinct_and_bounded() {
        let labels: std::collections::BTreeSet<&str> =
            Runtime::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Runtime::ALL.len());
        assert_eq!(Runtime::Jvm.to_string(), "jvm");
    }

    #[test]
    fn this_process_is_native_and_a_missing_one_unknown() {
        // The test binary is Rust: no runtime of its own.
        assert_eq!(detect(std::process::id()), Runtime::Native);
        assert_eq!(detect(u32::MAX), Runtime::Unknown);
    }

    #[test]
    fn executable_file_mappings_of_maps_lines() {
        assert_eq!(
            executable_file(
                "7f0a1c000000-7f0a1d000000 r-xp 00100000 08:01 1234                       /usr/lib/jvm/lib/server/libjvm.so"
            ),
            Some("/usr/lib/jvm/lib/server/libjvm.so")
        );
        // Paths keep their spaces.
        assert_eq!(
            executable_file("1000-2000 r-xp 00000000 08:01 7 /opt/my app/libnode.so.108 (deleted)"),
            Some("/opt/my app/libnode.so.108 (deleted)")
        );
        assert_eq!(
            executable_file("1000-2000 r--p 00000000 08:01 7 /usr/lib/libjvm.so"),
            None
        );
        assert_eq!(
            executable_file("1000-2000 r-xp 00000000 00:00 0                  [vdso]"),
            None
        );
        assert_eq!(executable_file("1000-2000 rwxp 00000000 00:00 0 "), None);
        assert_eq!(executable_file("garbage"), None);
        assert_eq!(executable_file(""), None);
        // This process maps no runtime library.
        assert_eq!(
            runtime_libraries(std::process::id()).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn this_executable_has_elf_sections() {
        let names = section_names(Path::new("/proc/self/exe"));
        assert!(names.iter().any(|n| n == ".text"), "{names:?}");
        assert!(section_names(Path::new("/nonexistent")).is_empty());
        // Not an ELF file.
        assert!(section_names(Path::new("/proc/self/status")).is_empty());
    }

    proptest::proptest! {
        #![proptest_config(crate::untrusted::fuzz::config(256))]

        /// A maps line is what the observed process makes (its paths): any text is a path or
        /// nothing, never a panic, and a path found is part of the line.
        #[test]
        fn maps_lines_never_panic(line in ".{0,200}") {
            if let Some(path) = executable_file(&line) {
                proptest::prop_assert!(line.ends_with(path) && path.starts_with('/'));
            }
            let _ = is_python_name(&line);
            let _ = file_name(&line);
        }
    }

    #[test]
    fn shares_per_runtime() {
        let mut s = Shares::default();
        assert_eq!(s.describe(), "");
        s.add(Runtime::Node, 2470, false);
        s.add(Runtime::Node, 10, true);
        s.add(Runtime::Native, 12, true);
        s.add(Runtime::Go, 0, true);
        assert_eq!(s.describe(), "native 100.0% of 12, node 0.4% of 2480");
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![
                (Runtime::Native, 12, 12),
                (Runtime::Go, 0, 0),
                (Runtime::Node, 2480, 10)
            ]
        );
    }
}
