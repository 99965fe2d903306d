//! Shared types of the profiler: on-CPU samples and off-CPU time by (process, user stack,
//! kernel stack), and the sampled user stacks the DWARF unwinder needs.

/// Key of `PROFILE_COUNTS` and `OFFCPU_TIME`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileKey {
    pub tgid: u32,
    pub service: u32,
    /// Id in `PROFILE_STACKS`, or negative when there is none (kernel threads, a full map, or
    /// a DWARF-mode process whose user stack travels in the sample instead).
    pub user_stack: i32,
    pub kernel_stack: i32,
    /// When the process is in `PROFILE_LEAF`: the first of the [`LEAF_SLOTS`] words at the user
    /// stack pointer that falls in one of its [`LeafText`] ranges, with its slot in the bits
    /// from [`LEAF_SLOT_SHIFT`] (see [`leaf_ret_word`]), else 0: the return address of a
    /// sampled leaf function that set up no frame, which the frame-pointer walk skips (see
    /// `ws1-probe/src/profile/leaf.rs`).
    pub leaf_ret: u64,
    /// Id in `PY_STACKS` of the Python frames of the sample (0: none; see `python.rs`).
    pub python_stack: u32,
    pub _pad: u32,
}

/// Value of `OFFCPU_TIME`: blocked time and the number of blocked intervals.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub ns: u64,
    pub count: u64,
}

/// Value of `OFFCPU_START`, per thread: when and where it left the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuStart {
    pub ts_ns: u64,
    pub key: ProfileKey,
    /// The thread blocked (it was not preempted while runnable).
    pub voluntary: u32,
    pub _pad: u32,
}

/// Value of `OFFCPU_PENDING`, per thread of a DWARF-mode process: a long block whose user
/// stack is copied when the thread next leaves a syscall (where its user registers and stack
/// are exactly those of the blocking call).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuPending {
    pub ns: u64,
    pub key: ProfileKey,
}

/// Bytes of user stack copied per sample for DWARF unwinding (from the user stack pointer up).
pub const STACK_COPY_BYTES: usize = 16 * 1024;

/// What a [`StackSampleEvent`] measures.
pub const SAMPLE_CPU: u32 = 0;
pub const SAMPLE_OFFCPU: u32 = 1;

/// A sample of a DWARF-mode process: user registers and the top of the user stack, streamed
/// through `PROFILE_SAMPLES` and unwound in userspace.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackSampleEvent {
    pub tgid: u32,
    pub service: u32,
    pub kernel_stack: i32,
    /// [`SAMPLE_CPU`] or [`SAMPLE_OFFCPU`].
    pub kind: u32,
    /// Blocked time (off-CPU samples); 0 for on-CPU samples.
    pub value_ns: u64,
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Bytes of `stack` that hold a copy (0 when the copy failed).
    pub len: u32,
    /// Id in `PY_STACKS` of the sample's Python frames (0: none).
    pub python_stack: u32,
    pub stack: [u8; STACK_COPY_BYTES],
}

/// Load-time settings of the profiler (a global the loader rewrites).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSettings {
    /// Blocks shorter than this are not counted as off-CPU time.
    pub offcpu_min_ns: u64,
    /// `sched:sched_switch` → `prev_pid`.
    pub switch_prev_pid: u32,
    /// `sched:sched_switch` → `prev_state`.
    pub switch_prev_state: u32,
    /// `sched:sched_switch` → `next_pid`.
    pub switch_next_pid: u32,
    /// Byte offset of `pid` in `struct task_struct` (from BTF), for the raw `sched_switch`
    /// tracepoint; `u32::MAX` when unknown (the classic tracepoint is used instead).
    pub task_pid: u32,
}

impl ProfileSettings {
    /// Offsets on Linux 6.x, used only when tracefs cannot be read.
    pub const FALLBACK: Self = Self {
        offcpu_min_ns: 1_000_000,
        switch_prev_pid: 24,
        switch_prev_state: 32,
        switch_next_pid: 56,
        task_pid: u32::MAX,
    };
}

/// Text ranges kept per process in `PROFILE_LEAF`.
pub const LEAF_RANGES: usize = 4;
/// Words read at the user stack pointer for [`ProfileKey::leaf_ret`]: a leaf that pushed up to
/// three registers has its return address in one of them.
pub const LEAF_SLOTS: usize = 4;
/// Where the slot of the word goes in [`ProfileKey::leaf_ret`] (user addresses are below 2^47).
pub const LEAF_SLOT_SHIFT: u32 = 60;

/// [`ProfileKey::leaf_ret`] of `word` read at slot `slot` (`sp + 8 * slot`).
#[inline(always)]
pub const fn leaf_ret_of(word: u64, slot: usize) -> u64 {
    word | ((slot as u64 & (LEAF_SLOTS as u64 - 1)) << LEAF_SLOT_SHIFT)
}

/// The word and its slot in a [`ProfileKey::leaf_ret`].
#[inline(always)]
pub const fn leaf_ret_word(leaf_ret: u64) -> (u64, usize) {
    let mask = (LEAF_SLOTS as u64 - 1) << LEAF_SLOT_SHIFT;
    (
        leaf_ret & !mask,
        ((leaf_ret & mask) >> LEAF_SLOT_SHIFT) as usize,
    )
}

/// Processes whose frameless leaves' callers are recovered.
pub const LEAF_PIDS: u32 = 4_096;

/// Value of `PROFILE_LEAF`, per frame-pointer-mode process: the executable address ranges
/// (`[start, end)`, unused ones `0, 0`) a return address read at the user stack pointer must
/// fall in to be recorded in [`ProfileKey::leaf_ret`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeafText {
    pub ranges: [[u64; 2]; LEAF_RANGES],
}

/// Capacity of `PROFILE_COUNTS` and `OFFCPU_TIME`.
pub const PROFILE_ENTRIES: u32 = 16_384;
/// Capacity of `PROFILE_STACKS` (user and kernel stacks).
pub const PROFILE_STACK_ENTRIES: u32 = 16_384;
/// Threads off the CPU at once that can be followed.
pub const OFFCPU_THREADS: u32 = 16_384;
/// Processes whose user stacks are unwound from copies.
pub const DWARF_PIDS: u32 = 4_096;
/// Smallest size of the sample ring buffer (about 60 samples); the agent sizes it per CPU at
/// load. Ring buffer pages are mapped into the agent (twice), so they show in its RSS.
pub const SAMPLE_RINGBUF_BYTES: u32 = 1024 * 1024;

#[cfg(feature = "user")]
crate::impl_pod!(
    ProfileKey,
    OffCpuValue,
    OffCpuStart,
    OffCpuPending,
    ProfileSettings,
    LeafText
);
