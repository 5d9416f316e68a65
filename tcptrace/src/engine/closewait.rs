//! CLOSE_WAIT linger and leak detection. Pure: fed transitions and a clock.
//!
//! A socket in CLOSE_WAIT has received its peer's FIN; only its owner's
//! `close()` (or `shutdown()`) moves it on, to LAST_ACK. The detector
//! remembers every socket that enters CLOSE_WAIT until it leaves: when it
//! leaves, a [`CloseWaitEnd`] says how long it stayed; when it stays longer
//! than the threshold, it becomes a leak, reported once ([`LeakCandidate`],
//! enriched by the agent with owners and the origin stack), and a
//! [`LeakEnd`] follows if it ever closes.

use std::collections::HashMap;
use std::net::IpAddr;

// Inventory sockets are matched to later transitions by namespace and
// four-tuple (unique within a namespace): sock_diag gives no kernel address.
use crate::engine::decode::Task;
use crate::engine::decode::TupleKey;
use crate::engine::state::TcpState;
use crate::engine::tracker::{Known, Transition};

/// A socket found in CLOSE_WAIT, as the detector's seed.
pub struct Found {
    /// A synthetic ESTABLISHED -> CLOSE_WAIT transition.
    pub entered: Transition,
    /// Estimated monotonic time it entered CLOSE_WAIT.
    pub since_ns: u64,
}

/// A socket that left CLOSE_WAIT.
#[derive(Clone, Debug, PartialEq)]
pub struct CloseWaitEnd {
    /// The transition out of CLOSE_WAIT (its context task is the closer
    /// when `new` is LAST_ACK: it runs inside the owner's `close()`).
    pub transition: Transition,
    /// Milliseconds spent in CLOSE_WAIT.
    pub close_wait_ms: f64,
    /// True when the socket had been reported as a leak.
    pub was_leak: bool,
}

/// A socket in CLOSE_WAIT for longer than the threshold, reported once.
#[derive(Clone, Debug, PartialEq)]
pub struct LeakCandidate {
    /// The transition into CLOSE_WAIT (four-tuple, netns, owner, origin, inode).
    pub entered: Transition,
    /// Milliseconds in CLOSE_WAIT so far.
    pub close_wait_ms: f64,
    /// True for a socket found by the start-up inventory: its age is an
    /// estimate (time since the last data received) and its origin unknown.
    pub estimated: bool,
}

fn tuple_of(t: &Transition) -> TupleKey {
    let c = &t.change;
    (c.netns, c.laddr, c.lport, c.raddr, c.rport)
}

/// Four-tuples with their namespace, for [`CloseWaitDetector::reconcile`]'s
/// matching: the same socket when the keys are equal, or when one side
/// does not know the namespace (no BTF) and the four-tuples are equal.
struct TupleIndex {
    keys: std::collections::HashSet<TupleKey>,
    /// The four-tuples alone, of every key.
    bare: std::collections::HashSet<(IpAddr, u16, IpAddr, u16)>,
}

impl TupleIndex {
    fn new(keys: impl Iterator<Item = TupleKey>) -> Self {
        let keys: std::collections::HashSet<TupleKey> = keys.collect();
        let bare = keys.iter().map(|k| (k.1, k.2, k.3, k.4)).collect();
        Self { keys, bare }
    }

    fn contains(&self, k: &TupleKey) -> bool {
        self.keys.contains(k)
            || self.keys.contains(&(None, k.1, k.2, k.3, k.4))
            || (k.0.is_none() && self.bare.contains(&(k.1, k.2, k.3, k.4)))
    }
}

/// What [`CloseWaitDetector::reconcile`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Remembered sockets no longer in CLOSE_WAIT: their exit was lost.
    pub gone: usize,
    /// Sockets in CLOSE_WAIT the detector did not know: their entry was lost.
    pub found: usize,
}

/// Inventory sockets get keys from this range, which no kernel address uses.
const SEED_KEY_BASE: u64 = 1;

/// A leaked socket that finally left CLOSE_WAIT.
pub type LeakEnd = CloseWaitEnd;

/// Per-process histogram of CLOSE_WAIT linger times, in powers of ten of
/// milliseconds: `<1ms, <10ms, <100ms, <1s, <10s, <100s, >=100s`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LingerHistogram {
    /// Counts per bucket.
    pub buckets: [u64; 7],
    /// Sum of all linger times, milliseconds.
    pub sum_ms: f64,
    /// Number of samples.
    pub count: u64,
}

/// Upper bounds (exclusive, milliseconds) of the first six buckets.
pub const LINGER_BOUNDS_MS: [f64; 6] = [1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

impl LingerHistogram {
    /// Adds one linger time.
    pub fn record(&mut self, ms: f64) {
        let i = LINGER_BOUNDS_MS
            .iter()
            .position(|&b| ms < b)
            .unwrap_or(LINGER_BOUNDS_MS.len());
        self.buckets[i] += 1;
        self.sum_ms += ms;
        self.count += 1;
    }

    /// Adds the samples of `other`.
    pub fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.sum_ms += other.sum_ms;
        self.count += other.count;
    }
}

#[derive(Debug)]
struct Lingering {
    entered: Transition,
    since_ns: u64,
    leaked: bool,
    estimated: bool,
}

/// Most processes with a histogram at once; past that the smallest goes.
const MAX_HISTOGRAMS: usize = 4096;
/// Most sockets remembered in CLOSE_WAIT at once.
pub const DEFAULT_MAX_LINGERING: usize = 262_144;

/// Tracks sockets in CLOSE_WAIT.
#[derive(Debug)]
pub struct CloseWaitDetector {
    leak_after_ns: u64,
    lingering: crate::engine::tracker::FastMap<u64, Lingering>,
    max_lingering: usize,
    histograms: HashMap<u32, LingerHistogram>,
    /// Every linger time since start, never evicted (a Prometheus histogram
    /// must only grow).
    total: LingerHistogram,
    /// Inventory sockets by four-tuple, to their seed key.
    seeded: HashMap<TupleKey, u64>,
    next_seed: u64,
    /// Sockets not remembered because the table was full.
    pub dropped: u64,
}

fn ms_between(from_ns: u64, to_ns: u64) -> f64 {
    to_ns.saturating_sub(from_ns) as f64 / 1e6
}

impl CloseWaitDetector {
    /// A detector calling a socket leaked after `leak_after_ns` in CLOSE_WAIT.
    pub fn new(leak_after_ns: u64) -> Self {
        Self::with_capacity(leak_after_ns, DEFAULT_MAX_LINGERING)
    }

    /// As [`CloseWaitDetector::new`], remembering at most `max` sockets.
    pub fn with_capacity(leak_after_ns: u64, max: usize) -> Self {
        Self {
            leak_after_ns,
            lingering: crate::engine::tracker::FastMap::default(),
            max_lingering: max.max(1),
            histograms: HashMap::new(),
            total: LingerHistogram::default(),
            seeded: HashMap::new(),
            next_seed: SEED_KEY_BASE,
            dropped: 0,
        }
    }

    /// Remembers a socket that was in CLOSE_WAIT before the agent started
    /// (from the inventory), since about `since_ns`.
    pub fn seed(&mut self, mut entered: Transition, since_ns: u64) {
        let key = self.next_seed;
        self.next_seed += 1;
        // A unique stand-in for the unknown kernel address.
        entered.change.sk = key;
        if self.lingering.len() >= self.max_lingering {
            self.dropped += 1;
            return;
        }
        self.seeded.insert(tuple_of(&entered), key);
        self.lingering.insert(
            key,
            Lingering {
                entered,
                since_ns,
                leaked: false,
                estimated: true,
            },
        );
    }

    /// The remembered socket `t` is about, by address or, for inventory
    /// sockets, by four-tuple.
    fn take(&mut self, t: &Transition) -> Option<Lingering> {
        if let Some(l) = self.lingering.remove(&t.change.sk) {
            return Some(l);
        }
        let key = self.seeded.remove(&tuple_of(t))?;
        self.lingering.remove(&key)
    }

    /// Sockets in CLOSE_WAIT now.
    pub fn lingering(&self) -> usize {
        self.lingering.len()
    }

    /// Linger histograms by owner pid (`0` when the owner is unknown).
    pub fn histograms(&self) -> &HashMap<u32, LingerHistogram> {
        &self.histograms
    }

    /// Every linger time since start, all processes together.
    pub fn total_histogram(&self) -> &LingerHistogram {
        &self.total
    }

    /// Sockets in CLOSE_WAIT now by owner: `(pid, comm, count)`, most first;
    /// pid `0` and an empty comm when the owner is unknown.
    pub fn lingering_by_owner(&self) -> Vec<(u32, String, u64)> {
        let mut by: HashMap<u32, (String, u64)> = HashMap::new();
        for l in self.lingering.values() {
            let (pid, comm) = l
                .entered
                .owner
                .as_ref()
                .map_or((0, ""), |o| (o.pid, o.comm.as_str()));
            let e = by.entry(pid).or_insert_with(|| (comm.to_string(), 0));
            e.1 += 1;
        }
        let mut v: Vec<(u32, String, u64)> = by
            .into_iter()
            .map(|(pid, (comm, n))| (pid, comm, n))
            .collect();
        v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
        v
    }

    /// One line per process (most CLOSE_WAIT closes first, at most `top`):
    /// how many, the mean linger and how many lingered a second or more.
    pub fn linger_summary(&self, top: usize) -> Vec<String> {
        let mut by: Vec<(&u32, &LingerHistogram)> = self.histograms.iter().collect();
        by.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        by.into_iter()
            .take(top)
            .map(|(pid, h)| {
                let slow: u64 = h.buckets[4..].iter().sum();
                let who = if *pid == 0 {
                    "unknown owner".to_string()
                } else {
                    format!("pid {pid}")
                };
                format!(
                    "{who}: {} sockets left CLOSE_WAIT, mean {:.1} ms, {slow} after 1 s or more",
                    h.count,
                    h.sum_ms / h.count.max(1) as f64
                )
            })
            .collect()
    }

    /// Feeds one transition; returns the end of a CLOSE_WAIT when this
    /// transition ends one.
    pub fn on_transition(&mut self, t: &Transition) -> Option<CloseWaitEnd> {
        let c = &t.change;
        // An entry given twice (the kernel's CLOSE_WAITS table read by the
        // agent, then sent by the kernel at the exit) changes nothing.
        let repeated = c.new == TcpState::CloseWait
            && self
                .lingering
                .get(&c.sk)
                .is_some_and(|l| l.since_ns == c.ts_ns);
        if repeated {
            return None;
        }
        // Leaving CLOSE_WAIT, or a new life under the same address (the
        // CLOSE was lost): either way the remembered socket is gone.
        let ended = if c.new == TcpState::CloseWait {
            // A live entry replaces any inventory record of the same socket.
            if let Some(key) = self.seeded.remove(&tuple_of(t)) {
                self.lingering.remove(&key);
            }
            None
        } else {
            self.take(t)
        };
        let end = ended.and_then(|l| {
            // Only a real exit from CLOSE_WAIT has a meaningful duration.
            (c.old == TcpState::CloseWait).then(|| {
                let ms = ms_between(l.since_ns, c.ts_ns);
                let pid = t.owner.as_ref().map_or(0, |o| o.pid);
                self.record_linger(pid, ms);
                CloseWaitEnd {
                    transition: t.clone(),
                    close_wait_ms: ms,
                    was_leak: l.leaked,
                }
            })
        });
        if c.new == TcpState::CloseWait {
            if self.lingering.len() >= self.max_lingering && !self.lingering.contains_key(&c.sk) {
                self.dropped += 1;
            } else {
                self.lingering.insert(
                    c.sk,
                    Lingering {
                        entered: t.clone(),
                        since_ns: c.ts_ns,
                        leaked: false,
                        estimated: false,
                    },
                );
            }
        }
        end
    }

    /// After lost records: makes the remembered sockets agree with
    /// `listed`, the sockets (as [`Found`]) a sock_diag
    /// dump that began at `dump_ns` found in CLOSE_WAIT, once every record
    /// sent before the dump has been handled.
    ///
    /// A remembered socket that entered before the dump and is not listed
    /// left CLOSE_WAIT unseen: it is forgotten with no end reported (its
    /// duration is unknown), where it would have become a leak growing
    /// forever; its four-tuple is returned so that the caller forgets it as
    /// a current leak too. A listed socket not remembered entered unseen:
    /// it is remembered as the inventory's are, with an estimated age, where
    /// its leak would have gone unreported. Without a namespace on either
    /// side (no BTF), the four-tuple alone matches.
    pub fn reconcile(&mut self, listed: Vec<Found>, dump_ns: u64) -> (Reconciled, Vec<TupleKey>) {
        let listed_index = TupleIndex::new(listed.iter().map(|f| tuple_of(&f.entered)));
        let gone: Vec<(u64, TupleKey)> = self
            .lingering
            .iter()
            .filter(|(_, l)| l.since_ns < dump_ns)
            .map(|(key, l)| (*key, tuple_of(&l.entered)))
            .filter(|(_, tuple)| !listed_index.contains(tuple))
            .collect();
        for (key, tuple) in &gone {
            self.lingering.remove(key);
            if self.seeded.get(tuple) == Some(key) {
                self.seeded.remove(tuple);
            }
        }
        let remembered = TupleIndex::new(self.lingering.values().map(|l| tuple_of(&l.entered)));
        let mut found = 0;
        for f in listed {
            if !remembered.contains(&tuple_of(&f.entered)) {
                self.seed(f.entered, f.since_ns);
                found += 1;
            }
        }
        let report = Reconciled {
            gone: gone.len(),
            found,
        };
        (report, gone.into_iter().map(|(_, tuple)| tuple).collect())
    }

    /// Learns what the tracker learned after the socket entered CLOSE_WAIT
    /// (an `accept()` that came later names the owner and origin).
    pub fn refresh(&mut self, sk: u64, known: &Known) {
        if let Some(l) = self.lingering.get_mut(&sk) {
            if l.entered.owner.is_none() {
                l.entered.owner.clone_from(&known.owner);
            }
            if l.entered.origin.is_none() {
                l.entered.origin.clone_from(&known.origin);
            }
            if l.entered.ino.is_none() {
                l.entered.ino = known.ino;
            }
        }
    }

    /// Sockets that crossed the threshold since the last call, at `now_ns`.
    pub fn due(&mut self, now_ns: u64) -> Vec<LeakCandidate> {
        let mut out: Vec<LeakCandidate> = self
            .lingering
            .values_mut()
            .filter(|l| !l.leaked && now_ns.saturating_sub(l.since_ns) >= self.leak_after_ns)
            .map(|l| {
                l.leaked = true;
                LeakCandidate {
                    entered: l.entered.clone(),
                    close_wait_ms: ms_between(l.since_ns, now_ns),
                    estimated: l.estimated,
                }
            })
            .collect();
        // Oldest first: the one that matters most comes out first.
        out.sort_by(|a, b| b.close_wait_ms.total_cmp(&a.close_wait_ms));
        out
    }

    /// Tasks are forgotten as they exit; histograms of the smallest
    /// processes go first when too many are kept.
    fn record_linger(&mut self, pid: u32, ms: f64) {
        if self.histograms.len() >= MAX_HISTOGRAMS && !self.histograms.contains_key(&pid) {
            if let Some(smallest) = self
                .histograms
                .iter()
                .min_by_key(|(_, h)| h.count)
                .map(|(pid, _)| *pid)
            {
                self.histograms.remove(&smallest);
            }
        }
        self.histograms.entry(pid).or_default().record(ms);
        self.total.record(ms);
    }
}

/// The task that moved a socket out of CLOSE_WAIT.
pub fn closer(end: &CloseWaitEnd) -> &Task {
    &end.transition.change.ctx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{Family, StateChange};
    use crate::engine::tracker::{Owner, Tracker};
    use std::net::{IpAddr, Ipv4Addr};
    use TcpState::*;

    const MS: u64 = 1_000_000;

    fn change(sk: u64, ts_ms: u64, old: TcpState, new: TcpState) -> StateChange {
        StateChange {
            ts_ns: ts_ms * MS,
            sk,
            netns: Some(1),
            family: Family::Ipv4,
            laddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            lport: 5000,
            raddr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            rport: 40000 + sk as u16,
            old,
            new,
            ctx: Task {
                pid: 9,
                tid: 9,
                comm: "ctx".into(),
            },
            connect_fd: None,
            stack_id: None,
            ino: None,
        }
    }

    /// Drives tracker and detector together, as the agent does.
    fn feed(
        tr: &mut Tracker,
        d: &mut CloseWaitDetector,
        c: StateChange,
    ) -> (Transition, Option<CloseWaitEnd>) {
        let t = tr.on_state(c);
        let end = d.on_transition(&t);
        (t, end)
    }

    #[test]
    fn prompt_close_gives_close_wait_end_and_no_leak() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(30_000 * MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        assert!(d.due(10 * MS).is_empty());
        let (_, end) = feed(&mut tr, &mut d, change(1, 25, CloseWait, LastAck));
        let end = end.expect("close_wait_end");
        assert_eq!(end.close_wait_ms, 25.0);
        assert!(!end.was_leak);
        assert_eq!(closer(&end).pid, 9);
        assert_eq!(d.lingering(), 0);
        assert!(d.due(60_000 * MS).is_empty());
        assert_eq!(d.histograms()[&0].buckets[2], 1, "25 ms lands in <100ms");
        assert_eq!(
            d.linger_summary(5),
            ["unknown owner: 1 sockets left CLOSE_WAIT, mean 25.0 ms, 0 after 1 s or more"]
        );
    }

    #[test]
    fn a_leak_is_reported_once_then_ends() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        assert!(d.due(999 * MS).is_empty());
        let due = d.due(1_500 * MS);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].close_wait_ms, 1_500.0);
        assert!(
            d.due(5_000 * MS).is_empty(),
            "one leak event, not one per tick"
        );
        let (_, end) = feed(&mut tr, &mut d, change(1, 7_000, CloseWait, LastAck));
        let end = end.expect("leak end");
        assert!(end.was_leak);
        assert_eq!(end.close_wait_ms, 7_000.0);
    }

    #[test]
    fn an_entry_given_twice_keeps_the_leak_and_its_end() {
        // The agent read the entry from the kernel's CLOSE_WAITS table and
        // reported the leak; at the exit the kernel sends the same entry
        // again, then the exit.
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        assert_eq!(d.due(1_500 * MS).len(), 1);
        let (_, again) = feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        assert!(again.is_none());
        assert!(d.due(5_000 * MS).is_empty(), "still one leak");
        let (_, end) = feed(&mut tr, &mut d, change(1, 7_000, CloseWait, LastAck));
        let end = end.expect("leak end");
        assert!(end.was_leak, "the repeat did not reset the leak");
        assert_eq!(end.close_wait_ms, 7_000.0);
        // A later entry of the same address is a new stay.
        feed(&mut tr, &mut d, change(1, 8_000, Established, CloseWait));
        assert_eq!(d.lingering(), 1);
    }

    /// `sk`'s socket as a sock_diag dump lists it (no kernel address),
    /// in CLOSE_WAIT since `since_ms`, in namespace `netns`.
    fn listed(sk: u64, since_ms: u64, netns: Option<u32>) -> Found {
        let mut c = change(sk, since_ms, Established, CloseWait);
        c.sk = 0;
        c.netns = netns;
        Found {
            entered: Tracker::default().on_state(c),
            since_ns: since_ms * MS,
        }
    }

    #[test]
    fn reconcile_forgets_a_socket_whose_exit_was_lost() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        feed(&mut tr, &mut d, change(2, 0, Established, CloseWait));
        // Socket 1's exit was lost: the dump at 500 ms lists only socket 2.
        let (r, gone) = d.reconcile(vec![listed(2, 0, Some(1))], 500 * MS);
        assert_eq!(r, Reconciled { gone: 1, found: 0 });
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].4, 40001, "socket 1's four-tuple");
        // Only socket 2 becomes a leak: no leak growing forever for 1.
        let due = d.due(60_000 * MS);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].entered.change.sk, 2);
        // Socket 2's real exit still has its true duration.
        let (_, end) = feed(&mut tr, &mut d, change(2, 70_000, CloseWait, LastAck));
        assert_eq!(end.expect("end").close_wait_ms, 70_000.0);
    }

    #[test]
    fn reconcile_keeps_a_socket_that_entered_after_the_dump_began() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        feed(&mut tr, &mut d, change(1, 600, Established, CloseWait));
        let (r, _) = d.reconcile(Vec::new(), 500 * MS);
        assert_eq!(r, Reconciled::default());
        assert_eq!(d.lingering(), 1);
    }

    #[test]
    fn reconcile_remembers_a_socket_whose_entry_was_lost() {
        // (Kernel addresses, never the small keys inventory sockets get.)
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        feed(&mut tr, &mut d, change(11, 0, Established, CloseWait));
        let (r, gone) = d.reconcile(
            vec![listed(11, 0, Some(1)), listed(13, 100, Some(1))],
            500 * MS,
        );
        assert_eq!(r, Reconciled { gone: 0, found: 1 });
        assert!(gone.is_empty());
        let due = d.due(2_000 * MS);
        assert_eq!(due.len(), 2);
        let found = due.iter().find(|c| c.entered.change.rport == 40013);
        assert!(found.is_some_and(|c| c.estimated), "{due:?}");
        // Its exit, when it comes, is matched by four-tuple.
        let (_, end) = feed(&mut tr, &mut d, change(13, 3_000, CloseWait, LastAck));
        assert!(end.is_some_and(|e| e.was_leak));
        // A second reconcile with the same dump changes nothing more.
        let (r, _) = d.reconcile(vec![listed(11, 0, Some(1))], 3_500 * MS);
        assert_eq!(r, Reconciled::default());
    }

    #[test]
    fn reconcile_without_namespaces_matches_the_four_tuple() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        let mut c = change(1, 0, Established, CloseWait);
        c.netns = None;
        feed(&mut tr, &mut d, c);
        let (r, _) = d.reconcile(vec![listed(1, 0, Some(7))], 500 * MS);
        assert_eq!(r, Reconciled::default(), "the same socket");
        assert_eq!(d.lingering(), 1);
    }

    #[test]
    fn linger_histograms_merge() {
        let mut a = LingerHistogram::default();
        a.record(5.0);
        let mut b = LingerHistogram::default();
        b.record(0.5);
        b.record(2_000.0);
        a.merge(&b);
        assert_eq!(a.count, 3);
        assert_eq!(a.buckets[..5], [1, 1, 0, 0, 1]);
        assert_eq!(a.sum_ms, 2_005.5);
    }

    #[test]
    fn leaks_come_oldest_first() {
        let mut d = CloseWaitDetector::new(MS);
        let mut tr = Tracker::default();
        feed(&mut tr, &mut d, change(1, 50, Established, CloseWait));
        feed(&mut tr, &mut d, change(2, 10, Established, CloseWait));
        let due = d.due(100 * MS);
        assert_eq!(due[0].entered.change.sk, 2);
    }

    #[test]
    fn reused_address_does_not_inherit_the_lingering_socket() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        // The CLOSE was lost; the address comes back as a new client.
        let (_, end) = feed(&mut tr, &mut d, change(1, 100, Close, SynSent));
        assert!(
            end.is_none(),
            "no linger time for a socket we did not see leave"
        );
        assert_eq!(d.lingering(), 0);
        assert!(d.due(1_000 * MS).is_empty());
    }

    #[test]
    fn owner_learned_after_entering_close_wait_is_kept() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(MS));
        feed(&mut tr, &mut d, change(1, 0, Established, CloseWait));
        let known = Known {
            owner: Some(Owner {
                pid: 50,
                fd: Some(4),
                comm: "srv".into(),
            }),
            origin: None,
            ino: Some(3),
        };
        d.refresh(1, &known);
        let due = d.due(10 * MS);
        assert_eq!(due[0].entered.owner.as_ref().map(|o| o.pid), Some(50));
        assert_eq!(due[0].entered.ino, Some(3));
    }

    #[test]
    fn capacity_is_bounded_and_overflow_counted() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::with_capacity(MS, 2));
        for sk in 0..5 {
            feed(&mut tr, &mut d, change(sk, 0, Established, CloseWait));
        }
        assert_eq!(d.lingering(), 2);
        assert_eq!(d.dropped, 3);
    }

    #[test]
    fn inventory_socket_leaks_with_an_estimate_and_ends_by_tuple() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::new(1_000 * MS));
        let seed = tr.on_state(change(0, 0, Established, CloseWait));
        d.seed(seed, 0);
        let due = d.due(2_000 * MS);
        assert_eq!(due.len(), 1);
        assert!(due[0].estimated);
        // The owner finally closes: the transition has the real address.
        let mut close = change(0, 3_000, CloseWait, LastAck);
        close.sk = 0xffff_8888_0000_0000; // the real address, never seen before
        let (_, end) = feed(&mut tr, &mut d, close);
        let end = end.expect("matched by four-tuple");
        assert!(end.was_leak);
        assert_eq!(d.lingering(), 0);
    }

    #[test]
    fn histogram_buckets() {
        let mut h = LingerHistogram::default();
        for ms in [0.5, 5.0, 50.0, 500.0, 5_000.0, 50_000.0, 500_000.0] {
            h.record(ms);
        }
        assert_eq!(h.buckets, [1; 7]);
        assert_eq!(h.count, 7);
    }

    #[test]
    fn lingering_by_owner_and_the_total_histogram() {
        let (mut tr, mut d) = (Tracker::default(), CloseWaitDetector::with_capacity(MS, 4));
        let srv = Known {
            owner: Some(Owner {
                pid: 50,
                fd: Some(4),
                comm: "srv".into(),
            }),
            origin: None,
            ino: None,
        };
        for sk in 1..=3 {
            feed(&mut tr, &mut d, change(sk, 0, Established, CloseWait));
        }
        d.refresh(1, &srv);
        d.refresh(2, &srv);
        assert_eq!(
            d.lingering_by_owner(),
            [(50, "srv".to_string(), 2), (0, String::new(), 1)]
        );
        feed(&mut tr, &mut d, change(3, 2, CloseWait, LastAck));
        feed(&mut tr, &mut d, change(1, 2_000, CloseWait, LastAck));
        assert_eq!(d.lingering_by_owner(), [(50, "srv".to_string(), 1)]);
        let total = d.total_histogram();
        assert_eq!(total.count, 2);
        assert_eq!(total.buckets[1], 1, "2 ms");
        assert_eq!(total.buckets[4], 1, "2 s");
    }
}
