//! The documentation stays true: every internal link resolves (file and `#anchor`), and every
//! `ws1_probe_*` metric name the docs mention is one the agent exports (a family named in the
//! `metrics/` sources) or a recording rule of the shipped rule file.
//!
//! Not privileged: it reads the repository only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every markdown file the project ships: README, ARCHITECTURE and docs/.
fn markdown_files() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    assert!(
        docs.len() >= 6,
        "docs/ should hold the five guides and the runbook: {docs:?}"
    );
    files.extend(docs);
    files
}

/// The lines of a markdown text outside fenced code blocks, with their line numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// GitHub's heading anchor: lowercase, punctuation other than `-` and `_` dropped, spaces to
/// `-`; a repeated anchor gets `-1`, `-2`, ….
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#');
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// Targets of inline links `[text](target)` outside code, with their line numbers.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(text) {
        // Inline code spans are not links.
        let mut prose = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                prose.push_str(part);
            }
        }
        let mut rest = prose.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n, after[..end].trim().to_string()));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn internal_links_resolve() {
    let mut dead = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for (line, target) in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let dest = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let name = file.strip_prefix(repo()).unwrap().display().to_string();
            if !dest.exists() {
                dead.push(format!("{name}:{line}: {target}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_md = dest.extension().is_some_and(|x| x == "md");
                if is_md && !anchors(&std::fs::read_to_string(&dest).unwrap()).contains(anchor) {
                    dead.push(format!(
                        "{name}:{line}: {target}: no heading with that anchor"
                    ));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} internal links found");
    assert!(dead.is_empty(), "dead internal links:\n{}", dead.join("\n"));
}

/// Metric family names the agent exports: string literals `"ws1_probe_…"` in `metrics/`.
fn exported_families() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("ws1-probe/src/metrics")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for piece in text.split('"').skip(1).step_by(2) {
            if piece.starts_with("ws1_probe_")
                && piece.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                out.insert(piece.to_string());
            }
        }
    }
    out
}

#[test]
fn metric_names_in_docs_are_exported() {
    let families = exported_families();
    assert!(
        families.len() > 60,
        "only {} families found",
        families.len()
    );
    let rules = std::fs::read_to_string(repo().join("deploy/ws1-probe-rules.yml")).unwrap();
    // Rust crate names share the prefix; they are not metrics.
    let crates = ["ws1_probe_common", "ws1_probe_ebpf", "ws1_probe_tests"];
    let known = |name: &str| {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        families.contains(family)
    };
    let mut unknown = Vec::new();
    let mut seen = 0;
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(repo()).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            let words = line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'));
            for word in words {
                if word.starts_with("service:ws1_probe_") {
                    // A recording rule (`service:ws1_probe_…:…`).
                    seen += 1;
                    if !rules.contains(&format!("record: {word}\n")) {
                        unknown.push(format!("{name}:{}: recording rule {word}", n + 1));
                    }
                    continue;
                }
                let word = word.trim_start_matches(':').trim_end_matches(':');
                // `ws1_probe_tcp_*` (a wildcard) leaves a trailing `_`.
                if !word.starts_with("ws1_probe_")
                    || word.ends_with('_')
                    || word.contains(':')
                    || crates.contains(&word)
                {
                    continue;
                }
                seen += 1;
                if !known(word) {
                    unknown.push(format!("{name}:{}: {word}", n + 1));
                }
            }
        }
    }
    assert!(seen > 100, "only {seen} metric names found in the docs");
    assert!(
        unknown.is_empty(),
        "metric names in the docs that the agent does not export:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn anchors_follow_github() {
    let text = "# ws1-probe\n## SLOs and alerts: from install to paged\n```\n# not a heading\n```\n## Map sizes\n## Map sizes\n";
    let a = anchors(text);
    assert!(a.contains("slos-and-alerts-from-install-to-paged"), "{a:?}");
    assert!(
        a.contains("map-sizes") && a.contains("map-sizes-1"),
        "{a:?}"
    );
    assert!(!a.contains("not-a-heading"), "{a:?}");
    let links =
        link_targets("see [a](#x) and `[b](#code)`\n```\n[c](#fenced)\n```\n[d](docs/y.md#z)");
    let targets: Vec<&str> = links.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(targets, ["#x", "docs/y.md#z"]);
}
