//! A deliberate TCP peer for the integration tests: each role runs as its
//! own process (so it has its own pid) and reports its progress on stdout,
//! one line per step, so a test can wait for a step instead of sleeping.
//!
//! ```text
//! tcptrace-peer server ADDR:PORT [--close-on-stdin]
//!     listen (port 0 = any), print `listening PORT`, accept one connection,
//!     print `accepted PEER`, read to EOF, print `eof`; with --close-on-stdin
//!     wait for a line on stdin first; then close both sockets, print `done`.
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

fn server(addr: SocketAddr, close_on_stdin: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    say(&format!("listening {}", listener.local_addr()?.port()))?;
    let (mut conn, peer) = listener.accept()?;
    say(&format!("accepted {peer}"))?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf)?;
    say("eof")?;
    if close_on_stdin {
        wait_stdin_line()?;
    }
    drop(conn);
    drop(listener);
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
    let usage = "usage: tcptrace-peer server ADDR:PORT [--close-on-stdin] | client ADDR:PORT [--wait-stdin] [--exit] [--count N] [--no-data]";
    let (Some(role), Some(addr)) = (args.first(), args.get(1)) else {
        eprintln!("{usage}");
        return ExitCode::from(2);
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        eprintln!("bad address {addr:?}; {usage}");
        return ExitCode::from(2);
    };
    let flag = |f: &str| args.iter().skip(2).any(|a| a == f);
    let result = match role.as_str() {
        "server" => server(addr, flag("--close-on-stdin")),
        "client" => {
            let count = args
                .iter()
                .position(|a| a == "--count")
                .and_then(|i| args.get(i + 1))
                .map_or(Ok(1), |n| n.parse::<u32>());
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
