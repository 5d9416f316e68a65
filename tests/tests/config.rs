//! `--config`: a running agent takes its options from a TOML file, and the
//! command line wins over it; the shipped example file is valid.

use std::path::PathBuf;
use std::process::Command;

use tcptrace_tests::{agent_bin, run_to_end, Agent, TempPath};

#[test]
fn the_agent_runs_on_a_config_file_and_flags_win() {
    let file = TempPath::named("config", "toml");
    // The file asks for summaries only, once an hour; the command line
    // shortens the interval.
    std::fs::write(
        &file.0,
        "events = [\"summary\"]\nsummary-interval = \"1h\"\nleak-after = \"5s\"\n",
    )
    .expect("write the config");
    let agent = Agent::start(&["--config", &file.arg(), "--summary-interval", "1s"]);
    agent.wait_stderr(&format!("config {}", file.0.display()));
    // Traffic of our own, which the file's `events` keeps off the output.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"));
    drop(client);
    let events = agent.wait_for("a summary within seconds (--summary-interval 1s)", |ev| {
        ev.iter().any(|e| e["event"] == "summary")
    });
    assert!(
        events.iter().all(|e| e["event"] == "summary"),
        "only summaries, as the file says: {events:?}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

#[test]
fn the_shipped_config_file_is_valid() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/tcptrace.toml");
    let (code, stdout, stderr) =
        run_to_end(Command::new(agent_bin()).arg("check-config").arg(&example));
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    for needle in [
        "--output=syslog+unix:///dev/log",
        "--metrics=127.0.0.1:9464",
    ] {
        assert!(stdout.contains(needle), "{stdout}");
    }
}
