//! Command-line process selectors shared by every subcommand: `--pid`, `--comm`, `--cgroup`.

use std::path::Path;

use regex::Regex;

use super::Rule;

/// Root of the cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Process selectors. A process is observed if it matches any of them; with none (and no
/// configured service) the whole host is observed.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SelectorArgs {
    /// Observe this process and the processes it forks (repeatable)
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Observe processes whose command name matches this regex
    #[arg(long, value_name = "REGEX")]
    pub comm: Option<String>,
    /// Observe processes in this cgroup v2 path or below (e.g. /system.slice/foo.service)
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("no process with pid {pid}: check the pid with `ps -p {pid}`")]
    UnknownPid { pid: u32 },
    #[error("invalid {flag} regex `{pattern}`: {reason}")]
    BadRegex {
        flag: &'static str,
        pattern: String,
        reason: String,
    },
    #[error(
        "cgroup {path} not found under {CGROUP_ROOT}: pass an existing cgroup v2 path such as /system.slice/foo.service"
    )]
    UnknownCgroup { path: String },
}

impl SelectorArgs {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comm.is_none() && self.cgroup.is_none()
    }

    /// Validates the selectors against the system and turns them into rules labeled by
    /// command name.
    pub fn to_rules(
        &self,
        proc_root: &Path,
        cgroup_root: &Path,
    ) -> Result<Vec<Rule>, SelectorError> {
        let mut rules = Vec::new();
        for &pid in &self.pids {
            if pid == 0 || !proc_root.join(pid.to_string()).exists() {
                return Err(SelectorError::UnknownPid { pid });
            }
            let mut rule = Rule::labeled(None);
            rule.pid = Some(pid);
            rules.push(rule);
        }
        if let Some(pattern) = &self.comm {
            let mut rule = Rule::labeled(None);
            rule.comm = Some(compile_regex("--comm", pattern)?);
            rules.push(rule);
        }
        if let Some(path) = &self.cgroup {
            let mut rule = Rule::labeled(None);
            rule.cgroup = Some(normalize_cgroup(path, cgroup_root)?);
            rules.push(rule);
        }
        Ok(rules)
    }
}

/// Compiles a regex, reducing the regex crate's multi-line message to one line.
pub fn compile_regex(flag: &'static str, pattern: &str) -> Result<Regex, SelectorError> {
    Regex::new(pattern).map_err(|err| SelectorError::BadRegex {
        flag,
        pattern: pattern.to_owned(),
        reason: regex_reason(&err),
    })
}

/// The one-line reason of a regex error (the crate renders syntax errors over several lines).
pub fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .unwrap_or_else(|| text.lines().next().unwrap_or("invalid regex"))
        .to_owned()
}

/// Accepts `/sys/fs/cgroup/x/y` or `/x/y` and returns the cgroup path `/x/y`, checking that the
/// cgroup exists.
pub fn normalize_cgroup(path: &str, cgroup_root: &Path) -> Result<String, SelectorError> {
    let root = cgroup_root.to_string_lossy();
    let rel = path.strip_prefix(root.as_ref()).unwrap_or(path);
    let rel = format!("/{}", rel.trim_matches('/'));
    let dir = cgroup_root.join(rel.trim_start_matches('/'));
    if !dir.is_dir() {
        return Err(SelectorError::UnknownCgroup {
            path: path.to_owned(),
        });
    }
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root() -> tempdir::Dir {
        tempdir::Dir::new()
    }

    /// A tiny temp dir helper so tests need no extra crate.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("ws1-sel-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn pids_become_rules_and_unknown_pid_fails() {
        let proc_root = fake_root();
        std::fs::create_dir(proc_root.0.join("42")).unwrap();
        let args = SelectorArgs {
            pids: vec![42],
            ..Default::default()
        };
        let rules = args.to_rules(&proc_root.0, &proc_root.0).unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].pid, Some(42));
        assert!(rules[0].service.is_none());

        let args = SelectorArgs {
            pids: vec![42, 43],
            ..Default::default()
        };
        let err = args.to_rules(&proc_root.0, &proc_root.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no process with pid 43: check the pid with `ps -p 43`"
        );
    }

    #[test]
    fn bad_regex_is_one_line() {
        let args = SelectorArgs {
            comm: Some("trad(ing".into()),
            ..Default::default()
        };
        let err = args
            .to_rules(Path::new("/proc"), Path::new("/"))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("invalid --comm regex `trad(ing`: "),
            "{msg}"
        );
        assert!(msg.contains("unclosed group"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn cgroup_paths_normalize() {
        let root = fake_root();
        std::fs::create_dir_all(root.0.join("system.slice/foo.service")).unwrap();
        let full = format!("{}/system.slice/foo.service", root.0.display());
        assert_eq!(
            normalize_cgroup(&full, &root.0).unwrap(),
            "/system.slice/foo.service"
        );
        assert_eq!(
            normalize_cgroup("system.slice/", &root.0).unwrap(),
            "/system.slice"
        );
        assert!(matches!(
            normalize_cgroup("/nope", &root.0),
            Err(SelectorError::UnknownCgroup { .. })
        ));
    }

    #[test]
    fn empty_selectors() {
        assert!(SelectorArgs::default().is_empty());
        let rules = SelectorArgs::default()
            .to_rules(Path::new("/proc"), Path::new("/"))
            .unwrap();
        assert!(rules.is_empty());
    }
}
