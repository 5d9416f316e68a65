//! Formatting of events as JSON lines or aligned text. Pure: takes events
//! and wall times, returns lines; writing them is the caller's job.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::engine::clock::WallClock;
use crate::engine::closewait::CloseWaitEnd;
use crate::engine::frame::Frame;
use crate::engine::groups::GroupReport;
use crate::engine::identity::Identity;
use crate::engine::lastuse::LastUse;
use crate::engine::leak::Holder;
use crate::engine::leak::{summary, Leak};
use crate::engine::tracker::Transition;

/// Version of the JSON line schema documented in the README. Bump it when a
/// field changes meaning or disappears; adding a field does not bump it.
pub const SCHEMA_VERSION: u32 = 2;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line (schema in the README).
    Json,
    /// Aligned columns for people.
    Text,
}

/// Records the kernel could not deliver, as one output event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lost {
    /// Records lost since the previous report.
    pub lost: u64,
    /// Records lost since the agent started.
    pub lost_total: u64,
    /// Of those, lost because the ring buffer was full.
    pub ring_full_total: u64,
    /// Of those, never written: the kernel skipped the program because
    /// another BPF program was running on the same CPU.
    pub missed_total: u64,
}

impl Lost {
    /// What to do about it, by cause.
    pub fn advice(&self) -> &'static str {
        if self.ring_full_total >= self.missed_total {
            "the ring buffer was full; raise --ring-buffer-size"
        } else {
            "the kernel skipped the program while another BPF program ran on the same CPU \
             (softirq nesting); affected sockets are resolved through sock_diag"
        }
    }
}

/// The agent's counts for the periodic `summary` event: proof of life on a
/// quiet host, and drop counters while running.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Seconds since the agent started.
    pub uptime_s: u64,
    /// Transitions since the previous summary.
    pub transitions: u64,
    /// Transitions since start.
    pub transitions_total: u64,
    /// Sockets in CLOSE_WAIT now.
    pub close_wait: u64,
    /// Leaks reported and not yet closed.
    pub leaks_open: u64,
    /// Leaks detected since start.
    pub leaks_total: u64,
    /// Sockets in TIME_WAIT now.
    pub time_wait: u64,
    /// Sockets the tracker remembers.
    pub tracked_sockets: u64,
    /// Ring-buffer records lost since start.
    pub lost_total: u64,
    /// Malformed records since start.
    pub malformed_total: u64,
    /// Per output: (name, lines written, lines dropped) since start.
    pub outputs: Vec<(String, u64, u64)>,
}

impl Summary {
    /// The summary of a metrics snapshot; `transitions_before` is the total at
    /// the previous summary.
    pub fn of(
        s: &crate::output::metrics::Snapshot,
        uptime_s: u64,
        transitions_before: u64,
    ) -> Self {
        let transitions_total = s.transitions.iter().map(|(_, n)| n).sum::<u64>();
        Self {
            uptime_s,
            transitions: transitions_total.saturating_sub(transitions_before),
            transitions_total,
            close_wait: s.close_wait.iter().map(|c| c.2).sum(),
            leaks_open: s.leaks_open,
            leaks_total: s.leaks_total,
            time_wait: s.time_wait.iter().map(|t| t.1).sum(),
            tracked_sockets: s.tracked_sockets,
            lost_total: s.lost_ring_full + s.lost_missed,
            malformed_total: s.malformed_total,
            outputs: s.outputs.clone(),
        }
    }
}

/// RFC 3339, UTC, microseconds: `2026-11-24T19:00:00.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// A `state_change` line, written field by field ([`crate::output::jsonline`]):
/// the line printed for every transition, up to a million a second, where
/// a derived serializer (with the owner fields flattened in) cost about a
/// microsecond. Same bytes as serde would write (checked by
/// `json_line_has_the_documented_fields_in_order`).
fn state_change_json(t: &Transition, wall: SystemTime) -> String {
    let c = &t.change;
    let owner = t.owner.as_ref();
    let mut line = crate::output::jsonline::JsonLine::with_capacity(LINE_CAPACITY);
    line.u64("schema", u64::from(SCHEMA_VERSION))
        .rfc3339_micros("ts", wall)
        .str("event", "state_change")
        .str("family", c.family.name())
        .ip("laddr", c.laddr)
        .u64("lport", u64::from(c.lport))
        .ip("raddr", c.raddr)
        .u64("rport", u64::from(c.rport))
        .opt_u64("netns", c.netns.map(u64::from))
        .str("old", c.old.name())
        .str("new", c.new.name())
        .opt_f64("prev_state_ms", t.prev_state_ms.map(round_ms))
        .hex("sk", c.sk)
        .opt_u64("pid", owner.map(|o| u64::from(o.pid)))
        .opt_i64("fd", owner.and_then(|o| o.fd).map(i64::from))
        .opt_str("comm", owner.map(|o| o.comm.as_str()))
        .u64("ctx_pid", u64::from(c.ctx.pid))
        .u64("ctx_tid", u64::from(c.ctx.tid))
        .str("ctx_comm", &c.ctx.comm);
    line.finish()
}

/// The socket's owner and the task that made the change, shared by the
/// per-transition events.
#[derive(Serialize)]
struct OwnerAndContext<'a> {
    pid: Option<u32>,
    fd: Option<i32>,
    comm: Option<&'a str>,
    ctx_pid: u32,
    ctx_tid: u32,
    ctx_comm: &'a str,
}

impl<'a> OwnerAndContext<'a> {
    fn of(t: &'a Transition) -> Self {
        Self {
            pid: t.owner.as_ref().map(|o| o.pid),
            fd: t.owner.as_ref().and_then(|o| o.fd),
            comm: t.owner.as_ref().map(|o| o.comm.as_str()),
            ctx_pid: t.change.ctx.pid,
            ctx_tid: t.change.ctx.tid,
            ctx_comm: &t.change.ctx.comm,
        }
    }
}

/// The four-tuple and socket identity shared by the per-socket events.
#[derive(Serialize)]
struct SocketFields {
    family: &'static str,
    laddr: String,
    lport: u16,
    raddr: String,
    rport: u16,
    netns: Option<u32>,
    sk: String,
}

impl SocketFields {
    fn of(t: &Transition) -> Self {
        let c = &t.change;
        Self {
            family: c.family.name(),
            laddr: c.laddr.to_string(),
            lport: c.lport,
            raddr: c.raddr.to_string(),
            rport: c.rport,
            netns: c.netns,
            sk: format!("{:x}", c.sk),
        }
    }
}

#[derive(Serialize)]
struct CloseWaitEndLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    #[serde(flatten)]
    socket: SocketFields,
    close_wait_ms: f64,
    leak: bool,
    #[serde(flatten)]
    who: OwnerAndContext<'a>,
}

#[derive(Serialize)]
struct TimeWaitLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    #[serde(flatten)]
    socket: SocketFields,
    from: &'static str,
    closer_pid: Option<u32>,
    closer_comm: Option<&'a str>,
    #[serde(flatten)]
    who: OwnerAndContext<'a>,
}

#[derive(Serialize)]
struct CloserCount<'a> {
    pid: u32,
    comm: &'a str,
    time_waits: u64,
}

#[derive(Serialize)]
struct PortPressureLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    netns: Option<u32>,
    laddr: String,
    raddr: String,
    rport: u16,
    level: u32,
    count: u64,
    range_size: u32,
    share_pct: f64,
    rate_per_s: f64,
    tw_reuse: u8,
    top_closers: Vec<CloserCount<'a>>,
    suggestion: String,
}

#[derive(Serialize)]
struct OriginFields<'a> {
    syscall: &'static str,
    pid: u32,
    tid: u32,
    comm: &'a str,
    fd: Option<i32>,
    ts: String,
    stack: &'a [Frame],
    #[serde(flatten)]
    walk: StackWalk,
}

/// How a stack was walked and whether the walk saw all of it.
#[derive(Serialize)]
struct StackWalk {
    /// `fp`: by frame pointers (the kernel's `bpf_get_stackid`); `cfi`:
    /// from the binaries' unwind tables, over the kernel's copy of the
    /// stack (see [`crate::host::unwind`]).
    unwind: &'static str,
    /// The walk stopped short of the thread's entry (see
    /// [`crate::engine::frame::is_truncated`]).
    truncated: bool,
}

impl StackWalk {
    /// The walk of `stack`, whose id is `stack_id`.
    fn of(stack: &[Frame], stack_id: Option<u32>) -> Self {
        Self {
            unwind: crate::host::unwind::method(stack_id),
            truncated: crate::engine::frame::is_truncated(stack),
        }
    }
}

#[derive(Serialize)]
struct LastUseFields<'a> {
    direction: &'static str,
    syscall: Option<&'static str>,
    pid: u32,
    tid: u32,
    comm: &'a str,
    ts: String,
    before_fin_ms: f64,
    last_io_ts: String,
    last_io_direction: &'static str,
    last_io_before_fin_ms: f64,
    checkouts: u32,
    ios: u32,
    stack: &'a [Frame],
    #[serde(flatten)]
    walk: StackWalk,
}

#[derive(Serialize)]
struct LeakLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    #[serde(flatten)]
    socket: SocketFields,
    ino: Option<u64>,
    close_wait_ms: f64,
    since: String,
    estimated: bool,
    reason: &'static str,
    recv_q: Option<u64>,
    owner: &'a [Holder],
    origin: Option<OriginFields<'a>>,
    last_use: Option<LastUseFields<'a>>,
    message: String,
}

#[derive(Serialize)]
struct LeakGroupLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    pid: u32,
    comm: &'a str,
    side: &'static str,
    service: String,
    netns: Option<u32>,
    count: u64,
    oldest_ms: f64,
    newest_ms: f64,
    growth_per_min: f64,
    suppressed: u64,
    example: &'a str,
}

#[derive(Serialize)]
struct LostLine {
    schema: u32,
    ts: String,
    event: &'static str,
    lost: u64,
    lost_total: u64,
    ring_full_total: u64,
    missed_total: u64,
}

#[derive(Serialize)]
struct SummaryLine<'a> {
    schema: u32,
    ts: String,
    event: &'static str,
    uptime_s: u64,
    transitions: u64,
    transitions_total: u64,
    close_wait: u64,
    leaks_open: u64,
    leaks_total: u64,
    time_wait: u64,
    tracked_sockets: u64,
    lost_total: u64,
    malformed_total: u64,
    outputs: Vec<OutputCounts<'a>>,
}

#[derive(Serialize)]
struct OutputCounts<'a> {
    output: &'a str,
    written: u64,
    dropped: u64,
}

/// Room for a typical `state_change` line, so that writing it does not
/// reallocate.
const LINE_CAPACITY: usize = 512;

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail (no maps with non-string
    // keys, no I/O); fall back to an explicit error object just in case.
    serde_json::to_string(value)
        .unwrap_or_else(|e| format!("{{\"event\":\"error\",\"error\":{:?}}}", e.to_string()))
}

/// Time of day for text lines: `19:00:00.123456` (UTC).
fn time_of_day(t: SystemTime) -> String {
    let ts = rfc3339(t);
    ts.get(11..26).map_or_else(|| ts.clone(), str::to_string)
}

/// Milliseconds rounded to microseconds, so that lines stay short.
fn round_ms(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

impl Format {
    /// A header line to print once before the events, if the format has one.
    pub fn header(self) -> Option<String> {
        match self {
            Self::Json => None,
            Self::Text => Some(format!(
                "{:<15} {:<10} {:<23} {:<23} {:<12}    {:<12} {:>10} {:>7} {:>4} {:<15} {}",
                "TIME(UTC)",
                "NETNS",
                "LOCAL",
                "REMOTE",
                "OLD",
                "NEW",
                "MS",
                "PID",
                "FD",
                "COMM",
                "CONTEXT"
            )),
        }
    }

    /// One transition, without the trailing newline.
    pub fn transition(self, t: &Transition, wall: SystemTime) -> String {
        let c = &t.change;
        match self {
            Self::Json => state_change_json(t, wall),
            Self::Text => {
                // Addresses get 23 columns ("255.255.255.255:65535" and short
                // IPv6 fit); a long IPv6 address pushes the rest of its line.
                let mut line = String::with_capacity(160);
                let time = time_of_day(wall);
                let endpoint = |addr: &std::net::IpAddr, port: u16| match addr {
                    std::net::IpAddr::V4(a) => format!("{a}:{port}"),
                    std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
                };
                let ms = t
                    .prev_state_ms
                    .map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}"));
                let netns = c.netns.map_or_else(|| "-".to_string(), |n| n.to_string());
                let (pid, fd, comm) = match &t.owner {
                    Some(o) => (
                        o.pid.to_string(),
                        o.fd.map_or_else(|| "-".to_string(), |fd| fd.to_string()),
                        o.comm.as_str(),
                    ),
                    None => ("-".to_string(), "-".to_string(), "-"),
                };
                let _ = write!(
                    line,
                    "{:<15} {:<10} {:<23} {:<23} {:<12} -> {:<12} {:>10} {:>7} {:>4} {:<15} {}/{}",
                    time,
                    netns,
                    endpoint(&c.laddr, c.lport),
                    endpoint(&c.raddr, c.rport),
                    c.old,
                    c.new,
                    ms,
                    pid,
                    fd,
                    comm,
                    c.ctx.pid,
                    c.ctx.comm
                );
                line
            }
        }
    }

    /// `line` with its owner's identity: in JSON, `unit`, `container` and
    /// `pod` fields before the closing brace (each only when known); in
    /// text, `[container NAME (RUNTIME ID)]` and the like at the end.
    pub fn with_identity(self, mut line: String, who: Option<&Identity>) -> String {
        let Some(who) = who.filter(|w| !w.is_empty()) else {
            return line;
        };
        match self {
            Self::Json => {
                if !line.ends_with('}') {
                    return line;
                }
                line.pop();
                let mut field = |name: &str, value: serde_json::Result<String>| {
                    if let Ok(v) = value {
                        line.push_str(&format!(",\"{name}\":{v}"));
                    }
                };
                if let Some(u) = &who.unit {
                    field("unit", serde_json::to_string(u));
                }
                if let Some(c) = &who.container {
                    field("container", serde_json::to_string(c));
                }
                if let Some(p) = &who.pod {
                    field("pod", serde_json::to_string(p));
                }
                line.push('}');
                line
            }
            Self::Text => match who.describe() {
                Some(d) => format!("{line} [{d}]"),
                None => line,
            },
        }
    }

    /// A socket left CLOSE_WAIT (`close_wait_end`), or a leaked one finally
    /// did (`leak_end`, when `as_leak_end`).
    pub fn close_wait_end(self, end: &CloseWaitEnd, wall: SystemTime, as_leak_end: bool) -> String {
        let t = &end.transition;
        let c = &t.change;
        let event = if as_leak_end {
            "leak_end"
        } else {
            "close_wait_end"
        };
        match self {
            Self::Json => to_json(&CloseWaitEndLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(wall),
                event,
                socket: SocketFields::of(t),
                close_wait_ms: round_ms(end.close_wait_ms),
                leak: end.was_leak,
                who: OwnerAndContext::of(t),
            }),
            Self::Text => {
                let ts = time_of_day(wall);
                format!(
                    "{:<15} {} {}:{} -> {}:{} left CLOSE_WAIT after {:.3} ms (closed by {}/{})",
                    ts,
                    if as_leak_end {
                        "LEAK END"
                    } else {
                        "CLOSE_WAIT END"
                    },
                    c.laddr,
                    c.lport,
                    c.raddr,
                    c.rport,
                    end.close_wait_ms,
                    c.ctx.pid,
                    c.ctx.comm
                )
            }
        }
    }

    /// A connection handed to a TIME_WAIT mini-socket by the side that
    /// closed first.
    pub fn time_wait(self, t: &Transition, wall: SystemTime) -> String {
        let c = &t.change;
        match self {
            Self::Json => to_json(&TimeWaitLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(wall),
                event: "time_wait",
                socket: SocketFields::of(t),
                from: c.old.name(),
                closer_pid: t.closer.as_ref().map(|k| k.pid),
                closer_comm: t.closer.as_ref().map(|k| k.comm.as_str()),
                who: OwnerAndContext::of(t),
            }),
            Self::Text => {
                let ts = time_of_day(wall);
                format!(
                    "{:<15} TIME_WAIT {}:{} -> {}:{} (closed first by {})",
                    ts,
                    c.laddr,
                    c.lport,
                    c.raddr,
                    c.rport,
                    t.closer.as_ref().map_or_else(
                        || "an unknown task".to_string(),
                        |k| format!("{}/{}", k.pid, k.comm)
                    )
                )
            }
        }
    }

    /// A destination crossed a port-pressure level.
    pub fn port_pressure(
        self,
        p: &crate::engine::timewait::PressureEvent,
        now: SystemTime,
    ) -> String {
        match self {
            Self::Json => to_json(&PortPressureLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(now),
                event: "port_pressure",
                netns: p.dest.netns,
                laddr: p.dest.laddr.to_string(),
                raddr: p.dest.raddr.to_string(),
                rport: p.dest.rport,
                level: p.level,
                count: p.count,
                range_size: p.range.size(),
                share_pct: (p.share() * 10.0).round() / 10.0,
                rate_per_s: (p.rate_per_s * 10.0).round() / 10.0,
                tw_reuse: p.range.tw_reuse,
                top_closers: p
                    .top_closers
                    .iter()
                    .map(|(pid, comm, n)| CloserCount {
                        pid: *pid,
                        comm,
                        time_waits: *n,
                    })
                    .collect(),
                suggestion: p.suggestion(),
            }),
            Self::Text => {
                let ts = time_of_day(now);
                let who: Vec<String> = p
                    .top_closers
                    .iter()
                    .map(|(pid, comm, n)| format!("{pid}/{comm} ({n})"))
                    .collect();
                format!(
                    "{:<15} PORT PRESSURE {}% {} -> {}:{}: {} of {} ports in TIME_WAIT ({:.1}/s) by {}; {}",
                    ts,
                    p.level,
                    p.dest.laddr,
                    p.dest.raddr,
                    p.dest.rport,
                    p.count,
                    p.range.size(),
                    p.rate_per_s,
                    if who.is_empty() { "unknown processes".to_string() } else { who.join(", ") },
                    p.suggestion()
                )
            }
        }
    }

    /// A leaked socket, enriched.
    pub fn leak(self, leak: &Leak, now: SystemTime, clock: &WallClock) -> String {
        let t = &leak.candidate.entered;
        match self {
            Self::Json => to_json(&LeakLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(now),
                event: "leak",
                socket: SocketFields::of(t),
                ino: t.ino,
                close_wait_ms: round_ms(leak.candidate.close_wait_ms),
                since: rfc3339(clock.wall(t.change.ts_ns)),
                estimated: leak.candidate.estimated,
                reason: leak.reason.name(),
                recv_q: leak.recv_q,
                owner: &leak.owners,
                origin: t.origin.as_ref().map(|o| OriginFields {
                    syscall: o.syscall.name(),
                    pid: o.pid,
                    tid: o.tid,
                    comm: &o.comm,
                    fd: o.fd,
                    ts: rfc3339(clock.wall(o.ts_ns)),
                    stack: &leak.stack,
                    walk: StackWalk::of(&leak.stack, o.stack_id),
                }),
                last_use: leak.last_use.as_ref().map(|u| {
                    let fin_ns = t.change.ts_ns;
                    LastUseFields {
                        direction: u.direction.name(),
                        syscall: u.syscall,
                        pid: u.pid,
                        tid: u.tid,
                        comm: &u.comm,
                        ts: rfc3339(clock.wall(u.checkout_ns)),
                        before_fin_ms: round_ms(LastUse::before_ms(u.checkout_ns, fin_ns)),
                        last_io_ts: rfc3339(clock.wall(u.last_io_ns)),
                        last_io_direction: u.last_direction.name(),
                        last_io_before_fin_ms: round_ms(LastUse::before_ms(u.last_io_ns, fin_ns)),
                        checkouts: u.checkouts,
                        ios: u.ios,
                        stack: &leak.last_use_stack,
                        walk: StackWalk::of(&leak.last_use_stack, u.stack_id),
                    }
                }),
                message: summary(leak),
            }),
            Self::Text => {
                let ts = time_of_day(now);
                format!("{:<15} LEAK {}", ts, summary(leak))
            }
        }
    }

    /// A leak group summary at monotonic time `now_ns`.
    pub fn leak_group(self, g: &GroupReport, now: SystemTime, now_ns: u64) -> String {
        let oldest_ms = round_ms(now_ns.saturating_sub(g.oldest_since_ns) as f64 / 1e6);
        match self {
            Self::Json => to_json(&LeakGroupLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(now),
                event: "leak_group",
                pid: g.key.pid,
                comm: &g.key.comm,
                side: g.key.side.map_or("unknown", |s| s.name()),
                service: std::net::SocketAddr::new(g.key.service_addr, g.key.service_port)
                    .to_string(),
                netns: g.key.netns,
                count: g.count,
                oldest_ms,
                newest_ms: round_ms(now_ns.saturating_sub(g.newest_since_ns) as f64 / 1e6),
                growth_per_min: (g.growth_per_min * 10.0).round() / 10.0,
                suppressed: g.suppressed,
                example: &g.example,
            }),
            Self::Text => {
                let ts = time_of_day(now);
                format!(
                    "{:<15} LEAK GROUP pid {} ({}) {} {}: {} sockets in CLOSE_WAIT, oldest {:.1} s, {:.1} new per minute ({} leak lines suppressed); e.g. {}",
                    ts,
                    g.key.pid,
                    g.key.comm,
                    g.key.side.map_or("with", |s| s.name()),
                    std::net::SocketAddr::new(g.key.service_addr, g.key.service_port),
                    g.count,
                    oldest_ms / 1000.0,
                    g.growth_per_min,
                    g.suppressed,
                    g.example
                )
            }
        }
    }

    /// A periodic summary, without the trailing newline.
    pub fn summary(self, s: &Summary, now: SystemTime) -> String {
        match self {
            Self::Json => to_json(&SummaryLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(now),
                event: "summary",
                uptime_s: s.uptime_s,
                transitions: s.transitions,
                transitions_total: s.transitions_total,
                close_wait: s.close_wait,
                leaks_open: s.leaks_open,
                leaks_total: s.leaks_total,
                time_wait: s.time_wait,
                tracked_sockets: s.tracked_sockets,
                lost_total: s.lost_total,
                malformed_total: s.malformed_total,
                outputs: s
                    .outputs
                    .iter()
                    .map(|(output, written, dropped)| OutputCounts {
                        output,
                        written: *written,
                        dropped: *dropped,
                    })
                    .collect(),
            }),
            Self::Text => {
                let mut line = format!(
                    "{:<15} SUMMARY up {}s: {} transitions ({} since start), {} in CLOSE_WAIT, \
                     {} leaks open ({} since start), {} in TIME_WAIT, {} records lost",
                    time_of_day(now),
                    s.uptime_s,
                    s.transitions,
                    s.transitions_total,
                    s.close_wait,
                    s.leaks_open,
                    s.leaks_total,
                    s.time_wait,
                    s.lost_total
                );
                for (output, written, dropped) in &s.outputs {
                    let _ = write!(line, "; {output}: {written} written, {dropped} dropped");
                }
                line
            }
        }
    }

    /// A lost-records report, without the trailing newline.
    pub fn lost(self, lost: Lost, wall: SystemTime) -> String {
        match self {
            Self::Json => to_json(&LostLine {
                schema: SCHEMA_VERSION,
                ts: rfc3339(wall),
                event: "lost",
                lost: lost.lost,
                lost_total: lost.lost_total,
                ring_full_total: lost.ring_full_total,
                missed_total: lost.missed_total,
            }),
            Self::Text => {
                let ts = time_of_day(wall);
                format!(
                    "{:<15} LOST {} records ({} since start: {} ring buffer full, {} skipped by the kernel): {}",
                    ts,
                    lost.lost,
                    lost.lost_total,
                    lost.ring_full_total,
                    lost.missed_total,
                    lost.advice()
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_fields_join_a_json_line_and_end_a_text_one() {
        let who = Identity::from_cgroup(
            "/machine.slice/libpod-3f1b6c7d2e9a4b8c0d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c.scope",
        );
        let line =
            Format::Json.with_identity(r#"{"event":"state_change","pid":7}"#.into(), Some(&who));
        let v: serde_json::Value = serde_json::from_str(&line).expect("still JSON");
        assert_eq!(v["container"]["runtime"], "podman");
        assert_eq!(v["pid"], 7);
        assert!(v.get("unit").is_none() && v.get("pod").is_none(), "{line}");
        let empty = Identity::default();
        assert_eq!(Format::Json.with_identity("{}".into(), Some(&empty)), "{}");
        assert_eq!(Format::Json.with_identity("{}".into(), None), "{}");
        assert_eq!(
            Format::Text.with_identity("line".into(), Some(&who)),
            "line [container 3f1b6c7d2e9a (podman)]"
        );
    }
    use crate::engine::decode::{Family, StateChange, Task};
    use crate::engine::state::TcpState;
    use crate::engine::tracker::Owner;
    use std::time::{Duration, UNIX_EPOCH};

    fn sample(owner: bool) -> Transition {
        Transition {
            change: StateChange {
                ts_ns: 0,
                sk: 0xffff_8881_0abc_d000,
                netns: Some(4026531840),
                family: Family::Ipv6,
                laddr: "::1".parse().expect("ip"),
                lport: 40000,
                raddr: "::1".parse().expect("ip"),
                rport: 5000,
                old: TcpState::Established,
                new: TcpState::CloseWait,
                ctx: Task {
                    pid: 9,
                    tid: 10,
                    comm: "ctx \"q\"".into(),
                },
                connect_fd: None,
                stack_id: None,
                ino: None,
            },
            prev_state_ms: Some(1.234_567_8),
            owner: owner.then(|| Owner {
                pid: 7,
                fd: Some(3),
                comm: "orders-svc".into(),
            }),
            origin: None,
            ino: None,
            closer: None,
            reset: false,
        }
    }

    fn wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_764_010_800_123_456)
    }

    #[test]
    fn json_line_has_the_documented_fields_in_order() {
        let line = Format::Json.transition(&sample(true), wall());
        assert_eq!(
            line,
            concat!(
                r#"{"schema":2,"ts":"2025-11-24T19:00:00.123456Z","event":"state_change","#,
                r#""family":"ipv6","laddr":"::1","lport":40000,"raddr":"::1","rport":5000,"#,
                r#""netns":4026531840,"old":"ESTABLISHED","new":"CLOSE_WAIT","#,
                r#""prev_state_ms":1.235,"sk":"ffff88810abcd000","pid":7,"fd":3,"#,
                r#""comm":"orders-svc","ctx_pid":9,"ctx_tid":10,"ctx_comm":"ctx \"q\""}"#
            )
        );
    }

    #[test]
    fn hostile_command_names_stay_valid_json() {
        let mut t = sample(true);
        let nasty = "a\"b\\c\nd\u{1}\u{7f}é";
        t.change.ctx.comm = nasty.to_string();
        if let Some(o) = t.owner.as_mut() {
            o.comm = nasty.to_string();
        }
        let v: serde_json::Value =
            serde_json::from_str(&Format::Json.transition(&t, wall())).expect("valid JSON");
        assert_eq!(v["ctx_comm"], nasty);
        assert_eq!(v["comm"], nasty);
    }

    #[test]
    fn unknown_owner_and_duration_are_null() {
        let mut t = sample(false);
        t.prev_state_ms = None;
        t.change.netns = None;
        let v: serde_json::Value =
            serde_json::from_str(&Format::Json.transition(&t, wall())).expect("valid JSON");
        for key in ["pid", "fd", "comm", "prev_state_ms", "netns"] {
            assert!(v[key].is_null(), "{key} should be null: {v}");
        }
    }

    #[test]
    fn lost_line() {
        let lost = Lost {
            lost: 5,
            lost_total: 12,
            ring_full_total: 10,
            missed_total: 2,
        };
        assert_eq!(
            Format::Json.lost(lost, wall()),
            concat!(
                r#"{"schema":2,"ts":"2025-11-24T19:00:00.123456Z","event":"lost","lost":5,"#,
                r#""lost_total":12,"ring_full_total":10,"missed_total":2}"#
            )
        );
        let text = Format::Text.lost(lost, wall());
        assert!(text.contains("LOST 5 records (12 since start: 10 ring buffer full, 2 skipped"));
        assert!(text.ends_with("raise --ring-buffer-size"));
        let missed = Lost {
            ring_full_total: 0,
            missed_total: 12,
            ..lost
        };
        assert!(missed.advice().contains("softirq"));
    }

    #[test]
    fn summary_line() {
        let s = Summary {
            uptime_s: 60,
            transitions: 10,
            transitions_total: 25,
            close_wait: 3,
            leaks_open: 2,
            leaks_total: 4,
            time_wait: 812,
            tracked_sockets: 40,
            lost_total: 0,
            malformed_total: 0,
            outputs: vec![("tcp://127.0.0.1:9000".into(), 100, 7)],
        };
        assert_eq!(
            Format::Json.summary(&s, wall()),
            concat!(
                r#"{"schema":2,"ts":"2025-11-24T19:00:00.123456Z","event":"summary","uptime_s":60,"#,
                r#""transitions":10,"transitions_total":25,"close_wait":3,"leaks_open":2,"#,
                r#""leaks_total":4,"time_wait":812,"tracked_sockets":40,"lost_total":0,"#,
                r#""malformed_total":0,"outputs":[{"output":"tcp://127.0.0.1:9000","#,
                r#""written":100,"dropped":7}]}"#
            )
        );
        let text = Format::Text.summary(&s, wall());
        assert!(text.contains("SUMMARY up 60s: 10 transitions (25 since start), 3 in CLOSE_WAIT"));
        assert!(text.ends_with("; tcp://127.0.0.1:9000: 100 written, 7 dropped"));
    }

    #[test]
    fn summary_of_a_snapshot() {
        let snap = crate::output::metrics::Snapshot {
            transitions: vec![
                ((TcpState::Established, TcpState::CloseWait), 3),
                ((TcpState::Close, TcpState::SynSent), 7),
            ],
            close_wait: vec![(1, "a".into(), 2), (0, String::new(), 1)],
            ..Default::default()
        };
        let s = Summary::of(&snap, 5, 4);
        assert_eq!(
            (s.transitions, s.transitions_total, s.close_wait),
            (6, 10, 3)
        );
    }

    #[test]
    fn text_columns_line_up_with_the_header() {
        let header = Format::Text.header().expect("text has a header");
        let line = Format::Text.transition(&sample(true), wall());
        assert!(line.starts_with("19:00:00.123456 4026531840 [::1]:40000"));
        assert!(line.contains("ESTABLISHED  -> CLOSE_WAIT"));
        let col = |s: &str, word: &str| s.find(word).expect(word);
        assert_eq!(col(&header, "REMOTE"), col(&line, "[::1]:5000"));
        assert!(line.ends_with("orders-svc      9/ctx \"q\""));
    }
}
