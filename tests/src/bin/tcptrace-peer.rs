//! A deliberate TCP peer for the integration tests: each role runs as its
//! own process (so it has its own pid) and reports its progress on stdout,
//! one line per step, so a test can wait for a step instead of sleeping.
//!
//! ```text
//! tcptrace-peer server ADDR:PORT [--close-on-stdin] [--accept N] [--no-read]
//!     listen (port 0 = any), print `listening PORT`, accept N connections
//!     (default 1; with 1, print `accepted PEER`), read each to EOF (print
//!     `eof`) unless --no-read; with --close-on-stdin wait for a line on
//!     stdin first; close it (a RST when data is left unread); print `done`.
//! tcptrace-peer client ADDR:PORT --batches
//!     print `pid-ready`; for each line N on stdin, open and close (first)
//!     N connections, print `batch TOTAL` or `connect failed KIND after TOTAL`.
//! tcptrace-peer client ADDR:PORT --shutdown
//!     connect, write, shutdown(SHUT_WR) (print `shut`), read until EOF or
//!     RST (print `eof` or `reset KIND`), close, print `done`.
//! tcptrace-peer client ADDR:PORT [--wait-stdin] [--exit] [--count N] [--no-data]
//!     with --wait-stdin print `pid-ready` and wait for a line on stdin;
//!     connect, print `connected LOCAL`, write (unless --no-data), close
//!     (the client closes first), N times (default 1), print `done`; then
//!     wait for stdin to close unless --exit.
//! ```

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;

fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn wait_stdin_line() -> std::io::Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(())
}

/// How the server treats each accepted connection.
struct ServerOpts {
    close_on_stdin: bool,
    accept: u32,
    no_read: bool,
}

fn server(addr: SocketAddr, opts: &ServerOpts) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    say(&format!("listening {}", listener.local_addr()?.port()))?;
    for _ in 0..opts.accept {
        let (mut conn, peer) = listener.accept()?;
        if opts.accept == 1 {
            say(&format!("accepted {peer}"))?;
        }
        if !opts.no_read {
            let mut buf = Vec::new();
            conn.read_to_end(&mut buf)?;
            if opts.accept == 1 {
                say("eof")?;
            }
        }
        if opts.close_on_stdin {
            wait_stdin_line()?;
        }
        // With unread data (--no-read), this close sends a RST.
        drop(conn);
    }
    drop(listener);
    say("done")
}

/// Opens and closes (first) connections in batches: reads a count per
/// line on stdin, prints `batch N` after each batch (N: connections so
/// far), or `connect failed KIND` when one fails, then goes on reading.
fn client_batches(addr: SocketAddr) -> std::io::Result<()> {
    say("pid-ready")?;
    let mut total = 0u64;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let n: u64 = line?.trim().parse().unwrap_or(0);
        let mut failed = None;
        for _ in 0..n {
            match TcpStream::connect(addr) {
                Ok(conn) => {
                    drop(conn);
                    total += 1;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            Some(e) => say(&format!("connect failed {:?} after {total}", e.kind()))?,
            None => say(&format!("batch {total}"))?,
        }
    }
    Ok(())
}

/// Sends data, half-closes (FIN_WAIT1, then FIN_WAIT2 once acknowledged,
/// while the socket stays open), then reads until the peer closes or
/// resets, and closes.
fn client_shutdown(addr: SocketAddr) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(addr)?;
    say(&format!("connected {}", conn.local_addr()?))?;
    conn.write_all(b"data the server will never read\n")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    say("shut")?;
    let mut buf = Vec::new();
    match conn.read_to_end(&mut buf) {
        Ok(_) => say("eof")?,
        Err(e) => say(&format!("reset {}", e.kind()))?,
    }
    drop(conn);
    say("done")
}

fn client(
    addr: SocketAddr,
    wait_stdin: bool,
    exit: bool,
    count: u32,
    data: bool,
) -> std::io::Result<()> {
    if wait_stdin {
        say("pid-ready")?;
        wait_stdin_line()?;
    }
    for _ in 0..count {
        let mut conn = TcpStream::connect(addr)?;
        say(&format!("connected {}", conn.local_addr()?))?;
        if data {
            conn.write_all(b"hello from tcptrace-peer\n")?;
        }
        drop(conn);
    }
    say("done")?;
    if !exit {
        // Keep the pid alive until the test has read the agent's output.
        let mut sink = Vec::new();
        std::io::stdin().lock().read_to_end(&mut sink)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tcptrace-peer server ADDR:PORT [--close-on-stdin] [--accept N] [--no-read] | client ADDR:PORT [--wait-stdin] [--exit] [--count N] [--no-data] | client ADDR:PORT --shutdown | client ADDR:PORT --batches";
    let (Some(role), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("bad address {addr:?}; {usage}");
        return ExitCode::from(2);
    };
    let flag = |f: &str| args.iter().skip(2).any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
    };
    let result = match role.as_str() {
        "server" => {
            let accept = value("--accept").map_or(Ok(1), |n| n.parse::<u32>());
            let Ok(accept) = accept else {
                eprintln!("bad --accept; {usage}");
                return ExitCode::from(2);
            };
            server(
                addr,
                &ServerOpts {
                    close_on_stdin: flag("--close-on-stdin"),
                    accept,
                    no_read: flag("--no-read"),
                },
            )
        }
        "client" if flag("--shutdown") => client_shutdown(addr),
        "client" if flag("--batches") => client_batches(addr),
        "client" => {
            let count = value("--count").map_or(Ok(1), |n| n.parse::<u32>());
            let Ok(count) = count else {
                eprintln!("bad --count; {usage}");
                return ExitCode::from(2);
            };
            client(
                addr,
                flag("--wait-stdin"),
                flag("--exit"),
                count,
                !flag("--no-data"),
            )
        }
        _ => {
            eprintln!("{usage}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace-peer {role}: {e}");
            ExitCode::FAILURE
        }
    }
}
