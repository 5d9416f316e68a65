//! The benchmark's load: TCP connection churn on loopback, and a holder of
//! many open connections for the scale run.
//!
//! ```text
//! tcptrace-churn churn --seconds S [--count N] [--progress K] [--addr IP] [--cpu N]
//!     one thread: connect, accept, the client closes, then the server
//!     (about 10 transitions per connection), for S seconds or N
//!     connections, whichever comes first (with --progress, a line
//!     `{"progress":M}` after every K connections, flushed); prints
//!     `{"connections":N,"seconds":T,"per_second":R,"slice_p90":P}`, P the
//!     90th percentile of the rates of its 100 ms slices. With --cpu, pinned to
//!     that CPU: an unpinned thread that the scheduler moves between CPUs
//!     runs at half the rate now and then, which would swamp what is measured.
//! tcptrace-churn hold --count N [--addr IP] [--ports P]
//!     opens N connections to P listeners and keeps them open; prints
//!     `{"open":N}` when they are all established, then waits until stdin
//!     closes. `hold --max` prints how many one process can hold (its
//!     descriptor limit allows two per connection).
//! ```
//!
//! Run it in a namespace of its own (the benchmark does) so that its
//! TIME_WAIT sockets and ports stay out of the host's way.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn usage() -> ! {
    eprintln!(
        "usage: tcptrace-churn churn --seconds S [--count N] [--progress K] [--addr IP] [--cpu N] \
         | hold --count N [--addr IP] [--ports P]"
    );
    std::process::exit(2)
}

fn value<T: std::str::FromStr>(args: &[String], flag: &str) -> Option<T> {
    let i = args.iter().position(|a| a == flag)?;
    match args.get(i + 1).map(|v| v.parse()) {
        Some(Ok(v)) => Some(v),
        _ => usage(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr: IpAddr = value(&args, "--addr").unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let result = match args.first().map(String::as_str) {
        Some("churn") => pin(value(&args, "--cpu")).and_then(|()| {
            churn(
                addr,
                value(&args, "--seconds").unwrap_or(5.0),
                value(&args, "--count").unwrap_or(u64::MAX),
                value(&args, "--progress").unwrap_or(0),
            )
        }),
        Some("hold") if args.iter().any(|a| a == "--max") => {
            println!("{}", nofile_hard_limit().saturating_sub(64) / 2);
            Ok(())
        }
        Some("hold") => hold(
            addr,
            value(&args, "--count").unwrap_or_else(|| usage()),
            value(&args, "--ports").unwrap_or(4),
        ),
        _ => usage(),
    };
    if let Err(e) = result {
        eprintln!("tcptrace-churn: {e}");
        std::process::exit(1);
    }
}

/// Pins this thread to `cpu`, if given.
fn pin(cpu: Option<usize>) -> std::io::Result<()> {
    let Some(cpu) = cpu else { return Ok(()) };
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays in bounds
    // for any cpu below CPU_SETSIZE, checked first.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("no CPU {cpu}")));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `n` listeners on `addr` (any port) and their addresses.
fn listen(addr: IpAddr, n: usize) -> std::io::Result<(Vec<TcpListener>, Vec<SocketAddr>)> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind(SocketAddr::new(addr, 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let targets = listeners
        .iter()
        .map(TcpListener::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((listeners, targets))
}

/// Listeners the churn rotates over: each destination has its own range of
/// ephemeral ports, so that TIME_WAIT never makes the port range the limit.
const CHURN_LISTENERS: usize = 16;

fn churn(addr: IpAddr, seconds: f64, count: u64, progress: u64) -> std::io::Result<()> {
    let (listeners, targets) = listen(addr, CHURN_LISTENERS)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut n: u64 = 0;
    let mut slices = Vec::new();
    let (mut slice_start, mut slice_n) = (start, 0);
    loop {
        // Check the clock every 64 connections: cheap, and still on time.
        if n.is_multiple_of(64) {
            let now = Instant::now();
            let slice = now.duration_since(slice_start);
            if slice >= SLICE {
                slices.push((n - slice_n) as f64 / slice.as_secs_f64());
                (slice_start, slice_n) = (now, n);
            }
            if now >= deadline {
                break;
            }
        }
        if n >= count {
            break;
        }
        if progress > 0 && n > 0 && n.is_multiple_of(progress) {
            println!("{{\"progress\":{n}}}");
            std::io::stdout().flush()?;
        }
        let i = n as usize % CHURN_LISTENERS;
        let client = TcpStream::connect(targets[i])?;
        let (server, _) = listeners[i].accept()?;
        // The client closes first (it goes to TIME_WAIT), then the server.
        drop(client);
        drop(server);
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    slices.sort_by(f64::total_cmp);
    // The 90th percentile: nearest rank.
    let p90 = slices
        .get((slices.len() * 9).div_ceil(10).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    println!(
        "{{\"connections\":{n},\"seconds\":{secs:.3},\"per_second\":{:.1},\"slice_p90\":{p90:.1}}}",
        n as f64 / secs
    );
    Ok(())
}

/// The churn's rate is also taken over slices this long: on a shared host,
/// whole slices run at half speed now and then (another tenant on the
/// core), and the rate of the fast slices says what the load costs when
/// that does not happen.
const SLICE: Duration = Duration::from_millis(100);

/// Raises the soft open-file limit to hold `fds` descriptors (up to the
/// hard limit: raising that needs CAP_SYS_RESOURCE, which a container may
/// not have; the benchmark spreads connections over several holders).
fn raise_nofile(fds: u64) -> std::io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_max < fds {
            return Err(std::io::Error::other(format!(
                "{fds} descriptors needed, the hard limit is {}: hold fewer connections per process",
                lim.rlim_max
            )));
        }
        lim.rlim_cur = fds;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Descriptors a holder may use: its hard limit.
fn nofile_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid rlimit pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

fn hold(addr: IpAddr, count: usize, ports: usize) -> std::io::Result<()> {
    raise_nofile(count as u64 * 2 + 64)?;
    let (listeners, targets) = listen(addr, ports.max(1))?;
    let mut held = Vec::with_capacity(count * 2);
    for i in 0..count {
        let which = i % listeners.len();
        let client = TcpStream::connect(targets[which])?;
        let (server, _) = listeners[which].accept()?;
        held.push(client);
        held.push(server);
    }
    println!("{{\"open\":{count}}}");
    std::io::stdout().flush()?;
    // Until the benchmark closes our stdin.
    let mut sink = Vec::new();
    std::io::stdin().read_to_end(&mut sink)?;
    drop(held);
    Ok(())
}
