//! The port-space duties: [`PortPressure`] warns, every second, of
//! destinations whose TIME_WAIT sockets use up their namespace's ephemeral
//! ports; [`PortSweep`] replaces, every few seconds, the counts the records
//! made with the kernel's own (a sock_diag dump of every namespace, see
//! [`crate::host::portspace`]), and reads each namespace's port range.

use std::thread::JoinHandle;
use std::time::Duration;

use crate::agent::out::Out;
use crate::agent::parts::{Agent, Duty};
use crate::agent::reader::Read;
use crate::engine::clock::WallClock;
use crate::engine::events::EventKind;
use crate::host::portspace::Sweep;
use crate::pipeline::Pipeline;

/// How often port pressure is checked.
const PRESSURE_EVERY: Duration = Duration::from_secs(1);
/// How often the kernel's TIME_WAIT sockets are counted.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How often a running dump is looked at: its result is applied soon after
/// it ends, before records that came later could be overwritten by it.
const SWEEP_POLL: Duration = Duration::from_millis(10);

/// The pressure check.
#[derive(Default)]
pub struct PortPressure;

impl Duty for PortPressure {
    fn name(&self) -> &'static str {
        "port pressure"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        agent.read_ring(Read::Poll)?;
        report_pressure(&mut agent.pipeline, &mut agent.out)?;
        Ok(PRESSURE_EVERY)
    }
}

/// The TIME_WAIT dump, on a thread of its own.
#[derive(Default)]
pub struct PortSweep {
    running: Option<JoinHandle<Sweep>>,
}

impl Duty for PortSweep {
    fn name(&self) -> &'static str {
        "port sweep"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        let Some(running) = self.running.take() else {
            // Dumping every namespace's TIME_WAIT sockets takes tens of ms
            // per 100 000 of them: on a thread of its own, so that the loop
            // drains the ring meanwhile (a stalled loop lets it fill: stack
            // copies wait, then records are lost).
            match std::thread::Builder::new()
                .name("tcptrace-ports".into())
                .spawn(crate::host::portspace::sweep)
            {
                Ok(handle) => self.running = Some(handle),
                Err(e) => log::warn!(
                    "cannot start the TIME_WAIT dump ({e}); counts stay as records made them"
                ),
            }
            return Ok(if self.running.is_some() {
                SWEEP_POLL
            } else {
                SWEEP_EVERY
            });
        };
        if !running.is_finished() {
            self.running = Some(running);
            return Ok(SWEEP_POLL);
        }
        match running.join() {
            Ok(sweep) => {
                // The records the kernel sent until now (also while the
                // dump ran) come first: a socket the dump counted keeps the
                // closer its record names.
                agent.read_ring(Read::Poll)?;
                reconcile_port_space(&mut agent.pipeline, &sweep);
            }
            Err(_) => log::warn!("the TIME_WAIT dump failed; counts stay as records made them"),
        }
        Ok(SWEEP_EVERY)
    }
}

/// Replaces the pressure counts and port ranges with the dump's.
fn reconcile_port_space(pipeline: &mut Pipeline, sweep: &Sweep) {
    let now_ns = WallClock::now_ns();
    pipeline.port_ranges = crate::host::portspace::ranges(sweep, &pipeline.port_ranges);
    for v in &sweep.views {
        log::debug!(
            "port space of netns {}: {} sockets in TIME_WAIT, ports {:?}",
            v.netns,
            v.time_wait.len(),
            pipeline.port_ranges.get(&v.netns)
        );
        pipeline
            .pressure
            .reconcile(Some(v.netns), &v.time_wait, now_ns);
    }
}

/// Warns of destinations whose TIME_WAIT sockets hold a large share of
/// their namespace's ephemeral ports (`port_pressure` events).
fn report_pressure(pipeline: &mut Pipeline, out: &mut Out) -> anyhow::Result<()> {
    let ranges = &pipeline.port_ranges;
    let now_ns = WallClock::now_ns();
    let range_of = |netns: Option<u32>| {
        netns
            .and_then(|n| ranges.get(&n).copied())
            .unwrap_or(crate::engine::timewait::DEFAULT_RANGE)
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
