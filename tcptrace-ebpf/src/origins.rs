//! Origins: which call (`connect()` or `accept()`) opened each live socket,
//! by whom and with which stack, in the `ORIGINS` table the agent reads for
//! a leak (origin-map mode); forgotten when the socket closes.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::tracing::StackIdContext;
use core::ptr::addr_of_mut;

use tcptrace_common::{
    probe_slot, tcp_state, OriginSlot, ORIGINS_FULL, ORIGINS_INSERTED, ORIGINS_REMOVED,
    ORIGIN_CONNECT, ORIGIN_COUNT_SLOTS, SLOT_PROBES, STACKS_OVER_BUDGET, STACK_OF_CONNECT,
};

use crate::config::{config, BPF_F_MMAPABLE};
use crate::fields::Fields;
use crate::helpers::{atomic_add, bump, cmpxchg, current_ids};
use crate::record::Wanted;
use crate::stack_copy::copy_user_stack;
use crate::stacks::{budget_allows, user_stack};

/// Each live connection's origin, by socket address, when the agent asked
/// for it ([`CONFIG_ORIGIN_MAP`]): a slot is claimed at connect()/accept()
/// and freed when the socket reaches CLOSE (see [`OriginSlot`]). The agent
/// sizes it from its `--max-sockets`; when every slot a socket may take is
/// in use, that connection only goes without a known origin. Mappable: the
/// agent scans it in place to tell which connections still live (and
/// forgets the unwound stacks of those that closed).
#[map]
static ORIGINS: Array<OriginSlot> = Array::with_max_entries(1 << 20, BPF_F_MMAPABLE);

/// Per CPU: origins inserted into [`ORIGINS`], removed from it, and not
/// kept because it was full. The agent's gauge of live origins is the
/// difference of the first two; the third is loss it reports.
#[map]
static ORIGIN_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ORIGIN_COUNT_SLOTS, 0);

#[inline(always)]
pub(crate) fn count_origins(slot: u32) {
    bump(&ORIGIN_COUNTS, slot, 1);
}

/// The `i`th slot socket `sk` may take in `table` of `1 << bits` slots
/// ([`ORIGINS`], [`CLOSE_WAITS`](crate::close_waits::CLOSE_WAITS); see [`probe_slot`]).
#[inline(always)]
pub(crate) fn slot_probe<T>(table: &Array<T>, sk: u64, bits: u32, i: u32) -> Option<*mut T> {
    table.get_ptr_mut(probe_slot(sk, bits, i))
}

/// Keeps the current task's `syscall` (with `fd`, at `ts_ns`, its stack
/// `stack_id`) as the origin of `sk`, in the first slot [`take_slot`]
/// gives. Only a claimed slot is counted as inserted.
#[inline(always)]
pub(crate) fn keep(sk: u64, syscall: u32, fd: i32, ts_ns: u64, stack_id: i32) {
    let bits = origin_bits();
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&ORIGINS, sk, bits, i) else {
            return;
        };
        // SAFETY: `slot` points into the array map's value, 8-aligned.
        if let Some(claimed) = unsafe { take_slot(addr_of_mut!((*slot).sk), sk) } {
            unsafe {
                addr_of_mut!((*slot).ts_ns).write(ts_ns);
                addr_of_mut!((*slot).syscall).write(syscall);
                let (tgid, tid) = current_ids();
                addr_of_mut!((*slot).tgid).write(tgid);
                addr_of_mut!((*slot).tid).write(tid);
                addr_of_mut!((*slot).fd).write(fd);
                addr_of_mut!((*slot).stack_id).write(stack_id);
                addr_of_mut!((*slot)._pad0).write(0);
            }
            if claimed {
                count_origins(ORIGINS_INSERTED);
                live_origins_add(1);
            }
            return;
        }
    }
    count_origins(ORIGINS_FULL);
}

/// Whether the slot whose owner word is `owner` is `sk`'s to write: it
/// holds `sk` already (left by a freed socket at the same address whose
/// last transition went unseen), or a compare-and-swap claims it free now.
/// `Some(true)` when claimed.
///
/// # Safety
/// `owner` must point into a map value, 8-aligned.
#[inline(always)]
pub(crate) unsafe fn take_slot(owner: *mut u64, sk: u64) -> Option<bool> {
    let held = unsafe { core::ptr::read_volatile(owner) };
    let claimed = held == 0 && unsafe { cmpxchg(owner, 0, sk) } == 0;
    (claimed || held == sk).then_some(claimed)
}

/// Origins in [`ORIGINS`] now, over all CPUs (index 0), kept by atomic
/// adds as slots are claimed and freed (rare: only connections within the
/// stack budget keep one). While it is zero, as it is most of the time
/// when a churn's connections outrun the budget, a CLOSE skips the probe
/// loop: one read of a line no CPU is writing, for eight slot lookups.
#[map]
static ORIGINS_LIVE: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn live_origins_add(delta: u64) {
    if let Some(live) = ORIGINS_LIVE.get_ptr_mut(0) {
        // SAFETY: points into the array map's value, 8-aligned.
        unsafe { atomic_add(live, delta) };
    }
}

/// True unless [`ORIGINS_LIVE`] says no origin is kept (then no socket's
/// CLOSE has a slot to free).
#[inline(always)]
fn origins_live() -> bool {
    ORIGINS_LIVE
        .get_ptr(0)
        .is_none_or(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

/// Frees every slot of [`ORIGINS`] that holds `sk` (one, unless an
/// unseen CLOSE left a stale copy). A socket's origin is kept, and counted
/// in [`ORIGINS_LIVE`], before its CLOSE can run (both follow the socket's
/// own state changes), so a zero count means it has none: callers look
/// at [`origins_live`] first.
#[inline(always)]
fn forget(sk: u64) {
    let bits = origin_bits();
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&ORIGINS, sk, bits, i) else {
            return;
        };
        // SAFETY: as in `keep`.
        let owner = unsafe { addr_of_mut!((*slot).sk) };
        if unsafe { core::ptr::read_volatile(owner) } == sk
            && unsafe { cmpxchg(owner, sk, 0) } == sk
        {
            count_origins(ORIGINS_REMOVED);
            live_origins_add(u64::MAX);
        }
    }
}

/// `KernelConfig::origin_slot_bits`.
#[inline(always)]
fn origin_bits() -> u32 {
    config().origin_slot_bits
}

/// [`CONFIG_ORIGIN_MAP`]: a connection's origin goes into [`ORIGINS`] when
/// connect() makes it (CLOSE -> SYN_SENT runs inside the call) and its
/// process is within its stack budget, and leaves it when the socket
/// closes, whatever the agent asked to be sent.
#[inline(always)]
pub(crate) fn keep_origin<C: StackIdContext, F: Fields>(
    ctx: &C,
    f: &F,
    (oldstate, newstate, _): Wanted,
) -> Option<()> {
    // The socket's address only where it is needed: on the BTF program,
    // taking it costs a round trip through a per-CPU word, and most
    // transitions need neither branch.
    if newstate == tcp_state::CLOSE {
        // Most sockets were never inserted (listeners, sockets older than
        // the agent): with none kept, as under churn past the budget, a
        // load is all that costs.
        if origins_live() {
            forget(f.skaddr()?);
        }
    } else if oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT {
        // Past the budget, as for accept(): an origin without its stack
        // tells the agent nothing /proc does not.
        if stack_allowed(ctx, config().stacks_per_second) {
            let sk = f.skaddr()?;
            let now = unsafe { bpf_ktime_get_ns() };
            let fd = f.connect_fd(ctx.pid(), now);
            let stack_id = user_stack(ctx);
            keep(sk, ORIGIN_CONNECT, fd, now, stack_id);
            copy_user_stack(STACK_OF_CONNECT, sk, now, stack_id);
        }
    }
    Some(())
}

/// Whether the current process may have its stack walked now: always
/// without a `budget` (`KernelConfig::stacks_per_second`), else while its
/// walks in the current window (at least a second long) on this CPU stay
/// within it. Walks past the budget are
/// counted. The clock (a VM exit on some hypervisors: tens of ns) is read
/// only to open a window, and past the budget on every
/// [`BUDGET_CLOCK_EVERY`]th call, so that a process far past it pays a few
/// loads per connection.
#[inline(always)]
pub(crate) fn stack_allowed<C: StackIdContext>(ctx: &C, budget: u32) -> bool {
    let allowed = budget_allows(ctx, budget);
    if !allowed {
        count_origins(STACKS_OVER_BUDGET);
    }
    allowed
}
