//! The `--metrics` HTTP endpoint: a minimal HTTP/1.1 server for `GET
//! /metrics`. Each scrape is a request to the agent's loop, which owns the
//! numbers and answers with the rendered text (see [`crate::output::metrics`]); the
//! server itself holds no state and cannot block the ring-buffer reader.
//!
//! Hardened for a port that anyone on the host may reach: requests are
//! capped in size and time, connections in number, and nothing but
//! `GET`/`HEAD` of `/metrics`, `/leaks.svg` (the current leaks as a flame
//! graph, see [`crate::output::flame`]), `/leaks.folded` and `/` is served.
//!
//! Why by hand, not an HTTP crate: four paths and two methods, on tokio the
//! agent already runs; every limit above is a line here, where a general
//! server would have to be configured (and audited) down to them.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::output::metrics::Exposition;

/// The port used when `--metrics` names none (the one registered for
/// tcptrace-like exporters is taken, so this follows the OpenTelemetry
/// Prometheus exporter's default).
pub const DEFAULT_PORT: u16 = 9464;
/// The address used by a bare `--metrics`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9464";
/// Largest request head read.
const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more get `503`.
const MAX_CONNECTIONS: usize = 16;

/// One scrape, for the agent's loop to answer.
#[derive(Debug)]
pub struct ScrapeRequest {
    /// What was asked for.
    pub page: Page,
    /// The format the scraper asked for (of the metrics).
    pub format: Exposition,
    /// Where the rendered text goes.
    pub reply: oneshot::Sender<String>,
}

/// The pages the loop renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// `/metrics`.
    Metrics,
    /// `/leaks.svg`: the leaks as a flame graph.
    LeaksSvg,
    /// `/leaks.folded`: their folded stacks.
    LeaksFolded,
}

/// Parses `--metrics`: `HOST:PORT`, `[V6]:PORT`, or an address or host name
/// alone (port 9464).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim();
    let hint = "examples: 127.0.0.1:9464, 0.0.0.0:9464, [::1]:9464, localhost";
    if t.is_empty() {
        return Err(format!("an empty address; {hint}"));
    }
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(t);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let with_port = if t.contains(':') {
        t.to_string()
    } else {
        format!("{t}:{DEFAULT_PORT}")
    };
    match with_port.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{t:?} resolves to no address; {hint}")),
        Err(e) => Err(format!(
            "{t:?} is not an address to listen on ({e}); {hint}"
        )),
    }
}

/// Binds the endpoint; the error says what to do.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        let what = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "the port is in use by another process; pick another with --metrics HOST:PORT"
            }
            std::io::ErrorKind::AddrNotAvailable => "no interface of this host has that address",
            _ => "check --metrics",
        };
        anyhow::anyhow!("cannot listen for metrics on {addr}: {e}; {what}")
    })
}

/// Serves scrapes from `listener` until the agent's loop goes away.
pub fn spawn(listener: TcpListener, scrapes: mpsc::Sender<ScrapeRequest>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    log::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if scrapes.is_closed() {
                return;
            }
            let permit = Arc::clone(&slots).try_acquire_owned();
            let scrapes = scrapes.clone();
            tokio::spawn(async move {
                let result = match permit {
                    Ok(_permit) => tokio::time::timeout(IO_TIMEOUT, serve(stream, &scrapes)).await,
                    Err(_) => tokio::time::timeout(IO_TIMEOUT, busy(stream)).await,
                };
                match result {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => log::debug!("metrics endpoint: {peer}: {e}"),
                    Err(_) => log::debug!("metrics endpoint: {peer}: timed out"),
                }
            });
        }
    });
}

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    path: String,
    accept: Option<String>,
}

/// Parses the request line and the `Accept` header; `None` if malformed.
fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    first.next().filter(|v| v.starts_with("HTTP/1."))?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("accept"))
        .map(|(_, v)| v.trim().to_string());
    Some(Request {
        method,
        path,
        accept,
    })
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_REQUEST_BYTES {
            return Ok(None);
        }
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

async fn busy(mut stream: TcpStream) -> std::io::Result<()> {
    respond(
        &mut stream,
        "503 Service Unavailable",
        "text/plain",
        "too many scrapes at once\n",
        false,
    )
    .await
}

async fn serve(
    mut stream: TcpStream,
    scrapes: &mpsc::Sender<ScrapeRequest>,
) -> std::io::Result<()> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let Some(head) = read_head(&mut stream).await? else {
        return respond(&mut stream, "400 Bad Request", TEXT, "bad request\n", false).await;
    };
    let Some(req) = parse_request(&head) else {
        return respond(&mut stream, "400 Bad Request", TEXT, "bad request\n", false).await;
    };
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            TEXT,
            "only GET and HEAD\n",
            false,
        )
        .await;
    }
    let page = match req.path.as_str() {
        "/metrics" => Some(Page::Metrics),
        "/leaks.svg" => Some(Page::LeaksSvg),
        "/leaks.folded" => Some(Page::LeaksFolded),
        _ => None,
    };
    match req.path.as_str() {
        "/metrics" | "/leaks.svg" | "/leaks.folded" => {
            let page = page.unwrap_or(Page::Metrics);
            let format = Exposition::negotiate(req.accept.as_deref());
            let content_type = match page {
                Page::Metrics => format.content_type(),
                Page::LeaksSvg => "image/svg+xml",
                Page::LeaksFolded => TEXT,
            };
            let (reply, answer) = oneshot::channel();
            let sent = scrapes
                .send(ScrapeRequest {
                    page,
                    format,
                    reply,
                })
                .await;
            match (sent, answer.await) {
                (Ok(()), Ok(body)) => {
                    respond(&mut stream, "200 OK", content_type, &body, head_only).await
                }
                _ => {
                    respond(
                        &mut stream,
                        "503 Service Unavailable",
                        TEXT,
                        "the agent is stopping\n",
                        head_only,
                    )
                    .await
                }
            }
        }
        "/" => {
            respond(
                &mut stream,
                "200 OK",
                TEXT,
                "tcptrace: metrics at /metrics, the current leaks as a flame graph at /leaks.svg \
                 and as folded stacks at /leaks.folded\n",
                head_only,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                "404 Not Found",
                TEXT,
                "not found; try /metrics\n",
                head_only,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("127.0.0.1:9100"),
            Ok("127.0.0.1:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr("0.0.0.0"),
            Ok("0.0.0.0:9464".parse().expect("a"))
        );
        assert_eq!(parse_addr("::1"), Ok("[::1]:9464".parse().expect("a")));
        assert_eq!(parse_addr("[::]"), Ok("[::]:9464".parse().expect("a")));
        assert_eq!(
            parse_addr("[::1]:9100"),
            Ok("[::1]:9100".parse().expect("a"))
        );
        assert_eq!(
            parse_addr(DEFAULT_ADDR),
            Ok(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                DEFAULT_PORT
            ))
        );
        assert_eq!(parse_addr("localhost:9100").map(|a| a.port()), Ok(9100));
        for bad in [
            "",
            "127.0.0.1:99999",
            "no such host name.invalid",
            "1.2.3.4:x",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn request_heads() {
        let r = parse_request(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\naccept: application/openmetrics-text",
        )
        .expect("parsed");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        assert_eq!(r.accept.as_deref(), Some("application/openmetrics-text"));
        assert!(parse_request("GET /metrics").is_none());
        assert!(parse_request("GET /metrics SPDY/3").is_none());
        assert!(parse_request("").is_none());
    }
}
