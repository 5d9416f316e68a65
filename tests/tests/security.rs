//! Least privilege: once attached, the agent keeps only what /proc needs,
//! in every thread, with `no_new_privs` set and a seccomp filter that
//! refuses to execute anything; a helper process with CAP_SYS_ADMIN alone
//! enters network namespaces for it; and the agent still
//! names the owner and the stack of a leak held by another user in
//! another network namespace.

use serde_json::Value;
use tcptrace_tests::{endpoint, fixture, free_port, netns_pair, peer_bin, peer_cmd, Agent, Peer};

/// CAP_DAC_READ_SEARCH (2), CAP_SYS_PTRACE (19), CAP_CHECKPOINT_RESTORE
/// (40): what the agent keeps on this kernel (>= 6.5: its bpf() map reads
/// need no capability).
const KEPT: u64 = (1 << 2) | (1 << 19) | (1 << 40);
/// CAP_SYS_ADMIN (21): all the namespace helper keeps.
const HELPER_KEPT: u64 = 1 << 21;

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
    // The namespace helper: a child with CAP_SYS_ADMIN alone, no exec,
    // and nothing of the agent's open.
    let helpers = tcptrace_tests::children(agent.pid());
    assert_eq!(helpers.len(), 1, "one helper: {helpers:?}");
    let helper = helpers[0];
    let status = std::fs::read_to_string(format!("/proc/{helper}/status")).expect("status");
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            hex(&status_field(&status, set)),
            HELPER_KEPT,
            "{set}\n{status}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(status_field(&status, "Seccomp"), "2", "{status}");
    assert_eq!(status_field(&status, "Threads"), "1", "{status}");
    // Between requests (a request holds a namespace's fd and the socket
    // made there for a moment; the agent asks every few seconds).
    let fds = || {
        std::fs::read_dir(format!("/proc/{helper}/fd"))
            .expect("helper fds")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while fds() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(fds(), 1, "the helper holds its socket only");
    let stopped = agent.stop();
    assert!(stopped.status.success());
    let said = "privileges: kept CAP_DAC_READ_SEARCH CAP_SYS_PTRACE CAP_CHECKPOINT_RESTORE \
                (bounding set cut to match), no_new_privs set, exec forbidden (seccomp)";
    assert!(
        stopped.stderr.iter().any(|l| l.contains(said)),
        "{:?}",
        stopped.stderr
    );
}

/// The server runs as `nobody` in one namespace, the client in another:
/// naming its fd needs CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (its
/// /proc/PID/fd is another user's), reading its socket's inode needs
/// sock_diag inside its namespace (the helper's setns), and its stack
/// needs its maps and binary (`map_files`: CAP_CHECKPOINT_RESTORE).
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

/// Every syscall that could write, create, move or remove a file, or run
/// a program, and those that follow a path or read a link, as `strace`
/// names them.
const TRACED_SYSCALLS: &str = "trace=execve,execveat,open,openat,openat2,creat,rename,renameat,\
                               renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,truncate,link,\
                               linkat,symlink,symlinkat,chmod,fchmodat,chown,fchownat,lchown,\
                               mknod,mknodat,mount,umount2,stat,lstat,newfstatat,statx,\
                               readlink,readlinkat";

/// /proc paths the agent may open or stat (following their links), with
/// every run of digits as `N`: its own process, the few files it reads
/// of others, their namespaces (to enter them) and their mapped files
/// (to symbolize); anything else, like a process's `cwd` or `root`, it
/// may only read as a link. `map_files/` entries are checked apart.
const PROC_FOLLOWED: &[&str] = &[
    "/proc",
    "/proc/N/fd",
    "/proc/N/ns/net",
    "/proc/N/stat",
    "/proc/N/status",
    "/proc/N/comm",
    "/proc/N/task/N/comm",
    "/proc/N/cgroup",
    "/proc/N/maps",
    "/proc/N/net/tcp",
    "/proc/N/net/tcpN",
    "/proc/sys/net/ipvN/ip_local_port_range",
    "/proc/sys/net/ipvN/tcp_tw_reuse",
    "/proc/sys/kernel/osrelease",
    // The namespace helper checks which namespace it entered.
    "/proc/thread-self/ns/net",
];

/// Whether the agent may follow `path` (see [`PROC_FOLLOWED`]).
fn may_follow(path: &str) -> bool {
    if !path.starts_with("/proc") || path.starts_with("/proc/self/") {
        return true;
    }
    let mut shape = String::new();
    for c in path.chars() {
        if !c.is_ascii_digit() {
            shape.push(c);
        } else if !shape.ends_with('N') {
            shape.push('N');
        }
    }
    PROC_FOLLOWED.contains(&shape.as_str()) || shape.starts_with("/proc/N/map_files/")
}

/// Under `strace`, through a leak, a SIGHUP (outputs reopened) and a
/// SIGTERM: the agent executes nothing after its own start, every file it
/// writes, creates, moves or removes is one of its configured outputs,
/// and under /proc it follows only the links it reads (namespaces, mapped
/// files), reading the others (fds, exe) as links.
#[test]
fn writes_only_its_configured_outputs_and_executes_nothing() {
    let dir = tcptrace_tests::TempDir::new("writes");
    let trace = dir.0.join("strace.log");
    let out = dir.0.join("out.json");
    let state = dir.0.join("state.json");
    let err = dir.0.join("agent.err");
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-s", "4096", "-e", TRACED_SYSCALLS])
        .args(["-e", "status=successful", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg(tcptrace_tests::agent_bin())
        .arg("--output")
        .arg(format!("file:{}", out.display()))
        .arg("--state-file")
        .arg(&state)
        .args(["--leak-after", "500ms", "--format", "json"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("run strace (apt-get install strace)");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    tcptrace_tests::poll(
        "the agent's ready line",
        tcptrace_tests::TIMEOUT,
        || read(&err).contains("ready:").then_some(()),
        || read(&err),
    );
    // The agent is the process strace started: the pid of its execve.
    let pid: u32 = read(&trace)
        .lines()
        .find(|l| l.contains(" execve("))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("the agent's pid in the strace log");
    let leaked = tcptrace_tests::leaky_server(peer_bin!(), None, None, "127.0.0.1", 1, None);
    tcptrace_tests::poll(
        "the leak in the output file",
        tcptrace_tests::TIMEOUT,
        || {
            read(&out)
                .contains(&format!("\"lport\":{}", leaked.port))
                .then_some(())
        },
        || read(&out),
    );
    tcptrace_tests::kill(pid, libc::SIGHUP);
    tcptrace_tests::poll(
        "the outputs reopened",
        tcptrace_tests::TIMEOUT,
        || read(&err).contains("SIGHUP").then_some(()),
        || read(&err),
    );
    tcptrace_tests::kill(pid, libc::SIGTERM);
    let status = strace.wait().expect("strace exit");
    assert!(status.success(), "{status:?}\n{}", read(&err));
    let leaked_pid = leaked.server.pid();
    drop(leaked);

    let log = std::fs::read_to_string(&trace).expect("strace log");
    let execs: Vec<&str> = log.lines().filter(|l| l.contains(" execve")).collect();
    assert_eq!(execs.len(), 1, "only strace starting the agent: {execs:?}");
    let allowed = |path: &str| path.starts_with(&format!("{}/", dir.0.display()));
    let mut writes = 0;
    for line in log.lines() {
        // strace pads the pid column: "730   execve(...".
        let call = line
            .split_once(' ')
            .map_or(line, |(_, rest)| rest)
            .trim_start();
        // A call another thread interrupted shows its arguments on its
        // "unfinished" line; the "resumed" line has none.
        if call.starts_with("<...") || call.starts_with("+++") || call.starts_with("---") {
            continue;
        }
        let paths: Vec<&str> = call.split('"').skip(1).step_by(2).collect();
        if call.starts_with("readlink") {
            // A link read, not followed: fine anywhere.
            continue;
        }
        let is_stat = ["stat(", "lstat(", "newfstatat(", "statx("]
            .iter()
            .any(|c| call.starts_with(c));
        if call.starts_with("open") || is_stat {
            assert!(
                paths.first().is_none_or(|p| may_follow(p)),
                "follows a /proc link it has no business in: {call}"
            );
        }
        if is_stat {
            continue;
        }
        let writes_file = if call.starts_with("open") || call.starts_with("creat") {
            call.starts_with("creat")
                || ["O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"]
                    .iter()
                    .any(|f| call.contains(f))
        } else {
            !call.starts_with("execve")
        };
        if !writes_file {
            continue;
        }
        writes += 1;
        assert!(
            !paths.is_empty() && paths.iter().all(|p| allowed(p)),
            "a write outside the configured outputs: {call}\n{log}"
        );
    }
    assert!(
        writes >= 3,
        "the output, the state file and its rename: {log}"
    );
    // The leak's owner was looked for, and its stack symbolized.
    assert!(
        log.lines()
            .any(|l| l.contains("readlink(\"/proc/") && l.contains("/fd/")),
        "no fd link read: {log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("/proc/{}/maps", leaked_pid))),
        "the leaking process's maps were not read: {log}"
    );
}
