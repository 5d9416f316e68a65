//! A helper process that enters network namespaces for the agent, so that
//! the agent need not keep CAP_SYS_ADMIN (which `setns` needs) once its
//! programs are attached.
//!
//! [`start`] forks it before anything is loaded or any thread runs. It
//! keeps CAP_SYS_ADMIN alone (with `no_new_privs` and no exec), and serves
//! one request over a socket pair: given a namespace's fd, it enters the
//! namespace and hands back a sock_diag netlink socket made there (it
//! answers for the namespace it was made in) and the text of the two
//! port-range sysctls, read there. It parses nothing: the agent dumps and
//! parses with what it got. It exits
//! when the agent closes the socket or dies (`PR_SET_PDEATHSIG`).
//!
//! Without the helper (it could not start), [`enter`] does the same in a
//! short-lived thread of the agent's, which then needs CAP_SYS_ADMIN.
//!
//! `setns`, the parent-death signal and process ids go through rustix;
//! `fork`, `_exit` and signal dispositions stay with libc, which owns the
//! process (rustix wraps none of them outside its own runtime).

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// What [`enter`] hands back, opened inside the namespace.
pub struct Entered {
    /// The inode of the namespace these were made in (checked by
    /// [`enter`] against the one asked for).
    pub netns: u64,
    /// A NETLINK_SOCK_DIAG socket (see [`crate::host::sockdiag::dump_on`]).
    pub netlink: OwnedFd,
    /// `/proc/sys/net/ipv4/ip_local_port_range`, read there (empty when
    /// it could not be).
    pub port_range: String,
    /// `/proc/sys/net/ipv4/tcp_tw_reuse`, read there (empty when it could
    /// not be).
    pub tw_reuse: String,
}

/// The agent's end of the socket pair, once the helper runs.
static HELPER: OnceLock<Mutex<OwnedFd>> = OnceLock::new();

/// Whether the helper's exit was logged (once is enough).
static GONE_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the helper runs (the agent may then give up CAP_SYS_ADMIN).
pub fn running() -> bool {
    HELPER.get().is_some()
}

/// Forks the helper; returns its pid. Must run while the process has one
/// thread (a fork copies only the calling thread, and the child must not
/// find a lock some other thread held) and before anything the child
/// should not hold (BPF programs, outputs) is opened.
pub fn start() -> io::Result<u32> {
    if threads() != Some(1) {
        return Err(io::Error::other(
            "the agent already runs several threads; cannot fork safely",
        ));
    }
    let (ours, theirs) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let parent = rustix::process::getpid();
    // SAFETY: the process has one thread (checked above), so the child
    // finds no lock held; it runs `serve`, which never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        drop(ours);
        child(parent, theirs);
    }
    drop(theirs);
    HELPER
        .set(Mutex::new(ours))
        .map_err(|_| io::Error::other("the namespace helper was started twice"))?;
    Ok(pid as u32)
}

/// `Threads:` of /proc/self/status.
fn threads() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Enters network namespace `inode`, found at `netns` (`/proc/PID/ns/net`,
/// a `/run/netns` name), and opens what the agent reads there. Fails when
/// the path now names another namespace (its process exited and the pid
/// was reused), or when the answer was made in another namespace than
/// the one asked for: an answer is never labelled with the wrong
/// namespace.
pub fn enter(netns: &Path, inode: u32) -> io::Result<Entered> {
    let ns = File::open(netns)?;
    let opened = ns.metadata()?.ino();
    if opened != u64::from(inode) {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is namespace {opened} now, not {inode} (its process is gone)",
                netns.display()
            ),
        ));
    }
    let entered = match HELPER.get() {
        Some(helper) => {
            let sock = helper
                .lock()
                .map_err(|_| io::Error::other("namespace helper lock poisoned"))?;
            let answer = ask(sock.as_fd(), ns.as_fd());
            if let Err(e) = &answer {
                // A namespace that vanished answers ENOENT or EINVAL; a
                // helper that is gone answers nothing ever again.
                let gone = e.raw_os_error() == Some(libc::EPIPE)
                    || e.raw_os_error() == Some(libc::ECONNRESET)
                    || e.kind() == io::ErrorKind::UnexpectedEof;
                if gone && !GONE_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    log::warn!(
                        "the namespace helper exited ({e}): sockets in other network \
                         namespaces can no longer be listed (leak owners there, port \
                         pressure); restart the agent"
                    );
                }
            }
            answer
        }
        None => in_thread(ns.as_fd()),
    }?;
    if entered.netns != opened {
        return Err(io::Error::other(format!(
            "the answer for namespace {opened} was made in namespace {}",
            entered.netns
        )));
    }
    Ok(entered)
}

/// [`open_in`] in a thread of its own, which enters the namespace and
/// ends: the calling thread never changes namespace, so a `setns` that
/// fails, or a request that stops half-way, leaves nothing behind for the
/// next one.
fn in_thread(ns: BorrowedFd<'_>) -> io::Result<Entered> {
    std::thread::scope(|s| {
        s.spawn(|| open_in(ns))
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
    })
}

/// Sends `ns` to the helper and takes its answer.
fn ask(sock: BorrowedFd<'_>, ns: BorrowedFd<'_>) -> io::Result<Entered> {
    let fds = [ns];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut out = SendAncillaryBuffer::new(&mut space);
    out.push(SendAncillaryMessage::ScmRights(&fds));
    // A signal may interrupt either call; both are retried, so that every
    // request is sent once and its answer taken once (a request whose
    // answer were left in the socket would pair every later request with
    // the answer before it).
    loop {
        match rustix::net::sendmsg(sock, &[IoSlice::new(&[1])], &mut out, SendFlags::NOSIGNAL) {
            Err(rustix::io::Errno::INTR) => continue,
            sent => {
                sent?;
                break;
            }
        }
    }

    let mut reply = [0u8; REPLY_LEN];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut back = RecvAncillaryBuffer::new(&mut space);
    let got = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut reply)],
            &mut back,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            got => break got?,
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in back.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if got.bytes != reply.len() {
        // Its end closed: a short or empty read (see [`enter`]).
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the namespace helper is gone",
        ));
    }
    let (errno, rest) = reply.split_at(4);
    let errno = i32::from_ne_bytes([errno[0], errno[1], errno[2], errno[3]]);
    if errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    let (netns, texts) = rest.split_at(8);
    let mut inode = [0u8; 8];
    inode.copy_from_slice(netns);
    let netlink = fds
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::other("the namespace helper sent no socket"))?;
    let (range, reuse) = texts.split_at(SYSCTL_TEXT);
    Ok(Entered {
        netns: u64::from_ne_bytes(inode),
        netlink,
        port_range: text_of(range),
        tw_reuse: text_of(reuse),
    })
}

/// Room for each sysctl's text in a reply ("60999\t60999\n" is 12 bytes).
const SYSCTL_TEXT: usize = 64;
/// A reply: the errno (0 for an answer), the inode of the namespace the
/// answer was made in, then both sysctls' text, NUL padded; the netlink
/// socket travels as SCM_RIGHTS.
const REPLY_LEN: usize = 4 + 8 + 2 * SYSCTL_TEXT;

/// The text in a NUL-padded field.
fn text_of(field: &[u8]) -> String {
    let text = field.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// A sysctl of the current thread's namespace, read now (empty when it
/// cannot be): the helper sends text, which the agent parses, and no
/// file crosses over.
fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Enters `ns` (this thread only) and opens a netlink socket and the
/// sysctl files there.
fn open_in(ns: BorrowedFd<'_>) -> io::Result<Entered> {
    // Affects only the calling thread.
    rustix::thread::move_into_link_name_space(
        ns,
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(Entered {
        // This thread's namespace, as the kernel sees it now.
        netns: std::fs::metadata("/proc/thread-self/ns/net")?.ino(),
        netlink: crate::host::sockdiag::socket()?,
        port_range: sysctl("/proc/sys/net/ipv4/ip_local_port_range"),
        tw_reuse: sysctl("/proc/sys/net/ipv4/tcp_tw_reuse"),
    })
}

/// The helper's life: set up, then serve until the agent goes.
fn child(parent: rustix::process::Pid, sock: OwnedFd) -> ! {
    // Killed when the agent dies; if it died before this line, now.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    if rustix::process::getppid() != Some(parent) {
        // SAFETY: ends this process without running the agent's exit code.
        unsafe { libc::_exit(0) };
    }
    // The agent's signals are the agent's: SIGINT from a terminal, SIGHUP
    // from logrotate, SIGTERM from a service manager that signals the
    // whole group. The helper ends with the agent. (rustix leaves signal
    // dispositions to the C library, as it does fork and _exit.)
    for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGTERM, libc::SIGPIPE] {
        // SAFETY: SIG_IGN needs no handler; async-signal-safe after fork.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    close_all_but(sock.as_raw_fd());
    let keep = 1u64 << crate::host::privileges::CAP_SYS_ADMIN;
    if crate::host::privileges::drop_to(keep).is_err() {
        // SAFETY: ends this process without running the agent's exit code.
        unsafe { libc::_exit(1) };
    }
    serve(sock.as_fd());
    // SAFETY: as above.
    unsafe { libc::_exit(0) }
}

/// Closes every fd but `keep`: the helper holds nothing of the agent's.
fn close_all_but(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd != keep) {
        // SAFETY: closing a descriptor nothing in this process uses any
        // more (the helper only runs `serve` from here on).
        unsafe { libc::close(fd) };
    }
}

/// Answers requests until the agent closes its end.
fn serve(sock: BorrowedFd<'_>) {
    loop {
        let mut request = [0u8; 1];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut anc = RecvAncillaryBuffer::new(&mut space);
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut request)],
            &mut anc,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) if got.bytes > 0 => {}
            // The agent closed its end, or is gone.
            _ => return,
        }
        let mut ns: Option<OwnedFd> = None;
        for message in anc.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                // Keep the first; any other is closed as it drops.
                for fd in rights {
                    ns.get_or_insert(fd);
                }
            }
        }
        let answer = match &ns {
            Some(ns) => in_thread(ns.as_fd()),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        if reply(sock, answer).is_err() {
            return;
        }
    }
}

/// Sends an answer (see [`REPLY_LEN`]).
fn reply(sock: BorrowedFd<'_>, answer: io::Result<Entered>) -> io::Result<()> {
    let mut message = [0u8; REPLY_LEN];
    let fds: Vec<OwnedFd> = match answer {
        Ok(e) => {
            message[4..12].copy_from_slice(&e.netns.to_ne_bytes());
            let (range, reuse) = message[12..].split_at_mut(SYSCTL_TEXT);
            for (field, text) in [(range, &e.port_range), (reuse, &e.tw_reuse)] {
                // One byte stays NUL: the text's end.
                let n = text.len().min(SYSCTL_TEXT - 1);
                field[..n].copy_from_slice(&text.as_bytes()[..n]);
            }
            vec![e.netlink]
        }
        Err(e) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            message[..4].copy_from_slice(&errno.to_ne_bytes());
            Vec::new()
        }
    };
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut out = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        out.push(SendAncillaryMessage::ScmRights(&borrowed));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&message)],
        &mut out,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// [`crate::host::sockdiag::dump_on`] inside network namespace `inode`, found at
/// `netns` (entered by [`enter`]).
pub fn dump_in(
    netns: &Path,
    inode: u32,
    states: u32,
) -> io::Result<Vec<crate::host::sockdiag::DiagSocket>> {
    let entered = enter(netns, inode)?;
    crate::host::sockdiag::dump_on(entered.netlink.as_fd(), states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dumps_a_namespace_found_by_its_path_and_refuses_another() {
        use crate::host::sockdiag::TCP_CLOSE_WAIT;
        let (_server, port) = crate::host::sockdiag::close_wait_socket();
        let own = Path::new("/proc/self/ns/net");
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(own).expect("netns"));
        let inode = u32::try_from(inode).expect("a namespace inode");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let via_ns = dump_in(own, inode, 1 << TCP_CLOSE_WAIT).expect("dump_in");
            if via_ns.iter().any(|s| s.lport == port) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "port {port} not in CLOSE_WAIT"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // A path that names another namespace than the one asked for (a
        // process gone, its pid reused) is refused, not dumped.
        let err = dump_in(own, inode.wrapping_add(1), 1 << TCP_CLOSE_WAIT).expect_err("refused");
        assert!(err.to_string().contains("not"), "{err}");
    }

    #[test]
    fn the_helpers_protocol_round_trips_an_answer_and_an_error() {
        let (a, b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        // The helper's side, here in a thread: answers with files of this
        // namespace (as if entered), then with an error.
        let helper = std::thread::spawn(move || {
            for answer in [
                Ok(Entered {
                    netns: 7,
                    netlink: crate::host::sockdiag::socket().expect("netlink"),
                    port_range: sysctl("/proc/sys/net/ipv4/ip_local_port_range"),
                    tw_reuse: String::new(),
                }),
                Err(io::Error::from_raw_os_error(libc::EPERM)),
            ] {
                let mut request = [0u8; 1];
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut anc = RecvAncillaryBuffer::new(&mut space);
                rustix::net::recvmsg(
                    &b,
                    &mut [IoSliceMut::new(&mut request)],
                    &mut anc,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .expect("request");
                reply(b.as_fd(), answer).expect("reply");
            }
        });
        let ns = File::open("/proc/self/ns/net").expect("own namespace");
        let entered = ask(a.as_fd(), ns.as_fd()).expect("an answer");
        assert_eq!(entered.netns, 7);
        assert!(entered.tw_reuse.is_empty());
        let range = entered.port_range;
        assert!(
            crate::engine::timewait::PortRange::parse(&range, "").is_some(),
            "{range}"
        );
        let socks = crate::host::sockdiag::dump_on(entered.netlink.as_fd(), 1 << 8);
        assert!(socks.is_ok(), "{socks:?}");
        let err = ask(a.as_fd(), ns.as_fd()).err().expect("the error");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        helper.join().expect("helper thread");
        // The helper gone, the agent's side says so.
        let err = ask(a.as_fd(), ns.as_fd()).err().expect("gone");
        assert!(err.to_string().contains("gone") || err.raw_os_error().is_some());
    }
}
