//! Restarts: an agent killed with SIGKILL leaves no BPF program, link or
//! map behind, and the next one reports the same leaks from its
//! inventory; SIGTERM detaches and flushes every output.

use std::io::{BufRead as _, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tcptrace_tests::{children, kill, leaks_on_port, leaky_server, peer_bin, poll, Agent, Leaked};

/// The BPF objects the process holds, as ("prog" | "map" | "link", id),
/// from the fdinfo of its BPF file descriptors.
fn bpf_objects(pid: u32) -> Vec<(&'static str, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo");
    let mut found = Vec::new();
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines() {
            for kind in ["prog", "map", "link"] {
                let key = format!("{kind}_id:");
                if let Some(id) = line.strip_prefix(key.as_str()) {
                    let id: u64 = id.trim().parse().expect("id");
                    if !found.contains(&(kind, id)) {
                        found.push((kind, id));
                    }
                }
            }
        }
    }
    found
}

/// Whether `bpftool KIND show id ID` still finds the object.
fn exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .expect("run bpftool (apt-get install bpftool)")
        .status
        .success()
}

/// (owner pid, fd, remote port) of each leak, sorted.
fn owners(leaks: &[Value]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<_> = leaks
        .iter()
        .map(|l| {
            (
                l["owner"][0]["pid"].as_u64().expect("owner pid"),
                l["owner"][0]["fd"].as_u64().expect("owner fd"),
                l["rport"].as_u64().expect("rport"),
            )
        })
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn sigkill_leaves_nothing_attached_and_the_next_agent_reports_the_same_leaks() {
    const N: usize = 3;
    let args = ["--leak-after", "500ms", "--events", "leak"];
    let first = Agent::start(&args);
    let objects = bpf_objects(first.pid());
    for kind in ["prog", "map", "link"] {
        assert!(
            objects.iter().any(|(k, _)| *k == kind),
            "the agent holds a BPF {kind}: {objects:?}"
        );
    }
    let Leaked {
        server,
        port,
        client: _client,
    } = leaky_server(peer_bin!(), None, None, "127.0.0.1", N, None);
    let events = first.wait_for("the leaks", |ev| leaks_on_port(ev, port).len() == N);
    let before = owners(&leaks_on_port(&events, port));
    assert!(before
        .iter()
        .all(|(pid, _, _)| *pid == u64::from(server.pid())));

    let helper = children(first.pid());
    kill(first.pid(), libc::SIGKILL);
    // The kernel frees what a dead process held once its files are closed
    // (maps after an RCU grace period): give it a moment.
    poll(
        "every BPF object of the killed agent to be gone",
        Duration::from_secs(15),
        || {
            let left: Vec<_> = objects.iter().filter(|(k, id)| exists(k, *id)).collect();
            left.is_empty().then_some(())
        },
        || {
            let left: Vec<_> = objects.iter().filter(|(k, id)| exists(k, *id)).collect();
            format!("still there: {left:?}")
        },
    );
    drop(first);
    // Its namespace helper died with it.
    for pid in helper {
        poll(
            "the namespace helper to die with the agent",
            Duration::from_secs(5),
            || (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()),
            || std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        );
    }
    // Nothing pinned either.
    if let Ok(pinned) = std::fs::read_dir("/sys/fs/bpf") {
        let names: Vec<_> = pinned.flatten().map(|e| e.file_name()).collect();
        assert!(
            !names
                .iter()
                .any(|n| n.to_string_lossy().contains("tcptrace")),
            "{names:?}"
        );
    }

    let second = Agent::start(&args);
    let events = second.wait_for("the same leaks again", |ev| {
        leaks_on_port(ev, port).len() == N
    });
    let leaks = leaks_on_port(&events, port);
    assert_eq!(owners(&leaks), before, "{leaks:?}");
    for leak in &leaks {
        assert_eq!(leak["estimated"], true, "from the inventory: {leak}");
    }
    let stopped = second.stop();
    assert!(stopped.status.success());
}

/// A collector that keeps every line until the agent closes the
/// connection.
fn collect(listener: TcpListener) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return Vec::new();
        };
        BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
            .collect()
    })
}

#[test]
fn sigterm_flushes_every_output() {
    const CONNECTIONS: usize = 300;
    let tmp = tcptrace_tests::TempDir::new("flush");
    let path = tmp.0.join("events.json");
    let file_arg = format!("file:{}", path.display());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp_arg = format!("tcp://{}", listener.local_addr().expect("addr"));
    let collector = collect(listener);
    let agent = Agent::start(&[
        "--events",
        "state-change",
        "--output",
        "stdout",
        "--output",
        &file_arg,
        "--output",
        &tcp_arg,
    ]);
    // A burst, and SIGTERM right after its last close().
    let server = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = server.local_addr().expect("addr");
    let mut last_client_port = 0;
    for _ in 0..CONNECTIONS {
        let client = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = server.accept().expect("accept");
        last_client_port = client.local_addr().expect("local").port();
        drop(client);
        drop(accepted);
    }
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
    let stdout: Vec<String> = stopped.events.iter().map(Value::to_string).collect();
    let normalize = |lines: Vec<String>| -> Vec<String> {
        let mut out: Vec<String> = lines
            .iter()
            .map(|l| {
                serde_json::from_str::<Value>(l)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
                    .to_string()
            })
            .collect();
        out.sort();
        out
    };
    let file = normalize(
        std::fs::read_to_string(&path)
            .expect("the file output")
            .lines()
            .map(str::to_string)
            .collect(),
    );
    let tcp = normalize(collector.join().expect("collector"));
    let stdout = normalize(stdout);
    // The last connection's server side closed just before the signal.
    let last_closed = stopped.events.iter().any(|e| {
        e["event"] == "state_change"
            && e["rport"] == last_client_port
            && e["lport"] == addr.port()
            && e["new"] == "CLOSE"
    });
    assert!(last_closed, "the last close is on stdout");
    assert_eq!(file, stdout, "the file got what stdout got");
    assert_eq!(tcp, stdout, "the TCP collector got what stdout got");
}
