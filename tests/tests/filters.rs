//! Output filters drop everything else: --port, --pid, -6, --state.

use serde_json::Value;
use tcptrace_tests::{
    assert_pair, endpoint, new_states, own_netns, peer_bin, peer_cmd, play_pair, port_of, reached,
    socket_lines, start_client, start_server, Agent, Pair, Peer, CLIENT_LIFE,
};

fn state_changes(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["event"] == "state_change")
        .collect()
}

#[test]
fn port_filter_keeps_only_that_port() {
    let mut server = start_server(peer_bin!(), None, "127.0.0.1:0");
    let port = server.port;
    let agent = Agent::start(&["--port", &port.to_string()]);
    // Unrelated traffic while the agent runs: none of it may show.
    let other = play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    let client = start_client(peer_bin!(), None, &endpoint("127.0.0.1", port));
    server.peer.expect("eof");
    let cp = client.port;
    agent.wait_for("client FIN_WAIT2 and server CLOSE_WAIT", |ev| {
        reached(ev, cp, port, "FIN_WAIT2") && reached(ev, port, cp, "CLOSE_WAIT")
    });
    server.peer.send_line();
    server.peer.expect("done");
    agent.wait_for("both sockets to CLOSE", |ev| {
        reached(ev, cp, port, "CLOSE") && reached(ev, port, cp, "CLOSE")
    });
    let stopped = agent.stop();
    assert!(stopped.status.success());
    for e in state_changes(&stopped.events) {
        assert!(
            e["lport"] == port || e["rport"] == port,
            "not port {port}: {e}"
        );
    }
    for unrelated in [other.server.port, other.client.port] {
        assert!(
            socket_lines(&stopped.events, unrelated, other.server.port).is_empty()
                && socket_lines(&stopped.events, other.server.port, unrelated).is_empty(),
            "unrelated traffic on port {unrelated} leaked through"
        );
    }
    let ns = own_netns();
    let pair = Pair { server, client };
    assert_pair(
        &stopped.events,
        &pair,
        "ipv4",
        ("127.0.0.1", "127.0.0.1"),
        (ns, ns),
    );
}

#[test]
fn pid_filter_keeps_only_that_owner() {
    let mut server = start_server(peer_bin!(), None, "127.0.0.1:0");
    let addr = endpoint("127.0.0.1", server.port);
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        None,
        &["client", &addr, "--wait-stdin"],
    ));
    client.expect("pid-ready");
    let pid = client.pid();
    let agent = Agent::start(&["--pid", &pid.to_string()]);
    let other = play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    client.send_line();
    let cp = port_of(&client.expect("connected"));
    server.peer.expect("eof");
    let sp = server.port;
    agent.wait_for("client FIN_WAIT2", |ev| reached(ev, cp, sp, "FIN_WAIT2"));
    server.peer.send_line();
    server.peer.expect("done");
    agent.wait_for("client CLOSE", |ev| reached(ev, cp, sp, "CLOSE"));
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let lines = state_changes(&stopped.events);
    for e in &lines {
        assert_eq!(e["pid"], pid, "not owned by {pid}: {e}");
    }
    let client_lines = socket_lines(&stopped.events, cp, sp);
    assert_eq!(new_states(&client_lines), CLIENT_LIFE);
    assert_eq!(lines.len(), client_lines.len(), "extra lines: {lines:?}");
    assert!(
        socket_lines(&stopped.events, sp, cp).is_empty(),
        "server socket shown"
    );
    assert!(socket_lines(&stopped.events, other.client.port, other.server.port).is_empty());
}

#[test]
fn ipv6_filter_drops_ipv4() {
    let agent = Agent::start(&["-6"]);
    let v4 = play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    let v6 = play_pair(peer_bin!(), &agent, None, None, "::1", true);
    let stopped = agent.stop();
    assert!(stopped.status.success());
    for e in state_changes(&stopped.events) {
        assert_eq!(e["family"], "ipv6", "{e}");
    }
    assert!(socket_lines(&stopped.events, v4.client.port, v4.server.port).is_empty());
    let ns = own_netns();
    assert_pair(&stopped.events, &v6, "ipv6", ("::1", "::1"), (ns, ns));
}

#[test]
fn state_filter_keeps_transitions_into_and_out_of_the_state() {
    let agent = Agent::start(&["--state", "close_wait"]);
    let pair = play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    let (sp, cp) = (pair.server.port, pair.client.port);
    let events = agent.wait_for("the server leaving CLOSE_WAIT", |ev| {
        reached(ev, sp, cp, "LAST_ACK")
    });
    for e in state_changes(&events) {
        assert!(e["old"] == "CLOSE_WAIT" || e["new"] == "CLOSE_WAIT", "{e}");
    }
    let server = socket_lines(&events, sp, cp);
    assert_eq!(new_states(&server), ["CLOSE_WAIT", "LAST_ACK"]);
    assert!(
        socket_lines(&events, cp, sp).is_empty(),
        "client socket shown"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
