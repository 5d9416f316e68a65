//! The capture-sweep duty: unwound origin stacks of connections that have
//! closed are forgotten, with the kernel's origin table telling which
//! connections live (see [`crate::host::unwind::UnwoundStacks::sweep`]).

use std::time::Duration;

use crate::agent::parts::{Agent, Duty};

/// How often the unwound stacks of closed connections are forgotten (a
/// scan of the kernel's origin table: some 40 bytes a slot, a few ms for
/// a million).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// The sweep; only with CFI unwinding and the kernel's origin table.
#[derive(Default)]
pub struct CaptureSweep;

impl Duty for CaptureSweep {
    fn name(&self) -> &'static str {
        "capture sweep"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        if let Some(cfi) = agent.reader.cfi.as_mut() {
            let began = std::time::Instant::now();
            let live = agent.kernel.origins.live_captures();
            cfi.unwound.sweep(&live);
            log::debug!(
                "capture sweep: {} origins live, {} captures kept, {:?}",
                live.len(),
                cfi.unwound.len(),
                began.elapsed()
            );
        }
        Ok(SWEEP_EVERY)
    }
}
