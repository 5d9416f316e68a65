//! Harness for the integration tests: the real agent as a child process,
//! real peer processes, real network namespaces. Everything started here is
//! stopped and removed on drop, so a failing test leaves nothing behind.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `tcptrace-peer` test program, for integration tests.
#[macro_export]
macro_rules! peer_bin {
    () => {
        env!("CARGO_BIN_EXE_tcptrace-peer")
    };
}

/// The agent binary: `$TCPTRACE_BIN` (set by `cargo xtask test`), else the
/// debug build in the workspace's target directory.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TCPTRACE_BIN") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tcptrace");
    assert!(
        p.is_file(),
        "agent binary {} not found: run `cargo xtask test`",
        p.display()
    );
    p
}

/// Calls `probe` every 20 ms until it returns `Some`, for at most
/// `timeout`; on timeout panics with `what` and `context()`.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The children of `pid`'s main thread (the agent's: its namespace
/// helper), from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .expect("children")
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect()
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: plain syscall; errors (already gone) are fine to ignore.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Lines a child writes, collected by a background thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, stream: impl std::io::Read + Send + 'static) {
        let lines = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lines.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }

    fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Records the agent reported lost so far (the largest `lost_total` of its
/// `lost` events): the kernel may skip a program run when a softirq nests in
/// another BPF program on the same CPU, and a test that counts events must
/// allow for what the agent says it lost, and no more.
pub fn lost_total(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| e["event"] == "lost")
        .filter_map(|e| e["lost_total"].as_u64())
        .max()
        .unwrap_or(0)
}

/// A loopback TCP port free right now (for a server the test starts next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A running agent (`--format json`).
pub struct Agent {
    child: Child,
    stdout: Lines,
    stderr: Lines,
}

/// What a stopped agent left behind.
pub struct Stopped {
    /// How it exited.
    pub status: ExitStatus,
    /// Parsed stdout lines.
    pub events: Vec<Value>,
    /// stderr lines.
    pub stderr: Vec<String>,
}

/// Every event but `time_wait` (the agent's default is leaks and summaries).
pub const ALL_EVENTS: &str = "state-change,close-wait,leak,port-pressure,summary";

impl Agent {
    /// Starts the agent with `args` and waits until it logs `ready`. Unless
    /// `args` name a `--state-file`, the agent writes none (tests run
    /// agents in parallel and must not share /run/tcptrace). Unless they
    /// choose `--events` (or a `--config` may), it prints [`ALL_EVENTS`]:
    /// the tests look at every line. Its log level is `info`, or
    /// `$TCPTRACE_TEST_LOG` (e.g. `debug`, for a failure's dump).
    pub fn start(args: &[&str]) -> Agent {
        let no_state: &[&str] = if args.contains(&"--state-file") {
            &[]
        } else {
            &["--state-file", "none"]
        };
        let all_events: &[&str] = if args.contains(&"--events") || args.contains(&"--config") {
            &[]
        } else {
            &["--events", ALL_EVENTS]
        };
        let mut child = Command::new(agent_bin())
            .arg("--format")
            .arg("json")
            .args(args)
            .args(no_state)
            .args(all_events)
            .env(
                "RUST_LOG",
                std::env::var("TCPTRACE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stdout = Lines::default();
        let stderr = Lines::default();
        stdout.collect(child.stdout.take().expect("piped stdout"));
        stderr.collect(child.stderr.take().expect("piped stderr"));
        let agent = Agent {
            child,
            stdout,
            stderr,
        };
        agent.wait_stderr("ready");
        agent
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_stderr(&self, needle: &str) {
        poll(
            &format!("{needle:?} on the agent's stderr"),
            TIMEOUT,
            || {
                self.stderr
                    .snapshot()
                    .iter()
                    .any(|l| l.contains(needle))
                    .then_some(())
            },
            || self.dump(),
        );
    }

    /// The JSON lines so far.
    pub fn events(&self) -> Vec<Value> {
        parse(&self.stdout.snapshot())
    }

    /// Polls the output until `done` holds; panics with a dump on timeout.
    pub fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        poll(
            what,
            TIMEOUT,
            || Some(self.events()).filter(|events| done(events)),
            || self.dump(),
        )
    }

    /// Everything the agent printed, for failure messages.
    pub fn dump(&self) -> String {
        dump_of(&self.stdout, &self.stderr)
    }

    /// SIGTERM, then waits for the exit and the end of its output.
    pub fn stop(mut self) -> Stopped {
        kill(self.pid(), libc::SIGTERM);
        let Agent {
            child,
            stdout,
            stderr,
        } = &mut self;
        let status = poll(
            "the agent to exit after SIGTERM",
            TIMEOUT,
            || child.try_wait().expect("wait for the agent"),
            || dump_of(stdout, stderr),
        );
        // Let the reader threads see EOF.
        thread::sleep(Duration::from_millis(100));
        Stopped {
            status,
            events: self.events(),
            stderr: self.stderr.snapshot(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dump_of(stdout: &Lines, stderr: &Lines) -> String {
    format!(
        "--- agent stdout ---\n{}\n--- agent stderr ---\n{}",
        stdout.snapshot().join("\n"),
        stderr.snapshot().join("\n")
    )
}

fn parse(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Runs a command to completion and returns (exit code, stdout, stderr).
pub fn run_to_end(cmd: &mut Command) -> (Option<i32>, String, String) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `tcptrace-peer` process, killed on drop.
pub struct Peer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Peer {
    /// Starts `cmd` (a peer command line) with piped stdin/stdout.
    pub fn spawn(mut cmd: Command) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Peer {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The peer's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line starting with `word` and returns the rest.
    pub fn expect(&mut self, word: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if let Some(rest) = line.strip_prefix(word) {
                        return rest.trim().to_string();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("peer never printed {word:?}; it printed {:?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "peer exited ({status:?}) before printing {word:?}; it printed {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Writes `text` to the peer's stdin.
    pub fn send_text(&mut self, text: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(text.as_bytes());
            let _ = stdin.flush();
        }
    }

    /// Waits for the next line starting with any of `words`; returns it whole.
    pub fn expect_any(&mut self, words: &[&str]) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if words.iter().any(|w| line.starts_with(w)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "peer never printed any of {words:?}; it printed {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Sends one line to the peer's stdin.
    pub fn send_line(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin);
            let _ = stdin.flush();
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tcptrace-peer` command, optionally inside network namespace `netns`.
pub fn peer_cmd(peer_bin: &str, netns: Option<&Netns>, args: &[&str]) -> Command {
    match netns {
        None => {
            let mut c = Command::new(peer_bin);
            c.args(args);
            c
        }
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, peer_bin]).args(args);
            c
        }
    }
}

/// A listening server peer: its process and port.
pub struct Server {
    /// The process.
    pub peer: Peer,
    /// The port it listens on.
    pub port: u16,
}

/// Starts a server peer on `addr` (port 0) that closes its accepted socket
/// only when told (`Peer::send_line`), so the client's FIN_WAIT2 and the
/// server's CLOSE_WAIT can be observed before the server's FIN.
pub fn start_server(peer_bin: &str, netns: Option<&Netns>, addr: &str) -> Server {
    let mut peer = Peer::spawn(peer_cmd(
        peer_bin,
        netns,
        &["server", addr, "--close-on-stdin"],
    ));
    let port = peer.expect("listening").parse().expect("port number");
    Server { peer, port }
}

/// A connected client peer: its process and local port.
pub struct Client {
    /// The process.
    pub peer: Peer,
    /// Its local port.
    pub port: u16,
}

/// Connects a client peer to `addr`; waits until it has connected.
pub fn start_client(peer_bin: &str, netns: Option<&Netns>, addr: &str) -> Client {
    let mut peer = Peer::spawn(peer_cmd(peer_bin, netns, &["client", addr]));
    let local = peer.expect("connected");
    Client {
        peer,
        port: port_of(&local),
    }
}

/// The port of `addr:port` or `[v6]:port`.
pub fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {endpoint:?}"))
}

/// The `state_change` lines of one socket, identified by its ports, in order.
/// A client's first line (CLOSE -> SYN_SENT) has local port 0: the kernel
/// picks the ephemeral port right after.
pub fn socket_lines(events: &[Value], lport: u16, rport: u16) -> Vec<Value> {
    let Some(sk) = events
        .iter()
        .find(|e| e["event"] == "state_change" && e["lport"] == lport && e["rport"] == rport)
        .map(|e| e["sk"].clone())
    else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| {
            e["event"] == "state_change"
                && e["sk"] == sk
                && e["rport"] == rport
                && (e["lport"] == lport || e["lport"] == 0)
        })
        .cloned()
        .collect()
}

/// True when the socket `lport -> rport` has reached `state`.
pub fn reached(events: &[Value], lport: u16, rport: u16, state: &str) -> bool {
    socket_lines(events, lport, rport)
        .iter()
        .any(|e| e["new"] == state)
}

/// The `new` states of `lines`.
pub fn new_states(lines: &[Value]) -> Vec<String> {
    lines
        .iter()
        .map(|e| e["new"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Checks a socket's life: its `new` states are exactly `expected`, each
/// line continues the previous one, durations are known and non-negative
/// after the first line, and every line has the given family, addresses,
/// ports (local port 0 allowed on CLOSE -> SYN_SENT) and netns.
#[allow(clippy::too_many_arguments)]
pub fn assert_life(
    lines: &[Value],
    expected: &[&str],
    first_old: &[&str],
    family: &str,
    local: (&str, u16),
    remote: (&str, u16),
    netns: u64,
    context: &str,
) {
    let news = new_states(lines);
    assert_eq!(
        news, expected,
        "states of {local:?} -> {remote:?}\n{context}"
    );
    assert!(
        first_old.contains(&lines[0]["old"].as_str().unwrap_or("?")),
        "first transition {} not from {first_old:?}\n{context}",
        lines[0]
    );
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            assert_eq!(
                line["old"],
                lines[i - 1]["new"],
                "broken chain at {line}\n{context}"
            );
            let ms = line["prev_state_ms"].as_f64();
            assert!(
                ms.is_some_and(|ms| ms >= 0.0),
                "duration unknown or negative: {line}\n{context}"
            );
        }
        assert_eq!(line["family"], family, "{line}");
        assert_eq!(line["laddr"], local.0, "{line}");
        assert_eq!(line["raddr"], remote.0, "{line}");
        assert_eq!(line["rport"], remote.1, "{line}");
        let lport_ok = line["lport"] == local.1 || (line["old"] == "CLOSE" && line["lport"] == 0);
        assert!(lport_ok, "local port of {line}, expected {}", local.1);
        assert_eq!(line["netns"], netns, "{line}");
        assert_eq!(line["schema"], 2, "{line}");
        assert!(
            line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }
}

/// The client socket's expected life.
pub const CLIENT_LIFE: [&str; 5] = ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"];
/// The accepted server socket's expected life.
pub const SERVER_LIFE: [&str; 5] = ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"];

/// Inode of this process's network namespace.
pub fn own_netns() -> u64 {
    std::fs::metadata("/proc/self/ns/net")
        .expect("stat /proc/self/ns/net")
        .ino()
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace created for one test, deleted on drop.
pub struct Netns {
    /// Its name under /run/netns.
    pub name: String,
}

fn ip(args: &[&str]) {
    let (code, _, err) = run_to_end(Command::new("ip").args(args));
    assert_eq!(code, Some(0), "ip {} failed: {err}", args.join(" "));
}

impl Netns {
    fn create(name: String) -> Netns {
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Inode of the namespace.
    pub fn inode(&self) -> u64 {
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("stat the netns")
            .ino()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so both.
        let _ = run_to_end(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Two namespaces joined by a veth pair: `a` has 198.18.N.1, `b` 198.18.N.2
/// (the benchmarking range, private to these namespaces).
pub struct NetnsPair {
    /// Server side.
    pub a: Netns,
    /// Client side.
    pub b: Netns,
    /// Address of `a`.
    pub addr_a: String,
    /// Address of `b`.
    pub addr_b: String,
}

/// A namespace of its own (loopback up), named uniquely for this process
/// and call.
pub fn netns() -> Netns {
    let n = NETNS_SEQ.fetch_add(1, Ordering::SeqCst);
    Netns::create(format!("tt{}{n}s", std::process::id() % 100_000))
}

/// Creates a [`NetnsPair`] with names unique to this process and call.
pub fn netns_pair() -> NetnsPair {
    let n = NETNS_SEQ.fetch_add(1, Ordering::SeqCst);
    let tag = format!("{}{}", std::process::id() % 100_000, n);
    let a = Netns::create(format!("tt{tag}a"));
    let b = Netns::create(format!("tt{tag}b"));
    let (va, vb) = (format!("tt{tag}va"), format!("tt{tag}vb"));
    ip(&[
        "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns", &b.name,
    ]);
    let subnet = 1 + (std::process::id() + n) % 250;
    let addr_a = format!("198.18.{subnet}.1");
    let addr_b = format!("198.18.{subnet}.2");
    ip(&[
        "-n",
        &a.name,
        "addr",
        "add",
        &format!("{addr_a}/24"),
        "dev",
        &va,
    ]);
    ip(&[
        "-n",
        &b.name,
        "addr",
        "add",
        &format!("{addr_b}/24"),
        "dev",
        &vb,
    ]);
    ip(&["-n", &a.name, "link", "set", &va, "up"]);
    ip(&["-n", &b.name, "link", "set", &vb, "up"]);
    NetnsPair {
        a,
        b,
        addr_a,
        addr_b,
    }
}

/// `host:port` with brackets for IPv6.
pub fn endpoint(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One full connection between a server and a client peer.
pub struct Pair {
    /// The server (its process has exited by the time this is returned).
    pub server: Server,
    /// The client (still running, waiting on stdin).
    pub client: Client,
}

/// With `agent` running, plays one connection: a server on `server_host`
/// (in `server_ns`), a client (in `client_ns`) that connects and closes
/// first; once the agent has shown the client in FIN_WAIT2 and the server
/// in CLOSE_WAIT, the server closes; returns when both sockets reached
/// CLOSE in the agent's output. `watch` is false when the agent's filters
/// hide one of the sockets: then the helper waits on the peers alone.
pub fn play_pair(
    peer_bin: &str,
    agent: &Agent,
    server_ns: Option<&Netns>,
    client_ns: Option<&Netns>,
    server_host: &str,
    watch: bool,
) -> Pair {
    let mut server = start_server(peer_bin, server_ns, &endpoint(server_host, 0));
    let client = start_client(peer_bin, client_ns, &endpoint(server_host, server.port));
    server.peer.expect("eof");
    let (sp, cp) = (server.port, client.port);
    if watch {
        agent.wait_for("client FIN_WAIT2 and server CLOSE_WAIT", |ev| {
            reached(ev, cp, sp, "FIN_WAIT2") && reached(ev, sp, cp, "CLOSE_WAIT")
        });
    }
    server.peer.send_line();
    server.peer.expect("done");
    if watch {
        agent.wait_for("both sockets to CLOSE", |ev| {
            reached(ev, cp, sp, "CLOSE") && reached(ev, sp, cp, "CLOSE")
        });
    }
    Pair { server, client }
}

/// Asserts both sockets of `pair` lived exactly as the kernel made them.
pub fn assert_pair(
    events: &[Value],
    pair: &Pair,
    family: &str,
    (server_host, client_host): (&str, &str),
    (server_netns, client_netns): (u64, u64),
) {
    let (sp, cp) = (pair.server.port, pair.client.port);
    let dump = || {
        events
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let client = socket_lines(events, cp, sp);
    assert!(!client.is_empty(), "no client socket lines\n{}", dump());
    assert_life(
        &client,
        &CLIENT_LIFE,
        &["CLOSE"],
        family,
        (client_host, cp),
        (server_host, sp),
        client_netns,
        &dump(),
    );
    for line in &client {
        assert_eq!(line["pid"], pair.client.peer.pid(), "client owner: {line}");
        assert!(
            line["fd"].as_i64().is_some_and(|fd| fd >= 3),
            "client fd: {line}"
        );
        assert_eq!(line["comm"], "tcptrace-peer", "{line}");
        assert!(
            line["ctx_pid"].is_u64() && line["ctx_tid"].is_u64(),
            "{line}"
        );
    }
    let server = socket_lines(events, sp, cp);
    assert!(!server.is_empty(), "no server socket lines\n{}", dump());
    assert_life(
        &server,
        &SERVER_LIFE,
        &["LISTEN", "NEW_SYN_RECV"],
        family,
        (server_host, sp),
        (client_host, cp),
        server_netns,
        &dump(),
    );
    // Accept happened before the server closed: the last two transitions
    // (in the server's close() and after) know their owner.
    for line in &server[3..] {
        assert_eq!(line["pid"], pair.server.peer.pid(), "server owner: {line}");
        assert!(
            line["fd"].as_i64().is_some_and(|fd| fd >= 3),
            "server fd: {line}"
        );
    }
}

/// Compiles the C fixture `tests/fixtures/NAME.c` (frame pointers, debug
/// info: what the agent's stack walk and symbolizer need) into
/// `target/fixtures/` (a build product, not /tmp litter), once per test
/// process, and returns the binary. Each process compiles to its own name
/// and renames, so parallel test binaries never see a half-written file.
pub fn fixture(name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("../target"), PathBuf::from)
        .join("fixtures");
    let bin = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|n| n == name) {
        std::fs::create_dir_all(&dir).expect("fixture dir");
        let src = root.join("fixtures").join(format!("{name}.c"));
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let (code, _, err) = run_to_end(
            Command::new("cc")
                .args(["-O0", "-g", "-fno-omit-frame-pointer", "-Wall", "-o"])
                .arg(&tmp)
                .arg(&src),
        );
        assert_eq!(code, Some(0), "compiling {}: {err}", src.display());
        std::fs::rename(&tmp, &bin).expect("install the fixture");
        built.push(name.to_string());
    }
    bin
}

/// A file path in the temporary directory, removed on drop (a test that
/// fails leaves nothing behind).
pub struct TempPath(pub PathBuf);

impl TempPath {
    /// `$TMPDIR/tcptrace-TAG-PID-N.json`, unique within the test run.
    pub fn new(tag: &str) -> Self {
        Self::named(tag, "json")
    }

    /// `$TMPDIR/tcptrace-TAG-PID-N.EXT`, unique within the test run.
    pub fn named(tag: &str, ext: &str) -> Self {
        Self(std::env::temp_dir().join(format!(
            "tcptrace-{tag}-{}-{}.{ext}",
            std::process::id(),
            unique()
        )))
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A number no other call in this process gets: tests run in parallel.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A directory in the temporary directory, removed with its contents on
/// drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// `$TMPDIR/tcptrace-TAG-PID-N/`, created, unique within the test run.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tcptrace-{tag}-{}-{}",
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fixture command, optionally inside network namespace `netns`.
pub fn fixture_cmd(bin: &std::path::Path, netns: Option<&Netns>, args: &[&str]) -> Command {
    match netns {
        None => {
            let mut c = Command::new(bin);
            c.args(args);
            c
        }
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(bin).args(args);
            c
        }
    }
}

/// `ss -tanpH state close-wait` in `netns` (or here): one line per socket.
pub fn ss_close_wait(netns: Option<&Netns>) -> Vec<String> {
    let mut cmd = match netns {
        None => Command::new("ss"),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name, "ss"]);
            c
        }
    };
    let (code, out, err) = run_to_end(cmd.args(["-tanpH", "state", "close-wait"]));
    assert_eq!(code, Some(0), "ss failed: {err}");
    out.lines().map(str::to_string).collect()
}

/// The `(pid, fd)` pairs in an `ss -p` users column.
pub fn ss_users(line: &str) -> Vec<(u32, i32)> {
    line.split("pid=")
        .skip(1)
        .filter_map(|rest| {
            let (pid, rest) = rest.split_once(",fd=")?;
            let fd: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((pid.parse().ok()?, fd.parse().ok()?))
        })
        .collect()
}

/// A real `redis-server` on loopback that closes clients idle for
/// `timeout` seconds: an upstream that hangs up, as load balancers do.
pub struct Redis {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Redis {
    /// Starts it on a free port and waits until it accepts connections.
    pub fn start(timeout_secs: u32) -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--timeout", &timeout_secs.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let redis = Redis { child, port };
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server never listened on {port}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        redis
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `leak` lines of sockets with local port `port`.
pub fn leaks_on_port(events: &[Value], port: u16) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["event"] == "leak" && e["lport"] == port)
        .cloned()
        .collect()
}

/// A `leaky_server` (in `server_ns`, on `host`) after `n` clients (in
/// `client_ns`) connected and hung up: its process and port, and the
/// client process (exited, or still there for its pid).
pub struct Leaked {
    /// The leaking server.
    pub server: Peer,
    /// Its port.
    pub port: u16,
    /// The client (exited).
    pub client: Peer,
}

pub fn leaky_server(
    peer_bin: &str,
    server_ns: Option<&Netns>,
    client_ns: Option<&Netns>,
    host: &str,
    n: usize,
    mode: Option<&str>,
) -> Leaked {
    let bin = fixture("leaky_server");
    let count = n.to_string();
    let mut args = vec![host, "0", count.as_str()];
    args.extend(mode);
    let mut server = Peer::spawn(fixture_cmd(&bin, server_ns, &args));
    let port: u16 = server.expect("listening").parse().expect("port");
    let target = endpoint(host, port);
    let mut client_args = vec![
        "client",
        target.as_str(),
        "--exit",
        "--count",
        count.as_str(),
    ];
    if n > 1 {
        // Many connections: no payload, so each costs one round trip.
        client_args.push("--no-data");
    }
    let mut client = Peer::spawn(peer_cmd(peer_bin, client_ns, &client_args));
    client.expect("done");
    Leaked {
        server,
        port,
        client,
    }
}

/// An HTTP response: status code, headers (lower-case names), body.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port`, read to the end (the server
/// closes).
pub fn http(port: u16, method: &str, path: &str, accept: Option<&str>) -> Response {
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    std::io::Write::write_fmt(
        &mut s,
        format_args!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{accept}User-Agent: test\r\n\r\n"
        ),
    )
    .expect("send the request");
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut s, &mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The agent's `/metrics` page on `port`.
pub fn scrape(port: u16) -> String {
    let r = http(port, "GET", "/metrics", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// The value of the sample named exactly `series` (name and labels).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The function names of a stack in an event (`origin.stack`,
/// `last_use.stack`: `[{function, ...}, ...]`), innermost first.
pub fn functions(stack: &Value) -> Vec<String> {
    stack
        .as_array()
        .map(|frames| {
            frames
                .iter()
                .filter_map(|f| f["function"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
