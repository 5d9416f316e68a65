//! Command-line interface.

use clap::Parser;

use crate::engine::decode::Family;
use crate::engine::filter::Filter;
use crate::engine::state::TcpState;
use crate::kernel::probe::DEFAULT_RING_BYTES;
use crate::output::format::Format;

/// tcptrace: every TCP state change on this host, with who owns the socket.
#[derive(Debug, Parser)]
#[command(
    name = "tcptrace",
    version,
    about = "Watch every TCP state change on this host and name the process, fd and code path of each connection left in CLOSE_WAIT",
    long_about = "Watch every TCP state change on this host (all network namespaces) and name \
the process, the fd and the code path (the user stack of its connect() or accept()) of each \
connection left in CLOSE_WAIT.\n\n\
A socket that sits in CLOSE_WAIT means its peer closed and the owner never called close(). \
By default one `leak` line is printed per socket still in CLOSE_WAIT after --leak-after, \
one `leak_end` when it finally closes, and a `summary` a minute; a healthy connection costs \
the kernel a few table slots and sends nothing to user space.\n\n\
With --events state-change each line is one transition of one socket: its addresses, the \
state it left and the one it entered, the milliseconds it spent in the state it left, the \
process that owns it (the one that called connect() or accept() on it) and the task that \
happened to be running when the kernel made the change (often not the owner: most \
transitions run in softirq context).\n\n\
Needs root, or CAP_BPF and CAP_PERFMON, and Linux >= 5.12 with BTF.",
    after_help = "Examples:\n  \
tcptrace                          leaks (JSON lines when piped) and a summary a minute\n  \
tcptrace --events state-change    every transition, as tcpstates prints them\n  \
tcptrace --events state-change --format text --port 3306  connections to or from port 3306\n  \
tcptrace --events state-change --state close_wait   transitions into and out of CLOSE_WAIT\n  \
tcptrace --pid 4242 -6             leaks of IPv6 sockets owned by process 4242\n  \
tcptrace leaks                     the CLOSE_WAIT leaks now, grouped by process and code path\n  \
tcptrace leaks --flamegraph leaks.svg   the same as a flame graph (width: sockets)\n  \
tcptrace --container orders        leaks of the container named orders only\n  \
tcptrace timewait                  TIME_WAIT by destination: how close to port exhaustion\n  \
tcptrace --config /etc/tcptrace/tcptrace.toml --metrics   options from a file, plus metrics\n\n\
Logs go to stderr; set RUST_LOG=debug for more."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// A report instead of the live trace.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Read options from a TOML file: keys are the long option names, e.g.
    /// `leak-after = "10s"`, `output = ["stdout", "tcp://10.0.0.5:9000"]`, `ipv4 = true`.
    /// Options on the command line win over the file. Check a file with `tcptrace
    /// check-config FILE`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Output format [default: json when stdout is not a terminal, text when it is]
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Only sockets owned by PID: the process that called connect() on them, or accept()
    /// (from the accept on). Repeat for several.
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Only connections with PORT at either end. Repeat for several.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only transitions into or out of STATE (e.g. CLOSE_WAIT, time_wait). Repeat, or
    /// separate with commas.
    #[arg(long = "state", value_name = "STATE", value_delimiter = ',')]
    pub states: Vec<TcpState>,

    /// Size of the kernel-to-agent ring buffer: a power of two, at least one page; K and M
    /// suffixes accepted. Raise it if the agent reports lost records.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// A socket still in CLOSE_WAIT after DURATION is a leak: one `leak` event names its
    /// owner, fd and the code that opened it (e.g. 500ms, 10s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub leak_after: std::time::Duration,

    /// At most N individual `leak` lines per leak group (same process, remote endpoint and
    /// origin stack) per minute; the rest are counted in `leak_group` summaries.
    #[arg(long, value_name = "N", default_value_t = crate::pipeline::DEFAULT_LEAK_LINES_PER_GROUP)]
    pub leak_lines_per_group: u32,

    /// How often a `leak_group` summary (count, oldest age) is printed for each group that
    /// still has leaked sockets.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub leak_group_interval: std::time::Duration,

    /// Where events go: stdout, file:PATH (appends; reopened on SIGHUP for logrotate),
    /// tcp://HOST:PORT (newline-delimited JSON for Vector, Fluent Bit, Logstash). Repeat for
    /// several; each has its own queue, so a slow one never stalls the others.
    #[arg(long = "output", value_name = "SINK", default_value = "stdout")]
    pub outputs: Vec<crate::output::sinks::SinkSpec>,

    /// Lines each output may queue while its destination is slow or down; past that,
    /// lines are dropped and counted.
    #[arg(long, value_name = "LINES", default_value_t = crate::output::sinks::DEFAULT_QUEUE,
          value_parser = parse_queue_size)]
    pub queue_size: usize,

    /// Which events to print, comma-separated (`lost` lines are always printed). The
    /// default, leaks and a periodic summary, keeps a healthy connection out of user space
    /// altogether (the kernel keeps origins and CLOSE_WAIT stays in tables; port pressure
    /// is still logged). `state-change` sends every transition to the agent, as tcpstates
    /// does; `close-wait` and `--pid` need every owner as it changes, and cost the same.
    #[arg(long, value_enum, value_delimiter = ',', default_value = DEFAULT_EVENTS)]
    pub events: Vec<EventKind>,

    /// How often a `summary` event (counts, lost and dropped records) is printed, so that a
    /// quiet host still shows the agent is alive.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub summary_interval: std::time::Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (off by default; a bare --metrics
    /// listens on 127.0.0.1:9464, an address without a port gets 9464). Transition counts,
    /// CLOSE_WAIT sockets by process, linger histogram, leaks, TIME_WAIT by destination, lost
    /// and dropped records, the agent's CPU and memory.
    #[arg(long, value_name = "ADDR", num_args = 0..=1,
          default_missing_value = crate::output::metrics_server::DEFAULT_ADDR,
          value_parser = crate::output::metrics_server::parse_addr)]
    pub metrics: Option<std::net::SocketAddr>,

    /// Sockets the agent remembers at once (owner, origin, time in state; about 136 bytes
    /// each); past that, the least recently active eighth is forgotten (counted). With
    /// `--events leak` alone, the kernel keeps connection origins in a table of this many
    /// slots, rounded up to a power of two, 40 bytes each (40 MiB of kernel memory at the
    /// default); a full table is counted and logged.
    #[arg(long, value_name = "N", default_value_t = crate::engine::tracker::DEFAULT_CAPACITY,
          value_parser = parse_max_sockets)]
    pub max_sockets: usize,

    /// Sockets in CLOSE_WAIT the agent remembers at once (a few hundred bytes each); past that,
    /// new ones are not watched (counted: `tcptrace_table_full_total`). The kernel's own table
    /// of them has an eighth as many slots (112 bytes each); past those, entries travel as
    /// records.
    #[arg(long, value_name = "N", default_value_t = crate::engine::closewait::DEFAULT_MAX_LINGERING,
          value_parser = parse_max_sockets)]
    pub max_close_wait: usize,

    /// Distinct user stacks the kernel keeps at once (origins of connect() and accept()),
    /// about 1 KiB of kernel memory each; a stack whose slot another holds is not kept.
    #[arg(long, value_name = "N", default_value_t = crate::kernel::probe::DEFAULT_MAX_STACKS,
          value_parser = parse_max_stacks)]
    pub max_stacks: u32,

    /// User stacks walked at connect()/accept() per process per second on each CPU, at most
    /// (0: every one). A walk, and the kernel's lookup of an accepted socket, cost a few
    /// hundred nanoseconds per connection; under the limit every connection gets its origin
    /// stack, past it a sample does (the others' leaks name their owner and fd, no stack,
    /// and group apart). Skipped walks are counted (`tcptrace_origin_stacks_skipped_total`).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_STACKS_PER_SECOND)]
    pub stacks_per_second: u32,

    /// Bytes of user stack the kernel copies, with the registers, wherever it walks a stack
    /// (within --stacks-per-second), for the agent to unwind from the binaries' CFI
    /// (.eh_frame): the whole stack of a C, C++ or Rust program built without frame pointers,
    /// where the frame-pointer walk stops at the first such function. Whole pages, at most
    /// 16K; `0` (or `off`): frame pointers only. A deeper stack than the copy keeps the frames
    /// it holds (the stack says `truncated`). Each copy goes through the ring buffer and is
    /// unwound and dropped as it arrives: the agent keeps return addresses, never the bytes.
    /// Copies wait while the ring is more than half full (counted:
    /// `tcptrace_stack_copies_total{outcome}`). Needs x86_64 and BTF.
    #[arg(long, value_name = "BYTES", default_value = "16K", value_parser = parse_stack_copy)]
    pub stack_copy: u32,

    /// Last use: on every TCP send and receive the kernel keeps, in the socket's own storage,
    /// when and by whom it was used last, and at each checkout (the first I/O after
    /// --last-use-gap without one: a pooled connection taken out of its pool) the user stack.
    /// A leak then names the code that used the socket last ("last used by main.update"),
    /// not only the code that opened it: in a pool, those differ. Costs a storage lookup per
    /// I/O and a stack walk per checkout, within --stacks-per-second. Needs the
    /// sock:sock_send_length/sock_recv_length tracepoints (Linux >= 6.3) and BTF; on older
    /// kernels one warning says it is off and leaks name their origin only.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    pub last_use: bool,

    /// An I/O after at least this long without one on its socket is a checkout, whose stack
    /// is walked (default 10ms: above a request/response wait on a local network, below the
    /// time a connection idles in a pool between requests). Smaller finds checkouts in a
    /// busier pool and walks more stacks; larger walks fewer. Counted in kernel ticks
    /// (CONFIG_HZ, measured at start): rounded up, at least two (8 ms at HZ=250).
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = parse_duration)]
    pub last_use_gap: std::time::Duration,

    /// Which kernel program reads the state tracepoint: `auto` (the BTF one where the kernel
    /// has BTF, else the fast classic one when the tracepoint's layout is the usual one, each
    /// falling back to the next if it does not load), `btf`, `fixed` (Linux >= 5.6 layout)
    /// or `offsets` (fields at tracefs offsets, any layout). For tests and troubleshooting.
    #[arg(long, value_enum, default_value = "auto", hide = true)]
    pub state_program: StateProgram,

    /// Where the agent keeps the current leaks for `tcptrace leaks` (rewritten at each
    /// leak-group interval); `none` disables it.
    #[arg(long, value_name = "PATH", default_value = crate::output::report::DEFAULT_STATE_FILE)]
    pub state_file: String,

    /// `--unit`, `--container`, `--pod`.
    #[command(flatten)]
    pub identity: IdentityArgs,

    /// A container runtime's API socket (the Docker API, which Podman serves too), asked
    /// for container names. Repeat for several; the defaults that do not exist are skipped.
    /// Without one, names come from the runtimes' state on disk and the kubelet's logs.
    #[arg(long = "runtime-socket", value_name = "PATH",
          default_values = crate::host::names::DEFAULT_SOCKETS)]
    pub runtime_sockets: Vec<std::path::PathBuf>,
}

/// Default of `--stacks-per-second`: far above what a service opens per
/// second on one CPU, so that a leak usually names its stack, and low
/// enough that a process churning tens of thousands of connections a
/// second pays for almost no walks (a leak that repeats is then caught with
/// its stack within seconds).
pub const DEFAULT_STACKS_PER_SECOND: u32 = 1000;

/// Default of `--events`: what a production host needs, at almost no cost.
pub const DEFAULT_EVENTS: &str = "leak,summary";

pub use crate::engine::events::{EventKind, EventSet};
pub use crate::engine::identity::IdentityFilter;
pub use crate::kernel::layout::StateProgram;

/// Reports.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// The CLOSE_WAIT leaks now, grouped by process and by the code path that opened them,
    /// largest first. Reads the running agent's state file; with no agent running, takes a
    /// live inventory (ages estimated, code paths unknown).
    Leaks {
        /// Output format [default: text on a terminal, json otherwise]
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// The running agent's state file.
        #[arg(long, value_name = "PATH", default_value = crate::output::report::DEFAULT_STATE_FILE)]
        state_file: String,
        /// Without an agent: sockets in CLOSE_WAIT for longer than this count as leaks.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        leak_after: std::time::Duration,
        /// Write a flame graph of the leaks to FILE (SVG): width is sockets, each stack is
        /// the code that used the socket last (the code that opened it where no last use is
        /// known), rooted at the container, pod or unit and the process.
        #[arg(long, value_name = "FILE")]
        flamegraph: Option<std::path::PathBuf>,
        /// Print the leaks as folded stacks (`root;frame;...;frame COUNT`, one line per
        /// stack), the input of flamegraph.pl, inferno and speedscope.
        #[arg(long, conflicts_with = "format")]
        folded: bool,
        #[command(flatten)]
        identity: IdentityArgs,
    },
    /// Check a --config file: prints the settings it makes, or the line and the reason it
    /// is wrong (exit status 2).
    CheckConfig {
        /// The TOML file.
        #[arg(value_name = "FILE")]
        file: std::path::PathBuf,
    },
    /// For `cargo xtask bench`: attach a program that does nothing to the same tracepoint
    /// until SIGINT/SIGTERM (the cost of any program there, the benchmark's floor).
    #[command(hide = true)]
    BenchFloor {
        /// Also attach a no-op program to the accept() exit tracepoints the agent hooks.
        #[arg(long)]
        syscall_hooks: bool,
        /// Attach the no-op program as a BTF tracepoint, as the agent attaches its own
        /// where the kernel has BTF (no record filled per transition).
        #[arg(long)]
        btf: bool,
        /// Also attach no-op BTF tracepoint programs to `sock_send_length` and
        /// `sock_recv_length`, the tracepoints of the agent's last-use programs (the floor
        /// of every socket send and receive).
        #[arg(long)]
        io: bool,
    },
    /// TIME_WAIT sockets by destination, with their share of the ephemeral port range and
    /// the processes that closed first (known with an agent running).
    Timewait {
        /// Output format [default: text on a terminal, json otherwise]
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// The running agent's state file.
        #[arg(long, value_name = "PATH", default_value = crate::output::report::DEFAULT_STATE_FILE)]
        state_file: String,
    },
}

/// Parses `--max-sockets`: 1 to 64 M.
pub fn parse_max_sockets(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1 << 26).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a number of sockets from 1 to 67108864"
        )),
    }
}

/// Parses `--max-stacks`: 64 to 1 M.
pub fn parse_max_stacks(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if (64..=1 << 20).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a number of stacks from 64 to 1048576"
        )),
    }
}

/// Parses `--stack-copy`: bytes (`K`/`KiB` for 1024), 0 or `off` to 16 KiB.
pub fn parse_stack_copy(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        _ => 0,
    };
    let max = tcptrace_common::STACK_COPY_BYTES as u64;
    match digits.parse::<u64>() {
        Ok(n) if scale > 0 && n * scale <= max => Ok((n * scale) as u32),
        _ => Err(format!(
            "{s:?} is not a stack copy size from 0 (off) to 16K (bytes, or K for KiB)"
        )),
    }
}

/// Parses a queue length: 1 to 16 M lines.
pub fn parse_queue_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=16 << 20).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a number of lines from 1 to 16777216")),
    }
}

/// Parses a positive duration: `500ms`, `10s`, `5m`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); examples: 500ms, 10s, 5m"))?;
    if d.is_zero() {
        return Err("the duration must be more than zero".to_string());
    }
    Ok(d)
}

/// Parses `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("{s:?} is neither on nor off")),
    }
}

/// Parses a ring buffer size: `4096`, `256K`, `16M`.
pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1u64 << 20),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 256K, 16M)"))?;
    let bytes = n.saturating_mul(mult);
    let page = crate::kernel::maps::page_size() as u64;
    if bytes < page || !bytes.is_power_of_two() || bytes > 1 << 30 {
        return Err(format!(
            "{s} is not a power of two between the page size ({page}) and 1G"
        ));
    }
    u32::try_from(bytes).map_err(|_| format!("{s} is too large"))
}

impl Cli {
    /// The output filter these options describe.
    /// `--unit`, `--container`, `--pod`.
    pub fn identity_filter(&self) -> IdentityFilter {
        self.identity.filter()
    }

    /// Where container and pod names are read from.
    pub fn name_sources(&self) -> crate::host::names::Sources {
        crate::host::names::Sources {
            sockets: self.runtime_sockets.clone(),
            ..Default::default()
        }
    }

    pub fn filter(&self) -> Filter {
        Filter {
            pids: self.pids.iter().copied().collect(),
            ports: self.ports.iter().copied().collect(),
            family: if self.ipv4 {
                Some(Family::Ipv4)
            } else if self.ipv6 {
                Some(Family::Ipv6)
            } else {
                None
            },
            states: self.states.iter().copied().collect(),
        }
    }

    /// The chosen format, defaulting on whether stdout is a terminal.
    pub fn format(&self, stdout_is_terminal: bool) -> Format {
        self.format.unwrap_or(if stdout_is_terminal {
            Format::Text
        } else {
            Format::Json
        })
    }
}

/// `--unit`, `--container`, `--pod` for `tcptrace leaks`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct IdentityArgs {
    /// Only sockets of processes in systemd UNIT (`nginx` or `nginx.service`): their leaks and,
    /// live, every line that names them as owner. Repeat for
    /// several.
    #[arg(long = "unit", value_name = "UNIT")]
    pub units: Vec<String>,

    /// Only sockets of processes in CONTAINER: its name, or 4 or more leading digits of its id.
    /// Repeat for several.
    #[arg(long = "container", value_name = "CONTAINER")]
    pub containers: Vec<String>,

    /// Only sockets of processes in Kubernetes POD: its name, NAMESPACE/NAME, or 4 or more
    /// leading digits of its UID. Repeat for several.
    #[arg(long = "pod", value_name = "POD")]
    pub pods: Vec<String>,
}

impl IdentityArgs {
    /// As a filter.
    pub fn filter(&self) -> IdentityFilter {
        IdentityFilter {
            units: self.units.clone(),
            containers: self.containers.clone(),
            pods: self.pods.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn event_sets_hold_each_kind_once() {
        let all = [
            EventKind::StateChange,
            EventKind::CloseWait,
            EventKind::Leak,
            EventKind::TimeWait,
            EventKind::PortPressure,
            EventKind::Summary,
        ];
        let set: EventSet = [EventKind::Leak, EventKind::Summary, EventKind::Leak].into();
        for kind in all {
            let want = matches!(kind, EventKind::Leak | EventKind::Summary);
            assert_eq!(set.contains(&kind), want, "{kind:?}");
        }
        let every: EventSet = all.into_iter().collect();
        assert!(all.iter().all(|k| every.contains(k)));
        assert!(!EventSet::default().contains(&EventKind::Leak));
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn metrics_are_off_by_default_and_on_loopback_when_asked_without_an_address() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.metrics);
        assert_eq!(parse(&["tcptrace"]).ok(), Some(None));
        let bare = parse(&["tcptrace", "--metrics"]).ok().flatten();
        assert_eq!(bare, "127.0.0.1:9464".parse().ok());
        assert!(bare.is_some_and(|a| a.ip().is_loopback()));
        let told = parse(&["tcptrace", "--metrics", "0.0.0.0:9100"])
            .ok()
            .flatten();
        assert_eq!(told, "0.0.0.0:9100".parse().ok());
    }

    #[test]
    fn last_use_is_on_by_default_and_off_when_asked() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| (c.last_use, c.last_use_gap));
        let ms = std::time::Duration::from_millis;
        assert_eq!(parse(&["tcptrace"]).ok(), Some((true, ms(10))));
        assert_eq!(
            parse(&["tcptrace", "--last-use", "off"]).ok().map(|p| p.0),
            Some(false)
        );
        assert_eq!(
            parse(&["tcptrace", "--last-use=on"]).ok().map(|p| p.0),
            Some(true)
        );
        assert_eq!(
            parse(&["tcptrace", "--last-use-gap", "50ms"]).ok(),
            Some((true, ms(50)))
        );
        assert!(parse(&["tcptrace", "--last-use", "sometimes"]).is_err());
        assert!(parse(&["tcptrace", "--last-use-gap", "0s"]).is_err());
    }

    #[test]
    fn stack_copies_are_whole_sizes_up_to_16k_and_can_be_off() {
        assert_eq!(parse_stack_copy("16K"), Ok(16384));
        assert_eq!(parse_stack_copy("8kib"), Ok(8192));
        assert_eq!(parse_stack_copy("4096"), Ok(4096));
        assert_eq!(parse_stack_copy("off"), Ok(0));
        assert_eq!(parse_stack_copy("0"), Ok(0));
        assert!(parse_stack_copy("17K").is_err());
        assert!(parse_stack_copy("1M").is_err());
        assert!(parse_stack_copy("-1").is_err());
        let parsed = Cli::try_parse_from(["tcptrace"]).map(|c| c.stack_copy);
        assert_eq!(parsed.ok(), Some(16384));
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("5m"),
            Ok(std::time::Duration::from_secs(300))
        );
        let cli = Cli::try_parse_from(["tcptrace"]).expect("defaults");
        assert_eq!(cli.leak_after, std::time::Duration::from_secs(30));
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("256K"), Ok(256 << 10));
        assert_eq!(parse_ring_size("16m"), Ok(16 << 20));
        assert!(parse_ring_size("3000").is_err());
        assert!(parse_ring_size("12K").is_err());
        assert!(parse_ring_size("x").is_err());
        assert!(parse_ring_size("4G").is_err());
        assert!(parse_ring_size("").is_err());
    }

    #[test]
    fn filters_from_flags() {
        let cli = Cli::try_parse_from([
            "tcptrace",
            "--pid",
            "7",
            "--port",
            "80",
            "--port",
            "443",
            "-6",
            "--state",
            "close_wait,LAST_ACK",
        ])
        .expect("valid");
        let f = cli.filter();
        assert_eq!(f.ports.len(), 2);
        assert_eq!(f.family, Some(Family::Ipv6));
        assert!(f.states.contains(&TcpState::LastAck));
        assert_eq!(cli.format(true), Format::Text);
        assert_eq!(cli.format(false), Format::Json);
    }

    #[test]
    fn bad_values_are_rejected() {
        for args in [
            &["tcptrace", "--port", "70000"][..],
            &["tcptrace", "--port", "0"],
            &["tcptrace", "--pid", "abc"],
            &["tcptrace", "--state", "BOGUS"],
            &["tcptrace", "--format", "xml"],
            &["tcptrace", "-4", "-6"],
            &["tcptrace", "--leak-after", "soon"],
            &["tcptrace", "--leak-after", "0s"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
    }
}
