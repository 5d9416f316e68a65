//! Small pieces every hook uses: reads of the tracepoint record and of
//! kernel memory, the current task's ids and name, per-CPU counters and the
//! atomics the BPF target lacks in Rust.

use aya_ebpf::helpers::{bpf_probe_read_kernel, generated};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TracePointContext;
use tcptrace_common::COMM_LEN;

/// Adds `n` to slot `slot` of the per-CPU counters `counters` (a slot
/// out of range counts nothing).
#[inline(always)]
pub(crate) fn bump(counters: &PerCpuArray<u64>, slot: u32, n: u64) {
    if let Some(counter) = counters.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *counter += n };
    }
}

/// Atomically adds `delta` to `*ptr` (`u64::MAX` subtracts one):
/// BPF_ATOMIC | BPF_ADD, by hand for the reason given at [`cmpxchg`].
///
/// # Safety
/// `ptr` must point into a map value, 8-aligned.
#[inline(always)]
pub(crate) unsafe fn atomic_add(ptr: *mut u64, delta: u64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {delta}",
            ptr = in(reg) ptr,
            delta = in(reg) delta,
        );
    }
}

/// Atomically replaces `*ptr` with `new` if it holds `old`; returns what it
/// held. BPF_ATOMIC | BPF_CMPXCHG (Linux >= 5.12), written by hand: Rust's
/// BPF target offers no compare-and-swap, and lowers its atomics as if
/// there were one CPU.
///
/// # Safety
/// `ptr` must point into a map value, 8-aligned.
#[inline(always)]
pub(crate) unsafe fn cmpxchg(ptr: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("r0") r0,
        );
    }
    r0
}

#[inline(always)]
pub(crate) fn read_ctx<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// The current task's (process id, thread id), from one helper call
/// (`EbpfContext::tgid()` and `pid()` make one each).
#[inline(always)]
pub(crate) fn current_ids() -> (u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
pub(crate) fn read_kernel<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

/// An IPv6 address from its two 8-byte halves as loaded (two loads cost
/// less than a 16-byte copy).
#[inline(always)]
pub(crate) fn addr16(first: u64, second: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_ne_bytes());
    out[8..].copy_from_slice(&second.to_ne_bytes());
    out
}

/// Writes the current task's `comm` into `dst`, NUL padded (zeros when
/// the helper fails). The raw helper writes it in place: aya's wrapper
/// returns a `Result<[u8; 16], _>`, and moving that into a record took
/// some 100 instructions of byte copies and two `memset` calls per record
/// (`bpftool prog dump xlated`).
///
/// # Safety
/// `dst` must point to 16 writable bytes (a ring reservation or map value).
#[inline(always)]
pub(crate) unsafe fn write_current_comm(dst: *mut [u8; COMM_LEN]) {
    // The kernel pads with NULs, and on failure zeroes the whole buffer.
    unsafe { generated::bpf_get_current_comm(dst.cast(), COMM_LEN as u32) };
}
