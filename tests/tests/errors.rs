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
        "this kernel cannot run tcptrace: no tracepoint sock:inet_sock_set_state (Linux >= 4.16)",
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
        (
            &["--output", "syslog+udp://loghost"],
            "syslog+udp://loghost",
        ),
        (&["--output", "syslog+tcp://:601"], "syslog+tcp://:601"),
        (&["--output", "syslog+unix://dev/log"], "absolute path"),
        (
            &["--output", "tcp://127.0.0.1:70000"],
            "tcp://127.0.0.1:70000",
        ),
        (&["--output", ""], "unknown output"),
        (&["--metrics", "127.0.0.1:x"], "127.0.0.1:x"),
        (&["--summary-interval", "0s"], "more than zero"),
    ] {
        let (code, _, stderr) = run_to_end(Command::new(agent_bin()).args(args));
        assert_clean_error(code, &stderr, 2, needle);
        assert_one_line(&stderr);
    }
}

fn assert_one_line(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of error:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
}

/// A scratch config file, removed on drop.
fn config_file(text: &str) -> tcptrace_tests::TempPath {
    let file = tcptrace_tests::TempPath::named("config", "toml");
    std::fs::write(&file.0, text).expect("write the config");
    file
}

#[test]
fn bad_config_files_exit_2_with_the_line_and_the_reason() {
    for (text, needle) in [
        (
            "leak-after = \"10s\"\nbogus-option = 1\n",
            ":2: unknown option \"bogus-option\"",
        ),
        ("# ports\nport = [80, 70000]\n", ":2: invalid value '70000'"),
        (
            "output = [\"stdout\", \"udp://x:1\"]\n",
            ":1: invalid value 'udp://x:1'",
        ),
        ("leak-after = 30s\n", ":1: not valid TOML"),
        ("ipv4 = \"yes\"\n", ":1: ipv4 is a switch"),
        ("ipv4 = true\nipv6 = true\n", "cannot be used with"),
    ] {
        let file = config_file(text);
        let (code, _, stderr) = run_to_end(
            Command::new(agent_bin())
                .arg("--config")
                .arg(&file.0)
                .args(["--state-file", "none"]),
        );
        assert_clean_error(code, &stderr, 2, needle);
        assert_one_line(&stderr);
        assert!(stderr.contains(&*file.0.display().to_string()), "{stderr}");
        let (code, _, check) =
            run_to_end(Command::new(agent_bin()).arg("check-config").arg(&file.0));
        assert_eq!(code, Some(2), "check-config {text:?}: {check}");
        assert_eq!(check, stderr, "check-config says the same as the agent");
    }
    let (code, _, stderr) =
        run_to_end(Command::new(agent_bin()).args(["--config", "/nonexistent/tcptrace.toml"]));
    assert_clean_error(code, &stderr, 2, "cannot read the config file");
}

#[test]
fn check_config_lists_what_a_good_file_sets() {
    let file =
        config_file("leak-after = \"10s\"\noutput = [\"stdout\", \"tcp://127.0.0.1:9000\"]\n");
    let (code, stdout, stderr) =
        run_to_end(Command::new(agent_bin()).arg("check-config").arg(&file.0));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("OK, 2 settings"), "{stdout}");
    assert!(
        stdout.contains("line 2: --output=stdout --output=tcp://127.0.0.1:9000"),
        "{stdout}"
    );
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
