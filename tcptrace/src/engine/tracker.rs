//! Per-socket state machine: how long each socket spent in the state it
//! leaves, and who owns it. Pure: driven only by decoded records.
//!
//! A socket is keyed by its kernel address, which the kernel reuses once
//! the socket is freed. A socket's life ends at CLOSE (the entry is
//! dropped) and a transition out of CLOSE, or a listener's child entering
//! SYN_RECV, starts a new one; anything that does not continue the tracked
//! state (lost records, reordering) yields an unknown duration rather than
//! a wrong one.

use std::collections::HashMap;

/// A map on the per-transition path: foldhash instead of SipHash (keys are
/// kernel addresses and command names, not attacker-chosen at will).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use crate::engine::decode::{Accept, StateChange};
use crate::engine::state::TcpState;

/// The process holding a socket, as seen at `connect()`, `listen()` or `accept()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// File descriptor in that process, when known.
    pub fd: Option<i32>,
    /// Command name.
    pub comm: String,
}

/// The system call that created a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Syscall {
    /// `connect()`: an outgoing connection.
    Connect,
    /// `accept()`/`accept4()`: an incoming connection.
    Accept,
}

impl Syscall {
    /// `"connect"` or `"accept"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Accept => "accept",
        }
    }
}

/// Where a connection came from: the call, the task that made it, when,
/// and its user stack (an id in the kernel's stack map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The creating system call.
    pub syscall: Syscall,
    /// Process id of the caller.
    pub pid: u32,
    /// Thread id of the caller.
    pub tid: u32,
    /// Command name of the caller.
    pub comm: String,
    /// The fd it got (accept) or passed (connect), when known.
    pub fd: Option<i32>,
    /// CLOCK_MONOTONIC nanoseconds of the call.
    pub ts_ns: u64,
    /// User stack id, when the kernel could take the stack.
    pub stack_id: Option<u32>,
}

/// A state change with what the tracker knows about the socket.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    /// The raw transition.
    pub change: StateChange,
    /// Milliseconds spent in `change.old`; `None` when the tracker did not
    /// see the socket enter it.
    pub prev_state_ms: Option<f64>,
    /// The socket's owner, when known.
    pub owner: Option<Owner>,
    /// How the connection was created, when the agent saw it.
    pub origin: Option<Origin>,
    /// Inode of the socket file, when known.
    pub ino: Option<u64>,
    /// The task that closed first (ESTABLISHED -> FIN_WAIT1 runs inside its
    /// `close()`/`shutdown()`), when this side closed first.
    pub closer: Option<crate::engine::decode::Task>,
    /// A RST was received or sent in this life: its CLOSE is an abort.
    pub reset: bool,
}

impl Transition {
    /// True when this CLOSE hands the connection to a TIME_WAIT
    /// mini-socket: the side that closed first leaves FIN_WAIT1, FIN_WAIT2
    /// or CLOSING without a RST.
    pub fn enters_time_wait(&self) -> bool {
        self.change.new == TcpState::Close
            && !self.reset
            && matches!(
                self.change.old,
                TcpState::FinWait1 | TcpState::FinWait2 | TcpState::Closing
            )
    }
}

/// What the tracker knows about a socket besides its state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Known {
    /// Owner, when known.
    pub owner: Option<Owner>,
    /// Origin, when seen.
    pub origin: Option<Origin>,
    /// Socket inode, when known.
    pub ino: Option<u64>,
}

/// What the tracker keeps per socket: 56 bytes, so that a million sockets
/// fit in well under 150 MiB with the hash table's own overhead. Command
/// names are interned ([`CommTable`]); an origin's process, name and fd are
/// its owner's (both are set by the same connect() or accept()).
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When the socket entered `state` (monotonic ns); also its age for
    /// eviction.
    since_ns: u64,
    /// Socket inode, 0 when unknown.
    ino: u64,
    /// When the creating call ran.
    origin_ts_ns: u64,
    owner_pid: u32,
    /// `NO_FD` when unknown.
    owner_fd: i32,
    owner_comm: CommId,
    origin_tid: u32,
    /// `NO_STACK` when none.
    origin_stack: u32,
    closer_pid: u32,
    closer_comm: CommId,
    /// `None` when only the owner is known (an accept seen before any
    /// transition).
    state: Option<TcpState>,
    /// `HAS_OWNER` | `HAS_ORIGIN` | `HAS_CLOSER` | `RESET` | `ORIGIN_ACCEPT`.
    flags: u8,
}

const HAS_OWNER: u8 = 1;
const HAS_ORIGIN: u8 = 2;
const HAS_CLOSER: u8 = 4;
const RESET: u8 = 8;
const ORIGIN_ACCEPT: u8 = 16;
const NO_FD: i32 = i32::MIN;
const NO_STACK: u32 = u32::MAX;

impl Entry {
    fn new(ts_ns: u64) -> Self {
        Self {
            since_ns: ts_ns,
            ino: 0,
            origin_ts_ns: 0,
            owner_pid: 0,
            owner_fd: NO_FD,
            owner_comm: 0,
            origin_tid: 0,
            origin_stack: NO_STACK,
            closer_pid: 0,
            closer_comm: 0,
            state: None,
            flags: 0,
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn owner(&self, comms: &CommTable) -> Option<Owner> {
        self.has(HAS_OWNER).then(|| Owner {
            pid: self.owner_pid,
            fd: (self.owner_fd != NO_FD).then_some(self.owner_fd),
            comm: comms.name(self.owner_comm),
        })
    }

    fn origin(&self, comms: &CommTable) -> Option<Origin> {
        (self.has(HAS_ORIGIN) && self.has(HAS_OWNER)).then(|| Origin {
            syscall: if self.has(ORIGIN_ACCEPT) {
                Syscall::Accept
            } else {
                Syscall::Connect
            },
            pid: self.owner_pid,
            tid: self.origin_tid,
            comm: comms.name(self.owner_comm),
            fd: (self.owner_fd != NO_FD).then_some(self.owner_fd),
            ts_ns: self.origin_ts_ns,
            stack_id: (self.origin_stack != NO_STACK).then_some(self.origin_stack),
        })
    }

    /// The closer's thread id is not kept (nothing reports it).
    fn closer(&self, comms: &CommTable) -> Option<crate::engine::decode::Task> {
        self.has(HAS_CLOSER).then(|| crate::engine::decode::Task {
            pid: self.closer_pid,
            tid: self.closer_pid,
            comm: comms.name(self.closer_comm),
        })
    }

    fn set_owner(&mut self, owner: Option<&Owner>, comms: &mut CommTable) {
        self.set(HAS_OWNER, owner.is_some());
        if let Some(o) = owner {
            self.owner_pid = o.pid;
            self.owner_fd = o.fd.unwrap_or(NO_FD);
            self.owner_comm = comms.intern(&o.comm);
        }
    }

    /// Keeps `origin`'s own fields; its process, name and fd are the owner's.
    fn set_origin(&mut self, origin: Option<&Origin>) {
        self.set(HAS_ORIGIN, origin.is_some());
        if let Some(o) = origin {
            self.set(ORIGIN_ACCEPT, o.syscall == Syscall::Accept);
            self.origin_tid = o.tid;
            self.origin_ts_ns = o.ts_ns;
            self.origin_stack = o.stack_id.unwrap_or(NO_STACK);
        }
    }

    fn set_closer(&mut self, closer: Option<&crate::engine::decode::Task>, comms: &mut CommTable) {
        self.set(HAS_CLOSER, closer.is_some());
        if let Some(c) = closer {
            self.closer_pid = c.pid;
            self.closer_comm = comms.intern(&c.comm);
        }
    }
}

/// An interned command name.
type CommId = u32;

/// Most distinct command names kept; past that, new ones read as `?`
/// (a process that renames itself endlessly cannot grow the table).
const MAX_COMMS: usize = 1 << 16;

/// Command names by id: a socket keeps 4 bytes instead of a `String`.
#[derive(Debug)]
struct CommTable {
    ids: FastMap<Box<str>, CommId>,
    names: Vec<Box<str>>,
}

impl Default for CommTable {
    fn default() -> Self {
        Self {
            ids: FastMap::default(),
            // Id 0: the name of every comm past MAX_COMMS.
            names: vec!["?".into()],
        }
    }
}

impl CommTable {
    fn intern(&mut self, comm: &str) -> CommId {
        if let Some(id) = self.ids.get(comm) {
            return *id;
        }
        if self.names.len() >= MAX_COMMS {
            return 0;
        }
        let id = self.names.len() as CommId;
        self.names.push(comm.into());
        self.ids.insert(comm.into(), id);
        id
    }

    fn name(&self, id: CommId) -> String {
        self.names
            .get(id as usize)
            .map_or_else(|| "?".to_string(), |n| n.to_string())
    }
}

/// Default number of sockets tracked at once: about 130 MiB when full.
pub const DEFAULT_CAPACITY: usize = 1 << 20;

/// Tracks every live TCP socket seen by the kernel program.
#[derive(Debug)]
pub struct Tracker {
    sockets: FastMap<u64, Entry>,
    comms: CommTable,
    capacity: usize,
    evicted: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

fn starts_new_life(change: &StateChange) -> bool {
    change.old == TcpState::Close
        || (change.new == TcpState::SynRecv
            && matches!(change.old, TcpState::Listen | TcpState::NewSynRecv))
}

/// CLOSE->SYN_SENT runs inside connect() (or a fast-open sendmsg) and
/// CLOSE->LISTEN inside listen(): the context task is the owner.
fn origin_from_context(change: &StateChange) -> Option<Origin> {
    (change.old == TcpState::Close && change.new == TcpState::SynSent).then(|| Origin {
        syscall: Syscall::Connect,
        pid: change.ctx.pid,
        tid: change.ctx.tid,
        comm: change.ctx.comm.clone(),
        fd: change.connect_fd,
        ts_ns: change.ts_ns,
        stack_id: change.stack_id,
    })
}

impl Origin {
    /// An origin the kernel kept in its `ORIGINS` table, made by a thread
    /// named `comm`; `None` for a record of unknown kind.
    pub fn from_kernel(rec: &tcptrace_common::OriginSlot, comm: String) -> Option<Self> {
        let syscall = match rec.syscall {
            tcptrace_common::ORIGIN_CONNECT => Syscall::Connect,
            tcptrace_common::ORIGIN_ACCEPT => Syscall::Accept,
            _ => return None,
        };
        Some(Self {
            syscall,
            pid: rec.tgid,
            tid: rec.tid,
            comm,
            fd: (rec.fd >= 0).then_some(rec.fd),
            ts_ns: rec.ts_ns,
            stack_id: u32::try_from(rec.stack_id).ok(),
        })
    }

    /// The owner this origin implies: the caller's process and fd.
    pub fn owner(&self) -> Owner {
        Owner {
            pid: self.pid,
            fd: self.fd,
            comm: self.comm.clone(),
        }
    }
}

fn owner_from_context(change: &StateChange) -> Option<Owner> {
    let in_owner_syscall =
        change.old == TcpState::Close && matches!(change.new, TcpState::SynSent | TcpState::Listen);
    in_owner_syscall.then(|| Owner {
        pid: change.ctx.pid,
        fd: change.connect_fd,
        comm: change.ctx.comm.clone(),
    })
}

impl Tracker {
    /// A tracker holding at most `capacity` sockets (at least 1); past that
    /// the least recently active eighth is forgotten.
    pub fn new(capacity: usize) -> Self {
        Self {
            sockets: FastMap::default(),
            comms: CommTable::default(),
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Number of sockets tracked now.
    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    /// True when no socket is tracked.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Sockets forgotten because the tracker was full.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Applies a transition and returns it with its duration and owner.
    pub fn on_state(&mut self, change: StateChange) -> Transition {
        let ts = change.ts_ns;
        let new_life = starts_new_life(&change);
        if new_life {
            // Whatever was known under this address belonged to a freed socket.
            self.sockets.remove(&change.sk);
        }
        let prev = self.sockets.get(&change.sk).copied();
        let comms = &self.comms;
        let prev_state_ms = prev
            .and_then(|e| e.state.map(|s| (s, e.since_ns)))
            .and_then(|(state, since)| {
                (state == change.old && ts >= since).then(|| (ts - since) as f64 / 1e6)
            });
        let ctx_owner = owner_from_context(&change);
        let ctx_origin = origin_from_context(&change);
        let ctx_closer = (change.new == TcpState::FinWait1).then(|| change.ctx.clone());
        let owner = ctx_owner
            .clone()
            .or_else(|| prev.and_then(|e| e.owner(comms)));
        let origin = ctx_origin
            .clone()
            .or_else(|| prev.and_then(|e| e.origin(comms)));
        let ino = change
            .ino
            .or_else(|| prev.and_then(|e| (e.ino != 0).then_some(e.ino)));
        let closer = ctx_closer
            .clone()
            .or_else(|| prev.and_then(|e| e.closer(comms)));
        let reset = prev.is_some_and(|e| e.has(RESET));

        if change.new == TcpState::Close {
            self.sockets.remove(&change.sk);
        } else {
            self.make_room(change.sk);
            // What the previous entry knew carries over as is (its names
            // already interned); only what this transition brings is set.
            let mut entry = prev.unwrap_or_else(|| Entry::new(ts));
            entry.since_ns = ts;
            entry.state = Some(change.new);
            if ctx_owner.is_some() {
                entry.set_owner(ctx_owner.as_ref(), &mut self.comms);
            }
            if ctx_origin.is_some() {
                entry.set_origin(ctx_origin.as_ref());
            }
            entry.ino = ino.unwrap_or(0);
            if ctx_closer.is_some() {
                entry.set_closer(ctx_closer.as_ref(), &mut self.comms);
            }
            entry.set(RESET, reset);
            self.sockets.insert(change.sk, entry);
        }
        Transition {
            change,
            prev_state_ms,
            owner,
            origin,
            ino,
            closer,
            reset,
        }
    }

    /// Forgets socket `sk` (its end will not be sent).
    pub fn forget(&mut self, sk: u64) {
        self.sockets.remove(&sk);
    }

    /// Notes a RST on socket `sk`: its coming CLOSE is an abort.
    pub fn on_reset(&mut self, reset: &crate::engine::decode::Reset) {
        if let Some(e) = self.sockets.get_mut(&reset.sk) {
            e.set(RESET, true);
        }
    }

    /// What is known about socket `sk`.
    pub fn known(&self, sk: u64) -> Option<Known> {
        self.sockets.get(&sk).map(|e| Known {
            owner: e.owner(&self.comms),
            origin: e.origin(&self.comms),
            ino: (e.ino != 0).then_some(e.ino),
        })
    }

    /// Records the owner of an accepted socket.
    pub fn on_accept(&mut self, accept: &Accept) {
        self.make_room(accept.sk);
        let mut entry = self
            .sockets
            .get(&accept.sk)
            .copied()
            .unwrap_or_else(|| Entry::new(accept.ts_ns));
        let owner = Owner {
            pid: accept.task.pid,
            fd: Some(accept.fd),
            comm: accept.task.comm.clone(),
        };
        entry.set_owner(Some(&owner), &mut self.comms);
        entry.set_origin(Some(&Origin {
            syscall: Syscall::Accept,
            pid: accept.task.pid,
            tid: accept.task.tid,
            comm: String::new(),
            fd: Some(accept.fd),
            ts_ns: accept.ts_ns,
            stack_id: accept.stack_id,
        }));
        if let Some(ino) = accept.ino {
            entry.ino = ino;
        }
        self.sockets.insert(accept.sk, entry);
    }

    /// Evicts the least recently touched eighth when full and `sk` is new.
    fn make_room(&mut self, sk: u64) {
        if self.sockets.len() < self.capacity || self.sockets.contains_key(&sk) {
            return;
        }
        let mut ages: Vec<(u64, u64)> = self
            .sockets
            .iter()
            .map(|(sk, e)| (e.since_ns, *sk))
            .collect();
        let n = (self.capacity / 8).max(1);
        ages.select_nth_unstable(n - 1);
        for (_, sk) in &ages[..n] {
            self.sockets.remove(sk);
        }
        self.evicted += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{Family, Task};
    use std::net::{IpAddr, Ipv4Addr};
    use TcpState::*;

    fn change(sk: u64, ts_ms: u64, old: TcpState, new: TcpState, ctx_pid: u32) -> StateChange {
        StateChange {
            ts_ns: ts_ms * 1_000_000,
            sk,
            netns: Some(1),
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 40000,
            raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            rport: 5000,
            old,
            new,
            ctx: Task {
                pid: ctx_pid,
                tid: ctx_pid,
                comm: format!("p{ctx_pid}"),
            },
            connect_fd: None,
            stack_id: None,
            ino: None,
        }
    }

    fn accept(sk: u64, ts_ms: u64, pid: u32, fd: i32) -> Accept {
        Accept {
            ts_ns: ts_ms * 1_000_000,
            sk,
            fd,
            task: Task {
                pid,
                tid: pid,
                comm: "server".into(),
            },
            stack_id: None,
            ino: None,
        }
    }

    #[test]
    fn client_life_has_durations_and_an_owner_from_connect() {
        let mut t = Tracker::default();
        let mut first = change(1, 10, Close, SynSent, 7);
        first.connect_fd = Some(3);
        first.stack_id = Some(11);
        first.ino = Some(777);
        let tr = t.on_state(first);
        assert_eq!(tr.prev_state_ms, None);
        assert_eq!(
            tr.owner,
            Some(Owner {
                pid: 7,
                fd: Some(3),
                comm: "p7".into()
            })
        );
        // Softirq transitions run in other tasks: the owner stays pid 7.
        let tr = t.on_state(change(1, 12, SynSent, Established, 0));
        assert_eq!(tr.prev_state_ms, Some(2.0));
        assert_eq!(tr.owner.as_ref().map(|o| o.pid), Some(7));
        t.on_state(change(1, 112, Established, FinWait1, 7));
        t.on_state(change(1, 113, FinWait1, FinWait2, 9));
        let tr = t.on_state(change(1, 120, FinWait2, Close, 9));
        assert_eq!(tr.prev_state_ms, Some(7.0));
        let origin = tr.origin.clone().expect("origin from connect");
        assert_eq!(
            (origin.syscall, origin.pid, origin.stack_id),
            (Syscall::Connect, 7, Some(11))
        );
        assert_eq!(tr.ino, Some(777));
        assert_eq!(tr.owner.map(|o| o.pid), Some(7));
        assert!(t.is_empty(), "CLOSE ends the socket's life");
    }

    #[test]
    fn accepted_socket_gets_its_owner_from_accept() {
        let mut t = Tracker::default();
        let tr = t.on_state(change(2, 0, Listen, SynRecv, 99));
        assert_eq!(tr.owner, None, "a softirq context task is not the owner");
        t.on_state(change(2, 1, SynRecv, Established, 99));
        t.on_accept(&accept(2, 2, 50, 4));
        let tr = t.on_state(change(2, 5, Established, CloseWait, 99));
        assert_eq!(
            tr.owner.as_ref().map(|o| (o.pid, o.fd)),
            Some((50, Some(4)))
        );
        assert_eq!(tr.prev_state_ms, Some(4.0));
    }

    #[test]
    fn accept_before_any_transition_keeps_owner_and_unknown_duration() {
        let mut t = Tracker::default();
        t.on_accept(&accept(3, 2, 50, 4));
        let tr = t.on_state(change(3, 5, Established, CloseWait, 99));
        assert_eq!(tr.prev_state_ms, None);
        assert_eq!(tr.owner.map(|o| o.pid), Some(50));
    }

    #[test]
    fn out_of_order_states_give_unknown_duration_not_a_wrong_one() {
        let mut t = Tracker::default();
        t.on_state(change(4, 0, Close, SynSent, 7));
        // SYN_SENT -> ESTABLISHED was lost.
        let tr = t.on_state(change(4, 50, Established, FinWait1, 7));
        assert_eq!(tr.prev_state_ms, None);
        assert_eq!(tr.owner.map(|o| o.pid), Some(7), "owner survives a gap");
        // Then the tracker continues from the reported state.
        let tr = t.on_state(change(4, 60, FinWait1, FinWait2, 0));
        assert_eq!(tr.prev_state_ms, Some(10.0));
    }

    #[test]
    fn time_going_backwards_gives_unknown_duration() {
        let mut t = Tracker::default();
        t.on_state(change(5, 100, Close, SynSent, 7));
        let tr = t.on_state(change(5, 90, SynSent, Established, 0));
        assert_eq!(tr.prev_state_ms, None);
    }

    #[test]
    fn reused_socket_address_starts_a_fresh_life() {
        let mut t = Tracker::default();
        t.on_state(change(6, 0, Close, SynSent, 7));
        t.on_state(change(6, 1, SynSent, Established, 7));
        // The CLOSE of the first socket was lost; the address is reused by
        // a listener's child owned by nobody we know yet.
        let tr = t.on_state(change(6, 500, Listen, SynRecv, 99));
        assert_eq!(
            tr.owner, None,
            "the old owner must not leak to the new socket"
        );
        assert_eq!(tr.prev_state_ms, None);
        // And reused by a new client.
        let tr = t.on_state(change(6, 600, Close, SynSent, 8));
        assert_eq!(tr.owner.map(|o| o.pid), Some(8));
    }

    #[test]
    fn reconnect_after_failed_connect_relearns_owner() {
        let mut t = Tracker::default();
        t.on_state(change(7, 0, Close, SynSent, 7));
        let tr = t.on_state(change(7, 1000, SynSent, Close, 0));
        assert_eq!(tr.prev_state_ms, Some(1000.0));
        let tr = t.on_state(change(7, 1001, Close, SynSent, 7));
        assert_eq!(tr.prev_state_ms, None);
        assert_eq!(tr.owner.map(|o| o.pid), Some(7));
    }

    #[test]
    fn active_close_enters_time_wait_with_its_closer() {
        let mut t = Tracker::default();
        t.on_state(change(8, 0, Close, SynSent, 7));
        t.on_state(change(8, 1, SynSent, Established, 0));
        t.on_state(change(8, 2, Established, FinWait1, 7));
        t.on_state(change(8, 3, FinWait1, FinWait2, 0));
        let tr = t.on_state(change(8, 4, FinWait2, Close, 9));
        assert!(tr.enters_time_wait());
        assert_eq!(tr.closer.map(|c| c.pid), Some(7));
    }

    #[test]
    fn reset_close_is_an_abort_not_time_wait() {
        let mut t = Tracker::default();
        t.on_state(change(9, 0, Close, SynSent, 7));
        t.on_state(change(9, 1, SynSent, Established, 0));
        t.on_state(change(9, 2, Established, FinWait1, 7));
        t.on_reset(&crate::engine::decode::Reset {
            ts_ns: 3_000_000,
            sk: 9,
            sent: false,
        });
        let tr = t.on_state(change(9, 4, FinWait1, Close, 0));
        assert!(!tr.enters_time_wait());
        // A new life under the address forgets the RST.
        t.on_state(change(9, 5, Close, SynSent, 7));
        t.on_state(change(9, 6, SynSent, Established, 0));
        t.on_state(change(9, 7, Established, FinWait1, 7));
        let tr = t.on_state(change(9, 8, FinWait1, Close, 0));
        assert!(tr.enters_time_wait());
    }

    #[test]
    fn passive_close_never_enters_time_wait() {
        let mut t = Tracker::default();
        t.on_state(change(10, 0, Established, CloseWait, 1));
        t.on_state(change(10, 1, CloseWait, LastAck, 2));
        let tr = t.on_state(change(10, 2, LastAck, Close, 1));
        assert!(!tr.enters_time_wait());
        assert_eq!(tr.closer, None);
    }

    #[test]
    fn capacity_is_bounded() {
        let mut t = Tracker::new(16);
        for sk in 0..100 {
            t.on_state(change(sk, sk, Close, SynSent, 7));
            assert!(t.len() <= 16);
        }
        assert!(t.evicted() >= 84);
        // The most recent sockets survive.
        let tr = t.on_state(change(99, 200, SynSent, Established, 0));
        assert!(tr.prev_state_ms.is_some());
    }

    #[test]
    fn an_entry_is_56_bytes() {
        // 1 000 000 sockets in a table of 2^21 slots of (key, entry, control
        // byte): 2^21 * 65 bytes = 130 MiB.
        assert_eq!(std::mem::size_of::<Entry>(), 56);
    }

    #[test]
    fn command_names_are_interned_and_bounded() {
        let mut t = CommTable::default();
        let a = t.intern("orders-svc");
        assert_eq!(t.intern("orders-svc"), a);
        assert_eq!(t.name(a), "orders-svc");
        for i in 0..MAX_COMMS + 10 {
            t.intern(&format!("renamed-{i}"));
        }
        assert_eq!(t.names.len(), MAX_COMMS, "capped");
        let late = t.intern("one more");
        assert_eq!(t.name(late), "?");
        assert_eq!(t.name(a), "orders-svc", "earlier names stay");
    }
}
