//! The running agent: kernel records in, lines out, until a signal.

use std::io::{self, IsTerminal as _, Write as _};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::Cli;
use crate::clock::WallClock;
use crate::output::Lost;
use crate::pipeline::Pipeline;
use crate::probe::{self, Probes};
use crate::{layout, privileges, tracefs};

/// How often the lost counter is read (and the wall clock re-synced).
const LOST_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Malformed records logged one by one before only the count is kept.
const MALFORMED_LOG_LIMIT: u64 = 10;

/// Where lines go; a closed stdout (`| head`) ends the agent quietly.
struct Out {
    w: io::BufWriter<io::Stdout>,
}

impl Out {
    fn line(&mut self, line: &str) -> anyhow::Result<()> {
        check(writeln!(self.w, "{line}"))
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        check(self.w.flush())
    }
}

fn check(r: io::Result<()>) -> anyhow::Result<()> {
    {
        match r {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                Err(anyhow::Error::new(StdoutClosed))
            }
            other => other.context("writing to stdout"),
        }
    }
}

/// The reader of stdout went away (`| head`): stop without an error.
#[derive(Debug)]
struct StdoutClosed;

impl std::error::Error for StdoutClosed {}

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}

/// Runs until SIGINT/SIGTERM (Ok) or a fatal error.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match run_inner(cli).await {
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => {
            log::info!("stdout closed; exiting");
            Ok(())
        }
        other => other,
    }
}

async fn run_inner(cli: Cli) -> anyhow::Result<()> {
    privileges::check()?;
    raise_memlock_limit();
    let tracefs = tracefs::locate_or_mount()?;
    let layout = layout::resolve(&tracefs)?;
    let Probes {
        ebpf: _attached,
        ring,
        lost,
    } = probe::load_and_attach(&layout, cli.ring_buffer_size)?;

    let format = cli.format(io::stdout().is_terminal());
    let mut pipeline = Pipeline::new(cli.filter(), format, WallClock::new());
    let mut out = Out {
        w: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
    };
    if let Some(header) = format.header() {
        out.line(&header)?;
        out.flush()?;
    }

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for
    // as long as the RingBuf lives, and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("registering the ring buffer with the reactor")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut tick = tokio::time::interval(LOST_CHECK_INTERVAL);
    let mut lost_seen = 0u64;

    log::info!(
        "ready: tracing TCP state changes (ring buffer {} bytes, connect hooks {}, accept hooks {})",
        cli.ring_buffer_size,
        on_off(layout.connect_hooks),
        on_off(layout.accept_hooks)
    );

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                drain(guard.get_inner_mut(), &mut pipeline, &mut out)?;
                guard.clear_ready();
                out.flush()?;
            }
            _ = tick.tick() => {
                report_lost(lost.total()?, &mut lost_seen, &pipeline, &mut out)?;
                pipeline.clock.resync();
            }
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
        }
    }

    // Whatever the kernel wrote before the signal still goes out.
    drain(ring.get_mut(), &mut pipeline, &mut out)?;
    report_lost(lost.total()?, &mut lost_seen, &pipeline, &mut out)?;
    out.flush()?;
    if pipeline.malformed > 0 {
        log::warn!("{} malformed records were dropped", pipeline.malformed);
    }
    log::info!(
        "stopped; {} sockets tracked, {} records lost in total",
        pipeline.tracker.len(),
        lost_seen
    );
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    while let Some(item) = ring.next() {
        match pipeline.handle(&item) {
            Ok(Some(line)) => out.line(&line)?,
            Ok(None) => {}
            Err(e) if pipeline.malformed <= MALFORMED_LOG_LIMIT => {
                log::warn!("dropping a malformed record: {e}");
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn report_lost(
    total: u64,
    seen: &mut u64,
    pipeline: &Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    if total > *seen {
        let lost = Lost {
            lost: total - *seen,
            lost_total: total,
        };
        *seen = total;
        log::warn!(
            "lost {} records ({} since start): the ring buffer was full; raise --ring-buffer-size",
            lost.lost,
            lost.lost_total
        );
        out.line(&pipeline.lost_line(lost))?;
        out.flush()?;
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}
