//! User stacks: the `STACKS` map of frame-pointer walks, and the per-process
//! budget that bounds how many are walked (never on a hot transition).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{PerCpuArray, StackTrace};
use aya_ebpf::programs::tracing::StackIdContext;
use tcptrace_common::{stack_budget_slot, StackBudget, STACK_BUDGET_BITS};

/// Stack walks per process in the current second, per CPU (see
/// `KernelConfig::stacks_per_second`): an array slot by pid costs a load
/// and a store, where a hash map's lookup cost as much as the walk it
/// saved.
#[map]
static STACK_BUDGET: PerCpuArray<StackBudget> =
    PerCpuArray::with_max_entries(1 << STACK_BUDGET_BITS, 0);

/// User stacks of connect() and accept() callers, deduplicated by the
/// kernel (a leaking call site takes one slot however often it leaks).
/// Taken only in those two process-context places, never on other
/// transitions.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// `BPF_F_USER_STACK`: walk the user-space stack of the current task.
const BPF_F_USER_STACK: u64 = 256;

/// [`stack_allowed`](crate::origins::stack_allowed) without counting a refusal: last use counts its own.
#[inline(always)]
pub(crate) fn budget_allows<C: StackIdContext>(ctx: &C, budget: u32) -> bool {
    if budget == 0 {
        return true;
    }
    let tgid = ctx.tgid();
    let Some(b) = STACK_BUDGET.get_ptr_mut(stack_budget_slot(tgid)) else {
        return true;
    };
    // Per-CPU slot: no other writer can race these updates.
    unsafe {
        let used = (*b).used;
        if (*b).tgid != tgid {
            open_window(b, tgid);
            true
        } else if used < budget {
            (*b).used = used + 1;
            true
        } else {
            (*b).used = used.saturating_add(1);
            let check = (used - budget) % BUDGET_CLOCK_EVERY == BUDGET_CLOCK_EVERY - 1;
            if check && bpf_ktime_get_ns().wrapping_sub((*b).window_ns) >= 1_000_000_000 {
                open_window(b, tgid);
                true
            } else {
                false
            }
        }
    }
}

/// Past its budget, a process's calls read the clock once in this many:
/// a window ends at most this many connections late.
const BUDGET_CLOCK_EVERY: u32 = 64;

/// Starts a window of `tgid` in budget slot `b`, with its first walk.
///
/// # Safety
/// `b` must point into the per-CPU map's value.
#[inline(always)]
unsafe fn open_window(b: *mut StackBudget, tgid: u32) {
    unsafe {
        *b = StackBudget {
            window_ns: bpf_ktime_get_ns(),
            used: 1,
            tgid,
        };
    }
}

/// The current task's user stack (-1 when the walk fails).
#[inline(always)]
pub(crate) fn user_stack<C: StackIdContext>(ctx: &C) -> i32 {
    ctx.get_stackid(&STACKS, BPF_F_USER_STACK)
        .map_or(-1, |id| id as i32)
}
