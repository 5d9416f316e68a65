//! Records the kernel cannot deliver are reported, never silently dropped.

use std::net::{TcpListener, TcpStream};

use tcptrace_tests::{kill, Agent};

#[test]
fn full_ring_buffer_is_reported_as_lost() {
    // One page of ring buffer holds a few dozen records.
    let agent = Agent::start(&["--ring-buffer-size", "4096"]);
    kill(agent.pid(), libc::SIGSTOP);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    for _ in 0..300 {
        let client = TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    kill(agent.pid(), libc::SIGCONT);
    let events = agent.wait_for("a lost event", |ev| ev.iter().any(|e| e["event"] == "lost"));
    let lost = events
        .iter()
        .find(|e| e["event"] == "lost")
        .expect("lost line");
    assert!(lost["lost"].as_u64().is_some_and(|n| n > 0), "{lost}");
    assert!(
        lost["lost_total"].as_u64() >= lost["lost"].as_u64(),
        "{lost}"
    );
    assert_eq!(lost["schema"], 2);
    agent.wait_stderr("lost");
    let stopped = agent.stop();
    assert!(stopped.status.success());
    assert!(
        stopped
            .stderr
            .iter()
            .any(|l| l.contains("WARN") && l.contains("lost")),
        "{:?}",
        stopped.stderr
    );
}
