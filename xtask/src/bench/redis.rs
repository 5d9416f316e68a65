//! The request/response workload of `cargo xtask bench`: a real
//! `redis-benchmark` against a real `redis-server`, many connections and
//! small messages, where every request is a send and a receive on each side.
//! This is what the agent's last-use programs (one socket-storage lookup per
//! send and receive, a stack walk per checkout) cost, where the churn
//! workload has next to no I/O.
//!
//! The server is started once, with a directory of its own and no
//! persistence, on 127.0.0.1 in the benchmark's network namespace (no
//! other redis is in the way), and killed at the end. Rounds alternate
//! between tracers in a rotating order, as the churn rounds do:
//!
//! - `none`: no tracer (the reference);
//! - the floor: no-op BTF programs on `sock_send_length` and
//!   `sock_recv_length` (and the state tracepoint), `bench-floor --btf --io`;
//! - the agent in its default mode (last use on);
//! - the agent with `--last-use off`.
//!
//! Stack walks and checkouts come from the agent's metrics. Then, with
//! `kernel.bpf_stats_enabled` on, more rounds give each program's kernel
//! time per run: per send and per receive, against the floor's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use super::{
    cpu_seconds, machine, median, scrape, sum_f64, BenchOpts, BpfStats, Mode, Netns, ProgramTime,
    Tracer,
};
use crate::{cargo, run, say};

/// The tracers, in table order (the first is the reference).
const MODES: [Mode; 4] = [
    Mode::None,
    Mode::FloorIo,
    Mode::Agent,
    Mode::AgentLastUseOff,
];

/// The port redis-server listens on, on 127.0.0.1 in the benchmark's own
/// network namespace.
const PORT: &str = "16379";
/// The CPUs the server and the client are pinned to (with 2 CPUs or more):
/// one each, so that neither is moved around by the scheduler.
const SERVER_CPU: &str = "0";
const CLIENT_CPU: &str = "1";
/// Bytes of each SET value (`-d`).
const VALUE_SIZE: &str = "16";
/// The tests run (`-t`), each with the same number of requests.
const TESTS: [&str; 2] = ["SET", "GET"];

/// The agent's counters of last use.
const WALKS: &str = "tcptrace_last_use_stacks_total";
const CHECKOUTS: &str = "tcptrace_last_use_checkouts_total";

/// The kernel programs on the two I/O tracepoints: (send, receive).
fn io_programs(mode: Mode) -> Option<(&'static str, &'static str)> {
    match mode {
        Mode::FloorIo => Some(("bench_floor_send", "bench_floor_recv")),
        Mode::Agent | Mode::AgentLastUseOff => Some(("sock_send_length", "sock_recv_length")),
        _ => None,
    }
}

fn label(mode: Mode) -> &'static str {
    match mode {
        Mode::None => "none",
        Mode::FloorIo => "floor: no-op programs on socket send/receive",
        Mode::Agent => "agent (default: last use on)",
        Mode::AgentLastUseOff => "agent --last-use off",
        other => other.name(),
    }
}

/// A command of redis-tools or redis-server.
fn tool(name: &str) -> Result<PathBuf> {
    run::find_in_path(name)
        .or_else(|| {
            ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| run::is_executable(p))
        })
        .with_context(|| {
            format!(
                "{name} is not installed (the redis workload needs Debian's redis-server and \
                 redis-tools); install them, or run `--workload churn`"
            )
        })
}

/// `taskset -c CPU` in front of a command, when there are CPUs to choose
/// from and taskset is there.
fn pinned(cpu: &str) -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    match run::find_in_path("taskset") {
        Some(taskset) if cores >= 2 => vec![
            taskset.display().to_string(),
            "-c".to_string(),
            cpu.to_string(),
        ],
        _ => Vec::new(),
    }
}

/// The redis-server of the benchmark; killed, and its directory removed,
/// on drop.
struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    fn start(ns: &Netns) -> Result<Self> {
        let server = tool("redis-server")?.display().to_string();
        let cli = tool("redis-cli")?.display().to_string();
        let dir = cargo::target_dir()?
            .join("bench")
            .join(format!("redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating redis-server's directory {}", dir.display()))?;
        let dir_arg = dir.display().to_string();
        let log = dir.join("redis.log").display().to_string();
        let mut args = pinned(SERVER_CPU);
        args.push(server);
        for a in [
            "--port",
            PORT,
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir_arg,
            "--logfile",
            &log,
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ] {
            args.push(a.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = ns.exec(&args);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", run::describe(&cmd)))?;
        let mut server = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run::capture(&mut ns.exec(&[&cli, "-h", "127.0.0.1", "-p", PORT, "ping"]))?;
            if String::from_utf8_lossy(&out.stdout).contains("PONG") {
                break;
            }
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "redis-server exited ({status}) before answering a PING; see {}",
                    server.dir.join("redis.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server did not answer a PING within 10 s; see {}",
                    server.dir.join("redis.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        say!(
            "redis-server: 127.0.0.1:{PORT} in the benchmark's namespace, no persistence, \
             in {}",
            server.dir.display()
        );
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one redis-benchmark run did.
#[derive(Clone, Copy, Debug)]
struct Load {
    /// Requests/s over all its tests (requests over the time the tests
    /// took, as redis-benchmark timed them).
    per_second: f64,
    requests: f64,
    /// Wall time of the whole run (connections included).
    seconds: f64,
}

/// One redis-benchmark run, `n` requests per test.
fn benchmark(ns: &Netns, n: u64, clients: u32) -> Result<Load> {
    let bench = tool("redis-benchmark")?.display().to_string();
    let (n_arg, c_arg) = (n.to_string(), clients.to_string());
    let tests = TESTS.join(",").to_lowercase();
    let mut args = pinned(CLIENT_CPU);
    args.push(bench);
    for a in [
        "-h",
        "127.0.0.1",
        "-p",
        PORT,
        "-c",
        &c_arg,
        "-t",
        &tests,
        "-d",
        VALUE_SIZE,
        "-n",
        &n_arg,
        "--csv",
    ] {
        args.push(a.to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = run::capture_stdout(&mut ns.exec(&args))?;
    let seconds = started.elapsed().as_secs_f64();
    let rates = parse_csv(&out);
    let mut time = 0.0;
    for test in TESTS {
        let rps = rates
            .iter()
            .find(|(t, _)| t == test)
            .map(|(_, r)| *r)
            .filter(|r| *r > 0.0)
            .with_context(|| format!("redis-benchmark printed no rate for {test}: {out:?}"))?;
        time += n as f64 / rps;
    }
    let requests = (n as usize * TESTS.len()) as f64;
    Ok(Load {
        per_second: requests / time,
        requests,
        seconds,
    })
}

/// (test, requests/s) from redis-benchmark's `--csv` lines
/// (`"SET","155279.50","0.189",...`; the header line has no number).
fn parse_csv(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split(',').map(|f| f.trim().trim_matches('"'));
            let test = fields.next()?.to_string();
            let rps = fields.next()?.parse::<f64>().ok()?;
            Some((test, rps))
        })
        .collect()
}

/// A counter of the agent's metrics; `None` when the agent has none of
/// that name.
fn counter(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .then(|| sum_f64(text, name))
}

/// One round of one tracer.
#[derive(Clone, Debug)]
struct Round {
    load: Load,
    walks: Option<f64>,
    checkouts: Option<f64>,
    cpu_seconds: Option<f64>,
}

fn scratch() -> Result<PathBuf> {
    let scratch = cargo::target_dir()?.join("bench");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    Ok(scratch)
}

fn one_round(mode: Mode, agent: &Path, ns: &Netns, n: u64, clients: u32) -> Result<Round> {
    let tracer = Tracer::start(mode, agent, &scratch()?)?;
    let metrics = |t: &Tracer| -> Result<Option<String>> { t.metrics_port.map(scrape).transpose() };
    let before = match &tracer {
        Some(t) => metrics(t)?,
        None => None,
    };
    let cpu_before = tracer.as_ref().and_then(|t| cpu_seconds(t.pid()));
    let load = benchmark(ns, n, clients)?;
    let mut round = Round {
        load,
        walks: None,
        checkouts: None,
        cpu_seconds: None,
    };
    if let Some(mut t) = tracer {
        // Let the agent catch up with what the load left in its buffers.
        std::thread::sleep(Duration::from_millis(500));
        round.cpu_seconds = cpu_before.zip(cpu_seconds(t.pid())).map(|(a, b)| b - a);
        if let (Some(b), Some(a)) = (before, metrics(&t)?) {
            let delta = |name| Some(counter(&a, name)? - counter(&b, name)?);
            round.walks = delta(WALKS);
            round.checkouts = delta(CHECKOUTS);
        }
        t.stop()?;
    }
    Ok(round)
}

/// One round with `kernel.bpf_stats_enabled` on: each program's runs and
/// kernel time during the load, and the requests made.
fn kernel_round(
    mode: Mode,
    agent: &Path,
    ns: &Netns,
    n: u64,
    clients: u32,
) -> Result<(Vec<ProgramTime>, f64)> {
    let mut tracer = Tracer::start(mode, agent, &scratch()?)?.context("a tracer")?;
    let before = tracer.program_times(false)?.unwrap_or_default();
    let load = benchmark(ns, n, clients)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = match tracer.program_times(false)? {
        Some(after) => after,
        None => {
            // The floor tells its programs' time as it exits.
            tracer.stop()?;
            std::thread::sleep(Duration::from_millis(200));
            tracer.program_times(true)?.unwrap_or_default()
        }
    };
    tracer.stop()?;
    let delta = after
        .into_iter()
        .map(|a| {
            let b = before.iter().find(|b| b.program == a.program);
            ProgramTime {
                runs: a.runs - b.map_or(0.0, |b| b.runs),
                ns: a.ns - b.map_or(0.0, |b| b.ns),
                program: a.program,
            }
        })
        .collect();
    Ok((delta, load.requests))
}

/// Kernel time of one tracer's programs, medians over its kernel rounds.
#[derive(Clone, Debug, Default)]
struct KernelCost {
    send_ns: Option<f64>,
    recv_ns: Option<f64>,
    /// Both I/O programs' time over both's runs.
    io_ns: Option<f64>,
    /// Runs of the I/O programs per request (all the host's socket I/O).
    ios_per_request: Option<f64>,
    /// All its programs' time over the requests.
    request_ns: Option<f64>,
}

fn kernel_cost(mode: Mode, rounds: &[(Vec<ProgramTime>, f64)]) -> KernelCost {
    let med = |mut v: Vec<f64>| (!v.is_empty()).then(|| median(&mut v));
    let find = |progs: &[ProgramTime], name: &str| {
        progs
            .iter()
            .find(|p| p.program == name && p.runs > 0.0)
            .cloned()
    };
    let per_run = |name: &str| {
        med(rounds
            .iter()
            .filter_map(|(p, _)| find(p, name))
            .map(|p| p.ns / p.runs)
            .collect())
    };
    let Some((send, recv)) = io_programs(mode) else {
        return KernelCost::default();
    };
    let both: Vec<(ProgramTime, ProgramTime, f64)> = rounds
        .iter()
        .filter_map(|(p, requests)| Some((find(p, send)?, find(p, recv)?, *requests)))
        .collect();
    KernelCost {
        send_ns: per_run(send),
        recv_ns: per_run(recv),
        io_ns: med(both
            .iter()
            .map(|(s, r, _)| (s.ns + r.ns) / (s.runs + r.runs))
            .collect()),
        ios_per_request: med(both
            .iter()
            .filter(|(_, _, q)| *q > 0.0)
            .map(|(s, r, q)| (s.runs + r.runs) / q)
            .collect()),
        request_ns: med(rounds
            .iter()
            .filter(|(p, q)| *q > 0.0 && !p.is_empty())
            .map(|(p, q)| p.iter().map(|p| p.ns).sum::<f64>() / q)
            .collect()),
    }
}

/// One table row.
struct Row {
    mode: Mode,
    /// Why the tracer was left out, if it was.
    skipped: Option<String>,
    median: f64,
    spread_pct: f64,
    ratio: f64,
    /// The median of the fastest third of its rounds over the same of the
    /// no-tracer rounds (see [`fast_rate`]).
    fast_ratio: f64,
    walks_per_s: Option<f64>,
    checkouts_per_s: Option<f64>,
    cpu_per_m: Option<f64>,
    kernel: KernelCost,
}

/// The median of the fastest third of the rounds' rates: a round the host
/// slowed down (another build on the same 2 cores, the VM's neighbours)
/// drops out of it whatever the tracer, where a tracer's own slowness shows
/// in every round.
fn fast_rate(rounds: &[Round]) -> f64 {
    let mut rates: Vec<f64> = rounds.iter().map(|r| r.load.per_second).collect();
    rates.sort_by(|a, b| b.total_cmp(a));
    let third = rates.len().div_ceil(3);
    median(&mut rates[..third])
}

fn summarize(mode: Mode, rounds: &[Round], reference: &[Round]) -> Row {
    let mut ratios: Vec<f64> = rounds
        .iter()
        .zip(reference)
        .filter(|(_, none)| none.load.per_second > 0.0)
        .map(|(r, none)| r.load.per_second / none.load.per_second)
        .collect();
    let mut rates: Vec<f64> = rounds.iter().map(|r| r.load.per_second).collect();
    let med = median(&mut rates);
    let (lo, hi) = (
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
    );
    let per_second = |f: fn(&Round) -> Option<f64>| {
        let mut v: Vec<f64> = rounds
            .iter()
            .filter_map(|r| Some(f(r)? / r.load.seconds))
            .collect();
        (!v.is_empty()).then(|| median(&mut v))
    };
    let cpu: Option<f64> = rounds.iter().map(|r| r.cpu_seconds).sum();
    let requests: f64 = rounds.iter().map(|r| r.load.requests).sum();
    Row {
        mode,
        skipped: None,
        median: med,
        spread_pct: if med > 0.0 {
            (hi - lo) / med * 100.0
        } else {
            0.0
        },
        ratio: median(&mut ratios),
        fast_ratio: match fast_rate(reference) {
            f if f > 0.0 => fast_rate(rounds) / f,
            _ => 0.0,
        },
        walks_per_s: per_second(|r| r.walks),
        checkouts_per_s: per_second(|r| r.checkouts),
        cpu_per_m: cpu.filter(|_| requests > 0.0).map(|c| c / requests * 1e6),
        kernel: KernelCost::default(),
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| tracer | requests/s (median) | spread (max-min) | ratio to none | ratio, fast rounds | \
         kernel ns per send | \
         kernel ns per receive | kernel ns per I/O (x floor) | kernel ns per request, all programs | \
         stack walks/s | checkouts/s | tracer CPU s per 1M requests |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let floor = rows
        .iter()
        .find(|r| r.mode == Mode::FloorIo)
        .and_then(|r| r.kernel.io_ns);
    let opt = |v: Option<f64>, digits: usize| {
        v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
    };
    for r in rows {
        if r.skipped.is_some() {
            t.push_str(&format!(
                "| {} | left out (below) | | | | | | | | | | |\n",
                label(r.mode)
            ));
            continue;
        }
        let io = match (r.kernel.io_ns, floor) {
            (Some(io), Some(f)) if f > 0.0 && r.mode != Mode::FloorIo => {
                format!("{io:.0} ({:.2}x)", io / f)
            }
            (io, _) => opt(io, 0),
        };
        t.push_str(&format!(
            "| {} | {:.0} | {:.1} % | {:.3} | {:.3} | {} | {} | {} | {} | {} | {} | {} |\n",
            label(r.mode),
            r.median,
            r.spread_pct,
            r.ratio,
            r.fast_ratio,
            opt(r.kernel.send_ns, 0),
            opt(r.kernel.recv_ns, 0),
            io,
            opt(r.kernel.request_ns, 0),
            opt(r.walks_per_s, 1),
            opt(r.checkouts_per_s, 1),
            opt(r.cpu_per_m, 2),
        ));
    }
    t
}

/// The goals, against the measured rows (reported, not asserted).
fn goals(rows: &[Row]) -> String {
    let row = |m: Mode| rows.iter().find(|r| r.mode == m && r.skipped.is_none());
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = Vec::new();
    match row(Mode::Agent) {
        Some(a) => out.push(format!(
            "- requests/s with last use on, over none: {:.3}, fast rounds {:.3} (goal >= 0.97: \
             {})",
            a.ratio,
            a.fast_ratio,
            met(a.ratio >= 0.97)
        )),
        None => out.push("- requests/s with last use on: not measured".to_string()),
    }
    let agent_io = row(Mode::Agent).and_then(|a| a.kernel.io_ns);
    let floor_io = row(Mode::FloorIo).and_then(|f| f.kernel.io_ns);
    match (agent_io, floor_io) {
        (Some(a), Some(f)) if f > 0.0 => out.push(format!(
            "- kernel time per I/O of the last-use programs: {a:.0} ns, {:.2}x the no-op \
             floor's {f:.0} ns (goal <= 1.5x: {})",
            a / f,
            met(a / f <= 1.5)
        )),
        _ => out.push(format!(
            "- kernel time per I/O: not measured (agent {}, floor {})",
            agent_io.map_or("-".into(), |a| format!("{a:.0} ns")),
            floor_io.map_or("-".into(), |f| format!("{f:.0} ns"))
        )),
    }
    let walks = row(Mode::Agent).and_then(|a| a.walks_per_s);
    out.push(format!(
        "- stack walks/s with last use on: {}",
        walks.map_or_else(
            || format!("not measured (the agent has no {WALKS})"),
            |w| format!("{w:.1}")
        )
    ));
    out.join("\n")
}

/// Whether the agent knows `--last-use` (its help says so).
fn has_last_use(agent: &Path) -> bool {
    run::capture_stdout(Command::new(agent).arg("--help"))
        .map(|h| h.contains("--last-use"))
        .unwrap_or(false)
}

/// The redis workload: its rounds and kernel-time rounds; its section of
/// BENCHMARKS.md.
pub(super) fn section(opts: &BenchOpts, agent: &Path, ns: &Netns) -> Result<String> {
    let clients = opts.redis_clients.max(1);
    let _server = Server::start(ns)?;
    // A warm-up round, not counted, which also sizes the rounds.
    let n0 = if opts.redis_requests > 0 {
        opts.redis_requests
    } else {
        100_000
    };
    let warm = benchmark(ns, n0, clients).context("the redis warm-up round")?;
    let n = if opts.redis_requests > 0 {
        opts.redis_requests
    } else {
        let per_test = warm.per_second * opts.redis_seconds / TESTS.len() as f64;
        ((per_test / 10_000.0).round() as u64 * 10_000).clamp(20_000, 20_000_000)
    };
    say!(
        "redis: warm-up {:.0} requests/s; {n} requests per test ({}), -c {clients}, about {:.1} s \
         per round",
        warm.per_second,
        TESTS.join(", "),
        n as f64 * TESTS.len() as f64 / warm.per_second
    );
    // Each tracer must start (a build without last use has no --last-use,
    // nor the floor's programs): those that cannot are left out.
    let last_use = has_last_use(agent);
    let mut skipped: Vec<(Mode, String)> = Vec::new();
    // Said under the load's description in BENCHMARKS.md.
    let mut notes: Vec<String> = Vec::new();
    for mode in MODES.into_iter().skip(1) {
        if mode == Mode::AgentLastUseOff && !last_use {
            skipped.push((mode, "this agent has no --last-use".into()));
            continue;
        }
        match Tracer::start(mode, agent, &scratch()?) {
            Ok(Some(mut t)) => {
                for line in t.startup.iter().filter(|l| l.contains("last use is off")) {
                    notes.push(format!("{}: {line}", label(mode)));
                }
                t.stop()?;
            }
            Ok(None) => {}
            Err(e) => skipped.push((mode, format!("{e:#}"))),
        }
    }
    if !last_use {
        notes.push("this agent has no --last-use: its default mode has no last use".into());
    }
    for (mode, why) in &skipped {
        say!("redis: {} left out: {why}", label(*mode));
    }
    for note in &notes {
        say!("redis: note: {note}");
    }
    let modes: Vec<Mode> = MODES
        .into_iter()
        .filter(|m| !skipped.iter().any(|(s, _)| s == m))
        .collect();
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); modes.len()];
    for round in 0..opts.rounds {
        for k in 0..modes.len() {
            let i = (k + round) % modes.len();
            let r = one_round(modes[i], agent, ns, n, clients)
                .with_context(|| format!("redis round {} of {}", round + 1, label(modes[i])))?;
            say!(
                "redis round {}/{}: {:<45} {:>9.0} requests/s{}",
                round + 1,
                opts.rounds,
                label(modes[i]),
                r.load.per_second,
                r.walks
                    .map(|w| format!(", {w:.0} stack walks"))
                    .unwrap_or_default()
            );
            results[i].push(r);
        }
    }
    let mut rows: Vec<Row> = modes
        .iter()
        .zip(&results)
        .map(|(m, r)| summarize(*m, r, &results[0]))
        .collect();
    // The programs' own time, rounds alternating too.
    let timed: Vec<Mode> = modes
        .iter()
        .copied()
        .filter(|m| io_programs(*m).is_some())
        .collect();
    let mut kernel: Vec<Vec<(Vec<ProgramTime>, f64)>> = vec![Vec::new(); timed.len()];
    if !timed.is_empty() && opts.kernel_rounds > 0 {
        let _stats = BpfStats::enable()?;
        for round in 0..opts.kernel_rounds {
            for k in 0..timed.len() {
                let i = (k + round) % timed.len();
                let r = kernel_round(timed[i], agent, ns, n, clients).with_context(|| {
                    format!("the kernel-time round {} of {}", round + 1, label(timed[i]))
                })?;
                let cost = kernel_cost(timed[i], std::slice::from_ref(&r));
                say!(
                    "redis kernel time {}/{}: {:<45} {} ns per I/O, {} ns per request",
                    round + 1,
                    opts.kernel_rounds,
                    label(timed[i]),
                    cost.io_ns.map_or("-".into(), |v| format!("{v:.0}")),
                    cost.request_ns.map_or("-".into(), |v| format!("{v:.0}")),
                );
                kernel[i].push(r);
            }
        }
    }
    for row in &mut rows {
        if let Some(i) = timed.iter().position(|m| *m == row.mode) {
            row.kernel = kernel_cost(row.mode, &kernel[i]);
        }
    }
    let ios_per_request = rows
        .iter()
        .find(|r| r.mode == Mode::FloorIo)
        .and_then(|r| r.kernel.ios_per_request);
    // In table order, the tracers left out included.
    let rows: Vec<Row> = MODES
        .into_iter()
        .filter_map(|mode| {
            if let Some(i) = rows.iter().position(|r| r.mode == mode) {
                return Some(rows.swap_remove(i));
            }
            let why = skipped.iter().find(|(m, _)| *m == mode)?.1.clone();
            Some(Row {
                mode,
                skipped: Some(why),
                median: 0.0,
                spread_pct: 0.0,
                ratio: 0.0,
                fast_ratio: 0.0,
                walks_per_s: None,
                checkouts_per_s: None,
                cpu_per_m: None,
                kernel: KernelCost::default(),
            })
        })
        .collect();
    let table = table(&rows);
    let goals = goals(&rows);
    println!("\n{table}\n{goals}\n");
    let now = run::capture_stdout(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .unwrap_or_default();
    for row in &rows {
        if let Some(why) = &row.skipped {
            notes.push(format!("{} left out: {why}", label(row.mode)));
        }
    }
    if let Some(none) = rows.iter().find(|r| r.mode == Mode::None) {
        notes.push(format!(
            "noise: the no-tracer rounds spread over {:.1} % of their median (max - min){}",
            none.spread_pct,
            if none.spread_pct > 10.0 {
                ": a noisy host, read the fast-round ratio too"
            } else {
                ""
            }
        ));
    }
    let notes: String = notes.iter().map(|n| format!("- {n}\n")).collect();
    let pin = if pinned(SERVER_CPU).is_empty() {
        String::new()
    } else {
        format!(" (redis-server pinned to CPU {SERVER_CPU}, redis-benchmark to CPU {CLIENT_CPU})")
    };
    Ok(format!(
        "## Request/response: redis-benchmark\n\n\
         - when: {}\n- machine: {}\n- load: `redis-benchmark -c {clients} -t {} -d {VALUE_SIZE} \
         -n {n} --csv` against a `redis-server` with no persistence on 127.0.0.1 in a network \
         namespace of its own{pin}; {} rounds per tracer, alternating in a rotating order, after \
         a warm-up round; kernel time from {} more rounds per tracer with \
         `kernel.bpf_stats_enabled` on\n{notes}\n\
         {table}\n\
         Goals (reported, not asserted):\n\n{goals}\n\n\
         Requests/s is over both tests (SET and GET), as redis-benchmark timed them. The ratio \
         is the median over rounds of the tracer's rate over the same round's rate with no \
         tracer; the fast-round ratio is the median of the tracer's fastest third of rounds \
         over the same of the no-tracer rounds: a round the host slowed down (other work on \
         the same cores) drops out of it whatever the tracer, where a tracer's own cost shows \
         in every round. The floor attaches no-op BTF programs to the tracepoints the agent's last-use \
         programs run on (`sock_send_length`, `sock_recv_length`, on every socket send and \
         receive of the host), and one to the state tracepoint. Kernel ns per send and per \
         receive are each program's run time over its runs (`run_time_ns / run_cnt`, the \
         kernel's own count of every run, {} runs of the two per request); per I/O is both \
         programs' together, and (x floor) over the floor's. Timing each run costs some tens of \
         ns of its own, which is most of the floor's figure, so the agent's cost over the \
         floor's is the difference. Per request is all the tracer's \
         programs (state program included) over the requests made. Stack walks and checkouts \
         (the first I/O on a socket after `--last-use-gap` without one) are the agent's own \
         counters (`{WALKS}`, `{CHECKOUTS}`), per second of the rounds; redis-benchmark opens \
         its {clients} connections anew for each test, and each one's first I/O at either \
         end is a checkout. CPU is the tracer process's own (user + system) during the rounds.\n",
        now.trim(),
        machine(),
        TESTS.join(",").to_lowercase(),
        opts.rounds,
        opts.kernel_rounds,
        ios_per_request.map_or_else(|| "some".to_string(), |v| format!("{v:.1}")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csv_gives_each_tests_rate() {
        let out = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\"\n\
                   \"SET\",\"155279.50\",\"0.189\",\"0.056\"\n\
                   \"GET\",\"150715.89\",\"0.181\",\"0.040\"\n";
        assert_eq!(
            parse_csv(out),
            [
                ("SET".to_string(), 155279.5),
                ("GET".to_string(), 150715.89)
            ]
        );
    }

    #[test]
    fn a_counter_the_agent_lacks_is_none() {
        let text = "# HELP x\ntcptrace_last_use_stacks_total 12\nother_total{a=\"b\"} 3\n";
        assert_eq!(counter(text, WALKS), Some(12.0));
        assert_eq!(counter(text, CHECKOUTS), None);
    }
}
