//! Kernel variety, for real: a kernel without BTF, without syscall
//! tracepoints or without the TCP reset tracepoints is made by mounting an
//! empty tmpfs over what it lacks, in a private mount namespace (the
//! host's mounts stay as they are). The agent must say in one line what it
//! goes without, and run. (The plan for every combination, a missing ring
//! buffer among them, is unit-tested in `tcptrace::kernel::support`.)

use std::process::Command;

use tcptrace_tests::{agent_bin, run_to_end, TempPath};

/// Runs the agent in a private mount namespace after `mounts` (shell
/// commands), until its `ready` line, then stops it with SIGTERM; returns
/// its exit code and stderr.
fn agent_without(mounts: &str) -> (Option<i32>, String) {
    let log = TempPath::new("kernel-log");
    let script = format!(
        "{mounts} || exit 99
         RUST_LOG=info {agent} --state-file none > /dev/null 2> {log} & pid=$!
         for i in $(seq 300); do grep -q 'ready:' {log} && break; sleep 0.1; done
         kill -TERM $pid; wait $pid",
        agent = agent_bin().display(),
        log = log.arg(),
    );
    let (code, _, err) = run_to_end(Command::new("unshare").args([
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_ne!(code, Some(99), "mounting for the test: {err}");
    let stderr = std::fs::read_to_string(&log.0).unwrap_or_default();
    (code, stderr)
}

fn ready_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.contains("ready:"))
        .unwrap_or_else(|| panic!("no ready line:\n{stderr}"))
}

fn assert_says_once(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line with {needle:?}:\n{stderr}");
    assert!(lines[0].contains("WARN"), "{}", lines[0]);
}

#[test]
fn without_btf_the_classic_program_runs_and_says_so() {
    let (code, stderr) = agent_without("mount -t tmpfs none /sys/kernel/btf");
    assert_eq!(code, Some(0), "{stderr}");
    assert_says_once(&stderr, "no kernel BTF");
    assert!(stderr.contains("CONFIG_DEBUG_INFO_BTF"), "{stderr}");
    let ready = ready_line(&stderr);
    assert!(
        ready.contains("program inet_sock_set_state_fixed"),
        "the classic program: {ready}"
    );
    assert!(ready.contains("accept hooks off"), "{ready}");
}

#[test]
fn without_syscall_tracepoints_there_are_no_accept_hooks() {
    let (code, stderr) = agent_without("mount -t tmpfs none /sys/kernel/tracing/events/syscalls");
    assert_eq!(code, Some(0), "{stderr}");
    assert_says_once(&stderr, "no accept() tracepoints");
    let ready = ready_line(&stderr);
    assert!(ready.contains("program inet_sock_set_state_btf"), "{ready}");
    assert!(ready.contains("accept hooks off"), "{ready}");
}

#[test]
fn without_reset_tracepoints_it_runs_and_says_what_is_lost() {
    let (code, stderr) = agent_without("mount -t tmpfs none /sys/kernel/tracing/events/tcp");
    assert_eq!(code, Some(0), "{stderr}");
    assert_says_once(&stderr, "no RST tracepoints");
    let ready = ready_line(&stderr);
    assert!(ready.contains("accept hooks on"), "{ready}");
}

#[test]
fn a_full_kernel_goes_without_nothing() {
    let (code, stderr) = agent_without("true");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("WARN"), "{stderr}");
}
