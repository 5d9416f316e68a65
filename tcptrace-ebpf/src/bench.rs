//! Programs that do nothing, attached by `cargo xtask bench` to measure
//! the cost of a tracepoint call itself (the floor the real programs are
//! compared with).

use aya_ebpf::macros::{btf_tracepoint, tracepoint};
use aya_ebpf::programs::{BtfTracePointContext, TracePointContext};

/// The benchmark's floor: the same tracepoint with a program that does
/// nothing, so that `cargo xtask bench` can tell the cost of running any
/// program there from the cost of ours. Never attached by the agent.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn bench_floor(_ctx: TracePointContext) -> u32 {
    0
}

/// The benchmark's second floor: attached to the accept() exit
/// tracepoints next to [`bench_floor`], it shows what the agent's syscall
/// hooks cost by their presence alone (every syscall on the host then takes
/// the tracing path).
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn bench_floor_syscall(_ctx: TracePointContext) -> u32 {
    0
}

/// The benchmark's third floor: a program that does nothing on the same
/// tracepoint, attached the way the agent's [`inet_sock_set_state_btf`](crate::state::inet_sock_set_state_btf)
/// is (a BTF tracepoint: the kernel passes its arguments, and fills no
/// record).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bench_floor_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}
