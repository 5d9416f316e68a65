//! Records to user space: the `EVENTS` ring buffer, the `LOST` counters
//! for records it had no room for, and when a write wakes the agent.

use aya_ebpf::macros::map;
use aya_ebpf::maps::{PerCpuArray, RingBuf};
use core::ptr::addr_of_mut;

use tcptrace_common::{KernelConfig, StateRecord, RECORD_STATE};

use crate::helpers::{bump, cmpxchg};

/// Records to user space. The agent may resize it (`--ring-buffer-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records dropped because [`EVENTS`] was full, per CPU (index 0).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Reserves a `T` in the ring buffer, has `fill` write it in place (the
/// BPF stack is 512 bytes), and submits it; a full ring counts a lost
/// record. `fill` gets a pointer to the reservation and must write every
/// field.
#[inline(always)]
pub(crate) fn send<T: 'static>(cfg: &KernelConfig, fill: impl FnOnce(*mut T)) -> Option<()> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count_lost();
        return None;
    };
    fill(entry.as_mut_ptr());
    entry.submit(wakeup_flags(cfg));
    Some(())
}

/// Sets the `kind` of a [`CLOSE_WAITS`](crate::close_waits::CLOSE_WAITS) slot whose other fields are
/// written, with a compare-and-swap of the 64-bit word it begins (kind,
/// then ctx_tgid, little-endian): an atomic is a full barrier, so the
/// agent never sees the kind before the fields.
///
/// # Safety
/// `slot` must point into the map's value.
#[inline(always)]
pub(crate) unsafe fn publish(slot: *mut StateRecord) {
    let word = unsafe { addr_of_mut!((*slot).kind) }.cast::<u64>();
    let held = unsafe { core::ptr::read_volatile(word) };
    unsafe { cmpxchg(word, held, (held & !0xffff_ffff) | u64::from(RECORD_STATE)) };
}

/// `BPF_RB_NO_WAKEUP`, `BPF_RB_FORCE_WAKEUP`, `BPF_RB_AVAIL_DATA`.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Per CPU: records submitted, and the ring's unread data, in multiples
/// of [`KernelConfig::wakeup_bytes`], when this CPU last looked.
#[map]
static WAKE: PerCpuArray<WakeState> = PerCpuArray::with_max_entries(1, 0);

/// See [`WAKE`].
#[repr(C)]
#[derive(Clone, Copy)]
struct WakeState {
    submitted: u32,
    level: u32,
}

/// A CPU looks at the ring's fill level once in this many records.
const WAKE_CHECK_EVERY: u32 = 16;

/// Flags for a submit: wake the agent when the unread data has passed
/// another multiple of [`KernelConfig::wakeup_bytes`] since this CPU last
/// looked; the agent polls on a timer otherwise. Waking on every record
/// past the mark, until the agent catches up, cost a self-interrupt each
/// (an MSR write, a trap to the hypervisor in a VM): a tenth of the churn.
/// Looking costs a read of the consumer's position, a cache line the agent
/// writes from another CPU: done once in [`WAKE_CHECK_EVERY`] records, a
/// crossing is seen at most that many records (of this CPU) late, a
/// small share of a mark.
#[inline(always)]
pub(crate) fn wakeup_flags(cfg: &KernelConfig) -> u64 {
    if cfg.wakeup_bytes == 0 {
        return 0;
    }
    let Some(w) = WAKE.get_ptr_mut(0) else {
        return 0;
    };
    // Per-CPU slot: no other writer can race these updates.
    unsafe {
        let submitted = (*w).submitted.wrapping_add(1);
        (*w).submitted = submitted;
        if submitted % WAKE_CHECK_EVERY != 0 {
            return BPF_RB_NO_WAKEUP;
        }
        let level = (EVENTS.query(BPF_RB_AVAIL_DATA) / u64::from(cfg.wakeup_bytes)) as u32;
        let crossed = level > (*w).level;
        (*w).level = level;
        if crossed {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

#[inline(always)]
fn count_lost() {
    count_lost_n(1);
}

#[inline(always)]
pub(crate) fn count_lost_n(n: u64) {
    bump(&LOST, 0, n);
}
