//! decode -> tracker -> filter -> format, for one record at a time. Pure:
//! bytes in, lines out; the agent owns all I/O.

use std::sync::Arc;
use std::time::SystemTime;

use crate::engine::clock::WallClock;
use crate::engine::closewait::{CloseWaitDetector, LeakCandidate};
use crate::engine::decode::{self, tuple_key, DecodeError, Record, TupleKey};
use crate::engine::events::EventKind;
use crate::engine::filter::Filter;
use crate::engine::groups::LeakGroups;
use crate::engine::identity::{Identity, IdentityFilter, OwnerIdentity};
use crate::engine::state::TcpState;
use crate::engine::tracker::Tracker;
use crate::output::format::{Format, Lost};

/// Individual `leak` lines per group and window, by default.
pub const DEFAULT_LEAK_LINES_PER_GROUP: u32 = 10;
/// The window of that limit.
pub const LEAK_LINE_WINDOW_NS: u64 = 60_000_000_000;
/// How often `leak_group` summaries are printed, by default.
pub const DEFAULT_GROUP_REPORT_NS: u64 = 10_000_000_000;

/// A leak reported and not yet ended, for `tcptrace leaks`.
#[derive(Clone, Debug)]
pub struct CurrentLeak {
    /// Everything but its age.
    pub entry: crate::output::report::LeakEntry,
    /// Monotonic ns it entered CLOSE_WAIT.
    pub since_ns: u64,
}

/// The middle of the agent.
#[derive(Debug)]
pub struct Pipeline {
    /// Per-socket state.
    pub tracker: Tracker,
    /// What to show.
    pub filter: Filter,
    /// How to show it.
    pub format: Format,
    /// Kernel time to wall time.
    pub clock: WallClock,
    /// CLOSE_WAIT linger and leaks.
    pub closewait: CloseWaitDetector,
    /// Leak rate limits and group summaries.
    pub groups: LeakGroups,
    /// Which events are printed.
    pub events: crate::engine::events::EventSet,
    /// TIME_WAIT per destination, for port pressure.
    pub pressure: crate::engine::timewait::PortPressure,
    /// Leaks reported and not ended.
    pub current_leaks: std::collections::HashMap<TupleKey, CurrentLeak>,
    /// Records rejected by the decoder.
    pub malformed: u64,
    /// Leaks detected since start (reported or rate-limited alike).
    pub leaks_total: u64,
    /// Leaks reported whose origin stack, and whose last-use stack, the
    /// walk did not see whole ([`crate::engine::frame::is_truncated`]).
    pub truncated_stacks: (u64, u64),
    /// The kernel does not send the end of sockets (origin-map mode with
    /// no TIME_WAIT events): forget each one when it leaves CLOSE_WAIT.
    pub forget_after_close_wait: bool,
    /// Each network namespace's ephemeral port range, as last read (a
    /// namespace not read yet has the kernel's default).
    pub port_ranges: std::collections::HashMap<u32, crate::engine::timewait::PortRange>,
    /// Who owners are (unit, container, pod), for the lines that name
    /// one; none in tests and benchmarks.
    pub owners: Option<Owners>,
    /// `--unit`, `--container`, `--pod`: lines of other owners are not
    /// printed (the sockets are still tracked).
    pub owner_filter: IdentityFilter,
}

/// The pipeline's source of owners' identities.
pub struct Owners(pub Box<dyn OwnerIdentity>);

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Owners")
    }
}

impl Pipeline {
    /// A pipeline with an empty tracker; sockets in CLOSE_WAIT longer than
    /// `leak_after_ns` are leaks.
    pub fn new(filter: Filter, format: Format, clock: WallClock, leak_after_ns: u64) -> Self {
        Self {
            tracker: Tracker::default(),
            filter,
            format,
            clock,
            closewait: CloseWaitDetector::new(leak_after_ns),
            groups: LeakGroups::new(
                DEFAULT_LEAK_LINES_PER_GROUP,
                LEAK_LINE_WINDOW_NS,
                DEFAULT_GROUP_REPORT_NS,
            ),
            current_leaks: std::collections::HashMap::new(),
            events: [
                EventKind::StateChange,
                EventKind::CloseWait,
                EventKind::Leak,
                EventKind::PortPressure,
                EventKind::Summary,
            ]
            .into(),
            pressure: crate::engine::timewait::PortPressure::new(),
            malformed: 0,
            leaks_total: 0,
            truncated_stacks: (0, 0),
            forget_after_close_wait: false,
            port_ranges: std::collections::HashMap::new(),
            owners: None,
            owner_filter: IdentityFilter::default(),
        }
    }

    /// The current leaks (aged to `now_ns`) and TIME_WAIT counts, as the
    /// state file carries them.
    pub fn state_snapshot(&self, now_ns: u64) -> crate::output::report::Snapshot {
        crate::output::report::Snapshot {
            schema: crate::output::report::SNAPSHOT_SCHEMA,
            agent_pid: std::process::id(),
            taken_at: crate::output::format::rfc3339(std::time::SystemTime::now()),
            leaks: self
                .current_leaks
                .values()
                .map(|c| {
                    let mut e = c.entry.clone();
                    e.close_wait_ms = now_ns.saturating_sub(c.since_ns) as f64 / 1e6;
                    e
                })
                .collect(),
            time_wait: crate::output::report::time_wait_entries(&self.pressure, &self.port_ranges),
        }
    }

    /// The pipeline's numbers for the metrics endpoint; the agent adds what
    /// lives outside (lost records, outputs, its own CPU and memory).
    pub fn metrics_snapshot(&self) -> crate::output::metrics::Snapshot {
        crate::output::metrics::Snapshot {
            close_wait: self.closewait.lingering_by_owner(),
            linger: self.closewait.total_histogram().clone(),
            leaks_open: self.current_leaks.len() as u64,
            leaks_total: self.leaks_total,
            truncated_stacks: self.truncated_stacks,
            time_wait: self.pressure.counts(),
            malformed_total: self.malformed,
            tracked_sockets: self.tracker.len() as u64,
            tracker_evicted: self.tracker.evicted(),
            close_wait_dropped: self.closewait.dropped,
            ..Default::default()
        }
    }

    /// Handles one raw record (a batch: each of its records), appending
    /// its output lines to `out`; `Err` when it is malformed (counted,
    /// never fatal; a batch's good records are still handled).
    pub fn handle(&mut self, raw: &[u8], out: &mut Vec<String>) -> Result<(), DecodeError> {
        let decoded = decode::decode_each(raw, |r| self.handle_record(r, out));
        if decoded.is_err() {
            self.malformed += 1;
        }
        decoded
    }

    /// The identity of `t`'s owner, when the pipeline has a source.
    fn owner_identity(&mut self, t: &crate::engine::tracker::Transition) -> Option<Arc<Identity>> {
        let pid = t.owner.as_ref()?.pid;
        self.owners.as_mut()?.0.of(pid)
    }

    /// Handles one decoded record, appending its output lines to `out`.
    pub fn handle_record(&mut self, record: Record, out: &mut Vec<String>) {
        match record {
            Record::State(change) => {
                let t = self.tracker.on_state(change);
                if self.forget_after_close_wait && t.change.old == TcpState::CloseWait {
                    self.tracker.forget(t.change.sk);
                }
                let end = self.closewait.on_transition(&t);
                if t.enters_time_wait() {
                    let c = &t.change;
                    self.pressure.on_time_wait(
                        crate::engine::timewait::Dest {
                            netns: c.netns,
                            laddr: c.laddr,
                            raddr: c.raddr,
                            rport: c.rport,
                        },
                        c.lport,
                        c.ts_ns,
                        t.closer.as_ref().map(|k| (k.pid, k.comm.as_str())),
                    );
                }
                // A leak that ends: its holder's identity, for the
                // `leak_end` line (the holder has often exited by now).
                let mut ended: Option<CurrentLeak> = None;
                if t.change.new != TcpState::CloseWait {
                    let key = tuple_key(&t.change);
                    self.groups.on_end(&key);
                    if !self.current_leaks.is_empty() {
                        ended = self.current_leaks.remove(&key);
                    }
                }
                let prints = self.events.contains(&EventKind::StateChange)
                    || (end.is_some()
                        && (self.events.contains(&EventKind::CloseWait)
                            || self.events.contains(&EventKind::Leak)))
                    || (t.enters_time_wait() && self.events.contains(&EventKind::TimeWait));
                if prints && self.filter.matches(&t) {
                    let who = self
                        .owner_identity(&t)
                        .filter(|w| !w.is_empty())
                        .or_else(|| ended.map(|c| Arc::new(c.entry.identity)));
                    if !self.owner_filter.admits(who.as_deref()) {
                        return;
                    }
                    let who = who.as_deref();
                    let format = self.format;
                    let wall = self.clock.wall(t.change.ts_ns);
                    if self.events.contains(&EventKind::StateChange) {
                        out.push(format.with_identity(format.transition(&t, wall), who));
                    }
                    if let Some(end) = end {
                        if self.events.contains(&EventKind::CloseWait) {
                            let line = format.close_wait_end(&end, wall, false);
                            out.push(format.with_identity(line, who));
                        }
                        if end.was_leak && self.events.contains(&EventKind::Leak) {
                            let line = format.close_wait_end(&end, wall, true);
                            out.push(format.with_identity(line, who));
                        }
                    }
                    if self.events.contains(&EventKind::TimeWait) && t.enters_time_wait() {
                        out.push(format.with_identity(format.time_wait(&t, wall), who));
                    }
                }
            }
            Record::Reset(reset) => self.tracker.on_reset(&reset),
            Record::Accept(accept) => {
                self.tracker.on_accept(&accept);
                if let Some(known) = self.tracker.known(accept.sk) {
                    self.closewait.refresh(accept.sk, &known);
                }
            }
        }
    }

    /// After lost records: the CLOSE_WAIT detector made to agree with a
    /// sock_diag dump (see [`crate::engine::closewait::CloseWaitDetector::reconcile`]);
    /// a socket whose exit was lost stops being a current leak.
    pub fn reconcile_close_waits(
        &mut self,
        listed: Vec<crate::engine::closewait::Found>,
        dump_ns: u64,
    ) -> crate::engine::closewait::Reconciled {
        let (reconciled, gone) = self.closewait.reconcile(listed, dump_ns);
        for key in &gone {
            self.groups.on_end(key);
            self.current_leaks.remove(key);
        }
        reconciled
    }

    /// Sockets that became leaks by `now_ns` and pass the filter.
    pub fn due_leaks(&mut self, now_ns: u64) -> Vec<LeakCandidate> {
        let filter = &self.filter;
        let due: Vec<LeakCandidate> = self
            .closewait
            .due(now_ns)
            .into_iter()
            .filter(|c| filter.matches(&c.entered))
            .collect();
        self.leaks_total += due.len() as u64;
        due
    }

    /// The line reporting `lost` records.
    pub fn lost_line(&self, lost: Lost) -> String {
        self.format.lost(lost, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::raw;
    use crate::engine::events::{kernel_interest, uses_origin_map};
    use tcptrace_common::tcp_state as k;

    /// A JSON pipeline with no filter and a fixed clock.
    fn pipeline(leak_after_ns: u64) -> Pipeline {
        Pipeline::new(
            Filter::default(),
            Format::Json,
            WallClock::with_offset_ns(0),
            leak_after_ns,
        )
    }

    #[test]
    fn a_client_life_becomes_json_lines() {
        let mut p = pipeline(u64::MAX);
        let states = [
            (k::CLOSE, k::SYN_SENT),
            (k::SYN_SENT, k::ESTABLISHED),
            (k::ESTABLISHED, k::FIN_WAIT1),
            (k::FIN_WAIT1, k::FIN_WAIT2),
            (k::FIN_WAIT2, k::CLOSE),
        ];
        let mut lines = Vec::new();
        for (i, (old, new)) in states.into_iter().enumerate() {
            let mut rec = raw::ipv4_state(
                1,
                i as u64 * 1_000_000,
                old,
                new,
                ([127, 0, 0, 1], 4),
                ([127, 0, 0, 1], 5),
            );
            if i == 0 {
                rec.connect_fd = 3;
            }
            p.handle(&raw::state_bytes(&rec), &mut lines)
                .expect("valid");
        }
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert!(v[0]["prev_state_ms"].is_null());
        assert_eq!(v[1]["prev_state_ms"], 1.0);
        assert_eq!(v[4]["new"], "CLOSE");
        assert!(v.iter().all(|l| l["pid"] == 100 && l["fd"] == 3));
        assert!(p.tracker.is_empty());
    }

    /// Feeds a client's and a server's whole lives ([`raw::CLIENT_LIFE`],
    /// [`raw::SERVER_LIFE`]) side by side, 10 ms a step, leaks due 8 ms
    /// into each step; with `masks` (new, old) only what the kernel would
    /// send. Returns (records fed, leaks found).
    fn feed_client_and_server(
        p: &mut Pipeline,
        masks: Option<(u32, u32)>,
        out: &mut Vec<String>,
    ) -> (usize, usize) {
        let (mut sent, mut leaks) = (0, 0);
        let lives = raw::CLIENT_LIFE.into_iter().zip(raw::SERVER_LIFE);
        for (i, ((c_old, c_new), (s_old, s_new))) in lives.enumerate() {
            let ts = i as u64 * 10_000_000;
            for (sk, old, new, ports) in [(1, c_old, c_new, (4, 5)), (2, s_old, s_new, (5, 4))] {
                let wanted = masks.is_none_or(|(n, o)| n & (1 << new) != 0 || o & (1 << old) != 0);
                if !wanted {
                    continue;
                }
                sent += 1;
                let rec = raw::ipv4_state(
                    sk,
                    ts,
                    old,
                    new,
                    ([127, 0, 0, 1], ports.0),
                    ([127, 0, 0, 1], ports.1),
                );
                p.handle(&raw::state_bytes(&rec), out).expect("valid");
            }
            leaks += p.due_leaks(ts + 8_000_000).len();
        }
        (sent, leaks)
    }

    #[test]
    fn the_kernel_filter_keeps_every_detector_output() {
        // A client that closes first (TIME_WAIT) and a server that lingers
        // in CLOSE_WAIT then closes; fed whole, and as the kernel sends
        // them with the default events' masks.
        let default_events: crate::engine::events::EventSet = [
            EventKind::CloseWait,
            EventKind::Leak,
            EventKind::TimeWait,
            EventKind::PortPressure,
            EventKind::Summary,
        ]
        .into();
        let (new_mask, old_mask) = kernel_interest(&default_events, false);
        let run = |filtered: bool| {
            let mut p = pipeline(5_000_000);
            p.events = default_events;
            let mut out = Vec::new();
            let masks = filtered.then_some((new_mask, old_mask));
            let (_, leaks) = feed_client_and_server(&mut p, masks, &mut out);
            (out, leaks, p.tracker.len())
        };
        let (all, all_leaks, _) = run(false);
        let (some, some_leaks, left) = run(true);
        assert_eq!(all, some, "the same events from fewer records");
        assert_eq!(
            (all_leaks, some_leaks),
            (1, 1),
            "the CLOSE_WAIT leak either way"
        );
        assert_eq!(left, 0, "nothing left behind in the tracker");
        assert!(all.iter().any(|l| l.contains("\"time_wait\"")));
        assert!(all.iter().any(|l| l.contains("\"close_wait_end\"")));
        let everything = kernel_interest(&[EventKind::StateChange].into(), true);
        assert_eq!(everything, (u32::MAX, u32::MAX));
        assert_eq!(new_mask & (1 << k::ESTABLISHED), 0, "not sent by default");
    }

    #[test]
    fn with_the_origin_map_a_leak_costs_two_records_and_leaves_nothing() {
        // Leak events only: the kernel keeps origins and sends nothing but
        // CLOSE_WAIT entries and exits; the tracker must still find the
        // leak and must not keep sockets whose end it never sees.
        let events: crate::engine::events::EventSet = [EventKind::Leak].into();
        assert!(uses_origin_map(&events, &Filter::default()));
        let pid_filter = Filter {
            pids: [7].into(),
            ..Filter::default()
        };
        assert!(!uses_origin_map(&events, &pid_filter), "--pid needs owners");
        let close_wait: crate::engine::events::EventSet =
            [EventKind::Leak, EventKind::CloseWait].into();
        assert!(!uses_origin_map(&close_wait, &Filter::default()));
        let (new_mask, old_mask) = kernel_interest(&events, true);
        assert_eq!(new_mask, 1 << k::CLOSE_WAIT);
        assert_eq!(old_mask, 1 << k::CLOSE_WAIT);
        let (tw_new, _) = kernel_interest(&[EventKind::PortPressure].into(), true);
        assert_eq!(
            tw_new,
            1 << k::CLOSE_WAIT | 1 << k::FIN_WAIT1 | 1 << k::CLOSE,
            "TIME_WAIT still needs the closer and the CLOSE"
        );
        let mut p = pipeline(5_000_000);
        p.events = events;
        p.forget_after_close_wait = true;
        let (sent, leaks) =
            feed_client_and_server(&mut p, Some((new_mask, old_mask)), &mut Vec::new());
        assert_eq!(sent, 2, "entering and leaving CLOSE_WAIT");
        assert_eq!(leaks, 1);
        assert!(p.tracker.is_empty(), "nothing left behind");
    }

    #[test]
    fn time_wait_events_only_when_asked() {
        let life = [
            (k::CLOSE, k::SYN_SENT),
            (k::SYN_SENT, k::ESTABLISHED),
            (k::ESTABLISHED, k::FIN_WAIT1),
            (k::FIN_WAIT1, k::FIN_WAIT2),
            (k::FIN_WAIT2, k::CLOSE),
        ];
        let run = |events: &[EventKind]| {
            let mut p = pipeline(u64::MAX);
            p.events = events.iter().copied().collect();
            let mut out = Vec::new();
            for (i, (old, new)) in life.into_iter().enumerate() {
                let rec = raw::ipv4_state(
                    3,
                    i as u64,
                    old,
                    new,
                    ([127, 0, 0, 1], 4),
                    ([127, 0, 0, 1], 5),
                );
                p.handle(&raw::state_bytes(&rec), &mut out).expect("valid");
            }
            out
        };
        let only_tw = run(&[EventKind::TimeWait]);
        assert_eq!(only_tw.len(), 1, "{only_tw:?}");
        let v: serde_json::Value = serde_json::from_str(&only_tw[0]).expect("json");
        assert_eq!(v["event"], "time_wait");
        assert_eq!(v["from"], "FIN_WAIT2");
        assert_eq!(v["closer_pid"], 100);
        assert!(run(&[EventKind::StateChange])
            .iter()
            .all(|l| l.contains("\"state_change\"")));
    }

    #[test]
    fn close_wait_end_follows_the_transition_out_of_close_wait() {
        let mut p = pipeline(u64::MAX);
        let mut out = Vec::new();
        for (ts, old, new) in [
            (0, k::ESTABLISHED, k::CLOSE_WAIT),
            (5_000_000, k::CLOSE_WAIT, k::LAST_ACK),
        ] {
            let rec = raw::ipv4_state(2, ts, old, new, ([127, 0, 0, 1], 5), ([127, 0, 0, 1], 4));
            p.handle(&raw::state_bytes(&rec), &mut out).expect("valid");
        }
        assert_eq!(out.len(), 3, "{out:?}");
        let end: serde_json::Value = serde_json::from_str(&out[2]).expect("json");
        assert_eq!(end["event"], "close_wait_end");
        assert_eq!(end["close_wait_ms"], 5.0);
        assert_eq!(end["leak"], false);
        assert!(p.due_leaks(u64::MAX).is_empty());
    }

    #[test]
    fn malformed_records_are_counted_and_do_not_stop_the_stream() {
        let mut p = pipeline(u64::MAX);
        let mut out = Vec::new();
        assert!(p.handle(&[1, 2, 3], &mut out).is_err());
        assert!(p.handle(&[0; 200], &mut out).is_err());
        assert_eq!(p.malformed, 2);
        let rec = raw::ipv4_state(
            1,
            0,
            k::CLOSE,
            k::SYN_SENT,
            ([127, 0, 0, 1], 4),
            ([127, 0, 0, 1], 5),
        );
        p.handle(&raw::state_bytes(&rec), &mut out).expect("valid");
        assert_eq!(out.len(), 1);
    }
}
