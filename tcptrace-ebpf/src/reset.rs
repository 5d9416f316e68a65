//! The reset hooks (`tcp:tcp_receive_reset`, `tcp:tcp_send_reset`): which
//! side reset a connection.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use core::ptr::addr_of_mut;

use tcptrace_common::{ResetRecord, RECORD_RESET, RESET_RECEIVED, RESET_SENT};

use crate::config::config;
use crate::helpers::read_ctx;
use crate::ring::send;

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let cfg = config();
    on_reset(&ctx, cfg.rst_recv_skaddr, RESET_RECEIVED);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let cfg = config();
    on_reset(&ctx, cfg.rst_send_skaddr, RESET_SENT);
    0
}

/// A RST on a socket: tells an abort from a passage into TIME_WAIT.
#[inline(always)]
fn on_reset(ctx: &TracePointContext, skaddr_offset: u32, direction: u32) -> Option<()> {
    let skaddr = read_ctx::<u64>(ctx, skaddr_offset)?;
    if skaddr == 0 {
        // A RST answering a segment for no socket: nothing to attribute.
        return None;
    }
    send(config(), |rec: *mut ResetRecord| unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_RESET);
        addr_of_mut!((*rec).direction).write(direction);
        addr_of_mut!((*rec).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*rec).skaddr).write(skaddr);
    })
}
