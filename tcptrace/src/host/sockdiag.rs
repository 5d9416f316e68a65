//! NETLINK_SOCK_DIAG: the kernel's own list of TCP sockets in a state, as
//! `ss` reads it. Used at start-up to find sockets that were already in
//! CLOSE_WAIT before the agent ran, in every network namespace, with an age
//! estimate from `tcpi_last_data_recv` (the peer's FIN is the last data
//! received).
//!
//! The message layouts are the stable uapi of `linux/inet_diag.h`; the
//! builder and parser are pure and tested on synthetic bytes.
//!
//! Why by hand, not a netlink crate: one request and one reply layout are
//! all the agent uses, the parser reads bytes from the kernel of other
//! namespaces as root and is fuzzed whole (target `sockdiag`), and the
//! socket comes from the namespace helper, which a crate's own socket
//! handling would not take.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `NLMSG_ERROR`.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST | NLM_F_DUMP`.
const DUMP_FLAGS: u16 = 0x1 | 0x300;
/// `INET_DIAG_INFO`: the attribute carrying `struct tcp_info`.
const INET_DIAG_INFO: u16 = 2;
/// Offset of `tcpi_last_data_recv` in `struct tcp_info`.
const TCPI_LAST_DATA_RECV: usize = 52;
/// Size of `struct inet_diag_msg`.
const DIAG_MSG_LEN: usize = 72;
/// Size of `struct nlmsghdr`.
const NLMSG_HDR_LEN: usize = 16;
/// Kernel state number of CLOSE_WAIT.
pub const TCP_CLOSE_WAIT: u8 = 8;
/// Kernel state number of TIME_WAIT.
pub const TCP_TIME_WAIT: u8 = 6;
/// Kernel state number of FIN_WAIT2.
pub const TCP_FIN_WAIT2: u8 = 5;
/// `idiag_timer` of a time-wait bucket (`inet_twsk_diag_fill`).
const TIMER_TIME_WAIT: u8 = 3;

/// One socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiagSocket {
    /// Kernel TCP state number; for a time-wait bucket, its substate
    /// (FIN_WAIT2 until the peer's FIN arrives, then TIME_WAIT).
    pub state: u8,
    /// Which timer is pending (`idiag_timer`; 3 only for time-wait buckets).
    pub timer: u8,
    /// Local address.
    pub laddr: IpAddr,
    /// Local port.
    pub lport: u16,
    /// Remote address.
    pub raddr: IpAddr,
    /// Remote port.
    pub rport: u16,
    /// Bytes (and FIN) received, not read.
    pub rqueue: u32,
    /// Socket inode (0 for orphans).
    pub inode: u32,
    /// Milliseconds since data (or the FIN) was last received.
    pub last_data_recv_ms: Option<u32>,
    /// Milliseconds until the socket's timer fires; for a TIME_WAIT socket,
    /// until it disappears.
    pub expires_ms: u32,
}

impl DiagSocket {
    /// A closed connection holding its local port for TIME_WAIT: the kernel
    /// turns the socket into a time-wait bucket as soon as the application
    /// closes it in FIN_WAIT2, and reports the bucket's substate, so a
    /// dump asking for TIME_WAIT alone misses the ones whose peer has not
    /// closed yet.
    pub fn is_time_wait_bucket(&self) -> bool {
        self.state == TCP_TIME_WAIT || self.timer == TIMER_TIME_WAIT
    }
}

/// The dump request for `family` (AF_INET or AF_INET6) and the states in
/// the bit mask `states` (bit N = state N), asking for `tcp_info`.
pub fn build_request(family: u8, states: u32, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + 56;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&DUMP_FLAGS.to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2
    b.push(family);
    b.push(libc::IPPROTO_TCP as u8);
    b.push(1 << (INET_DIAG_INFO - 1));
    b.push(0);
    b.extend_from_slice(&states.to_ne_bytes());
    b.extend_from_slice(&[0u8; 48]); // struct inet_diag_sockid: match all
    b
}

/// Why a dump failed.
#[derive(Debug)]
pub enum DiagError {
    /// The kernel answered with an error.
    Kernel(io::Error),
    /// A message was cut short or malformed.
    Malformed(&'static str),
}

impl std::fmt::Display for DiagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kernel(e) => write!(f, "sock_diag error: {e}"),
            Self::Malformed(what) => write!(f, "malformed sock_diag message: {what}"),
        }
    }
}

impl std::error::Error for DiagError {}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn addr(family: u8, raw: &[u8]) -> Option<IpAddr> {
    Some(if i32::from(family) == libc::AF_INET6 {
        let octets: [u8; 16] = raw.get(..16)?.try_into().ok()?;
        IpAddr::V6(Ipv6Addr::from(octets))
    } else {
        let o: [u8; 4] = raw.get(..4)?.try_into().ok()?;
        IpAddr::V4(Ipv4Addr::from(o))
    })
}

fn parse_diag_msg(payload: &[u8]) -> Option<DiagSocket> {
    let msg = payload.get(..DIAG_MSG_LEN)?;
    let &[family, state, timer, _retrans, ..] = msg else {
        return None;
    };
    // Ports are big endian on the wire.
    let lport = u16::from_be(u16_at(msg, 4)?);
    let rport = u16::from_be(u16_at(msg, 6)?);
    let mut sock = DiagSocket {
        state,
        timer,
        laddr: addr(family, msg.get(8..24)?)?,
        lport,
        raddr: addr(family, msg.get(24..40)?)?,
        rport,
        rqueue: u32_at(payload, 56)?,
        inode: u32_at(payload, 68)?,
        last_data_recv_ms: None,
        expires_ms: u32_at(payload, 52)?,
    };
    // Attributes: struct rtattr { u16 len; u16 type; } + data, 4-aligned.
    let mut at = DIAG_MSG_LEN;
    while let (Some(len), Some(kind)) = (u16_at(payload, at), u16_at(payload, at + 2)) {
        let len = usize::from(len);
        let Some(data) = payload.get(at..at + len).and_then(|attr| attr.get(4..)) else {
            break; // shorter than its header, or past the message
        };
        if kind == INET_DIAG_INFO {
            sock.last_data_recv_ms = u32_at(data, TCPI_LAST_DATA_RECV);
        }
        at += (len + 3) & !3;
    }
    Some(sock)
}

/// Parses one `recv` worth of netlink messages: the sockets, and whether
/// the dump is complete.
pub fn parse_messages(buf: &[u8]) -> Result<(Vec<DiagSocket>, bool), DiagError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDR_LEN <= buf.len() {
        let len = u32_at(buf, at).ok_or(DiagError::Malformed("header"))? as usize;
        let kind = u16_at(buf, at + 4).ok_or(DiagError::Malformed("header"))?;
        if len < NLMSG_HDR_LEN {
            return Err(DiagError::Malformed("message length"));
        }
        let payload = at
            .checked_add(len)
            .and_then(|end| buf.get(at + NLMSG_HDR_LEN..end))
            .ok_or(DiagError::Malformed("message length"))?;
        match kind {
            NLMSG_DONE => return Ok((out, true)),
            NLMSG_ERROR => {
                // A negative errno; 0 acknowledges.
                let error = u32_at(payload, 0).ok_or(DiagError::Malformed("error"))? as i32;
                match error.checked_neg() {
                    Some(0) => {}
                    Some(errno) if errno > 0 => {
                        return Err(DiagError::Kernel(io::Error::from_raw_os_error(errno)))
                    }
                    _ => return Err(DiagError::Malformed("error code")),
                }
            }
            SOCK_DIAG_BY_FAMILY => {
                out.push(parse_diag_msg(payload).ok_or(DiagError::Malformed("inet_diag_msg"))?);
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Ok((out, false))
}

/// A NETLINK_SOCK_DIAG socket: it answers for the network namespace of
/// the thread that makes it.
pub fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Dumps the TCP sockets in the states of mask `states`, both families, in
/// the calling thread's network namespace.
pub fn dump(states: u32) -> io::Result<Vec<DiagSocket>> {
    dump_on(socket()?.as_fd(), states)
}

/// [`dump`] through `fd`, a [`socket`] (made in the namespace to dump).
pub fn dump_on(fd: std::os::fd::BorrowedFd<'_>, states: u32) -> io::Result<Vec<DiagSocket>> {
    let mut all = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        let req = build_request(family, states, seq);
        // SAFETY: valid buffer and length; the kernel is the destination
        // (a zeroed sockaddr_nl is pid 0).
        let sent = unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                fd.as_raw_fd(),
                req.as_ptr().cast(),
                req.len(),
                0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: valid buffer of that length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let (socks, done) = parse_messages(&buf[..n as usize]).map_err(io::Error::other)?;
            all.extend(socks);
            if done || n == 0 {
                break;
            }
        }
    }
    Ok(all)
}

/// A loopback server socket whose client hung up (CLOSE_WAIT), and its
/// port: for tests that dump real sockets.
#[cfg(test)]
pub(crate) fn close_wait_socket() -> (std::net::TcpStream, u16) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client =
        std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    drop(client); // the server's socket goes to CLOSE_WAIT
    let port = server.local_addr().expect("addr").port();
    (server, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diag_msg(state: u8, lport: u16, inode: u32, last_recv: Option<u32>) -> Vec<u8> {
        let mut p = vec![0u8; DIAG_MSG_LEN];
        p[0] = libc::AF_INET as u8;
        p[1] = state;
        p[2] = if inode == 0 { TIMER_TIME_WAIT } else { 0 };
        p[4..6].copy_from_slice(&lport.to_be_bytes());
        p[6..8].copy_from_slice(&3306u16.to_be_bytes());
        p[8..12].copy_from_slice(&[127, 0, 0, 1]);
        p[24..28].copy_from_slice(&[10, 0, 0, 3]);
        p[56..60].copy_from_slice(&1u32.to_ne_bytes());
        p[68..72].copy_from_slice(&inode.to_ne_bytes());
        if let Some(ms) = last_recv {
            let mut info = vec![0u8; 104];
            info[TCPI_LAST_DATA_RECV..TCPI_LAST_DATA_RECV + 4].copy_from_slice(&ms.to_ne_bytes());
            p.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
            p.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
            p.extend_from_slice(&info);
        }
        p
    }

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + payload.len();
        let mut b = Vec::new();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&[0u8; 10]);
        b.extend_from_slice(payload);
        while b.len() % 4 != 0 {
            b.push(0);
        }
        b
    }

    /// The first socket of a real dump of `states` that `wanted` picks,
    /// dumping again for up to 5 s (the kernel moves it moments after the
    /// test's close).
    fn wait_for_socket(states: u32, wanted: impl Fn(&DiagSocket) -> bool) -> DiagSocket {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let socks = dump(states).expect("sock_diag dump (needs no privilege)");
            if let Some(s) = socks.iter().find(|s| wanted(s)) {
                return s.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not found in {socks:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn request_layout() {
        let r = build_request(libc::AF_INET6 as u8, 1 << 8, 7);
        assert_eq!(r.len(), 72);
        assert_eq!(u16_at(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(r[16], libc::AF_INET6 as u8);
        assert_eq!(r[17], 6);
        assert_eq!(u32_at(&r, 20), Some(1 << 8));
    }

    #[test]
    fn parses_sockets_info_and_done() {
        let mut buf = nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(8, 45346, 99, Some(61_000)));
        buf.extend(nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(8, 45347, 100, None)));
        buf.extend(nlmsg(NLMSG_DONE, &[0; 4]));
        let (socks, done) = parse_messages(&buf).expect("valid");
        assert!(done);
        assert_eq!(socks.len(), 2);
        assert_eq!(socks[0].lport, 45346);
        assert_eq!(socks[0].rport, 3306);
        assert_eq!(socks[0].raddr, "10.0.0.3".parse::<IpAddr>().expect("ip"));
        assert_eq!(socks[0].inode, 99);
        assert_eq!(socks[0].rqueue, 1);
        assert_eq!(socks[0].last_data_recv_ms, Some(61_000));
        assert_eq!(socks[1].last_data_recv_ms, None);
        assert!(!socks[0].is_time_wait_bucket());
    }

    #[test]
    fn time_wait_buckets_in_either_substate() {
        let mut buf = nlmsg(
            SOCK_DIAG_BY_FAMILY,
            &diag_msg(TCP_FIN_WAIT2, 40001, 0, None),
        );
        buf.extend(nlmsg(
            SOCK_DIAG_BY_FAMILY,
            &diag_msg(TCP_TIME_WAIT, 40002, 0, None),
        ));
        buf.extend(nlmsg(
            SOCK_DIAG_BY_FAMILY,
            &diag_msg(TCP_FIN_WAIT2, 40003, 7, None),
        ));
        let (socks, _) = parse_messages(&buf).expect("valid");
        let buckets: Vec<u16> = socks
            .iter()
            .filter(|s| s.is_time_wait_bucket())
            .map(|s| s.lport)
            .collect();
        assert_eq!(
            buckets,
            [40001, 40002],
            "an open FIN_WAIT2 socket is not one"
        );
    }

    #[test]
    fn dumps_a_real_time_wait_bucket_before_the_peer_closes() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        let port = client.local_addr().expect("addr").port();
        let peer = listener.local_addr().expect("addr").port();
        drop(client); // closed first, the peer still open: a FIN_WAIT2 bucket
                      // Only this connection: an older one may have left a TIME_WAIT on
                      // the same local port.
        let s = wait_for_socket(1 << TCP_TIME_WAIT | 1 << TCP_FIN_WAIT2, |s| {
            s.lport == port && s.rport == peer && s.is_time_wait_bucket()
        });
        assert_eq!(s.state, TCP_FIN_WAIT2, "{s:?}");
    }

    #[test]
    fn kernel_errors_and_garbage_are_errors_not_panics() {
        let err = nlmsg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(parse_messages(&err), Err(DiagError::Kernel(_))));
        let good = nlmsg(SOCK_DIAG_BY_FAMILY, &diag_msg(8, 1, 1, Some(5)));
        for len in 0..good.len() {
            let _ = parse_messages(&good[..len]);
        }
        let mut bad = good.clone();
        bad[0..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(parse_messages(&bad).is_err());
    }

    #[test]
    fn an_error_code_that_is_no_errno_is_malformed_not_a_panic() {
        // Found by the sockdiag fuzz target: negating i32::MIN overflowed.
        for code in [i32::MIN, 1, 4096] {
            let msg = nlmsg(NLMSG_ERROR, &code.to_ne_bytes());
            assert!(
                matches!(
                    parse_messages(&msg),
                    Err(DiagError::Malformed("error code"))
                ),
                "{code}"
            );
        }
        let ack = nlmsg(NLMSG_ERROR, &0i32.to_ne_bytes());
        assert!(matches!(parse_messages(&ack), Ok((socks, false)) if socks.is_empty()));
        let eperm = nlmsg(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        match parse_messages(&eperm) {
            Err(DiagError::Kernel(e)) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attributes_cut_short_or_overlong_are_skipped() {
        let good = diag_msg(8, 45346, 99, Some(61_000));
        // The INET_DIAG_INFO attribute claims more bytes than there are, or
        // fewer than its own header: the socket stays, without the time.
        for attr_len in [u16::MAX, 3, 0] {
            let mut p = good.clone();
            p[DIAG_MSG_LEN..DIAG_MSG_LEN + 2].copy_from_slice(&attr_len.to_ne_bytes());
            let (socks, _) = parse_messages(&nlmsg(SOCK_DIAG_BY_FAMILY, &p)).expect("valid");
            assert_eq!(socks.len(), 1, "{attr_len}");
            assert_eq!(socks[0].last_data_recv_ms, None, "{attr_len}");
        }
        // Cut inside the attribute's header: the same.
        let cut = &good[..DIAG_MSG_LEN + 3];
        let (socks, _) = parse_messages(&nlmsg(SOCK_DIAG_BY_FAMILY, cut)).expect("valid");
        assert_eq!(socks[0].last_data_recv_ms, None);
        assert_eq!(socks[0].lport, 45346);
    }

    #[test]
    fn dumps_a_real_close_wait_socket() {
        let (_server, port) = close_wait_socket();
        let s = wait_for_socket(1 << TCP_CLOSE_WAIT, |s| s.lport == port);
        assert_eq!(s.state, TCP_CLOSE_WAIT);
        assert!(s.inode > 0);
        assert!(s.last_data_recv_ms.is_some());
    }
}
