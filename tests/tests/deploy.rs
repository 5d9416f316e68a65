//! The deployment files: the systemd unit passes `systemd-analyze verify`,
//! and the DaemonSet asks for capabilities, not privileged mode.

use std::path::PathBuf;
use std::process::Command;

use tcptrace_tests::{agent_bin, run_to_end};

fn deploy(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn systemd_unit_verifies() {
    // systemd-analyze checks that ExecStart exists: point it at the build.
    let unit = deploy("tcptrace.service").replace(
        "/usr/local/bin/tcptrace",
        &agent_bin()
            .canonicalize()
            .expect("agent path")
            .display()
            .to_string(),
    );
    assert!(unit.contains("ProtectSystem=strict"));
    assert!(unit.contains("Restart=on-failure"));
    let tmp = tcptrace_tests::TempDir::new("unit");
    let dir = &tmp.0;
    let path = dir.join("tcptrace.service");
    std::fs::write(&path, unit).expect("write unit");
    let (code, out, err) = run_to_end(Command::new("systemd-analyze").arg("verify").arg(&path));
    assert_eq!(code, Some(0), "systemd-analyze verify:\n{out}{err}");
    assert!(
        !err.contains(&*path.display().to_string()),
        "warnings about the unit:\n{err}"
    );
}

#[test]
fn daemonset_uses_capabilities_and_host_pid() {
    let ds = deploy("daemonset.yaml");
    for needle in [
        "hostPID: true",
        "privileged: false",
        "- BPF",
        "- PERFMON",
        "/sys/kernel/tracing",
        "--metrics=0.0.0.0:9464",
        "containerPort: 9464",
    ] {
        assert!(ds.contains(needle), "daemonset.yaml lacks {needle}");
    }
}
