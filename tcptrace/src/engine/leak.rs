//! A CLOSE_WAIT leak with everything an operator needs to fix it: who holds
//! the socket now, why it leaks, and the code path that opened it.
//!
//! Pure: [`classify`], [`summary`], [`group_key`] and [`fill_origins`] work
//! on values; [`crate::host::enrich`] reads /proc, sock_diag and the
//! kernel's stack map to build a [`Leak`].

use crate::engine::closewait::LeakCandidate;
use crate::engine::frame::{application_frame, application_position, Frame};
use crate::engine::groups::GroupKey;
use crate::engine::identity::Identity;
use crate::engine::lastuse::LastUse;
use crate::engine::tracker::Syscall;

/// A process holding an fd for a socket, as /proc shows it
/// ([`crate::host::procfs::holders`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// The fd.
    pub fd: i32,
    /// Executable path (`/proc/PID/exe`), when readable.
    pub exe: Option<String>,
    /// cgroup path (v2 unified path, else the first v1 hierarchy), which
    /// names the container or systemd unit.
    pub cgroup: Option<String>,
    /// What the cgroup says: unit, container, pod (names filled in by
    /// [`crate::host::names`]).
    #[serde(flatten)]
    pub identity: Identity,
}

/// Why a socket stays in CLOSE_WAIT, from its receive queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Recv-Q is 0: the program read the EOF (a read returned 0) and never
    /// closed the socket: a `close()` forgotten on some path.
    ReadEofNeverClosed,
    /// Recv-Q is 1: only the peer's FIN waits (it takes one sequence
    /// number; unread data would come before it): the program has not
    /// touched the socket since the peer closed it. A connection forgotten
    /// (never closed, never given back to its pool) or idle in a pool; the
    /// last use tells which.
    UnreadEof,
    /// Recv-Q > 1: the program stopped reading the socket with data
    /// unread: a stuck or dead worker.
    StoppedReading,
    /// No holder could be read (the process exited or hid its fds).
    Unknown,
}

impl Reason {
    /// Stable name for the JSON `reason` field.
    pub fn name(self) -> &'static str {
        match self {
            Self::ReadEofNeverClosed => "read_eof_never_closed",
            Self::UnreadEof => "unread_eof",
            Self::StoppedReading => "stopped_reading",
            Self::Unknown => "unknown",
        }
    }

    /// One sentence for people.
    pub fn explain(self) -> &'static str {
        match self {
            Self::ReadEofNeverClosed => {
                "the program read the EOF and never called close(): look for a return path that skips close()"
            }
            Self::UnreadEof => {
                "the program has not touched the socket since the peer closed it: a connection \
                 forgotten (never closed, never given back to its pool) or idle in a pool; its \
                 last use says which code had it"
            }
            Self::StoppedReading => {
                "the program stopped reading this socket with data unread: a stuck or dead worker"
            }
            Self::Unknown => "the holder could not be inspected",
        }
    }
}

/// Classifies from the receive queue (`None`: unknown).
pub fn classify(recv_q: Option<u64>) -> Reason {
    match recv_q {
        Some(0) => Reason::ReadEofNeverClosed,
        Some(1) => Reason::UnreadEof,
        Some(_) => Reason::StoppedReading,
        None => Reason::Unknown,
    }
}

/// A leak, enriched.
#[derive(Clone, Debug, PartialEq)]
pub struct Leak {
    /// What the detector knew.
    pub candidate: LeakCandidate,
    /// Every process holding an fd for the socket now.
    pub owners: Vec<Holder>,
    /// Receive queue, from sock_diag (a holder's view of /proc/net/tcp
    /// when the dump has not the socket).
    pub recv_q: Option<u64>,
    /// Why it leaks.
    pub reason: Reason,
    /// The origin's user stack, symbolized (empty when unknown).
    pub stack: Vec<Frame>,
    /// The socket's last use, when the kernel kept one (see
    /// [`crate::engine::lastuse`]).
    pub last_use: Option<LastUse>,
    /// The last use's checkout stack, symbolized (empty when unknown).
    pub last_use_stack: Vec<Frame>,
}

impl Leak {
    /// Milliseconds from the last use's checkout to the peer's FIN (the
    /// entry into CLOSE_WAIT); negative when it came after.
    pub fn last_use_before_fin_ms(&self) -> Option<f64> {
        let u = self.last_use.as_ref()?;
        Some(LastUse::before_ms(
            u.checkout_ns,
            self.candidate.entered.change.ts_ns,
        ))
    }
}

fn secs(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

/// The story's one line: who, which connection, how long, which fd, and
/// the code that opened it.
pub fn summary(leak: &Leak) -> String {
    let t = &leak.candidate.entered;
    let c = &t.change;
    let endpoint = |a: &std::net::IpAddr, p: u16| match a {
        std::net::IpAddr::V4(a) => format!("{a}:{p}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{p}"),
    };
    let (who, on_fd) = match leak.owners.split_first() {
        Some((h, others)) => {
            let mut fd = format!(" on fd {}", h.fd);
            for o in others {
                fd += &format!(", pid {} ({}) fd {}", o.pid, o.comm, o.fd);
            }
            let within = h
                .identity
                .describe()
                .map(|d| format!(" in {d}"))
                .unwrap_or_default();
            (format!("pid {} ({}){within} has held", h.pid, h.comm), fd)
        }
        None => match &t.owner {
            Some(o) => (format!("pid {} ({}) held", o.pid, o.comm), String::new()),
            None => ("an unknown process holds".to_string(), String::new()),
        },
    };
    let mut line = format!(
        "{who} {} -> {} in CLOSE_WAIT for {}{}{on_fd}",
        endpoint(&c.laddr, c.lport),
        endpoint(&c.raddr, c.rport),
        if leak.candidate.estimated {
            "about "
        } else {
            ""
        },
        secs(leak.candidate.close_wait_ms)
    );
    let frames = short_stack(&leak.stack);
    if let (Some(u), Some(used_by)) = (&leak.last_use, application_frame(&leak.last_use_stack)) {
        // The code that used the socket last comes first: in a pool, the
        // code that opened it is not the code that forgot it.
        line += &format!("; last used by {}", used_by.display_short());
        if let Some(opened_by) = application_frame(&leak.stack) {
            line += &format!(", opened by {}", opened_by.display_short());
        }
        let before = leak.last_use_before_fin_ms().unwrap_or(0.0);
        line += &format!(
            "; last use: {} by pid {} tid {} ({}), {} {} the peer's FIN, at {}",
            u.syscall
                .map_or_else(|| format!("a {}", u.direction.name()), |s| format!("{s}()")),
            u.pid,
            u.tid,
            u.comm,
            secs(before.abs()),
            if before >= 0.0 { "before" } else { "after" },
            short_stack(&leak.last_use_stack).join(" <- ")
        );
    } else if let Some(u) = &leak.last_use {
        line += &format!(
            "; last used by pid {} tid {} ({}), no stack (past --stacks-per-second, or no frame \
             pointers)",
            u.pid, u.tid, u.comm
        );
    }
    match &t.origin {
        Some(o) if !frames.is_empty() => {
            line += &format!(
                "; the connection was opened by {}() at {}",
                o.syscall.name(),
                frames.join(" <- ")
            );
        }
        Some(o) => line += &format!("; opened by {}() in pid {}", o.syscall.name(), o.pid),
        None => {
            line += "; origin unknown (opened before the agent started, or while its process \
                     was past --stacks-per-second)"
        }
    }
    line += &format!("; {}", leak.reason.explain());
    line
}

/// Four named frames of a stack for one line: from its innermost
/// application frame on (a Go stack's runtime and syscall frames, libc's
/// wrapper, tell a reader nothing), else from the top.
fn short_stack(stack: &[Frame]) -> Vec<String> {
    let from = application_position(stack).unwrap_or(0);
    stack[from..]
        .iter()
        .filter(|f| f.function.is_some())
        .take(4)
        .map(Frame::display)
        .collect()
}

/// The group a leak belongs to: owner process, remote endpoint, last-use
/// stack, origin stack.
pub fn group_key(leak: &Leak) -> GroupKey {
    let t = &leak.candidate.entered;
    let (pid, comm) = match (leak.owners.first(), &t.owner, &t.origin) {
        (Some(h), _, _) => (h.pid, h.comm.clone()),
        (None, Some(o), _) => (o.pid, o.comm.clone()),
        (None, None, Some(o)) => (o.pid, o.comm.clone()),
        (None, None, None) => (0, String::new()),
    };
    let side = t.origin.as_ref().map(|o| o.syscall);
    let (service_addr, service_port) = match side {
        Some(Syscall::Accept) => (t.change.laddr, t.change.lport),
        _ => (t.change.raddr, t.change.rport),
    };
    GroupKey {
        pid,
        comm,
        side,
        service_addr,
        service_port,
        netns: t.change.netns,
        stack_id: t.origin.as_ref().and_then(|o| o.stack_id),
        last_use_stack_id: leak.last_use.as_ref().and_then(|u| u.stack_id),
        last_use_thread: leak
            .last_use
            .as_ref()
            .filter(|_| application_position(&leak.last_use_stack).is_none())
            .map(|u| u.comm.clone()),
    }
}

/// Gives candidates the kernel kept an origin for (the `ORIGINS` table, see
/// [`crate::engine::events::uses_origin_map`]) that origin, and its caller as
/// owner until /proc says who holds the socket now. `origin_of` looks a
/// socket address up; `comm_of` names a (tgid, tid) caller (the kernel
/// keeps no names). The kernel removes an origin when its socket closes,
/// so the entry belongs to the socket still in CLOSE_WAIT there; as a check,
/// a connect() must precede the CLOSE_WAIT (an accept() may follow it: the
/// peer can hang up while the connection waits in the accept queue).
pub fn fill_origins(
    candidates: &mut [LeakCandidate],
    origin_of: impl Fn(u64) -> Option<tcptrace_common::OriginSlot>,
    comm_of: impl Fn(u32, u32) -> String,
) {
    for c in candidates
        .iter_mut()
        .filter(|c| c.entered.origin.is_none() && !c.estimated)
    {
        let entered_ns = c.entered.change.ts_ns;
        let Some(origin) = origin_of(c.entered.change.sk)
            .and_then(|rec| {
                crate::engine::tracker::Origin::from_kernel(&rec, comm_of(rec.tgid, rec.tid))
            })
            .filter(|o| o.syscall == Syscall::Accept || o.ts_ns <= entered_ns)
        else {
            continue;
        };
        if c.entered.owner.is_none() {
            c.entered.owner = Some(origin.owner());
        }
        c.entered.origin = Some(origin);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::decode::{Family, StateChange, Task};
    use crate::engine::state::TcpState;
    use crate::engine::tracker::{Origin, Owner, Transition};

    /// A leak of pid 4242 (orders-svc) to 10.0.0.3:3306, for tests.
    pub(crate) fn leak(owners: Vec<Holder>, stack: Vec<Frame>, origin: bool) -> Leak {
        let change = StateChange {
            ts_ns: 0,
            sk: 1,
            netns: Some(1),
            family: Family::Ipv4,
            laddr: "127.0.0.1".parse().expect("ip"),
            lport: 45346,
            raddr: "10.0.0.3".parse().expect("ip"),
            rport: 3306,
            old: TcpState::Established,
            new: TcpState::CloseWait,
            ctx: Task {
                pid: 1,
                tid: 1,
                comm: "x".into(),
            },
            connect_fd: None,
            stack_id: None,
            ino: Some(5),
        };
        Leak {
            candidate: LeakCandidate {
                entered: Transition {
                    change,
                    prev_state_ms: None,
                    owner: Some(Owner {
                        pid: 4242,
                        fd: Some(7),
                        comm: "orders-svc".into(),
                    }),
                    origin: origin.then(|| Origin {
                        syscall: Syscall::Connect,
                        pid: 4242,
                        tid: 4242,
                        comm: "orders-svc".into(),
                        fd: Some(7),
                        ts_ns: 0,
                        stack_id: Some(1),
                    }),
                    ino: Some(5),
                    closer: None,
                    reset: false,
                },
                close_wait_ms: 61_000.0,
                estimated: false,
            },
            owners,
            recv_q: Some(0),
            reason: Reason::ReadEofNeverClosed,
            stack,
            last_use: None,
            last_use_stack: Vec::new(),
        }
    }

    #[test]
    fn classification() {
        assert_eq!(classify(Some(0)), Reason::ReadEofNeverClosed);
        assert_eq!(classify(Some(1)), Reason::UnreadEof);
        assert_eq!(classify(Some(2)), Reason::StoppedReading);
        assert_eq!(classify(None), Reason::Unknown);
    }

    #[test]
    fn summary_tells_the_story() {
        let holder = Holder {
            pid: 4242,
            comm: "orders-svc".into(),
            fd: 7,
            exe: None,
            cgroup: None,
            identity: Identity::default(),
        };
        let frame = |f: &str, file: &str, line: u32| Frame {
            addr: 0x1000,
            function: Some(f.into()),
            offset: Some(0x1f),
            file: Some(file.into()),
            line: Some(line),
            module: None,
            jit: false,
            inlined: Vec::new(),
        };
        let l = leak(
            vec![holder],
            vec![
                frame("main.update", "main.go", 22),
                frame("main.main", "main.go", 40),
            ],
            true,
        );
        let s = summary(&l);
        assert!(
            s.starts_with("pid 4242 (orders-svc) has held 127.0.0.1:45346 -> 10.0.0.3:3306 in CLOSE_WAIT for 61 s on fd 7; the connection was opened by connect() at main.update"),
            "{s}"
        );
        assert!(s.contains("main.go:22"), "{s}");
        assert!(s.contains("<- main.main"), "{s}");
        assert!(s.contains("close()"), "{s}");
    }

    #[test]
    fn summary_names_the_last_use_first() {
        let frame = |f: &str, file: &str, line: u32, module: &str| Frame {
            addr: 0x1000,
            function: Some(f.into()),
            offset: Some(0x1f),
            file: Some(file.into()),
            line: Some(line),
            module: Some(module.into()),
            jit: false,
            inlined: Vec::new(),
        };
        let mut l = leak(
            Vec::new(),
            vec![
                frame("__libc_connect", "connect.c", 26, "/lib/libc.so.6"),
                frame("main.initDB", "/srv/main.go", 30, "/srv/svc"),
            ],
            true,
        );
        l.candidate.entered.change.ts_ns = 3_000_000_000;
        l.last_use = Some(LastUse {
            direction: crate::engine::lastuse::Direction::Recv,
            syscall: Some("read"),
            pid: 4242,
            tid: 4250,
            comm: "orders-svc".into(),
            checkout_ns: 1_000_000_000,
            last_io_ns: 1_000_100_000,
            last_direction: crate::engine::lastuse::Direction::Send,
            checkouts: 1,
            ios: 4,
            stack_id: Some(2),
        });
        l.last_use_stack = vec![
            frame(
                "internal/poll.(*FD).Read",
                "/usr/lib/go-1.19/src/internal/poll/fd_unix.go",
                167,
                "/srv/svc",
            ),
            frame("main.update", "/srv/main.go", 54, "/srv/svc"),
            frame("main.main", "/srv/main.go", 70, "/srv/svc"),
        ];
        let s = summary(&l);
        assert!(
            s.contains("; last used by main.update (main.go:54), opened by main.initDB (main.go:30); last use: read() by pid 4242 tid 4250 (orders-svc), 2.0 s before the peer's FIN, at main.update+0x1f (main.go:54) <- main.main+0x1f (main.go:70); the connection was opened by connect() at main.initDB+0x1f (main.go:30);"),
            "{s}"
        );
        assert_eq!(l.last_use_before_fin_ms(), Some(2000.0));
        // Without a walked stack, the thread still says who.
        l.last_use_stack.clear();
        let s = summary(&l);
        assert!(
            s.contains("; last used by pid 4242 tid 4250 (orders-svc), no stack"),
            "{s}"
        );
    }

    #[test]
    fn origins_from_the_kernel_map_fill_only_what_they_can_vouch_for() {
        let candidate = |sk: u64, ts_ns: u64, estimated: bool| {
            let mut c = leak(Vec::new(), Vec::new(), false).candidate;
            c.entered.change.sk = sk;
            c.entered.change.ts_ns = ts_ns;
            c.entered.owner = None;
            c.estimated = estimated;
            c
        };
        let record = |ts_ns: u64| tcptrace_common::OriginSlot {
            sk: 1,
            syscall: tcptrace_common::ORIGIN_ACCEPT,
            tgid: 77,
            tid: 78,
            fd: 9,
            ts_ns,
            stack_id: 3,
            _pad0: 0,
        };
        let mut cs = vec![
            candidate(1, 1_000, false), // accepted before CLOSE_WAIT: taken
            candidate(2, 1_000, false), // connect() after it: not this socket's
            candidate(3, 1_000, false), // none in the map
            candidate(1, 1_000, true),  // inventory: never looked up
            candidate(4, 1_000, false), // accepted after CLOSE_WAIT: taken
        ];
        let origin_of = |sk| match sk {
            1 => Some(record(500)),
            2 => Some(tcptrace_common::OriginSlot {
                syscall: tcptrace_common::ORIGIN_CONNECT,
                ..record(2_000)
            }),
            4 => Some(record(2_000)),
            _ => None,
        };
        let comm_of = |tgid, tid| match (tgid, tid) {
            (77, 78) => "leaky_server".to_string(),
            _ => String::new(),
        };
        fill_origins(&mut cs, origin_of, comm_of);
        let o = cs[0].entered.origin.as_ref().expect("origin");
        assert_eq!(
            (o.syscall, o.pid, o.tid, o.fd, o.stack_id),
            (Syscall::Accept, 77, 78, Some(9), Some(3))
        );
        assert_eq!(o.comm, "leaky_server");
        assert_eq!(
            cs[0].entered.owner.as_ref().map(|w| (w.pid, w.fd)),
            Some((77, Some(9)))
        );
        assert!(cs[1..4].iter().all(|c| c.entered.origin.is_none()));
        assert!(cs[1..4].iter().all(|c| c.entered.owner.is_none()));
        assert_eq!(cs[4].entered.origin.as_ref().map(|o| o.ts_ns), Some(2_000));
    }

    #[test]
    fn summary_without_origin_or_holders_says_so() {
        let s = summary(&leak(Vec::new(), Vec::new(), false));
        assert!(s.starts_with("pid 4242 (orders-svc) held"), "{s}");
        assert!(s.contains("origin unknown"), "{s}");
    }
}
