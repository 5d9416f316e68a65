//! The running agent: kernel records in, lines out, until a signal.

use std::io::{self, IsTerminal as _};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{Cli, EventKind};
use crate::sinks::Sinks;
use aya::maps::{MapData, RingBuf, StackTraceMap};

use crate::clock::WallClock;
use crate::decode::tuple_key;
use crate::groups::LeakGroups;
use crate::leak::{group_key, summary, Enricher};
use crate::output::Lost;
use crate::pipeline::Pipeline;
use crate::pipeline::{CurrentLeak, LEAK_LINE_WINDOW_NS};
use crate::probe::{self, LostCounts, Probes};
use crate::{layout, privileges, tracefs};

/// How often the lost counter is read (and the wall clock re-synced).
const LOST_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How often the ring buffer is read when the kernel does not wake the
/// agent: it wakes it only when the unread data passes each eighth of the
/// ring (see `KernelConfig::wakeup_bytes`), so that a busy host costs one
/// read per batch, not one wakeup per transition.
const RING_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Lines handed to the outputs at once, at most.
const MAX_BATCH_LINES: usize = 4096;
/// Malformed records logged one by one before only the count is kept.
const MALFORMED_LOG_LIMIT: u64 = 10;

/// Where lines go: every sink's queue. A closed stdout (`| head`) ends the
/// agent quietly when it is the only sink.
struct Out {
    sinks: Sinks,
}

impl Out {
    /// Adds a line to the batch that the next [`Out::flush`] hands over.
    fn line(&mut self, line: impl Into<String>) -> anyhow::Result<()> {
        self.sinks.send(line);
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.sinks.commit();
        if self.sinks.only_sink_closed() {
            Err(anyhow::Error::new(StdoutClosed))
        } else {
            Ok(())
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
    // First, while the agent has one thread and nothing open: the helper
    // that lets it give up CAP_SYS_ADMIN once attached.
    match crate::nshelper::start() {
        Ok(pid) => log::debug!("namespace helper: pid {pid}"),
        Err(e) => log::warn!(
            "cannot start the namespace helper ({e}); the agent keeps CAP_SYS_ADMIN to enter \
             network namespaces"
        ),
    }
    let tracefs = tracefs::locate_or_mount()?;
    let plan = crate::support::plan(&crate::support::probe(&tracefs))?;
    for line in &plan.without {
        log::warn!("{line}");
    }
    let layout = layout::resolve(&tracefs, &plan)?;
    let events: crate::cli::EventSet = cli.events.iter().copied().collect();
    let filter = cli.filter();
    let origin_map = crate::events::uses_origin_map(&events, &filter);
    let interest = crate::events::kernel_interest(&events, origin_map);
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
        reader.cfi = Some(crate::unwind::CfiStacks::new(
            cli.max_sockets,
            cli.max_stacks as usize,
        ));
    }

    // Text only for a person at a terminal; collectors always get JSON.
    let format =
        cli.format(io::stdout().is_terminal() && cli.outputs == [crate::sinks::SinkSpec::Stdout]);
    let leak_after_ns = u64::try_from(cli.leak_after.as_nanos()).unwrap_or(u64::MAX);
    let mut pipeline = Pipeline::new(filter, format, WallClock::new(), leak_after_ns);
    pipeline.forget_after_close_wait =
        origin_map && interest.0 & (1 << tcptrace_common::tcp_state::CLOSE) == 0;
    pipeline.tracker = crate::tracker::Tracker::new(cli.max_sockets);
    pipeline.closewait =
        crate::closewait::CloseWaitDetector::with_capacity(leak_after_ns, cli.max_close_wait);
    pipeline.groups = LeakGroups::new(
        cli.leak_lines_per_group,
        LEAK_LINE_WINDOW_NS,
        u64::try_from(cli.leak_group_interval.as_nanos()).unwrap_or(u64::MAX),
    );
    pipeline.events = events;
    let mut enricher = Enricher::new();
    let mut state = StateFile::new(&cli.state_file);
    // Leaks are due within a quarter of the threshold (at most a second)
    // after they pass it.
    // Port pressure: checked every second, counts replaced by the kernel's
    // (sock_diag) every few seconds.
    let mut pressure_tick = tokio::time::interval(Duration::from_secs(1));
    let mut ranges: std::collections::HashMap<u32, crate::timewait::PortRange> =
        std::collections::HashMap::new();
    let mut pressure_checks = 0u32;
    let mut port_sweep: Option<tokio::task::JoinHandle<crate::portspace::Sweep>> = None;
    let mut leak_tick = tokio::time::interval(leak_check);
    let mut announced = crate::cwtable::Announced::default();
    let quiet_ns = origin_map.then(|| u64::try_from(leak_check.as_nanos()).unwrap_or(u64::MAX));
    // Bound before the privileges go: a port below 1024 needs one.
    let metrics_listener = match cli.metrics {
        Some(addr) => Some(crate::metrics_server::bind(addr).await?),
        None => None,
    };
    // Attached, bound: from here on the agent needs only /proc and
    // sock_diag. Before any thread starts, so that every thread has the
    // reduced sets.
    match privileges::drop_after_attach(crate::nshelper::running()) {
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
    let (scrape_tx, mut scrape_rx) = tokio::sync::mpsc::channel(4);
    let mut scrapes_open = match metrics_listener {
        Some(listener) => {
            crate::metrics_server::spawn(listener, scrape_tx);
            true
        }
        None => {
            drop(scrape_tx);
            false
        }
    };
    let mut out = Out { sinks };
    if let Some(header) = format.header() {
        out.line(header)?;
        out.flush()?;
    }

    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged for
    // as long as the RingBuf lives, and the AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("registering the ring buffer with the reactor")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut tick = tokio::time::interval(LOST_CHECK_INTERVAL);
    let mut ring_poll = tokio::time::interval(RING_POLL_INTERVAL);
    ring_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + cli.summary_interval,
        cli.summary_interval,
    );
    // Unwound origin stacks of closed connections are forgotten: only with
    // the kernel's origin table to tell which connections live.
    let sweeping = origin_map && reader.cfi.is_some();
    let mut sweep_tick = tokio::time::interval(CAPTURE_SWEEP_INTERVAL);
    sweep_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summary = SummaryState::new();
    let mut lost_seen = LostCounts::default();
    let mut mend = Mend::default();

    // After attaching, so a socket entering CLOSE_WAIT now is seen live
    // (the live record then replaces its inventory record).
    let (found, spaces) = crate::inventory::take(WallClock::now_ns());
    if !found.is_empty() {
        log::info!(
            "inventory: {} sockets already in CLOSE_WAIT in {spaces} network namespaces; \
             reported as leaks once past --leak-after, with estimated ages",
            found.len()
        );
    }
    for f in found {
        pipeline.closewait.seed(f.entered, f.since_ns);
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
    let last_use_state = match &last_use {
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

    let kernel_counts = |lost_seen, unwind| KernelCounts {
        lost: lost_seen,
        stack_copies: &stack_copies,
        unwind,
        programs: &lost,
        transitions: &transitions,
        origins: &origins,
        close_waits: &close_waits,
        last_use: last_use.as_ref(),
    };
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // Clear first: a wakeup that comes while draining (the
                // kernel sends one only when the unread data crosses an
                // eighth of the ring) must bring the agent back.
                guard.clear_ready();
                reader.read(guard.get_inner_mut(), Read::Wakeup, &mut pipeline, &mut out)?;
                out.flush()?;
            }
            _ = ring_poll.tick() => {
                reader.read(ring.get_mut(), Read::Poll, &mut pipeline, &mut out)?;
                out.flush()?;
            }
            _ = tick.tick() => {
                mend.pending |= report_lost(lost.counts()?, &mut lost_seen, &pipeline, &mut out)?;
                if mend.due() {
                    reconcile_after_loss(&mut reader, ring.get_mut(), &mut pipeline, &mut out)?;
                }
                pipeline.clock.resync();
            }
            _ = pressure_tick.tick() => {
                if pressure_checks.is_multiple_of(RECONCILE_EVERY_CHECKS) && port_sweep.is_none() {
                    // Dumping every namespace's TIME_WAIT sockets takes
                    // tens of ms per 100 000 of them: on a thread of its
                    // own, so that the loop drains the ring meanwhile (a
                    // stalled loop lets it fill: stack copies wait, then
                    // records are lost).
                    port_sweep = Some(tokio::task::spawn_blocking(crate::portspace::sweep));
                }
                pressure_checks = pressure_checks.wrapping_add(1);
                reader.read(ring.get_mut(), Read::Poll, &mut pipeline, &mut out)?;
                report_pressure(&mut pipeline, &ranges, &mut out)?;
                state.write(&pipeline, &ranges, WallClock::now_ns());
            }
            swept = async { port_sweep.as_mut().expect("only while a sweep runs").await }, if port_sweep.is_some() => {
                port_sweep = None;
                match swept {
                    Ok(sweep) => {
                        // The records the kernel sent until now (also while
                        // the dump ran) come first: a socket the dump
                        // counted keeps the closer its record names.
                        reader.read(ring.get_mut(), Read::Poll, &mut pipeline, &mut out)?;
                        reconcile_port_space(&mut pipeline, &mut ranges, &sweep);
                    }
                    Err(e) => log::warn!("the TIME_WAIT dump failed ({e}); counts stay as records made them"),
                }
            }
            _ = leak_tick.tick() => {
                if let Some(quiet_ns) = quiet_ns {
                    announce_close_waits(&close_waits, &mut announced, quiet_ns, &mut pipeline, &mut out)?;
                }
                let kernel = LeakSources { stacks: &stacks, origins: &origins, last_use: last_use.as_ref(), cfi: reader.cfi.as_ref() };
                report_leaks(&mut pipeline, &mut enricher, &kernel, &mut out)?;
                report_leak_groups(&mut pipeline, &mut out)?;
            }
            _ = sweep_tick.tick(), if sweeping => {
                if let Some(cfi) = reader.cfi.as_mut() {
                    let began = std::time::Instant::now();
                    let live = origins.live_captures();
                    cfi.unwound.sweep(&live);
                    log::debug!(
                        "capture sweep: {} origins live, {} captures kept, {:?}",
                        live.len(),
                        cfi.unwound.len(),
                        began.elapsed()
                    );
                }
            }
            _ = summary_tick.tick() => {
                summary.report(&pipeline, &kernel_counts(lost_seen, reader.unwind_stats()), &mut out)?;
            }
            scrape = scrape_rx.recv(), if scrapes_open => match scrape {
                Some(req) => answer_scrape(req, &pipeline, &kernel_counts(lost_seen, reader.unwind_stats()), &out),
                None => scrapes_open = false,
            },
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sighup.recv() => {
                log::info!("SIGHUP: reopening output files");
                out.sinks.reopen();
            }
        }
    }

    // Whatever the kernel wrote before the signal still goes out.
    reader.read(ring.get_mut(), Read::Final, &mut pipeline, &mut out)?;
    // Lost at the end: nothing to mend any more.
    let _ = report_lost(lost.counts()?, &mut lost_seen, &pipeline, &mut out)?;
    out.flush()?;
    state.remove();
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

/// How often the unwound stacks of closed connections are forgotten (a
/// scan of the kernel's origin table: some 40 bytes a slot, a few ms for
/// a million).
const CAPTURE_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// What the previous `summary` saw, to report what changed since.
struct SummaryState {
    started: std::time::Instant,
    transitions: u64,
    dropped: std::collections::HashMap<String, u64>,
    /// Origins the kernel could not keep, as of the previous summary.
    origins_full: u64,
}

impl SummaryState {
    fn new() -> Self {
        Self {
            started: std::time::Instant::now(),
            transitions: 0,
            dropped: std::collections::HashMap::new(),
            origins_full: 0,
        }
    }

    /// Prints the `summary` event and warns about outputs that dropped
    /// lines since the previous one (the drops must not wait for the exit).
    fn report(
        &mut self,
        pipeline: &Pipeline,
        kernel: &KernelCounts,
        out: &mut Out,
    ) -> anyhow::Result<()> {
        let snapshot = kernel.snapshot(pipeline, out);
        let s = crate::output::Summary::of(
            &snapshot,
            self.started.elapsed().as_secs(),
            self.transitions,
        );
        self.transitions = s.transitions_total;
        for (output, _, dropped) in &s.outputs {
            let before = self.dropped.insert(output.clone(), *dropped).unwrap_or(0);
            if *dropped > before {
                log::warn!(
                    "output {output}: {} lines dropped since the last summary ({dropped} since \
                     start): its destination is slow or down; raise --queue-size to ride out \
                     longer outages",
                    dropped - before
                );
            }
        }
        let full = snapshot.kernel_origins.full;
        if full > self.origins_full {
            log::warn!(
                "{} connections opened since the last summary have no origin ({full} since \
                 start): the kernel's origin map is full ({} origins kept); their leaks will \
                 name no opening stack; raise --max-sockets",
                full - self.origins_full,
                snapshot.kernel_origins.live
            );
            self.origins_full = full;
        }
        if pipeline.events.contains(&EventKind::Summary) {
            out.line(pipeline.format.summary(&s, std::time::SystemTime::now()))?;
        }
        out.flush()
    }
}

/// The kernel's counters that go with the pipeline's numbers.
struct KernelCounts<'a> {
    /// Lost records, as last read.
    lost: LostCounts,
    /// The programs, for their run times.
    programs: &'a probe::LostCounter,
    transitions: &'a probe::TransitionCounter,
    origins: &'a probe::OriginMap,
    close_waits: &'a crate::cwtable::CloseWaitTable,
    last_use: Option<&'a crate::lastuse::LastUseMap>,
    stack_copies: &'a probe::StackCopyCounter,
    /// The agent's unwinding, as last read.
    unwind: crate::unwind::UnwindStats,
}

impl KernelCounts<'_> {
    /// The numbers of a summary or a scrape, the agent's own CPU aside.
    fn snapshot(&self, pipeline: &Pipeline, out: &Out) -> crate::metrics::Snapshot {
        let mut snapshot = pipeline.metrics_snapshot();
        snapshot.transitions = self.transitions.counts();
        snapshot.lost_ring_full = self.lost.ring_full;
        snapshot.lost_missed = self.lost.missed;
        snapshot.programs = self.programs.program_times();
        snapshot.outputs = out.sinks.stats();
        snapshot.kernel_origins = self.origins.counts();
        snapshot.last_use = self.last_use.map(|m| m.counts()).unwrap_or_default();
        snapshot.stack_copies = self.stack_copies.counts();
        snapshot.unwind = self.unwind;
        // Stays in CLOSE_WAIT the kernel only counted (see
        // `announce_close_waits`) belong in the linger histogram too.
        snapshot
            .linger
            .merge(&self.close_waits.counts().quiet_linger);
        snapshot
    }
}

/// Gives the pipeline the sockets the kernel keeps in its CLOSE_WAITS
/// table that have stayed there `quiet_ns` or longer, each once: from then
/// on they are tracked (leak threshold, metrics) as if their entry had come
/// through the ring; the kernel sends their exit.
fn announce_close_waits(
    table: &crate::cwtable::CloseWaitTable,
    announced: &mut crate::cwtable::Announced,
    quiet_ns: u64,
    pipeline: &mut Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    if table.counts().held() == 0 {
        // An empty table: nothing to read (the usual case), nothing to remember.
        announced.fresh(Vec::new());
        return Ok(());
    }
    let fresh = announced.fresh(table.lingering(quiet_ns, WallClock::now_ns()));
    let mut feeder = Feeder::default();
    for rec in fresh {
        // The same bytes the kernel sends for an entry it did not keep.
        feeder.feed(pipeline, &crate::decode::raw::state_bytes(&rec), out)?;
    }
    Ok(())
}

/// Renders the metrics for one scrape; a scraper that went away is no error.
fn answer_scrape(
    req: crate::metrics_server::ScrapeRequest,
    pipeline: &Pipeline,
    kernel: &KernelCounts,
    out: &Out,
) {
    let mut snapshot = kernel.snapshot(pipeline, out);
    snapshot.process = crate::metrics::process_stats();
    match crate::metrics::render(snapshot, req.format) {
        Ok(text) => {
            let _ = req.reply.send(text);
        }
        Err(e) => log::warn!("cannot render the metrics: {e}"),
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Why the ring is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// The kernel woke the agent: read what is there.
    Wakeup,
    /// The poll timer, or a check that wants every record until now: flush
    /// staged records first.
    Poll,
    /// The agent stops: flush, read, and release everything.
    Final,
}

/// Records held for reordering, at most, per byte of ring buffer: twice
/// what a full ring of batched short records (64 bytes each) holds. Past
/// that (a CPU whose batch could not be flushed for a long time), they go
/// out in the order they have. Some 90 bytes of memory each.
const HELD_RECORDS_PER_RING_BYTE: f64 = 1.0 / 32.0;

/// Reads the ring buffer; where the kernel stages records, flushes every
/// CPU first and hands records on in time order (see [`crate::reorder`]).
struct Reader {
    flusher: Option<crate::stage::Flusher>,
    reorder: crate::reorder::Reorder,
    /// Flushes that failed (the first is logged).
    flush_errors: u64,
    /// Since when every flush found some CPU's batch busy (monotonic ns).
    busy_since: Option<u64>,
    /// Times a batch stayed busy past [`MAX_BUSY_NS`] (the first is logged).
    busy_stalls: u64,
    /// Past this many held records, release them all (see
    /// [`HELD_RECORDS_PER_RING_BYTE`]); the first time is logged.
    max_held: usize,
    overflows: u64,
    /// Unwinds the kernel's stack copies as they are read, when it sends
    /// them.
    cfi: Option<crate::unwind::CfiStacks>,
}

impl Reader {
    fn new(flusher: Option<crate::stage::Flusher>, ring_bytes: u32) -> Self {
        Self {
            flusher,
            reorder: crate::reorder::Reorder::default(),
            flush_errors: 0,
            busy_since: None,
            busy_stalls: 0,
            max_held: ((f64::from(ring_bytes) * HELD_RECORDS_PER_RING_BYTE) as usize).max(4096),
            overflows: 0,
            cfi: None,
        }
    }

    /// What unwinding did (zeros when the kernel copies no stacks).
    fn unwind_stats(&self) -> crate::unwind::UnwindStats {
        self.cfi
            .as_ref()
            .map(crate::unwind::CfiStacks::stats)
            .unwrap_or_default()
    }

    /// Reads what the ring holds and hands it to `pipeline`, the lines to
    /// `out`.
    fn read(
        &mut self,
        ring: &mut RingBuf<MapData>,
        why: Read,
        pipeline: &mut Pipeline,
        out: &mut Out,
    ) -> anyhow::Result<()> {
        let Some(flusher) = &self.flusher else {
            return drain(ring, self.cfi.as_mut(), pipeline, out);
        };
        let watermark = match why {
            Read::Wakeup => None,
            Read::Poll | Read::Final => match flusher.flush() {
                Ok(Some(began)) => {
                    self.busy_since = None;
                    Some(began)
                }
                Ok(None) => self.busy_watermark(WallClock::now_ns()),
                Err(e) => {
                    self.flush_errors += 1;
                    if self.flush_errors == 1 {
                        log::warn!(
                            "could not flush the kernel's staged records ({e}); records are \
                             released by the clock and may come slightly out of order"
                        );
                    }
                    Some(WallClock::now_ns())
                }
            },
        };
        while let Some(item) = ring.next() {
            if self.cfi.as_mut().is_some_and(|cfi| cfi.take(&item)) {
                continue;
            }
            let reorder = &mut self.reorder;
            let split = crate::decode::split_timed(&item, |ts, raw| reorder.push(ts, raw));
            if split.is_err() {
                pipeline.malformed += 1;
            }
            log_malformed(split, pipeline);
        }
        let overflow = self.reorder.len() > self.max_held;
        if overflow {
            self.overflows += 1;
            if self.overflows == 1 {
                log::warn!(
                    "{} records wait for a flush that vouches for their time; releasing them \
                     as they are (some may come out of order)",
                    self.reorder.len()
                );
            }
        }
        let watermark = if why == Read::Final || overflow {
            u64::MAX
        } else {
            watermark.unwrap_or_else(|| self.reorder.released_to())
        };
        let mut feeder = Feeder::default();
        let mut written = Ok(());
        self.reorder.release(watermark, |raw| {
            if written.is_ok() {
                written = feeder.feed(pipeline, raw, out);
            }
        });
        written
    }

    /// The watermark after a flush that found a CPU's batch busy through
    /// every try: none (records wait for the next flush), unless flushes
    /// have found it busy for [`MAX_BUSY_NS`]; then the clock, so that no
    /// record is held for ever behind a batch that never comes free.
    fn busy_watermark(&mut self, now: u64) -> Option<u64> {
        let since = *self.busy_since.get_or_insert(now);
        if now.saturating_sub(since) < MAX_BUSY_NS {
            return None;
        }
        self.busy_stalls += 1;
        if self.busy_stalls == 1 {
            log::warn!(
                "a CPU's staged records stayed busy through every flush for {} ms; \
                 records are released by the clock and may come slightly out of order",
                now.saturating_sub(since) / 1_000_000
            );
        }
        Some(now)
    }
}

/// How long flushes may find a CPU's batch busy before records are
/// released by the clock instead (a batch is busy for well under a
/// microsecond at a time).
const MAX_BUSY_NS: u64 = 1_000_000_000;

/// Logs a malformed record, the first few only (each is counted).
fn log_malformed(decoded: Result<(), crate::decode::DecodeError>, pipeline: &Pipeline) {
    if let Err(e) = decoded {
        if pipeline.malformed <= MALFORMED_LOG_LIMIT {
            log::warn!("dropping a malformed record: {e}");
        }
    }
}

/// Reads what the ring holds, in ring order, and hands it on.
fn drain(
    ring: &mut RingBuf<MapData>,
    mut cfi: Option<&mut crate::unwind::CfiStacks>,
    pipeline: &mut Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    let mut feeder = Feeder::default();
    while let Some(item) = ring.next() {
        // A stack copy is unwound now, before anything else is read: the
        // process's maps are those of the moment it was taken.
        if cfi.as_mut().is_some_and(|cfi| cfi.take(&item)) {
            continue;
        }
        feeder.feed(pipeline, &item, out)?;
    }
    Ok(())
}

/// Hands raw records to the pipeline and their lines to the outputs,
/// flushing the outputs every [`MAX_BATCH_LINES`] lines: a ring that
/// refills as fast as it is read must not grow one endless batch.
#[derive(Default)]
struct Feeder {
    /// Scratch: one record's lines.
    lines: Vec<String>,
    /// Lines since the last flush.
    batched: usize,
}

impl Feeder {
    /// Hands one raw record on. A malformed record is counted and dropped
    /// (the first few logged), never fatal.
    fn feed(&mut self, pipeline: &mut Pipeline, raw: &[u8], out: &mut Out) -> anyhow::Result<()> {
        let handled = pipeline.handle(raw, &mut self.lines);
        log_malformed(handled, pipeline);
        self.batched += self.lines.len();
        for line in self.lines.drain(..) {
            out.line(line)?;
        }
        if self.batched >= MAX_BATCH_LINES {
            out.flush()?;
            self.batched = 0;
        }
        Ok(())
    }
}

/// Where a leak's origin, last use and stacks are read from.
struct LeakSources<'a> {
    /// The kernel's frame-pointer walks.
    stacks: &'a StackTraceMap<MapData>,
    /// The kernel's origins (origin-map mode).
    origins: &'a probe::OriginMap,
    /// The sockets' last-use storage, when attached.
    last_use: Option<&'a crate::lastuse::LastUseMap>,
    /// Stacks unwound from CFI, when the kernel copies stacks.
    cfi: Option<&'a crate::unwind::CfiStacks>,
}

fn report_leaks(
    pipeline: &mut Pipeline,
    enricher: &mut Enricher,
    kernel: &LeakSources<'_>,
    out: &mut Out,
) -> anyhow::Result<()> {
    let now_ns = WallClock::now_ns();
    let mut due = pipeline.due_leaks(now_ns);
    if due.is_empty() {
        return Ok(());
    }
    let origins = kernel.origins;
    crate::leak::fill_origins(&mut due, |sk| origins.get(sk), crate::procfs::thread_comm);
    let fp_of = |id: u32| -> Option<Vec<u64>> {
        kernel
            .stacks
            .get(&id, 0)
            .ok()
            .map(|trace| trace.frames().iter().map(|f| f.ip).collect())
    };
    // Each stack as the better of its two walks (see
    // `crate::unwind::prefer_cfi`); an id at or above `CFI_STACK` is an
    // unwound one.
    let choose = |pid: u32, ts_ns: u64, id: Option<u32>| match kernel.cfi {
        Some(cfi) => cfi.unwound.choose(pid, ts_ns, id, fp_of),
        None => id,
    };
    for c in &mut due {
        if let Some(o) = c.entered.origin.as_mut() {
            o.stack_id = choose(o.pid, o.ts_ns, o.stack_id);
        }
    }
    let stack_of = |id: u32| -> Option<Vec<u64>> {
        if id >= crate::unwind::CFI_STACK {
            kernel
                .cfi
                .and_then(|cfi| cfi.unwound.stack(id))
                .map(|(addrs, _)| addrs.to_vec())
        } else {
            fp_of(id)
        }
    };
    let now = std::time::SystemTime::now();
    let last_use_of = |pid: u32, fd: i32| {
        kernel
            .last_use
            .and_then(|m| m.lookup(pid, fd))
            .map(|mut u| {
                u.stack_id = choose(u.pid, u.checkout_ns, u.stack_id);
                u
            })
    };
    for leak in enricher.enrich(due, stack_of, last_use_of) {
        let (origin, last_use) = &mut pipeline.truncated_stacks;
        *origin += u64::from(crate::symbolize::is_truncated(&leak.stack));
        *last_use += u64::from(crate::symbolize::is_truncated(&leak.last_use_stack));
        let member = tuple_key(&leak.candidate.entered.change);
        let since = leak.candidate.entered.change.ts_ns;
        pipeline.current_leaks.insert(
            member,
            CurrentLeak {
                entry: crate::leak::report_entry(&leak),
                since_ns: since,
            },
        );
        let print = pipeline
            .groups
            .on_leak(group_key(&leak), member, since, now_ns, || summary(&leak));
        if print {
            log::warn!("CLOSE_WAIT leak: {}", summary(&leak));
            if pipeline.events.contains(&EventKind::Leak) {
                out.line(pipeline.format.leak(&leak, now, &pipeline.clock))?;
            }
        }
    }
    out.flush()
}

/// Port-pressure checks between two reconciliations with the kernel.
const RECONCILE_EVERY_CHECKS: u32 = 5;

fn reconcile_port_space(
    pipeline: &mut Pipeline,
    ranges: &mut std::collections::HashMap<u32, crate::timewait::PortRange>,
    sweep: &crate::portspace::Sweep,
) {
    let now_ns = WallClock::now_ns();
    *ranges = crate::portspace::ranges(sweep, ranges);
    for v in &sweep.views {
        log::debug!(
            "port space of netns {}: {} sockets in TIME_WAIT, ports {:?}",
            v.netns,
            v.time_wait.len(),
            ranges.get(&v.netns)
        );
        pipeline
            .pressure
            .reconcile(Some(v.netns), &v.time_wait, now_ns);
    }
}

fn report_pressure(
    pipeline: &mut Pipeline,
    ranges: &std::collections::HashMap<u32, crate::timewait::PortRange>,
    out: &mut Out,
) -> anyhow::Result<()> {
    let now_ns = WallClock::now_ns();
    let range_of = |netns: Option<u32>| {
        netns
            .and_then(|n| ranges.get(&n).copied())
            .unwrap_or(crate::timewait::DEFAULT_RANGE)
    };
    let events = pipeline.pressure.check(now_ns, range_of);
    if events.is_empty() {
        return Ok(());
    }
    let now = std::time::SystemTime::now();
    for e in &events {
        log::warn!(
            "port pressure: {} -> {}:{} has {} of {} local ports in TIME_WAIT ({}%)",
            e.dest.laddr,
            e.dest.raddr,
            e.dest.rport,
            e.count,
            e.range.size(),
            e.level
        );
        if pipeline.events.contains(&EventKind::PortPressure) {
            out.line(pipeline.format.port_pressure(e, now))?;
        }
    }
    out.flush()
}

fn report_leak_groups(pipeline: &mut Pipeline, out: &mut Out) -> anyhow::Result<()> {
    let now_ns = WallClock::now_ns();
    let now = std::time::SystemTime::now();
    let reports = pipeline.groups.due_reports(now_ns);
    if pipeline.events.contains(&EventKind::Leak) {
        for report in &reports {
            out.line(pipeline.format.leak_group(report, now, now_ns))?;
        }
    }
    out.flush()
}

/// The current leaks and TIME_WAIT counts on disk for `tcptrace leaks` and
/// `tcptrace timewait`, rewritten atomically every second. Failures are logged once: the
/// trace itself must not stop because /run is read-only.
struct StateFile {
    path: Option<std::path::PathBuf>,
    warned: bool,
}

impl StateFile {
    fn new(path: &str) -> Self {
        Self {
            path: (path != "none" && !path.is_empty()).then(|| path.into()),
            warned: false,
        }
    }

    fn write(
        &mut self,
        pipeline: &Pipeline,
        ranges: &std::collections::HashMap<u32, crate::timewait::PortRange>,
        now_ns: u64,
    ) {
        let Some(path) = &self.path else { return };
        let snapshot = crate::report::Snapshot {
            schema: crate::report::SNAPSHOT_SCHEMA,
            agent_pid: std::process::id(),
            taken_at: crate::output::rfc3339(std::time::SystemTime::now()),
            leaks: pipeline
                .current_leaks
                .values()
                .map(|c| {
                    let mut e = c.entry.clone();
                    e.close_wait_ms = now_ns.saturating_sub(c.since_ns) as f64 / 1e6;
                    e
                })
                .collect(),
            time_wait: crate::report_cmd::time_wait_entries(&pipeline.pressure, ranges),
        };
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("json.tmp");
            std::fs::write(
                &tmp,
                serde_json::to_vec(&snapshot).map_err(std::io::Error::other)?,
            )?;
            std::fs::rename(&tmp, path)
        })();
        match result {
            Ok(()) => {}
            Err(e) if !self.warned => {
                self.warned = true;
                log::warn!(
                    "cannot write the leak state file {} ({e}); `tcptrace leaks` will take a live \
                     inventory instead; set --state-file to a writable path or `none`",
                    path.display()
                );
            }
            Err(_) => {}
        }
    }

    fn remove(&self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reports records lost since the last look; true when there were some.
fn report_lost(
    now: LostCounts,
    seen: &mut LostCounts,
    pipeline: &Pipeline,
    out: &mut Out,
) -> anyhow::Result<bool> {
    let new_loss = now.total() > seen.total();
    if new_loss {
        let lost = Lost {
            lost: now.total() - seen.total(),
            lost_total: now.total(),
            ring_full_total: now.ring_full,
            missed_total: now.missed,
        };
        *seen = now;
        log::warn!(
            "lost {} records ({} since start: {} ring buffer full, {} skipped by the kernel): {}",
            lost.lost,
            lost.lost_total,
            lost.ring_full_total,
            lost.missed_total,
            lost.advice()
        );
        out.line(pipeline.lost_line(lost))?;
        out.flush()?;
    }
    Ok(new_loss)
}

/// A sock_diag dump of every namespace costs a /proc walk: under a
/// sustained loss, once in this long.
const MEND_EVERY: Duration = Duration::from_secs(10);

/// When [`reconcile_after_loss`] runs: soon after a loss, at most once per
/// [`MEND_EVERY`].
#[derive(Default)]
struct Mend {
    /// Records were lost since the last run.
    pending: bool,
    last: Option<std::time::Instant>,
}

impl Mend {
    /// True (and the run counted) when one is pending and allowed now.
    fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        let allowed = self
            .last
            .is_none_or(|t| now.duration_since(t) >= MEND_EVERY);
        if self.pending && allowed {
            self.pending = false;
            self.last = Some(now);
            return true;
        }
        false
    }
}

/// After lost records, the sockets in CLOSE_WAIT as the kernel has them
/// (sock_diag in every namespace) replace what the lost records left
/// wrong: a socket whose exit was lost would become a leak whose age grows
/// forever, one whose entry was lost would never be reported. The dump
/// comes first, then the ring is drained, so that every record sent
/// before the dump is handled when the two are compared.
fn reconcile_after_loss(
    reader: &mut Reader,
    ring: &mut RingBuf<MapData>,
    pipeline: &mut Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    let dump_ns = WallClock::now_ns();
    let (listed, spaces) = crate::inventory::take(dump_ns);
    reader.read(ring, Read::Poll, pipeline, out)?;
    let r = pipeline.reconcile_close_waits(listed, dump_ns);
    log::info!(
        "records were lost: CLOSE_WAIT reconciled with sock_diag in {spaces} network \
         namespaces: {} sockets had left it unseen (forgotten, no duration), {} had entered \
         it unseen (their age estimated)",
        r.gone,
        r.found
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_busy_for_a_second_gives_way_to_the_clock() {
        let mut reader = Reader::new(None, 4096);
        let s = 1_000_000_000;
        assert_eq!(reader.busy_watermark(10 * s), None);
        assert_eq!(reader.busy_watermark(10 * s + s / 2), None);
        assert_eq!(reader.busy_watermark(11 * s), Some(11 * s));
        assert_eq!(reader.busy_watermark(11 * s + 1), Some(11 * s + 1));
        // A complete flush starts the count again.
        reader.busy_since = None;
        assert_eq!(reader.busy_watermark(12 * s), None);
    }
}
