//! Leak groups: a program that leaks thousands of sockets from one call
//! site must not flood the collector, and the biggest or oldest leak must
//! never hide behind the rate limit. Pure: fed leaks and a clock.
//!
//! A group is (owner process, the service the sockets talk to, namespace,
//! last-use stack, origin stack): in a pool, the code that used a socket
//! last tells a forgotten checkout from a connection idle in the pool,
//! which share their origin. The service is the remote endpoint of outgoing
//! connections and the local endpoint of accepted ones (their remote
//! ports are all different). Each group gets at most `lines_per_window` individual `leak`
//! lines per window; every `report_every` a `leak_group` summary (count,
//! oldest age, lines suppressed) is due for each group that still has
//! leaked sockets.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::engine::tracker::Syscall;

/// A leaked socket's identity: namespace and four-tuple (inventory sockets
/// have no kernel address).
pub type Member = crate::engine::decode::TupleKey;

/// What makes leaks "the same leak".
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// Owner pid (first holder, else the origin's pid; 0 when unknown).
    pub pid: u32,
    /// Owner command name.
    pub comm: String,
    /// How the connections were made (`None`: unknown origin, grouped by
    /// remote endpoint).
    pub side: Option<Syscall>,
    /// Service address: remote for connect, local for accept.
    pub service_addr: IpAddr,
    /// Service port: remote for connect, local for accept.
    pub service_port: u16,
    /// Network namespace of the socket.
    pub netns: Option<u32>,
    /// Origin stack id (`None`: unknown origin).
    pub stack_id: Option<u32>,
    /// Last-use checkout stack id (`None`: unknown).
    pub last_use_stack_id: Option<u32>,
    /// The last use's thread name, where its stack has no frame of the
    /// program's own (an interpreter's, a libc wrapper alone): then the
    /// thread is what tells code paths apart.
    pub last_use_thread: Option<String>,
}

/// A group's state, as reported in `leak_group`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupReport {
    /// The group.
    pub key: GroupKey,
    /// Sockets of the group in CLOSE_WAIT now.
    pub count: u64,
    /// Monotonic ns when the oldest of them entered CLOSE_WAIT.
    pub oldest_since_ns: u64,
    /// Monotonic ns when the newest of them entered CLOSE_WAIT.
    pub newest_since_ns: u64,
    /// New leaks per minute (see [`growth_per_min`]).
    pub growth_per_min: f64,
    /// Individual `leak` lines not printed because of the limit, in total.
    pub suppressed: u64,
    /// The one-line summary of the group's first leak: the call site.
    pub example: String,
}

#[derive(Debug)]
struct Group {
    /// Leaked sockets now, with the time they entered CLOSE_WAIT.
    members: HashMap<Member, u64>,
    window_start_ns: u64,
    lines_in_window: u32,
    suppressed: u64,
    example: String,
}

/// Rate limits and summarizes leaks per group.
#[derive(Debug)]
pub struct LeakGroups {
    lines_per_window: u32,
    window_ns: u64,
    report_every_ns: u64,
    last_report_ns: u64,
    groups: HashMap<GroupKey, Group>,
    member_of: HashMap<Member, GroupKey>,
}

impl LeakGroups {
    /// At most `lines_per_window` leak lines per group per `window_ns`;
    /// summaries every `report_every_ns`.
    pub fn new(lines_per_window: u32, window_ns: u64, report_every_ns: u64) -> Self {
        Self {
            lines_per_window,
            window_ns,
            report_every_ns,
            last_report_ns: 0,
            groups: HashMap::new(),
            member_of: HashMap::new(),
        }
    }

    /// A socket `sk` (in CLOSE_WAIT since `since_ns`) of group `key` leaked
    /// at `now_ns`: returns true when its own `leak` line should be printed.
    /// `example` describes it, kept when it starts a group.
    pub fn on_leak(
        &mut self,
        key: GroupKey,
        sk: Member,
        since_ns: u64,
        now_ns: u64,
        example: impl FnOnce() -> String,
    ) -> bool {
        let group = self.groups.entry(key.clone()).or_insert_with(|| Group {
            members: HashMap::new(),
            window_start_ns: now_ns,
            lines_in_window: 0,
            suppressed: 0,
            example: example(),
        });
        group.members.insert(sk, since_ns);
        self.member_of.insert(sk, key);
        if now_ns.saturating_sub(group.window_start_ns) >= self.window_ns {
            group.window_start_ns = now_ns;
            group.lines_in_window = 0;
        }
        if group.lines_in_window < self.lines_per_window {
            group.lines_in_window += 1;
            true
        } else {
            group.suppressed += 1;
            false
        }
    }

    /// A leaked socket left CLOSE_WAIT (or its life ended).
    pub fn on_end(&mut self, sk: &Member) {
        if self.member_of.is_empty() {
            return;
        }
        if let Some(key) = self.member_of.remove(sk) {
            if let Some(group) = self.groups.get_mut(&key) {
                group.members.remove(sk);
                if group.members.is_empty() {
                    self.groups.remove(&key);
                }
            }
        }
    }

    /// Summaries due at `now_ns`: every group with leaked sockets, largest
    /// first, once per `report_every_ns`.
    pub fn due_reports(&mut self, now_ns: u64) -> Vec<GroupReport> {
        if self.groups.is_empty()
            || now_ns.saturating_sub(self.last_report_ns) < self.report_every_ns
        {
            return Vec::new();
        }
        self.last_report_ns = now_ns;
        self.reports(now_ns)
    }

    /// Every group at `now_ns`, largest first, then oldest first.
    pub fn reports(&self, now_ns: u64) -> Vec<GroupReport> {
        let mut out: Vec<GroupReport> = self
            .groups
            .iter()
            .filter_map(|(key, g)| {
                let oldest = g.members.values().min()?;
                let newest = g.members.values().max()?;
                Some(GroupReport {
                    key: key.clone(),
                    count: g.members.len() as u64,
                    oldest_since_ns: *oldest,
                    newest_since_ns: *newest,
                    growth_per_min: growth_per_min(
                        g.members
                            .values()
                            .map(|&since| now_ns.saturating_sub(since) as f64 / 1e6),
                    ),
                    suppressed: g.suppressed,
                    example: g.example.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then(a.oldest_since_ns.cmp(&b.oldest_since_ns))
        });
        out
    }
}

/// How far back a group's growth looks: five minutes.
pub const GROWTH_WINDOW_MS: f64 = 5.0 * 60_000.0;

/// New leaks per minute from the ages (ms in CLOSE_WAIT) of a group's
/// sockets: those younger than [`GROWTH_WINDOW_MS`], over the window, or
/// over the oldest's age when the group is younger (at least a minute, so
/// that a first burst does not read as thousands per minute).
///
/// The two shapes a pool gives: sockets idle in the pool, closed by the
/// peer, are bounded by the pool size and close at their next checkout,
/// so their growth falls to zero; forgotten checkouts keep growing.
pub fn growth_per_min(ages_ms: impl Iterator<Item = f64>) -> f64 {
    let (mut recent, mut oldest) = (0u64, 0f64);
    for age in ages_ms {
        oldest = oldest.max(age);
        if age < GROWTH_WINDOW_MS {
            recent += 1;
        }
    }
    let span_ms = oldest.clamp(60_000.0, GROWTH_WINDOW_MS);
    recent as f64 / (span_ms / 60_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn m(n: u64) -> Member {
        (
            Some(1),
            "127.0.0.1".parse().expect("ip"),
            n as u16,
            "10.0.0.3".parse().expect("ip"),
            3306,
        )
    }

    fn key(pid: u32, stack: u32) -> GroupKey {
        GroupKey {
            pid,
            comm: "svc".into(),
            side: Some(Syscall::Connect),
            service_addr: "10.0.0.3".parse().expect("ip"),
            service_port: 3306,
            netns: Some(1),
            stack_id: Some(stack),
            last_use_stack_id: None,
            last_use_thread: None,
        }
    }

    #[test]
    fn two_thousand_leaks_give_a_bounded_number_of_lines() {
        let mut g = LeakGroups::new(10, 60 * S, 10 * S);
        let printed = (0..2000)
            .filter(|&sk| g.on_leak(key(1, 7), m(sk), sk, 100 * S, String::new))
            .count();
        assert_eq!(printed, 10);
        let reports = g.due_reports(100 * S);
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].count, 2000);
        assert_eq!(reports[0].suppressed, 1990);
        assert_eq!(reports[0].oldest_since_ns, 0);
        assert!(g.due_reports(105 * S).is_empty(), "once per interval");
        assert_eq!(g.due_reports(110 * S).len(), 1);
    }

    #[test]
    fn growth_tells_a_steady_leak_from_a_bounded_one() {
        let min = 60_000.0;
        // Four idle pooled sockets, closed by the peer ten minutes ago.
        assert_eq!(growth_per_min([10.0 * min; 4].into_iter()), 0.0);
        // One a minute for the last ten minutes: five in the window.
        let steady = (0..10).map(|i| f64::from(i) * min + 1.0);
        assert_eq!(growth_per_min(steady), 1.0);
        // A first burst of 30 within seconds: per minute, not per second.
        assert_eq!(growth_per_min([5_000.0; 30].into_iter()), 30.0);
        // Two minutes old: over two minutes.
        assert_eq!(growth_per_min([2.0 * min, 1.0].into_iter()), 1.0);
        assert_eq!(growth_per_min(std::iter::empty()), 0.0);
    }

    #[test]
    fn reports_give_the_newest_and_the_growth() {
        let mut g = LeakGroups::new(10, 60 * S, S);
        g.on_leak(key(1, 7), m(1), 10 * S, 20 * S, String::new);
        g.on_leak(key(1, 7), m(2), 40 * S, 41 * S, String::new);
        let r = &g.reports(70 * S)[0];
        assert_eq!((r.oldest_since_ns, r.newest_since_ns), (10 * S, 40 * S));
        assert_eq!(r.growth_per_min, 2.0);
        // The same origin with another last use is another group.
        let mut other = key(1, 7);
        other.last_use_stack_id = Some(9);
        g.on_leak(other, m(3), 40 * S, 41 * S, String::new);
        assert_eq!(g.reports(70 * S).len(), 2);
    }

    #[test]
    fn the_window_reopens() {
        let mut g = LeakGroups::new(1, 60 * S, 10 * S);
        assert!(g.on_leak(key(1, 7), m(1), 0, 0, String::new));
        assert!(!g.on_leak(key(1, 7), m(2), 0, S, String::new));
        assert!(g.on_leak(key(1, 7), m(3), 0, 61 * S, String::new));
    }

    #[test]
    fn groups_are_separate_and_sorted_by_size() {
        let mut g = LeakGroups::new(10, 60 * S, S);
        g.on_leak(key(1, 7), m(1), 5, 10 * S, String::new);
        for sk in 2..5 {
            g.on_leak(key(2, 8), m(sk), 50, 10 * S, String::new);
        }
        let r = g.due_reports(10 * S);
        assert_eq!(r.iter().map(|r| r.count).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn ended_leaks_leave_their_group_and_empty_groups_vanish() {
        let mut g = LeakGroups::new(10, 60 * S, S);
        g.on_leak(key(1, 7), m(1), 0, 0, String::new);
        g.on_leak(key(1, 7), m(2), 3, 0, String::new);
        g.on_end(&m(1));
        let r = g.reports(10);
        assert_eq!((r[0].count, r[0].oldest_since_ns), (1, 3));
        g.on_end(&m(2));
        g.on_end(&m(99));
        assert!(g.reports(10).is_empty());
        assert!(g.due_reports(100 * S).is_empty());
    }
}
