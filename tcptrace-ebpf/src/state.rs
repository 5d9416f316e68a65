//! The state-transition programs on `sock:inet_sock_set_state` (BTF and
//! classic): count each transition, send the wanted ones (whole, or
//! staged per CPU), keep origins and CLOSE_WAIT stays.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{btf_tracepoint, map, tracepoint};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::{tracing::StackIdContext, BtfTracePointContext, TracePointContext};
use tcptrace_common::{
    state_fits_byte, tcp_state, KernelConfig, AF_INET, AF_INET6, CONFIG_CW_TABLE,
    CONFIG_ORIGIN_MAP, CONFIG_STAGE, IPPROTO_TCP, RECORD_STATE, STACK_OF_CONNECT,
    TRANSITION_STATES,
};

use crate::close_waits::close_wait_in_table;
use crate::config::config;
use crate::fields::{Fields, FixedFields, OffsetFields, SockFields};
use crate::helpers::bump;
use crate::origins::{keep_origin, stack_allowed};
use crate::record::{fill_state, fill_state_v4, Wanted};
use crate::ring::send;
use crate::stack_copy::copy_user_stack;
use crate::stacks::user_stack;
use crate::stage::stage;

/// Every TCP transition, counted per CPU by `old * 16 + new`, whether or not
/// it is sent to the agent (see `KernelConfig::emit_new`).
#[map]
static TRANSITIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(TRANSITION_STATES * TRANSITION_STATES, 0);

#[inline(always)]
fn state_bit(state: i32) -> u32 {
    if (0..32).contains(&state) {
        1 << state
    } else {
        0
    }
}

#[inline(always)]
fn count_transition(old: i32, new: i32) {
    let states = TRANSITION_STATES as i32;
    if !(0..states).contains(&old) || !(0..states).contains(&new) {
        return;
    }
    bump(&TRANSITIONS, (old * states + new) as u32, 1);
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let f = OffsetFields { ctx: &ctx, cfg };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, cfg);
    }
    0
}

/// The same program for the tracepoint layout of Linux >= 5.6 (the agent
/// attaches it when tracefs shows exactly [`FixedFields`](crate::fields::FixedFields)' offsets): fields
/// are plain loads from the context instead of a helper call each, and a
/// transition the agent did not ask for costs a few loads and a counter.
/// This path runs about ten times per connection.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state_fixed(ctx: TracePointContext) -> u32 {
    let f = FixedFields { ctx: &ctx };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, config());
    }
    0
}

/// What both state programs do with a TCP transition: keep or forget an
/// origin, keep a CLOSE_WAIT stay in the table, send what the agent asked
/// for and the table did not take.
#[inline(always)]
fn on_transition<C: StackIdContext, F: Fields>(ctx: &C, f: &F, t: Wanted, cfg: &KernelConfig) {
    if cfg.flags & CONFIG_ORIGIN_MAP != 0 {
        keep_origin(ctx, f, t);
    }
    if wanted(t, cfg.emit_new, cfg.emit_old)
        && (cfg.flags & CONFIG_CW_TABLE == 0 || !close_wait_in_table(cfg, f, t))
    {
        emit_state(ctx, cfg, f, t);
    }
}

/// Counts every TCP transition of an IPv4/IPv6 socket and returns it.
#[inline(always)]
fn tcp_transition<F: Fields>(f: &F) -> Option<Wanted> {
    if f.protocol()? != IPPROTO_TCP {
        return None;
    }
    let family = f.family()?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let oldstate = f.oldstate()?;
    let newstate = f.newstate()?;
    count_transition(oldstate, newstate);
    Some((oldstate, newstate, family))
}

/// True when the agent asked for this transition.
#[inline(always)]
fn wanted((oldstate, newstate, _): Wanted, emit_new: u32, emit_old: u32) -> bool {
    emit_new & state_bit(newstate) != 0 || emit_old & state_bit(oldstate) != 0
}

/// The state program where the kernel has BTF, the agent's first choice:
/// attached as a BTF tracepoint, it gets the tracepoint's arguments (the
/// socket and the two states) where the classic programs get a record the
/// kernel fills for them, field by field, on every transition whether or
/// not they need it. On the benchmark's VM a no-op classic program takes
/// some 3 % of the churn's rate, a no-op BTF one about 1 % (`cargo xtask
/// bench`, the floors). The fields the record would hold are read from the
/// socket when needed, with plain loads the verifier checks against BTF.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = config();
    let f = SockFields { ctx: &ctx, cfg };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, cfg);
    }
    0
}

#[inline(always)]
fn emit_state<C: StackIdContext, F: Fields>(
    ctx: &C,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate, family): Wanted,
) -> Option<()> {
    let skaddr = f.skaddr()?;

    let in_connect = oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT;
    if family == AF_INET
        && !in_connect
        && newstate != tcp_state::CLOSE_WAIT
        && state_fits_byte(oldstate)
        && state_fits_byte(newstate)
    {
        // No fd, stack or inode to carry: the short record says it all.
        if cfg.flags & CONFIG_STAGE != 0 && stage(cfg, f, (oldstate, newstate), skaddr) {
            return Some(());
        }
        let now = unsafe { bpf_ktime_get_ns() };
        return send(cfg, |rec| {
            fill_state_v4(rec, cfg, f, (oldstate, newstate), skaddr, now);
        });
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // With the origin map, the origin (and its stack) is already there.
    let (connect_fd, stack_id, walked) = if in_connect && cfg.flags & CONFIG_ORIGIN_MAP == 0 {
        // Runs inside connect(): the current task is the owner, and its
        // stack is the code path that opened the connection.
        let walked = stack_allowed(ctx, cfg.stacks_per_second);
        let stack_id = if walked { user_stack(ctx) } else { -1 };
        (f.connect_fd(ctx.pid(), now), stack_id, walked)
    } else {
        (-1, -1, false)
    };
    if walked {
        copy_user_stack(STACK_OF_CONNECT, skaddr, now, stack_id);
    }

    send(cfg, |rec| {
        let t = (oldstate, newstate, family);
        fill_state(
            rec,
            RECORD_STATE,
            cfg,
            f,
            t,
            skaddr,
            now,
            connect_fd,
            stack_id,
        );
    })
}
