//! The product's own story (design.md, "The problem, in one story"), played
//! for real: a connection pool behind a load balancer that closes idle
//! connections, and an update path that begins a transaction and returns on
//! an error without rolling it back. A real MariaDB behind a real HAProxy
//! (`timeout client 2s`), a Go service on `database/sql` with
//! go-sql-driver/mysql, and the same service in Python on SQLAlchemy's
//! QueuePool with PyMySQL. Four sockets end in CLOSE_WAIT: three held by the
//! forgotten transactions, one idle in the pool. Every connection was opened
//! by the warm-up, so the origin stack cannot tell them apart; the last use
//! (the stack of the last checkout, the first I/O after an idle gap) must.
//!
//! Ground truth is `ss -tanpi`: the sockets, their owner and fd, and
//! `lastsnd` (milliseconds since the socket last sent data), which tells
//! the idle one (warm-up only, 300 ms before the requests) from the others.

use std::fs::File;
use std::io::Read as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tcptrace_tests::{
    agent_bin, free_port, functions, run_to_end, ss_users, Agent, Peer, TempDir, TempPath, TIMEOUT,
};

/// HAProxy's idle timeouts (client and server side), in seconds: the FIN
/// comes this long after a connection's last byte.
const IDLE_TIMEOUT_S: u32 = 2;

/// The agent's arguments besides `--state-file`: a socket 1 s in CLOSE_WAIT
/// is a leak, and the state file `tcptrace leaks` reads is rewritten twice
/// a second.
const LEAK_AFTER: &[&str] = &["--leak-after", "1s", "--leak-group-interval", "500ms"];

/// The fixtures' directory.
fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The contents of `path`, for failure messages.
fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

/// A file for a child's stdout and stderr.
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = File::create(path).expect("create a log file");
    let copy = file.try_clone().expect("clone the log file");
    (Stdio::from(file), Stdio::from(copy))
}

/// Waits until a connection to 127.0.0.1:`port` is greeted by MariaDB (its
/// handshake packet comes first), for at most [`TIMEOUT`]; panics with
/// `context()` when `child` exits or time runs out.
fn wait_for_greeting(port: u16, child: &mut Child, what: &str, context: impl Fn() -> String) {
    let deadline = Instant::now() + TIMEOUT;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        let greeted = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut buf = [0u8; 64];
                s.read(&mut buf)
            })
            .is_ok_and(|n| n > 0);
        if greeted {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before greeting on {port}\n{}",
                context()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} never greeted on port {port}\n{}",
            context()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A server the test started on 127.0.0.1: its process, port, private
/// directory and log; killed on drop, then its directory removed.
struct Daemon {
    child: Child,
    port: u16,
    /// Removed when the daemon is dropped (after it is killed).
    _dir: TempDir,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        log_of(&self.log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private MariaDB on 127.0.0.1 (its own datadir, socket and port, no
/// grant tables).
struct Mariadb;

impl Mariadb {
    fn start() -> Daemon {
        let dir = TempDir::new("mariadb");
        let data = dir.0.join("data");
        // Small InnoDB files: a 22 MB datadir instead of 114 MB.
        let small = ["--innodb-log-file-size=4M", "--innodb-buffer-pool-size=16M"];
        let (code, out, err) = run_to_end(
            Command::new("mariadb-install-db")
                .args(["--no-defaults", "--user=root", "--skip-test-db"])
                .args([
                    "--auth-root-authentication-method=normal",
                    "--skip-name-resolve",
                ])
                .arg(format!("--datadir={}", data.display()))
                .args(small),
        );
        assert_eq!(
            code,
            Some(0),
            "mariadb-install-db (apt-get install mariadb-server) failed:\n{out}\n{err}"
        );
        let port = free_port();
        let log = dir.0.join("error.log");
        let child = Command::new("mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", dir.0.join("mariadb.sock").display()))
            .arg(format!(
                "--pid-file={}",
                dir.0.join("mariadb.pid").display()
            ))
            .arg(format!("--log-error={}", log.display()))
            .arg(format!("--tmpdir={}", dir.0.display()))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--user=root",
            ])
            .args(["--skip-name-resolve", "--performance-schema=OFF"])
            .args(small)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd (apt-get install mariadb-server)");
        let mut db = Daemon {
            child,
            port,
            _dir: dir,
            log,
        };
        wait_for_greeting(port, &mut db.child, "mariadbd", || log_of(&db.log));
        db
    }
}

/// HAProxy on 127.0.0.1 in TCP mode in front of one MariaDB, closing
/// connections idle for [`IDLE_TIMEOUT_S`].
struct Haproxy;

impl Haproxy {
    fn start(backend: u16) -> Daemon {
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let config = dir.0.join("haproxy.cfg");
        let t = IDLE_TIMEOUT_S;
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 256\n    nbthread 1\n\
                 defaults\n    mode tcp\n    timeout connect {t}s\n    \
                 timeout client {t}s\n    timeout server {t}s\n\
                 listen mysql\n    bind 127.0.0.1:{port}\n    \
                 server db 127.0.0.1:{backend}\n"
            ),
        )
        .expect("write haproxy.cfg");
        let log = dir.0.join("haproxy.log");
        let (out, err) = log_file(&log);
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start haproxy (apt-get install haproxy)");
        let mut proxy = Daemon {
            child,
            port,
            _dir: dir,
            log,
        };
        // Greeted through the balancer: the whole chain works.
        wait_for_greeting(port, &mut proxy.child, "haproxy", || log_of(&proxy.log));
        proxy
    }
}

/// The upstream of both stories: MariaDB behind HAProxy. The balancer
/// goes first on drop.
struct Upstream {
    proxy: Daemon,
    db: Daemon,
}

impl Upstream {
    fn start() -> Upstream {
        let db = Mariadb::start();
        let proxy = Haproxy::start(db.port);
        Upstream { proxy, db }
    }

    /// The balancer's port: where the services connect.
    fn port(&self) -> u16 {
        self.proxy.port
    }

    fn logs(&self) -> String {
        format!(
            "--- haproxy ---\n{}\n--- mariadbd ---\n{}",
            self.proxy.log(),
            self.db.log()
        )
    }
}

/// Builds tests/fixtures/pool_story (Go) into `dir` from Debian's packages
/// only: GOPATH mode, the driver from /usr/share/gocode, no module proxy.
/// Go keeps frame pointers by default.
fn build_go_fixture(dir: &TempDir) -> PathBuf {
    let bin = dir.0.join("pool_story");
    let (code, out, err) = run_to_end(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(fixtures().join("pool_story"))
            .env("GO111MODULE", "off")
            .env("GOPATH", "/usr/share/gocode")
            .env("GOCACHE", dir.0.join("gocache"))
            .env("GOFLAGS", "")
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", "0"),
    );
    assert_eq!(
        code,
        Some(0),
        "go build (apt-get install golang-go golang-github-go-sql-driver-mysql-dev) \
         failed:\n{out}\n{err}"
    );
    bin
}

/// One socket in CLOSE_WAIT as `ss -tanpi` shows it.
#[derive(Debug)]
struct SsSocket {
    lport: u16,
    users: Vec<(u32, i32)>,
    /// Milliseconds since it last sent data.
    lastsnd_ms: u64,
    line: String,
}

/// Ground truth: the sockets in CLOSE_WAIT toward 127.0.0.1:`port`, from
/// `ss -tanpi` (each socket's line, then its TCP info on the next).
fn ss_close_wait_toward(port: u16) -> Vec<SsSocket> {
    let (code, out, err) = run_to_end(Command::new("ss").args(["-tanpiH"]));
    assert_eq!(code, Some(0), "ss -tanpi: {err}");
    let peer = format!("127.0.0.1:{port}");
    let mut sockets = Vec::new();
    let mut lines = out.lines().peekable();
    while let Some(line) = lines.next() {
        let info = match lines.peek() {
            Some(next) if next.starts_with(char::is_whitespace) => lines.next().unwrap_or(""),
            _ => "",
        };
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.first() != Some(&"CLOSE-WAIT") || cols.get(4) != Some(&peer.as_str()) {
            continue;
        }
        let lport = cols
            .get(3)
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no local port in {line}"));
        let lastsnd_ms = info
            .split_whitespace()
            .find_map(|f| f.strip_prefix("lastsnd:"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no lastsnd in {info:?} (socket {line})"));
        sockets.push(SsSocket {
            lport,
            users: ss_users(line),
            lastsnd_ms,
            line: format!("{line}\n{info}"),
        });
    }
    sockets
}

/// The `leak` events of sockets connected to 127.0.0.1:`port`.
fn leaks_toward(events: &[Value], port: u16) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == "leak" && e["raddr"] == "127.0.0.1" && e["rport"] == port)
        .cloned()
        .collect()
}

/// The frames of a stack of strings (`tcptrace leaks`: "fn+0x.. (file:line)").
fn strings(stack: &Value) -> Vec<String> {
    stack
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The first frame of `stack` in `function`.
fn frame_in<'a>(stack: &'a Value, function: &str) -> Option<&'a Value> {
    stack
        .as_array()
        .and_then(|frames| frames.iter().find(|f| f["function"] == function))
}

/// The line (1-based) of the Go fixture's source that contains `needle`,
/// which must be on exactly one line.
fn go_line(needle: &str) -> u64 {
    let path = fixtures().join("pool_story/main.go");
    let src = std::fs::read_to_string(&path).expect("read the Go fixture");
    let lines: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{needle:?} in {}: lines {lines:?}",
        path.display()
    );
    lines[0] as u64
}

/// Asserts `stack` has a frame in `function` at the Go fixture's
/// main.go:`line` (the call that was running there).
fn assert_frame_at(stack: &Value, function: &str, line: u64, leak: &Value) {
    let frame = frame_in(stack, function)
        .unwrap_or_else(|| panic!("no frame in {function}: {stack:#}\n{leak}"));
    assert!(
        frame["file"]
            .as_str()
            .is_some_and(|f| f.ends_with("pool_story/main.go")),
        "{function} is in main.go, not {}: {frame}\n{leak}",
        frame["file"]
    );
    assert_eq!(frame["line"], line, "{function}'s line: {frame}\n{leak}");
}

fn has(names: &[String], function: &str) -> bool {
    names.iter().any(|n| n == function)
}

/// `tcptrace leaks --format json` from the agent's state file.
fn leaks_report(state: &str) -> Value {
    let (code, out, err) = run_to_end(Command::new(agent_bin()).args([
        "leaks",
        "--format",
        "json",
        "--state-file",
        state,
        "--leak-after",
        "1s",
    ]));
    assert_eq!(code, Some(0), "tcptrace leaks: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tcptrace leaks: not JSON ({e}): {out}"))
}

/// The report's groups of process `pid`.
fn groups_of(report: &Value, pid: u32) -> Vec<Value> {
    report["groups"]
        .as_array()
        .map(|g| g.iter().filter(|g| g["pid"] == pid).cloned().collect())
        .unwrap_or_default()
}

/// Polls the report until the groups of `pid` hold `n` sockets in all.
fn wait_for_groups(state: &str, pid: u32, n: u64, agent: &Agent) -> Vec<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let report = leaks_report(state);
        let groups = groups_of(&report, pid);
        let total: u64 = groups.iter().filter_map(|g| g["count"].as_u64()).sum();
        if total == n {
            return groups;
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace leaks never showed {n} sockets of pid {pid}: {report:#}\n{}",
            agent.dump()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// What a story left: the agent (still running), its leak events toward
/// the balancer, and ss's view of the same sockets.
struct Outcome {
    agent: Agent,
    leaks: Vec<Value>,
    ss: Vec<SsSocket>,
    context: String,
}

/// With `upstream` and a started `agent`, waits until the service `pid`
/// has 4 sockets in CLOSE_WAIT toward the balancer and the agent reported
/// 4 leaks for them; checks what does not depend on the language: ss and
/// the agent agree on the sockets, owners and fds.
fn four_leaks(agent: Agent, upstream: &Upstream, pid: u32) -> Outcome {
    let port = upstream.port();
    let events = agent.wait_for("4 leaks toward the balancer", |ev| {
        leaks_toward(ev, port).len() >= 4
    });
    let leaks = leaks_toward(&events, port);
    let ss = ss_close_wait_toward(port);
    let context = format!(
        "--- leaks ---\n{}\n--- ss -tanpi ---\n{}\n{}\n{}",
        leaks
            .iter()
            .map(|l| format!("{l:#}"))
            .collect::<Vec<_>>()
            .join("\n"),
        ss.iter()
            .map(|s| s.line.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        upstream.logs(),
        agent.dump()
    );
    // What the agent said, in short, for a run with --nocapture.
    for l in &leaks {
        let last = &l["last_use"];
        eprintln!(
            "leak {} fd {}: origin {} {:?}; last use {} tid {} {} {} {} ms before the FIN \
             ({} checkouts, {} ios), last I/O {} {} ms before: {:?}\n  {}",
            l["lport"],
            l["owner"][0]["fd"],
            l["origin"]["comm"],
            functions(&l["origin"]["stack"]),
            last["comm"],
            last["tid"],
            last["direction"],
            last["syscall"],
            last["before_fin_ms"],
            last["checkouts"],
            last["ios"],
            last["last_io_direction"],
            last["last_io_before_fin_ms"],
            functions(&last["stack"]),
            l["message"],
        );
    }
    assert_eq!(ss.len(), 4, "ss: 4 sockets in CLOSE_WAIT\n{context}");
    for s in &ss {
        assert_eq!(s.users.len(), 1, "one holder: {}\n{context}", s.line);
        assert_eq!(s.users[0].0, pid, "held by the service: {}", s.line);
    }
    assert_eq!(leaks.len(), 4, "one leak event per socket\n{context}");
    let mut from_agent: Vec<(u64, u64, i64)> = leaks
        .iter()
        .map(|l| {
            assert_eq!(l["owner"].as_array().map(Vec::len), Some(1), "{l}");
            assert_eq!(l["owner"][0]["pid"], pid, "owner is the service: {l}");
            (
                l["lport"].as_u64().unwrap_or(0),
                l["owner"][0]["pid"].as_u64().unwrap_or(0),
                l["owner"][0]["fd"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    from_agent.sort_unstable();
    let mut from_ss: Vec<(u64, u64, i64)> = ss
        .iter()
        .map(|s| {
            (
                u64::from(s.lport),
                u64::from(s.users[0].0),
                i64::from(s.users[0].1),
            )
        })
        .collect();
    from_ss.sort_unstable();
    assert_eq!(
        from_agent, from_ss,
        "agent vs ss: (port, pid, fd)\n{context}"
    );
    for l in &leaks {
        let origin = &l["origin"];
        assert_eq!(origin["syscall"], "connect", "{l}");
        assert_eq!(origin["pid"], pid, "{l}");
        let last = &l["last_use"];
        assert!(last.is_object(), "every socket was used: {l}\n{context}");
        assert_eq!(last["pid"], pid, "{l}");
        assert!(
            last["direction"] == "send" || last["direction"] == "recv",
            "{l}"
        );
        assert!(
            last["last_io_direction"] == "send" || last["last_io_direction"] == "recv",
            "{l}"
        );
        assert!(
            last["syscall"].is_null() || last["syscall"].is_string(),
            "{l}"
        );
        for ts in ["ts", "last_io_ts"] {
            assert!(
                last[ts].as_str().is_some_and(|t| t.ends_with('Z')),
                "{ts}: {l}"
            );
        }
        let checkouts = last["checkouts"].as_u64().expect("checkouts");
        let ios = last["ios"].as_u64().expect("ios");
        assert!(checkouts >= 1 && ios >= checkouts, "{l}");
        let before_fin = last["before_fin_ms"].as_f64().expect("before_fin_ms");
        let last_io = last["last_io_before_fin_ms"]
            .as_f64()
            .expect("last_io_before_fin_ms");
        // The last I/O came at or after the checkout, and the FIN came
        // the balancer's idle timeout after the last byte.
        assert!(last_io <= before_fin, "{l}");
        assert!(
            last_io > 1000.0,
            "idle for {IDLE_TIMEOUT_S} s before the FIN: {l}"
        );
    }
    Outcome {
        agent,
        leaks,
        ss,
        context,
    }
}

/// The leak of local port `lport`.
fn lport(leak: &Value) -> u16 {
    leak["lport"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("lport")
}

/// Ground truth for "which one is idle": ss's `lastsnd` of the idle
/// socket (last data sent in the warm-up) exceeds every other's by most of
/// the 300 ms pause between warm-up and requests. And the agent's own
/// clock agrees: every other socket's last checkout came after the idle
/// one's (RFC 3339 UTC times of one width compare as strings).
fn assert_idle_one(outcome: &Outcome, idle: &Value) {
    for l in &outcome.leaks {
        if lport(l) != lport(idle) {
            let (theirs, idle_ts) = (&l["last_use"]["ts"], &idle["last_use"]["ts"]);
            assert!(
                theirs.as_str() > idle_ts.as_str(),
                "checked out at {theirs}, before the idle one ({idle_ts})\n{}",
                outcome.context
            );
        }
    }
    let lastsnd = |port: u16| {
        outcome
            .ss
            .iter()
            .find(|s| s.lport == port)
            .map(|s| s.lastsnd_ms)
            .expect("the socket in ss")
    };
    let idle_lastsnd = lastsnd(lport(idle));
    for l in &outcome.leaks {
        if lport(l) != lport(idle) {
            assert!(
                idle_lastsnd >= lastsnd(lport(l)) + 150,
                "ss: the socket the agent calls idle ({}) sent last {idle_lastsnd} ms ago, \
                 not well before {} ({} ms ago)\n{}",
                lport(idle),
                lport(l),
                lastsnd(lport(l)),
                outcome.context
            );
        }
    }
}

/// Go: `database/sql` + go-sql-driver/mysql, pool of 4 warmed by
/// main.initDB, three transactions forgotten by main.update.
/// A forgotten transaction's last use: checked out by the warm-up, then by
/// update() (300 ms after it), which the balancer's FIN followed
/// [`IDLE_TIMEOUT_S`] later.
fn assert_forgotten_checkout(leak: &Value) {
    let last = &leak["last_use"];
    let before_fin = last["before_fin_ms"].as_f64().expect("before_fin_ms");
    assert!(
        (1000.0..5000.0).contains(&before_fin),
        "checked out about {IDLE_TIMEOUT_S} s before the FIN: {leak}"
    );
    assert!(
        last["checkouts"].as_u64().is_some_and(|c| c >= 2),
        "checked out by the warm-up, then by update(): {leak}"
    );
}

#[test]
fn go_pool_behind_haproxy_leaks_three_forgotten_transactions_and_one_idle_connection() {
    let tmp = TempDir::new("pool-story-go");
    let bin = build_go_fixture(&tmp);
    let upstream = Upstream::start();
    let state_file = TempPath::new("pool-story-go-state");
    let state = state_file.arg();
    // Leak events only: the agent's default, production mode.
    let mut args = LEAK_AFTER.to_vec();
    args.extend(["--events", "leak,summary", "--state-file", &state]);
    let agent = Agent::start(&args);
    let mut service = Peer::spawn({
        let mut c = Command::new(&bin);
        c.arg(format!("127.0.0.1:{}", upstream.port()));
        c
    });
    let pid = service.pid();
    assert_eq!(service.expect("pid"), pid.to_string());
    service.expect("warmed");
    service.expect("ready");

    let outcome = four_leaks(agent, &upstream, pid);
    let context = &outcome.context;
    // Where the story's one log line must point: the warm-up's db.Conn(),
    // update()'s db.Begin() (which Go inlines into main.update: the frame
    // is still main.update's, at main.go), and their calls in main().
    let conn_line = go_line("c, err := db.Conn(ctx)");
    let begin_line = go_line("tx, err := db.Begin()");
    let init_call = go_line("if err := initDB(");
    let update_call = go_line("if err := update(i)");
    for l in &outcome.leaks {
        let origin = functions(&l["origin"]["stack"]);
        assert!(
            has(&origin, "main.initDB") && has(&origin, "main.main"),
            "every connection was opened by the warm-up: origin stack {origin:?}\n{l}"
        );
        assert_frame_at(&l["origin"]["stack"], "main.initDB", conn_line, l);
        assert_frame_at(&l["origin"]["stack"], "main.main", init_call, l);
        assert!(
            l["message"].as_str().is_some_and(
                |m| m.contains(&format!("opened by main.initDB (main.go:{conn_line})"))
            ),
            "{l}"
        );
    }
    let (forgotten, idle): (Vec<&Value>, Vec<&Value>) = outcome
        .leaks
        .iter()
        .partition(|l| has(&functions(&l["last_use"]["stack"]), "main.update"));
    assert_eq!(
        forgotten.len(),
        3,
        "3 last used by main.update (the forgotten transactions)\n{context}"
    );
    assert_eq!(idle.len(), 1, "1 idle in the pool\n{context}");
    for l in &forgotten {
        let last = &l["last_use"];
        let stack = functions(&last["stack"]);
        assert!(has(&stack, "main.main"), "last use stack {stack:?}\n{l}");
        assert!(!has(&stack, "main.initDB"), "last use stack {stack:?}\n{l}");
        assert_frame_at(&last["stack"], "main.update", begin_line, l);
        assert_frame_at(&last["stack"], "main.main", update_call, l);
        // The story's punch line.
        let punch = format!("last used by main.update (main.go:{begin_line})");
        assert!(
            l["message"].as_str().is_some_and(|m| m.contains(&punch)),
            "the message must say {punch:?}: {}",
            l["message"]
        );
        assert_forgotten_checkout(l);
    }
    let idle = idle[0];
    let stack = functions(&idle["last_use"]["stack"]);
    assert!(
        has(&stack, "main.initDB"),
        "the idle connection was last used by the warm-up: {stack:?}\n{idle}"
    );
    assert_frame_at(&idle["last_use"]["stack"], "main.initDB", conn_line, idle);
    let line = format!("last used by main.initDB (main.go:{conn_line})");
    assert!(
        idle["message"].as_str().is_some_and(|m| m.contains(&line)),
        "the message must say {line:?}: {}",
        idle["message"]
    );
    assert_idle_one(&outcome, idle);

    // `tcptrace leaks`: the forgotten transactions are one group of 3,
    // apart from the idle connection.
    let groups = wait_for_groups(&state, pid, 4, &outcome.agent);
    for g in &groups {
        eprintln!(
            "group of {}: last use {:?}",
            g["count"],
            strings(&g["last_use"]["stack"])
        );
    }
    let report = || {
        groups
            .iter()
            .map(|g| format!("{g:#}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let names = |g: &Value, f: &str| {
        strings(&g["last_use"]["stack"])
            .iter()
            .any(|s| s.contains(f))
    };
    let update = groups
        .iter()
        .find(|g| names(g, "main.update"))
        .unwrap_or_else(|| panic!("no group last used by main.update:\n{}", report()));
    assert_eq!(update["count"], 3, "{}", report());
    assert!(names(update, "main.main"), "{}", report());
    assert!(
        names(update, &format!("(main.go:{begin_line})")),
        "main.update at main.go:{begin_line}: {}",
        report()
    );
    assert_eq!(update["origin"], "connect", "{}", report());
    assert!(
        strings(&update["stack"])
            .iter()
            .any(|s| s.contains("main.initDB")),
        "opened by the warm-up: {}",
        report()
    );
    let rest: Vec<&Value> = groups.iter().filter(|g| !names(g, "main.update")).collect();
    assert_eq!(rest.len(), 1, "the idle connection's group: {}", report());
    assert_eq!(rest[0]["count"], 1, "{}", report());
    assert!(names(rest[0], "main.initDB"), "{}", report());

    let stopped = outcome.agent.stop();
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
}

/// Python: SQLAlchemy 1.4's QueuePool of PyMySQL connections, pool of 4
/// warmed in a thread named "initdb", three connections forgotten in one
/// named "update". Python's frames are not in the native stack; the
/// thread that last used each socket is.
#[test]
fn python_pool_behind_haproxy_names_the_thread_of_the_last_checkout() {
    let upstream = Upstream::start();
    let state_file = TempPath::new("pool-story-py-state");
    let state = state_file.arg();
    // Every transition printed (the kernel sends each one): the other mode.
    let mut args = LEAK_AFTER.to_vec();
    args.extend(["--state-file", &state]);
    let agent = Agent::start(&args);
    let mut service = Peer::spawn({
        let mut c = Command::new("/usr/bin/python3");
        c.arg(fixtures().join("pool_story.py"))
            .args(["127.0.0.1", &upstream.port().to_string()])
            .env("PYTHONDONTWRITEBYTECODE", "1");
        c
    });
    let pid = service.pid();
    assert_eq!(service.expect("pid"), pid.to_string());
    let initdb: u64 = service.expect("initdb tid").parse().expect("tid");
    service.expect("warmed");
    let update: u64 = service.expect("update tid").parse().expect("tid");
    service.expect("ready");

    let outcome = four_leaks(agent, &upstream, pid);
    let context = &outcome.context;
    for l in &outcome.leaks {
        let origin = &l["origin"];
        assert_eq!(origin["tid"], initdb, "opened by the warm-up thread: {l}");
        assert_eq!(origin["comm"], "initdb", "{l}");
    }
    let by_comm = |comm: &str| -> Vec<&Value> {
        outcome
            .leaks
            .iter()
            .filter(|l| l["last_use"]["comm"] == comm)
            .collect()
    };
    let forgotten = by_comm("update");
    assert_eq!(
        forgotten.len(),
        3,
        "3 last used by thread update\n{context}"
    );
    for l in &forgotten {
        let last = &l["last_use"];
        assert_eq!(last["tid"], update, "{l}");
        assert_forgotten_checkout(l);
        // CPython keeps no frame pointers: unwound from its CFI, the
        // native stack is whole, through the interpreter's loop to the
        // thread's entry.
        assert_eq!(last["unwind"], "cfi", "{l}");
        assert_eq!(last["truncated"], false, "{l}");
        let native = functions(&last["stack"]);
        assert!(
            native.iter().any(|f| f == "_PyEval_EvalFrameDefault"),
            "{native:?}\n{l}"
        );
    }
    let idle = by_comm("initdb");
    assert_eq!(idle.len(), 1, "1 last used by thread initdb\n{context}");
    assert_eq!(idle[0]["last_use"]["tid"], initdb, "{}", idle[0]);
    assert_idle_one(&outcome, idle[0]);

    // `tcptrace leaks` shows all 4, however their native stacks group.
    let groups = wait_for_groups(&state, pid, 4, &outcome.agent);
    for g in &groups {
        eprintln!(
            "group of {}: last use by {} {:?}",
            g["count"],
            g["last_use"]["comm"],
            strings(&g["last_use"]["stack"])
        );
    }
    for g in &groups {
        assert_eq!(g["origin"], "connect", "{g:#}");
        assert!(g["last_use"].is_object(), "{g:#}");
    }
    let stopped = outcome.agent.stop();
    assert!(stopped.status.success(), "{:?}", stopped.stderr);
}
