//! `tcptrace` (run): checks privileges, finds what the kernel offers,
//! loads and attaches the program, drops what it no longer needs, builds
//! the pipeline and the outputs, and hands them to the agent's loop
//! ([`crate::agent::run`]) with its periodic duties.

use std::io::{self, IsTerminal as _};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::agent::leaks::LeakReports;
use crate::agent::mend::LossCheck;
use crate::agent::out::{Out, StdoutClosed};
use crate::agent::ports::{PortPressure, PortSweep};
use crate::agent::reader::Reader;
use crate::agent::state::StateFileWriter;
use crate::agent::summary::Summaries;
use crate::agent::sweep::CaptureSweep;
use crate::agent::{Agent, KernelMaps, Schedule};
use crate::commands::cli::Cli;
use crate::engine::clock::WallClock;
use crate::engine::events::EventKind;
use crate::engine::groups::LeakGroups;
use crate::host::privileges;
use crate::kernel::probe::{self, LostCounts, Probes};
use crate::kernel::{layout, tracefs};
use crate::output::sinks::Sinks;
use crate::pipeline::{Pipeline, LEAK_LINE_WINDOW_NS};

/// Runs the agent until a signal; a closed stdout (`| head`) ends it
/// quietly.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match start_and_run(cli).await {
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => {
            log::info!("stdout closed; exiting");
            Ok(())
        }
        other => other,
    }
}

async fn start_and_run(cli: Cli) -> anyhow::Result<()> {
    privileges::check()?;
    raise_memlock_limit();
    // First, while the agent has one thread and nothing open: the helper
    // that lets it give up CAP_SYS_ADMIN once attached.
    match crate::host::nshelper::start() {
        Ok(pid) => log::debug!("namespace helper: pid {pid}"),
        Err(e) => log::warn!(
            "cannot start the namespace helper ({e}); the agent keeps CAP_SYS_ADMIN to enter \
             network namespaces"
        ),
    }
    let tracefs = tracefs::locate_or_mount()?;
    let plan = crate::kernel::support::plan(&crate::kernel::support::probe(&tracefs))?;
    for line in &plan.without {
        log::warn!("{line}");
    }
    let layout = layout::resolve(&tracefs, &plan)?;
    let events: crate::commands::cli::EventSet = cli.events.iter().copied().collect();
    let filter = cli.filter();
    let origin_map = crate::engine::events::uses_origin_map(&events, &filter);
    let interest = crate::engine::events::kernel_interest(&events, origin_map);
    // How often leaks are looked for; a stay in CLOSE_WAIT shorter than
    // this cannot become one before the next look.
    let leak_check = (cli.leak_after / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let Probes {
        close_waits,
        ebpf: _attached,
        ring,
        lost,
        stacks,
        stack_copies,
        transitions,
        origins,
        connect_fd,
        state_program,
        tracepoints,
        flusher,
        last_use,
    } = probe::load_and_attach(
        &layout,
        &probe::ProbeOptions {
            ring_bytes: cli.ring_buffer_size,
            interest,
            state_program: cli.state_program,
            stacks_per_second: cli.stacks_per_second,
            max_stacks: cli.max_stacks,
            max_close_wait: cli.max_close_wait,
            origin_map: origin_map.then(|| u32::try_from(cli.max_sockets).unwrap_or(u32::MAX)),
            close_wait_quiet: origin_map.then_some(leak_check),
            // A stream of every transition: batches halve what a record
            // costs the CPU that makes it.
            stage: events.contains(&EventKind::StateChange),
            last_use_gap: cli.last_use.then_some(cli.last_use_gap),
            stack_copy_pages: probe::stack_copy_pages(cli.stack_copy, plan.btf),
        },
    )?;
    if cli.stack_copy > 0 && stack_copies.pages == 0 {
        log::warn!(
            "stacks are walked with frame pointers only: copying them for CFI unwinding \
             needs x86_64 and a kernel with BTF (/sys/kernel/btf/vmlinux)"
        );
    }
    let staged = flusher.is_some();
    let mut reader = Reader::new(flusher, cli.ring_buffer_size);
    if stack_copies.pages > 0 {
        reader.cfi = Some(crate::host::unwind::CfiStacks::new(
            cli.max_sockets,
            cli.max_stacks as usize,
        ));
    }

    // Text only for a person at a terminal; collectors always get JSON.
    let format = cli.format(
        io::stdout().is_terminal() && cli.outputs == [crate::output::sinks::SinkSpec::Stdout],
    );
    let leak_after_ns = u64::try_from(cli.leak_after.as_nanos()).unwrap_or(u64::MAX);
    let mut pipeline = Pipeline::new(filter, format, WallClock::new(), leak_after_ns);
    pipeline.forget_after_close_wait =
        origin_map && interest.0 & (1 << tcptrace_common::tcp_state::CLOSE) == 0;
    pipeline.tracker = crate::engine::tracker::Tracker::new(cli.max_sockets);
    pipeline.closewait = crate::engine::closewait::CloseWaitDetector::with_capacity(
        leak_after_ns,
        cli.max_close_wait,
    );
    pipeline.groups = LeakGroups::new(
        cli.leak_lines_per_group,
        LEAK_LINE_WINDOW_NS,
        u64::try_from(cli.leak_group_interval.as_nanos()).unwrap_or(u64::MAX),
    );
    pipeline.events = events;
    // Bound before the privileges go: a port below 1024 needs one.
    let metrics_listener = match cli.metrics {
        Some(addr) => Some(crate::output::metrics_server::bind(addr).await?),
        None => None,
    };
    // Attached, bound: from here on the agent needs only /proc and
    // sock_diag. Before any thread starts, so that every thread has the
    // reduced sets.
    match privileges::drop_after_attach(crate::host::nshelper::running()) {
        Ok(d) => log::info!(
            "privileges: kept {} (bounding set {}), no_new_privs set, exec forbidden \
             (seccomp); every other capability dropped",
            privileges::cap_names(d.kept).join(" "),
            if d.bounding_set {
                "cut to match"
            } else {
                "unchanged: no CAP_SETPCAP"
            }
        ),
        Err(e) => {
            log::warn!("could not drop capabilities after attaching: {e}; running with all of them")
        }
    }
    let sinks =
        Sinks::start(&cli.outputs, cli.queue_size).context("starting the outputs (--output)")?;
    // Scrapes arrive as requests on this channel; the loop below answers them,
    // since it owns the numbers.
    let scrapes = metrics_listener.map(|listener| {
        let (scrape_tx, scrape_rx) = tokio::sync::mpsc::channel(4);
        crate::output::metrics_server::spawn(listener, scrape_tx);
        scrape_rx
    });
    let mut out = Out { sinks };
    if let Some(header) = format.header() {
        out.line(header)?;
        out.flush()?;
    }

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for
    // as long as the RingBuf lives, and the AsyncFd owns the RingBuf.
    let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("registering the ring buffer with the reactor")?;
    let mut agent = Agent {
        pipeline,
        out,
        reader,
        ring,
        kernel: KernelMaps {
            lost,
            stacks,
            stack_copies,
            transitions,
            origins,
            close_waits,
            last_use,
        },
        lost_seen: LostCounts::default(),
    };

    // After attaching, so a socket entering CLOSE_WAIT now is seen live
    // (the live record then replaces its inventory record).
    let (found, spaces) = crate::host::inventory::take(WallClock::now_ns());
    if !found.is_empty() {
        log::info!(
            "inventory: {} sockets already in CLOSE_WAIT in {spaces} network namespaces; \
             reported as leaks once past --leak-after, with estimated ages",
            found.len()
        );
    }
    for f in found {
        agent.pipeline.closewait.seed(f.entered, f.since_ns);
    }

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let outputs: Vec<String> = cli.outputs.iter().map(ToString::to_string).collect();
    let metrics = cli
        .metrics
        .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
    let config = cli
        .config
        .as_ref()
        .map_or_else(|| "none".to_string(), |p| p.display().to_string());
    log::info!(
        "tcptrace {} on Linux {kernel}; tracepoints {}; outputs {}; metrics {metrics}; config {config}",
        env!("CARGO_PKG_VERSION"),
        tracepoints.join(", "),
        outputs.join(", ")
    );
    let printing: Vec<String> = cli
        .events
        .iter()
        .filter_map(clap::ValueEnum::to_possible_value)
        .map(|v| v.get_name().to_string())
        .collect();
    let hint = if events.contains(&EventKind::StateChange) {
        ""
    } else {
        " (every transition: --events state-change)"
    };
    let last_use_state = match &agent.kernel.last_use {
        Some(_) => format!("on, checkout after {:?} idle", cli.last_use_gap),
        None if cli.last_use => "unavailable".to_string(),
        None => "off".to_string(),
    };
    log::info!(
        "ready: tracing TCP state changes (program {state_program}, ring buffer {} bytes, connect fd \
         from {}, accept hooks {}, per-CPU batches {}, last use {last_use_state}); printing {}{hint}",
        cli.ring_buffer_size,
        connect_fd,
        on_off(layout.accept_hooks),
        on_off(staged),
        printing.join(",")
    );

    let mut schedule = Schedule::default();
    schedule.add(Duration::ZERO, LossCheck::default());
    schedule.add(Duration::ZERO, PortSweep::default());
    schedule.add(Duration::ZERO, PortPressure);
    schedule.add(Duration::ZERO, StateFileWriter::new(&cli.state_file));
    let names = match crate::host::names::Names::start(cli.name_sources()) {
        Ok(names) => Some(std::sync::Arc::new(names)),
        Err(e) => {
            log::warn!(
                "cannot start the container-name look-ups ({e}); leaks name container ids only"
            );
            None
        }
    };
    agent.pipeline.owners = Some(crate::pipeline::Owners(Box::new(
        crate::host::owners::OwnerIdentities::new(names.clone()).waiting_for_names(
            !cli.identity.containers.is_empty() || !cli.identity.pods.is_empty(),
        ),
    )));
    agent.pipeline.owner_filter = cli.identity_filter();
    schedule.add(
        Duration::ZERO,
        LeakReports::new(leak_check, origin_map.then_some(leak_check))
            .with_identity(names, cli.identity_filter()),
    );
    // Unwound origin stacks of closed connections are forgotten: only with
    // the kernel's origin table to tell which connections live.
    if origin_map && agent.reader.cfi.is_some() {
        schedule.add(Duration::ZERO, CaptureSweep);
    }
    schedule.add(cli.summary_interval, Summaries::new(cli.summary_interval));
    log::debug!("periodic duties: {}", schedule.names().join(", "));
    crate::agent::run(&mut agent, &mut schedule, scrapes).await?;

    let Agent {
        mut out,
        pipeline,
        lost_seen,
        ..
    } = agent;
    out.sinks.shutdown(Duration::from_secs(5));
    for (sink, written, dropped) in out.sinks.stats() {
        if dropped > 0 {
            log::warn!("output {sink}: {written} lines written, {dropped} dropped (queue full)");
        } else {
            log::info!("output {sink}: {written} lines written, 0 dropped");
        }
    }
    for line in pipeline.closewait.linger_summary(10) {
        log::info!("CLOSE_WAIT linger, {line}");
    }
    if pipeline.malformed > 0 {
        log::warn!("{} malformed records were dropped", pipeline.malformed);
    }
    log::info!(
        "stopped; {} sockets tracked, {} records lost in total",
        pipeline.tracker.len(),
        lost_seen.total()
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

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = rustix::process::Rlimit {
        current: None,
        maximum: None,
    };
    if let Err(e) = rustix::process::setrlimit(rustix::process::Resource::Memlock, unlimited) {
        log::debug!("could not raise RLIMIT_MEMLOCK: {e}");
    }
}
