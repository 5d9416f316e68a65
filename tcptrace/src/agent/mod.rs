//! The running agent: kernel records in, lines out, until a signal.
//!
//! [`run`] is the loop and nothing else: it reads the ring buffer when the
//! kernel wakes it or the poll timer fires, runs each periodic [`Duty`]
//! when it is due ([`Schedule`]), answers metrics scrapes and stops on a
//! signal. The duties, one module each: [`leaks`] (leak reports),
//! [`ports`] (port pressure and the TIME_WAIT sweep), [`state`] (the
//! state file), [`summary`] (summaries, scrapes), [`mend`] (lost records),
//! [`sweep`] (forgetting closed connections' unwound stacks). What they
//! work on is [`Agent`]; `commands::run` builds it.

pub mod leaks;
pub mod mend;
pub mod out;
pub mod parts;
pub mod ports;
pub mod reader;
pub mod state;
pub mod summary;
pub mod sweep;

use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::Receiver;
use tokio::time::Instant;

pub use crate::agent::parts::{Agent, Duty, KernelMaps};
use crate::agent::reader::Read;
use crate::output::metrics_server::ScrapeRequest;

/// How often the ring buffer is read when the kernel does not wake the
/// agent: it wakes it only when the unread data passes each eighth of the
/// ring (see `KernelConfig::wakeup_bytes`), so that a busy host costs one
/// read per batch, not one wakeup per transition.
const RING_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The periodic duties and when each is due next.
#[derive(Default)]
pub struct Schedule {
    duties: Vec<(Instant, Box<dyn Duty>)>,
}

impl Schedule {
    /// Adds `duty`, first due `first` from now (zero: at once).
    pub fn add(&mut self, first: Duration, duty: impl Duty + 'static) {
        self.duties.push((Instant::now() + first, Box::new(duty)));
    }

    /// The names of the duties, in the order they were added.
    pub fn names(&self) -> Vec<&'static str> {
        self.duties.iter().map(|(_, d)| d.name()).collect()
    }

    /// When the first duty is due (far ahead when there is none).
    fn next_due(&self) -> Instant {
        self.duties
            .iter()
            .map(|(due, _)| *due)
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Runs every duty that is due, in the order they were added; each is
    /// next due when it says, counted from when it finished.
    fn run_due(&mut self, agent: &mut Agent) -> anyhow::Result<()> {
        let now = Instant::now();
        for (due, duty) in self.duties.iter_mut().filter(|(due, _)| *due <= now) {
            let next = duty.run(agent)?;
            *due = Instant::now() + next;
        }
        Ok(())
    }

    /// Each duty's last words, in the order they were added.
    fn stop(&mut self, agent: &mut Agent) -> anyhow::Result<()> {
        for (_, duty) in &mut self.duties {
            duty.stop(agent)?;
        }
        Ok(())
    }
}

/// Runs the agent until SIGINT or SIGTERM (SIGHUP reopens output files):
/// reads the ring, runs the duties, answers scrapes from `scrapes`. At the
/// end, what the kernel wrote before the signal still goes out, then each
/// duty stops.
pub async fn run(
    agent: &mut Agent,
    schedule: &mut Schedule,
    mut scrapes: Option<Receiver<ScrapeRequest>>,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut ring_poll = tokio::time::interval(RING_POLL_INTERVAL);
    ring_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = agent.ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                // Clear first: a wakeup that comes while draining (the
                // kernel sends one only when the unread data crosses an
                // eighth of the ring) must bring the agent back.
                guard.clear_ready();
                agent.reader.read(guard.get_inner_mut(), Read::Wakeup, &mut agent.pipeline, &mut agent.out)?;
                agent.out.flush()?;
            }
            _ = ring_poll.tick() => {
                agent.read_ring(Read::Poll)?;
                agent.out.flush()?;
            }
            _ = tokio::time::sleep_until(schedule.next_due()) => schedule.run_due(agent)?,
            scrape = async { scrapes.as_mut().expect("only while scrapes come").recv().await }, if scrapes.is_some() => match scrape {
                Some(req) => summary::answer_scrape(req, agent),
                None => scrapes = None,
            },
            _ = sigint.recv() => { log::info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: stopping"); break; }
            _ = sighup.recv() => {
                log::info!("SIGHUP: reopening output files");
                agent.out.sinks.reopen();
            }
        }
    }
    // Whatever the kernel wrote before the signal still goes out.
    agent.read_ring(Read::Final)?;
    schedule.stop(agent)?;
    agent.out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_schedule_is_due_far_ahead() {
        let s = Schedule::default();
        assert!(s.next_due() > Instant::now() + Duration::from_secs(60));
        assert!(s.names().is_empty());
    }
}
