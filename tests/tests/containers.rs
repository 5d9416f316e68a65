//! A real container holding a leak: Podman (from Debian) runs an image
//! made here from a local root filesystem (the leaky server and the
//! libraries it links), no registry. The agent's leak names the container
//! by id, runtime and name; `tcptrace leaks` lists, filters and draws it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tcptrace_tests::{
    agent_bin, fixture, leaks_on_port, peer_bin, peer_cmd, run_to_end, Agent, Peer,
};

/// A container image and the containers run from it, removed on drop
/// (also when the test fails).
struct Podman {
    image: String,
    containers: Vec<String>,
    root: PathBuf,
}

impl Podman {
    /// Builds `localhost/NAME:test` from a root filesystem holding `bin`
    /// and every library `ldd` names for it.
    fn image_with(bin: &Path) -> Podman {
        let tag = format!("localhost/tcptrace-test-{}:test", std::process::id());
        let root = std::env::temp_dir().join(format!("tcptrace-rootfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("rootfs dir");
        std::fs::copy(bin, root.join("leaky_server")).expect("copy the server");
        let (code, out, err) = run_to_end(Command::new("ldd").arg(bin));
        assert_eq!(code, Some(0), "ldd: {err}");
        for lib in out
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(PathBuf::from)
        {
            let dest = root.join(lib.strip_prefix("/").expect("absolute"));
            std::fs::create_dir_all(dest.parent().expect("a directory")).expect("lib dir");
            std::fs::copy(&lib, &dest).expect("copy a library");
        }
        let image = Podman {
            image: tag.clone(),
            containers: Vec::new(),
            root,
        };
        let (code, _, err) = run_to_end(Command::new("sh").arg("-c").arg(format!(
            "tar -C '{}' -c . | podman import - '{tag}'",
            image.root.display()
        )));
        assert_eq!(code, Some(0), "podman import: {err}");
        image
    }

    /// Runs `args` in a new container `name` on the host's network, its
    /// stdin and stdout the returned peer's.
    fn run(&mut self, name: &str, args: &[&str]) -> Peer {
        self.containers.push(name.to_string());
        let mut cmd = Command::new("podman");
        // runc: crun refuses hosts with cgroup controllers in both
        // hierarchies (hybrid), which runc handles. The limits: a VM
        // without CAP_SYS_RESOURCE cannot raise them to Podman's defaults.
        cmd.args(["--runtime", "runc", "run", "-i", "--rm", "--name", name])
            .args(["--network", "host", "--ulimit", "nofile=1024:1024"])
            .args(["--ulimit", "nproc=1024:1024", &self.image])
            .args(args);
        Peer::spawn(cmd)
    }

    /// The full id of container `name`.
    fn id(name: &str) -> String {
        let (code, out, err) =
            run_to_end(Command::new("podman").args(["inspect", "--format", "{{.Id}}", name]));
        assert_eq!(code, Some(0), "podman inspect: {err}");
        out.trim().to_string()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = run_to_end(Command::new("podman").args(["rm", "-f", "-t", "0", c]));
        }
        let _ = run_to_end(Command::new("podman").args(["rmi", "-f", &self.image]));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// `tcptrace leaks ARGS` against `state`: its standard output.
fn leaks(state: &str, args: &[&str]) -> String {
    let (code, out, err) = run_to_end(
        Command::new(agent_bin())
            .args(["leaks", "--state-file", state])
            .args(args),
    );
    assert_eq!(code, Some(0), "tcptrace leaks {args:?}: {err}");
    out
}

#[test]
fn a_leak_in_a_podman_container_names_the_container() {
    let mut podman = Podman::image_with(&fixture("leaky_server"));
    let name = format!("tcptrace-leaky-{}", std::process::id());
    let state_file = tcptrace_tests::TempPath::new("state");
    let state = state_file.arg();
    // Only this container's leaks: a leak on the host must not show.
    let metrics_port = tcptrace_tests::free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let agent = Agent::start(&[
        "--metrics",
        &metrics,
        "--leak-after",
        "500ms",
        "--events",
        "leak,state-change",
        "--state-file",
        &state,
        "--container",
        &name,
    ]);

    let mut server = podman.run(&name, &["/leaky_server", "127.0.0.1", "0", "1"]);
    let port: u16 = server.expect("listening").parse().expect("port");
    let target = format!("127.0.0.1:{port}");
    let mut client = Peer::spawn(peer_cmd(
        peer_bin!(),
        None,
        &["client", &target, "--exit", "--count", "1"],
    ));
    client.expect("done");
    server.expect("leaked fd");
    // The same leak outside any container.
    let host = tcptrace_tests::leaky_server(peer_bin!(), None, None, "127.0.0.1", 1, None);

    let id = Podman::id(&name);
    let events = agent.wait_for("the container's leak", |ev| {
        !leaks_on_port(ev, port).is_empty()
    });
    let leak = &leaks_on_port(&events, port)[0];
    let owner = &leak["owner"][0];
    assert_eq!(owner["container"]["id"], id.as_str(), "{leak}");
    assert_eq!(owner["container"]["runtime"], "podman", "{leak}");
    assert_eq!(owner["container"]["name"], name.as_str(), "{leak}");
    assert_eq!(owner["comm"], "leaky_server", "{leak}");
    let message = leak["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("in container {name} (podman {})", &id[..12])),
        "{message}"
    );

    // The state file is written every second: the leak reaches it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let report: Value = loop {
        let r: Value = serde_json::from_str(&leaks(&state, &["--format", "json"])).expect("json");
        if r.to_string().contains(&id) || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        report.to_string().contains(&format!("\"name\":\"{name}\"")),
        "{report}"
    );
    let text = leaks(&state, &["--format", "text"]);
    assert!(
        text.contains(&format!("in container {name} (podman")),
        "{text}"
    );

    // Filters and the picture.
    let folded = leaks(&state, &["--folded", "--container", &name]);
    assert!(
        folded.starts_with(&format!("container {name};leaky_server;[last use];")),
        "{folded}"
    );
    assert!(folded.trim_end().ends_with(" 1"), "one socket: {folded}");
    assert_eq!(
        leaks(&state, &["--folded", "--container", "no-such-container"]),
        ""
    );
    assert!(!leaks(&state, &["--folded", "--container", &id[..12]]).is_empty());
    let svg = tcptrace_tests::TempPath::named("leaks", "svg");
    leaks(&state, &["--flamegraph", &svg.arg(), "--format", "json"]);
    let drawn = std::fs::read_to_string(svg.arg()).expect("the flame graph");
    assert!(drawn.contains("<svg") && drawn.contains(&format!("container {name}")));

    // The running agent draws the same picture.
    let folded = tcptrace_tests::http(metrics_port, "GET", "/leaks.folded", None);
    assert_eq!(folded.status, 200);
    assert!(
        folded
            .body
            .starts_with(&format!("container {name};leaky_server;[last use];")),
        "{}",
        folded.body
    );
    let svg = tcptrace_tests::http(metrics_port, "GET", "/leaks.svg", None);
    assert_eq!(svg.header("content-type"), Some("image/svg+xml"));
    assert!(svg.body.contains(&format!("container {name}")));

    // Every line that names an owner names its container too; the host's
    // leak and the client's socket (host processes) are filtered out.
    std::thread::sleep(Duration::from_secs(1));
    let events = agent.events();
    assert!(
        leaks_on_port(&events, host.port).is_empty(),
        "a leak outside the container: {}",
        agent.dump()
    );
    let changes: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "state_change" && e["lport"] == port)
        .collect();
    assert!(!changes.is_empty(), "{}", agent.dump());
    for e in &changes {
        assert_eq!(e["container"]["id"], id.as_str(), "{e}");
    }
    assert!(
        !events
            .iter()
            .any(|e| e["lport"] == host.port || e["rport"] == host.port),
        "a line of a host process: {}",
        agent.dump()
    );
    drop(host);
    // The container stops: its leak ends, and the end names it although
    // its process is gone.
    drop(server);
    let events = agent.wait_for("the leak's end", |ev| {
        ev.iter()
            .any(|e| e["event"] == "leak_end" && e["lport"] == port)
    });
    let end = events
        .iter()
        .find(|e| e["event"] == "leak_end" && e["lport"] == port)
        .expect("leak_end");
    assert_eq!(end["container"]["name"], name.as_str(), "{end}");
}
