//! Checks made before anything is loaded: capabilities, tracefs, memlock. Pure parsing is split
//! from I/O so it unit-tests without root.

use std::path::Path;

use crate::ebpf::TRACEFS;

pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "missing {missing}: run as root, or grant the capabilities with `sudo setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_dac_read_search+ep <path to ws1-probe>`"
    )]
    Capabilities { missing: String },
    #[error(
        "tracefs is not mounted at {TRACEFS} and mounting it failed ({reason}): run `mount -t tracefs tracefs {TRACEFS}` as root"
    )]
    Tracefs { reason: String },
}

/// Effective capability set of a process, from the `CapEff:` line of /proc/PID/status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    pub fn parse_status(status: &str) -> Option<Self> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim();
        u64::from_str_radix(hex, 16).ok().map(Self)
    }

    pub fn current() -> Option<Self> {
        Self::parse_status(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    pub fn has(self, cap: u32) -> bool {
        self.0 & (1u64 << cap) != 0
    }

    /// What is missing to load and attach tracing programs, or `None` if nothing is.
    pub fn missing_for_tracing(self) -> Option<String> {
        if self.has(CAP_SYS_ADMIN) || (self.has(CAP_BPF) && self.has(CAP_PERFMON)) {
            return None;
        }
        let mut missing = Vec::new();
        if !self.has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !self.has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
        Some(format!("{} (or CAP_SYS_ADMIN)", missing.join(" and ")))
    }
}

/// Fails with one line when the process cannot load tracing programs.
pub fn check_capabilities() -> Result<(), PreflightError> {
    let caps = Capabilities::current().unwrap_or(Capabilities(0));
    match caps.missing_for_tracing() {
        None => Ok(()),
        Some(missing) => Err(PreflightError::Capabilities { missing }),
    }
}

/// Makes sure tracefs is mounted (the agent reads tracepoint formats from it), mounting it if
/// needed.
pub fn ensure_tracefs() -> Result<(), PreflightError> {
    let events = Path::new(TRACEFS).join("events");
    if events.is_dir() {
        return Ok(());
    }
    mount("tracefs", TRACEFS, "tracefs").map_err(|reason| PreflightError::Tracefs { reason })?;
    if events.is_dir() {
        Ok(())
    } else {
        Err(PreflightError::Tracefs {
            reason: "mounted, but it has no events directory".to_owned(),
        })
    }
}

fn mount(source: &str, target: &str, fstype: &str) -> Result<(), String> {
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| e.to_string());
    let (source, target, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; data is null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps against it (before 5.11).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid pointer to an initialized rlimit.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if rc != 0 {
        tracing::debug!(
            "cannot lift RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Kernel lockdown mode (`none`, `integrity`, `confidentiality`), if securityfs shows it.
pub fn lockdown_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    parse_lockdown(&text)
}

/// The bracketed word of the lockdown file, e.g. `none [integrity] confidentiality`.
pub fn parse_lockdown(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities() {
        let root = Capabilities::parse_status("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert_eq!(root.missing_for_tracing(), None);
        let none = Capabilities::parse_status("CapEff:\t0000000000000000\n").unwrap();
        assert_eq!(
            none.missing_for_tracing().as_deref(),
            Some("CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)")
        );
        let bpf_only = Capabilities(1 << CAP_BPF);
        assert_eq!(
            bpf_only.missing_for_tracing().as_deref(),
            Some("CAP_PERFMON (or CAP_SYS_ADMIN)")
        );
        let both = Capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON));
        assert_eq!(both.missing_for_tracing(), None);
        assert_eq!(Capabilities::parse_status("nothing"), None);
    }

    #[test]
    fn lockdown() {
        assert_eq!(
            parse_lockdown("none [integrity] confidentiality\n").as_deref(),
            Some("integrity")
        );
        assert_eq!(parse_lockdown("garbage"), None);
    }
}
