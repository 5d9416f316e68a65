//! A transition as the record the agent decodes: the whole
//! `StateRecord` ([`fill_state`]) or the short `StateRecordV4` of an IPv4
//! socket ([`fill_state_v4`]), filled from any [`Fields`] source.

use core::ptr::addr_of_mut;

use tcptrace_common::{
    tcp_state, KernelConfig, StateRecord, StateRecordV4, AF_INET, COMM_LEN, CONFIG_ORIGIN_MAP,
    RECORD_STATE, RECORD_STATE_V4,
};

use crate::fields::{netns_of, sk_ino, Fields};
use crate::helpers::{current_ids, write_current_comm};

/// A TCP transition of an IPv4/IPv6 socket: (old, new, family).
pub(crate) type Wanted = (i32, i32, u16);

/// Writes transition `t` of socket `skaddr` at `now` into `rec` (a ring
/// reservation, or a [`CLOSE_WAITS`](crate::close_waits::CLOSE_WAITS) slot, whose `kind` comes last, see
/// `cw_enter`); the socket's network namespace, and for a record its
/// inode, are read here. A table entry goes without the inode (two
/// dependent reads per connection): the few entries that linger get it
/// from the agent's sock_diag lookup by four-tuple, as `ss` does.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn fill_state<F: Fields>(
    rec: *mut StateRecord,
    kind: u32,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate, family): Wanted,
    skaddr: u64,
    now: u64,
    connect_fd: i32,
    stack_id: i32,
) {
    let in_connect = oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT;
    let ino = if kind == RECORD_STATE && (in_connect || newstate == tcp_state::CLOSE_WAIT) {
        sk_ino(cfg, skaddr)
    } else {
        0
    };
    let netns = netns_of(cfg, f, skaddr);
    // Entering CLOSE_WAIT runs in softirq context (the peer's FIN), on
    // whatever task the CPU was running: only a line that prints every
    // transition shows that task.
    let ctx_unused = cfg.flags & CONFIG_ORIGIN_MAP != 0 && newstate == tcp_state::CLOSE_WAIT;
    let (ctx_tgid, ctx_tid) = if ctx_unused { (0, 0) } else { current_ids() };
    unsafe {
        addr_of_mut!((*rec).kind).write(kind);
        addr_of_mut!((*rec).ctx_tgid).write(ctx_tgid);
        addr_of_mut!((*rec).ctx_tid).write(ctx_tid);
        addr_of_mut!((*rec).netns).write(netns);
        addr_of_mut!((*rec).ts_ns).write(now);
        addr_of_mut!((*rec).skaddr).write(skaddr);
        addr_of_mut!((*rec).oldstate).write(oldstate);
        addr_of_mut!((*rec).newstate).write(newstate);
        addr_of_mut!((*rec).family).write(family);
        addr_of_mut!((*rec).sport).write(f.sport());
        addr_of_mut!((*rec).dport).write(f.dport());
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).connect_fd).write(connect_fd);
        addr_of_mut!((*rec).stack_id).write(stack_id);
        addr_of_mut!((*rec).ino).write(ino);
        let (saddr, daddr) = if family == AF_INET {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            let (s4, d4) = f.addrs_v4();
            s[..4].copy_from_slice(&s4);
            d[..4].copy_from_slice(&d4);
            (s, d)
        } else {
            f.addrs_v6()
        };
        addr_of_mut!((*rec).saddr).write(saddr);
        addr_of_mut!((*rec).daddr).write(daddr);
        if ctx_unused {
            addr_of_mut!((*rec).comm).write([0; COMM_LEN]);
        } else {
            write_current_comm(addr_of_mut!((*rec).comm));
        }
    }
}

/// Writes IPv4 transition `(oldstate, newstate)` of socket `skaddr` at
/// `now` into the short record `rec` (a ring reservation); see
/// [`StateRecordV4`] for which transitions go this way.
#[inline(always)]
pub(crate) fn fill_state_v4<F: Fields>(
    rec: *mut StateRecordV4,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate): (i32, i32),
    skaddr: u64,
    now: u64,
) {
    let netns = netns_of(cfg, f, skaddr);
    let (ctx_tgid, ctx_tid) = current_ids();
    let (saddr, daddr) = f.addrs_v4();
    unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_STATE_V4);
        addr_of_mut!((*rec).ctx_tgid).write(ctx_tgid);
        addr_of_mut!((*rec).ctx_tid).write(ctx_tid);
        addr_of_mut!((*rec).netns).write(netns);
        addr_of_mut!((*rec).ts_ns).write(now);
        addr_of_mut!((*rec).skaddr).write(skaddr);
        // state_fits_byte() checked both.
        addr_of_mut!((*rec).oldstate).write(oldstate as u8);
        addr_of_mut!((*rec).newstate).write(newstate as u8);
        addr_of_mut!((*rec).sport).write(f.sport());
        addr_of_mut!((*rec).dport).write(f.dport());
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).saddr).write(saddr);
        addr_of_mut!((*rec).daddr).write(daddr);
        write_current_comm(addr_of_mut!((*rec).comm));
    }
}
