//! The kernel's side of port pressure: TIME_WAIT sockets (sock_diag) and
//! port ranges (`/proc/sys/net/ipv4`) of every network namespace, read
//! from a thread inside each namespace.

use std::collections::HashMap;
use std::os::fd::AsFd as _;

use crate::sockdiag::{self, TCP_FIN_WAIT2, TCP_TIME_WAIT};
use crate::timewait::{Dest, PortRange, DEFAULT_RANGE};

/// One namespace's TIME_WAIT sockets and port range.
pub struct NamespaceView {
    /// Namespace inode.
    pub netns: u32,
    /// (destination, local port, ms until it expires).
    pub time_wait: Vec<(Dest, u16, u32)>,
    /// Its ephemeral port range.
    pub range: PortRange,
}

/// The port range from the namespace's sysctls, the default where they
/// could not be read.
fn read_range(entered: &crate::nshelper::Entered) -> PortRange {
    PortRange::parse(&entered.port_range, &entered.tw_reuse).unwrap_or(DEFAULT_RANGE)
}

/// Reads every namespace a process lives in; namespaces that cannot be
/// entered are skipped (logged at debug).
pub fn sweep() -> Vec<NamespaceView> {
    let mut out = Vec::new();
    for (netns, path) in crate::inventory::namespaces() {
        let view = crate::nshelper::enter(&path).and_then(|entered| {
            // A bucket whose peer has not closed yet reports FIN_WAIT2.
            let socks = sockdiag::dump_on(
                entered.netlink.as_fd(),
                1 << TCP_TIME_WAIT | 1 << TCP_FIN_WAIT2,
            )?;
            Ok((socks, read_range(&entered)))
        });
        match view {
            Ok((socks, range)) => out.push(NamespaceView {
                netns,
                time_wait: socks
                    .into_iter()
                    .filter(sockdiag::DiagSocket::is_time_wait_bucket)
                    .map(|s| {
                        (
                            Dest {
                                netns: Some(netns),
                                laddr: s.laddr,
                                raddr: s.raddr,
                                rport: s.rport,
                            },
                            s.lport,
                            s.expires_ms,
                        )
                    })
                    .collect(),
                range,
            }),
            Err(e) => log::debug!("port space of {}: {e}", path.display()),
        }
    }
    out
}

/// Port ranges by namespace, from a sweep.
pub fn ranges(views: &[NamespaceView]) -> HashMap<u32, PortRange> {
    views.iter().map(|v| (v.netns, v.range)).collect()
}
