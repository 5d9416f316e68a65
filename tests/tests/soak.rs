//! Bounded memory: a million connections opened and closed (loopback, in a
//! namespace of the test's own), and the agent's RSS at the end within 10 %
//! of its RSS after the first 100 000, in the default mode and with every
//! detector that keeps per-socket state on.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tcptrace_tests::{netns, Agent};

const CONNECTIONS: u64 = 1_000_000;
const FIRST: u64 = 100_000;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// Runs the churn against `agent` and returns its RSS (KiB) after the
/// first [`FIRST`] connections and at the end.
fn soak(agent: &Agent) -> (u64, u64) {
    let ns = netns();
    // The kernel's own TIME_WAIT population (which the port-pressure
    // detector mirrors) stops growing at this many, well before FIRST: what
    // grows after that is the agent's.
    let (code, _, err) = tcptrace_tests::run_to_end(Command::new("ip").args([
        "netns",
        "exec",
        &ns.name,
        "sh",
        "-c",
        "echo 20000 > /proc/sys/net/ipv4/tcp_max_tw_buckets",
    ]));
    assert_eq!(code, Some(0), "{err}");
    let mut churn = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_tcptrace-churn"),
        ])
        .args([
            "churn",
            "--seconds",
            "300",
            "--count",
            &CONNECTIONS.to_string(),
        ])
        .args(["--progress", &FIRST.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the churn");
    let lines = BufReader::new(churn.stdout.take().expect("stdout"));
    let mut first = None;
    let mut done = None;
    for line in lines.lines() {
        let line = line.expect("churn output");
        if line == format!("{{\"progress\":{FIRST}}}") {
            // Let the agent catch up with what the kernel sent so far.
            std::thread::sleep(Duration::from_millis(500));
            first = Some(rss_kib(agent.pid()));
        }
        if line.starts_with("{\"connections\"") {
            done = Some(line);
        }
    }
    let status = churn.wait().expect("churn");
    assert!(status.success(), "churn failed: {status:?}");
    let done = done.expect("the churn's result line");
    assert!(
        done.contains(&format!("\"connections\":{CONNECTIONS},")),
        "the whole count: {done}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let end = rss_kib(agent.pid());
    (first.expect("progress at 100 000"), end)
}

fn assert_bounded(args: &[&str]) {
    let agent = Agent::start(args);
    let (first, end) = soak(&agent);
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    eprintln!("{args:?}: RSS {first} KiB after {FIRST}, {end} KiB after {CONNECTIONS}");
    assert!(
        end * 10 <= first * 11,
        "{args:?}: RSS grew from {first} KiB after {FIRST} connections to {end} KiB after \
         {CONNECTIONS}"
    );
}

/// One test, the modes in turn: each agent traces the whole host, and two
/// churns at once would each be counted twice.
#[test]
fn a_million_connections_leave_the_agent_as_big_as_the_first_100_000_did() {
    assert_bounded(&["--events", "leak,summary", "--output", "file:/dev/null"]);
    assert_bounded(&[
        "--events",
        "leak,close-wait,time-wait,port-pressure,summary",
        "--output",
        "file:/dev/null",
    ]);
}
