//! Last use: who sent or received on a TCP socket last, and the code that
//! took it out of its pool (see `tcptrace_common::LastUse`).
//!
//! `sock:sock_send_length` and `sock:sock_recv_length` (Linux >= 6.3) fire
//! in the calling task, in `sock_sendmsg_nosec` / `sock_recvmsg_nosec`,
//! for every socket family: the TCP filter comes first. The record lives
//! in the socket's own storage (`BPF_MAP_TYPE_SK_STORAGE`): one lookup of
//! about 15 ns, freed with the socket, and never evicted the way an LRU
//! map would evict the long-idle leaking socket first. A busy stream costs
//! that lookup, a jiffies load, a compare and a few stores per I/O; the
//! precise clock is read and the user stack walked only at a checkout,
//! within the process's stack budget.

use core::ffi::c_void;

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::{bpf_ktime_get_ns, generated},
    macros::{btf_map, btf_tracepoint, map, raw_tracepoint},
    maps::{Array, PerCpuArray},
    programs::BtfTracePointContext,
    programs::RawTracePointContext,
};
use tcptrace_common::{
    is_checkout, LastUse, AF_INET, AF_INET6, IO_RECV, IO_SEND, IPPROTO_TCP, LAST_USE_GAP,
    LU_CHECKOUTS, LU_COUNT_SLOTS, LU_NO_STORAGE, LU_STACKS, STACK_OF_LAST_USE,
};

use crate::config::config;
use crate::connect::current_syscall_nr;
use crate::helpers::{bump, current_ids, write_current_comm};
use crate::stack_copy::copy_user_stack;
use crate::stacks::{budget_allows, user_stack};

/// Each TCP socket's [`LastUse`], created at its first send or receive.
#[btf_map]
static LAST_USE: SkStorage<LastUse> = SkStorage::new();

/// The checkout gap in jiffies (slot `LAST_USE_GAP`), written by the agent
/// before it attaches the programs (an array lookup the verifier inlines).
#[map]
static LAST_USE_GAP_JIFFIES: Array<u64> = Array::with_max_entries(1, 0);

/// Per CPU: see `tcptrace_common::LU_CHECKOUTS` and the slots after it.
#[map]
static LAST_USE_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(LU_COUNT_SLOTS, 0);

#[inline(always)]
fn count(slot: u32) {
    bump(&LAST_USE_COUNTS, slot, 1);
}

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const F_CREATE: u64 = 1;

#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    on_io(&ctx, IO_SEND);
    0
}

#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    on_io(&ctx, IO_RECV);
    0
}

/// The kernel's jiffies, written by [`clock_sample`].
#[map]
static CLOCK_SAMPLE: Array<u64> = Array::with_max_entries(1, 0);

/// Writes the kernel's jiffies into [`CLOCK_SAMPLE`]. Never attached: the
/// agent runs it (`BPF_PROG_TEST_RUN`) twice, a moment apart, to learn the
/// tick rate (`CONFIG_HZ`, which no file it may read tells). Through a map
/// because aya's `raw_tracepoint` wrapper returns 0 whatever the program
/// returns.
#[raw_tracepoint(tracepoint = "tcptrace_clock_sample")]
pub fn clock_sample(_ctx: RawTracePointContext) -> i32 {
    if let Some(slot) = CLOCK_SAMPLE.get_ptr_mut(0) {
        unsafe { *slot = generated::bpf_jiffies64() };
    }
    0
}

/// The benchmark's floor for last use: no-op programs on the same two
/// tracepoints, attached the same way. Never attached by the agent.
#[btf_tracepoint(function = "sock_send_length")]
pub fn bench_floor_send(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// See [`bench_floor_send`].
#[btf_tracepoint(function = "sock_recv_length")]
pub fn bench_floor_recv(_ctx: BtfTracePointContext) -> i32 {
    0
}

/// A send or receive (`dir`) on the socket `sk` (the tracepoint's first
/// argument, a `struct sock *` the verifier types from BTF) by the
/// current task. Every outcome counts, errors included: a non-blocking
/// read that finds nothing (EAGAIN), as a pool's liveness check does at
/// checkout, is a use by the code that made it.
#[inline(always)]
fn on_io(ctx: &BtfTracePointContext, dir: u32) -> Option<()> {
    let cfg = config();
    let sk: u64 = ctx.arg(0);
    if sk == 0 {
        return None;
    }
    // Plain loads through the typed pointer (a fault reads zero).
    let protocol = unsafe { *((sk + u64::from(cfg.sk_protocol)) as *const u16) };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let family = unsafe { *((sk + u64::from(cfg.sk_family)) as *const u16) };
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    // SAFETY: the helper takes the map definition's address and the
    // socket as the tracepoint passed it.
    let v = unsafe {
        generated::bpf_sk_storage_get(
            core::ptr::addr_of!(LAST_USE).cast_mut().cast::<c_void>(),
            sk as *mut c_void,
            core::ptr::null_mut(),
            F_CREATE,
        )
    }
    .cast::<LastUse>();
    if v.is_null() {
        count(LU_NO_STORAGE);
        return None;
    }
    let now = unsafe { generated::bpf_jiffies64() };
    let (tgid, tid) = current_ids();
    let gap = LAST_USE_GAP_JIFFIES
        .get(LAST_USE_GAP)
        .copied()
        .unwrap_or(i64::MAX as u64);
    // SAFETY: `v` points at this socket's storage value.
    unsafe {
        if is_checkout((*v).last_jiffies, (*v).last_tgid, now, tgid, gap) {
            checkout(ctx, cfg, v, sk, now, (tgid, tid), dir);
        }
        (*v).last_jiffies = now;
        (*v).last_tgid = tgid;
        (*v).dirs = ((*v).dirs & 1) | (dir << 1);
        (*v).ios = (*v).ios.wrapping_add(1);
    }
    Some(())
}

/// Records a checkout in `v` at jiffy `now`: who, when (the precise
/// clock too), which syscall and, within the process's stack budget, the
/// user stack.
///
/// # Safety
/// `v` must point at a socket storage value.
#[inline(always)]
unsafe fn checkout(
    ctx: &BtfTracePointContext,
    cfg: &tcptrace_common::KernelConfig,
    v: *mut LastUse,
    sk: u64,
    now: u64,
    (tgid, tid): (u32, u32),
    dir: u32,
) {
    count(LU_CHECKOUTS);
    let walked = budget_allows(ctx, cfg.stacks_per_second);
    let stack_id = if walked { user_stack(ctx) } else { -1 };
    if stack_id >= 0 {
        count(LU_STACKS);
    }
    let checkout_ns = unsafe { bpf_ktime_get_ns() };
    if walked {
        copy_user_stack(STACK_OF_LAST_USE, sk, checkout_ns, stack_id);
    }
    unsafe {
        (*v).checkout_ns = checkout_ns;
        (*v).checkout_jiffies = now;
        (*v).tgid = tgid;
        (*v).tid = tid;
        (*v).stack_id = stack_id;
        (*v).syscall_nr = current_syscall_nr();
        (*v).dirs = dir | (dir << 1);
        (*v).checkouts = (*v).checkouts.wrapping_add(1);
        write_current_comm(core::ptr::addr_of_mut!((*v).comm));
    }
}
