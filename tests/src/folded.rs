//! Reading the profiler's folded output and summary line in the profile tests
//! (`profile.rs`, `profile_leaf.rs`, `python.rs`, `runtimes.rs`).

/// Folded lines: frames root first, and their values.
pub type Folded = Vec<(Vec<String>, u64)>;

/// Parses folded text (`frame;frame;… value` per line).
pub fn parse_folded(text: &str) -> Folded {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (stack, value) = line.rsplit_once(' ').expect("folded line has a value");
            (
                stack.split(';').map(str::to_owned).collect(),
                value.parse().expect("folded value is a number"),
            )
        })
        .collect()
}

/// The innermost user frame (kernel frames carry the `_[k]` suffix and come last).
pub fn user_leaf(frames: &[String]) -> &str {
    frames
        .iter()
        .rev()
        .find(|f| !f.ends_with("_[k]"))
        .map_or("", String::as_str)
}

/// Whether `chain` appears in `frames` in this order (not necessarily adjacent).
pub fn in_order(frames: &[String], chain: &[&str]) -> bool {
    let mut it = frames.iter();
    chain.iter().all(|want| it.any(|f| f == want))
}

/// The share in "…, N.N% truncated" of the CLI's summary line.
pub fn truncated_share(stderr: &str) -> f64 {
    let at = stderr
        .find("% truncated")
        .expect("summary line with truncated share");
    let start = stderr[..at]
        .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or(0, |i| i + 1);
    stderr[start..at].parse().expect("a percentage")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_lines_summary_and_chains() {
        let f = parse_folded("a;b;c 3\n\na;x_[k] 2\n");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].1, 3);
        assert_eq!(user_leaf(&f[1].0), "a");
        assert!(in_order(&f[0].0, &["a", "c"]));
        assert!(!in_order(&f[0].0, &["c", "a"]));
        assert_eq!(
            truncated_share("990 samples, 1.5% truncated (go 2.0% of 50)"),
            1.5
        );
    }
}
