//! CLOSE_WAIT leaks pinned to the process, the fd and the function that
//! accepted the connection, checked against `ss -tanp` ground truth.

use serde_json::Value;
use tcptrace_tests::{
    agent_bin, endpoint, fixture, fixture_cmd, leaks_on_port, netns_pair, own_netns, peer_bin,
    peer_cmd, run_to_end, ss_close_wait, ss_users, Agent, Leaked, Netns, Peer, Redis,
};

fn stack_functions(leak: &Value) -> Vec<String> {
    tcptrace_tests::functions(&leak["origin"]["stack"])
}

/// [`tcptrace_tests::leaky_server`] with this crate's peer program.
fn leaky_server(
    server_ns: Option<&Netns>,
    client_ns: Option<&Netns>,
    host: &str,
    n: usize,
    mode: Option<&str>,
) -> Leaked {
    tcptrace_tests::leaky_server(peer_bin!(), server_ns, client_ns, host, n, mode)
}

/// The agent's arguments: every transition printed (the kernel sends each
/// connection's origin), or leak events only (the kernel keeps origins in
/// its map and the agent reads the leaking ones).
const EVERY_TRANSITION: &[&str] = &["--leak-after", "500ms"];
const LEAKS_ONLY: &[&str] = &["--leak-after", "500ms", "--events", "leak"];

/// A leaky server (in `server_ns`) accepts one connection from a client
/// (in `client_ns`) that then hangs up; the agent must name the server.
fn server_leak(
    args: &[&str],
    server_ns: Option<&Netns>,
    client_ns: Option<&Netns>,
    host: &str,
    netns: u64,
) {
    let agent = Agent::start(args);
    let Leaked {
        mut server,
        port,
        client,
    } = leaky_server(server_ns, client_ns, host, 1, None);
    let fd: i64 = server.expect("leaked fd").parse().expect("fd");
    let events = agent.wait_for("a leak on the server port", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leaks = leaks_on_port(&events, port);
    assert_eq!(leaks.len(), 1, "one leak event per socket: {leaks:?}");
    let leak = &leaks[0];
    let context = agent.dump();

    assert_eq!(leak["owner"].as_array().map(Vec::len), Some(1), "{leak}");
    assert_eq!(
        leak["owner"][0]["pid"],
        server.pid(),
        "owner is the server\n{context}"
    );
    assert_eq!(leak["owner"][0]["fd"], fd, "{leak}");
    assert_eq!(leak["owner"][0]["comm"], "leaky_server", "{leak}");
    assert!(leak["owner"][0]["exe"]
        .as_str()
        .is_some_and(|e| e.ends_with("leaky_server")));
    assert_ne!(leak["owner"][0]["pid"], client.pid(), "never the client");
    assert_eq!(leak["laddr"], host, "{leak}");
    assert_eq!(leak["netns"], netns, "{leak}");
    assert!(
        leak["close_wait_ms"].as_f64().is_some_and(|ms| ms >= 500.0),
        "{leak}"
    );
    assert_eq!(leak["reason"], "read_eof_never_closed", "{leak}");
    assert_eq!(leak["recv_q"], 0, "{leak}");
    assert_eq!(leak["origin"]["syscall"], "accept", "{leak}");
    assert_eq!(leak["origin"]["pid"], server.pid(), "{leak}");
    let functions = stack_functions(leak);
    assert!(
        functions.iter().any(|f| f == "accept_orders"),
        "origin stack {functions:?} lacks accept_orders\n{leak}"
    );
    assert!(
        leak["message"]
            .as_str()
            .is_some_and(|m| m.contains("accept_orders")),
        "{leak}"
    );

    // Ground truth: ss sees the same socket, held by the same pid and fd.
    let rport = leak["rport"].as_u64().expect("rport");
    assert_ss_agrees(server_ns, u64::from(port), rport, server.pid(), fd);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// Ground truth: ss shows the socket `lport -> rport` in CLOSE_WAIT held
/// by exactly `(pid, fd)`.
fn assert_ss_agrees(netns: Option<&Netns>, lport: u64, rport: u64, pid: u32, fd: i64) {
    let ss = ss_close_wait(netns);
    let line = ss
        .iter()
        .find(|l| l.contains(&format!(":{lport} ")) && l.contains(&format!(":{rport} ")))
        .unwrap_or_else(|| panic!("ss does not show {lport} -> {rport}: {ss:?}"));
    assert_eq!(ss_users(line), vec![(pid, fd as i32)], "{line}");
}

#[test]
fn client_leak_against_an_upstream_that_closes_idle_connections() {
    client_leak(EVERY_TRANSITION);
}

#[test]
fn client_leak_with_leak_events_only() {
    client_leak(LEAKS_ONLY);
}

/// The other state program takes connect()'s fd from a sys_enter_connect
/// hook, not from the syscall's registers (older kernels, other
/// architectures): the origin fd must be the same.
#[test]
fn client_leak_with_the_connect_hook() {
    let mut args = LEAKS_ONLY.to_vec();
    args.extend(["--state-program", "offsets"]);
    client_leak(&args);
}

fn client_leak(args: &[&str]) {
    let redis = Redis::start(1);
    let agent = Agent::start(args);
    let bin = fixture("leaky_client");
    let mut client = Peer::spawn(fixture_cmd(
        &bin,
        None,
        &["127.0.0.1", &redis.port.to_string()],
    ));
    let connected = client.expect("connected");
    let (fd, lport) = connected.split_once(' ').expect("fd and port");
    let (fd, lport): (i64, u16) = (fd.parse().expect("fd"), lport.parse().expect("port"));
    client.expect("leaked fd");
    let events = agent.wait_for("a leak on the client port", |ev| {
        !leaks_on_port(ev, lport).is_empty()
    });
    let leaks = leaks_on_port(&events, lport);
    assert_eq!(leaks.len(), 1, "{leaks:?}");
    let leak = &leaks[0];
    assert_eq!(leak["owner"].as_array().map(Vec::len), Some(1), "{leak}");
    assert_eq!(leak["owner"][0]["pid"], client.pid(), "{leak}");
    assert_eq!(leak["owner"][0]["fd"], fd, "{leak}");
    assert_eq!(leak["laddr"], "127.0.0.1");
    assert_eq!(leak["raddr"], "127.0.0.1");
    assert_eq!(leak["rport"], redis.port, "{leak}");
    assert_eq!(leak["reason"], "read_eof_never_closed", "{leak}");
    assert_eq!(leak["origin"]["syscall"], "connect", "{leak}");
    assert_eq!(leak["origin"]["pid"], client.pid(), "{leak}");
    assert_eq!(leak["origin"]["fd"], fd, "{leak}");
    // The story's bar: named within the threshold plus one second.
    assert!(
        leak["close_wait_ms"]
            .as_f64()
            .is_some_and(|ms| (500.0..1500.0).contains(&ms)),
        "{leak}"
    );
    let functions = stack_functions(leak);
    assert!(
        functions.iter().any(|f| f == "open_upstream"),
        "origin stack {functions:?} lacks open_upstream\n{leak}"
    );
    assert_ss_agrees(
        None,
        u64::from(lport),
        u64::from(redis.port),
        client.pid(),
        fd,
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn server_leak_on_loopback() {
    server_leak(EVERY_TRANSITION, None, None, "127.0.0.1", own_netns());
}

#[test]
fn server_leak_over_ipv6() {
    server_leak(EVERY_TRANSITION, None, None, "::1", own_netns());
}

#[test]
fn server_leak_across_namespaces() {
    let nets = netns_pair();
    let host = nets.addr_a.clone();
    server_leak(
        EVERY_TRANSITION,
        Some(&nets.a),
        Some(&nets.b),
        &host,
        nets.a.inode(),
    );
}

#[test]
fn server_leak_with_leak_events_only_across_namespaces() {
    let nets = netns_pair();
    let host = nets.addr_a.clone();
    server_leak(
        LEAKS_ONLY,
        Some(&nets.a),
        Some(&nets.b),
        &host,
        nets.a.inode(),
    );
}

#[test]
fn server_leak_with_leak_events_only_over_ipv6() {
    server_leak(LEAKS_ONLY, None, None, "::1", own_netns());
}

#[test]
fn prompt_close_gives_close_wait_end_and_no_leak() {
    let agent = Agent::start(&["--leak-after", "2s"]);
    let mut server = Peer::spawn(peer_cmd(peer_bin!(), None, &["server", "127.0.0.1:0"]));
    let port: u16 = server.expect("listening").parse().expect("port");
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        None,
        &["client", &endpoint("127.0.0.1", port), "--exit"],
    ));
    client.expect("done");
    server.expect("done");
    let events = agent.wait_for("close_wait_end on the server port", |ev| {
        ev.iter()
            .any(|e| e["event"] == "close_wait_end" && e["lport"] == port)
    });
    let end = events
        .iter()
        .find(|e| e["event"] == "close_wait_end" && e["lport"] == port)
        .expect("close_wait_end");
    assert!(
        end["close_wait_ms"]
            .as_f64()
            .is_some_and(|ms| (0.0..2000.0).contains(&ms)),
        "{end}"
    );
    assert_eq!(end["leak"], false);
    assert_eq!(end["pid"], server.pid(), "{end}");
    // Past the threshold: still no leak for this socket.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let stopped = agent.stop();
    assert!(
        leaks_on_port(&stopped.events, port).is_empty(),
        "unexpected leak"
    );
}

#[test]
fn socket_shared_with_a_forked_child_lists_both_owners() {
    let agent = Agent::start(&["--leak-after", "500ms"]);
    let Leaked {
        mut server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", 1, Some("fork"));
    let fd: i64 = server.expect("leaked fd").parse().expect("fd");
    let child: u32 = server.expect("child").parse().expect("child pid");
    let events = agent.wait_for("a leak on the server port", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = &leaks_on_port(&events, port)[0];
    let owners: Vec<(u64, i64)> = leak["owner"]
        .as_array()
        .expect("owner list")
        .iter()
        .map(|o| {
            (
                o["pid"].as_u64().unwrap_or(0),
                o["fd"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let mut expected = vec![(u64::from(server.pid()), fd), (u64::from(child), fd)];
    expected.sort();
    assert_eq!(owners, expected, "{leak}");
    let rport = leak["rport"].as_u64().expect("rport");
    let ss = ss_close_wait(None);
    let line = ss
        .iter()
        .find(|l| l.contains(&format!(":{port} ")) && l.contains(&format!(":{rport} ")))
        .unwrap_or_else(|| panic!("ss does not show the socket: {ss:?}"));
    let mut users = ss_users(line);
    users.sort();
    let mut want = vec![(server.pid(), fd as i32), (child, fd as i32)];
    want.sort();
    assert_eq!(users, want, "{line}");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn two_thousand_leaks_from_one_call_site_do_not_flood() {
    // A burst of 20 000 transitions: a large ring, and only the lines that
    // matter, so that the debug-build agent keeps up. Every accept() gets
    // its stack (2000 in a second is past the default budget, whose
    // unsampled leaks group apart: see the next test).
    let agent = Agent::start(&[
        "--stacks-per-second",
        "0",
        "--leak-after",
        "500ms",
        "--leak-group-interval",
        "1s",
        "--ring-buffer-size",
        "16M",
        "--state",
        "close_wait",
    ]);
    let Leaked {
        server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", 2000, None);
    let service = format!("127.0.0.1:{port}");
    let group_of = |e: &Value| e["event"] == "leak_group" && e["service"] == service.as_str();
    let events = agent.wait_for("a leak_group of 2000 sockets", |ev| {
        ev.iter().any(|e| group_of(e) && e["count"] == 2000)
    });
    let lines = leaks_on_port(&events, port).len();
    assert!(lines <= 10, "{lines} leak lines for one call site");
    let group = events
        .iter()
        .find(|e| group_of(e) && e["count"] == 2000)
        .expect("group");
    assert_eq!(group["pid"], server.pid(), "{group}");
    assert_eq!(group["side"], "accept", "{group}");
    assert!(
        group["oldest_ms"].as_f64().is_some_and(|ms| ms >= 500.0),
        "{group}"
    );
    assert_eq!(
        group["suppressed"].as_u64(),
        Some(2000 - lines as u64),
        "{group}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// Past `--stacks-per-second`, an accept()ed connection gets no origin in
/// leak-only mode (the kernel neither walks its stack nor looks up its
/// socket): its leak still names the owner and fd, says nothing of an
/// origin, and the skipped walks are counted.
#[test]
fn leaks_past_the_stack_budget_name_their_owner_without_an_origin() {
    const N: usize = 6;
    let port = tcptrace_tests::free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut args = LEAKS_ONLY.to_vec();
    args.extend(["--stacks-per-second", "1", "--metrics", &metrics]);
    let agent = Agent::start(&args);
    let metrics_port = port;
    let Leaked {
        server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", N, None);
    let events = agent.wait_for("a leak line per socket", |ev| {
        leaks_on_port(ev, port).len() == N
    });
    let leaks = leaks_on_port(&events, port);
    for leak in &leaks {
        assert_eq!(leak["owner"][0]["pid"], server.pid(), "{leak}");
        assert!(leak["owner"][0]["fd"].as_i64().is_some(), "{leak}");
    }
    // One walk per second per CPU the server ran on, and the accepts took
    // well under a second.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let with_origin = leaks.iter().filter(|l| !l["origin"].is_null()).count();
    assert!(
        (1..=cpus).contains(&with_origin),
        "{with_origin} of {N} leaks with an origin\n{leaks:?}"
    );
    for leak in leaks.iter().filter(|l| !l["origin"].is_null()) {
        assert!(
            stack_functions(leak).iter().any(|f| f == "accept_orders"),
            "{leak}"
        );
    }
    let text = tcptrace_tests::scrape(metrics_port);
    let skipped = tcptrace_tests::metric_value(&text, "tcptrace_origin_stacks_skipped_total")
        .unwrap_or_else(|| panic!("no skipped-walk counter in\n{text}"));
    // The client's connect()s are another process, with a budget of its own.
    assert!(
        skipped >= (N - with_origin) as f64,
        "{skipped} walks skipped, {with_origin} of {N} leaks with an origin"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn a_worker_that_stopped_reading_is_told_apart() {
    let agent = Agent::start(&["--leak-after", "500ms"]);
    let Leaked {
        mut server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", 1, Some("noread"));
    server.expect("leaked fd");
    let events = agent.wait_for("a leak on the server port", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = &leaks_on_port(&events, port)[0];
    assert_eq!(leak["reason"], "stopped_reading", "{leak}");
    assert!(leak["recv_q"].as_u64().is_some_and(|q| q > 0), "{leak}");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn a_leak_older_than_the_agent_comes_from_the_inventory() {
    let Leaked {
        mut server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", 1, None);
    let fd: i64 = server.expect("leaked fd").parse().expect("fd");
    // Let the leak age before the agent exists.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let agent = Agent::start(&["--leak-after", "1s"]);
    let events = agent.wait_for("the inventory leak", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = &leaks_on_port(&events, port)[0];
    assert_eq!(leak["estimated"], true, "{leak}");
    assert!(leak["origin"].is_null(), "origin unknown: {leak}");
    assert_eq!(leak["owner"][0]["pid"], server.pid(), "{leak}");
    assert_eq!(leak["owner"][0]["fd"], fd, "{leak}");
    assert!(
        leak["close_wait_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 1000.0),
        "the age counts from before the agent: {leak}"
    );
    assert!(
        leak["message"]
            .as_str()
            .is_some_and(|m| m.contains("origin unknown")),
        "{leak}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn exactly_n_leaks_matching_ss() {
    const N: usize = 5;
    let agent = Agent::start(&["--leak-after", "500ms"]);
    let Leaked {
        mut server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", N, None);
    for _ in 0..N {
        server.expect("leaked fd");
    }
    let events = agent.wait_for("N leaks", |ev| leaks_on_port(ev, port).len() >= N);
    // A little longer: no extra leak may follow.
    std::thread::sleep(std::time::Duration::from_millis(700));
    let events = {
        let later = agent.events();
        assert_eq!(
            leaks_on_port(&later, port).len(),
            N,
            "exactly N leak events"
        );
        drop(events);
        later
    };
    let mut from_agent: Vec<(u64, u64, i64)> = leaks_on_port(&events, port)
        .iter()
        .map(|l| {
            (
                l["rport"].as_u64().unwrap_or(0),
                l["owner"][0]["pid"].as_u64().unwrap_or(0),
                l["owner"][0]["fd"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    from_agent.sort();
    let mut from_ss: Vec<(u64, u64, i64)> = ss_close_wait(None)
        .iter()
        .filter(|l| l.contains(&format!("127.0.0.1:{port} ")))
        .flat_map(|l| {
            let rport: u64 = l
                .split_whitespace()
                .nth(3)
                .and_then(|peer| peer.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            ss_users(l)
                .into_iter()
                .map(move |(pid, fd)| (rport, u64::from(pid), i64::from(fd)))
        })
        .collect();
    from_ss.sort();
    assert_eq!(from_agent.len(), N);
    assert_eq!(from_agent, from_ss, "agent vs ss -tanp state close-wait");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn leaks_report_from_the_agent_and_without_it() {
    let Leaked {
        mut server,
        port,
        client: _client,
    } = leaky_server(None, None, "127.0.0.1", 1, None);
    server.expect("leaked fd");
    let state_file = tcptrace_tests::TempPath::new("state");
    let state = state_file.arg();
    let leaks = |fmt: &str| {
        let (code, out, err) = run_to_end(std::process::Command::new(agent_bin()).args([
            "leaks",
            "--format",
            fmt,
            "--state-file",
            &state,
            "--leak-after",
            "200ms",
        ]));
        assert_eq!(code, Some(0), "{err}");
        out
    };
    let service = format!("127.0.0.1:{port}");
    // No agent: a live inventory, origin unknown.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let doc: Value = serde_json::from_str(&leaks("json")).expect("json report");
    let group = doc["groups"]
        .as_array()
        .and_then(|g| {
            g.iter()
                .find(|g| g["leaks"][0]["local"] == service.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("no group for {service}: {doc}"));
    assert_eq!(group["pid"], server.pid());
    assert!(group["origin"].is_null());
    assert!(leaks("text").contains("CLOSE_WAIT means the peer closed"));

    // With the agent: its state file, with the origin stack.
    let agent = Agent::start(&[
        "--leak-after",
        "200ms",
        "--leak-group-interval",
        "200ms",
        "--state-file",
        &state,
    ]);
    // A second leak, made while the agent runs: its origin stack is known.
    let Leaked {
        server: mut server2,
        port: port2,
        client: _client2,
    } = leaky_server(None, None, "127.0.0.1", 1, None);
    server2.expect("leaked fd");
    let service2 = format!("127.0.0.1:{port2}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let text = loop {
        let text = leaks("text");
        if text.contains("from the running agent")
            && text.contains(&service)
            && text.contains(&service2)
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text}\n{}",
            agent.dump()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let section = |pid: u32| {
        let start = text
            .find(&format!("pid {pid} leaky_server"))
            .unwrap_or_else(|| panic!("no section for pid {pid}:\n{text}"));
        let rest = &text[start..];
        rest[..rest[1..].find("\npid ").map_or(rest.len(), |i| i + 1)].to_string()
    };
    let old = section(server.pid());
    assert!(old.contains("origin unknown"), "{old}");
    let new = section(server2.pid());
    assert!(new.contains("opened by accept() at:"), "{new}");
    assert!(new.contains("accept_orders"), "{new}");
    let stopped = agent.stop();
    assert!(stopped.status.success());
    assert!(
        !std::path::Path::new(&state).exists(),
        "the agent removes its state file"
    );
}

/// With leak events only, the kernel keeps sockets in CLOSE_WAIT in a table
/// the agent reads, instead of sending them: the leak still comes, and when
/// the server finally closes (it exits here), the kernel sends the stay's
/// entry and exit, which end the leak once, with its full duration.
#[test]
fn a_leak_the_kernel_kept_in_its_table_ends_with_leak_end() {
    let agent = Agent::start(LEAKS_ONLY);
    let Leaked {
        mut server, port, ..
    } = leaky_server(None, None, "127.0.0.1", 1, None);
    server.expect("leaked fd");
    agent.wait_for("a leak on the server port", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(server);
    let ends_on_port = |events: &[Value]| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["event"] == "leak_end" && e["lport"] == port)
            .cloned()
            .collect()
    };
    let events = agent.wait_for("the leak's end", |ev| !ends_on_port(ev).is_empty());
    let ends = ends_on_port(&events);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(leaks_on_port(&events, port).len(), 1, "one leak");
    let ms = ends[0]["close_wait_ms"].as_f64().expect("close_wait_ms");
    assert!(
        ms >= 800.0,
        "the whole stay (500 ms, then 300 ms more): {}",
        ends[0]
    );
    assert!(ends[0]["leak"].as_bool().unwrap_or(false), "{}", ends[0]);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
