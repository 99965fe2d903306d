//! Shared types of the Python frame walker: per-process interpreter settings (where
//! `_PyRuntime` is and the CPython structure offsets of its version) and the Python stacks the
//! kernel collects from a thread's frame chain.
//!
//! The kernel walks `_PyRuntime.interpreters.head → threads.head → next…` to the thread state
//! whose `native_thread_id` is the sampled thread, then `cframe → current_frame → previous…`,
//! recording each frame's code object address. The agent names the code objects from the
//! process's memory and puts the Python frames in place of the interpreter's
//! `_PyEval_EvalFrameDefault` frames.

/// Frames of one Python stack the kernel keeps (innermost first). Deeper chains are cut and
/// marked with [`PY_CHAIN_TRUNCATED`].
pub const PY_MAX_FRAMES: usize = 48;
/// Thread states of one interpreter searched for the sampled thread (newest first).
pub const PY_MAX_THREADS: u32 = 64;
/// Bytes of each `_PyInterpreterFrame` the kernel reads (its size in 3.11 and 3.12): the
/// `frame_*` offsets must lie within.
pub const PY_FRAME_BYTES: u32 = 72;
/// Python threads whose thread state is remembered (LRU).
pub const PY_THREAD_ENTRIES: u32 = 16_384;
/// Python processes followed at once.
pub const PY_PROCS: u32 = 4_096;
/// Distinct Python stacks kept.
pub const PY_STACK_ENTRIES: u32 = 8_192;

/// Low bits of a frame word (code objects are 8-byte aligned, so these bits are free).
/// The frame is the first one its `_PyEval_EvalFrameDefault` call ran (3.11 `is_entry`).
pub const PY_FRAME_ENTRY: u64 = 1;
/// The frame is the C-stack shim `_PyEval_EvalFrameDefault` pushes on entry (3.12 owner
/// `FRAME_OWNED_BY_CSTACK`); the frames before it (innermost first) ran in that call.
pub const PY_FRAME_SHIM: u64 = 2;
/// Mask of the flag bits of a frame word.
pub const PY_FRAME_FLAGS: u64 = 7;
/// Last word of a stack whose walk stopped at [`PY_MAX_FRAMES`] before the outermost frame.
pub const PY_CHAIN_TRUNCATED: u64 = u64::MAX;

/// `owner` value of a C-stack shim frame (CPython 3.12 `FRAME_OWNED_BY_CSTACK`).
pub const PY_OWNER_CSTACK: u8 = 3;

/// Byte offsets in CPython's structures that the walker reads; [`PyOffsets::ABSENT`] where a
/// version has no such field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// `_PyRuntimeState.interpreters.head`
    pub runtime_interpreters_head: u32,
    /// `PyInterpreterState.threads.head`
    pub interp_threads_head: u32,
    /// `PyThreadState.next`
    pub tstate_next: u32,
    /// `PyThreadState.native_thread_id`
    pub tstate_native_thread_id: u32,
    /// `PyThreadState.cframe`
    pub tstate_cframe: u32,
    /// `_PyCFrame.current_frame`
    pub cframe_current_frame: u32,
    /// `_PyInterpreterFrame.f_code`
    pub frame_code: u32,
    /// `_PyInterpreterFrame.previous`
    pub frame_previous: u32,
    /// `_PyInterpreterFrame.owner`
    pub frame_owner: u32,
    /// `_PyInterpreterFrame.is_entry` (3.11; absent in 3.12)
    pub frame_is_entry: u32,
}

impl PyOffsets {
    /// Marks a field the version does not have.
    pub const ABSENT: u32 = u32::MAX;
}

/// Value of `PY_PROCS`, per process: where its interpreter state is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyProc {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub offsets: PyOffsets,
    /// `PY_VERSION_HEX` of the interpreter (for the agent's reports).
    pub version: u32,
    pub _pad: u32,
}

/// Value of `PY_STACKS`: one Python stack, innermost frame first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PyStack {
    /// Words of `frames` in use.
    pub len: u32,
    pub _pad: u32,
    /// Code object address | `PY_FRAME_*` flags, innermost first; [`PY_CHAIN_TRUNCATED`] last
    /// when the walk was cut.
    pub frames: [u64; PY_MAX_FRAMES + 1],
}

impl PyStack {
    pub const EMPTY: Self = Self {
        len: 0,
        _pad: 0,
        frames: [0; PY_MAX_FRAMES + 1],
    };
}

/// Id of a Python stack in `PY_STACKS`: FNV-1a of its words, never 0 (0 means no Python
/// stack). Two stacks with the same id share the first one's entry (a 32-bit collision among
/// the few thousand stacks of a window is rare, and costs one stack's attribution).
#[inline(always)]
pub fn py_stack_hash_step(hash: u32, word: u64) -> u32 {
    let folded = (word ^ (word >> 32)) as u32;
    (hash ^ folded).wrapping_mul(16_777_619)
}

/// FNV-1a offset basis, the start of [`py_stack_hash_step`].
pub const PY_HASH_START: u32 = 2_166_136_261;

#[cfg(feature = "user")]
crate::impl_pod!(PyOffsets, PyProc, PyStack);
