//! The always-on memory signal's kernel part: page faults of targeted processes, sampled by a
//! perf software event (one sample per `FAULT_SAMPLE_PERIOD` faults per CPU) and counted by
//! (service, user stack). This kernel has no `exceptions:page_fault_user` tracepoint; the perf
//! event works on every kernel with perf events.

use aya_ebpf::{
    bindings::{BPF_F_USER_STACK, BPF_NOEXIST},
    helpers::bpf_get_current_pid_tgid,
    macros::map,
    maps::{HashMap, StackTrace},
    programs::{PerfEventContext, tracing::StackIdContext},
};
use ws1_probe_common::memory::{FAULT_ENTRIES, FAULT_STACK_ENTRIES, FaultKey};

use crate::{hist::atomic_add, targets::service_of};

/// (service, stack) → sampled page faults.
#[map]
static PAGE_FAULTS: HashMap<FaultKey, u64> = HashMap::with_max_entries(FAULT_ENTRIES, 0);

/// User stacks of page faults.
#[map]
static FAULT_STACKS: StackTrace = StackTrace::with_max_entries(FAULT_STACK_ENTRIES, 0);

pub fn try_page_fault(ctx: &PerfEventContext) -> Result<u32, i32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let Some(service) = service_of(tgid) else {
        return Ok(0);
    };
    // Kernel threads and faults with no user stack keep -1: still counted per service.
    let stack_id = ctx
        .get_stackid(&FAULT_STACKS, u64::from(BPF_F_USER_STACK))
        .map_or(-1, |id| id as i32);
    let key = FaultKey { service, stack_id };
    let count = match PAGE_FAULTS.get_ptr_mut(&key) {
        Some(count) => count,
        None => {
            let _ = PAGE_FAULTS.insert(&key, &0, u64::from(BPF_NOEXIST));
            let Some(count) = PAGE_FAULTS.get_ptr_mut(&key) else {
                return Ok(0);
            };
            count
        }
    };
    // SAFETY: a map value shared by all CPUs, only updated with atomic adds.
    atomic_add(unsafe { &mut *count }, 1);
    Ok(0)
}
