//! The agent's errors, produced the way a user meets them: one clear line,
//! a non-zero exit code, never a panic.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tcptrace_tests::{agent_bin, kill, run_to_end, Agent};

/// A copy of the agent that any user can execute (the build tree may sit
/// in a directory only root can enter). Removed on drop.
struct WorldExecutable {
    dir: PathBuf,
    bin: PathBuf,
}

impl WorldExecutable {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tcptrace-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = dir.join("tcptrace");
        std::fs::copy(agent_bin(), &bin).expect("copy the agent");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { dir, bin }
    }
}

impl Drop for WorldExecutable {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_clean_error(code: Option<i32>, stderr: &str, want_code: i32, needle: &str) {
    assert_eq!(code, Some(want_code), "exit code; stderr:\n{stderr}");
    assert!(
        stderr.contains(needle),
        "stderr lacks {needle:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "backtrace:\n{stderr}");
}

/// Runs a shell script in a private mount namespace: whatever it mounts or
/// unmounts, the host's mounts stay as they are.
fn in_private_mount_namespace(script: &str) -> (Option<i32>, String, String) {
    run_to_end(Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", script]))
}

#[test]
fn not_root_says_which_privileges() {
    let agent = WorldExecutable::new("nonroot");
    let (code, _, stderr) = run_to_end(
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--",
            ])
            .arg(&agent.bin),
    );
    assert_clean_error(code, &stderr, 1, "needs root or CAP_BPF and CAP_PERFMON");
    assert!(stderr.contains("sudo"), "{stderr}");
}

#[test]
fn tracefs_unmounted_and_unmountable_says_how_to_mount_it() {
    let agent = agent_bin();
    // Without CAP_SYS_ADMIN the agent cannot mount tracefs itself.
    let script = format!(
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; \
         umount -l /sys/kernel/debug 2>/dev/null; \
         exec setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin -- {}",
        agent.display()
    );
    let (code, _, stderr) = in_private_mount_namespace(&script);
    assert_clean_error(code, &stderr, 1, "tracefs is not mounted");
    assert!(stderr.contains("mount -t tracefs"), "{stderr}");
}

#[test]
fn missing_tracepoint_is_named() {
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let (code, _, err) = run_to_end(Command::new("mount").args([
            "-t",
            "tracefs",
            "nodev",
            "/sys/kernel/tracing",
        ]));
        assert_eq!(code, Some(0), "mounting tracefs for the test: {err}");
    }
    let script = format!(
        "mount -t tmpfs none /sys/kernel/tracing/events/sock && exec {}",
        agent_bin().display()
    );
    let (code, _, stderr) = in_private_mount_namespace(&script);
    assert_clean_error(
        code,
        &stderr,
        1,
        "tracepoint sock:inet_sock_set_state not found",
    );
}

#[test]
fn bad_command_line_values_exit_2_naming_the_value() {
    for (args, needle) in [
        (&["--port", "70000"][..], "70000"),
        (&["--port", "abc"], "abc"),
        (&["--pid", "-3"], "-3"),
        (&["--state", "BOGUS"], "BOGUS"),
        (&["--format", "xml"], "xml"),
        (&["-4", "-6"], "cannot be used with"),
        (&["--ring-buffer-size", "1000"], "1000"),
        (&["--no-such-flag"], "--no-such-flag"),
        (&["--output", "udp://127.0.0.1:514"], "udp://127.0.0.1:514"),
        (&["--output", "file:"], "file:"),
        (&["--output", "tcp://collector"], "tcp://collector"),
        (&["--queue-size", "0"], "0"),
    ] {
        let (code, _, stderr) = run_to_end(Command::new(agent_bin()).args(args));
        assert_clean_error(code, &stderr, 2, needle);
    }
}

#[test]
fn help_teaches() {
    let (code, stdout, _) = run_to_end(Command::new(agent_bin()).arg("--help"));
    assert_eq!(code, Some(0));
    for needle in [
        "CLOSE_WAIT",
        "--pid",
        "--port",
        "--state",
        "--format",
        "CAP_BPF",
        "Examples",
    ] {
        assert!(stdout.contains(needle), "--help lacks {needle}:\n{stdout}");
    }
}

#[test]
fn sigint_exits_zero() {
    let agent = Agent::start(&[]);
    kill(agent.pid(), libc::SIGINT);
    agent.wait_stderr("SIGINT");
    let stopped = agent.stop();
    assert!(stopped.status.success(), "{:?}", stopped.status);
}
