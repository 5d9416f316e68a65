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
//! moment. [`LastUse::from_kernel`] and [`syscall_name`] are pure.

use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{MapData, PerCpuArray, SkStorage};
use aya::Ebpf;

use crate::probe::per_cpu_sum;

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
    /// Decodes the kernel's value; `None` when it holds no checkout.
    pub fn from_kernel(rec: &tcptrace_common::LastUse) -> Option<Self> {
        if rec.checkout_ns == 0 || rec.checkouts == 0 {
            return None;
        }
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
            last_io_ns: rec.last_ns.max(rec.checkout_ns),
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

/// Counts of the kernel's last-use program, over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastUseCounts {
    /// Checkouts seen.
    pub checkouts: u64,
    /// Stacks walked for them (the others were past the stack budget).
    pub stacks: u64,
    /// I/Os not recorded: no socket storage could be had.
    pub no_storage: u64,
}

/// The kernel's last-use storage and counters.
pub struct LastUseMap {
    storage: SkStorage<MapData, tcptrace_common::LastUse>,
    counts: PerCpuArray<MapData, u64>,
}

/// Why a holder's last use could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The process or its fd is gone, or cannot be reached
    /// (`pidfd_open`/`pidfd_getfd`: Linux < 5.6, Yama ptrace_scope 3,
    /// no CAP_SYS_PTRACE).
    Holder(std::io::Error),
    /// The map lookup failed for another reason than "no value".
    Map(aya::maps::MapError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Holder(e) => write!(
                f,
                "cannot duplicate the holder's fd with pidfd_getfd ({e}); last use needs Linux >= \
                 5.6, CAP_SYS_PTRACE and a Yama ptrace_scope below 3"
            ),
            Self::Map(e) => write!(f, "reading the LAST_USE socket storage failed: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl LastUseMap {
    /// Takes the maps out of the loaded object.
    pub fn open(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let storage = ebpf
            .take_map("LAST_USE")
            .context("the eBPF object has no LAST_USE map")?;
        let counts = ebpf
            .take_map("LAST_USE_COUNTS")
            .context("the eBPF object has no LAST_USE_COUNTS map")?;
        Ok(Self {
            storage: SkStorage::try_from(storage).context("opening the LAST_USE storage")?,
            counts: PerCpuArray::try_from(counts).context("opening LAST_USE_COUNTS")?,
        })
    }

    /// The last use of the socket that process `pid` holds as `fd`;
    /// `Ok(None)` when the kernel saw no I/O on it.
    pub fn of_holder(
        &self,
        pid: u32,
        fd: i32,
    ) -> Result<Option<tcptrace_common::LastUse>, ReadError> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| ReadError::Holder(std::io::ErrorKind::InvalidInput.into()))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(|e| ReadError::Holder(e.into()))?;
        let sock = rustix::process::pidfd_getfd(
            pidfd.as_fd(),
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )
        .map_err(|e| ReadError::Holder(e.into()))?;
        match self.storage.get(&sock, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(ReadError::Map(e)),
        }
        // `sock` and `pidfd` close here.
    }

    /// [`Self::of_holder`] for the leak report: `None` when there is no
    /// last use or it cannot be read. A holder that exited or closed the
    /// fd since /proc was read is a race, not a failure; any other failure
    /// is logged, as a warning the first time (it is likely to repeat for
    /// every leak: no CAP_SYS_PTRACE, Yama) and at debug level after.
    pub fn lookup(&self, pid: u32, fd: i32) -> Option<tcptrace_common::LastUse> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        match self.of_holder(pid, fd) {
            Ok(found) => found,
            Err(ReadError::Holder(e))
                if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) =>
            {
                None
            }
            Err(e) => {
                let what = format!("last use of pid {pid} fd {fd}: {e}");
                if WARNED.swap(true, Ordering::Relaxed) {
                    log::debug!("{what}");
                } else {
                    log::warn!("{what} (said once; RUST_LOG=debug shows the others)");
                }
                None
            }
        }
    }

    /// The kernel's counts now.
    pub fn counts(&self) -> LastUseCounts {
        let slot = |i| per_cpu_sum(&self.counts, i);
        LastUseCounts {
            checkouts: slot(tcptrace_common::LU_CHECKOUTS),
            stacks: slot(tcptrace_common::LU_STACKS),
            no_storage: slot(tcptrace_common::LU_NO_STORAGE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> tcptrace_common::LastUse {
        let mut comm = [0u8; 16];
        comm[..6].copy_from_slice(b"update");
        tcptrace_common::LastUse {
            last_ns: 9_000,
            checkout_ns: 5_000,
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
        let u = LastUse::from_kernel(&rec()).expect("a checkout");
        assert_eq!((u.pid, u.tid, u.comm.as_str()), (42, 43, "update"));
        assert_eq!(
            (u.direction, u.last_direction),
            (Direction::Send, Direction::Recv)
        );
        assert_eq!((u.checkout_ns, u.last_io_ns), (5_000, 9_000));
        assert_eq!((u.checkouts, u.ios, u.stack_id), (2, 10, Some(7)));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(u.syscall, Some("write"));
        }
        let unwalked = tcptrace_common::LastUse {
            stack_id: -1,
            syscall_nr: -1,
            ..rec()
        };
        let u = LastUse::from_kernel(&unwalked).expect("a checkout");
        assert_eq!((u.stack_id, u.syscall), (None, None));
    }

    #[test]
    fn storage_without_a_checkout_is_no_last_use() {
        assert_eq!(
            LastUse::from_kernel(&tcptrace_common::LastUse::default()),
            None
        );
        // A torn read (last_ns behind the checkout) never goes backwards.
        let torn = tcptrace_common::LastUse {
            last_ns: 1,
            ..rec()
        };
        assert_eq!(
            LastUse::from_kernel(&torn).map(|u| u.last_io_ns),
            Some(5_000)
        );
    }

    #[test]
    fn time_before_the_fin_is_signed() {
        assert_eq!(LastUse::before_ms(1_000_000, 3_000_000), 2.0);
        assert_eq!(LastUse::before_ms(3_000_000, 1_000_000), -2.0);
    }
}
