//! Where event lines go: stdout, a file, a TCP collector. Each sink has a
//! bounded queue and its own writer thread, so a slow or dead collector can
//! stall neither the ring-buffer reader nor another sink; what a full queue
//! refuses is counted, never dropped silently.

use std::fmt;
use std::io::{self, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Default queue length per sink, in lines.
pub const DEFAULT_QUEUE: usize = 65_536;

/// A sink named on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkSpec {
    /// Standard output.
    Stdout,
    /// Append to a file; reopened on SIGHUP (logrotate).
    File(PathBuf),
    /// Newline-delimited JSON over TCP (Vector `socket`, Fluent Bit `tcp`,
    /// Logstash `json_lines`).
    Tcp(String),
    /// RFC 5424 syslog over UDP, one message per datagram.
    SyslogUdp(String),
    /// RFC 5424 syslog over TCP, octet-counting framing (RFC 6587).
    SyslogTcp(String),
    /// RFC 5424 syslog to a local datagram socket (`/dev/log`).
    SyslogUnix(PathBuf),
}

impl fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp://{a}"),
            Self::SyslogUdp(a) => write!(f, "syslog+udp://{a}"),
            Self::SyslogTcp(a) => write!(f, "syslog+tcp://{a}"),
            Self::SyslogUnix(p) => write!(f, "syslog+unix://{}", p.display()),
        }
    }
}

impl FromStr for SinkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdout" || s == "-" {
            return Ok(Self::Stdout);
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path, e.g. file:/var/log/tcptrace.json".into());
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        let host_port = |addr: &str, example: &str| -> Result<String, String> {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| format!("{s:?} needs a port, e.g. {example}"))?;
            if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(format!("{s:?} is not HOST:PORT, e.g. {example}"));
            }
            Ok(addr.to_string())
        };
        if let Some(addr) = s.strip_prefix("tcp://") {
            return host_port(addr, "tcp://127.0.0.1:9000").map(Self::Tcp);
        }
        if let Some(addr) = s.strip_prefix("syslog+udp://") {
            return host_port(addr, "syslog+udp://127.0.0.1:514").map(Self::SyslogUdp);
        }
        if let Some(addr) = s.strip_prefix("syslog+tcp://") {
            return host_port(addr, "syslog+tcp://127.0.0.1:601").map(Self::SyslogTcp);
        }
        if let Some(path) = s.strip_prefix("syslog+unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?} needs an absolute path, e.g. syslog+unix:///dev/log"
                ));
            }
            return Ok(Self::SyslogUnix(PathBuf::from(path)));
        }
        Err(format!(
            "unknown output {s:?}; expected stdout, file:PATH, tcp://HOST:PORT, \
             syslog+udp://HOST:PORT, syslog+tcp://HOST:PORT or syslog+unix:///dev/log"
        ))
    }
}

/// Counters of one sink, shared with its writer thread.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Lines refused because the queue was full.
    pub dropped: AtomicU64,
    /// Lines written.
    pub written: AtomicU64,
}

/// Lines handed over together: one allocation and one wakeup per batch,
/// shared by every sink (a sink that has room for only part of it keeps
/// the part that fits).
type Batch = Arc<Vec<String>>;

#[derive(Default)]
struct QueueState {
    /// Batches and the range of each this sink still has to write.
    batches: std::collections::VecDeque<(Batch, std::ops::Range<usize>)>,
    /// Lines in `batches`.
    lines: usize,
    /// No more batches will come.
    closed: bool,
    /// The writer is waiting for lines (worth a wakeup).
    idle: bool,
}

/// A sink's bounded queue, in lines. One lock and at most one wakeup per
/// batch: a wakeup per line cost the agent more than formatting the line.
struct LineQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
}

impl LineQueue {
    fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A writer thread that panicked leaves plain data behind: go on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues what fits of `batch`; returns how many lines did not fit.
    fn push(&self, batch: &Batch) -> usize {
        let mut st = self.lock();
        if st.closed {
            return batch.len();
        }
        // An empty queue takes a whole batch (the agent caps batches at a
        // few thousand lines): a burst to a destination that keeps up is
        // never cut because it came in one piece.
        let room = if st.lines == 0 {
            batch.len()
        } else {
            self.capacity.saturating_sub(st.lines)
        };
        let fits = batch.len().min(room);
        if fits > 0 {
            st.batches.push_back((Arc::clone(batch), 0..fits));
            st.lines += fits;
            if st.idle {
                st.idle = false;
                self.ready.notify_one();
            }
        }
        batch.len() - fits
    }

    /// Everything queued, waiting at most `timeout` for something; `None`
    /// once closed and empty.
    fn take(&self, timeout: Duration) -> Option<Vec<(Batch, std::ops::Range<usize>)>> {
        let mut st = self.lock();
        if st.batches.is_empty() && !st.closed {
            st.idle = true;
            st = self
                .ready
                .wait_timeout(st, timeout)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            st.idle = false;
        }
        if st.batches.is_empty() && st.closed {
            return None;
        }
        st.lines = 0;
        Some(st.batches.drain(..).collect())
    }

    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.ready.notify_one();
    }
}

struct Handle {
    spec: SinkSpec,
    queue: Arc<LineQueue>,
    stats: Arc<SinkStats>,
    thread: Option<JoinHandle<()>>,
}

/// Every configured sink.
pub struct Sinks {
    handles: Vec<Handle>,
    reopen: Arc<AtomicBool>,
    stdout_closed: Arc<AtomicBool>,
    /// Lines sent since the last [`Sinks::commit`].
    pending: Vec<String>,
}

impl Sinks {
    /// Starts a writer thread per sink; each queue holds `queue` lines.
    pub fn start(specs: &[SinkSpec], queue: usize) -> io::Result<Self> {
        let reopen = Arc::new(AtomicBool::new(false));
        let stdout_closed = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for spec in specs {
            let lines = Arc::new(LineQueue::new(queue));
            let stats = Arc::new(SinkStats::default());
            let writer: Box<dyn Writer> = match spec {
                SinkSpec::Stdout => Box::new(StdoutWriter {
                    out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
                    closed: stdout_closed.clone(),
                }),
                SinkSpec::File(path) => Box::new(FileWriter::open(path.clone(), reopen.clone())?),
                SinkSpec::Tcp(addr) => Box::new(TcpWriter::new(addr.clone(), Framing::Newline)),
                SinkSpec::SyslogTcp(addr) => {
                    Box::new(TcpWriter::new(addr.clone(), Framing::Syslog(Syslog::new())))
                }
                SinkSpec::SyslogUdp(addr) => Box::new(DatagramWriter::udp(addr.clone())),
                SinkSpec::SyslogUnix(path) => Box::new(DatagramWriter::unix(path.clone())),
            };
            let thread_stats = stats.clone();
            let thread_queue = lines.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sink {spec}"))
                .spawn(move || run_writer(writer, &thread_queue, &thread_stats))?;
            handles.push(Handle {
                spec: spec.clone(),
                queue: lines,
                stats,
                thread: Some(thread),
            });
        }
        Ok(Self {
            handles,
            reopen,
            stdout_closed,
            pending: Vec::new(),
        })
    }

    /// Adds `line` to the batch that [`Sinks::commit`] hands to every sink.
    pub fn send(&mut self, line: impl Into<String>) {
        self.pending.push(line.into());
    }

    /// Hands the lines sent since the last commit to every sink's queue; a
    /// full queue counts what it refuses as dropped.
    pub fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch: Batch = Arc::new(std::mem::take(&mut self.pending));
        for h in &self.handles {
            let refused = h.queue.push(&batch);
            if refused > 0 {
                h.stats.dropped.fetch_add(refused as u64, Ordering::Relaxed);
            }
        }
    }

    /// Files are reopened before their next write (SIGHUP).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    /// True when stdout is the only sink and its reader went away.
    pub fn only_sink_closed(&self) -> bool {
        self.handles.len() == 1
            && self.handles[0].spec == SinkSpec::Stdout
            && self.stdout_closed.load(Ordering::SeqCst)
    }

    /// (sink, written, dropped) for every sink.
    pub fn stats(&self) -> Vec<(String, u64, u64)> {
        self.handles
            .iter()
            .map(|h| {
                (
                    h.spec.to_string(),
                    h.stats.written.load(Ordering::Relaxed),
                    h.stats.dropped.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Closes the queues and waits (at most `grace` per network sink) for
    /// the writers to drain them.
    pub fn shutdown(&mut self, grace: Duration) {
        self.commit();
        for h in &mut self.handles {
            h.queue.close();
        }
        let deadline = std::time::Instant::now() + grace;
        for h in &mut self.handles {
            if let Some(t) = h.thread.take() {
                while !t.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if t.is_finished() {
                    let _ = t.join();
                } else {
                    log::warn!(
                        "sink {} did not drain in time; its queued lines are lost",
                        h.spec
                    );
                }
            }
        }
    }
}

/// One destination's writing logic, run on the sink's own thread.
trait Writer: Send {
    /// Writes one line (without newline); `Err` means "not written, retry
    /// after `ready()`".
    fn write(&mut self, line: &str) -> io::Result<()>;
    /// Makes the sink usable again after an error (reconnect, reopen);
    /// returns false when it should give up on this line for now.
    fn ready(&mut self) -> bool;
    /// Flushes buffered output (queue momentarily empty).
    fn flush(&mut self) {}
}

fn run_writer(mut writer: Box<dyn Writer>, queue: &LineQueue, stats: &SinkStats) {
    let mut flushed_at = Instant::now();
    while let Some(batches) = queue.take(FLUSH_IDLE) {
        if batches.is_empty() {
            writer.flush();
            flushed_at = Instant::now();
            continue;
        }
        for (batch, range) in batches {
            for line in &batch[range] {
                // Keep the line until the destination takes it; meanwhile
                // the queue holds the rest and counts what does not fit.
                // (`ready` backs off while reconnecting or reopening.)
                loop {
                    if writer.ready() {
                        match writer.write(line) {
                            Ok(()) => break,
                            // A write that fails on a ready destination
                            // (disk full): do not spin.
                            Err(_) => std::thread::sleep(WRITE_RETRY),
                        }
                    }
                }
                stats.written.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Lines that keep coming never leave the queue idle: without this,
        // they would wait until the buffer fills (1 MiB for a file: minutes
        // at a few lines a second).
        let now = Instant::now();
        if flush_due(flushed_at, now) {
            writer.flush();
            flushed_at = now;
        }
    }
    writer.flush();
}

/// Whether buffered lines have waited long enough since the last flush
/// (see [`FLUSH_MAX_DELAY`]).
fn flush_due(flushed_at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(flushed_at) >= FLUSH_MAX_DELAY
}

/// Longest a written line waits in a sink's buffer while lines keep
/// coming; an idle queue flushes sooner ([`FLUSH_IDLE`]). Under load this
/// costs two flushes a second: writes stay large.
const FLUSH_MAX_DELAY: Duration = Duration::from_millis(500);

/// Pause after a failed write before the next try.
const WRITE_RETRY: Duration = Duration::from_millis(100);

/// Idle time after which buffered output is flushed.
const FLUSH_IDLE: Duration = Duration::from_millis(50);

struct StdoutWriter {
    out: io::BufWriter<io::Stdout>,
    closed: Arc<AtomicBool>,
}

impl StdoutWriter {
    fn broken(&self, r: &io::Result<()>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::BrokenPipe)
    }
}

impl Writer for StdoutWriter {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let r = write_line(&mut self.out, line);
        if self.broken(&r) {
            // Nothing will read it again (`| head`): the agent stops.
            self.closed.store(true, Ordering::SeqCst);
            return Ok(());
        }
        r
    }

    fn ready(&mut self) -> bool {
        if self.closed.load(Ordering::SeqCst) {
            // Drain the queue without writing.
            return true;
        }
        true
    }

    fn flush(&mut self) {
        let r = self.out.flush();
        if self.broken(&r) {
            self.closed.store(true, Ordering::SeqCst);
        }
    }
}

struct FileWriter {
    path: PathBuf,
    file: Option<io::BufWriter<std::fs::File>>,
    reopen: Arc<AtomicBool>,
}

impl FileWriter {
    fn open(path: PathBuf, reopen: Arc<AtomicBool>) -> io::Result<Self> {
        let file = Self::open_file(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open output file {}: {e}", path.display()),
            )
        })?;
        Ok(Self {
            path,
            file: Some(file),
            reopen,
        })
    }

    fn open_file(path: &std::path::Path) -> io::Result<io::BufWriter<std::fs::File>> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(|f| io::BufWriter::with_capacity(FILE_BUFFER, f))
    }
}

impl Writer for FileWriter {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("not open"))?;
        write_line(file, line)
    }

    fn ready(&mut self) -> bool {
        if self.reopen.swap(false, Ordering::SeqCst) {
            if let Some(mut f) = self.file.take() {
                let _ = f.flush();
            }
        }
        if self.file.is_none() {
            match Self::open_file(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    log::warn!("cannot reopen {}: {e}", self.path.display());
                    std::thread::sleep(Duration::from_secs(1));
                    return false;
                }
            }
        }
        true
    }

    fn flush(&mut self) {
        if let Some(f) = self.file.as_mut() {
            let _ = f.flush();
        }
    }
}

/// Buffer of a file output: the writer flushes it when its queue goes
/// idle, so under load the file gets few large writes (with 8 KiB ones,
/// the filesystem's per-write work, zeroing the rest of each new block
/// among it, cost the agent as much as formatting the lines).
const FILE_BUFFER: usize = 1 << 20;

/// `line` and its newline, without the formatting machinery.
fn write_line(out: &mut impl io::Write, line: &str) -> io::Result<()> {
    out.write_all(line.as_bytes())?;
    out.write_all(b"\n")
}

/// Reconnect backoff: 100 ms doubling up to 30 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How lines become syslog messages.
struct Syslog {
    host: String,
    pid: u32,
}

impl Syslog {
    fn new() -> Self {
        Self {
            host: crate::output::syslog::hostname(),
            pid: std::process::id(),
        }
    }

    fn message(&self, line: &str) -> String {
        crate::output::syslog::format(
            line,
            crate::output::syslog::FACILITY_DAEMON,
            &self.host,
            self.pid,
            std::time::SystemTime::now(),
        )
    }
}

/// How a stream sink frames lines.
enum Framing {
    /// JSON, newline.
    Newline,
    /// RFC 5424 with octet counting.
    Syslog(Syslog),
}

struct TcpWriter {
    addr: String,
    conn: Option<TcpStream>,
    backoff: Duration,
    framing: Framing,
}

impl TcpWriter {
    fn new(addr: String, framing: Framing) -> Self {
        Self {
            addr,
            conn: None,
            backoff: BACKOFF_MIN,
            framing,
        }
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let mut last = io::Error::other("no address");
        for a in self.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// A collector that closed or reset its side shows up as readable with
    /// 0 bytes (or an error): detect it before writing into the void.
    fn peer_gone(conn: &TcpStream) -> bool {
        let mut buf = [0u8; 1];
        if conn.set_nonblocking(true).is_err() {
            return true;
        }
        let gone = match conn.peek(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        let _ = conn.set_nonblocking(false);
        gone
    }
}

impl Writer for TcpWriter {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let buf = match &self.framing {
            Framing::Newline => format!("{line}\n"),
            Framing::Syslog(syslog) => crate::output::syslog::octet_counted(&syslog.message(line)),
        };
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| io::Error::other("not connected"))?;
        let r = conn.write_all(buf.as_bytes());
        if r.is_err() {
            self.conn = None;
        }
        r
    }

    fn ready(&mut self) -> bool {
        if let Some(conn) = &self.conn {
            if !Self::peer_gone(conn) {
                return true;
            }
            log::warn!(
                "tcp://{}: the collector closed the connection; reconnecting",
                self.addr
            );
            self.conn = None;
        }
        match self.connect() {
            Ok(conn) => {
                let _ = conn.set_nodelay(true);
                log::info!("tcp://{}: connected", self.addr);
                self.conn = Some(conn);
                self.backoff = BACKOFF_MIN;
                true
            }
            Err(e) => {
                log::debug!("tcp://{}: {e}; retrying in {:?}", self.addr, self.backoff);
                std::thread::sleep(self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
        }
    }
}

/// A datagram destination: UDP or a local unix socket.
enum Datagram {
    Udp(std::net::UdpSocket),
    Unix(std::os::unix::net::UnixDatagram),
}

/// Syslog over datagrams: one message per datagram. A refused send (no
/// daemon yet) keeps the line and retries with backoff, like TCP.
struct DatagramWriter {
    target: String,
    unix: Option<PathBuf>,
    sock: Option<Datagram>,
    syslog: Syslog,
    backoff: Duration,
}

impl DatagramWriter {
    fn udp(addr: String) -> Self {
        Self {
            target: addr,
            unix: None,
            sock: None,
            syslog: Syslog::new(),
            backoff: BACKOFF_MIN,
        }
    }

    fn unix(path: PathBuf) -> Self {
        Self {
            target: path.display().to_string(),
            unix: Some(path),
            sock: None,
            syslog: Syslog::new(),
            backoff: BACKOFF_MIN,
        }
    }

    fn open(&self) -> io::Result<Datagram> {
        match &self.unix {
            Some(path) => {
                let s = std::os::unix::net::UnixDatagram::unbound()?;
                s.connect(path)?;
                Ok(Datagram::Unix(s))
            }
            None => {
                let s = std::net::UdpSocket::bind(if self.target.starts_with('[') {
                    "[::]:0"
                } else {
                    "0.0.0.0:0"
                })?;
                s.connect(&self.target)?;
                Ok(Datagram::Udp(s))
            }
        }
    }
}

impl Writer for DatagramWriter {
    fn write(&mut self, line: &str) -> io::Result<()> {
        let msg = self.syslog.message(line);
        let r = match self.sock.as_ref() {
            Some(Datagram::Udp(s)) => s.send(msg.as_bytes()).map(|_| ()),
            Some(Datagram::Unix(s)) => s.send(msg.as_bytes()).map(|_| ()),
            None => Err(io::Error::other("not open")),
        };
        if r.is_err() {
            self.sock = None;
        }
        r
    }

    fn ready(&mut self) -> bool {
        if self.sock.is_some() {
            return true;
        }
        match self.open() {
            Ok(s) => {
                self.sock = Some(s);
                self.backoff = BACKOFF_MIN;
                true
            }
            Err(e) => {
                log::debug!(
                    "syslog {}: {e}; retrying in {:?}",
                    self.target,
                    self.backoff
                );
                std::thread::sleep(self.backoff);
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead as _;

    #[test]
    fn parses_outputs() {
        assert_eq!("stdout".parse(), Ok(SinkSpec::Stdout));
        assert_eq!("file:/tmp/x".parse(), Ok(SinkSpec::File("/tmp/x".into())));
        assert_eq!(
            "tcp://127.0.0.1:9000".parse(),
            Ok(SinkSpec::Tcp("127.0.0.1:9000".into()))
        );
        for bad in [
            "",
            "file:",
            "tcp://host",
            "tcp://:9",
            "tcp://h:0",
            "tcp://h:x",
            "udp://h:1",
        ] {
            assert!(bad.parse::<SinkSpec>().is_err(), "{bad:?} accepted");
        }
    }

    /// A writer that records what reached its destination: lines are
    /// buffered until a flush.
    struct Recorder {
        buffered: Vec<String>,
        flushed: Arc<Mutex<Vec<String>>>,
    }

    impl Writer for Recorder {
        fn write(&mut self, line: &str) -> io::Result<()> {
            self.buffered.push(line.to_string());
            Ok(())
        }
        fn ready(&mut self) -> bool {
            true
        }
        fn flush(&mut self) {
            let mut out = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
            out.append(&mut self.buffered);
        }
    }

    #[test]
    fn a_steady_stream_is_flushed_at_least_every_half_second() {
        let queue = Arc::new(LineQueue::new(1024));
        let stats = Arc::new(SinkStats::default());
        let flushed = Arc::new(Mutex::new(Vec::new()));
        let writer = Recorder {
            buffered: Vec::new(),
            flushed: flushed.clone(),
        };
        let thread = {
            let (queue, stats) = (queue.clone(), stats.clone());
            std::thread::spawn(move || run_writer(Box::new(writer), &queue, &stats))
        };
        // A line every 10 ms: the queue is never idle for FLUSH_IDLE.
        let start = Instant::now();
        let mut n = 0;
        while start.elapsed() < Duration::from_millis(1500) {
            queue.push(&Arc::new(vec![format!("line {n}")]));
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = flushed.lock().unwrap_or_else(|e| e.into_inner()).len();
        queue.close();
        thread.join().expect("writer thread");
        // Flushed at 0.5 s and 1 s at least: lines written before 1 s are
        // out; without the bound, none would be before the close.
        assert!(seen >= 50, "{seen} of {n} lines out after 1.5 s");
        let all = flushed.lock().unwrap_or_else(|e| e.into_inner()).len();
        assert_eq!(all, n, "every line out after the close");
    }

    #[test]
    fn flushes_fall_due_half_a_second_after_the_last() {
        let t = Instant::now();
        assert!(!flush_due(t, t));
        assert!(!flush_due(t, t + Duration::from_millis(499)));
        assert!(flush_due(t, t + FLUSH_MAX_DELAY));
        // A clock read before the flush is never due.
        assert!(!flush_due(t + Duration::from_secs(1), t));
    }

    #[test]
    fn file_sink_reopens_after_rename() {
        let dir = std::env::temp_dir().join(format!("tcptrace-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("out.json");
        let mut sinks = Sinks::start(&[SinkSpec::File(path.clone())], 16).expect("start");
        sinks.send("one");
        sinks.commit();
        std::thread::sleep(Duration::from_millis(400));
        std::fs::rename(&path, dir.join("out.json.1")).expect("rename");
        sinks.reopen();
        sinks.send("two");
        sinks.shutdown(Duration::from_secs(5));
        let old = std::fs::read_to_string(dir.join("out.json.1")).expect("old");
        let new = std::fs::read_to_string(&path).expect("new");
        assert_eq!((old.as_str(), new.as_str()), ("one\n", "two\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tcp_sink_delivers_and_counts_drops_while_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut sinks = Sinks::start(&[SinkSpec::Tcp(addr.to_string())], 4).expect("start");
        sinks.send("a");
        sinks.commit();
        let (conn, _) = listener.accept().expect("accept");
        let mut lines = io::BufReader::new(conn).lines();
        assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("a"));
        sinks.shutdown(Duration::from_secs(5));
        assert_eq!(sinks.stats()[0].2, 0);
    }
}
