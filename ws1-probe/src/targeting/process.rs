//! The facts about a process that rules match on, read from procfs.

use std::path::{Path, PathBuf};

/// What a rule can look at. `exe` and `cgroup` are read only when some rule needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub comm: String,
    pub exe: Option<PathBuf>,
    /// cgroup v2 path (the `0::` line of /proc/PID/cgroup).
    pub cgroup: Option<String>,
    /// A kernel thread (`PF_KTHREAD`, or a child of kthreadd); read only in host mode.
    pub kthread: bool,
}

/// `PF_KTHREAD` from include/linux/sched.h.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Whether /proc/PID/stat describes a kernel thread: the `PF_KTHREAD` flag, or kthreadd
/// (pid 2) as parent.
pub fn stat_is_kthread(stat: &str) -> bool {
    // Fields after the parenthesised comm (which may hold spaces): state, ppid, pgrp,
    // session, tty_nr, tpgid, flags.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1).and_then(|f| f.parse::<u32>().ok());
    let flags = fields.get(6).and_then(|f| f.parse::<u64>().ok());
    flags.is_some_and(|f| f & PF_KTHREAD != 0) || ppid == Some(2)
}

/// Which optional facts to read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    pub exe: bool,
    pub cgroup: bool,
    /// Whether it is a kernel thread (host mode groups them).
    pub kthread: bool,
}

impl ProcessInfo {
    /// Reads a process from `proc_root` (normally `/proc`). Fails if the process is gone.
    pub fn read(proc_root: &Path, pid: u32, needs: Needs) -> std::io::Result<Self> {
        let dir = proc_root.join(pid.to_string());
        let comm = std::fs::read_to_string(dir.join("comm"))?;
        let exe = if needs.exe {
            // Kernel threads have no exe; that is not an error.
            std::fs::read_link(dir.join("exe")).ok()
        } else {
            None
        };
        let cgroup = if needs.cgroup {
            std::fs::read_to_string(dir.join("cgroup"))
                .ok()
                .and_then(|s| parse_cgroup_v2(&s))
        } else {
            None
        };
        let kthread = needs.kthread
            && std::fs::read_to_string(dir.join("stat")).is_ok_and(|s| stat_is_kthread(&s));
        Ok(Self {
            pid,
            comm: comm.trim_end_matches('\n').to_owned(),
            exe,
            cgroup,
            kthread,
        })
    }

    /// Builds the info from a command name the kernel reported (NUL-padded `TASK_COMM_LEN`).
    pub fn comm_from_kernel(comm: &[u8]) -> String {
        let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
        String::from_utf8_lossy(&comm[..end]).into_owned()
    }
}

/// Extracts the cgroup v2 path from the contents of /proc/PID/cgroup.
pub fn parse_cgroup_v2(contents: &str) -> Option<String> {
    contents
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Lists the pids in `proc_root`.
pub fn list_pids(proc_root: &Path) -> std::io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir(proc_root)? {
        let entry = entry?;
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// Whether `path` equals `ancestor` or lies below it (cgroup paths, `/` separated).
pub fn cgroup_contains(ancestor: &str, path: &str) -> bool {
    let ancestor = ancestor.trim_end_matches('/');
    if ancestor.is_empty() {
        return true;
    }
    path == ancestor
        || (path.starts_with(ancestor) && path.as_bytes().get(ancestor.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_by_flag_or_parent() {
        let kworker = "57 (kworker/0:1-events) I 2 0 0 0 -1 69238880 0 0 0 0 0 1 0 0 20 0 1 0";
        assert!(stat_is_kthread(kworker));
        let kthreadd = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0";
        assert!(stat_is_kthread(kthreadd));
        let bash = "900 (bash (x)) S 1 900 900 34816 900 4194560 0 0 0 0 0 0 0 0 20 0 1 0";
        assert!(!stat_is_kthread(bash));
    }

    #[test]
    fn cgroup_v2_line() {
        let s = "12:cpu:/legacy\n0::/system.slice/trading.service\n";
        assert_eq!(
            parse_cgroup_v2(s).as_deref(),
            Some("/system.slice/trading.service")
        );
        assert_eq!(parse_cgroup_v2("3:memory:/x\n"), None);
    }

    #[test]
    fn cgroup_prefix_is_by_component() {
        assert!(cgroup_contains("/system.slice", "/system.slice/a.service"));
        assert!(cgroup_contains("/system.slice/", "/system.slice"));
        assert!(!cgroup_contains(
            "/system.slice/a",
            "/system.slice/ab.service"
        ));
        assert!(cgroup_contains("/", "/anything"));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let info = ProcessInfo::read(
            Path::new("/proc"),
            me,
            Needs {
                exe: true,
                cgroup: true,
                kthread: true,
            },
        )
        .unwrap();
        assert!(!info.kthread);
        let kthreadd = ProcessInfo::read(
            Path::new("/proc"),
            2,
            Needs {
                kthread: true,
                ..Needs::default()
            },
        );
        // pid 2 is kthreadd outside a pid namespace.
        if let Some(k) = kthreadd.ok().filter(|k| k.comm == "kthreadd") {
            assert!(k.kthread);
        }
        assert_eq!(info.pid, me);
        assert!(!info.comm.is_empty());
        assert_eq!(info.exe, std::env::current_exe().ok());
        assert!(list_pids(Path::new("/proc")).unwrap().contains(&me));
    }

    #[test]
    fn kernel_comm_is_nul_trimmed() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        assert_eq!(ProcessInfo::comm_from_kernel(&comm), "bash");
        assert_eq!(
            ProcessInfo::comm_from_kernel(b"0123456789abcdef"),
            "0123456789abcdef"
        );
    }
}
