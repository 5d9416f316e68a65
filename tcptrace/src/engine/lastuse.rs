//! Last use: the code that sent or received on a leaked socket last, and
//! the stack of the checkout that began that use (the first I/O after an
//! idle gap: a pooled connection taken out of its pool).
//!
//! The kernel keeps a [`tcptrace_common::LastUse`] in each TCP socket's own
//! storage (`LAST_USE`, a `BPF_MAP_TYPE_SK_STORAGE`). User space can look
//! such a map up only by a file descriptor of the socket, so for a leaked
//! socket the agent takes a duplicate of a holder's fd with
//! `pidfd_getfd(2)` (Linux >= 5.6; CAP_SYS_PTRACE, which the agent keeps
//! to read other users' /proc/PID/fd), reads the value and closes the
//! duplicate at once. The duplicate keeps the socket open only for that
//! moment. This module is pure ([`LastUse::from_kernel`], [`syscall_name`],
//! the tick arithmetic); [`crate::kernel::lastuse_map`] reads the maps.

/// Which way the I/O went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// A send (`write`, `send`, `sendmsg`, ...).
    Send,
    /// A receive (`read`, `recv`, `recvmsg`, ...), EOF and EAGAIN included.
    Recv,
}

impl Direction {
    /// `"send"` or `"recv"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Recv => "recv",
        }
    }

    fn of_bit(bit: u32) -> Self {
        if bit & 1 == tcptrace_common::IO_RECV {
            Self::Recv
        } else {
            Self::Send
        }
    }
}

/// The last use of a socket, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastUse {
    /// Direction of the checkout's I/O.
    pub direction: Direction,
    /// The checkout's system call, when known.
    pub syscall: Option<&'static str>,
    /// Process id of the checkout.
    pub pid: u32,
    /// Thread id of the checkout.
    pub tid: u32,
    /// Thread name of the checkout.
    pub comm: String,
    /// CLOCK_MONOTONIC ns of the checkout.
    pub checkout_ns: u64,
    /// CLOCK_MONOTONIC ns of the latest send or receive.
    pub last_io_ns: u64,
    /// Direction of the latest send or receive.
    pub last_direction: Direction,
    /// Checkouts seen on the socket.
    pub checkouts: u32,
    /// Sends and receives seen on the socket.
    pub ios: u32,
    /// The checkout's user stack id, when walked.
    pub stack_id: Option<u32>,
}

impl LastUse {
    /// Decodes the kernel's value, whose jiffies last `tick_ns` each;
    /// `None` when it holds no checkout.
    pub fn from_kernel(rec: &tcptrace_common::LastUse, tick_ns: u64) -> Option<Self> {
        if rec.checkout_ns == 0 || rec.checkouts == 0 {
            return None;
        }
        // The latest I/O to a tick: its jiffies past the checkout's (a
        // torn read never puts it before the checkout).
        let ticks = rec.last_jiffies.saturating_sub(rec.checkout_jiffies);
        let last_io_ns = rec
            .checkout_ns
            .saturating_add(ticks.saturating_mul(tick_ns));
        let comm_len = rec
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(rec.comm.len());
        Some(Self {
            direction: Direction::of_bit(rec.dirs),
            syscall: syscall_name(rec.syscall_nr),
            pid: rec.tgid,
            tid: rec.tid,
            comm: String::from_utf8_lossy(&rec.comm[..comm_len]).into_owned(),
            checkout_ns: rec.checkout_ns,
            last_io_ns,
            last_direction: Direction::of_bit(rec.dirs >> 1),
            checkouts: rec.checkouts,
            ios: rec.ios,
            stack_id: u32::try_from(rec.stack_id).ok(),
        })
    }

    /// Milliseconds from `ns` to the peer's FIN at `fin_ns` (negative: after it).
    pub fn before_ms(ns: u64, fin_ns: u64) -> f64 {
        (fin_ns as i128 - ns as i128) as f64 / 1e6
    }
}

/// The name of an x86_64 system call that moves data on a socket.
pub fn syscall_name(nr: i32) -> Option<&'static str> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    Some(match nr {
        0 => "read",
        1 => "write",
        17 => "pread64",
        18 => "pwrite64",
        19 => "readv",
        20 => "writev",
        40 => "sendfile",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        275 => "splice",
        295 => "preadv",
        296 => "pwritev",
        299 => "recvmmsg",
        307 => "sendmmsg",
        426 => "io_uring_enter",
        _ => return None,
    })
}

/// The usual `CONFIG_HZ` values: a measured rate close to one is it.
const KNOWN_HZ: [u32; 4] = [100, 250, 300, 1000];

/// The kernel's tick rate from `ticks` jiffies counted over `elapsed_ns`:
/// the nearest usual rate within 10 %, else the measured one rounded.
pub fn tick_rate(ticks: u64, elapsed_ns: u64) -> Option<u32> {
    if elapsed_ns == 0 || ticks == 0 {
        return None;
    }
    let measured = ticks as f64 * 1e9 / elapsed_ns as f64;
    let near = KNOWN_HZ
        .iter()
        .copied()
        .min_by(|a, b| {
            (f64::from(*a) - measured)
                .abs()
                .total_cmp(&(f64::from(*b) - measured).abs())
        })
        .filter(|&hz| (f64::from(hz) - measured).abs() <= f64::from(hz) * 0.1);
    near.or_else(|| {
        u32::try_from(measured.round() as u64)
            .ok()
            .filter(|&hz| hz > 0)
    })
}

/// The checkout gap in jiffies at `hz`: rounded up, and at least two, so
/// that two I/Os a moment apart across a tick are never a gap.
pub fn gap_jiffies(gap: std::time::Duration, hz: u32) -> u64 {
    let ticks = (gap.as_nanos() * u128::from(hz)).div_ceil(1_000_000_000);
    u64::try_from(ticks).unwrap_or(u64::MAX >> 1).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HZ=250.
    const TICK_NS: u64 = 4_000_000;

    fn rec() -> tcptrace_common::LastUse {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"update");
        tcptrace_common::LastUse {
            last_jiffies: 1_002,
            checkout_ns: 5_000,
            checkout_jiffies: 1_000,
            tgid: 42,
            tid: 43,
            last_tgid: 42,
            stack_id: 7,
            syscall_nr: 1,
            dirs: tcptrace_common::IO_SEND | (tcptrace_common::IO_RECV << 1),
            checkouts: 2,
            ios: 10,
            comm,
        }
    }

    #[test]
    fn decodes_the_kernel_value() {
        let u = LastUse::from_kernel(&rec(), TICK_NS).expect("a checkout");
        assert_eq!((u.pid, u.tid, u.comm.as_str()), (42, 43, "update"));
        assert_eq!(
            (u.direction, u.last_direction),
            (Direction::Send, Direction::Recv)
        );
        // Two ticks of 4 ms after the checkout.
        assert_eq!((u.checkout_ns, u.last_io_ns), (5_000, 8_005_000));
        assert_eq!((u.checkouts, u.ios, u.stack_id), (2, 10, Some(7)));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(u.syscall, Some("write"));
        }
        let unwalked = tcptrace_common::LastUse {
            stack_id: -1,
            syscall_nr: -1,
            ..rec()
        };
        let u = LastUse::from_kernel(&unwalked, TICK_NS).expect("a checkout");
        assert_eq!((u.stack_id, u.syscall), (None, None));
    }

    #[test]
    fn storage_without_a_checkout_is_no_last_use() {
        assert_eq!(
            LastUse::from_kernel(&tcptrace_common::LastUse::default(), TICK_NS),
            None
        );
        // A torn read (the latest I/O's jiffies behind the checkout's)
        // never goes backwards.
        let torn = tcptrace_common::LastUse {
            last_jiffies: 1,
            ..rec()
        };
        assert_eq!(
            LastUse::from_kernel(&torn, TICK_NS).map(|u| u.last_io_ns),
            Some(5_000)
        );
    }

    #[test]
    fn the_tick_rate_is_a_usual_one_when_close() {
        let ms = 1_000_000;
        assert_eq!(tick_rate(25, 100 * ms), Some(250));
        assert_eq!(tick_rate(26, 101 * ms), Some(250));
        assert_eq!(tick_rate(30, 100 * ms), Some(300));
        assert_eq!(tick_rate(10, 100 * ms), Some(100));
        assert_eq!(tick_rate(101, 100 * ms), Some(1000));
        // An unusual rate is taken as measured.
        assert_eq!(tick_rate(50, 100 * ms), Some(500));
        assert_eq!(tick_rate(0, 100 * ms), None);
        assert_eq!(tick_rate(5, 0), None);
    }

    #[test]
    fn the_gap_is_rounded_up_to_ticks_and_at_least_two() {
        let ms = std::time::Duration::from_millis;
        assert_eq!(gap_jiffies(ms(10), 250), 3);
        assert_eq!(gap_jiffies(ms(12), 250), 3);
        assert_eq!(gap_jiffies(ms(10), 1000), 10);
        assert_eq!(gap_jiffies(ms(10), 100), 2);
        assert_eq!(gap_jiffies(ms(1), 250), 2);
        assert_eq!(
            gap_jiffies(std::time::Duration::from_secs(3600), 1000),
            3_600_000
        );
    }

    #[test]
    fn time_before_the_fin_is_signed() {
        assert_eq!(LastUse::before_ms(1_000_000, 3_000_000), 2.0);
        assert_eq!(LastUse::before_ms(3_000_000, 1_000_000), -2.0);
    }
}
