//! The Python frame walker: on a sample of a process the agent marked as CPython (in
//! `PY_PROCS`, with the address of its `_PyRuntime` and its version's offsets), finds the
//! sampled thread's `PyThreadState` and records its chain of frames' code objects in
//! `PY_STACKS`, keyed by a hash of the chain, so samples are still counted in the kernel (the
//! id goes into the profile key). See `ws1_probe_common::python`.
//!
//! Cost per sample: 1 read to check the thread's cached `PyThreadState` (the first sample of a
//! thread walks the list instead: 2 + 2·(threads before it) reads), 2 to reach its innermost
//! frame, 1 per frame; bounded by `PY_MAX_THREADS` and `PY_MAX_FRAMES`.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_probe_read_user,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use ws1_probe_common::python::{
    PY_CHAIN_TRUNCATED, PY_FRAME_BYTES, PY_FRAME_ENTRY, PY_FRAME_FLAGS, PY_FRAME_SHIM,
    PY_HASH_START, PY_MAX_FRAMES, PY_MAX_THREADS, PY_OWNER_CSTACK, PY_PROCS as PY_PROC_ENTRIES,
    PY_STACK_ENTRIES, PY_THREAD_ENTRIES, PyOffsets, PyProc, PyStack, py_stack_hash_step,
};

/// Processes (tgid) running CPython → where their interpreter state is. Written by the agent.
#[map]
static PY_PROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(PY_PROC_ENTRIES, 0);

/// Python stack id → its frames.
#[map]
static PY_STACKS: HashMap<u32, PyStack> = HashMap::with_max_entries(PY_STACK_ENTRIES, 0);

/// Thread id → its `PyThreadState`, found by a walk of the thread list and checked again
/// (`native_thread_id`) on each use, so a thread's later samples skip the walk.
#[map]
static PY_THREADS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(PY_THREAD_ENTRIES, 0);

/// Per-CPU room to build a stack in (too large for the BPF stack).
#[map]
static PY_SCRATCH: PerCpuArray<PyStack> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn read<T>(addr: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address; a bad one gives an error.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Bytes of a `_PyInterpreterFrame` read (`sizeof` in 3.11 and 3.12; the fields the walk
/// reads all lie within, which the agent's offset tables are tested for).
const FRAME_BYTES: usize = PY_FRAME_BYTES as usize;
/// The buffer they are read into: offsets are masked to it, which the verifier can follow
/// (the bytes past `FRAME_BYTES` stay zero).
const HEAD_BYTES: usize = 128;

/// Reads the first `FRAME_BYTES` of the frame at `frame` into a zeroed buffer.
#[inline(always)]
fn read_frame(frame: u64, head: &mut [u8; HEAD_BYTES]) -> bool {
    // SAFETY: `head` has room for FRAME_BYTES bytes; the helper checks the user address.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            head.as_mut_ptr().cast(),
            FRAME_BYTES as u32,
            frame as *const core::ffi::c_void,
        ) == 0
    }
}

/// The u64 at `off` of a frame's bytes.
#[inline(always)]
fn u64_at(head: &[u8; HEAD_BYTES], off: u32) -> u64 {
    // Offsets past the frame's bytes read zeros (or other fields): the tables keep them within.
    let off = (off as usize) & 63;
    // SAFETY: `off + 8 <= 71 < HEAD_BYTES`, within `head`; unaligned read of plain bytes.
    unsafe { core::ptr::read_unaligned(head.as_ptr().add(off).cast::<u64>()) }
}

/// The byte at `off` of a frame's bytes; 0 past them (the buffer's tail stays zero), e.g. for
/// an absent field (`u32::MAX` masks to the last byte).
#[inline(always)]
fn u8_at(head: &[u8; HEAD_BYTES], off: u32) -> u8 {
    // SAFETY: masked to `head`'s length.
    unsafe { *head.as_ptr().add((off as usize) & (HEAD_BYTES - 1)) }
}

/// Id in `PY_STACKS` of the Python stack of thread `tid` of process `tgid`, or 0 when the
/// process is not a Python one or the thread runs no Python code.
#[inline(always)]
pub fn python_stack(tgid: u32, tid: u32) -> u32 {
    // SAFETY: the value is copied out at once.
    let Some(p) = (unsafe { PY_PROCS.get(&tgid) }).copied() else {
        return 0;
    };
    walk(&p, tid).unwrap_or(0)
}

/// The thread state whose `native_thread_id` is `tid`, searched in the first interpreter.
#[inline(always)]
fn thread_state(p: &PyProc, tid: u32) -> Option<u64> {
    let o: &PyOffsets = &p.offsets;
    // SAFETY: the value is copied out at once.
    if let Some(ts) = unsafe { PY_THREADS.get(&tid) }.copied()
        && read::<u64>(ts + u64::from(o.tstate_native_thread_id)) == Some(u64::from(tid))
    {
        return Some(ts);
    }
    let interp: u64 = read(p.runtime + u64::from(o.runtime_interpreters_head))?;
    if interp == 0 {
        return None;
    }
    let mut ts: u64 = read(interp + u64::from(o.interp_threads_head))?;
    for _ in 0..PY_MAX_THREADS {
        if ts == 0 {
            return None;
        }
        let native: u64 = read(ts + u64::from(o.tstate_native_thread_id))?;
        if native == u64::from(tid) {
            let _ = PY_THREADS.insert(&tid, &ts, 0);
            return Some(ts);
        }
        ts = read(ts + u64::from(o.tstate_next))?;
    }
    None
}

#[inline(always)]
fn walk(p: &PyProc, tid: u32) -> Option<u32> {
    let o: &PyOffsets = &p.offsets;
    let ts = thread_state(p, tid)?;
    let cframe: u64 = read(ts + u64::from(o.tstate_cframe))?;
    if cframe == 0 {
        return None;
    }
    let mut frame: u64 = read(cframe + u64::from(o.cframe_current_frame))?;
    if frame == 0 {
        return None;
    }
    let stack_ptr = PY_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; programs on one CPU do not interleave.
    let stack = unsafe { &mut *stack_ptr };
    let mut hash = PY_HASH_START;
    let mut n: usize = 0;
    for i in 0..PY_MAX_FRAMES {
        if frame == 0 {
            break;
        }
        // One read per frame: the fields the walk needs all lie in its first bytes.
        let mut head = [0u8; HEAD_BYTES];
        if !read_frame(frame, &mut head) {
            break;
        }
        let mut word = u64_at(&head, o.frame_code) & !PY_FRAME_FLAGS;
        if u8_at(&head, o.frame_owner) == PY_OWNER_CSTACK {
            word |= PY_FRAME_SHIM;
        }
        if u8_at(&head, o.frame_is_entry) != 0 {
            word |= PY_FRAME_ENTRY;
        }
        if let Some(slot) = stack.frames.get_mut(i) {
            *slot = word;
        }
        hash = py_stack_hash_step(hash, word);
        n = i + 1;
        frame = u64_at(&head, o.frame_previous);
    }
    if n == 0 {
        return None;
    }
    // Cut at the frame limit, or a `previous` that could not be read.
    if frame != 0 {
        if let Some(slot) = stack.frames.get_mut(n) {
            *slot = PY_CHAIN_TRUNCATED;
        }
        hash = py_stack_hash_step(hash, PY_CHAIN_TRUNCATED);
        n += 1;
    }
    stack.len = n as u32;
    let id = if hash == 0 { 1 } else { hash };
    // SAFETY: a read-only lookup; the value is not used.
    if unsafe { PY_STACKS.get(&id) }.is_none()
        && PY_STACKS
            .insert(&id, stack, u64::from(BPF_NOEXIST))
            .is_err()
    {
        // Full (or inserted by another CPU at the same moment): an id with no entry would
        // lose the frames, so the sample goes without.
        // SAFETY: as above.
        if unsafe { PY_STACKS.get(&id) }.is_none() {
            return None;
        }
    }
    Some(id)
}
