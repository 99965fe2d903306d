//! `ws1-probe top`: the hottest functions of a profile by self and total time, the table that
//! shows them, and the few terminal controls a live, refreshing view needs (no echo, single-key
//! input, clearing the screen) without a terminal UI dependency.

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::RawFd,
    time::{Duration, Instant},
};

use super::Profile;
use crate::units::format_ns;

/// ANSI escape sequences that move the cursor home and clear the screen, printed before each
/// refresh of the live view.
pub const CLEAR_SCREEN: &str = "\x1b[H\x1b[2J";

/// Width of the columns in front of the function name: `SELF%`, `TOTAL%`, `SELF` and the
/// two-space gaps after each.
const NUMBERS_WIDTH: usize = 6 + 2 + 6 + 2 + 8 + 2;

/// Function names are never cut below this, so a very narrow terminal wraps rather than showing
/// nothing useful.
const MIN_NAME_WIDTH: usize = 12;

/// One function of the `top` table.
#[derive(Clone, Debug, PartialEq)]
pub struct TopRow {
    pub function: String,
    /// Time in stacks where the function is the leaf, in nanoseconds.
    pub self_value: u64,
    /// Time in stacks that contain the function anywhere, in nanoseconds.
    pub total_value: u64,
    /// `self_value` as a percentage of the profile's total.
    pub self_pct: f64,
    /// `total_value` as a percentage of the profile's total.
    pub total_pct: f64,
}

/// Why the terminal could not be switched for the live view.
#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("failed to read the terminal mode")]
    GetMode {
        #[source]
        source: io::Error,
    },
    #[error("failed to set the terminal mode")]
    SetMode {
        #[source]
        source: io::Error,
    },
}

/// The `limit` functions with the most self time, then the most total time, then by name.
///
/// Values are `value_ns`, so the table works for off-CPU profiles (blocked time) as well as
/// on-CPU ones. A recursive function counts each stack once in its total, so totals never exceed
/// 100%.
pub fn top_functions(profile: &Profile, limit: usize) -> Vec<TopRow> {
    let total = profile.total_value_ns();
    let mut by_function: HashMap<&str, (u64, u64)> = HashMap::new();
    // Reused for every stack so the loop allocates only when a new function shows up.
    let mut in_stack: HashSet<&str> = HashSet::new();
    for stack in &profile.stacks {
        let value = stack.value_ns;
        if value == 0 {
            continue;
        }
        if let Some(leaf) = stack.frames.first() {
            by_function.entry(&leaf.function).or_default().0 += value;
        }
        in_stack.clear();
        for frame in &stack.frames {
            if in_stack.insert(&frame.function) {
                by_function.entry(&frame.function).or_default().1 += value;
            }
        }
    }
    let pct = |value: u64| {
        if total == 0 {
            0.0
        } else {
            value as f64 / total as f64 * 100.0
        }
    };
    let mut rows: Vec<TopRow> = by_function
        .into_iter()
        .map(|(function, (self_value, total_value))| TopRow {
            function: function.to_owned(),
            self_value,
            total_value,
            self_pct: pct(self_value),
            total_pct: pct(total_value),
        })
        .collect();
    rows.sort_by(|a, b| {
        b.self_value
            .cmp(&a.self_value)
            .then_with(|| b.total_value.cmp(&a.total_value))
            .then_with(|| a.function.cmp(&b.function))
    });
    rows.truncate(limit);
    rows
}

/// Renders rows as a plain-text table under `header`, cutting the header and function names so
/// no line is wider than `width` characters (pass `usize::MAX` for no limit).
pub fn render(rows: &[TopRow], header: &str, width: usize) -> String {
    let name_width = width.saturating_sub(NUMBERS_WIDTH).max(MIN_NAME_WIDTH);
    let mut out = String::new();
    push_cut(&mut out, header, width.max(1));
    out.push('\n');
    out.push_str(&format!(
        "{:>6}  {:>6}  {:>8}  FUNCTION\n",
        "SELF%", "TOTAL%", "SELF"
    ));
    if rows.is_empty() {
        out.push_str("(no samples)\n");
    }
    for row in rows {
        out.push_str(&format!(
            "{:>5.1}%  {:>5.1}%  {:>8}  ",
            row.self_pct,
            row.total_pct,
            format_ns(row.self_value)
        ));
        push_cut(&mut out, &row.function, name_width);
        out.push('\n');
    }
    out
}

/// Appends at most `width` characters of `text`, ending a cut text with `…` so a cut name is not
/// mistaken for a whole one.
fn push_cut(out: &mut String, text: &str, width: usize) {
    if text.chars().count() <= width {
        out.push_str(text);
        return;
    }
    out.extend(text.chars().take(width.saturating_sub(1)));
    out.push('…');
}

/// Whether a file descriptor is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor number; an invalid one yields 0 (EBADF).
    unsafe { libc::isatty(fd) == 1 }
}

/// Standard input switched to single-key input for the live view: keys arrive without Enter and
/// are not echoed over the table. Ctrl-C still raises SIGINT (ISIG stays on).
///
/// The saved mode is restored on drop. A process killed by a signal does not drop, so the live
/// view should handle SIGINT and return normally, or the shell is left without echo.
pub struct RawTerminal {
    fd: RawFd,
    saved: Option<libc::termios>,
}

impl RawTerminal {
    /// Switches standard input when it is a terminal; otherwise changes nothing, so piping
    /// `top` into a file still works.
    pub fn new() -> Result<Self, TerminalError> {
        Self::on(libc::STDIN_FILENO)
    }

    fn on(fd: RawFd) -> Result<Self, TerminalError> {
        if !is_tty(fd) {
            return Ok(Self { fd, saved: None });
        }
        let mut saved = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr writes one termios through a valid, writable pointer.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return Err(TerminalError::GetMode {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: tcgetattr returned 0, so it filled in the whole struct.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: a valid termios derived from the one the terminal returned.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(TerminalError::SetMode {
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            fd,
            saved: Some(saved),
        })
    }

    /// Whether the terminal was switched (standard input is a terminal).
    pub fn is_raw(&self) -> bool {
        self.saved.is_some()
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: restores the termios tcgetattr returned for this descriptor. A failure
            // cannot be reported from drop, and the terminal is then no worse than before.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, saved) };
        }
    }
}

/// Waits up to `timeout` for a key on standard input and returns its byte.
///
/// It returns `None` at the timeout, and also when standard input is not a terminal or is at
/// end of file, but then only after waiting out the timeout, so the live view can use it as its
/// refresh delay without spinning. A signal (a resize, Ctrl-C) ends the wait early with `None`.
pub fn key_pressed(timeout: Duration) -> Option<u8> {
    key_pressed_on(libc::STDIN_FILENO, timeout)
}

fn key_pressed_on(fd: RawFd, timeout: Duration) -> Option<u8> {
    let deadline = Instant::now() + timeout;
    if !is_tty(fd) {
        std::thread::sleep(timeout);
        return None;
    }
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up: a timeout under a millisecond must still wait, not poll once.
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    let millis = libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, and the count says one.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if ready == 0 {
        return None;
    }
    if ready < 0 {
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            sleep_until(deadline);
        }
        return None;
    }
    if pollfd.revents & libc::POLLIN == 0 {
        // Hang-up or error without data: waiting out the timeout keeps the caller from spinning.
        sleep_until(deadline);
        return None;
    }
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a valid, writable u8.
    let read = unsafe { libc::read(fd, (&raw mut byte).cast(), 1) };
    if read == 1 {
        Some(byte)
    } else {
        sleep_until(deadline);
        None
    }
}

fn sleep_until(deadline: Instant) {
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::*;
    use crate::profile::{ProfFrame, ProfileKind, StackSample};

    fn stack(frames: &[&str], value_ns: u64) -> StackSample {
        StackSample {
            service: "svc".to_owned(),
            pid: 1,
            frames: frames.iter().map(|f| ProfFrame::named(f)).collect(),
            samples: 1,
            value_ns,
            truncated: false,
        }
    }

    fn profile() -> Profile {
        let mut p = Profile::new(ProfileKind::Cpu, 100, 0);
        // Leaf first. Total: 1000.
        p.stacks = vec![
            stack(&["memcpy", "parse", "main"], 500),
            // `recurse` appears three times in one stack: its total gains 250 once.
            stack(&["recurse", "recurse", "recurse", "main"], 250),
            stack(&["parse", "main"], 125),
            stack(&["memcpy", "serialize", "main"], 125),
            stack(&["never"], 0),
        ];
        p
    }

    fn row<'a>(rows: &'a [TopRow], function: &str) -> &'a TopRow {
        rows.iter().find(|r| r.function == function).unwrap()
    }

    #[test]
    fn self_and_total_with_recursion_counted_once() {
        let rows = top_functions(&profile(), 10);
        let order: Vec<_> = rows.iter().map(|r| r.function.as_str()).collect();
        // By self time; main and serialize have none and are ordered by total.
        assert_eq!(order, ["memcpy", "recurse", "parse", "main", "serialize"]);
        let memcpy = row(&rows, "memcpy");
        assert_eq!((memcpy.self_value, memcpy.total_value), (625, 625));
        assert_eq!((memcpy.self_pct, memcpy.total_pct), (62.5, 62.5));
        let recurse = row(&rows, "recurse");
        assert_eq!((recurse.self_value, recurse.total_value), (250, 250));
        assert_eq!(recurse.total_pct, 25.0);
        let parse = row(&rows, "parse");
        assert_eq!((parse.self_value, parse.total_value), (125, 625));
        assert_eq!((parse.self_pct, parse.total_pct), (12.5, 62.5));
        let main = row(&rows, "main");
        assert_eq!((main.self_value, main.total_value), (0, 1000));
        assert_eq!((main.self_pct, main.total_pct), (0.0, 100.0));
        assert!(!rows.iter().any(|r| r.function == "never"));
    }

    #[test]
    fn limit_and_tie_breaks() {
        let mut p = Profile::new(ProfileKind::OffCpu, 0, 0);
        p.stacks = vec![
            stack(&["b", "x"], 100),
            stack(&["a", "x"], 100),
            stack(&["c"], 100),
            stack(&["d", "y", "z"], 50),
        ];
        let rows = top_functions(&p, 3);
        let order: Vec<_> = rows.iter().map(|r| r.function.as_str()).collect();
        // Equal self and total: by name.
        assert_eq!(order, ["a", "b", "c"]);
        assert_eq!(rows[0].self_pct, 100.0 / 350.0 * 100.0);
        assert!(top_functions(&Profile::new(ProfileKind::Cpu, 1, 0), 5).is_empty());
    }

    #[test]
    fn render_aligns_columns_and_cuts_names() {
        let rows = vec![
            TopRow {
                function: "short".to_owned(),
                self_value: 1_230_000_000,
                total_value: 2_000_000_000,
                self_pct: 61.5,
                total_pct: 100.0,
            },
            TopRow {
                function: "<alloc::vec::Vec<T> as core::clone::Clone>::clone".to_owned(),
                self_value: 45_600_000,
                total_value: 45_600_000,
                self_pct: 2.28,
                total_pct: 2.28,
            },
        ];
        let out = render(&rows, "ws1-probe top: cpu, 2s window", 50);
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "ws1-probe top: cpu, 2s window",
                " SELF%  TOTAL%      SELF  FUNCTION",
                " 61.5%  100.0%     1.23s  short",
                "  2.3%    2.3%    45.6ms  <alloc::vec::Vec<T> as …",
            ]
        );
        assert!(lines.iter().all(|l| l.chars().count() <= 50));
        // A terminal narrower than the numbers still shows the start of each name.
        let narrow = render(&rows, "a header longer than ten", 10);
        let lines: Vec<_> = narrow.lines().collect();
        assert_eq!(lines[0], "a header …");
        assert!(lines[3].ends_with("  <alloc::vec…"));
        assert_eq!(
            render(&[], "h", 80),
            "h\n SELF%  TOTAL%      SELF  FUNCTION\n(no samples)\n"
        );
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into a valid array of two.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A pseudo-terminal pair: the test types into the master side what the code reads from the
    /// slave side, as a user would at a real terminal.
    fn pty() -> (OwnedFd, OwnedFd) {
        // SAFETY: plain libc calls on descriptors this function owns; every result is checked.
        unsafe {
            let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
            assert!(master >= 0, "posix_openpt: {}", io::Error::last_os_error());
            let master = OwnedFd::from_raw_fd(master);
            assert_eq!(libc::grantpt(master.as_raw_fd()), 0);
            assert_eq!(libc::unlockpt(master.as_raw_fd()), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(
                libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
                0
            );
            let slave = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            assert!(slave >= 0, "open pty: {}", io::Error::last_os_error());
            (master, OwnedFd::from_raw_fd(slave))
        }
    }

    fn lflag(fd: RawFd) -> libc::tcflag_t {
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills a valid termios; the result is checked before reading it.
        unsafe {
            assert_eq!(libc::tcgetattr(fd, t.as_mut_ptr()), 0);
            t.assume_init().c_lflag
        }
    }

    fn write_all(fd: &OwnedFd, bytes: &[u8]) {
        // SAFETY: writes from a valid buffer of the given length.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(n, bytes.len() as isize);
    }

    #[test]
    fn raw_terminal_reads_single_keys_without_echo_and_restores() {
        let (master, slave) = pty();
        let fd = slave.as_raw_fd();
        assert!(is_tty(fd));
        let canonical = libc::ICANON | libc::ECHO;
        assert_eq!(lflag(fd) & canonical, canonical);

        let term = RawTerminal::on(fd).unwrap();
        assert!(term.is_raw());
        assert_eq!(lflag(fd) & canonical, 0);
        assert_eq!(lflag(fd) & libc::ISIG, libc::ISIG);

        // In canonical mode a key without Enter would not be readable.
        write_all(&master, b"q");
        assert_eq!(key_pressed_on(fd, Duration::from_secs(5)), Some(b'q'));
        // Nothing was echoed back to the "screen".
        let mut pollfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 100) }, 0);

        let start = Instant::now();
        assert_eq!(key_pressed_on(fd, Duration::from_millis(60)), None);
        assert!(start.elapsed() >= Duration::from_millis(60));

        drop(term);
        assert_eq!(lflag(fd) & canonical, canonical);
    }

    #[test]
    fn pipes_are_not_terminals_and_key_pressed_waits_them_out() {
        let (read, write) = pipe();
        assert!(!is_tty(read.as_raw_fd()));
        assert!(!is_tty(-1));
        let term = RawTerminal::on(read.as_raw_fd()).unwrap();
        assert!(!term.is_raw());

        write_all(&write, b"q");
        let start = Instant::now();
        assert_eq!(
            key_pressed_on(read.as_raw_fd(), Duration::from_millis(60)),
            None
        );
        assert!(start.elapsed() >= Duration::from_millis(60));
    }
}
