//! What the running agent is made of, and the one interface its periodic
//! duties share: [`Agent`] (the pipeline, the outputs, the ring reader and
//! the kernel's maps) and [`Duty`].

use std::time::Duration;

use aya::maps::{MapData, RingBuf, StackTraceMap};
use tokio::io::unix::AsyncFd;

use crate::agent::out::Out;
use crate::agent::reader::{Read, Reader};
use crate::kernel::cwtable::CloseWaitTable;
use crate::kernel::lastuse_map::LastUseMap;
use crate::kernel::probe::{
    LostCounter, LostCounts, OriginMap, StackCopyCounter, TransitionCounter,
};
use crate::output::metrics::Snapshot;
use crate::pipeline::Pipeline;

/// The kernel's maps the agent reads besides the ring buffer.
pub struct KernelMaps {
    /// Lost-record counters and the programs' run times.
    pub lost: LostCounter,
    /// The kernel's frame-pointer walks of origin and checkout stacks.
    pub stacks: StackTraceMap<MapData>,
    /// What the kernel copied for CFI unwinding.
    pub stack_copies: StackCopyCounter,
    /// Transitions seen, by state.
    pub transitions: TransitionCounter,
    /// Origins of live connections (origin-map mode).
    pub origins: OriginMap,
    /// Sockets the kernel keeps in CLOSE_WAIT without telling each one.
    pub close_waits: CloseWaitTable,
    /// The sockets' last-use storage, when attached.
    pub last_use: Option<LastUseMap>,
}

/// The running agent's parts: what every duty works on.
pub struct Agent {
    /// Records to lines: decode, tracker, detectors, formats.
    pub pipeline: Pipeline,
    /// Where the lines go.
    pub out: Out,
    /// Reads the ring buffer (in time order where the kernel stages).
    pub reader: Reader,
    /// The ring buffer, registered with the reactor.
    pub ring: AsyncFd<RingBuf<MapData>>,
    /// The kernel's other maps.
    pub kernel: KernelMaps,
    /// Lost records as last read (reported only when they grow).
    pub lost_seen: LostCounts,
}

impl Agent {
    /// Reads what the ring holds now into the pipeline (staged records
    /// flushed first): a duty that compares the pipeline with the kernel
    /// calls it so that every record sent until now counts.
    pub fn read_ring(&mut self, why: Read) -> anyhow::Result<()> {
        self.reader
            .read(self.ring.get_mut(), why, &mut self.pipeline, &mut self.out)
    }

    /// The numbers of a summary or a scrape (the agent's own CPU aside):
    /// the pipeline's, the outputs' and the kernel's counters.
    pub fn metrics_snapshot(&self) -> Snapshot {
        let k = &self.kernel;
        let mut snapshot = self.pipeline.metrics_snapshot();
        snapshot.transitions = k.transitions.counts();
        snapshot.lost_ring_full = self.lost_seen.ring_full;
        snapshot.lost_missed = self.lost_seen.missed;
        snapshot.programs = k.lost.program_times();
        snapshot.outputs = self.out.sinks.stats();
        snapshot.kernel_origins = k.origins.counts();
        snapshot.last_use = k.last_use.as_ref().map(|m| m.counts()).unwrap_or_default();
        snapshot.stack_copies = k.stack_copies.counts();
        snapshot.unwind = self.reader.unwind_stats();
        // Stays in CLOSE_WAIT the kernel only counted (see
        // `crate::agent::leaks`) belong in the linger histogram too.
        snapshot.linger.merge(&k.close_waits.counts().quiet_linger);
        snapshot
    }
}

/// One periodic job of the running agent: leak reports, port pressure,
/// the state file, summaries, loss mending, the capture sweep. The loop
/// runs each when it is due, between reads of the ring, and each says when
/// it is due next; at the end the loop stops each once.
pub trait Duty {
    /// Its name, for logs.
    fn name(&self) -> &'static str;

    /// Does the job once; returns how long until it is due again.
    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration>;

    /// Last words when the agent stops, after the ring's final read.
    fn stop(&mut self, _agent: &mut Agent) -> anyhow::Result<()> {
        Ok(())
    }
}
