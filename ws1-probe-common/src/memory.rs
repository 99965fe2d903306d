//! Shared types of the always-on memory probe: sampled page faults by stack.

/// Key of `PAGE_FAULTS`: where targeted processes fault in memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultKey {
    pub service: u32,
    /// Id in `FAULT_STACKS`, or negative when the stack could not be taken.
    pub stack_id: i32,
}

/// One sample per this many page faults (per CPU).
pub const FAULT_SAMPLE_PERIOD: u64 = 64;
/// Capacity of `PAGE_FAULTS`.
pub const FAULT_ENTRIES: u32 = 4_096;
/// Capacity of `FAULT_STACKS`.
pub const FAULT_STACK_ENTRIES: u32 = 4_096;

#[cfg(feature = "user")]
crate::impl_pod!(FaultKey);
