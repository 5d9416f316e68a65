//! The summary duty (a `summary` event every `--summary-interval`, with
//! warnings about outputs that dropped lines and origins the kernel could
//! not keep since the last one), and the answer to a metrics scrape: both
//! are the agent's numbers at one moment ([`Agent::metrics_snapshot`]).

use std::time::Duration;

use crate::agent::parts::{Agent, Duty};
use crate::engine::events::EventKind;

/// What the previous `summary` saw, to report what changed since.
pub struct Summaries {
    /// How often.
    every: Duration,
    started: std::time::Instant,
    transitions: u64,
    dropped: std::collections::HashMap<String, u64>,
    /// Origins the kernel could not keep, as of the previous summary.
    origins_full: u64,
}

impl Summaries {
    /// A summary every `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            started: std::time::Instant::now(),
            transitions: 0,
            dropped: std::collections::HashMap::new(),
            origins_full: 0,
        }
    }

    /// Prints the `summary` event and warns about outputs that dropped
    /// lines since the previous one (the drops must not wait for the exit).
    fn report(&mut self, agent: &mut Agent) -> anyhow::Result<()> {
        let snapshot = agent.metrics_snapshot();
        let Agent { pipeline, out, .. } = agent;
        let s = crate::output::format::Summary::of(
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

impl Duty for Summaries {
    fn name(&self) -> &'static str {
        "summary"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        self.report(agent)?;
        Ok(self.every)
    }
}

/// Renders the metrics for one scrape; a scraper that went away is no error.
pub fn answer_scrape(req: crate::output::metrics_server::ScrapeRequest, agent: &Agent) {
    use crate::output::metrics_server::Page;
    if req.page != Page::Metrics {
        // The leaks as the state file has them, drawn.
        let leaks = agent
            .pipeline
            .state_snapshot(crate::engine::clock::WallClock::now_ns());
        let body = match req.page {
            Page::LeaksFolded => Ok(crate::output::flame::folded(&leaks).join("\n") + "\n"),
            _ => crate::output::flame::svg(&leaks, "from the running agent")
                .map(|svg| String::from_utf8_lossy(&svg).into_owned()),
        };
        match body {
            Ok(text) => {
                let _ = req.reply.send(text);
            }
            Err(e) => log::warn!("cannot draw the leaks: {e}"),
        }
        return;
    }
    let mut snapshot = agent.metrics_snapshot();
    snapshot.process = crate::output::metrics::process_stats();
    match crate::output::metrics::render(snapshot, req.format) {
        Ok(text) => {
            let _ = req.reply.send(text);
        }
        Err(e) => log::warn!("cannot render the metrics: {e}"),
    }
}
