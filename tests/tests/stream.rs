//! A stream of every transition goes through the kernel's per-CPU batches
//! (staged short records, flushed by the agent on each read): a burst of
//! connections from two threads comes out whole, each socket's transitions
//! in the order they happened, none lost and none twice.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};

use serde_json::Value;
use tcptrace_tests::{lost_total, Agent, CLIENT_LIFE, SERVER_LIFE};

/// Connections per thread.
const CONNECTIONS: usize = 500;
/// Threads opening connections, each to its own listener.
const THREADS: usize = 2;

/// Opens and closes `CONNECTIONS` connections to a new listener (the
/// client closes first); returns the listener's port.
fn burst() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    for _ in 0..CONNECTIONS {
        let client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    port
}

/// The lives of the sockets talking to or from `port`, in the order the
/// agent printed them: a socket address the kernel reuses starts a new
/// life at CLOSE -> SYN_SENT or LISTEN -> SYN_RECV.
fn lives(events: &[Value], port: u16) -> Vec<Vec<Value>> {
    let mut open: HashMap<String, Vec<Value>> = HashMap::new();
    let mut done = Vec::new();
    for e in events.iter().filter(|e| e["event"] == "state_change") {
        let ours = e["rport"] == port || (e["lport"] == port && e["old"] != "CLOSE");
        if !ours || e["new"] == "LISTEN" || e["old"] == "LISTEN" && e["new"] == "CLOSE" {
            continue;
        }
        let sk = e["sk"].as_str().unwrap_or("?").to_string();
        let starts = e["old"] == "CLOSE" || e["old"] == "LISTEN";
        if starts {
            if let Some(prev) = open.remove(&sk) {
                done.push(prev);
            }
        }
        open.entry(sk).or_default().push(e.clone());
    }
    done.extend(open.into_values());
    done
}

fn states(life: &[Value]) -> Vec<&str> {
    life.iter()
        .map(|e| e["new"].as_str().unwrap_or("?"))
        .collect()
}

#[test]
fn a_burst_streams_through_per_cpu_batches_in_order() {
    let agent = Agent::start(&[]);
    agent.wait_stderr("per-CPU batches on");
    let ports: Vec<u16> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..THREADS).map(|_| s.spawn(burst)).collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("burst thread"))
            .collect()
    });
    let ended = |events: &[Value], port: u16| {
        events
            .iter()
            .filter(|e| {
                e["event"] == "state_change"
                    && e["lport"] == port
                    && e["old"] == "LAST_ACK"
                    && e["new"] == "CLOSE"
            })
            .count()
    };
    let events = agent.wait_for("every server socket's CLOSE", |ev| {
        ports.iter().all(|&p| ended(ev, p) >= CONNECTIONS)
    });
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {:?}", stopped.status);
    assert_eq!(lost_total(&stopped.events), 0, "records lost");
    let events = if stopped.events.len() >= events.len() {
        stopped.events
    } else {
        events
    };
    for port in ports {
        let lives = lives(&events, port);
        let (mut clients, mut servers) = (0, 0);
        for life in &lives {
            let news = states(life);
            if news == CLIENT_LIFE {
                clients += 1;
            } else if news == SERVER_LIFE {
                servers += 1;
            } else {
                panic!("a socket of port {port} lived {news:?}: {life:?}");
            }
            for pair in life.windows(2) {
                assert_eq!(pair[1]["old"], pair[0]["new"], "broken chain: {pair:?}");
                assert!(
                    pair[1]["ts"].as_str() >= pair[0]["ts"].as_str(),
                    "out of order: {pair:?}"
                );
            }
        }
        assert_eq!(
            (clients, servers),
            (CONNECTIONS, CONNECTIONS),
            "lives of port {port}"
        );
    }
}
