//! Least privilege: once attached, the agent keeps only what /proc and
//! sock_diag need, in every thread, with `no_new_privs` set and a seccomp
//! filter that refuses to execute anything, and still
//! names the owner and the stack of a leak held by another user in
//! another network namespace.

use serde_json::Value;
use tcptrace_tests::{endpoint, fixture, free_port, netns_pair, peer_bin, peer_cmd, Agent, Peer};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_SYS_ADMIN (21).
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 21);

/// `Name:\tvalue` of /proc/PID/task/TID/status.
fn status_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

fn hex(field: &str) -> u64 {
    u64::from_str_radix(field, 16).unwrap_or_else(|e| panic!("{field}: {e}"))
}

#[test]
fn every_thread_keeps_only_proc_and_namespace_capabilities() {
    // A collector that is not there: its writer thread keeps retrying.
    let sink = format!("tcp://127.0.0.1:{}", free_port());
    let agent = Agent::start(&["--output", "stdout", "--output", &sink]);
    agent.wait_stderr("ready:");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.pid())).expect("task dir");
    let mut threads = 0;
    for task in tasks {
        let path = task.expect("task").path().join("status");
        let status = std::fs::read_to_string(&path).expect("status");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                hex(&status_field(&status, set)),
                KEPT,
                "{set} of {}\n{status}",
                path.display()
            );
        }
        assert_eq!(hex(&status_field(&status, "CapInh")), 0, "{status}");
        assert_eq!(hex(&status_field(&status, "CapAmb")), 0, "{status}");
        assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
        // The filter that refuses execve.
        assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");
        threads += 1;
    }
    // The main thread and the two output writers at least.
    assert!(threads >= 3, "{threads} threads");
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let said = "privileges: kept CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_SYS_ADMIN (bounding \
                set cut to match), no_new_privs set, exec forbidden (seccomp)";
    assert!(
        stopped.stderr.iter().any(|l| l.contains(said)),
        "{:?}",
        stopped.stderr
    );
}

/// The server runs as `nobody` in one namespace, the client in another:
/// naming its fd needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (its
/// /proc/PID/fd is another user's), reading its socket's inode needs
/// sock_diag inside its namespace (CAP_SYS_ADMIN for setns), and its stack
/// needs its maps and binary.
#[test]
fn a_leak_of_another_user_in_another_namespace_is_named_after_the_drop() {
    let nets = netns_pair();
    let agent = Agent::start(&["--leak-after", "500ms", "--events", "leak"]);
    agent.wait_stderr("privileges: kept");
    let bin = fixture("leaky_server");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &nets.a.name, "setpriv"])
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args([nets.addr_a.as_str(), "0", "1"]);
    let mut server = Peer::spawn(cmd);
    let port: u16 = server.expect("listening").parse().expect("port");
    let target = endpoint(&nets.addr_a, port);
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        Some(&nets.b),
        &["client", &target, "--exit", "--count", "1"],
    ));
    client.expect("done");
    let fd: i64 = server.expect("leaked fd").parse().expect("fd");
    let on_port = |ev: &[Value]| -> Option<Value> {
        ev.iter()
            .find(|e| e["event"] == "leak" && e["lport"] == port)
            .cloned()
    };
    let events = agent.wait_for("a leak on the server port", |ev| on_port(ev).is_some());
    let leak = on_port(&events).expect("leak");
    let uid = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .map(|s| status_field(&s, "Uid"))
        .expect("server status");
    assert!(uid.starts_with("65534"), "server runs as nobody: {uid}");
    assert_eq!(leak["owner"][0]["pid"], server.pid(), "{leak}");
    assert_eq!(leak["owner"][0]["fd"], fd, "{leak}");
    assert_eq!(leak["owner"][0]["comm"], "leaky_server", "{leak}");
    assert_eq!(leak["netns"], nets.a.inode(), "{leak}");
    assert_eq!(leak["origin"]["syscall"], "accept", "{leak}");
    let functions: Vec<&str> = leak["origin"]["stack"]
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .filter_map(|f| f["function"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        functions.contains(&"accept_orders"),
        "origin stack {functions:?} lacks accept_orders\n{leak}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
