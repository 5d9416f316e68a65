//! Ring-buffer bytes to typed records. Pure: no I/O, no clock.
//!
//! The kernel program writes `tcptrace_common` structs; this module checks
//! every record before trusting it (kind, exact length, family, states) so
//! that a truncated, oversized or corrupt record becomes a [`DecodeError`],
//! never a panic or a wrong line.

use std::fmt;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::Buf;
use tcptrace_common::{
    AcceptRecord, ResetRecord, StateRecord, StateRecordV4, AF_INET, AF_INET6, COMM_LEN,
    RECORD_ACCEPT, RECORD_RESET, RECORD_STATE, RECORD_STATE_BATCH, RECORD_STATE_V4, RESET_SENT,
    STAGED_RECORDS,
};

use crate::engine::state::TcpState;

/// Address family of a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// AF_INET
    Ipv4,
    /// AF_INET6
    Ipv6,
}

impl Family {
    /// `"ipv4"` or `"ipv6"`, as in the JSON output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

/// The task that was on the CPU when a record was made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Command name, lossy UTF-8.
    pub comm: String,
}

/// One TCP state transition.
#[derive(Clone, Debug, PartialEq)]
pub struct StateChange {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket: its identity while it lives.
    pub sk: u64,
    /// Network namespace inode, `None` when the kernel program could not read it.
    pub netns: Option<u32>,
    /// Address family.
    pub family: Family,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port.
    pub lport: u16,
    /// Remote address.
    pub raddr: IpAddr,
    /// Remote port.
    pub rport: u16,
    /// State left.
    pub old: TcpState,
    /// State entered.
    pub new: TcpState,
    /// The context task (not necessarily the owner).
    pub ctx: Task,
    /// The fd given to the `connect()` this transition ran in, if any.
    pub connect_fd: Option<i32>,
    /// User stack id of the context task (CLOSE -> SYN_SENT only).
    pub stack_id: Option<u32>,
    /// Inode of the socket file (CLOSE -> SYN_SENT and into CLOSE_WAIT).
    pub ino: Option<u64>,
}

/// `accept()` returned socket `sk` as `fd` to `task`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the accepted socket.
    pub sk: u64,
    /// The new file descriptor.
    pub fd: i32,
    /// The accepting task: the owner.
    pub task: Task,
    /// User stack id of the accepting task.
    pub stack_id: Option<u32>,
    /// Inode of the accepted socket's file.
    pub ino: Option<u64>,
}

/// A RST received or sent on socket `sk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket.
    pub sk: u64,
    /// True when the RST was sent (false: received).
    pub sent: bool,
}

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// A state transition.
    State(StateChange),
    /// An accepted socket.
    Accept(Accept),
    /// A RST.
    Reset(Reset),
}

/// Why a record was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than 4 bytes: not even a kind tag.
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Unknown kind tag (a newer or foreign kernel program?).
    UnknownKind(u32),
    /// The length does not match the record kind's layout.
    BadLength {
        /// Record kind name.
        kind: &'static str,
        /// Expected size.
        expected: usize,
        /// Received size.
        got: usize,
    },
    /// A family other than AF_INET/AF_INET6.
    BadFamily(u16),
    /// A state number the kernel does not define.
    BadState(i32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { len } => write!(f, "truncated record ({len} bytes)"),
            Self::UnknownKind(k) => write!(
                f,
                "unknown record kind {k} (kernel program and agent out of sync?)"
            ),
            Self::BadLength {
                kind,
                expected,
                got,
            } => write!(f, "{kind} record of {got} bytes, expected {expected}"),
            Self::BadFamily(fam) => write!(f, "unexpected address family {fam}"),
            Self::BadState(s) => write!(f, "unknown TCP state number {s}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one ring-buffer record.
pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    let Some(kind) = kind_of(buf) else {
        return Err(DecodeError::Truncated { len: buf.len() });
    };
    match kind {
        RECORD_STATE => decode_state(buf).map(Record::State),
        RECORD_STATE_V4 => decode_state_v4(buf).map(Record::State),
        RECORD_ACCEPT => decode_accept(buf).map(Record::Accept),
        RECORD_RESET => decode_reset(buf).map(Record::Reset),
        other => Err(DecodeError::UnknownKind(other)),
    }
}

/// Decodes one ring-buffer record and hands `each` the record, or each
/// record of a batch (`tcptrace_common::StateBatch`, staged short
/// records). A batch's good records are handed on even when one of them
/// is malformed.
pub fn decode_each(buf: &[u8], mut each: impl FnMut(Record)) -> Result<(), DecodeError> {
    if kind_of(buf) == Some(RECORD_STATE_BATCH) {
        return decode_batch(buf, each);
    }
    each(decode(buf)?);
    Ok(())
}

/// Hands `each` the records one ring-buffer record holds, as raw bytes with
/// their kernel times: the record itself, or each record of a batch. For
/// holding records before decoding them (see [`crate::engine::reorder`]): a
/// record is decoded (and rejected if malformed) when it is handed on; a
/// single record too short to hold a time gets time 0. `Err` only for a
/// batch whose header does not match its length, or that holds a record of
/// another kind than a short state record: such a record is not handed on
/// (the others are), so that decoding the pieces later gives what
/// [`decode_each`] gives at once.
pub fn split_timed(buf: &[u8], mut each: impl FnMut(u64, &[u8])) -> Result<(), DecodeError> {
    let kind = kind_of(buf);
    if kind != Some(RECORD_STATE_BATCH) {
        let at = match kind {
            Some(RECORD_RESET) => std::mem::offset_of!(ResetRecord, ts_ns),
            Some(RECORD_ACCEPT) => std::mem::offset_of!(AcceptRecord, ts_ns),
            _ => std::mem::offset_of!(StateRecord, ts_ns),
        };
        each(time_at(buf, at), buf);
        return Ok(());
    }
    let mut result = Ok(());
    for rec in batch_records(buf)?.chunks_exact(size_of::<StateRecordV4>()) {
        match short_kind(rec) {
            Ok(()) => each(
                time_at(rec, std::mem::offset_of!(StateRecordV4, ts_ns)),
                rec,
            ),
            Err(e) => result = result.and(Err(e)),
        }
    }
    result
}

/// The kind tag a record starts with; `None` when it is shorter than one.
fn kind_of(buf: &[u8]) -> Option<u32> {
    buf.get(..4).map(|mut k| k.get_u32_ne())
}

/// The u64 at `at` in `buf`, 0 when `buf` is too short.
fn time_at(buf: &[u8], at: usize) -> u64 {
    buf.get(at..at + 8).map_or(0, |mut t| t.get_u64_ne())
}

/// A batch's records, after its header (kind, count) checked against its
/// length.
fn batch_records(buf: &[u8]) -> Result<&[u8], DecodeError> {
    const HEAD: usize = 8;
    let (Some(mut count), Some(records)) = (buf.get(4..HEAD), buf.get(HEAD..)) else {
        return Err(DecodeError::Truncated { len: buf.len() });
    };
    let count = (count.get_u32_ne() as usize).min(STAGED_RECORDS);
    check_len(
        buf,
        "batch",
        HEAD + count.max(1) * size_of::<StateRecordV4>(),
    )?;
    Ok(records)
}

/// A batch: kind, count, then `count` short records.
fn decode_batch(buf: &[u8], mut each: impl FnMut(Record)) -> Result<(), DecodeError> {
    let mut result = Ok(());
    for rec in batch_records(buf)?.chunks_exact(size_of::<StateRecordV4>()) {
        match decode_short(rec) {
            Ok(change) => each(Record::State(change)),
            Err(e) => result = result.and(Err(e)),
        }
    }
    result
}

/// One record of a batch: a short state record, or an error.
fn decode_short(rec: &[u8]) -> Result<StateChange, DecodeError> {
    short_kind(rec)?;
    decode_state_v4(rec)
}

/// Ok when `rec` is tagged as a short state record, the only kind a batch
/// holds (an accept record has the same length: its tag tells them apart).
fn short_kind(rec: &[u8]) -> Result<(), DecodeError> {
    match kind_of(rec) {
        Some(RECORD_STATE_V4) => Ok(()),
        Some(other) => Err(DecodeError::UnknownKind(other)),
        None => Err(DecodeError::Truncated { len: rec.len() }),
    }
}

fn check_len(buf: &[u8], kind: &'static str, expected: usize) -> Result<(), DecodeError> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::BadLength {
            kind,
            expected,
            got: buf.len(),
        })
    }
}

pub(crate) fn comm(raw: &[u8]) -> String {
    let name = raw.split(|&b| b == 0).next().unwrap_or(raw);
    String::from_utf8_lossy(name).into_owned()
}

fn addr(family: Family, raw: [u8; 16]) -> IpAddr {
    match family {
        Family::Ipv4 => IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3])),
        Family::Ipv6 => IpAddr::V6(Ipv6Addr::from(raw)),
    }
}

fn state(n: i32) -> Result<TcpState, DecodeError> {
    TcpState::from_kernel(n).ok_or(DecodeError::BadState(n))
}

/// The fields both state layouts begin with, in this order.
struct StateHead {
    ctx_tgid: u32,
    ctx_tid: u32,
    netns: u32,
    ts_ns: u64,
    sk: u64,
}

/// Reads the [`StateHead`] after the kind tag.
fn state_head(b: &mut &[u8]) -> StateHead {
    let _kind = b.get_u32_ne();
    StateHead {
        ctx_tgid: b.get_u32_ne(),
        ctx_tid: b.get_u32_ne(),
        netns: b.get_u32_ne(),
        ts_ns: b.get_u64_ne(),
        sk: b.get_u64_ne(),
    }
}

/// The transition either layout describes; `connect_fd`, `stack_id` and
/// `ino` unset (only the full layout has them).
fn state_change(
    head: StateHead,
    family: Family,
    (laddr, lport): (IpAddr, u16),
    (raddr, rport): (IpAddr, u16),
    (old, new): (i32, i32),
    raw_comm: &[u8; COMM_LEN],
) -> Result<StateChange, DecodeError> {
    Ok(StateChange {
        ts_ns: head.ts_ns,
        sk: head.sk,
        netns: (head.netns != 0).then_some(head.netns),
        family,
        laddr,
        lport,
        raddr,
        rport,
        old: state(old)?,
        new: state(new)?,
        ctx: Task {
            pid: head.ctx_tgid,
            tid: head.ctx_tid,
            comm: comm(raw_comm),
        },
        connect_fd: None,
        stack_id: None,
        ino: None,
    })
}

fn decode_state(buf: &[u8]) -> Result<StateChange, DecodeError> {
    check_len(buf, "state", size_of::<StateRecord>())?;
    // Field order and widths follow `StateRecord`; the layout test in
    // tcptrace-common pins the size this relies on.
    let mut b = buf;
    let head = state_head(&mut b);
    let old = b.get_i32_ne();
    let new = b.get_i32_ne();
    let family = b.get_u16_ne();
    let sport = b.get_u16_ne();
    let dport = b.get_u16_ne();
    let _pad0 = b.get_u16_ne();
    let connect_fd = b.get_i32_ne();
    let stack_id = b.get_i32_ne();
    let mut saddr = [0u8; 16];
    b.copy_to_slice(&mut saddr);
    let mut daddr = [0u8; 16];
    b.copy_to_slice(&mut daddr);
    let mut raw_comm = [0u8; COMM_LEN];
    b.copy_to_slice(&mut raw_comm);
    let ino = b.get_u64_ne();

    let family = match family {
        AF_INET => Family::Ipv4,
        AF_INET6 => Family::Ipv6,
        other => return Err(DecodeError::BadFamily(other)),
    };
    let local = (addr(family, saddr), sport);
    let remote = (addr(family, daddr), dport);
    Ok(StateChange {
        connect_fd: (connect_fd >= 0).then_some(connect_fd),
        stack_id: u32::try_from(stack_id).ok(),
        ino: (ino != 0).then_some(ino),
        ..state_change(head, family, local, remote, (old, new), &raw_comm)?
    })
}

/// A [`StateRecordV4`]: an IPv4 transition without fd, stack or inode.
fn decode_state_v4(buf: &[u8]) -> Result<StateChange, DecodeError> {
    check_len(buf, "short state", size_of::<StateRecordV4>())?;
    // Field order and widths follow `StateRecordV4`.
    let mut b = buf;
    let head = state_head(&mut b);
    let old = b.get_u8();
    let new = b.get_u8();
    let sport = b.get_u16_ne();
    let dport = b.get_u16_ne();
    let _pad0 = b.get_u16_ne();
    let saddr = b.get_u32();
    let daddr = b.get_u32();
    let mut raw_comm = [0u8; COMM_LEN];
    b.copy_to_slice(&mut raw_comm);
    let local = (IpAddr::V4(Ipv4Addr::from(saddr)), sport);
    let remote = (IpAddr::V4(Ipv4Addr::from(daddr)), dport);
    let states = (i32::from(old), i32::from(new));
    state_change(head, Family::Ipv4, local, remote, states, &raw_comm)
}

fn decode_reset(buf: &[u8]) -> Result<Reset, DecodeError> {
    check_len(buf, "reset", size_of::<ResetRecord>())?;
    let mut b = buf;
    let _kind = b.get_u32_ne();
    let direction = b.get_u32_ne();
    let ts_ns = b.get_u64_ne();
    let sk = b.get_u64_ne();
    Ok(Reset {
        ts_ns,
        sk,
        sent: direction == RESET_SENT,
    })
}

fn decode_accept(buf: &[u8]) -> Result<Accept, DecodeError> {
    check_len(buf, "accept", size_of::<AcceptRecord>())?;
    let mut b = buf;
    let _kind = b.get_u32_ne();
    let tgid = b.get_u32_ne();
    let tid = b.get_u32_ne();
    let fd = b.get_i32_ne();
    let ts_ns = b.get_u64_ne();
    let sk = b.get_u64_ne();
    let mut raw_comm = [0u8; COMM_LEN];
    b.copy_to_slice(&mut raw_comm);
    let stack_id = b.get_i32_ne();
    let _pad0 = b.get_u32_ne();
    let ino = b.get_u64_ne();
    Ok(Accept {
        ts_ns,
        sk,
        fd,
        task: Task {
            pid: tgid,
            tid,
            comm: comm(&raw_comm),
        },
        stack_id: u32::try_from(stack_id).ok(),
        ino: (ino != 0).then_some(ino),
    })
}

/// Raw records as the kernel program writes them: for tests and benchmarks,
/// and for the entries the agent reads from the kernel's CLOSE_WAITS table.
pub mod raw {
    use super::*;
    use tcptrace_common::tcp_state;

    fn bytes_of<T: Copy>(rec: &T) -> Vec<u8> {
        // SAFETY: `T` is one of the `#[repr(C)]` plain-data records of
        // tcptrace-common, whose padding fields are explicit.
        unsafe { std::slice::from_raw_parts((rec as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    /// The bytes of a [`StateRecord`].
    pub fn state_bytes(rec: &StateRecord) -> Vec<u8> {
        bytes_of(rec)
    }

    /// The bytes of a [`StateRecordV4`].
    pub fn state_v4_bytes(rec: &StateRecordV4) -> Vec<u8> {
        bytes_of(rec)
    }

    /// The short record the kernel writes instead of `rec` (IPv4, no fd,
    /// stack or inode; the caller checks that).
    pub fn short_state(rec: &StateRecord) -> StateRecordV4 {
        let mut saddr = [0u8; 4];
        saddr.copy_from_slice(&rec.saddr[..4]);
        let mut daddr = [0u8; 4];
        daddr.copy_from_slice(&rec.daddr[..4]);
        StateRecordV4 {
            kind: tcptrace_common::RECORD_STATE_V4,
            ctx_tgid: rec.ctx_tgid,
            ctx_tid: rec.ctx_tid,
            netns: rec.netns,
            ts_ns: rec.ts_ns,
            skaddr: rec.skaddr,
            oldstate: rec.oldstate as u8,
            newstate: rec.newstate as u8,
            sport: rec.sport,
            dport: rec.dport,
            _pad0: 0,
            saddr,
            daddr,
            comm: rec.comm,
        }
    }

    /// The bytes of `rec` as the kernel program would send them: the short
    /// record wherever it holds everything (IPv4, no fd, stack or inode).
    pub fn kernel_bytes(rec: &StateRecord) -> Vec<u8> {
        if rec.family == AF_INET
            && rec.connect_fd < 0
            && rec.stack_id < 0
            && rec.ino == 0
            && tcptrace_common::state_fits_byte(rec.oldstate)
            && tcptrace_common::state_fits_byte(rec.newstate)
        {
            state_v4_bytes(&short_state(rec))
        } else {
            state_bytes(rec)
        }
    }

    /// The bytes of an [`AcceptRecord`].
    pub fn accept_bytes(rec: &AcceptRecord) -> Vec<u8> {
        bytes_of(rec)
    }

    /// A NUL-padded comm.
    pub fn comm(name: &str) -> [u8; COMM_LEN] {
        let mut out = [0u8; COMM_LEN];
        let n = name.len().min(COMM_LEN - 1);
        out[..n].copy_from_slice(&name.as_bytes()[..n]);
        out
    }

    /// A client's life: it connects, then closes first (TIME_WAIT).
    pub const CLIENT_LIFE: [(i32, i32); 5] = [
        (tcp_state::CLOSE, tcp_state::SYN_SENT),
        (tcp_state::SYN_SENT, tcp_state::ESTABLISHED),
        (tcp_state::ESTABLISHED, tcp_state::FIN_WAIT1),
        (tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2),
        (tcp_state::FIN_WAIT2, tcp_state::CLOSE),
    ];

    /// The server side of the same connection: the peer closes first, the
    /// socket waits in CLOSE_WAIT until its owner closes it.
    pub const SERVER_LIFE: [(i32, i32); 5] = [
        (tcp_state::LISTEN, tcp_state::SYN_RECV),
        (tcp_state::SYN_RECV, tcp_state::ESTABLISHED),
        (tcp_state::ESTABLISHED, tcp_state::CLOSE_WAIT),
        (tcp_state::CLOSE_WAIT, tcp_state::LAST_ACK),
        (tcp_state::LAST_ACK, tcp_state::CLOSE),
    ];

    /// An IPv4 transition record with sensible defaults.
    pub fn ipv4_state(
        sk: u64,
        ts_ns: u64,
        old: i32,
        new: i32,
        local: ([u8; 4], u16),
        remote: ([u8; 4], u16),
    ) -> StateRecord {
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&local.0);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&remote.0);
        StateRecord {
            kind: RECORD_STATE,
            ctx_tgid: 100,
            ctx_tid: 101,
            netns: 4026531840,
            ts_ns,
            skaddr: sk,
            oldstate: old,
            newstate: new,
            family: AF_INET,
            sport: local.1,
            dport: remote.1,
            _pad0: 0,
            connect_fd: -1,
            stack_id: -1,
            saddr,
            daddr,
            comm: comm("client"),
            ino: 0,
        }
    }
}

/// A socket's identity without its kernel address: namespace and four-tuple.
pub type TupleKey = (Option<u32>, std::net::IpAddr, u16, std::net::IpAddr, u16);

/// The key of a transition's socket.
pub fn tuple_key(c: &StateChange) -> TupleKey {
    (c.netns, c.laddr, c.lport, c.raddr, c.rport)
}

#[cfg(test)]
mod tests {
    use super::raw::{
        accept_bytes, comm, ipv4_state, short_state, state_bytes, state_v4_bytes, CLIENT_LIFE,
        SERVER_LIFE,
    };
    use super::{
        decode, decode_each, split_timed, AcceptRecord, DecodeError, Family, IpAddr, Ipv6Addr,
        Record, StateRecord, TcpState, AF_INET6, RECORD_ACCEPT,
    };
    use tcptrace_common::tcp_state as k;

    fn sample() -> StateRecord {
        ipv4_state(
            0xffff_8881_0000_1000,
            5_000,
            k::CLOSE,
            k::SYN_SENT,
            ([127, 0, 0, 1], 40000),
            ([127, 0, 0, 2], 5000),
        )
    }

    #[test]
    fn decodes_an_ipv4_transition() {
        let Record::State(ev) = decode(&state_bytes(&sample())).expect("valid") else {
            panic!("not a state record");
        };
        assert_eq!(ev.laddr, "127.0.0.1".parse::<IpAddr>().expect("ip"));
        assert_eq!(ev.raddr, "127.0.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!((ev.lport, ev.rport), (40000, 5000));
        assert_eq!((ev.old, ev.new), (TcpState::Close, TcpState::SynSent));
        assert_eq!(ev.ctx.comm, "client");
        assert_eq!(ev.connect_fd, None);
        assert_eq!(ev.netns, Some(4026531840));
    }

    #[test]
    fn decodes_an_ipv6_transition() {
        let mut rec = sample();
        rec.family = AF_INET6;
        rec.saddr = Ipv6Addr::LOCALHOST.octets();
        rec.daddr = "2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets();
        rec.connect_fd = 7;
        rec.netns = 0;
        rec.stack_id = 3;
        rec.ino = 99;
        let Record::State(ev) = decode(&state_bytes(&rec)).expect("valid") else {
            panic!("not a state record");
        };
        assert_eq!(ev.family, Family::Ipv6);
        assert_eq!(ev.laddr.to_string(), "::1");
        assert_eq!(ev.raddr.to_string(), "2001:db8::1");
        assert_eq!(ev.connect_fd, Some(7));
        assert_eq!(ev.netns, None);
        assert_eq!((ev.stack_id, ev.ino), (Some(3), Some(99)));
    }

    #[test]
    fn decodes_an_accept() {
        let rec = AcceptRecord {
            kind: RECORD_ACCEPT,
            tgid: 42,
            tid: 43,
            fd: 9,
            ts_ns: 1,
            skaddr: 0xdead_beef,
            comm: comm("server-with-a-very-long-name"),
            stack_id: 5,
            _pad0: 0,
            ino: 12345,
        };
        let Record::Accept(acc) = decode(&accept_bytes(&rec)).expect("valid") else {
            panic!("not an accept record");
        };
        assert_eq!(acc.fd, 9);
        assert_eq!(acc.task.pid, 42);
        assert_eq!(acc.task.comm, "server-with-a-v");
        assert_eq!((acc.stack_id, acc.ino), (Some(5), Some(12345)));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let full = state_bytes(&sample());
        for len in 0..full.len() {
            assert!(decode(&full[..len]).is_err(), "length {len} accepted");
        }
        let acc = accept_bytes(&AcceptRecord {
            kind: RECORD_ACCEPT,
            tgid: 1,
            tid: 1,
            fd: 3,
            ts_ns: 0,
            skaddr: 1,
            comm: [0; 16],
            stack_id: -1,
            _pad0: 0,
            ino: 0,
        });
        for len in 0..acc.len() {
            assert!(decode(&acc[..len]).is_err(), "length {len} accepted");
        }
    }

    #[test]
    fn a_short_record_decodes_to_the_same_transition_as_a_full_one() {
        for (i, (old, new)) in CLIENT_LIFE.iter().chain(&SERVER_LIFE).enumerate() {
            let mut full = sample();
            (full.oldstate, full.newstate) = (*old, *new);
            full.ts_ns = 1_000 + i as u64;
            full.ctx_tid = 7 + i as u32;
            let short = state_v4_bytes(&short_state(&full));
            assert_eq!(short.len(), 64);
            assert_eq!(
                decode(&short),
                decode(&state_bytes(&full)),
                "{old} -> {new}"
            );
        }
        let mut full = sample();
        full.netns = 0;
        assert_eq!(
            decode(&state_v4_bytes(&short_state(&full))),
            decode(&state_bytes(&full))
        );
    }

    #[test]
    fn a_hostile_short_record_is_an_error_not_a_panic() {
        let good = short_state(&sample());
        let bytes = state_v4_bytes(&good);
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "length {len} accepted");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(DecodeError::BadLength {
                kind: "short state",
                expected: 64,
                got: 65
            })
        );
        let mut bad = good;
        bad.newstate = 200;
        assert_eq!(
            decode(&state_v4_bytes(&bad)),
            Err(DecodeError::BadState(200))
        );
    }

    /// A batch as the kernel sends it: kind, count, the staged records.
    fn batch(records: &[tcptrace_common::StateRecordV4]) -> Vec<u8> {
        let mut bytes = tcptrace_common::RECORD_STATE_BATCH.to_ne_bytes().to_vec();
        bytes.extend_from_slice(&(records.len() as u32).to_ne_bytes());
        for r in records {
            bytes.extend_from_slice(&state_v4_bytes(r));
        }
        bytes
    }

    fn staged(n: usize) -> Vec<tcptrace_common::StateRecordV4> {
        (0..n)
            .map(|i| {
                let mut full = sample();
                (full.oldstate, full.newstate) = SERVER_LIFE[i % SERVER_LIFE.len()];
                full.ts_ns = i as u64;
                short_state(&full)
            })
            .collect()
    }

    #[test]
    fn a_batch_decodes_to_its_records_in_order() {
        for n in [1, 7, tcptrace_common::STAGED_RECORDS] {
            let mut out = Vec::new();
            decode_each(&batch(&staged(n)), |r| out.push(r)).expect("valid batch");
            let times: Vec<u64> = out
                .iter()
                .map(|r| match r {
                    Record::State(c) => c.ts_ns,
                    other => panic!("not a state record: {other:?}"),
                })
                .collect();
            assert_eq!(times, (0..n as u64).collect::<Vec<_>>());
        }
        // A single record goes through decode_each as one.
        let mut out = Vec::new();
        decode_each(&state_bytes(&sample()), |r| out.push(r)).expect("valid");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn a_hostile_batch_is_an_error_not_a_panic() {
        let good = batch(&staged(3));
        for len in 0..good.len() {
            let mut out = Vec::new();
            assert!(
                decode_each(&good[..len], |r| out.push(r)).is_err(),
                "length {len}"
            );
        }
        // A count that disagrees with the length, zero, or past the most
        // a batch holds.
        for count in [2u32, 4, 0, 1_000_000] {
            let mut bytes = good.clone();
            bytes[4..8].copy_from_slice(&count.to_ne_bytes());
            assert!(decode_each(&bytes, |_| {}).is_err(), "count {count}");
        }
        // One bad record: the others still come out, and the batch counts
        // as malformed.
        let mut records = staged(3);
        records[1].newstate = 99;
        let mut out = Vec::new();
        assert_eq!(
            decode_each(&batch(&records), |r| out.push(r)),
            Err(DecodeError::BadState(99))
        );
        assert_eq!(out.len(), 2);
        let mut bytes = batch(&staged(2));
        bytes[8..12].copy_from_slice(&RECORD_ACCEPT.to_ne_bytes());
        let mut out = Vec::new();
        assert_eq!(
            decode_each(&bytes, |r| out.push(r)),
            Err(DecodeError::UnknownKind(RECORD_ACCEPT))
        );
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn split_timed_gives_each_record_with_its_time() {
        let mut seen = Vec::new();
        split_timed(&batch(&staged(3)), |ts, raw| seen.push((ts, raw.len()))).expect("batch");
        assert_eq!(seen, vec![(0, 64), (1, 64), (2, 64)]);
        let mut seen = Vec::new();
        split_timed(&state_bytes(&sample()), |ts, raw| {
            seen.push((ts, raw.len()))
        })
        .expect("single");
        assert_eq!(seen, vec![(5_000, 112)]);
        let reset: Vec<u8> = [
            &tcptrace_common::RECORD_RESET.to_ne_bytes()[..],
            &0u32.to_ne_bytes(),
            &77u64.to_ne_bytes(),
            &1u64.to_ne_bytes(),
        ]
        .concat();
        let mut seen = Vec::new();
        split_timed(&reset, |ts, _| seen.push(ts)).expect("reset");
        assert_eq!(seen, vec![77]);
        // Too short for a time: handed on at time 0, to be rejected when
        // decoded; a batch whose header lies is rejected at once.
        let mut seen = Vec::new();
        split_timed(&[1, 0], |ts, raw| seen.push((ts, raw.len()))).expect("single");
        assert_eq!(seen, vec![(0, 2)]);
        let mut bad = batch(&staged(2));
        bad[4..8].copy_from_slice(&5u32.to_ne_bytes());
        assert!(split_timed(&bad, |_, _| panic!("a record of a bad batch")).is_err());
    }

    #[test]
    fn a_batch_holding_another_kind_splits_as_it_decodes() {
        // Found by the decode fuzz target: an accept record is as long as
        // a short state record, so one inside a batch was rejected by
        // decode_each but handed on by split_timed, and the reorder path
        // then decoded it as an accept.
        let mut bytes = batch(&staged(4));
        let third = 8 + 2 * 64;
        bytes[third..third + 4].copy_from_slice(&RECORD_ACCEPT.to_ne_bytes());
        let mut direct = Vec::new();
        assert_eq!(
            decode_each(&bytes, |r| direct.push(r)),
            Err(DecodeError::UnknownKind(RECORD_ACCEPT))
        );
        assert_eq!(direct.len(), 3);
        let mut held = Vec::new();
        assert_eq!(
            split_timed(&bytes, |ts, raw| held.push((ts, raw.to_vec()))),
            Err(DecodeError::UnknownKind(RECORD_ACCEPT))
        );
        assert_eq!(
            held.iter().map(|(ts, _)| *ts).collect::<Vec<_>>(),
            [0, 1, 3]
        );
        let later: Vec<Record> = held
            .iter()
            .map(|(_, raw)| decode(raw).expect("a short state record"))
            .collect();
        assert_eq!(later, direct);
    }

    #[test]
    fn decodes_a_reset() {
        let rec = tcptrace_common::ResetRecord {
            kind: tcptrace_common::RECORD_RESET,
            direction: tcptrace_common::RESET_SENT,
            ts_ns: 9,
            skaddr: 0xabc,
        };
        let bytes: Vec<u8> = [
            &rec.kind.to_ne_bytes()[..],
            &rec.direction.to_ne_bytes(),
            &rec.ts_ns.to_ne_bytes(),
            &rec.skaddr.to_ne_bytes(),
        ]
        .concat();
        assert_eq!(
            decode(&bytes),
            Ok(Record::Reset(super::Reset {
                ts_ns: 9,
                sk: 0xabc,
                sent: true
            }))
        );
        assert!(decode(&bytes[..20]).is_err());
    }

    #[test]
    fn oversized_records_are_rejected() {
        let mut bytes = state_bytes(&sample());
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::BadLength {
                kind: "state",
                expected: 112,
                got: 120
            })
        );
    }

    #[test]
    fn corrupt_fields_are_rejected() {
        let mut rec = sample();
        rec.kind = 99;
        assert_eq!(
            decode(&state_bytes(&rec)),
            Err(DecodeError::UnknownKind(99))
        );
        let mut rec = sample();
        rec.family = 1;
        assert_eq!(decode(&state_bytes(&rec)), Err(DecodeError::BadFamily(1)));
        let mut rec = sample();
        rec.newstate = 42;
        assert_eq!(decode(&state_bytes(&rec)), Err(DecodeError::BadState(42)));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated { len: 0 }));
    }

    #[test]
    fn comm_without_nul_and_invalid_utf8_is_lossy_not_fatal() {
        let mut rec = sample();
        rec.comm = [0xff; 16];
        let Record::State(ev) = decode(&state_bytes(&rec)).expect("valid") else {
            panic!("not a state record");
        };
        assert_eq!(ev.ctx.comm.chars().count(), 16);
    }
}
