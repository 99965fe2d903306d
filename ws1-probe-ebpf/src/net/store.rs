//! Where the network probe keeps an observed socket's state: `NET_SOCKS`, a hash keyed by the
//! socket's address, for the classic and raw tracepoints, or `NET_SK`, the socket's own local
//! storage, for the `tp_btf` programs. The logic in `net` is the same for both (see `Store`).

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE},
    btf_maps::SkStorage,
    helpers::generated::{bpf_sk_storage_delete, bpf_sk_storage_get},
    macros::{btf_map, map},
    maps::HashMap,
};
use ws1_probe_common::{
    net::{SOCK_ENTRIES, SockState},
    targets::DropReason,
};

use crate::targets::count_drop;

/// `struct sock` address → owner and request state of an observed TCP socket. Not
/// preallocated: entries are ~100 bytes, one per observed connection, and on the `tp_btf` path
/// the map stays empty, so it holds memory only for what the fallback observes.
#[map]
static NET_SOCKS: HashMap<u64, SockState> =
    HashMap::with_max_entries(SOCK_ENTRIES, BPF_F_NO_PREALLOC);

/// Owner and request state of an observed TCP socket, in the socket's own local storage: the
/// `tp_btf` programs' counterpart of `NET_SOCKS` (see `Store`). The kernel frees an entry with
/// its socket, and the CLOSE transition deletes it before that.
#[btf_map]
static NET_SK: SkStorage<SockState> = SkStorage::new();

/// Where an observed socket's state lives.
///
/// Classic and raw tracepoints see the socket only as a number, so their programs keep the
/// state in `NET_SOCKS`, keyed by that address. `tp_btf` programs get a pointer the verifier
/// knows is a socket, so theirs keep it in the socket's own local storage (`NET_SK`): a lookup
/// there is two loads, where the hash costs a jhash and a bucket walk, and the kernel frees it
/// with the socket. The agent attaches one family or the other, never both, so a socket's state
/// is in exactly one place.
pub(super) trait Store {
    /// The socket's state, when the socket is observed.
    fn get(&self) -> Option<*mut SockState>;
    /// Starts observing the socket with `state`.
    fn create(&self, state: &SockState);
    /// Stops observing the socket.
    fn remove(&self);
    /// The socket's address, for `bpf_probe_read_kernel`.
    fn addr(&self) -> u64;
}

/// A socket known by its address, state in `NET_SOCKS`.
pub(super) struct Hashed(pub(super) u64);

impl Store for Hashed {
    #[inline(always)]
    fn get(&self) -> Option<*mut SockState> {
        NET_SOCKS.get_ptr_mut(self.0)
    }

    #[inline(always)]
    fn create(&self, state: &SockState) {
        if NET_SOCKS.insert(self.0, state, 0).is_err() {
            count_drop(DropReason::NetSocksFull);
        }
    }

    #[inline(always)]
    fn remove(&self) {
        let _ = NET_SOCKS.remove(self.0);
    }

    #[inline(always)]
    fn addr(&self) -> u64 {
        self.0
    }
}

/// A `struct sock *` argument of a `tp_btf` program, state in its local storage (`NET_SK`).
pub(super) struct Local(pub(super) *mut c_void);

#[inline(always)]
fn sk_map() -> *mut c_void {
    core::ptr::addr_of!(NET_SK).cast_mut().cast()
}

impl Store for Local {
    #[inline(always)]
    fn get(&self) -> Option<*mut SockState> {
        // SAFETY: the pointer is the hook's argument, which the verifier typed as a socket; the
        // helper returns NULL for NULL, for sockets that are not full sockets, and for sockets
        // without an entry.
        let p = unsafe { bpf_sk_storage_get(sk_map(), self.0, null_mut(), 0) };
        (!p.is_null()).then_some(p.cast())
    }

    #[inline(always)]
    fn create(&self, state: &SockState) {
        let mut init = *state;
        let flags = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
        // SAFETY: as in `get`; `init` is a SockState on the stack, the map's value type.
        let p: *mut SockState = unsafe {
            bpf_sk_storage_get(
                sk_map(),
                self.0,
                core::ptr::addr_of_mut!(init).cast(),
                flags,
            )
        }
        .cast();
        if p.is_null() {
            count_drop(DropReason::NetSocksFull);
            return;
        }
        // An entry left from an earlier connection of this socket (a connect() after CLOSE
        // reuses it) is returned as it was: start it afresh.
        // SAFETY: pointer to this socket's storage, returned by the helper.
        unsafe { *p = *state };
    }

    #[inline(always)]
    fn remove(&self) {
        // SAFETY: as in `get`.
        let _ = unsafe { bpf_sk_storage_delete(sk_map(), self.0) };
    }

    #[inline(always)]
    fn addr(&self) -> u64 {
        self.0 as u64
    }
}

/// Whether the socket has any local storage at all: one plain load of `sk->sk_bpf_storage` (at
/// its BTF offset), so that the sockets of every process nobody observes return here without
/// a helper call. `off` is `NetOffsets::sock_bpf_storage`; `true` when it is unknown.
#[inline(always)]
pub(super) fn may_have_storage(sk: *mut c_void, off: u32) -> bool {
    if off == u32::MAX {
        return true;
    }
    // SAFETY: `sk` is the `tp_btf` argument, a socket; the offset comes from the kernel's BTF
    // and the verifier checks the load against `struct sock` (a faulting load reads 0). The
    // pointer is only compared with NULL, never followed: a racing first insert by another CPU
    // at worst skips one call of a socket being set up there.
    let storage = unsafe { *sk.cast::<u8>().add(off as usize).cast::<u64>() };
    storage != 0
}
