//! Prometheus exposition of the agent's counts. Pure: a [`Snapshot`] of the
//! pipeline's numbers in, text in the Prometheus (0.0.4) or OpenMetrics format
//! out, encoded by `prometheus-client`. The agent takes a snapshot for each
//! scrape ([`crate::output::metrics_server`] asks for it), so values are never stale
//! and nothing is computed while nobody scrapes.
//!
//! Label cardinality is bounded: per-process and per-destination series are
//! capped at [`TOP_PROCESSES`] and [`TOP_DESTINATIONS`]; the rest are added up
//! in one series labelled `other`, so sums stay exact.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::closewait::{LingerHistogram, LINGER_BOUNDS_MS};
use crate::engine::state::TcpState;
use crate::engine::timewait::Dest;

/// Processes with a CLOSE_WAIT series of their own; the rest share `other`.
pub const TOP_PROCESSES: usize = 50;
/// Destinations with a TIME_WAIT series of their own; the rest share `other`.
pub const TOP_DESTINATIONS: usize = 20;

/// The agent's own resource use, from `/proc/self`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Everything the metrics endpoint shows, taken at one instant.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Transitions since start by (old, new) state, before filters.
    pub transitions: Vec<((TcpState, TcpState), u64)>,
    /// Sockets in CLOSE_WAIT now by owner: (pid, comm, count), most first;
    /// pid 0 when the owner is unknown.
    pub close_wait: Vec<(u32, String, u64)>,
    /// CLOSE_WAIT linger times since start.
    pub linger: LingerHistogram,
    /// Leaks reported and not yet ended.
    pub leaks_open: u64,
    /// Leaks detected since start.
    pub leaks_total: u64,
    /// Leaks reported with a truncated (origin, last-use) stack.
    pub truncated_stacks: (u64, u64),
    /// Sockets in TIME_WAIT now by destination, most first.
    pub time_wait: Vec<(Dest, u64)>,
    /// Records lost because the ring buffer was full.
    pub lost_ring_full: u64,
    /// Records never written: the kernel skipped the program (recursion
    /// guard, a softirq nesting in another BPF program).
    pub lost_missed: u64,
    /// Records dropped as malformed.
    pub malformed_total: u64,
    /// Per output: (name, lines written, lines dropped).
    pub outputs: Vec<(String, u64, u64)>,
    /// Sockets the tracker remembers.
    pub tracked_sockets: u64,
    /// Sockets the tracker forgot because it was full (`--max-sockets`).
    pub tracker_evicted: u64,
    /// Sockets in CLOSE_WAIT not watched because the detector was full
    /// (`--max-close-wait`).
    pub close_wait_dropped: u64,
    /// Connections whose origin the kernel keeps for the agent (leak-only
    /// mode), and origins it could not keep because its map was full.
    pub kernel_origins: crate::kernel::probe::OriginCounts,
    /// Last use: checkouts, their stacks and I/Os without storage (zeros
    /// when last use is off).
    pub last_use: crate::kernel::lastuse_map::LastUseCounts,
    /// The kernel's user stack copies (zeros when they are off).
    pub stack_copies: crate::kernel::probe::StackCopyCounts,
    /// The agent's unwinding of them.
    pub unwind: crate::host::unwind::UnwindStats,
    /// The agent's kernel programs: runs and time (with
    /// `kernel.bpf_stats_enabled`).
    pub programs: Vec<crate::kernel::progstats::ProgramTime>,
    /// The agent's own CPU and memory, when /proc could be read.
    pub process: Option<ProcessStats>,
}

/// Which text format to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// Prometheus text format 0.0.4 (what `promtool check metrics` reads).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Exposition {
    /// The format a scraper asks for with its `Accept` header.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    /// The `Content-Type` of the response.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Renders `snapshot` in `format`.
pub fn render(snapshot: Snapshot, format: Exposition) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    match format {
        Exposition::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
        Exposition::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
    }
    Ok(out)
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

type Labels = Vec<(&'static str, String)>;

/// One metric family: its descriptor, then one sample per label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let mut metric = encoder.encode_descriptor(name, help, unit, first.metric_type())?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

/// The first `top` entries, and the rest added up under `other`.
fn capped<T: Clone>(items: &[T], top: usize, count: impl Fn(&T) -> u64) -> (Vec<T>, Option<u64>) {
    let head = items.iter().take(top).cloned().collect();
    let rest: u64 = items.iter().skip(top).map(count).sum();
    (head, (items.len() > top).then_some(rest))
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        family(
            &mut e,
            "tcptrace_build_info",
            "The agent's version; always 1.",
            None,
            [(
                vec![("version", env!("CARGO_PKG_VERSION").to_string())],
                gauge(1),
            )],
        )?;

        let mut transitions = s.transitions.clone();
        transitions.sort();
        family(
            &mut e,
            "tcptrace_transitions",
            "TCP state transitions seen since the agent started, by old and new state (before any --pid/--port/--state filter).",
            None,
            transitions.iter().map(|((old, new), n)| {
                (
                    vec![
                        ("old_state", old.name().to_string()),
                        ("new_state", new.name().to_string()),
                    ],
                    counter(*n),
                )
            }),
        )?;

        let (top, other) = capped(&s.close_wait, TOP_PROCESSES, |c| c.2);
        let mut samples: Vec<(Labels, ConstGauge<i64>)> = top
            .iter()
            .map(|(pid, comm, n)| {
                let pid = if *pid == 0 {
                    "unknown".to_string()
                } else {
                    pid.to_string()
                };
                (vec![("pid", pid), ("comm", comm.clone())], gauge(*n))
            })
            .collect();
        if let Some(n) = other {
            samples.push((
                vec![("pid", "other".into()), ("comm", "other".into())],
                gauge(n),
            ));
        }
        family(
            &mut e,
            "tcptrace_close_wait_sockets",
            "Sockets in CLOSE_WAIT now, by owning process (the peer closed, the owner has not): a count that only grows is a leak.",
            None,
            samples,
        )?;

        family(
            &mut e,
            "tcptrace_close_wait_linger",
            "How long sockets stayed in CLOSE_WAIT before their owner closed them.",
            Some(&Unit::Seconds),
            [(Labels::new(), LingerMetric(s.linger.clone()))],
        )?;

        family(
            &mut e,
            "tcptrace_leaks_open",
            "CLOSE_WAIT leaks reported (past --leak-after) and not yet closed.",
            None,
            [(Labels::new(), gauge(s.leaks_open))],
        )?;
        family(
            &mut e,
            "tcptrace_leaks",
            "CLOSE_WAIT leaks detected since the agent started.",
            None,
            [(Labels::new(), counter(s.leaks_total))],
        )?;

        let (top, other) = capped(&s.time_wait, TOP_DESTINATIONS, |c| c.1);
        let mut samples: Vec<(Labels, ConstGauge<i64>)> = top
            .iter()
            .map(|(d, n)| {
                (
                    vec![
                        ("netns", d.netns.map(|n| n.to_string()).unwrap_or_default()),
                        ("local_addr", d.laddr.to_string()),
                        ("remote_addr", d.raddr.to_string()),
                        ("remote_port", d.rport.to_string()),
                    ],
                    gauge(*n),
                )
            })
            .collect();
        if let Some(n) = other {
            samples.push((
                vec![
                    ("netns", "other".into()),
                    ("local_addr", "other".into()),
                    ("remote_addr", "other".into()),
                    ("remote_port", "other".into()),
                ],
                gauge(n),
            ));
        }
        family(
            &mut e,
            "tcptrace_time_wait_sockets",
            "Sockets in TIME_WAIT now, by destination (the busiest ones; the rest under \"other\"): each holds a local port for 60 s.",
            None,
            samples,
        )?;

        family(
            &mut e,
            "tcptrace_ring_buffer_lost_records",
            "Records the kernel could not deliver: cause=\"ring_full\" (raise --ring-buffer-size if this grows) or cause=\"missed\" (the kernel skipped the program while another BPF program ran on the same CPU).",
            None,
            [
                (vec![("cause", "ring_full".to_string())], counter(s.lost_ring_full)),
                (vec![("cause", "missed".to_string())], counter(s.lost_missed)),
            ],
        )?;
        family(
            &mut e,
            "tcptrace_malformed_records",
            "Records dropped because they could not be decoded.",
            None,
            [(Labels::new(), counter(s.malformed_total))],
        )?;
        family(
            &mut e,
            "tcptrace_output_written_lines",
            "Lines written to each --output.",
            None,
            s.outputs
                .iter()
                .map(|(o, w, _)| (vec![("output", o.clone())], counter(*w))),
        )?;
        family(
            &mut e,
            "tcptrace_output_dropped_lines",
            "Lines dropped because an --output's queue was full (its destination slow or down); raise --queue-size if this grows.",
            None,
            s.outputs
                .iter()
                .map(|(o, _, d)| (vec![("output", o.clone())], counter(*d))),
        )?;
        family(
            &mut e,
            "tcptrace_tracked_sockets",
            "Sockets the agent remembers (owner, origin, time in state).",
            None,
            [(Labels::new(), gauge(s.tracked_sockets))],
        )?;
        family(
            &mut e,
            "tcptrace_truncated_stacks",
            "Leaks reported whose stack (stack=\"origin\" or \"last_use\") the frame-pointer walk did not see whole: it stopped short of the thread's entry (code built without frame pointers, an interpreter) or at the kernel's 127-frame limit.",
            None,
            [
                (vec![("stack", "origin".to_string())], counter(s.truncated_stacks.0)),
                (vec![("stack", "last_use".to_string())], counter(s.truncated_stacks.1)),
            ],
        )?;
        family(
            &mut e,
            "tcptrace_table_full",
            "Sockets a full table of the agent's could not hold: table=\"tracker\" forgot the least recently active ones (raise --max-sockets), table=\"close_wait\" did not watch new ones (raise --max-close-wait).",
            None,
            [
                (vec![("table", "tracker".to_string())], counter(s.tracker_evicted)),
                (vec![("table", "close_wait".to_string())], counter(s.close_wait_dropped)),
            ],
        )?;
        family(
            &mut e,
            "tcptrace_kernel_origins",
            "Live connections whose origin (process, fd, stack) the kernel keeps for leak reports, when no line needs every owner.",
            None,
            [(Labels::new(), gauge(s.kernel_origins.live))],
        )?;
        family(
            &mut e,
            "tcptrace_kernel_origins_dropped",
            "Connections whose origin the kernel could not keep (its map, sized by --max-sockets, was full): their leaks name no origin.",
            None,
            [(Labels::new(), counter(s.kernel_origins.full))],
        )?;
        family(
            &mut e,
            "tcptrace_bpf_program_runs",
            "Runs of each of the agent's kernel programs; counted only while the sysctl kernel.bpf_stats_enabled is 1 (0 otherwise).",
            None,
            s.programs
                .iter()
                .map(|p| (vec![("program", p.program.clone())], counter(p.runs))),
        )?;
        family(
            &mut e,
            "tcptrace_bpf_program_run_seconds",
            "Time spent in each of the agent's kernel programs, paid by the tasks that ran them; counted only while the sysctl kernel.bpf_stats_enabled is 1 (0 otherwise).",
            None,
            s.programs.iter().map(|p| {
                (
                    vec![("program", p.program.clone())],
                    ConstCounter::new(p.run_ns as f64 / 1e9),
                )
            }),
        )?;
        family(
            &mut e,
            "tcptrace_origin_stacks_skipped",
            "Connections whose opening stack was not walked: their process opened more than --stacks-per-second on a CPU (with the kernel keeping origins, such a connection keeps none).",
            None,
            [(Labels::new(), counter(s.kernel_origins.over_budget))],
        )?;
        family(
            &mut e,
            "tcptrace_last_use_checkouts",
            "Checkouts seen by last use: a TCP send or receive after --last-use-gap without one on its socket (a connection taken out of its pool), or by another process.",
            None,
            [(Labels::new(), counter(s.last_use.checkouts))],
        )?;
        family(
            &mut e,
            "tcptrace_last_use_stacks",
            "User stacks walked at checkouts (the others were past --stacks-per-second).",
            None,
            [(Labels::new(), counter(s.last_use.stacks))],
        )?;
        family(
            &mut e,
            "tcptrace_last_use_unrecorded",
            "TCP sends and receives last use could not record: the socket's option memory (net.core.optmem_max) had no room for its storage.",
            None,
            [(Labels::new(), counter(s.last_use.no_storage))],
        )?;

        let c = &s.stack_copies;
        family(
            &mut e,
            "tcptrace_stack_copies",
            "User stack copies the kernel took for CFI unwinding (--stack-copy), by outcome: sent through the ring, not taken while the ring was more than half full (ring_busy), lost to a full ring, or ended before --stack-copy bytes at a page that could not be read (short, also counted as sent: usually the stack's own top, above which nothing is mapped; else a page not in memory).",
            None,
            [
                ("sent", c.sent),
                ("ring_busy", c.ring_busy),
                ("lost", c.lost),
                ("short", c.short),
            ]
            .map(|(outcome, n)| (vec![("outcome", outcome.to_string())], counter(n))),
        )?;
        let u = &s.unwind;
        family(
            &mut e,
            "tcptrace_unwound_stacks",
            "Stack copies the agent unwound from CFI, by result: complete (reached the thread's first frame), partial (stopped at a frame without unwind information or the copy's end), failed (the process was gone).",
            None,
            [
                ("complete", u.counts.complete),
                ("partial", u.counts.unwound - u.counts.complete),
                ("failed", u.counts.failed),
            ]
            .map(|(result, n)| (vec![("result", result.to_string())], counter(n))),
        )?;
        family(
            &mut e,
            "tcptrace_unwind_seconds",
            "Agent CPU time spent unwinding stack copies, module loading included.",
            None,
            [(Labels::new(), ConstCounter::new(u.counts.ns as f64 / 1e9))],
        )?;
        family(
            &mut e,
            "tcptrace_stack_copy_bytes",
            "Bytes of user stack received for unwinding (unwound and dropped at once).",
            None,
            [(Labels::new(), counter(u.counts.bytes))],
        )?;
        family(
            &mut e,
            "tcptrace_unwound_captures",
            "Unwound stacks kept for live connections until a leak asks for them (at most --max-sockets).",
            None,
            [(Labels::new(), gauge(u.captures))],
        )?;
        family(
            &mut e,
            "tcptrace_unwound_distinct_stacks",
            "Distinct unwound stacks those captures hold (at most --max-stacks).",
            None,
            [(Labels::new(), gauge(u.stacks))],
        )?;
        family(
            &mut e,
            "tcptrace_unwound_captures_evicted",
            "Unwound stacks forgotten: because their connection closed (closed), to make room (evicted: their connections' leaks show the frame-pointer walk), and stacks not kept because --max-stacks distinct ones were (stacks_full).",
            None,
            [("closed", u.closed), ("evicted", u.evicted), ("stacks_full", u.full)]
                .map(|(why, n)| (vec![("reason", why.to_string())], counter(n))),
        )?;

        if let Some(p) = &s.process {
            family(
                &mut e,
                "process_cpu",
                "Total user and system CPU time spent by the agent, in seconds.",
                Some(&Unit::Seconds),
                [(Labels::new(), ConstCounter::new(p.cpu_seconds))],
            )?;
            family(
                &mut e,
                "process_resident_memory",
                "Resident memory of the agent, in bytes.",
                Some(&Unit::Bytes),
                [(Labels::new(), gauge(p.resident_bytes))],
            )?;
            family(
                &mut e,
                "process_virtual_memory",
                "Virtual memory of the agent, in bytes.",
                Some(&Unit::Bytes),
                [(Labels::new(), gauge(p.virtual_bytes))],
            )?;
            family(
                &mut e,
                "process_open_fds",
                "Open file descriptors of the agent.",
                None,
                [(Labels::new(), gauge(p.open_fds))],
            )?;
            family(
                &mut e,
                "process_start_time",
                "Start time of the agent since the Unix epoch, in seconds.",
                Some(&Unit::Seconds),
                [(Labels::new(), ConstGauge::new(p.start_time_seconds))],
            )?;
        }
        Ok(())
    }
}

/// The linger histogram as a Prometheus histogram, buckets in seconds.
#[derive(Debug)]
struct LingerMetric(LingerHistogram);

impl EncodeMetric for LingerMetric {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let h = &self.0;
        let mut buckets: Vec<(f64, u64)> = LINGER_BOUNDS_MS
            .iter()
            .zip(h.buckets)
            .map(|(ms, n)| (ms / 1000.0, n))
            .collect();
        buckets.push((f64::INFINITY, h.buckets[LINGER_BOUNDS_MS.len()]));
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_ms / 1000.0,
            h.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Reads the agent's own CPU, memory and fds from `/proc/self`.
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_boot_time(&s));
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    parse_self_stat(
        &stat,
        u64::try_from(ticks).ok().filter(|t| *t > 0)?,
        u64::try_from(page).ok().filter(|p| *p > 0)?,
        boot_time?,
        open_fds,
    )
}

/// `btime` from `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// Parses `/proc/self/stat` (see proc(5)); the command name may hold spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_self_stat(
    stat: &str,
    ticks_per_s: u64,
    page_bytes: u64,
    boot_time_s: u64,
    open_fds: u64,
) -> Option<ProcessStats> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let (utime, stime) = (field(14)?, field(15)?);
    let start_ticks = field(22)?;
    Some(ProcessStats {
        cpu_seconds: (utime + stime) as f64 / ticks_per_s as f64,
        resident_bytes: field(24)?.saturating_mul(page_bytes),
        virtual_bytes: field(23)?,
        open_fds,
        start_time_seconds: boot_time_s as f64 + start_ticks as f64 / ticks_per_s as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn sample() -> Snapshot {
        let mut linger = LingerHistogram::default();
        linger.record(5.0);
        linger.record(2_000.0);
        Snapshot {
            transitions: vec![
                ((TcpState::Established, TcpState::CloseWait), 3),
                ((TcpState::Close, TcpState::SynSent), 7),
            ],
            close_wait: vec![(4242, "leaky \"srv\"".into(), 2), (0, String::new(), 1)],
            linger,
            leaks_open: 2,
            leaks_total: 5,
            truncated_stacks: (2, 1),
            time_wait: vec![(
                Dest {
                    netns: Some(4026531840),
                    laddr: ip("127.0.0.1"),
                    raddr: ip("127.0.0.1"),
                    rport: 6379,
                },
                812,
            )],
            lost_ring_full: 4,
            lost_missed: 1,
            malformed_total: 0,
            outputs: vec![("tcp://127.0.0.1:9000".into(), 100, 3)],
            tracked_sockets: 9,
            tracker_evicted: 5,
            close_wait_dropped: 7,
            kernel_origins: crate::kernel::probe::OriginCounts {
                live: 6,
                full: 2,
                over_budget: 3,
            },
            last_use: crate::kernel::lastuse_map::LastUseCounts {
                checkouts: 11,
                stacks: 10,
                no_storage: 1,
            },
            stack_copies: crate::kernel::probe::StackCopyCounts {
                sent: 9,
                ring_busy: 2,
                lost: 0,
                short: 1,
            },
            unwind: crate::host::unwind::UnwindStats {
                counts: crate::host::unwind::UnwindCounts {
                    unwound: 8,
                    complete: 6,
                    failed: 1,
                    ns: 250_000,
                    bytes: 65536,
                },
                captures: 5,
                stacks: 4,
                evicted: 3,
                closed: 2,
                full: 0,
                malformed: 0,
            },
            programs: vec![crate::kernel::progstats::ProgramTime {
                program: "inet_sock_set_state_fixed".into(),
                runs: 1000,
                run_ns: 1_500_000,
            }],
            process: Some(ProcessStats {
                cpu_seconds: 1.5,
                resident_bytes: 4096,
                virtual_bytes: 8192,
                open_fds: 12,
                start_time_seconds: 1.7e9,
            }),
        }
    }

    #[test]
    fn prometheus_text_has_every_family_with_conventional_names() {
        let text = render(sample(), Exposition::Prometheus).expect("render");
        for line in [
            "# TYPE tcptrace_transitions_total counter",
            "tcptrace_transitions_total{old_state=\"CLOSE\",new_state=\"SYN_SENT\"} 7",
            "tcptrace_close_wait_sockets{pid=\"4242\",comm=\"leaky \\\"srv\\\"\"} 2",
            "tcptrace_close_wait_sockets{pid=\"unknown\",comm=\"\"} 1",
            "# TYPE tcptrace_close_wait_linger_seconds histogram",
            "tcptrace_close_wait_linger_seconds_bucket{le=\"0.01\"} 1",
            "tcptrace_close_wait_linger_seconds_bucket{le=\"1\"} 1",
            "tcptrace_close_wait_linger_seconds_bucket{le=\"10\"} 2",
            "tcptrace_close_wait_linger_seconds_bucket{le=\"+Inf\"} 2",
            "tcptrace_close_wait_linger_seconds_sum 2.005",
            "tcptrace_close_wait_linger_seconds_count 2",
            "tcptrace_leaks_open 2",
            "tcptrace_leaks_total 5",
            "tcptrace_truncated_stacks_total{stack=\"origin\"} 2",
            "tcptrace_truncated_stacks_total{stack=\"last_use\"} 1",
            "tcptrace_time_wait_sockets{netns=\"4026531840\",local_addr=\"127.0.0.1\",remote_addr=\"127.0.0.1\",remote_port=\"6379\"} 812",
            "tcptrace_ring_buffer_lost_records_total{cause=\"ring_full\"} 4",
            "tcptrace_ring_buffer_lost_records_total{cause=\"missed\"} 1",
            "tcptrace_output_dropped_lines_total{output=\"tcp://127.0.0.1:9000\"} 3",
            "tcptrace_table_full_total{table=\"tracker\"} 5",
            "tcptrace_table_full_total{table=\"close_wait\"} 7",
            "tcptrace_kernel_origins 6",
            "tcptrace_kernel_origins_dropped_total 2",
            "tcptrace_last_use_checkouts_total 11",
            "tcptrace_last_use_stacks_total 10",
            "tcptrace_last_use_unrecorded_total 1",
            "tcptrace_origin_stacks_skipped_total 3",
            "tcptrace_stack_copies_total{outcome=\"sent\"} 9",
            "tcptrace_stack_copies_total{outcome=\"ring_busy\"} 2",
            "tcptrace_unwound_stacks_total{result=\"complete\"} 6",
            "tcptrace_unwound_stacks_total{result=\"partial\"} 2",
            "tcptrace_unwound_stacks_total{result=\"failed\"} 1",
            "tcptrace_unwind_seconds_total 0.00025",
            "tcptrace_stack_copy_bytes_total 65536",
            "tcptrace_unwound_captures 5",
            "tcptrace_unwound_distinct_stacks 4",
            "tcptrace_unwound_captures_evicted_total{reason=\"closed\"} 2",
            "tcptrace_unwound_captures_evicted_total{reason=\"evicted\"} 3",
            "tcptrace_bpf_program_runs_total{program=\"inet_sock_set_state_fixed\"} 1000",
            "tcptrace_bpf_program_run_seconds_total{program=\"inet_sock_set_state_fixed\"} 0.0015",
            "process_cpu_seconds_total 1.5",
            "process_resident_memory_bytes 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_ends_with_eof() {
        let text = render(sample(), Exposition::OpenMetrics).expect("render");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# UNIT tcptrace_close_wait_linger_seconds seconds"));
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain"
            )),
            Exposition::OpenMetrics
        );
        assert_eq!(Exposition::negotiate(None), Exposition::Prometheus);
    }

    #[test]
    fn series_are_capped_and_the_rest_summed() {
        let mut s = sample();
        s.close_wait = (1..=TOP_PROCESSES as u32 + 5)
            .map(|pid| (pid, format!("p{pid}"), 1))
            .collect();
        let text = render(s, Exposition::Prometheus).expect("render");
        let series = text
            .lines()
            .filter(|l| l.starts_with("tcptrace_close_wait_sockets{"))
            .count();
        assert_eq!(series, TOP_PROCESSES + 1);
        assert!(text.contains("tcptrace_close_wait_sockets{pid=\"other\",comm=\"other\"} 5"));
    }

    #[test]
    fn empty_families_are_left_out() {
        let text = render(Snapshot::default(), Exposition::Prometheus).expect("render");
        assert!(!text.contains("tcptrace_close_wait_sockets"));
        assert!(text.contains("tcptrace_leaks_total 0"));
    }

    #[test]
    fn self_stat_parses_names_with_spaces_and_parens() {
        let stat = "4242 (tcp (trace) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 \
                    250 50 0 0 20 0 3 0 1000 123456789 300 18446744073709551615";
        let p = parse_self_stat(stat, 100, 4096, 1_700_000_000, 7).expect("parsed");
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.resident_bytes, 300 * 4096);
        assert_eq!(p.virtual_bytes, 123_456_789);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.open_fds, 7);
        assert_eq!(
            parse_boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000)
        );
        assert!(parse_self_stat("garbage", 100, 4096, 0, 0).is_none());
    }
}
