//! Folded stacks: the one-line-per-stack text format of flamegraph.pl, inferno and BCC's
//! `profile -f` / `offcputime -f`, so a profile can be fed to any of those tools or diffed.
//!
//! A line is `service;outermost;...;leaf VALUE`: the root frame is the service name so stacks of
//! several services in one profile stay apart in a flame graph, and kernel frames carry the
//! `_[k]` suffix the semantic flame graph palettes color as kernel code.

use super::{Profile, ProfileKind, StackSample};

/// Suffix flamegraph.pl and inferno recognize as a kernel frame.
pub const KERNEL_SUFFIX: &str = "_[k]";

/// Name printed for a frame whose function name is empty, so the line keeps one frame per level.
const UNNAMED: &str = "[unknown]";

/// Why folded text could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// A line has no space, so no value after its stack.
    #[error("line {line}: no value after the stack")]
    MissingValue { line: usize },
    /// The text after the last space is not a count.
    #[error("line {line}: `{value}` is not a count")]
    InvalidValue {
        line: usize,
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// A line has a value but no frames.
    #[error("line {line}: empty stack")]
    EmptyStack { line: usize },
}

/// The value a stack's folded line carries: samples for on-CPU profiles (what flamegraph.pl
/// counts), microseconds for off-CPU ones (what BCC `offcputime -f` prints, and small enough to
/// read in a flame graph's tooltip).
pub fn folded_value(kind: ProfileKind, stack: &StackSample) -> u64 {
    match kind {
        ProfileKind::Cpu => stack.samples,
        ProfileKind::OffCpu => stack.value_ns / 1000 + u64::from(stack.value_ns % 1000 >= 500),
    }
}

/// Prints a profile as folded stacks, one line per stack in the profile's order (so the output is
/// as deterministic as the profile), skipping stacks whose value rounds to zero.
pub fn folded(profile: &Profile) -> String {
    let mut out = String::new();
    for stack in &profile.stacks {
        let value = folded_value(profile.kind, stack);
        if value == 0 {
            continue;
        }
        push_sanitized(&mut out, &stack.service);
        // The model is leaf first; folded lines are root first.
        for frame in stack.frames.iter().rev() {
            out.push(';');
            push_sanitized(&mut out, &frame.function);
            if frame.kernel {
                out.push_str(KERNEL_SUFFIX);
            }
        }
        out.push(' ');
        push_u64(&mut out, value);
        out.push('\n');
    }
    out
}

/// Parses folded stacks into (root-first frames, value) pairs.
///
/// The value is after the last space because function names may contain spaces
/// (`<impl Foo as Bar>::baz`). Blank lines and `# ` comments are skipped, as inferno does. Frame
/// names are returned as written, kernel frames with their `_[k]` suffix.
pub fn parse_folded(text: &str) -> Result<Vec<(Vec<String>, u64)>, FoldError> {
    let mut stacks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let number = i + 1;
        let line = line.trim_end();
        if line.trim_start().is_empty() || line.starts_with("# ") {
            continue;
        }
        let (stack, value) = line
            .rsplit_once(' ')
            .ok_or(FoldError::MissingValue { line: number })?;
        let value = value
            .parse::<u64>()
            .map_err(|source| FoldError::InvalidValue {
                line: number,
                value: value.to_owned(),
                source,
            })?;
        let stack = stack.trim_end();
        if stack.is_empty() {
            return Err(FoldError::EmptyStack { line: number });
        }
        stacks.push((stack.split(';').map(str::to_owned).collect(), value));
    }
    Ok(stacks)
}

/// Appends a frame or service name so it cannot break the line: `;` separates frames and a
/// newline separates stacks, so they become `:` and a space.
fn push_sanitized(out: &mut String, name: &str) {
    if name.is_empty() {
        out.push_str(UNNAMED);
        return;
    }
    for c in name.chars() {
        out.push(match c {
            ';' => ':',
            '\n' | '\r' => ' ',
            c => c,
        });
    }
}

/// Appends a number in decimal without the temporary `String` that `to_string` would allocate per
/// line.
fn push_u64(out: &mut String, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for &d in &digits[start..] {
        out.push(char::from(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::ProfFrame;

    fn frame(name: &str, kernel: bool) -> ProfFrame {
        ProfFrame {
            kernel,
            ..ProfFrame::named(name)
        }
    }

    fn stack(service: &str, frames: Vec<ProfFrame>, samples: u64, value_ns: u64) -> StackSample {
        StackSample {
            service: service.to_owned(),
            pid: 7,
            frames,
            samples,
            value_ns,
            truncated: false,
        }
    }

    fn cpu_profile() -> Profile {
        let mut p = Profile::new(ProfileKind::Cpu, 100, 0);
        p.stacks = vec![
            stack(
                "api",
                vec![
                    frame("copy_user", true),
                    frame("do_syscall_64", true),
                    frame("write", false),
                    frame("main", false),
                ],
                3,
                30_000_000,
            ),
            stack(
                "api",
                vec![frame("compute", false), frame("main", false)],
                5,
                50_000_000,
            ),
            stack("db", vec![frame("idle", false)], 0, 0),
            stack("db", vec![frame("query", false)], 1, 10_000_000),
        ];
        p
    }

    #[test]
    fn folds_root_first_with_kernel_suffix_in_profile_order() {
        assert_eq!(
            folded(&cpu_profile()),
            "api;main;write;do_syscall_64_[k];copy_user_[k] 3\n\
             api;main;compute 5\n\
             db;query 1\n"
        );
    }

    #[test]
    fn off_cpu_values_are_rounded_microseconds() {
        let mut p = Profile::new(ProfileKind::OffCpu, 0, 0);
        p.stacks = vec![
            stack("s", vec![frame("a", false)], 1, 1_499),
            stack("s", vec![frame("b", false)], 1, 1_500),
            stack("s", vec![frame("c", false)], 4, 2_000_000),
            stack("s", vec![frame("d", false)], 2, 499),
        ];
        assert_eq!(folded(&p), "s;a 1\ns;b 2\ns;c 2000\n");
    }

    #[test]
    fn sanitizes_separators_inside_names() {
        let mut p = Profile::new(ProfileKind::Cpu, 100, 0);
        p.stacks = vec![stack(
            "svc;x",
            vec![
                frame("<[u8; 8] as Debug>::fmt", false),
                frame("multi\nline\r", false),
                frame("", false),
            ],
            2,
            20,
        )];
        let text = folded(&p);
        assert_eq!(
            text,
            "svc:x;[unknown];multi line ;<[u8: 8] as Debug>::fmt 2\n"
        );
        assert_eq!(text.lines().count(), 1);
    }

    #[test]
    fn round_trips_through_the_parser() {
        let mut p = cpu_profile();
        p.stacks.push(stack(
            "api",
            vec![frame("<impl Foo as Bar>::baz", false), frame("main", false)],
            12_345_678_901,
            1,
        ));
        let parsed = parse_folded(&folded(&p)).unwrap();
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parsed,
            vec![
                (
                    owned(&["api", "main", "write", "do_syscall_64_[k]", "copy_user_[k]"]),
                    3
                ),
                (owned(&["api", "main", "compute"]), 5),
                (owned(&["db", "query"]), 1),
                (
                    owned(&["api", "main", "<impl Foo as Bar>::baz"]),
                    12_345_678_901
                ),
            ]
        );
    }

    #[test]
    fn parser_skips_comments_and_reports_bad_lines() {
        let parsed = parse_folded("# a comment\n\na;b 2\r\nc 0\n").unwrap();
        assert_eq!(
            parsed,
            vec![
                (vec!["a".to_owned(), "b".to_owned()], 2),
                (vec!["c".to_owned()], 0)
            ]
        );
        assert!(matches!(
            parse_folded("a;b 1\nnovalue\n"),
            Err(FoldError::MissingValue { line: 2 })
        ));
        match parse_folded("a;b x1\n") {
            Err(FoldError::InvalidValue { line: 1, value, .. }) => assert_eq!(value, "x1"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse_folded(" 5\n"),
            Err(FoldError::EmptyStack { line: 1 })
        ));
    }
}
