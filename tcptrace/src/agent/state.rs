//! The state-file duty: every second, the current leaks and TIME_WAIT
//! counts go to the state file ([`crate::output::statefile`]) for
//! `tcptrace leaks` and `tcptrace timewait`; the file goes when the agent
//! stops.

use std::time::Duration;

use crate::agent::parts::{Agent, Duty};
use crate::engine::clock::WallClock;
use crate::output::statefile::StateFile;

/// How often the state file is rewritten.
const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The state file, written every second.
pub struct StateFileWriter {
    file: StateFile,
}

impl StateFileWriter {
    /// Writes to `path` (`none`: nowhere).
    pub fn new(path: &str) -> Self {
        Self {
            file: StateFile::new(path),
        }
    }
}

impl Duty for StateFileWriter {
    fn name(&self) -> &'static str {
        "state file"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        if self.file.enabled() {
            self.file
                .write(&agent.pipeline.state_snapshot(WallClock::now_ns()));
        }
        Ok(WRITE_EVERY)
    }

    fn stop(&mut self, _agent: &mut Agent) -> anyhow::Result<()> {
        self.file.remove();
        Ok(())
    }
}
