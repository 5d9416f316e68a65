//! tcptrace kernel program.
//!
//! Hot path: `sock:inet_sock_set_state` counts one transition of a TCP
//! socket, and copies it into the ring buffer or the CLOSE_WAIT table when
//! the agent asked for it. Where the kernel has BTF, the program is attached
//! as a BTF tracepoint and reads the socket; otherwise, as a classic one
//! that reads the record the kernel fills. Process-context hooks record who
//! owns a socket: the fd given to `connect()` (looked up when the
//! CLOSE->SYN_SENT transition runs inside that call) and the socket
//! `accept()` returned.
//!
//! One file, one hook family, with the maps it uses:
//! - [`state`]: the transition programs; [`fields`]: where their fields
//!   come from; [`stage`]: per-CPU batches and `flush_stage`.
//! - [`connect`], [`accept`], [`reset`]: the process-context hooks.
//! - [`last_use`]: the send and receive hooks (who used a socket last).
//! - [`origins`], [`close_waits`]: the tables the agent reads for leaks.
//! - [`stacks`], [`stack_copy`]: user stacks, walked and copied.
//! - [`ring`]: records to user space; [`config`]: the layout facts the agent
//!   fills in ([`config::TCPTRACE_CONFIG`]; nothing here assumes a layout);
//!   [`helpers`]: reads and atomics every hook uses; [`bench`]: empty
//!   programs for `cargo xtask bench`.

#![no_std]
#![no_main]
// BPF inline assembly: the target has no compare-and-swap in Rust's
// atomics (and lowers atomics as single-threaded), see `cmpxchg`.
#![feature(asm_experimental_arch)]

mod accept;
mod bench;
mod close_waits;
mod config;
mod connect;
mod fields;
mod helpers;
mod last_use;
mod origins;
mod record;
mod reset;
mod ring;
mod stack_copy;
mod stacks;
mod stage;
mod state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_kernel` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
