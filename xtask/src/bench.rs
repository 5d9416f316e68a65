//! `cargo xtask bench`: what the agent costs the host, measured side by side
//! in one run, under two workloads (`--workload churn|redis|all`):
//! connection churn, here, and request/response traffic on long-lived
//! connections ([`redis`]: redis-benchmark against a redis-server), where
//! the agent's per-I/O last-use programs run.
//!
//! The churn load is `tcptrace-churn` (tests crate): one thread of loopback
//! connections, each connected, accepted, closed by the client then the
//! server, in a network namespace of the benchmark's own (wide port range,
//! TIME_WAIT reuse), so the host's ports are left alone. Rounds alternate
//! between tracers, in a rotating order, so that drift of the machine is
//! spread over all of them:
//!
//! - `none`: no tracer (the reference);
//! - `floor`: a program that does nothing on the same tracepoint;
//! - the same attached as a BTF tracepoint, as the agent attaches its own
//!   where the kernel has BTF;
//! - `floor` with no-op programs on the accept() exit tracepoints too;
//! - `agent`: the agent in its default mode (no `--events`: leaks and
//!   summaries);
//! - `agent-json`: the agent writing every transition as JSON to a file;
//! - `tcpstates`: libbpf-tools' tcpstates, when installed, to /dev/null.
//!
//! For the agent, transitions and lost records come from its own metrics
//! endpoint, CPU time and peak RSS from /proc. A scale run then holds 100 000
//! connections open and reports the agent's RSS and tracker size, and the
//! tracker alone is filled with 1 000 000 sockets (`tracker_memory`
//! example). The tables go to stdout and to BENCHMARKS.md, each workload in
//! a section of its own (a run of one workload keeps the other's section).

mod redis;
mod stacks;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::toolchain::BuildTools;
use crate::{cargo, run, say, workspace};

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOpts {
    /// Rounds per tracer (alternating).
    #[arg(long, default_value_t = 9)]
    pub rounds: usize,
    /// Seconds of churn per round.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Connections held open in the scale run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub scale: usize,
    /// Sockets put in the tracker alone for its memory figure (0 skips it).
    #[arg(long, default_value_t = 1_000_000)]
    pub tracker_sockets: usize,
    /// Where the table is recorded.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
    /// Which workloads run: connection churn, redis-benchmark request/response, or both.
    #[arg(long, value_enum, default_value_t = Workload::All)]
    pub workload: Workload,
    /// Requests per redis-benchmark test (SET, then GET) in a round; 0: sized from the
    /// warm-up round so that a round takes --redis-seconds.
    #[arg(long, default_value_t = 0)]
    pub redis_requests: u64,
    /// Seconds a redis round aims at, when --redis-requests is 0.
    #[arg(long, default_value_t = 4.0)]
    pub redis_seconds: f64,
    /// redis-benchmark's parallel connections (-c).
    #[arg(long, default_value_t = 50)]
    pub redis_clients: u32,
    /// Rounds per tracer with kernel.bpf_stats_enabled on, for the kernel time of the
    /// redis workload's programs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub kernel_rounds: usize,
    /// Rounds per --stacks-per-second limit in the churn workload's stack pass (each beside
    /// a no-tracer round; 0 skips the pass).
    #[arg(long, default_value_t = 3)]
    pub stack_rounds: usize,
}

/// The workloads of `cargo xtask bench`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Loopback connection churn (connect, accept, close), the scale run and the
    /// tracker's memory.
    Churn,
    /// redis-benchmark against redis-server: many connections, small requests.
    Redis,
    /// Both.
    All,
}

/// A tracer under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    None,
    Floor,
    FloorBtf,
    FloorHooks,
    /// A BTF floor plus no-op BTF programs on the socket send/receive
    /// tracepoints (where the agent's last-use programs run).
    FloorIo,
    Agent,
    /// The agent with `--last-use off`.
    AgentLastUseOff,
    /// The agent with `--stack-copy off`: frame-pointer walks only.
    AgentStackCopyOff,
    /// The agent at `--stacks-per-second N` (the stack pass).
    AgentStacks(u32),
    AgentJson,
    Tcpstates,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Floor => "floor (no-op program)",
            Self::FloorBtf => "no-op BTF tracepoint program",
            Self::FloorHooks => "floor + no-op accept() hooks",
            Self::FloorIo => "floor: no-op programs on socket send/receive",
            Self::Agent => "agent (default: leak events)",
            Self::AgentLastUseOff => "agent --last-use off",
            Self::AgentStackCopyOff => "agent --stack-copy off (frame pointers only)",
            Self::AgentStacks(_) => "agent at a --stacks-per-second of the stack pass",
            Self::AgentJson => "agent (every transition as JSON to a file)",
            Self::Tcpstates => "libbpf-tools tcpstates > /dev/null",
        }
    }
}

/// One round of one tracer.
#[derive(Clone, Debug, Default)]
struct Round {
    per_second: f64,
    /// The 90th percentile of the rates of the round's 100 ms slices.
    slice_p90: f64,
    connections: u64,
    /// From the agent's metrics; `None` for other tracers.
    transitions: Option<u64>,
    lost: Option<u64>,
    /// CPU seconds the tracer process used during the churn.
    cpu_seconds: Option<f64>,
    /// Peak RSS of the tracer process, bytes.
    peak_rss: Option<u64>,
}

/// The network namespace the load runs in; removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Result<Self> {
        let name = format!("tcptrace-bench-{}", std::process::id());
        run::checked(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        for args in [
            &["ip", "link", "set", "lo", "up"][..],
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.ip_local_port_range=1024 65535",
            ],
            &["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"],
            &["sysctl", "-q", "-w", "net.core.somaxconn=65535"],
        ] {
            run::checked(&mut ns.exec(args))?;
        }
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A running tracer: its process, stderr lines, metrics port.
struct Tracer {
    child: Child,
    metrics_port: Option<u16>,
    /// Its stderr, line by line.
    stderr: std::sync::mpsc::Receiver<String>,
    /// What it wrote on stderr up to "ready" (warnings about what is off).
    startup: Vec<String>,
}

impl Tracer {
    fn start(mode: Mode, agent: &Path, scratch: &Path) -> Result<Option<Self>> {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{port}");
        let json = scratch.join("transitions.json");
        // The agent as deployed (JSON, no state file), with its metrics on,
        // and `extra`.
        let default_agent = |extra: &[&str]| {
            let mut c = Command::new(agent);
            c.args(["--format", "json", "--state-file", "none"])
                .args(["--metrics", &metrics])
                .args(extra);
            c
        };
        let mut cmd = match mode {
            Mode::None => return Ok(None),
            Mode::Floor => {
                let mut c = Command::new(agent);
                c.arg("bench-floor");
                c
            }
            Mode::FloorBtf => {
                let mut c = Command::new(agent);
                c.args(["bench-floor", "--btf"]);
                c
            }
            Mode::FloorHooks => {
                let mut c = Command::new(agent);
                c.args(["bench-floor", "--syscall-hooks"]);
                c
            }
            Mode::FloorIo => {
                let mut c = Command::new(agent);
                c.args(["bench-floor", "--btf", "--io"]);
                c
            }
            // No --events: what the agent does when nobody chooses.
            Mode::Agent => default_agent(&[]),
            Mode::AgentLastUseOff => default_agent(&["--last-use", "off"]),
            Mode::AgentStackCopyOff => default_agent(&["--stack-copy", "off"]),
            Mode::AgentStacks(limit) => default_agent(&["--stacks-per-second", &limit.to_string()]),
            Mode::AgentJson => {
                let mut c = Command::new(agent);
                c.args(["--events", "state-change", "--format", "json"])
                    .args(["--state-file", "none", "--metrics", &metrics])
                    .arg("--output")
                    .arg(format!("file:{}", json.display()));
                c
            }
            Mode::Tcpstates => Command::new(tcpstates().context("tcpstates is not installed")?),
        };
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", run::describe(&cmd)))?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut startup = Vec::new();
        if mode == Mode::Tcpstates {
            // tcpstates says nothing when ready: give it time to attach.
            std::thread::sleep(Duration::from_secs(2));
        } else {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(line) if line.contains("ready") => break,
                    Ok(line) => startup.push(line),
                    Err(e) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        let why = match e {
                            std::sync::mpsc::RecvTimeoutError::Timeout => "within 30 s",
                            std::sync::mpsc::RecvTimeoutError::Disconnected => "before it exited",
                        };
                        let said = startup.iter().rev().take(3).rev().cloned();
                        bail!(
                            "{} (`{}`) never said it was ready {why}; its last words: {:?}",
                            mode.name(),
                            run::describe(&cmd),
                            said.collect::<Vec<_>>().join(" / ")
                        );
                    }
                }
            }
        }
        Ok(Some(Self {
            child,
            metrics_port: matches!(
                mode,
                Mode::Agent
                    | Mode::AgentJson
                    | Mode::AgentLastUseOff
                    | Mode::AgentStackCopyOff
                    | Mode::AgentStacks(_)
            )
            .then_some(port),
            stderr: rx,
            startup,
        }))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// (transitions, lost records) from the agent's metrics.
    fn counts(&self) -> Result<Option<(u64, u64)>> {
        let Some(port) = self.metrics_port else {
            return Ok(None);
        };
        let text = scrape(port)?;
        Ok(Some((
            sum_of(&text, "tcptrace_transitions_total"),
            sum_of(&text, "tcptrace_ring_buffer_lost_records_total"),
        )))
    }

    /// Kernel time of its programs so far, ns: from the agent's metrics, or
    /// (`after_stop`) from what `bench-floor` logs as it exits.
    fn program_ns(&self, after_stop: bool) -> Result<Option<f64>> {
        if let Some(port) = self.metrics_port {
            let text = scrape(port)?;
            return Ok(Some(
                sum_f64(&text, "tcptrace_bpf_program_run_seconds_total") * 1e9,
            ));
        }
        if !after_stop {
            return Ok(None);
        }
        // "program NAME: N runs, M ns in the kernel"
        let ns = self
            .stderr
            .try_iter()
            .filter_map(|l| {
                let rest = l.split_once("runs, ")?.1;
                rest.split_whitespace().next()?.parse::<f64>().ok()
            })
            .sum();
        Ok(Some(ns))
    }

    /// Runs and kernel time of each of its programs so far, by name: from
    /// the agent's metrics, or (`after_stop`) from what `bench-floor` logs as
    /// it exits. `None` for a tracer that tells neither (or before the floor
    /// stopped).
    fn program_times(&self, after_stop: bool) -> Result<Option<Vec<ProgramTime>>> {
        if let Some(port) = self.metrics_port {
            let text = scrape(port)?;
            let runs = labelled(&text, "tcptrace_bpf_program_runs_total", "program");
            let secs = labelled(&text, "tcptrace_bpf_program_run_seconds_total", "program");
            return Ok(Some(
                runs.into_iter()
                    .map(|(program, runs)| {
                        let ns = secs
                            .iter()
                            .find(|(p, _)| *p == program)
                            .map_or(0.0, |(_, s)| s * 1e9);
                        ProgramTime { program, runs, ns }
                    })
                    .collect(),
            ));
        }
        if !after_stop {
            return Ok(None);
        }
        Ok(Some(
            self.stderr
                .try_iter()
                .filter_map(|l| floor_program_line(&l))
                .collect(),
        ))
    }

    fn stop(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            // Stopped already (and reaped: its pid may be someone else's).
            return Ok(());
        }
        // SAFETY: kill with a valid pid and signal.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("the tracer did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One kernel program's runs and time in the kernel, ns (counted while
/// `kernel.bpf_stats_enabled` is 1).
#[derive(Clone, Debug, PartialEq)]
struct ProgramTime {
    program: String,
    runs: f64,
    ns: f64,
}

/// `program NAME: N runs, M ns in the kernel`, as `bench-floor` logs it
/// when it exits (after the log's own prefix).
fn floor_program_line(line: &str) -> Option<ProgramTime> {
    let rest = &line[line.find("program ")? + "program ".len()..];
    let (program, rest) = rest.split_once(": ")?;
    let (runs, rest) = rest.split_once(" runs, ")?;
    let ns = rest.split_whitespace().next()?;
    Some(ProgramTime {
        program: program.to_string(),
        runs: runs.trim().parse().ok()?,
        ns: ns.parse().ok()?,
    })
}

fn tcpstates() -> Option<PathBuf> {
    ["/usr/sbin/tcpstates", "/usr/bin/tcpstates"]
        .iter()
        .map(PathBuf::from)
        .find(|p| run::is_executable(p))
        .or_else(|| run::find_in_path("tcpstates"))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// `GET /metrics` from the agent.
fn scrape(port: u16) -> Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("connecting to the agent's metrics on port {port}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// Sum of every sample of metric `name` (all label sets).
fn sum_of(text: &str, name: &str) -> u64 {
    sum_f64(text, name) as u64
}

/// [`sum_of`], unrounded.
fn sum_f64(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Each sample of metric `name` by the value of its label `label`
/// (`name{label="v",...} x`), summed over the other labels.
fn labelled(text: &str, name: &str, label: &str) -> Vec<(String, f64)> {
    let key = format!("{label}=\"");
    let mut out: Vec<(String, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Some(v) = labels
            .split_once(&key)
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(v, _)| v.to_string())
        else {
            continue;
        };
        let Ok(x) = value.trim().parse::<f64>() else {
            continue;
        };
        match out.iter_mut().find(|(name, _)| *name == v) {
            Some((_, sum)) => *sum += x,
            None => out.push((v, x)),
        }
    }
    out
}

/// `kernel.bpf_stats_enabled` on for as long as this lives, then back to
/// what it was: the kernel times every BPF program run meanwhile, which
/// costs each run some 40 ns, so the rounds that measure rates run without.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<Self> {
        let before =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, self.before.trim());
    }
}

/// Kernel time per connection of `mode`'s programs, ns: one churn round
/// with `kernel.bpf_stats_enabled` on, for the tracers whose programs the
/// benchmark can read (its own).
fn kernel_ns_per_connection(
    mode: Mode,
    opts: &BenchOpts,
    bins: &Bins,
    ns: &Netns,
) -> Result<Option<f64>> {
    if !matches!(
        mode,
        Mode::Floor
            | Mode::FloorBtf
            | Mode::FloorHooks
            | Mode::Agent
            | Mode::AgentStackCopyOff
            | Mode::AgentJson
    ) {
        return Ok(None);
    }
    let scratch = cargo::target_dir()?.join("bench");
    std::fs::create_dir_all(&scratch)?;
    let _stats = BpfStats::enable()?;
    let Some(mut tracer) = Tracer::start(mode, &bins.agent, &scratch)? else {
        return Ok(None);
    };
    let before = tracer.program_ns(false)?.unwrap_or(0.0);
    let out = churn(opts, bins, ns)?;
    let connections = json_number(&out, "connections").unwrap_or(0.0);
    std::thread::sleep(Duration::from_millis(500));
    let after = match tracer.program_ns(false)? {
        Some(ns) => Some(ns),
        None => {
            tracer.stop()?;
            std::thread::sleep(Duration::from_millis(200));
            tracer.program_ns(true)?
        }
    };
    tracer.stop()?;
    let _ = std::fs::remove_file(scratch.join("transitions.json"));
    Ok(after
        .filter(|_| connections > 0.0)
        .map(|a| (a - before) / connections))
}

/// (utime + stime) of `pid`, seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

/// A `VmHWM`/`VmRSS`-style line of /proc/PID/status, bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The JSON number after `"key":` in a one-line object.
fn json_number(line: &str, key: &str) -> Option<f64> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

/// One churn round in the benchmark's namespace; its JSON report.
fn churn(opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<String> {
    let seconds = format!("{}", opts.seconds);
    let churn = bins.churn.display().to_string();
    run::capture_stdout(&mut ns.exec(&[&churn, "churn", "--seconds", &seconds, "--cpu", CHURN_CPU]))
}

fn one_round(mode: Mode, opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<Round> {
    let scratch = cargo::target_dir()?.join("bench");
    std::fs::create_dir_all(&scratch)?;
    let tracer = Tracer::start(mode, &bins.agent, &scratch)?;
    let before = match &tracer {
        Some(t) => t.counts()?,
        None => None,
    };
    let cpu_before = tracer.as_ref().and_then(|t| cpu_seconds(t.pid()));
    let out = churn(opts, bins, ns)?;
    let mut round = Round {
        per_second: json_number(&out, "per_second").context("churn printed no rate")?,
        slice_p90: json_number(&out, "slice_p90").unwrap_or(0.0),
        connections: json_number(&out, "connections").unwrap_or(0.0) as u64,
        ..Round::default()
    };
    if let Some(t) = &tracer {
        // Let the tracer catch up with what the churn left in its buffer.
        std::thread::sleep(Duration::from_millis(500));
        round.cpu_seconds = cpu_before.zip(cpu_seconds(t.pid())).map(|(a, b)| b - a);
        round.peak_rss = status_bytes(t.pid(), "VmHWM:");
        if let (Some((t0, l0)), Some((t1, l1))) = (before, t.counts()?) {
            round.transitions = Some(t1.saturating_sub(t0));
            round.lost = Some(l1.saturating_sub(l0));
        }
    }
    if let Some(mut t) = tracer {
        t.stop()?;
    }
    let _ = std::fs::remove_file(scratch.join("transitions.json"));
    Ok(round)
}

/// The CPU the churn is pinned to (an unpinned single thread moved between
/// CPUs by the scheduler runs at half speed now and then).
const CHURN_CPU: &str = "0";

struct Bins {
    agent: PathBuf,
    churn: PathBuf,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One table row.
struct Row {
    mode: Mode,
    median: f64,
    spread_pct: f64,
    ratio: f64,
    /// The same over the rounds' fast slices (see [`Round::slice_p90`]).
    fast_ratio: f64,
    lost: Option<u64>,
    cpu_per_m: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// From the kernel-time pass.
    kernel_ns: Option<f64>,
}

/// A tracer's rounds against the no-tracer rounds of the same rounds: the
/// ratio is the median of the per-round ratios, each taken within seconds
/// of its reference, so that the machine's drift over the run (a shared VM
/// host can swing by a fifth) cancels out instead of landing in one mode.
fn summarize(mode: Mode, rounds: &[Round], reference: &[Round], per_conn: f64) -> Row {
    let paired = |rate: fn(&Round) -> f64| {
        let mut ratios: Vec<f64> = rounds
            .iter()
            .zip(reference)
            .filter(|(_, none)| rate(none) > 0.0)
            .map(|(r, none)| rate(r) / rate(none))
            .collect();
        median(&mut ratios)
    };
    let ratio = paired(|r| r.per_second);
    let fast_ratio = paired(|r| r.slice_p90);
    let mut rates: Vec<f64> = rounds.iter().map(|r| r.per_second).collect();
    let med = median(&mut rates);
    let (lo, hi) = (
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
    );
    let lost = rounds
        .iter()
        .map(|r| r.lost)
        .try_fold(0u64, |acc, l| l.map(|l| acc + l));
    let cpu: Option<f64> = rounds.iter().map(|r| r.cpu_seconds).sum();
    let transitions: f64 = rounds
        .iter()
        .map(|r| {
            r.transitions
                .map_or(r.connections as f64 * per_conn, |t| t as f64)
        })
        .sum();
    Row {
        mode,
        median: med,
        spread_pct: if med > 0.0 {
            (hi - lo) / med * 100.0
        } else {
            0.0
        },
        ratio,
        fast_ratio,
        lost,
        cpu_per_m: cpu
            .filter(|_| transitions > 0.0)
            .map(|c| c / transitions * 1e6),
        peak_rss_mib: rounds
            .iter()
            .filter_map(|r| r.peak_rss)
            .max()
            .map(|b| b as f64 / (1 << 20) as f64),
        kernel_ns: None,
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| tracer | connections/s (median) | spread (max-min) | ratio to none | ratio, fast slices | lost records | CPU s per 1M transitions | peak RSS MiB | kernel ns per connection |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    for r in rows {
        t.push_str(&format!(
            "| {} | {:.0} | {:.1} % | {:.3} | {:.3} | {} | {} | {} | {} |\n",
            r.mode.name(),
            r.median,
            r.spread_pct,
            r.ratio,
            r.fast_ratio,
            opt(r.lost.map(|l| l.to_string())),
            opt(r.cpu_per_m.map(|c| format!("{c:.2}"))),
            opt(r.peak_rss_mib.map(|m| format!("{m:.1}"))),
            opt(r.kernel_ns.map(|n| format!("{n:.0}"))),
        ));
    }
    t
}

/// The machine, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or_else(
            || "?".into(),
            |k| format!("{:.1} GiB", k as f64 / 1048576.0),
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_default();
    // The CPU flag a hypervisor sets: the cores may be shared with others.
    let vm = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "hypervisor"))
    });
    let vm = if vm { ", a VM" } else { "" };
    format!("{cores} cores ({cpu}){vm}, {mem} RAM, Linux {kernel}")
}

/// Scale: `count` connections held open while the agent runs.
fn scale_run(count: usize, bins: &Bins, ns: &Netns) -> Result<String> {
    let scratch = cargo::target_dir()?.join("bench");
    let mut tracer = Tracer::start(Mode::Agent, &bins.agent, &scratch)?.context("the agent")?;
    let churn = bins.churn.display().to_string();
    // One holder keeps as many connections as its descriptor limit allows.
    let per_holder: usize = run::capture_stdout(&mut ns.exec(&[&churn, "hold", "--max"]))?
        .trim()
        .parse()
        .context("the holder's capacity")?;
    let per_holder = per_holder.clamp(1, count);
    let started = Instant::now();
    let mut holders = Vec::new();
    let mut left = count;
    while left > 0 {
        let n = left.min(per_holder);
        left -= n;
        let n_arg = n.to_string();
        let mut hold = ns
            .exec(&[&churn, "hold", "--count", &n_arg, "--ports", "4"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a connection holder")?;
        let mut line = String::new();
        BufReader::new(hold.stdout.take().context("piped stdout")?).read_line(&mut line)?;
        if !line.contains("\"open\"") {
            let _ = hold.kill();
            bail!("a holder failed to open {n} connections: {line:?}");
        }
        holders.push(hold);
    }
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let port = tracer.metrics_port.context("metrics port")?;
    let text = scrape(port)?;
    let tracked = sum_of(&text, "tcptrace_tracked_sockets");
    // Leak-only mode keeps origins in the kernel, not in the tracker.
    let origins = sum_of(&text, "tcptrace_kernel_origins");
    let rss = status_bytes(tracer.pid(), "VmRSS:").unwrap_or(0);
    let lost = sum_of(&text, "tcptrace_ring_buffer_lost_records_total");
    for mut hold in holders {
        drop(hold.stdin.take());
        let _ = hold.wait();
    }
    tracer.stop()?;
    Ok(format!(
        "{count} connections ({} sockets) opened in {:.1} s and held: the agent tracked {tracked} \
         sockets and the kernel kept {origins} origins for it (an origin is kept for the \
         connections within --stacks-per-second), with {:.1} MiB agent RSS, {lost} records lost.",
        count * 2,
        opened_in.as_secs_f64(),
        rss as f64 / 1048576.0
    ))
}

/// The tracker alone with `n` sockets (the `tracker_memory` example).
fn tracker_memory(tools: &BuildTools, n: usize) -> Result<String> {
    let out = cargo::run_example(tools, "tracker_memory", &[&n.to_string()])?;
    Ok(out.trim().to_string())
}

/// `cargo xtask bench`.
pub fn bench(tools: &BuildTools, opts: &BenchOpts) -> Result<i32> {
    if !run::is_root() {
        bail!("cargo xtask bench needs root (it loads BPF programs); run it as root");
    }
    let started = Instant::now();
    let agent = cargo::build_agent(tools, true)?;
    let ns = Netns::create()?;
    let path = workspace::root().join(&opts.output);
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    let mut churn_text = section(&before, CHURN).or_else(|| legacy_churn(&before));
    let mut redis_text = section(&before, REDIS);
    if matches!(opts.workload, Workload::Churn | Workload::All) {
        let t = Instant::now();
        let churn = cargo::build_bin(tools, "tcptrace-tests", "tcptrace-churn", true)?;
        let bins = Bins {
            agent: agent.clone(),
            churn,
        };
        churn_text = Some(churn_section(tools, opts, &bins, &ns)?);
        say!("churn workload: {:.0} s", t.elapsed().as_secs_f64());
    }
    if matches!(opts.workload, Workload::Redis | Workload::All) {
        let t = Instant::now();
        redis_text = Some(redis::section(opts, &agent, &ns)?);
        say!("redis workload: {:.0} s", t.elapsed().as_secs_f64());
    }
    let mut doc = String::from(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` (do not edit by hand); rerun it to refresh. \
         `--workload churn` or `--workload redis` refreshes its own section and keeps \
         the other.\n",
    );
    for (key, text) in [(CHURN, churn_text), (REDIS, redis_text)] {
        if let Some(text) = text {
            doc.push_str(&format!(
                "\n<!-- bench:{key} -->\n{}\n<!-- /bench:{key} -->\n",
                text.trim()
            ));
        }
    }
    std::fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
    say!(
        "recorded in {} ({:.0} s in all)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// Section names in BENCHMARKS.md.
const CHURN: &str = "churn";
const REDIS: &str = "redis";

/// The text of section `key` of a BENCHMARKS.md written by [`bench`].
fn section(doc: &str, key: &str) -> Option<String> {
    let open = format!("<!-- bench:{key} -->");
    let close = format!("<!-- /bench:{key} -->");
    let start = doc.find(&open)? + open.len();
    let len = doc[start..].find(&close)?;
    Some(doc[start..start + len].trim().to_string())
}

/// The churn section of a BENCHMARKS.md from before there were sections
/// (everything after its first lines).
fn legacy_churn(doc: &str) -> Option<String> {
    let start = doc.find("- when:")?;
    let text = doc[start..]
        .replace("\n## Scale", "\n### Scale")
        .replace("\n## Tracker memory", "\n### Tracker memory");
    Some(format!("## Connection churn\n\n{}", text.trim()))
}

/// The connection churn workload: its rounds, kernel-time pass, scale run
/// and tracker memory; its section of BENCHMARKS.md.
fn churn_section(tools: &BuildTools, opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<String> {
    let mut modes = vec![
        Mode::None,
        Mode::Floor,
        Mode::FloorBtf,
        Mode::FloorHooks,
        Mode::Agent,
        Mode::AgentStackCopyOff,
        Mode::AgentJson,
    ];
    if tcpstates().is_some() {
        modes.push(Mode::Tcpstates);
    } else {
        say!("tcpstates not installed (apt-get install libbpf-tools): left out");
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); modes.len()];
    // A warm-up round, not counted: page cache, TIME_WAIT tables, CPU clocks.
    one_round(Mode::None, opts, bins, ns).context("the warm-up round")?;
    for round in 0..opts.rounds {
        for k in 0..modes.len() {
            // Rotate the order each round, so no tracer always runs first.
            let i = (k + round) % modes.len();
            let r = one_round(modes[i], opts, bins, ns)
                .with_context(|| format!("round {} of {}", round + 1, modes[i].name()))?;
            say!(
                "round {}/{}: {:<45} {:>9.0} connections/s",
                round + 1,
                opts.rounds,
                modes[i].name(),
                r.per_second
            );
            results[i].push(r);
        }
    }
    // Transitions per connection, as the agent counted them, for tracers
    // that do not count.
    let per_conn = {
        let (t, c) = results
            .iter()
            .flatten()
            .filter_map(|r| r.transitions.map(|t| (t, r.connections)))
            .fold((0u64, 0u64), |(a, b), (t, c)| (a + t, b + c));
        if c > 0 {
            t as f64 / c as f64
        } else {
            10.0
        }
    };
    let mut rows: Vec<Row> = modes
        .iter()
        .zip(&results)
        .map(|(m, r)| summarize(*m, r, &results[0], per_conn))
        .collect();
    // The programs' own time, which the host's noise does not blur.
    for row in &mut rows {
        row.kernel_ns = kernel_ns_per_connection(row.mode, opts, bins, ns)
            .with_context(|| format!("the kernel-time pass of {}", row.mode.name()))?;
        if let Some(n) = row.kernel_ns {
            say!(
                "kernel time: {:<45} {n:>6.0} ns per connection",
                row.mode.name()
            );
        }
    }
    let table = table(&rows);
    println!("\n{table}");
    let scale = if opts.scale > 0 {
        let s = scale_run(opts.scale, bins, ns)?;
        println!("scale: {s}");
        s
    } else {
        "skipped".into()
    };
    let stacks = if opts.stack_rounds > 0 {
        stacks::section(opts, bins, ns)?
    } else {
        "### Stack copies and unwinding\n\nskipped".into()
    };
    let tracker = if opts.tracker_sockets > 0 {
        let s = tracker_memory(tools, opts.tracker_sockets)?;
        println!("tracker: {s}");
        s
    } else {
        "skipped".into()
    };
    let now = run::capture_stdout(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_default();
    Ok(format!(
        "## Connection churn\n\n\
         - when: {}\n- machine: {}\n- load: one thread of loopback connection churn \
         (connect, accept, client closes, server closes; {per_conn:.1} transitions per \
         connection as the agent counted them) pinned to CPU {CHURN_CPU}, in a network \
         namespace of its own; {} rounds of {} s per tracer, alternating, after a warm-up \
         round\n\n\
         {table}\n\
         The ratio is the median over rounds of the tracer's rate over the same round's \
         rate with no tracer. The fast-slice ratio is the same with each round's rate \
         taken as the 90th percentile of its 100 ms slices: on a shared host whole slices \
         run at half speed now and then, whatever the tracer, and this column leaves them \
         out (a tracer's own periodic stalls would hide there too: compare with the plain \
         ratio). The no-op BTF tracepoint row is a floor attached the way the agent \
         attaches its state program where the kernel has BTF: the kernel passes it the \
         tracepoint's arguments and fills no record, which costs less than the classic \
         tracepoint's floor. The floor + accept() hooks row adds no-op programs on \
         the syscall tracepoints the agent needs for accept() origins: what hooking \
         syscalls costs by itself (every syscall on the host then takes the tracing \
         path). CPU is the tracer process's own (user + system) during the churn; the kernel \
         program's cost shows in the ratio. Lost records are the agent's own count (ring \
         buffer full, or runs the kernel skipped). Kernel ns per connection comes from one \
         more round per tracer with `kernel.bpf_stats_enabled` on: the time the kernel \
         spent in the tracer's programs (all of them: state, accept(), RST) over the \
         connections made. Timing costs each run some 40 ns, which is most of the floor's \
         figure; the agent's cost over the floor is the difference. Unlike the rates, it is \
         not blurred by what the host does meanwhile. The agent's default copies user \
         stacks for CFI unwinding (`--stack-copy 16K`) within `--stacks-per-second`; the \
         `--stack-copy off` row is the same agent walking frame pointers only.\n\n\
         {stacks}\n\n\
         ### Scale\n\n{scale}\n\n### Tracker memory\n\n{tracker}\n",
        now.trim(),
        machine(),
        opts.rounds,
        opts.seconds,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_logs_each_programs_time() {
        let line = "[2026-12-01T10:00:00Z INFO ] program bench_floor_send: 1200 runs, 48000 ns in \
                    the kernel";
        assert_eq!(
            floor_program_line(line),
            Some(ProgramTime {
                program: "bench_floor_send".into(),
                runs: 1200.0,
                ns: 48000.0
            })
        );
        assert_eq!(floor_program_line("[x INFO ] ready: no-op programs"), None);
    }

    #[test]
    fn labelled_samples_are_summed_by_label() {
        let text = "# TYPE tcptrace_bpf_program_runs_total counter\n\
                    tcptrace_bpf_program_runs_total{program=\"sock_send_length\"} 10\n\
                    tcptrace_bpf_program_runs_total{program=\"sock_recv_length\",cpu=\"0\"} 4\n\
                    tcptrace_bpf_program_runs_total{program=\"sock_recv_length\",cpu=\"1\"} 5\n\
                    tcptrace_bpf_program_runs_totalx{program=\"no\"} 1\n";
        assert_eq!(
            labelled(text, "tcptrace_bpf_program_runs_total", "program"),
            [
                ("sock_send_length".to_string(), 10.0),
                ("sock_recv_length".to_string(), 9.0)
            ]
        );
    }

    #[test]
    fn sections_are_found_by_their_markers() {
        let doc = "# Benchmarks\n\n<!-- bench:churn -->\nA\n<!-- /bench:churn -->\n\n\
                   <!-- bench:redis -->\nB\n<!-- /bench:redis -->\n";
        assert_eq!(section(doc, CHURN).as_deref(), Some("A"));
        assert_eq!(section(doc, REDIS).as_deref(), Some("B"));
        assert_eq!(section("# Benchmarks\n", REDIS), None);
        let legacy = "# Benchmarks\n\nWritten by\n\n- when: x\n\n## Scale\n\ny\n";
        assert_eq!(
            legacy_churn(legacy).as_deref(),
            Some("## Connection churn\n\n- when: x\n\n### Scale\n\ny")
        );
    }
}
