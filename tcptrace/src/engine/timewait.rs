//! Ephemeral-port pressure from TIME_WAIT, per destination. Pure: fed
//! TIME_WAIT entries, kernel dumps and a clock.
//!
//! Each connection the local side closes first keeps its local port in
//! TIME_WAIT for 60 s (TCP_TIMEWAIT_LEN, whatever `tcp_fin_timeout` says).
//! Toward one (local address, remote address, remote port) only the
//! ephemeral range is available, so when TIME_WAIT sockets fill it,
//! `connect()` fails with EADDRNOTAVAIL. The tracker counts them per
//! destination from live events, replaces its counts with the kernel's
//! (a sock_diag dump) whenever it gets one, and reports a destination when
//! it crosses 50 %, 80 % and 95 % of the range, each level once until the
//! count falls well below it again.

use std::collections::HashMap;
use std::net::IpAddr;

/// How long a TIME_WAIT socket lives on Linux.
pub const TIME_WAIT_NS: u64 = 60_000_000_000;

/// Levels, in percent of the usable port range.
pub const LEVELS: [u32; 3] = [50, 80, 95];

/// A level re-arms once the share falls this many points below it.
pub const REARM_POINTS: u32 = 10;

/// A destination, as far as the local port space is concerned.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    /// Network namespace inode (port spaces are per namespace).
    pub netns: Option<u32>,
    /// Local address.
    pub laddr: IpAddr,
    /// Remote address.
    pub raddr: IpAddr,
    /// Remote port.
    pub rport: u16,
}

/// `net.ipv4.ip_local_port_range` and `tcp_tw_reuse` of a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub low: u16,
    /// Last port.
    pub high: u16,
    /// `tcp_tw_reuse`: 0 off, 1 on, 2 loopback only.
    pub tw_reuse: u8,
}

impl PortRange {
    /// Ports in the range.
    pub fn size(&self) -> u32 {
        u32::from(self.high.saturating_sub(self.low)) + 1
    }

    /// Parses the text of `ip_local_port_range` ("32768\t60999").
    pub fn parse(range: &str, tw_reuse: &str) -> Option<Self> {
        let mut it = range.split_whitespace().map(str::parse::<u16>);
        let (Some(Ok(low)), Some(Ok(high))) = (it.next(), it.next()) else {
            return None;
        };
        (low <= high).then_some(Self {
            low,
            high,
            tw_reuse: tw_reuse.trim().parse().unwrap_or(2),
        })
    }
}

/// Linux's default range, when a namespace's cannot be read.
pub const DEFAULT_RANGE: PortRange = PortRange {
    low: 32768,
    high: 60999,
    tw_reuse: 2,
};

/// One destination's TIME_WAIT sockets.
#[derive(Debug, Default)]
struct DestState {
    /// Local port -> (monotonic ns it entered TIME_WAIT, closer pid).
    sockets: HashMap<u16, (u64, Option<u32>)>,
    /// TIME_WAIT entries seen live, by closer pid, with its comm.
    created_by: HashMap<u32, (String, u64)>,
    /// Live entries in the last rate window.
    recent: Vec<u64>,
    /// Highest level reported and not re-armed (0: none).
    level: u32,
}

/// A destination crossed a level.
#[derive(Clone, Debug, PartialEq)]
pub struct PressureEvent {
    /// The destination.
    pub dest: Dest,
    /// The level crossed, percent.
    pub level: u32,
    /// Sockets in TIME_WAIT toward it now.
    pub count: u64,
    /// Usable ports.
    pub range: PortRange,
    /// New TIME_WAIT sockets per second, over the last 10 s.
    pub rate_per_s: f64,
    /// Processes that created the most of them: (pid, comm, count).
    pub top_closers: Vec<(u32, String, u64)>,
}

impl PressureEvent {
    /// Share of the port range in use, percent.
    pub fn share(&self) -> f64 {
        self.count as f64 * 100.0 / f64::from(self.range.size())
    }

    /// What to do about it, in one line.
    pub fn suggestion(&self) -> String {
        let reuse = match self.range.tw_reuse {
            1 => "tcp_tw_reuse is on",
            2 if self.dest.raddr.is_loopback() => "tcp_tw_reuse=2 covers this loopback destination",
            _ => "consider net.ipv4.tcp_tw_reuse=1 (safe for outgoing connections)",
        };
        format!(
            "reuse connections (pooling, HTTP keep-alive) instead of opening one per request; \
             let the server close first if the protocol allows, so TIME_WAIT lands there; {reuse}; \
             widen net.ipv4.ip_local_port_range; SO_REUSEADDR only helps restarting listeners"
        )
    }
}

/// Rate window.
const RATE_WINDOW_NS: u64 = 10_000_000_000;

/// Tracks TIME_WAIT per destination.
#[derive(Debug, Default)]
pub struct PortPressure {
    dests: HashMap<Dest, DestState>,
}

impl PortPressure {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection from `lport` entered TIME_WAIT at `ts_ns`, closed first
    /// by `closer` (pid, comm) when known.
    pub fn on_time_wait(
        &mut self,
        dest: Dest,
        lport: u16,
        ts_ns: u64,
        closer: Option<(u32, &str)>,
    ) {
        let d = self.dests.entry(dest).or_default();
        d.sockets.insert(lport, (ts_ns, closer.map(|c| c.0)));
        d.recent.push(ts_ns);
        if let Some((pid, comm)) = closer {
            let e = d
                .created_by
                .entry(pid)
                .or_insert_with(|| (comm.to_string(), 0));
            e.1 += 1;
        }
    }

    /// Replaces the counts with the kernel's truth: `sockets` are every
    /// TIME_WAIT socket of one namespace now, as (destination, local port,
    /// ms until it expires). Destinations of that namespace not in the dump
    /// have none.
    pub fn reconcile(&mut self, netns: Option<u32>, sockets: &[(Dest, u16, u32)], now_ns: u64) {
        let mut fresh: HashMap<Dest, HashMap<u16, (u64, Option<u32>)>> = HashMap::new();
        for (dest, lport, expires_ms) in sockets {
            let age_ns = TIME_WAIT_NS.saturating_sub(u64::from(*expires_ms) * 1_000_000);
            let known = self
                .dests
                .get(dest)
                .and_then(|d| d.sockets.get(lport))
                .copied();
            let entry = known.unwrap_or((now_ns.saturating_sub(age_ns), None));
            fresh.entry(dest.clone()).or_default().insert(*lport, entry);
        }
        for (dest, d) in self.dests.iter_mut().filter(|(k, _)| k.netns == netns) {
            d.sockets = fresh.remove(dest).unwrap_or_default();
        }
        for (dest, sockets) in fresh {
            self.dests.entry(dest).or_default().sockets = sockets;
        }
    }

    /// Processes that created the most TIME_WAIT sockets toward `dest`
    /// (as seen live): (pid, comm, count), at most `n`.
    pub fn top_closers(&self, dest: &Dest, n: usize) -> Vec<(u32, String, u64)> {
        let Some(d) = self.dests.get(dest) else {
            return Vec::new();
        };
        let mut top: Vec<(u32, String, u64)> = d
            .created_by
            .iter()
            .map(|(pid, (comm, n))| (*pid, comm.clone(), *n))
            .collect();
        top.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        top.truncate(n);
        top
    }

    /// Sockets in TIME_WAIT toward `dest` now.
    pub fn count(&self, dest: &Dest) -> u64 {
        self.dests.get(dest).map_or(0, |d| d.sockets.len() as u64)
    }

    /// Every destination with its count, largest first.
    pub fn counts(&self) -> Vec<(Dest, u64)> {
        let mut v: Vec<(Dest, u64)> = self
            .dests
            .iter()
            .map(|(k, d)| (k.clone(), d.sockets.len() as u64))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }

    /// Expires sockets past 60 s and returns the levels crossed upward
    /// since the last call; `range_of` gives a namespace's port range.
    pub fn check(
        &mut self,
        now_ns: u64,
        range_of: impl Fn(Option<u32>) -> PortRange,
    ) -> Vec<PressureEvent> {
        let mut out = Vec::new();
        for (dest, d) in &mut self.dests {
            d.sockets
                .retain(|_, (since, _)| now_ns.saturating_sub(*since) < TIME_WAIT_NS);
            d.recent
                .retain(|t| now_ns.saturating_sub(*t) < RATE_WINDOW_NS);
            let range = range_of(dest.netns);
            let count = d.sockets.len() as u64;
            let share = count * 100 / u64::from(range.size());
            // Re-arm levels the share fell well below.
            while d.level > 0 && share + u64::from(REARM_POINTS) < u64::from(d.level) {
                d.level = LEVELS
                    .iter()
                    .rev()
                    .copied()
                    .find(|&l| l < d.level)
                    .unwrap_or(0);
            }
            let reached = LEVELS
                .iter()
                .copied()
                .filter(|&l| share >= u64::from(l))
                .max();
            if let Some(level) = reached.filter(|&l| l > d.level) {
                d.level = level;
                out.push((dest.clone(), level, count, range, d.recent.len()));
            }
        }
        let mut out: Vec<PressureEvent> = out
            .into_iter()
            .map(|(dest, level, count, range, recent)| PressureEvent {
                top_closers: self.top_closers(&dest, 3),
                dest,
                level,
                count,
                range,
                rate_per_s: recent as f64 * 1e9 / RATE_WINDOW_NS as f64,
            })
            .collect();
        self.dests
            .retain(|_, d| !d.sockets.is_empty() || d.level > 0 || !d.recent.is_empty());
        out.sort_by(|a, b| b.level.cmp(&a.level).then(b.count.cmp(&a.count)));
        out
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn dest() -> Dest {
        Dest {
            netns: Some(1),
            laddr: "127.0.0.1".parse().expect("ip"),
            raddr: "127.0.0.1".parse().expect("ip"),
            rport: 5000,
        }
    }

    fn range(n: u16) -> PortRange {
        PortRange {
            low: 40000,
            high: 40000 + n - 1,
            tw_reuse: 0,
        }
    }

    #[test]
    fn parses_the_sysctls() {
        assert_eq!(
            PortRange::parse("32768\t60999\n", "2\n"),
            Some(PortRange {
                low: 32768,
                high: 60999,
                tw_reuse: 2
            })
        );
        assert_eq!(PortRange::parse("5 1", "0"), None);
        assert_eq!(PortRange::parse("x", "0"), None);
        assert_eq!(DEFAULT_RANGE.size(), 28232);
    }

    #[test]
    fn levels_fire_once_with_hysteresis() {
        let mut p = PortPressure::new();
        let mut fired = Vec::new();
        for port in 0..96u16 {
            p.on_time_wait(dest(), 40000 + port, S, Some((7, "churn")));
            fired.extend(
                p.check(2 * S, |_| range(100))
                    .into_iter()
                    .map(|e| (e.level, e.count)),
            );
        }
        assert_eq!(fired, [(50, 50), (80, 80), (95, 95)]);
        // Nothing more while it stays high.
        assert!(p.check(3 * S, |_| range(100)).is_empty());
        // All expire 60 s later: levels re-arm.
        assert!(p.check(62 * S, |_| range(100)).is_empty());
        assert_eq!(p.count(&dest()), 0);
        for port in 0..60u16 {
            p.on_time_wait(dest(), 40000 + port, 63 * S, Some((7, "churn")));
        }
        let again = p.check(64 * S, |_| range(100));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].level, 50);
        assert_eq!(again[0].top_closers[0].0, 7);
        assert!(again[0].suggestion().contains("tcp_tw_reuse=1"));
    }

    #[test]
    fn reconcile_takes_the_kernels_counts() {
        let mut p = PortPressure::new();
        p.on_time_wait(dest(), 40001, 90 * S, Some((7, "churn")));
        p.on_time_wait(dest(), 40002, 90 * S, None);
        // The kernel knows 40002 (reused: 40001 gone) and two the agent missed.
        p.reconcile(
            Some(1),
            &[
                (dest(), 40002, 50_000),
                (dest(), 40003, 59_000),
                (dest(), 40004, 1_000),
            ],
            100 * S,
        );
        assert_eq!(p.count(&dest()), 3);
        // 40004 had 1 s left: it expires first.
        p.check(101 * S + S / 2, |_| range(100));
        assert_eq!(p.count(&dest()), 2);
        // A dump of another namespace leaves this one alone; an empty dump of
        // this one clears it.
        p.reconcile(Some(2), &[], 102 * S);
        assert_eq!(p.count(&dest()), 2);
        p.reconcile(Some(1), &[], 102 * S);
        assert_eq!(p.count(&dest()), 0);
    }
}
