//! The loss duty: every second, records the kernel could not deliver are
//! reported (a `lost` event, and the advice that fits their cause), and
//! soon after a loss the CLOSE_WAIT sockets are reconciled with the
//! kernel's own list; the wall clock is re-synced on the same beat (NTP
//! may step it).

use std::time::Duration;

use crate::agent::out::Out;
use crate::agent::parts::{Agent, Duty};
use crate::agent::reader::Read;
use crate::engine::clock::WallClock;
use crate::kernel::probe::LostCounts;
use crate::output::format::Lost;
use crate::pipeline::Pipeline;

/// How often the lost counter is read (and the wall clock re-synced).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Lost records: reported, then mended.
#[derive(Default)]
pub struct LossCheck {
    mend: Mend,
}

impl Duty for LossCheck {
    fn name(&self) -> &'static str {
        "lost records"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        let now = agent.kernel.lost.counts()?;
        self.mend.pending |=
            report_lost(now, &mut agent.lost_seen, &agent.pipeline, &mut agent.out)?;
        if self.mend.due() {
            reconcile_after_loss(agent)?;
        }
        agent.pipeline.clock.resync();
        Ok(CHECK_EVERY)
    }

    fn stop(&mut self, agent: &mut Agent) -> anyhow::Result<()> {
        // Lost at the end: nothing to mend any more.
        let now = agent.kernel.lost.counts()?;
        report_lost(now, &mut agent.lost_seen, &agent.pipeline, &mut agent.out)?;
        Ok(())
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
fn reconcile_after_loss(agent: &mut Agent) -> anyhow::Result<()> {
    let dump_ns = WallClock::now_ns();
    let (listed, spaces) = crate::host::inventory::take(dump_ns);
    agent.read_ring(Read::Poll)?;
    let r = agent.pipeline.reconcile_close_waits(listed, dump_ns);
    log::info!(
        "records were lost: CLOSE_WAIT reconciled with sock_diag in {spaces} network \
         namespaces: {} sockets had left it unseen (forgotten, no duration), {} had entered \
         it unseen (their age estimated)",
        r.gone,
        r.found
    );
    Ok(())
}
