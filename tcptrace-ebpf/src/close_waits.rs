//! The `CLOSE_WAITS` table: stays in CLOSE_WAIT the kernel keeps instead
//! of sending each (origin-map mode); the agent reads the ones that last.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, PerCpuArray};
use core::ptr::addr_of_mut;

use tcptrace_common::{
    linger_bucket, tcp_state, KernelConfig, StateRecord, CW_COUNT_SLOTS, CW_FULL, CW_KEPT,
    CW_LINGER, CW_LINGER_SUM_NS, CW_QUIET, CW_SENT, RECORD_STATE, SLOT_PROBES,
};

use crate::config::BPF_F_MMAPABLE;
use crate::fields::Fields;
use crate::helpers::{bump, cmpxchg};
use crate::origins::{slot_probe, take_slot};
use crate::record::{fill_state, Wanted};
use crate::ring::{publish, send};

/// Sockets in CLOSE_WAIT, each slot the [`StateRecord`] of its entry,
/// when the agent asked ([`CONFIG_CW_TABLE`]). `skaddr` is the slot's
/// owner (claimed and freed by compare-and-swap, as in [`ORIGINS`](crate::origins::ORIGINS));
/// `kind` is written last and cleared first, so that the agent, which maps
/// the array into its memory, reads only whole entries.
#[map]
static CLOSE_WAITS: Array<StateRecord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per CPU: see [`CW_KEPT`] and the slots after it.
#[map]
static CW_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CW_COUNT_SLOTS, 0);

#[inline(always)]
fn count_cw(slot: u32, n: u64) {
    bump(&CW_COUNTS, slot, n);
}

/// [`CONFIG_CW_TABLE`]: keeps a transition into or out of CLOSE_WAIT in
/// the table; true when that is all it needs (nothing to send).
#[inline(always)]
pub(crate) fn close_wait_in_table<F: Fields>(cfg: &KernelConfig, f: &F, t: Wanted) -> bool {
    let (oldstate, newstate, _) = t;
    let Some(sk) = f.skaddr() else {
        return false;
    };
    if newstate == tcp_state::CLOSE_WAIT {
        cw_enter(cfg, f, t, sk)
    } else if oldstate == tcp_state::CLOSE_WAIT {
        cw_leave(cfg, sk)
    } else {
        false
    }
}

/// Writes the entry of `sk` into CLOSE_WAIT in a slot of its own; false
/// when every slot it may take is in use (counted; the entry is sent).
#[inline(always)]
fn cw_enter<F: Fields>(cfg: &KernelConfig, f: &F, t: Wanted, sk: u64) -> bool {
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&CLOSE_WAITS, sk, cfg.cw_slot_bits, i) else {
            return false;
        };
        // SAFETY: `slot` points into the array map's value, 8-aligned.
        if let Some(claimed) = unsafe { take_slot(addr_of_mut!((*slot).skaddr), sk) } {
            let kind = unsafe { addr_of_mut!((*slot).kind) };
            unsafe { core::ptr::write_volatile(kind, 0) };
            let now = unsafe { bpf_ktime_get_ns() };
            fill_state(slot, 0, cfg, f, t, sk, now, -1, -1);
            // Last: the agent takes a slot whose kind is set as whole.
            unsafe { publish(slot) };
            if claimed {
                // (A slot still holding this address lost its exit: it
                // was counted when taken.)
                count_cw(CW_KEPT, 1);
            }
            return true;
        }
    }
    count_cw(CW_FULL, 1);
    false
}

/// Frees the slot of `sk` as it leaves CLOSE_WAIT. A quiet stay is only
/// counted (true: nothing to send); a longer one sends the entry the slot
/// kept, and the exit follows as usual (false). A socket not in the table
/// (entered before the agent, or when it was full) is sent as usual.
#[inline(always)]
fn cw_leave(cfg: &KernelConfig, sk: u64) -> bool {
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&CLOSE_WAITS, sk, cfg.cw_slot_bits, i) else {
            return false;
        };
        let owner = unsafe { addr_of_mut!((*slot).skaddr) };
        let kind = unsafe { addr_of_mut!((*slot).kind) };
        if unsafe { core::ptr::read_volatile(owner) } != sk
            || unsafe { core::ptr::read_volatile(kind) } != RECORD_STATE
        {
            continue;
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let linger = now.wrapping_sub(unsafe { (*slot).ts_ns });
        let quiet = linger < u64::from(cfg.cw_quiet_ms) * 1_000_000;
        if quiet {
            count_cw(CW_QUIET, 1);
            count_cw(CW_LINGER + linger_bucket(linger), 1);
            count_cw(CW_LINGER_SUM_NS, linger);
        } else {
            send_kept(cfg, slot);
            count_cw(CW_SENT, 1);
        }
        unsafe {
            core::ptr::write_volatile(kind, 0);
            cmpxchg(owner, sk, 0);
        }
        return quiet;
    }
    false
}

/// Sends the entry kept in `slot`.
#[inline(always)]
fn send_kept(cfg: &KernelConfig, slot: *mut StateRecord) {
    send(cfg, |rec: *mut StateRecord| unsafe { rec.write(*slot) });
}
