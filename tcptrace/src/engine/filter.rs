//! Which transitions reach the output. Applied after the tracker, which must
//! see every record to keep durations and owners right.

use std::collections::HashSet;

use crate::engine::decode::Family;
use crate::engine::state::TcpState;
use crate::engine::tracker::Transition;

/// Output filter; an empty set means "any".
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Owner pids.
    pub pids: HashSet<u32>,
    /// Local or remote ports.
    pub ports: HashSet<u16>,
    /// Address family.
    pub family: Option<Family>,
    /// States a transition must leave or enter.
    pub states: HashSet<TcpState>,
}

impl Filter {
    /// True when `t` passes every configured condition.
    pub fn matches(&self, t: &Transition) -> bool {
        let c = &t.change;
        (self.pids.is_empty() || t.owner.as_ref().is_some_and(|o| self.pids.contains(&o.pid)))
            && (self.ports.is_empty()
                || self.ports.contains(&c.lport)
                || self.ports.contains(&c.rport))
            && self.family.is_none_or(|f| f == c.family)
            && (self.states.is_empty()
                || self.states.contains(&c.old)
                || self.states.contains(&c.new))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{StateChange, Task};
    use crate::engine::tracker::Owner;
    use std::net::{IpAddr, Ipv4Addr};

    fn t(owner: Option<u32>, lport: u16, rport: u16, old: TcpState, new: TcpState) -> Transition {
        Transition {
            change: StateChange {
                ts_ns: 0,
                sk: 1,
                netns: None,
                family: Family::Ipv4,
                laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                lport,
                raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                rport,
                old,
                new,
                ctx: Task {
                    pid: 1,
                    tid: 1,
                    comm: String::new(),
                },
                connect_fd: None,
                stack_id: None,
                ino: None,
            },
            prev_state_ms: None,
            owner: owner.map(|pid| Owner {
                pid,
                fd: None,
                comm: String::new(),
            }),
            origin: None,
            ino: None,
            closer: None,
            reset: false,
        }
    }

    #[test]
    fn empty_filter_passes_everything() {
        let f = Filter::default();
        assert!(f.matches(&t(None, 1, 2, TcpState::Close, TcpState::SynSent)));
    }

    #[test]
    fn pid_matches_the_owner_only() {
        let f = Filter {
            pids: [7].into(),
            ..Default::default()
        };
        use TcpState::*;
        assert!(f.matches(&t(Some(7), 1, 2, Close, SynSent)));
        assert!(!f.matches(&t(Some(8), 1, 2, Close, SynSent)));
        assert!(!f.matches(&t(None, 1, 2, Close, SynSent)), "unknown owner");
    }

    #[test]
    fn port_matches_either_end_and_states_either_side() {
        use TcpState::*;
        let f = Filter {
            ports: [5000].into(),
            states: [CloseWait].into(),
            ..Default::default()
        };
        assert!(f.matches(&t(None, 5000, 1, Established, CloseWait)));
        assert!(f.matches(&t(None, 1, 5000, CloseWait, LastAck)));
        assert!(!f.matches(&t(None, 1, 5000, LastAck, Close)));
        assert!(!f.matches(&t(None, 1, 2, Established, CloseWait)));
    }

    #[test]
    fn family_filter() {
        let f = Filter {
            family: Some(Family::Ipv6),
            ..Default::default()
        };
        assert!(!f.matches(&t(None, 1, 2, TcpState::Close, TcpState::SynSent)));
    }
}
