//! Overload: with a tiny ring buffer and the agent stopped, a burst loses
//! records. The agent says how many, keeps running, and mends what the
//! loss broke in its view of CLOSE_WAIT through sock_diag: a socket whose
//! exit was lost is not reported as a leak growing forever, and one whose
//! entry was lost is still reported. (Its own file: the test reads the
//! agent's per-process metrics, which other tests' sockets would skew.)

use std::net::{TcpListener, TcpStream};

use serde_json::Value;
use tcptrace_tests::{free_port, kill, metric_value, poll, scrape, Agent, TIMEOUT};

fn leak_from(events: &[Value], lport: u16, rport: u16) -> Option<Value> {
    events
        .iter()
        .find(|e| e["event"] == "leak" && e["lport"] == lport && e["rport"] == rport)
        .cloned()
}

/// A connected pair: (client, server side).
fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

fn port(s: &TcpStream) -> u16 {
    s.local_addr().expect("local").port()
}

#[test]
fn after_a_loss_close_wait_is_mended_through_sock_diag() {
    let metrics = free_port();
    let metrics_arg = format!("127.0.0.1:{metrics}");
    // CLOSE_WAIT lines: entries and exits travel in the ring (no kernel
    // table), one page of it.
    let agent = Agent::start(&[
        "--ring-buffer-size",
        "4096",
        "--leak-after",
        "1s",
        "--events",
        "close-wait,leak",
        "--metrics",
        &metrics_arg,
    ]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let lport = listener.local_addr().expect("addr").port();

    // X enters CLOSE_WAIT while the agent reads: it remembers it.
    let (x_client, x_server) = pair(&listener);
    let x_rport = port(&x_client);
    drop(x_client);
    let series = format!(
        "tcptrace_close_wait_sockets{{pid=\"{}\",",
        std::process::id()
    );
    poll(
        "the agent to see X in CLOSE_WAIT",
        TIMEOUT,
        || {
            let text = scrape(metrics);
            let seen = text
                .lines()
                .filter(|l| l.starts_with(&series))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            (seen >= 1.0).then_some(())
        },
        || scrape(metrics),
    );

    // Stopped agent, full ring: X's exit and Y's entry are lost.
    kill(agent.pid(), libc::SIGSTOP);
    for _ in 0..300 {
        let (c, s) = pair(&listener);
        drop(c);
        drop(s);
    }
    drop(x_server);
    let (y_client, y_server) = pair(&listener);
    let y_rport = port(&y_client);
    drop(y_client);
    kill(agent.pid(), libc::SIGCONT);

    agent.wait_stderr("CLOSE_WAIT reconciled with sock_diag");
    let events = agent.wait_for("Y's leak", |ev| leak_from(ev, lport, y_rport).is_some());
    let lost = events
        .iter()
        .find(|e| e["event"] == "lost")
        .expect("a lost line");
    assert!(lost["lost"].as_u64().is_some_and(|n| n > 0), "{lost}");
    let y = leak_from(&events, lport, y_rport).expect("Y's leak");
    assert_eq!(y["estimated"], true, "its entry was lost: {y}");
    assert_eq!(y["owner"][0]["pid"], std::process::id(), "{y}");
    // X entered before Y: remembered, it would have been due first.
    assert!(
        leak_from(&events, lport, x_rport).is_none(),
        "X left CLOSE_WAIT: no leak for it\n{}",
        agent.dump()
    );

    // And the agent goes on: Z, after the loss, is seen live.
    let (z_client, z_server) = pair(&listener);
    let z_rport = port(&z_client);
    drop(z_client);
    let events = agent.wait_for("Z's leak", |ev| leak_from(ev, lport, z_rport).is_some());
    let z = leak_from(&events, lport, z_rport).expect("Z's leak");
    assert_eq!(z["estimated"], false, "{z}");
    assert!(leak_from(&events, lport, x_rport).is_none());
    let text = scrape(metrics);
    assert!(
        metric_value(
            &text,
            "tcptrace_ring_buffer_lost_records_total{cause=\"ring_full\"}"
        )
        .is_some_and(|n| n > 0.0),
        "the loss is in the metrics too:\n{text}"
    );
    drop((y_server, z_server));
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
