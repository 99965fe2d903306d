//! Types and pure functions shared by the kernel programs (`ws1-probe-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]`, `Copy`, and free of implicit padding so that the kernel and
//! userspace agree byte for byte. Functions are pure integer arithmetic that the BPF backend can
//! compile (no `leading_zeros`, no floats, no panics).
#![no_std]

pub mod alloc;
pub mod block;
pub mod check;
pub mod hist;
pub mod memory;
pub mod net;
pub mod profile;
pub mod python;
pub mod sched;
pub mod syscalls;
pub mod targets;

/// Implements `aya::Pod` for shared types on the userspace side.
#[cfg(feature = "user")]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: the type is `#[repr(C)]`, `Copy`, has no padding and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
#[cfg(feature = "user")]
pub(crate) use impl_pod;
