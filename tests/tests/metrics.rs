//! The `--metrics` endpoint over real HTTP: `promtool check metrics` accepts
//! it, and the CLOSE_WAIT gauge follows a real leaking fixture, checked
//! against `ss` ground truth, until the fixture exits.

use std::io::Write as _;
use std::process::{Command, Stdio};

use tcptrace_tests::{
    agent_bin, free_port, http, leaky_server, metric_value as value, peer_bin, poll, run_to_end,
    scrape, ss_close_wait, Agent, TIMEOUT,
};

/// `promtool check metrics` on `text`: passes, or panics with its complaints.
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (apt-get install prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\non:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn close_wait_gauge_follows_a_leaking_fixture_and_promtool_accepts_the_endpoint() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&["--leak-after", "500ms", "--metrics", &addr]);
    agent.wait_stderr(&format!("metrics http://{addr}/metrics"));

    let leaked = leaky_server(peer_bin!(), None, None, "127.0.0.1", 3, None);
    let pid = leaked.server.pid();
    let series = format!("tcptrace_close_wait_sockets{{pid=\"{pid}\",comm=\"leaky_server\"}}");
    let text = poll(
        "the CLOSE_WAIT gauge to show the fixture's 3 sockets and their leaks",
        TIMEOUT,
        || {
            let t = scrape(port);
            (value(&t, &series) == Some(3.0)
                && value(&t, "tcptrace_leaks_open").is_some_and(|n| n >= 3.0))
            .then_some(t)
        },
        || agent.dump(),
    );
    // Ground truth: the kernel's own view of the fixture's port.
    let in_ss = ss_close_wait(None)
        .iter()
        .filter(|l| l.contains(&format!("127.0.0.1:{} ", leaked.port)))
        .count();
    assert_eq!(in_ss, 3, "ss shows the 3 sockets in CLOSE_WAIT");
    assert!(value(&text, "tcptrace_leaks_total").is_some_and(|n| n >= 3.0));
    assert!(value(
        &text,
        "tcptrace_transitions_total{old_state=\"ESTABLISHED\",new_state=\"CLOSE_WAIT\"}"
    )
    .is_some_and(|n| n >= 3.0));
    assert!(value(&text, "process_resident_memory_bytes").is_some_and(|n| n > 0.0));
    // Every attached program has its run counters (zero unless the host
    // turned kernel.bpf_stats_enabled on; tests must not, it is global).
    for family in [
        "tcptrace_bpf_program_runs_total",
        "tcptrace_bpf_program_run_seconds_total",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{family}{{program=\"inet_sock_set_state"))),
            "no {family} for the state program in\n{text}"
        );
    }
    assert!(
        value(
            &text,
            "tcptrace_output_dropped_lines_total{output=\"stdout\"}"
        ) == Some(0.0)
    );
    promtool_check(&text);

    // The fixture exits: the kernel closes its sockets, CLOSE_WAIT ends.
    let linger_before = value(&text, "tcptrace_close_wait_linger_seconds_count").unwrap_or(0.0);
    drop(leaked);
    let text = poll(
        "the CLOSE_WAIT gauge to drop the exited fixture",
        TIMEOUT,
        || {
            let t = scrape(port);
            (value(&t, &series).is_none()).then_some(t)
        },
        || agent.dump(),
    );
    assert!(
        value(&text, "tcptrace_close_wait_linger_seconds_count")
            .is_some_and(|n| n >= linger_before + 3.0),
        "the 3 lingers are in the histogram:\n{text}"
    );
    assert!(value(
        &text,
        "tcptrace_close_wait_linger_seconds_bucket{le=\"0.1\"}"
    )
    .is_some());
    promtool_check(&text);
}

#[test]
fn openmetrics_on_request_and_only_metrics_is_served() {
    let port = free_port();
    let agent = Agent::start(&["--metrics", &format!("127.0.0.1:{port}")]);
    let om = http(
        port,
        "GET",
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
    );
    assert_eq!(om.status, 200);
    assert!(om
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/openmetrics-text")));
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    let plain = http(port, "GET", "/metrics", None);
    assert!(plain
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")));
    assert_eq!(http(port, "GET", "/nope", None).status, 404);
    assert_eq!(http(port, "POST", "/metrics", None).status, 405);
    let head = http(port, "HEAD", "/metrics", None);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn a_metrics_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = taken.local_addr().expect("addr").port();
    let (code, _, stderr) = run_to_end(
        Command::new(agent_bin())
            .args(["--state-file", "none", "--metrics"])
            .arg(format!("127.0.0.1:{port}")),
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot listen for metrics") && stderr.contains("in use"),
        "{stderr}"
    );
    let (code, _, stderr) = run_to_end(Command::new(agent_bin()).args(["--metrics", "nowhere:x"]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--metrics"), "{stderr}");
}

/// The value of the unlabelled sample `name`.
fn gauge(text: &str, name: &str) -> u64 {
    value(text, name).unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
}

/// An agent started with `args` and a metrics endpoint on a free port.
fn agent_with_metrics(args: &[&str]) -> (Agent, u16) {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut all = args.to_vec();
    all.extend(["--metrics", &metrics]);
    (Agent::start(&all), port)
}

/// `n` loopback connections held open (both ends in one process) until
/// its stdin is closed.
fn hold_connections(n: usize) -> std::process::Child {
    let mut hold = Command::new(env!("CARGO_BIN_EXE_tcptrace-churn"))
        .args(["hold", "--count", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start tcptrace-churn hold");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(hold.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read the holder");
    assert!(line.contains(&format!(r#""open":{n}"#)), "{line}");
    hold
}

#[test]
fn a_full_origin_map_is_counted_and_logged_not_silent() {
    let (agent, port) = agent_with_metrics(&[
        "--events",
        "leak",
        "--max-sockets",
        "16",
        "--summary-interval",
        "1s",
    ]);
    let mut hold = hold_connections(100);
    let text = scrape(port);
    // At most 16 (other tests' short connections may hold a slot for a
    // moment, and free it).
    let kept = gauge(&text, "tcptrace_kernel_origins");
    assert!((5..=16).contains(&kept), "{kept} kept in a table of 16");
    assert!(
        gauge(&text, "tcptrace_kernel_origins_dropped_total") >= 184,
        "200 origins, at most 16 kept\n{text}"
    );
    agent.wait_stderr("origin map is full");
    drop(hold.stdin.take());
    hold.wait().expect("the holder exits");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn leak_only_mode_keeps_origins_in_the_kernel_until_the_connections_close() {
    // With leak events only, the kernel keeps each connection's origin in
    // its map from connect()/accept() to CLOSE: 100 held connections are
    // 200 origins (both ends), and closing them empties the map again.
    // Other tests of this file open a few connections meanwhile: a margin.
    let (agent, port) = agent_with_metrics(&["--events", "leak"]);
    let origins = || {
        gauge(
            &http(port, "GET", "/metrics", None).body,
            "tcptrace_kernel_origins",
        )
    };
    let mut hold = hold_connections(100);
    let held = origins();
    assert!(
        (200..230).contains(&held),
        "{held} origins for 100 connections"
    );
    let text = scrape(port);
    assert_eq!(gauge(&text, "tcptrace_kernel_origins_dropped_total"), 0);
    promtool_check(&text);
    drop(hold.stdin.take());
    hold.wait().expect("the holder exits");
    poll(
        "the origins to leave the kernel map",
        TIMEOUT,
        || Some(origins()).filter(|&n| n < 30),
        || agent.dump(),
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// With leak events only, a quick passage through CLOSE_WAIT (the server
/// closes as soon as the client has) never leaves the kernel: its linger
/// time is counted there and still shows in the histogram, and the agent
/// prints nothing.
#[test]
fn leak_only_mode_counts_quick_close_waits_in_the_kernel() {
    let (agent, port) = agent_with_metrics(&["--events", "leak"]);
    let count = |text: &str| value(text, "tcptrace_close_wait_linger_seconds_count").unwrap_or(0.0);
    let before = count(&scrape(port));
    let out = Command::new(env!("CARGO_BIN_EXE_tcptrace-churn"))
        .args(["churn", "--seconds", "1"])
        .output()
        .expect("run tcptrace-churn churn");
    assert!(out.status.success());
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the churn's JSON report");
    let connections = report["connections"].as_f64().expect("connections");
    assert!(connections > 100.0, "{report}");
    let text = scrape(port);
    // Every server socket of the churn passed through CLOSE_WAIT once
    // (other tests' connections may add more).
    let counted = count(&text) - before;
    assert!(
        counted >= connections,
        "{counted} stays counted for {connections} connections\n{text}"
    );
    promtool_check(&text);
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let leaks: Vec<_> = stopped
        .events
        .iter()
        .filter(|e| e["event"] == "leak")
        .collect();
    assert!(
        leaks.is_empty(),
        "no leak from a churn that closes: {leaks:?}"
    );
}

#[test]
fn a_full_close_wait_table_is_counted_not_silent() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    // Room for one socket in CLOSE_WAIT; the fixture leaves three there.
    let agent = Agent::start(&["--metrics", &addr, "--max-close-wait", "1"]);
    let leaked = leaky_server(peer_bin!(), None, None, "127.0.0.1", 3, None);
    let series = "tcptrace_table_full_total{table=\"close_wait\"}";
    let dropped = poll(
        "the full CLOSE_WAIT table in the metrics",
        TIMEOUT,
        || value(&scrape(port), series).filter(|n| *n >= 2.0),
        || scrape(port),
    );
    assert!(dropped >= 2.0, "{dropped}");
    let text = scrape(port);
    assert!(
        value(&text, "tcptrace_table_full_total{table=\"tracker\"}").is_some(),
        "{text}"
    );
    promtool_check(&text);
    drop(leaked);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
