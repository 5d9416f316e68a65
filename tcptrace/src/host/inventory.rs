//! Start-up inventory: sockets already in CLOSE_WAIT before the agent ran,
//! in every network namespace, so that a leak older than the agent is still
//! reported. Their age is estimated from `tcpi_last_data_recv` (the FIN was
//! the last thing received) and their origin is unknown.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;

use crate::engine::closewait::Found;
use crate::engine::decode::{Family, StateChange, Task};
use crate::engine::state::TcpState;
use crate::engine::tracker::Transition;
use crate::host::sockdiag::TCP_CLOSE_WAIT;

/// One path per distinct network namespace, with its inode: every
/// process's `/proc/PID/ns/net`, and the namespaces `ip netns` keeps under
/// /run/netns even when no process lives there (TIME_WAIT sockets can
/// outlive every process of a namespace).
pub fn namespaces() -> Vec<(u32, PathBuf)> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let procs = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
                .is_some()
        })
        .map(|e| e.path().join("ns/net"));
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for path in procs.chain(named) {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let Ok(ino) = u32::try_from(meta.ino()) else {
            continue;
        };
        if seen.insert(ino) {
            out.push((ino, path));
        }
    }
    out
}

/// Every TCP socket in CLOSE_WAIT now, in every namespace a process lives in.
pub fn take(now_ns: u64) -> (Vec<Found>, usize) {
    let spaces = namespaces();
    let mut found = Vec::new();
    for (netns, path) in &spaces {
        let socks = match crate::host::nshelper::dump_in(path, *netns, 1 << TCP_CLOSE_WAIT) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("inventory of {}: {e}", path.display());
                continue;
            }
        };
        for s in socks.into_iter().filter(|s| s.state == TCP_CLOSE_WAIT) {
            let age_ns = u64::from(s.last_data_recv_ms.unwrap_or(0)) * 1_000_000;
            let since_ns = now_ns.saturating_sub(age_ns);
            let change = StateChange {
                ts_ns: since_ns,
                sk: 0,
                netns: Some(*netns),
                family: if s.laddr.is_ipv4() {
                    Family::Ipv4
                } else {
                    Family::Ipv6
                },
                laddr: s.laddr,
                lport: s.lport,
                raddr: s.raddr,
                rport: s.rport,
                old: TcpState::Established,
                new: TcpState::CloseWait,
                ctx: Task {
                    pid: 0,
                    tid: 0,
                    comm: String::new(),
                },
                connect_fd: None,
                stack_id: None,
                ino: (s.inode != 0).then_some(u64::from(s.inode)),
            };
            found.push(Found {
                entered: Transition {
                    change,
                    prev_state_ms: None,
                    owner: None,
                    origin: None,
                    ino: (s.inode != 0).then_some(u64::from(s.inode)),
                    closer: None,
                    reset: false,
                },
                since_ns,
            });
        }
    }
    (found, spaces.len())
}
