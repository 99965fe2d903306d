//! Static name tables for x86_64 Linux syscall numbers and Linux errno values.
//!
//! Everything here is `std`-only, allocation-free on the lookup path (labels
//! for unknown values allocate a small `String`), and O(1) by number.

use std::borrow::Cow;

/// x86_64 syscall names, indexed by syscall number.
///
/// Source: the kernel's `arch/x86/entry/syscalls/syscall_64.tbl`, entries of
/// the `common` and `64` ABIs, up to and including `rseq_slice_yield` (471,
/// the last entry as of Linux 7.0). Numbers 0..=334 and 424..=450 agree with
/// the uapi header `/usr/include/x86_64-linux-gnu/asm/unistd_64.h` (checked
/// by a unit test); `uretprobe` (335, Linux 6.11), `uprobe` (336) and
/// 451..=471 were added from the kernel table. 337..=423 are unused, and the
/// x32-only numbers 512..=547 (and anything with `__X32_SYSCALL_BIT` set) are
/// not part of the 64-bit ABI, so they have no name here.
#[cfg(target_arch = "x86_64")]
mod x86_64_table {
    /// Names for syscalls `0..=336` (no gaps).
    #[rustfmt::skip]
    pub(super) static LOW: [&str; 337] = [
    /*   0 */ "read", "write", "open", "close", "stat", "fstat", "lstat", "poll", "lseek", "mmap",
    /*  10 */ "mprotect", "munmap", "brk", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn",
    /*  16 */ "ioctl", "pread64", "pwrite64", "readv", "writev", "access", "pipe", "select",
    /*  24 */ "sched_yield", "mremap", "msync", "mincore", "madvise", "shmget", "shmat", "shmctl",
    /*  32 */ "dup", "dup2", "pause", "nanosleep", "getitimer", "alarm", "setitimer", "getpid",
    /*  40 */ "sendfile", "socket", "connect", "accept", "sendto", "recvfrom", "sendmsg",
    /*  47 */ "recvmsg", "shutdown", "bind", "listen", "getsockname", "getpeername", "socketpair",
    /*  54 */ "setsockopt", "getsockopt", "clone", "fork", "vfork", "execve", "exit", "wait4",
    /*  62 */ "kill", "uname", "semget", "semop", "semctl", "shmdt", "msgget", "msgsnd", "msgrcv",
    /*  71 */ "msgctl", "fcntl", "flock", "fsync", "fdatasync", "truncate", "ftruncate",
    /*  78 */ "getdents", "getcwd", "chdir", "fchdir", "rename", "mkdir", "rmdir", "creat", "link",
    /*  87 */ "unlink", "symlink", "readlink", "chmod", "fchmod", "chown", "fchown", "lchown",
    /*  95 */ "umask", "gettimeofday", "getrlimit", "getrusage", "sysinfo", "times", "ptrace",
    /* 102 */ "getuid", "syslog", "getgid", "setuid", "setgid", "geteuid", "getegid", "setpgid",
    /* 110 */ "getppid", "getpgrp", "setsid", "setreuid", "setregid", "getgroups", "setgroups",
    /* 117 */ "setresuid", "getresuid", "setresgid", "getresgid", "getpgid", "setfsuid",
    /* 123 */ "setfsgid", "getsid", "capget", "capset", "rt_sigpending", "rt_sigtimedwait",
    /* 129 */ "rt_sigqueueinfo", "rt_sigsuspend", "sigaltstack", "utime", "mknod", "uselib",
    /* 135 */ "personality", "ustat", "statfs", "fstatfs", "sysfs", "getpriority", "setpriority",
    /* 142 */ "sched_setparam", "sched_getparam", "sched_setscheduler", "sched_getscheduler",
    /* 146 */ "sched_get_priority_max", "sched_get_priority_min", "sched_rr_get_interval", "mlock",
    /* 150 */ "munlock", "mlockall", "munlockall", "vhangup", "modify_ldt", "pivot_root",
    /* 156 */ "_sysctl", "prctl", "arch_prctl", "adjtimex", "setrlimit", "chroot", "sync", "acct",
    /* 164 */ "settimeofday", "mount", "umount2", "swapon", "swapoff", "reboot", "sethostname",
    /* 171 */ "setdomainname", "iopl", "ioperm", "create_module", "init_module", "delete_module",
    /* 177 */ "get_kernel_syms", "query_module", "quotactl", "nfsservctl", "getpmsg", "putpmsg",
    /* 183 */ "afs_syscall", "tuxcall", "security", "gettid", "readahead", "setxattr", "lsetxattr",
    /* 190 */ "fsetxattr", "getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr",
    /* 196 */ "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "tkill", "time",
    /* 202 */ "futex", "sched_setaffinity", "sched_getaffinity", "set_thread_area", "io_setup",
    /* 207 */ "io_destroy", "io_getevents", "io_submit", "io_cancel", "get_thread_area",
    /* 212 */ "lookup_dcookie", "epoll_create", "epoll_ctl_old", "epoll_wait_old",
    /* 216 */ "remap_file_pages", "getdents64", "set_tid_address", "restart_syscall", "semtimedop",
    /* 221 */ "fadvise64", "timer_create", "timer_settime", "timer_gettime", "timer_getoverrun",
    /* 226 */ "timer_delete", "clock_settime", "clock_gettime", "clock_getres", "clock_nanosleep",
    /* 231 */ "exit_group", "epoll_wait", "epoll_ctl", "tgkill", "utimes", "vserver", "mbind",
    /* 238 */ "set_mempolicy", "get_mempolicy", "mq_open", "mq_unlink", "mq_timedsend",
    /* 243 */ "mq_timedreceive", "mq_notify", "mq_getsetattr", "kexec_load", "waitid", "add_key",
    /* 249 */ "request_key", "keyctl", "ioprio_set", "ioprio_get", "inotify_init",
    /* 254 */ "inotify_add_watch", "inotify_rm_watch", "migrate_pages", "openat", "mkdirat",
    /* 259 */ "mknodat", "fchownat", "futimesat", "newfstatat", "unlinkat", "renameat", "linkat",
    /* 266 */ "symlinkat", "readlinkat", "fchmodat", "faccessat", "pselect6", "ppoll", "unshare",
    /* 273 */ "set_robust_list", "get_robust_list", "splice", "tee", "sync_file_range", "vmsplice",
    /* 279 */ "move_pages", "utimensat", "epoll_pwait", "signalfd", "timerfd_create", "eventfd",
    /* 285 */ "fallocate", "timerfd_settime", "timerfd_gettime", "accept4", "signalfd4",
    /* 290 */ "eventfd2", "epoll_create1", "dup3", "pipe2", "inotify_init1", "preadv", "pwritev",
    /* 297 */ "rt_tgsigqueueinfo", "perf_event_open", "recvmmsg", "fanotify_init", "fanotify_mark",
    /* 302 */ "prlimit64", "name_to_handle_at", "open_by_handle_at", "clock_adjtime", "syncfs",
    /* 307 */ "sendmmsg", "setns", "getcpu", "process_vm_readv", "process_vm_writev", "kcmp",
    /* 313 */ "finit_module", "sched_setattr", "sched_getattr", "renameat2", "seccomp",
    /* 318 */ "getrandom", "memfd_create", "kexec_file_load", "bpf", "execveat", "userfaultfd",
    /* 324 */ "membarrier", "mlock2", "copy_file_range", "preadv2", "pwritev2", "pkey_mprotect",
    /* 330 */ "pkey_alloc", "pkey_free", "statx", "io_pgetevents", "rseq", "uretprobe", "uprobe",
    ];

    /// First number of the second dense block.
    pub(super) const HIGH_BASE: usize = 424;

    /// Names for syscalls `424..=471` (no gaps).
    #[rustfmt::skip]
    pub(super) static HIGH: [&str; 48] = [
    /* 424 */ "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register",
    /* 428 */ "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "pidfd_open",
    /* 435 */ "clone3", "close_range", "openat2", "pidfd_getfd", "faccessat2", "process_madvise",
    /* 441 */ "epoll_pwait2", "mount_setattr", "quotactl_fd", "landlock_create_ruleset",
    /* 445 */ "landlock_add_rule", "landlock_restrict_self", "memfd_secret", "process_mrelease",
    /* 449 */ "futex_waitv", "set_mempolicy_home_node", "cachestat", "fchmodat2",
    /* 453 */ "map_shadow_stack", "futex_wake", "futex_wait", "futex_requeue", "statmount",
    /* 458 */ "listmount", "lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules", "mseal",
    /* 463 */ "setxattrat", "getxattrat", "listxattrat", "removexattrat", "open_tree_attr",
    /* 468 */ "file_getattr", "file_setattr", "listns", "rseq_slice_yield",
    ];
}

/// Name of x86_64 syscall `nr` (e.g. `0` -> `"read"`), or `None` for numbers
/// that are unused or newer than the table.
#[cfg(target_arch = "x86_64")]
pub fn syscall_name(nr: u32) -> Option<&'static str> {
    use x86_64_table::{HIGH, HIGH_BASE, LOW};
    let nr = nr as usize;
    match LOW.get(nr) {
        Some(name) => Some(name),
        None => nr.checked_sub(HIGH_BASE).and_then(|i| HIGH.get(i)).copied(),
    }
}

/// Fallback for non-x86_64 targets: no syscall table, so every number is
/// unknown and [`syscall_label`] yields `syscall_<nr>`.
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall_name(_nr: u32) -> Option<&'static str> {
    None
}

/// All known `(number, name)` pairs in ascending number order.
#[cfg(target_arch = "x86_64")]
pub fn syscall_entries() -> impl Iterator<Item = (u32, &'static str)> {
    use x86_64_table::{HIGH, HIGH_BASE, LOW};
    let low = LOW.iter().enumerate().map(|(i, &n)| (i as u32, n));
    let high = HIGH
        .iter()
        .enumerate()
        .map(|(i, &n)| ((HIGH_BASE + i) as u32, n));
    low.chain(high)
}

/// All known `(number, name)` pairs (none on non-x86_64 targets).
#[cfg(not(target_arch = "x86_64"))]
pub fn syscall_entries() -> impl Iterator<Item = (u32, &'static str)> {
    std::iter::empty()
}

/// Reverse lookup: syscall number for `name` (e.g. `"openat"` -> `257`).
/// Linear scan; intended for command-line parsing, not hot paths.
pub fn syscall_nr(name: &str) -> Option<u32> {
    syscall_entries()
        .find(|&(_, n)| n == name)
        .map(|(nr, _)| nr)
}

/// Syscall name, or `syscall_<nr>` when the number is unknown.
pub fn syscall_label(nr: u32) -> Cow<'static, str> {
    match syscall_name(nr) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!("syscall_{nr}")),
    }
}

/// Errno names for `0..=133`, indexed by value; `""` marks values with no
/// name of their own (0, and 41/58 which are unused in the generic table).
///
/// Source: `include/uapi/asm-generic/errno-base.h` and `errno.h` (the values
/// used by x86, arm64, riscv and most other architectures; alpha, mips,
/// parisc, sparc and powerpc differ in places). Aliases resolve to the
/// primary name: `EWOULDBLOCK` -> `EAGAIN`, `EDEADLOCK` -> `EDEADLK`.
#[rustfmt::skip]
static ERRNO_BASE: [&str; 134] = [
    /*   0 */ "", "EPERM", "ENOENT", "ESRCH", "EINTR", "EIO", "ENXIO", "E2BIG", "ENOEXEC", "EBADF",
    /*  10 */ "ECHILD", "EAGAIN", "ENOMEM", "EACCES", "EFAULT", "ENOTBLK", "EBUSY", "EEXIST",
    /*  18 */ "EXDEV", "ENODEV", "ENOTDIR", "EISDIR", "EINVAL", "ENFILE", "EMFILE", "ENOTTY",
    /*  26 */ "ETXTBSY", "EFBIG", "ENOSPC", "ESPIPE", "EROFS", "EMLINK", "EPIPE", "EDOM", "ERANGE",
    /*  35 */ "EDEADLK", "ENAMETOOLONG", "ENOLCK", "ENOSYS", "ENOTEMPTY", "ELOOP", "", "ENOMSG",
    /*  43 */ "EIDRM", "ECHRNG", "EL2NSYNC", "EL3HLT", "EL3RST", "ELNRNG", "EUNATCH", "ENOCSI",
    /*  51 */ "EL2HLT", "EBADE", "EBADR", "EXFULL", "ENOANO", "EBADRQC", "EBADSLT", "", "EBFONT",
    /*  60 */ "ENOSTR", "ENODATA", "ETIME", "ENOSR", "ENONET", "ENOPKG", "EREMOTE", "ENOLINK",
    /*  68 */ "EADV", "ESRMNT", "ECOMM", "EPROTO", "EMULTIHOP", "EDOTDOT", "EBADMSG", "EOVERFLOW",
    /*  76 */ "ENOTUNIQ", "EBADFD", "EREMCHG", "ELIBACC", "ELIBBAD", "ELIBSCN", "ELIBMAX",
    /*  83 */ "ELIBEXEC", "EILSEQ", "ERESTART", "ESTRPIPE", "EUSERS", "ENOTSOCK", "EDESTADDRREQ",
    /*  90 */ "EMSGSIZE", "EPROTOTYPE", "ENOPROTOOPT", "EPROTONOSUPPORT", "ESOCKTNOSUPPORT",
    /*  95 */ "EOPNOTSUPP", "EPFNOSUPPORT", "EAFNOSUPPORT", "EADDRINUSE", "EADDRNOTAVAIL",
    /* 100 */ "ENETDOWN", "ENETUNREACH", "ENETRESET", "ECONNABORTED", "ECONNRESET", "ENOBUFS",
    /* 106 */ "EISCONN", "ENOTCONN", "ESHUTDOWN", "ETOOMANYREFS", "ETIMEDOUT", "ECONNREFUSED",
    /* 112 */ "EHOSTDOWN", "EHOSTUNREACH", "EALREADY", "EINPROGRESS", "ESTALE", "EUCLEAN",
    /* 118 */ "ENOTNAM", "ENAVAIL", "EISNAM", "EREMOTEIO", "EDQUOT", "ENOMEDIUM", "EMEDIUMTYPE",
    /* 125 */ "ECANCELED", "ENOKEY", "EKEYEXPIRED", "EKEYREVOKED", "EKEYREJECTED", "EOWNERDEAD",
    /* 131 */ "ENOTRECOVERABLE", "ERFKILL", "EHWPOISON",
];

/// First value of the kernel-internal errno block.
const ERRNO_KERNEL_BASE: usize = 512;

/// Kernel-internal errno values `512..=531` from `include/linux/errno.h`.
/// They must never reach userspace through syscalls, but they do show up in
/// tracepoints (`sys_exit` return values, NFS and block-layer events).
/// 520 is unused.
#[rustfmt::skip]
static ERRNO_KERNEL: [&str; 20] = [
    /* 512 */ "ERESTARTSYS", "ERESTARTNOINTR", "ERESTARTNOHAND", "ENOIOCTLCMD",
    /* 516 */ "ERESTART_RESTARTBLOCK", "EPROBE_DEFER", "EOPENSTALE", "ENOPARAM", "", "EBADHANDLE",
    /* 522 */ "ENOTSYNC", "EBADCOOKIE", "ENOTSUPP", "ETOOSMALL", "ESERVERFAULT", "EBADTYPE",
    /* 528 */ "EJUKEBOX", "EIOCBQUEUED", "ERECALLCONFLICT", "ENOGRACE",
];

/// Name of (positive) errno value `errno` (e.g. `2` -> `"ENOENT"`), or `None`.
/// Callers holding a negative kernel return value should negate it first.
pub fn errno_name(errno: u32) -> Option<&'static str> {
    let e = errno as usize;
    let name = match ERRNO_BASE.get(e) {
        Some(name) => name,
        None => e
            .checked_sub(ERRNO_KERNEL_BASE)
            .and_then(|i| ERRNO_KERNEL.get(i))?,
    };
    if name.is_empty() { None } else { Some(name) }
}

/// Errno name, or `errno_<n>` when the value is unknown.
pub fn errno_label(errno: u32) -> Cow<'static, str> {
    match errno_name(errno) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!("errno_{errno}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `#define PREFIX<name> <decimal>` lines; non-numeric values
    /// (aliases such as `EWOULDBLOCK EAGAIN`) are skipped.
    fn parse_defines(text: &str, prefix: &str) -> Vec<(String, u32)> {
        text.lines()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                if it.next()? != "#define" {
                    return None;
                }
                let name = it.next()?.strip_prefix(prefix)?;
                let value = it.next()?.parse().ok()?;
                Some((name.to_string(), value))
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn known_syscalls() {
        let cases = [
            (0, "read"),
            (1, "write"),
            (2, "open"),
            (39, "getpid"),
            (59, "execve"),
            (60, "exit"),
            (110, "getppid"),
            (202, "futex"),
            (231, "exit_group"),
            (257, "openat"),
            (262, "newfstatat"),
            (321, "bpf"),
            (334, "rseq"),
            (335, "uretprobe"),
            (336, "uprobe"),
            (424, "pidfd_send_signal"),
            (435, "clone3"),
            (450, "set_mempolicy_home_node"),
            (451, "cachestat"),
            (462, "mseal"),
            (467, "open_tree_attr"),
            (470, "listns"),
            (471, "rseq_slice_yield"),
        ];
        for (nr, name) in cases {
            assert_eq!(syscall_name(nr), Some(name), "syscall {nr}");
            assert_eq!(syscall_label(nr), name);
            assert_eq!(syscall_nr(name), Some(nr), "reverse {name}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn unknown_syscalls() {
        for nr in [337, 400, 423, 472, 512, 547, 0x4000_0000, u32::MAX] {
            assert_eq!(syscall_name(nr), None, "syscall {nr}");
        }
        assert_eq!(syscall_label(400), "syscall_400");
        assert!(matches!(syscall_label(0), Cow::Borrowed("read")));
        assert_eq!(syscall_nr("no_such_syscall"), None);
        assert_eq!(syscall_nr(""), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn reverse_lookup_round_trips() {
        let mut count = 0;
        let mut prev = None;
        for (nr, name) in syscall_entries() {
            assert!(!name.is_empty(), "empty name for {nr}");
            assert!(prev.is_none_or(|p| p < nr), "entries not ascending at {nr}");
            assert_eq!(syscall_name(nr), Some(name));
            assert_eq!(syscall_nr(name), Some(nr), "{name} is not unique");
            prev = Some(nr);
            count += 1;
        }
        assert_eq!(count, 337 + 48);
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[test]
    fn fallback_has_no_names() {
        assert_eq!(syscall_name(0), None);
        assert_eq!(syscall_label(0), "syscall_0");
        assert_eq!(syscall_nr("read"), None);
    }

    /// Every `__NR_*` in the installed uapi header must match the table.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn matches_installed_unistd_64_h() {
        let path = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
        let Ok(text) = std::fs::read_to_string(path) else {
            eprintln!("{path} not found; skipping cross-check");
            return;
        };
        let defs = parse_defines(&text, "__NR_");
        assert!(defs.len() > 300, "parsed only {} entries", defs.len());
        for (name, nr) in &defs {
            assert_eq!(syscall_name(*nr), Some(name.as_str()), "__NR_{name} = {nr}");
        }
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(0), None);
        assert_eq!(errno_name(1), Some("EPERM"));
        assert_eq!(errno_name(2), Some("ENOENT"));
        assert_eq!(errno_name(11), Some("EAGAIN"));
        assert_eq!(errno_name(35), Some("EDEADLK"));
        assert_eq!(errno_name(41), None);
        assert_eq!(errno_name(58), None);
        assert_eq!(errno_name(95), Some("EOPNOTSUPP"));
        assert_eq!(errno_name(110), Some("ETIMEDOUT"));
        assert_eq!(errno_name(133), Some("EHWPOISON"));
        assert_eq!(errno_name(134), None);
        assert_eq!(errno_name(511), None);
        assert_eq!(errno_name(512), Some("ERESTARTSYS"));
        assert_eq!(errno_name(516), Some("ERESTART_RESTARTBLOCK"));
        assert_eq!(errno_name(517), Some("EPROBE_DEFER"));
        assert_eq!(errno_name(520), None);
        assert_eq!(errno_name(524), Some("ENOTSUPP"));
        assert_eq!(errno_name(530), Some("ERECALLCONFLICT"));
        assert_eq!(errno_name(531), Some("ENOGRACE"));
        assert_eq!(errno_name(532), None);
        assert_eq!(errno_name(u32::MAX), None);
        assert_eq!(errno_label(2), "ENOENT");
        assert_eq!(errno_label(999), "errno_999");
        assert_eq!(errno_label(0), "errno_0");
    }

    /// Every numeric errno in the installed asm-generic headers must match.
    #[test]
    fn matches_installed_errno_headers() {
        let mut checked = 0;
        for path in [
            "/usr/include/asm-generic/errno-base.h",
            "/usr/include/asm-generic/errno.h",
        ] {
            let Ok(text) = std::fs::read_to_string(path) else {
                eprintln!("{path} not found; skipping cross-check");
                continue;
            };
            for (name, value) in parse_defines(&text, "") {
                assert_eq!(errno_name(value), Some(name.as_str()), "{name} = {value}");
                checked += 1;
            }
        }
        assert!(
            checked == 0 || checked == 131,
            "checked {checked} errno values"
        );
    }
}
