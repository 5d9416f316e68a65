//! Leak candidates to [`Leak`]s: who holds each socket now (/proc), its
//! receive queue and inode (sock_diag), its last use (the kernel's socket
//! storage, read through a holder's fd) and its stacks, symbolized.
//!
//! Host edge, and only for leak candidates, in one batch per tick.

use std::collections::{HashMap, HashSet};

use crate::engine::closewait::LeakCandidate;
use crate::engine::frame::Frame;
use crate::engine::lastuse::LastUse;
use crate::engine::leak::{classify, Leak};
use std::sync::Arc;
use std::time::Duration;

use crate::host::names::Names;
use crate::host::procfs;
use crate::host::symbolize::Symbolizer;

/// Reads what a leak line needs from /proc and the kernel's stack map.
///
/// A program leaking thousands of sockets from one call site must cost one
/// /proc scan, one `/proc/PID/net/tcp` read and one symbolization per batch,
/// not one per socket.
pub struct Enricher {
    symbolizer: Symbolizer,
    /// Symbolized stacks by (pid, stack id); cleared when it grows large.
    stacks: HashMap<(u32, u32), Vec<Frame>>,
    /// Container and pod names, when looked up.
    names: Option<Arc<Names>>,
}

/// How long a leak report waits for the name of a container it sees the
/// first time (the look-up runs on the names thread; once known, a name
/// costs a cache read).
const NAME_WAIT: Duration = Duration::from_millis(300);

/// What a sock_diag dump of CLOSE_WAIT sockets tells about candidates.
#[derive(Default)]
struct CloseWaitDiag {
    /// Inode by namespace and four-tuple.
    by_tuple: HashMap<crate::engine::decode::TupleKey, u64>,
    /// Receive queue by inode: what the owner has not read (a FIN not
    /// read counts one), as `ss` shows it.
    rqueue: HashMap<u64, u64>,
}

/// One NETLINK_SOCK_DIAG dump of CLOSE_WAIT sockets per namespace of the
/// candidates (every namespace when one's is unknown). Where /proc/PID/
/// net/tcp lists every socket of the namespace as text (a busy host's
/// TIME_WAIT sockets among them), this lists only those in CLOSE_WAIT.
fn close_wait_diag(candidates: &[LeakCandidate]) -> CloseWaitDiag {
    let wanted: HashSet<Option<u32>> = candidates.iter().map(|c| c.entered.change.netns).collect();
    let mut diag = CloseWaitDiag::default();
    if wanted.is_empty() {
        return diag;
    }
    for (netns, path) in crate::host::inventory::namespaces() {
        if !wanted.contains(&Some(netns)) && !wanted.contains(&None) {
            continue;
        }
        let Ok(socks) = crate::host::nshelper::dump_in(
            &path,
            netns,
            1 << crate::host::sockdiag::TCP_CLOSE_WAIT,
        ) else {
            continue;
        };
        for s in socks.into_iter().filter(|s| s.inode != 0) {
            let ino = u64::from(s.inode);
            diag.by_tuple
                .insert((Some(netns), s.laddr, s.lport, s.raddr, s.rport), ino);
            diag.rqueue.insert(ino, u64::from(s.rqueue));
        }
    }
    diag
}

/// Finds the inode of candidates the kernel could not read it for (no BTF
/// offsets, or no socket file at that moment) the way `ss` does: by
/// four-tuple in `diag`.
fn fill_missing_inodes(candidates: &mut [LeakCandidate], diag: &CloseWaitDiag) {
    let by_tuple = &diag.by_tuple;
    for c in candidates.iter_mut().filter(|c| c.entered.ino.is_none()) {
        let t = &c.entered.change;
        let found = by_tuple
            .get(&crate::engine::decode::tuple_key(t))
            .copied()
            .or_else(|| {
                // Without a known namespace, a unique four-tuple anywhere will do.
                let mut matches = by_tuple.iter().filter(|((_, la, lp, ra, rp), _)| {
                    t.netns.is_none()
                        && *la == t.laddr
                        && *lp == t.lport
                        && *ra == t.raddr
                        && *rp == t.rport
                });
                let first = matches.next().map(|(_, ino)| *ino);
                first.filter(|_| matches.next().is_none())
            });
        c.entered.ino = found;
    }
}

/// Symbolizes a kernel stack (innermost first). Every frame but the first
/// holds a return address, the instruction after a call: looking up the
/// byte before it gives the call's own function and line, which is what a
/// person wants to read.
fn symbolize_stack(symbolizer: &mut Symbolizer, pid: u32, addrs: &[u64]) -> Vec<Frame> {
    let lookup: Vec<u64> = addrs
        .iter()
        .enumerate()
        .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
        .collect();
    let mut frames = symbolizer.symbolize(pid, &lookup);
    for (frame, (&addr, &looked)) in frames.iter_mut().zip(addrs.iter().zip(&lookup)) {
        frame.addr = addr;
        frame.offset = frame.offset.map(|o| o + (addr - looked));
        for inlined in &mut frame.inlined {
            inlined.addr = addr;
        }
    }
    crate::engine::frame::expand_inlined(frames)
}

/// Most symbolized stacks kept between batches.
const MAX_CACHED_STACKS: usize = 1024;

impl Default for Enricher {
    fn default() -> Self {
        Self::new()
    }
}

impl Enricher {
    /// The symbolized stack `key` (pid, stack id), cached; empty for none.
    fn stack(
        &mut self,
        key: Option<(u32, u32)>,
        stack_of: &impl Fn(u32) -> Option<Vec<u64>>,
    ) -> Vec<Frame> {
        let Some(key) = key else {
            return Vec::new();
        };
        if !self.stacks.contains_key(&key) {
            let frames = stack_of(key.1)
                .map(|addrs| symbolize_stack(&mut self.symbolizer, key.0, &addrs))
                .unwrap_or_default();
            self.stacks.insert(key, frames);
        }
        self.stacks.get(&key).cloned().unwrap_or_default()
    }

    /// A new enricher with an empty symbol cache.
    pub fn new() -> Self {
        Self {
            symbolizer: Symbolizer::new(),
            stacks: HashMap::new(),
            names: None,
        }
    }

    /// An enricher that also names holders' containers and pods.
    pub fn with_names(names: Arc<Names>) -> Self {
        Self {
            names: Some(names),
            ..Self::new()
        }
    }

    /// Enriches a batch; `stack_of` returns the addresses of a stack id,
    /// `last_use_of` the last use of the socket a (pid, fd) holder holds
    /// (see [`crate::kernel::lastuse_map::LastUseMap::lookup`]).
    pub fn enrich(
        &mut self,
        candidates: Vec<LeakCandidate>,
        stack_of: impl Fn(u32) -> Option<Vec<u64>>,
        last_use_of: impl Fn(u32, i32) -> Option<LastUse>,
    ) -> Vec<Leak> {
        let mut candidates = candidates;
        let diag = close_wait_diag(&candidates);
        fill_missing_inodes(&mut candidates, &diag);
        let inodes: HashSet<u64> = candidates.iter().filter_map(|c| c.entered.ino).collect();
        let mut holders = procfs::holders(&inodes);
        // Receive queues by holder pid, each /proc/PID/net/tcp{,6} read once.
        let mut queues: HashMap<u32, HashMap<u64, u64>> = HashMap::new();
        if self.stacks.len() > MAX_CACHED_STACKS {
            self.stacks.clear();
        }
        candidates
            .into_iter()
            .map(|candidate| {
                let ino = candidate.entered.ino;
                let mut owners = ino.and_then(|ino| holders.remove(&ino)).unwrap_or_default();
                if let Some(names) = &self.names {
                    for h in &mut owners {
                        names.fill_waiting(&mut h.identity, NAME_WAIT);
                    }
                }
                let recv_q = ino.and_then(|ino| {
                    diag.rqueue.get(&ino).copied().or_else(|| {
                        // Not in the dump (it could not be taken, or the
                        // socket left CLOSE_WAIT meanwhile): as the owner
                        // sees it in /proc.
                        owners.iter().find_map(|h| {
                            queues
                                .entry(h.pid)
                                .or_insert_with(|| procfs::recv_queues(h.pid))
                                .get(&ino)
                                .copied()
                        })
                    })
                });
                let origin_key = candidate
                    .entered
                    .origin
                    .as_ref()
                    .and_then(|o| o.stack_id.map(|id| (o.pid, id)));
                let stack = self.stack(origin_key, &stack_of);
                // The socket's own storage: any holder's fd reaches it.
                let last_use = owners.iter().find_map(|h| last_use_of(h.pid, h.fd));
                let last_use_key = last_use.as_ref().and_then(|u| {
                    // Symbolized in the process that made the checkout
                    // while it lives, else in a holder (a fork's child
                    // runs the same binary).
                    let pid = if procfs::is_alive(u.pid) {
                        u.pid
                    } else {
                        owners.first().map_or(u.pid, |h| h.pid)
                    };
                    u.stack_id.map(|id| (pid, id))
                });
                let last_use_stack = self.stack(last_use_key, &stack_of);
                Leak {
                    reason: classify(recv_q),
                    candidate,
                    owners,
                    recv_q,
                    stack,
                    last_use,
                    last_use_stack,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::leak::tests::leak;

    #[test]
    fn missing_inode_and_receive_queue_come_from_sock_diag() {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::fs::MetadataExt as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let (laddr, raddr) = (
            server.local_addr().expect("local"),
            server.peer_addr().expect("peer"),
        );
        drop(client);
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", server.as_raw_fd()))
            .expect("stat")
            .ino();
        let netns = std::fs::metadata("/proc/self/ns/net").expect("netns").ino() as u32;
        let mut l = leak(Vec::new(), Vec::new(), false);
        {
            let c = &mut l.candidate.entered.change;
            c.netns = Some(netns);
            (c.laddr, c.lport, c.raddr, c.rport) =
                (laddr.ip(), laddr.port(), raddr.ip(), raddr.port());
        }
        l.candidate.entered.ino = None;
        let mut candidates = vec![l.candidate];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while candidates[0].entered.ino.is_none() && std::time::Instant::now() < deadline {
            let diag = close_wait_diag(&candidates);
            fill_missing_inodes(&mut candidates, &diag);
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(candidates[0].entered.ino, Some(ino));
        // The same dump gives its receive queue: the FIN, not read yet.
        let diag = close_wait_diag(&candidates);
        assert_eq!(diag.rqueue.get(&ino), Some(&1));
        let mut eof = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &server, &mut eof).ok(), Some(0));
        let diag = close_wait_diag(&candidates);
        assert_eq!(diag.rqueue.get(&ino), Some(&0), "EOF read");
    }
}
