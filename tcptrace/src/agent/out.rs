//! Where the agent's lines go: every sink's queue, in batches. A closed
//! stdout (`| head`) ends the agent quietly when it is the only sink.

use crate::output::sinks::Sinks;

/// Where lines go: every sink's queue.
pub struct Out {
    /// The sinks (`--output`).
    pub sinks: Sinks,
}

impl Out {
    /// Adds a line to the batch that the next [`Out::flush`] hands over.
    pub fn line(&mut self, line: impl Into<String>) -> anyhow::Result<()> {
        self.sinks.send(line);
        Ok(())
    }

    /// Hands the batch to the sinks; an error when stdout, the only sink,
    /// closed ([`StdoutClosed`]).
    pub fn flush(&mut self) -> anyhow::Result<()> {
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
pub struct StdoutClosed;

impl std::error::Error for StdoutClosed {}

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed")
    }
}
