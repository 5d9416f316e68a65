//! Syslog outputs against a real rsyslog on loopback: RFC 5424 over UDP and
//! over TCP (octet counting), leaks as warnings, the JSON intact.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::{free_port, peer_bin, Agent};

/// rsyslogd with a config of ours: UDP and TCP inputs on loopback, every
/// message to a file as `severity|facility|app|msgid|msg`. Stopped and
/// cleaned up on drop.
struct Rsyslog {
    child: Child,
    dir: PathBuf,
    udp: u16,
    tcp: u16,
}

impl Rsyslog {
    fn start() -> Rsyslog {
        let dir = std::env::temp_dir().join(format!("tcptrace-rsyslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (udp, tcp) = (free_port(), free_port());
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(workDirectory="{dir}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="string" string="%syslogseverity%|%syslogfacility%|%app-name%|%msgid%|%msg%\n")
*.* action(type="omfile" file="{dir}/out.log" template="fields")
"#,
                dir = dir.display()
            ),
        )
        .expect("config");
        let child = Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rsyslogd (apt-get install rsyslog)");
        let r = Rsyslog {
            child,
            dir,
            udp,
            tcp,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", tcp)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd never listened on {tcp}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("out.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn leaks_reach_rsyslog_over_udp_and_tcp_as_rfc5424_warnings() {
    let rsyslog = Rsyslog::start();
    let udp = format!("syslog+udp://127.0.0.1:{}", rsyslog.udp);
    let tcp = format!("syslog+tcp://127.0.0.1:{}", rsyslog.tcp);
    let agent = Agent::start(&[
        "--leak-after",
        "500ms",
        "--events",
        "leak",
        "--output",
        "stdout",
        "--output",
        &udp,
        "--output",
        &tcp,
    ]);
    let tcptrace_tests::Leaked {
        mut server,
        port,
        client: _client,
    } = tcptrace_tests::leaky_server(peer_bin!(), None, None, "127.0.0.1", 1, None);
    server.expect("leaked fd");
    let events = agent.wait_for("the leak on stdout", |ev| {
        ev.iter()
            .any(|e| e["event"] == "leak" && e["lport"] == port)
    });
    let ours = events
        .iter()
        .find(|e| e["event"] == "leak" && e["lport"] == port)
        .cloned()
        .expect("leak");
    // One copy through each transport.
    let deadline = Instant::now() + Duration::from_secs(20);
    let received = loop {
        let got: Vec<(String, Value)> = rsyslog
            .lines()
            .into_iter()
            .filter_map(|l| {
                let mut f = l.splitn(5, '|');
                let head: Vec<String> = (0..4)
                    .filter_map(|_| f.next().map(str::to_string))
                    .collect();
                let msg: Value = serde_json::from_str(f.next()?.trim()).ok()?;
                (msg["event"] == "leak" && msg["lport"] == port).then(|| (head.join("|"), msg))
            })
            .collect();
        if got.len() >= 2 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "rsyslog got {:?}\n{}",
            rsyslog.lines(),
            agent.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(received.len(), 2, "one per transport: {received:?}");
    for (head, msg) in &received {
        // warning (4), daemon (3), our app name and the event as MSGID.
        assert_eq!(head, "4|3|tcptrace|leak", "{head}");
        assert_eq!(msg, &ours, "the JSON arrives intact");
    }
    let stopped = agent.stop();
    assert!(stopped.status.success());
}
