//! Staging: short records batched per CPU and sent together (half the
//! cost per record on a busy host), and `flush_stage`, the program the
//! agent runs on every CPU to send what waits.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;
use core::ptr::addr_of_mut;

use tcptrace_common::{
    KernelConfig, StateBatch, StateRecordV4, FLUSH_BUSY, RECORD_STATE_BATCH, STAGED_RECORDS,
};

use crate::config::config;
use crate::fields::Fields;
use crate::record::fill_state_v4;
use crate::ring::{count_lost_n, wakeup_flags, EVENTS};

/// This CPU's staged short records ([`CONFIG_STAGE`]), and whether one of
/// the two programs that touch them is at work on this CPU: the state
/// program can interrupt `flush_stage` (a softirq's transition), and
/// `flush_stage`, run by the agent through an interrupt, can interrupt the
/// state program. Each runs to its end before the one it interrupted goes
/// on, so a plain flag set before and cleared after is enough; whoever
/// finds it set keeps its hands off the batch.
#[repr(C)]
struct Stage {
    busy: u64,
    batch: StateBatch,
}

/// See [`Stage`].
#[map]
static STAGE: PerCpuArray<Stage> = PerCpuArray::with_max_entries(1, 0);

/// [`CONFIG_STAGE`]: adds a short record to this CPU's batch, and sends the
/// batch when it is full; false when the batch is busy (the caller sends
/// the record on its own). The clock is read after the flag is set, so
/// that a record the agent's flush did not find has a time after that
/// flush: the agent releases records in time order up to the moment it
/// flushed every CPU.
#[inline(always)]
pub(crate) fn stage<F: Fields>(cfg: &KernelConfig, f: &F, states: (i32, i32), skaddr: u64) -> bool {
    let Some(st) = STAGE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: `st` points into this CPU's map value; see [`Stage`].
    unsafe {
        let busy = addr_of_mut!((*st).busy);
        if core::ptr::read_volatile(busy) != 0 {
            return false;
        }
        core::ptr::write_volatile(busy, 1);
        let n = (*st).batch.count as usize;
        if n < STAGED_RECORDS {
            let now = bpf_ktime_get_ns();
            let rec = addr_of_mut!((*st).batch.records[n]);
            fill_state_v4(rec, cfg, f, states, skaddr, now);
            if n + 1 == STAGED_RECORDS {
                (*st).batch.count = STAGED_RECORDS as u32;
                send_batch(cfg, st);
            } else {
                (*st).batch.count = (n + 1) as u32;
            }
        }
        core::ptr::write_volatile(busy, 0);
        n < STAGED_RECORDS
    }
}

/// Sends the staged batch (its `count` records) and empties it.
///
/// # Safety
/// `st` must point into this CPU's [`STAGE`] value, with its flag set.
#[inline(always)]
unsafe fn send_batch(cfg: &KernelConfig, st: *mut Stage) {
    unsafe {
        let n = (*st).batch.count as usize;
        if n == 0 || n > STAGED_RECORDS {
            (*st).batch.count = 0;
            return;
        }
        (*st).batch.kind = RECORD_STATE_BATCH;
        // LLVM writes the sum as `n << 6 | 8`, whose bound the verifier
        // loses track of: a check it cannot fold away gives it back.
        let len = core::ptr::read_volatile(&(8 + n * core::mem::size_of::<StateRecordV4>()));
        if len > core::mem::size_of::<StateBatch>() {
            (*st).batch.count = 0;
            return;
        }
        let bytes = core::slice::from_raw_parts(addr_of_mut!((*st).batch).cast::<u8>(), len);
        if EVENTS.output::<[u8]>(bytes, wakeup_flags(cfg)).is_err() {
            count_lost_n(n as u64);
        }
        (*st).batch.count = 0;
    }
}

/// Sends this CPU's staged records ([`CONFIG_STAGE`]). Never attached: the
/// agent runs it on each CPU (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`) before it reads the ring, so that no record
/// waits in a batch longer than the agent's poll interval. Returns
/// [`FLUSH_BUSY`] when it interrupted the state program at work on the
/// batch (nothing sent; the agent runs it again), else 0.
///
/// Written without aya's `raw_tracepoint` macro, whose wrapper returns 0
/// whatever the program returns (the agent never saw `FLUSH_BUSY`, and
/// took a busy CPU's batch for flushed); the section name is all the
/// loader needs.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/tcptrace_flush_stage")]
pub fn flush_stage(_ctx: *mut core::ffi::c_void) -> u32 {
    let Some(st) = STAGE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: as in `stage`.
    unsafe {
        let busy = addr_of_mut!((*st).busy);
        if core::ptr::read_volatile(busy) != 0 {
            return FLUSH_BUSY;
        }
        core::ptr::write_volatile(busy, 1);
        send_batch(config(), st);
        core::ptr::write_volatile(busy, 0);
    }
    0
}
