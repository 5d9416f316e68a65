//! Last use: a leak names the code that used the socket last (the stack
//! walked at its last checkout, the first send/recv after an idle gap), not
//! only the code that opened it, checked against real programs, their own
//! count of I/O calls, and `ss -tanpi` ground truth (owner, fd, `lastsnd`).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tcptrace_tests::{
    agent_bin, fixture, fixture_cmd, functions, leaks_on_port, poll, run_to_end, Agent, Peer,
    TIMEOUT,
};

/// Leak events only (the agent's default `--events`), leaks named quickly.
const LEAKS_ONLY: &[&str] = &["--leak-after", "500ms", "--events", "leak,summary"];

/// Milliseconds since the epoch of an RFC 3339 UTC time
/// (`2026-11-24T19:02:13.115021Z`).
fn epoch_ms(ts: &Value) -> f64 {
    ts.as_str()
        .and_then(parse_rfc3339)
        .unwrap_or_else(|| panic!("not an RFC 3339 UTC time: {ts}"))
}

fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let ymd: Vec<i64> = date
        .split('-')
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let hms: Vec<i64> = hms
        .split(':')
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    if ymd.len() != 3 || hms.len() != 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm).
    let (m, d) = (ymd[1], ymd[2]);
    let y = if m <= 2 { ymd[0] - 1 } else { ymd[0] };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    let frac: f64 = format!("0.{frac}").parse().ok()?;
    Some((secs as f64 + frac) * 1000.0)
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// A real upstream for `last_use`: accepts one connection on `host`,
/// (with `hello`, answers the greeting line with `OK`), reads the request
/// line, waits 150 ms and hangs up. `join` returns the request.
struct Upstream {
    port: u16,
    thread: Option<JoinHandle<Result<String, String>>>,
}

/// How long the upstream waits after the request before its FIN.
const FIN_DELAY: Duration = Duration::from_millis(150);

impl Upstream {
    fn start(host: &str, hello: bool) -> Upstream {
        let listener = TcpListener::bind((host, 0)).expect("bind the upstream");
        let port = listener.local_addr().expect("upstream address").port();
        let thread = thread::spawn(move || -> Result<String, String> {
            listener.set_nonblocking(true).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + TIMEOUT;
            let conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err("no connection came".into());
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(format!("accept: {e}")),
                }
            };
            let io = |e: std::io::Error| e.to_string();
            conn.set_nonblocking(false).map_err(io)?;
            conn.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
            let mut writer = conn.try_clone().map_err(io)?;
            let mut reader = BufReader::new(conn);
            let mut line = String::new();
            if hello {
                reader.read_line(&mut line).map_err(io)?;
                if line != "HELLO\n" {
                    return Err(format!("greeting {line:?}"));
                }
                writer.write_all(b"OK\n").map_err(io)?;
                line.clear();
            }
            reader.read_line(&mut line).map_err(io)?;
            thread::sleep(FIN_DELAY);
            // Dropping both handles closes the connection: the FIN.
            Ok(line)
        });
        Upstream {
            port,
            thread: Some(thread),
        }
    }

    /// Waits until the upstream read the request and hung up; returns it.
    fn join(&mut self) -> String {
        let t = self.thread.take().expect("joined once");
        t.join()
            .expect("upstream thread")
            .unwrap_or_else(|e| panic!("upstream: {e}"))
    }
}

/// A `last_use` client after its upstream hung up: the socket is in
/// CLOSE_WAIT, held on `fd`.
struct Client {
    peer: Peer,
    fd: i64,
    lport: u16,
    rport: u16,
    /// The fixture's own count of read()/write() calls on the socket.
    ios: u64,
}

/// Runs the `last_use` fixture against a fresh upstream on `host`.
fn leaky_client(host: &str, hello: bool) -> Client {
    let mut upstream = Upstream::start(host, hello);
    let bin = fixture("last_use");
    let port = upstream.port.to_string();
    let mut args = vec![host, port.as_str()];
    if hello {
        args.push("hello");
    }
    let mut peer = Peer::spawn(fixture_cmd(&bin, None, &args));
    let connected = peer.expect("connected");
    let (fd, lport) = connected.split_once(' ').expect("fd and port");
    let (fd, lport): (i64, u16) = (fd.parse().expect("fd"), lport.parse().expect("port"));
    let sent = peer.expect("sent");
    let ios = sent
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sent line {sent:?}"));
    assert_eq!(
        upstream.join(),
        "GET /last\n",
        "the request reached the upstream"
    );
    Client {
        peer,
        fd,
        lport,
        rport: upstream.port,
        ios,
    }
}

/// One socket as `ss -tanpiH state close-wait` shows it: its users and its
/// info line, and the wall clock (ms) just before and after ss ran.
struct SsSocket {
    users: Vec<(u32, i32)>,
    info: String,
    before_ms: f64,
    after_ms: f64,
}

impl SsSocket {
    /// An `ss -i` counter such as `lastsnd` (ms ago).
    fn field(&self, name: &str) -> Option<f64> {
        self.info
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':')?.parse().ok())
    }
}

/// Ground truth: the socket `lport -> rport` in CLOSE_WAIT, from ss.
fn ss_socket(lport: u16, rport: u16) -> SsSocket {
    let before_ms = now_ms();
    let (code, out, err) = run_to_end(Command::new("ss").args(["-tanpiH", "state", "close-wait"]));
    let after_ms = now_ms();
    assert_eq!(code, Some(0), "ss failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    let at = lines
        .iter()
        .position(|l| {
            !l.starts_with(char::is_whitespace)
                && l.contains(&format!(":{lport} "))
                && l.contains(&format!(":{rport} "))
        })
        .unwrap_or_else(|| panic!("ss does not show {lport} -> {rport} in CLOSE_WAIT:\n{out}"));
    let info = lines
        .get(at + 1)
        .filter(|l| l.starts_with(char::is_whitespace))
        .map_or_else(String::new, |l| l.to_string());
    SsSocket {
        users: tcptrace_tests::ss_users(lines[at]),
        info,
        before_ms,
        after_ms,
    }
}

/// Waits for the one leak event of the socket with local port `lport`.
fn the_leak(agent: &Agent, lport: u16) -> Value {
    let events = agent.wait_for("a leak on the client port", |ev| {
        !leaks_on_port(ev, lport).is_empty()
    });
    let leaks = leaks_on_port(&events, lport);
    assert_eq!(leaks.len(), 1, "one leak event per socket: {leaks:?}");
    leaks[0].clone()
}

/// The owner, the fd and the origin of a `last_use` client's leak, against
/// the fixture and ss.
fn assert_owner_and_origin(leak: &Value, client: &Client, host: &str) -> SsSocket {
    let pid = client.peer.pid();
    assert_eq!(leak["laddr"], host, "{leak}");
    assert_eq!(leak["rport"], client.rport, "{leak}");
    assert_eq!(leak["owner"].as_array().map(Vec::len), Some(1), "{leak}");
    assert_eq!(leak["owner"][0]["pid"], pid, "{leak}");
    assert_eq!(leak["owner"][0]["fd"], client.fd, "{leak}");
    let ss = ss_socket(client.lport, client.rport);
    assert_eq!(
        ss.users,
        vec![(pid, client.fd as i32)],
        "ss and the fixture disagree on the owner: {}",
        ss.info
    );
    let origin = &leak["origin"];
    assert_eq!(origin["syscall"], "connect", "{leak}");
    assert_eq!(origin["pid"], pid, "{leak}");
    assert_eq!(origin["fd"], client.fd, "{leak}");
    // Unwound from the kernel's copy of the stack (the default), whole.
    assert_eq!(origin["unwind"], "cfi", "{leak}");
    assert_eq!(origin["truncated"], false, "{leak}");
    let opened = functions(&origin["stack"]);
    for f in ["open_conn", "main"] {
        assert!(
            opened.iter().any(|g| g == f),
            "origin stack {opened:?} lacks {f}\n{leak}"
        );
    }
    ss
}

/// The whole check of a `last_use` client's leak, in JSON.
fn assert_last_use(leak: &Value, client: &Client, host: &str, hello: bool) {
    let ss = assert_owner_and_origin(leak, client, host);
    let pid = client.peer.pid();
    let lu = &leak["last_use"];
    assert!(lu.is_object(), "no last_use in\n{leak}");
    assert_eq!(lu["direction"], "send", "{leak}");
    assert!(
        lu["syscall"] == "write" || lu["syscall"].is_null(),
        "the last use was a write(): {leak}"
    );
    assert_eq!(lu["pid"], pid, "{leak}");
    assert_eq!(lu["tid"], pid, "one thread: {leak}");
    assert_eq!(lu["comm"], "last_use", "{leak}");
    assert_eq!(lu["unwind"], "cfi", "{leak}");
    assert_eq!(lu["truncated"], false, "{leak}");
    let used = functions(&lu["stack"]);
    for f in ["send_request", "main"] {
        assert!(
            used.iter().any(|g| g == f),
            "last_use stack {used:?} lacks {f}\n{leak}"
        );
    }
    assert!(
        !used.iter().any(|g| g == "open_conn"),
        "last_use stack {used:?} names open_conn: the origin's, not the last use's\n{leak}"
    );

    // Times: the checkout is the write, 200 ms after connect(), and at
    // least FIN_DELAY before the upstream's FIN.
    let ts = epoch_ms(&lu["ts"]);
    let opened = epoch_ms(&leak["origin"]["ts"]);
    assert!(
        ts - opened >= 150.0,
        "last use {ts} ms only {} ms after connect()\n{leak}",
        ts - opened
    );
    let before_fin = lu["before_fin_ms"].as_f64().expect("before_fin_ms");
    let min = FIN_DELAY.as_secs_f64() * 1000.0 - 20.0;
    assert!(
        (min..10_000.0).contains(&before_fin),
        "before_fin_ms {before_fin}: the upstream waited {FIN_DELAY:?} after the request\n{leak}"
    );
    let since = epoch_ms(&leak["since"]);
    assert!(
        (since - ts - before_fin).abs() < 5.0,
        "since - ts = {} ms, before_fin_ms {before_fin}\n{leak}",
        since - ts
    );
    // The write was also the last I/O.
    assert_eq!(lu["last_io_direction"], "send", "{leak}");
    let last_io = epoch_ms(&lu["last_io_ts"]);
    assert!(
        (last_io - ts).abs() < 1.0,
        "the checkout was the last I/O: ts {ts}, last_io_ts {last_io}\n{leak}"
    );
    let last_io_before_fin = lu["last_io_before_fin_ms"]
        .as_f64()
        .expect("last_io_before_fin_ms");
    assert!(
        (last_io_before_fin - before_fin).abs() < 1.0,
        "{last_io_before_fin} vs {before_fin}\n{leak}"
    );
    // Ground truth: the kernel's own time of the last data sent.
    let lastsnd = ss
        .field("lastsnd")
        .unwrap_or_else(|| panic!("no lastsnd in ss -i: {}", ss.info));
    let (lo, hi) = (ss.before_ms - lastsnd - 50.0, ss.after_ms - lastsnd + 50.0);
    assert!(
        (lo..=hi).contains(&last_io),
        "last_io_ts {last_io} ms, but ss says lastsnd:{lastsnd} (data last sent at {lo}..{hi} ms)\n{leak}"
    );

    // Counts: the fixture's own read()/write() calls on the socket; the
    // greeting (write, read) in open_conn() was one checkout, the request
    // 200 ms later another.
    assert_eq!(
        lu["ios"], client.ios,
        "the fixture made {} I/O calls\n{leak}",
        client.ios
    );
    let checkouts = lu["checkouts"].as_u64().expect("checkouts");
    if hello {
        // The greeting's reply could come later than the gap on a loaded
        // machine: one checkout more, never fewer.
        assert!(
            (2..=client.ios).contains(&checkouts),
            "{checkouts} checkouts\n{leak}"
        );
    } else {
        assert_eq!(checkouts, 1, "{leak}");
    }
}

/// A connection opened in open_conn() and last written in send_request(),
/// 200 ms later: the leak names both, apart.
#[test]
fn a_leak_names_the_function_that_used_the_socket_last() {
    let agent = Agent::start(LEAKS_ONLY);
    let client = leaky_client("127.0.0.1", false);
    let leak = the_leak(&agent, client.lport);
    assert_last_use(&leak, &client, "127.0.0.1", false);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// Every transition sent (the kernel sends origins rather than keeping
/// them), over IPv6.
#[test]
fn last_use_over_ipv6_with_every_transition() {
    let agent = Agent::start(&["--leak-after", "500ms"]);
    let client = leaky_client("::1", false);
    let leak = the_leak(&agent, client.lport);
    assert_eq!(leak["family"], "ipv6", "{leak}");
    assert_last_use(&leak, &client, "::1", false);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// open_conn() also uses the socket (a greeting and its reply) before the
/// pause: the leak names the later use, send_request(), not the first.
#[test]
fn the_last_checkout_wins_over_an_earlier_one() {
    let agent = Agent::start(LEAKS_ONLY);
    let client = leaky_client("127.0.0.1", true);
    let leak = the_leak(&agent, client.lport);
    assert_last_use(&leak, &client, "127.0.0.1", true);
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// `--last-use off`: `last_use` is null, the origin as before.
#[test]
fn last_use_off_leaves_the_origin_alone() {
    let mut args = LEAKS_ONLY.to_vec();
    args.extend(["--last-use", "off"]);
    let agent = Agent::start(&args);
    let client = leaky_client("127.0.0.1", false);
    let leak = the_leak(&agent, client.lport);
    assert!(
        leak.get("last_use").is_some_and(Value::is_null),
        "last_use must be there, and null\n{leak}"
    );
    assert_owner_and_origin(&leak, &client, "127.0.0.1");
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// An agent with `--format text`: its stdout lines as they come. Killed
/// on drop.
struct TextAgent {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl TextAgent {
    fn start(args: &[&str]) -> TextAgent {
        let mut child = Command::new(agent_bin())
            .args(["--format", "text", "--state-file", "none"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("piped stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("piped stderr")));
        let agent = TextAgent {
            child,
            stdout,
            stderr,
        };
        poll(
            "the text agent's ready line",
            TIMEOUT,
            || {
                agent
                    .stderr()
                    .iter()
                    .any(|l| l.contains("ready"))
                    .then_some(())
            },
            || agent.dump(),
        );
        agent
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn dump(&self) -> String {
        format!(
            "--- agent stdout ---\n{}\n--- agent stderr ---\n{}",
            self.stdout().join("\n"),
            self.stderr().join("\n")
        )
    }
}

impl Drop for TextAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The text line of a leak says who used the socket last before who
/// opened it.
#[test]
fn the_text_leak_line_names_the_last_use_before_the_origin() {
    let agent = TextAgent::start(&["--leak-after", "500ms", "--events", "leak"]);
    let client = leaky_client("127.0.0.1", false);
    let socket = format!(":{} -> ", client.lport);
    let line = poll(
        "a LEAK line for the client's socket",
        TIMEOUT,
        || {
            agent
                .stdout()
                .into_iter()
                .find(|l| l.contains(" LEAK ") && l.contains(&socket))
        },
        || agent.dump(),
    );
    let last = line
        .find("last used by")
        .unwrap_or_else(|| panic!("no \"last used by\" in\n{line}"));
    let clause = &line[last..line[last..].find(';').map_or(line.len(), |i| last + i)];
    // The innermost frame of the program's own: put(), the write()
    // wrapper's caller (a frame-pointer walk skips it; the CFI unwind,
    // the default, does not), called by send_request().
    assert!(
        clause.starts_with("last used by put"),
        "the last-use clause {clause:?} does not start with put\n{line}"
    );
    assert!(line.contains("<- send_request"), "{line}");
    let opened = line
        .find("opened by connect()")
        .unwrap_or_else(|| panic!("no \"opened by connect()\" in\n{line}"));
    assert!(last < opened, "last use after the origin in\n{line}");
    assert!(
        line[opened..].contains("open_conn"),
        "the origin clause does not name open_conn\n{line}"
    );
    let send = line.find("send_request").expect("send_request");
    let open = line.find("open_conn").expect("open_conn");
    assert!(send < open, "send_request not before open_conn in\n{line}");
    assert!(
        line.contains(&format!("pid {} (last_use)", client.peer.pid())),
        "{line}"
    );
}

/// A `busy_stream` server after its client streamed and hung up.
struct Busy {
    server: Peer,
    port: u16,
    fd: i64,
    messages: u64,
    reads: u64,
    writes: u64,
    max_gap_us: u64,
}

/// Messages the client streams, each a round trip.
const MESSAGES: u64 = 20_000;

fn busy_stream(host: &str) -> Busy {
    let bin = fixture("busy_stream");
    let mut server = Peer::spawn(fixture_cmd(&bin, None, &["server", host, "0"]));
    let port: u16 = server.expect("listening").parse().expect("port");
    let (p, n) = (port.to_string(), MESSAGES.to_string());
    let mut client = Peer::spawn(fixture_cmd(&bin, None, &["client", host, &p, &n]));
    client.expect("done");
    let read = server.expect("read");
    let counts: Vec<u64> = read
        .split_whitespace()
        .map(|n| n.parse().expect("a count"))
        .collect();
    assert_eq!(counts.len(), 4, "read line {read:?}");
    let fd = server.expect("leaked fd").parse().expect("fd");
    Busy {
        server,
        port,
        fd,
        messages: counts[0],
        reads: counts[1],
        writes: counts[2],
        max_gap_us: counts[3],
    }
}

/// A server answering 20 000 small requests back to back, never idle for
/// the checkout gap: one checkout, at its first read, and every I/O
/// counted; then it leaks the connection.
#[test]
fn a_busy_stream_is_one_checkout_with_every_io_counted() {
    let agent = Agent::start(&["--leak-after", "1s", "--events", "leak,summary"]);
    // The check needs a stream the kernel saw with no gap of 10 ms (the
    // default --last-use-gap) between two I/O calls: the server measures
    // an upper bound of each gap, and a run the machine paused for (two
    // shared CPUs) is played again, after a moment for the load to pass.
    let mut paused = Vec::new();
    let busy = loop {
        let busy = busy_stream("127.0.0.1");
        assert_eq!(busy.messages, MESSAGES, "every message read");
        if busy.max_gap_us < 9_500 {
            break busy;
        }
        paused.push(busy.max_gap_us);
        assert!(
            paused.len() < 6,
            "the machine paused the stream each time (longest gaps {paused:?} us)"
        );
        thread::sleep(Duration::from_millis(300));
    };
    let leak = the_leak(&agent, busy.port);
    let pid = busy.server.pid();
    assert_eq!(leak["owner"].as_array().map(Vec::len), Some(1), "{leak}");
    assert_eq!(leak["owner"][0]["pid"], pid, "{leak}");
    assert_eq!(leak["owner"][0]["fd"], busy.fd, "{leak}");
    let rport = leak["rport"].as_u64().and_then(|p| u16::try_from(p).ok());
    let ss = ss_socket(busy.port, rport.expect("rport"));
    assert_eq!(ss.users, vec![(pid, busy.fd as i32)], "{}", ss.info);
    assert_eq!(leak["origin"]["syscall"], "accept", "{leak}");
    let opened = functions(&leak["origin"]["stack"]);
    assert!(
        opened.iter().any(|f| f == "accept_stream"),
        "origin stack {opened:?}\n{leak}"
    );

    let lu = &leak["last_use"];
    assert!(lu.is_object(), "no last_use in\n{leak}");
    let context = format!(
        "server: {} messages, {} reads, {} writes, longest gap {} us \
         (earlier runs paused: {paused:?} us)\n{leak}",
        busy.messages, busy.reads, busy.writes, busy.max_gap_us
    );
    assert_eq!(lu["checkouts"], 1, "one walk, at the first read: {context}");
    let ios = lu["ios"].as_u64().expect("ios");
    assert!(ios >= busy.messages, "{ios} ios: {context}");
    // Every read and write the server made, and the read of the EOF at most.
    assert!(
        (busy.reads + busy.writes..=busy.reads + busy.writes + 1).contains(&ios),
        "{ios} ios: {context}"
    );
    assert_eq!(
        lu["direction"], "recv",
        "the checkout was a read: {context}"
    );
    assert!(
        lu["syscall"] == "read" || lu["syscall"].is_null(),
        "{context}"
    );
    assert_eq!(lu["pid"], pid, "{context}");
    assert_eq!(lu["comm"], "busy_stream", "{context}");
    let used = functions(&lu["stack"]);
    assert!(
        used.iter().any(|f| f == "read_messages"),
        "last_use stack {used:?} lacks read_messages: {context}"
    );
    assert!(
        !used.iter().any(|f| f == "accept_stream"),
        "last_use stack {used:?} is the origin's: {context}"
    );
    // The checkout opened the stream; the FIN came at its end.
    let before_fin = lu["before_fin_ms"].as_f64().expect("before_fin_ms");
    assert!(before_fin > 0.0, "{context}");
    let last_io_before_fin = lu["last_io_before_fin_ms"]
        .as_f64()
        .expect("last_io_before_fin_ms");
    assert!(last_io_before_fin < before_fin, "{context}");
    assert!(
        epoch_ms(&lu["last_io_ts"]) >= epoch_ms(&lu["ts"]),
        "{context}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success());
}

/// Unit check of the test's own time parser.
#[test]
fn rfc3339_parser() {
    let v = |s: &str| Value::String(s.into());
    assert_eq!(epoch_ms(&v("1970-01-01T00:00:00Z")), 0.0);
    assert_eq!(epoch_ms(&v("2000-03-01T00:00:01.5Z")), 951_868_801_500.0);
    assert!((epoch_ms(&v("2026-11-24T19:02:13.115021Z")) - 1_795_546_933_115.021).abs() < 0.01);
}
