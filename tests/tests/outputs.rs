//! Outputs: a file that logrotate renames (SIGHUP), and a TCP collector
//! that dies and comes back; nothing lost silently, nothing duplicated.

use std::io::{BufRead as _, BufReader};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::{free_port, kill, peer_bin, play_pair, Agent};

#[test]
fn file_output_survives_rotation_without_loss_or_duplicates() {
    let tmp = tcptrace_tests::TempDir::new("out");
    let dir = &tmp.0;
    let path = dir.join("events.json");
    let file_arg = format!("file:{}", path.display());
    let agent = Agent::start(&["--output", "stdout", "--output", &file_arg]);
    play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", true);
    let rotated = dir.join("events.json.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    kill(agent.pid(), libc::SIGHUP);
    agent.wait_stderr("SIGHUP");
    play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", true);
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let read = |p: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .lines()
            .map(str::to_string)
            .collect()
    };
    let (old, new) = (read(&rotated), read(&path));
    assert!(!old.is_empty() && !new.is_empty(), "both files written");
    let from_files: Vec<String> = old.into_iter().chain(new).collect();
    let mut from_stdout: Vec<String> = stopped.events.iter().map(|v| v.to_string()).collect();
    let mut normalized: Vec<String> = from_files
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .expect("json")
                .to_string()
        })
        .collect();
    normalized.sort();
    from_stdout.sort();
    assert_eq!(
        normalized, from_stdout,
        "the files hold exactly what stdout got"
    );
}

/// A collector that accepts one connection and keeps every line; `kill`
/// closes it under the agent's feet.
struct Collector {
    lines: Arc<Mutex<Vec<String>>>,
    conn: Arc<Mutex<Option<std::net::TcpStream>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Collector {
    fn start(listener: TcpListener) -> Collector {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let conn = Arc::new(Mutex::new(None));
        let (l2, c2) = (lines.clone(), conn.clone());
        let thread = std::thread::spawn(move || {
            let Ok((stream, _)) = listener.accept() else {
                return;
            };
            drop(listener);
            if let Ok(mut c) = c2.lock() {
                *c = stream.try_clone().ok();
            }
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                l2.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Collector {
            lines,
            conn,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.lines.lock().map(|l| l.len()).unwrap_or(0)
    }

    fn kill(&mut self) {
        if let Some(c) = self.conn.lock().ok().and_then(|mut c| c.take()) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn finish(mut self) -> Vec<String> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// "output SINK: W lines written, D dropped (queue full)", logged at exit,
/// -> (W, D).
fn sink_counts(stderr: &[String], sink: &str) -> (u64, u64) {
    let line = stderr
        .iter()
        .find(|l| l.contains(&format!("output {sink}:")) && l.contains("lines written"))
        .unwrap_or_else(|| panic!("no summary for {sink}: {stderr:?}"));
    let rest = line.split(&format!("output {sink}:")).nth(1).unwrap_or("");
    let mut nums = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<u64>().unwrap_or(0));
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0))
}

#[test]
fn tcp_output_reconnects_and_counts_exactly_what_it_drops() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut first = Collector::start(listener);
    let sink = format!("tcp://{addr}");
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::start(&[
        "--output",
        "stdout",
        "--output",
        &sink,
        "--queue-size",
        "8",
        "--metrics",
        &metrics,
    ]);
    // The pairs wait on their peers, not on the agent's stdout: stdout's
    // queue is 8 lines too, and on a busy machine it drops some (counted,
    // as this test checks), so a line the wait needs may never come.
    play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the collector got nothing\n{}",
            agent.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The collector dies; connections' events overflow the 8-line queue
    // while it is down (two usually do; more until the agent counts a
    // drop, as its metrics say).
    first.kill();
    let dropped_line = format!("tcptrace_output_dropped_lines_total{{output=\"{sink}\"}} ");
    let dropped_now = || {
        tcptrace_tests::scrape(metrics_port)
            .lines()
            .find_map(|l| {
                l.strip_prefix(dropped_line.as_str())?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dropped_now() == 0 {
        assert!(
            Instant::now() < deadline,
            "no line dropped while the collector was down\n{}",
            agent.dump()
        );
        play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
        std::thread::sleep(Duration::from_millis(200));
    }
    // It comes back on the same port; the agent reconnects by itself.
    let second = Collector::start(TcpListener::bind(addr).expect("rebind"));
    // Reconnected once the queued lines arrive (the backoff is capped).
    let deadline = Instant::now() + Duration::from_secs(40);
    while second.count() == 0 {
        assert!(Instant::now() < deadline, "no reconnect\n{}", agent.dump());
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = play_pair(peer_bin!(), &agent, None, None, "127.0.0.1", false);
    let mark = format!("\"lport\":{}", after.client.port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second
        .lines
        .lock()
        .map(|l| l.iter().any(|x| x.contains(&mark)))
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "nothing after the restart ({} lines there, looking for {mark}): {:?}\n{}",
            second.count(),
            second
                .lines
                .lock()
                .map(|l| l.iter().take(3).cloned().collect::<Vec<_>>()),
            agent.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let got = first.finish().len() as u64 + second.finish().len() as u64;
    let (written, dropped) = sink_counts(&stopped.stderr, &sink);
    // Every sink is offered every line: stdout's own tally is the total
    // (its queue is small too, so it may have dropped some as well).
    let (out_written, out_dropped) = sink_counts(&stopped.stderr, "stdout");
    assert_eq!(out_written, stopped.events.len() as u64);
    let total = out_written + out_dropped;
    assert!(
        dropped > 0,
        "the queue overflowed while the collector was down"
    );
    assert_eq!(got, written, "everything written arrived");
    assert_eq!(
        written + dropped,
        total,
        "every line is either delivered or counted as dropped"
    );
}

#[test]
fn summary_events_show_counts_and_drops_while_running() {
    // A collector that is down from the start: nobody listens on the port.
    let sink = format!("tcp://127.0.0.1:{}", free_port());
    let agent = Agent::start(&[
        "--output",
        "stdout",
        "--output",
        &sink,
        "--queue-size",
        "4",
        "--summary-interval",
        "1s",
    ]);
    // Traffic that does not depend on reading every line back (stdout's
    // queue is small too): five loopback connections from this process.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    for _ in 0..5 {
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    let dropped_of = |e: &Value| {
        e["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["output"] == sink.as_str()))
            .and_then(|o| o["dropped"].as_u64())
    };
    let events = agent.wait_for("a summary counting the dead collector's drops", |ev| {
        ev.iter()
            .any(|e| e["event"] == "summary" && dropped_of(e).is_some_and(|d| d > 0))
    });
    let summary = events
        .iter()
        .rev()
        .find(|e| e["event"] == "summary")
        .expect("a summary");
    assert!(
        summary["transitions_total"]
            .as_u64()
            .is_some_and(|n| n >= 40),
        "five connections, at least 8 transitions each: {summary}"
    );
    assert!(
        summary["uptime_s"].as_u64().is_some_and(|s| s >= 1),
        "{summary}"
    );
    assert_eq!(summary["outputs"][0]["output"], "stdout", "{summary}");
    for key in [
        "close_wait",
        "leaks_open",
        "time_wait",
        "lost_total",
        "tracked_sockets",
    ] {
        assert!(summary[key].is_u64(), "{key} in {summary}");
    }
    // The drops are also a warning while running, not only at exit.
    agent.wait_stderr(&format!("output {sink}: "));
    agent.wait_stderr("dropped since the last summary");
    let summaries = events.iter().filter(|e| e["event"] == "summary").count();
    assert!(summaries >= 1);
}
