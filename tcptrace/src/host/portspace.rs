//! The kernel's side of port pressure: TIME_WAIT sockets (sock_diag) and
//! port ranges (`/proc/sys/net/ipv4`) of every network namespace, read
//! from a thread inside each namespace.

use std::collections::HashMap;
use std::os::fd::AsFd as _;

use crate::engine::timewait::{Dest, PortRange, DEFAULT_RANGE};
use crate::host::sockdiag::{self, TCP_FIN_WAIT2, TCP_TIME_WAIT};

/// One namespace's TIME_WAIT sockets and port range.
pub struct NamespaceView {
    /// Namespace inode.
    pub netns: u32,
    /// (destination, local port, ms until it expires).
    pub time_wait: Vec<(Dest, u16, u32)>,
    /// Its ephemeral port range; `None` when its sysctls could not be read.
    pub range: Option<PortRange>,
}

/// What one sweep found.
#[derive(Default)]
pub struct Sweep {
    /// The namespaces read.
    pub views: Vec<NamespaceView>,
    /// Namespaces listed but not read this time (entering failed, or the
    /// process whose path named it is gone).
    pub unread: Vec<u32>,
}

/// The port range from the namespace's sysctls.
fn read_range(entered: &crate::host::nshelper::Entered) -> Option<PortRange> {
    PortRange::parse(&entered.port_range, &entered.tw_reuse)
}

/// Reads every namespace a process lives in; namespaces that cannot be
/// entered are listed as unread (and logged at debug).
pub fn sweep() -> Sweep {
    let mut out = Sweep::default();
    for (netns, path) in crate::host::inventory::namespaces() {
        let view = crate::host::nshelper::enter(&path, netns).and_then(|entered| {
            // A bucket whose peer has not closed yet reports FIN_WAIT2.
            let socks = sockdiag::dump_on(
                entered.netlink.as_fd(),
                1 << TCP_TIME_WAIT | 1 << TCP_FIN_WAIT2,
            )?;
            Ok((socks, read_range(&entered)))
        });
        match view {
            Ok((socks, range)) => out.views.push(NamespaceView {
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
            Err(e) => {
                log::debug!("port space of {}: {e}", path.display());
                out.unread.push(netns);
            }
        }
    }
    out
}

/// Port ranges by namespace after `sweep`: the range read, else the last
/// one known (`previous`), else Linux's default. A namespace that could
/// not be read this time keeps its last range: one failed look must not
/// turn a 100-port range into the default 28 232 and hide the pressure.
/// Namespaces the sweep no longer listed are forgotten.
pub fn ranges(sweep: &Sweep, previous: &HashMap<u32, PortRange>) -> HashMap<u32, PortRange> {
    let read = sweep.views.iter().map(|v| {
        let known = previous.get(&v.netns).copied();
        (v.netns, v.range.or(known).unwrap_or(DEFAULT_RANGE))
    });
    let kept = sweep
        .unread
        .iter()
        .filter_map(|n| previous.get(n).map(|r| (*n, *r)));
    read.chain(kept).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(low: u16, high: u16) -> PortRange {
        PortRange {
            low,
            high,
            tw_reuse: 0,
        }
    }

    fn view(netns: u32, range: Option<PortRange>) -> NamespaceView {
        NamespaceView {
            netns,
            time_wait: Vec::new(),
            range,
        }
    }

    #[test]
    fn a_namespace_not_read_keeps_its_last_range() {
        let previous: HashMap<u32, PortRange> = [
            (1, range(40000, 40099)),
            (2, range(41000, 41099)),
            (3, range(42000, 42099)),
            (4, range(43000, 43099)),
        ]
        .into();
        let sweep = Sweep {
            views: vec![
                // Read: the new range wins.
                view(1, Some(range(40000, 40199))),
                // Entered, but the sysctls could not be read: the last one.
                view(2, None),
                // New, sysctls unreadable: the default.
                view(5, None),
            ],
            // Not entered this time: the last one.
            unread: vec![3, 6],
        };
        let got = ranges(&sweep, &previous);
        assert_eq!(got.get(&1), Some(&range(40000, 40199)));
        assert_eq!(got.get(&2), Some(&range(41000, 41099)));
        assert_eq!(got.get(&3), Some(&range(42000, 42099)));
        // Gone from the listing: forgotten.
        assert_eq!(got.get(&4), None);
        assert_eq!(got.get(&5), Some(&DEFAULT_RANGE));
        // Never known and not read: no entry (callers use the default).
        assert_eq!(got.get(&6), None);
    }
}
