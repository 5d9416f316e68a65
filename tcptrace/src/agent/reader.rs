//! Reading the ring buffer: records to the pipeline, lines to the outputs.
//! Where the kernel stages records per CPU, every CPU is flushed first and
//! records are handed on in time order (see [`crate::engine::reorder`]);
//! stack copies are unwound as they arrive.

use aya::maps::{MapData, RingBuf};

use crate::agent::out::Out;
use crate::engine::clock::WallClock;
use crate::pipeline::Pipeline;

/// Lines handed to the outputs at once, at most.
const MAX_BATCH_LINES: usize = 4096;
/// Malformed records logged one by one before only the count is kept.
const MALFORMED_LOG_LIMIT: u64 = 10;

/// Why the ring is being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
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
/// CPU first and hands records on in time order (see [`crate::engine::reorder`]).
pub struct Reader {
    flusher: Option<crate::kernel::stage::Flusher>,
    reorder: crate::engine::reorder::Reorder,
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
    pub cfi: Option<crate::host::unwind::CfiStacks>,
}

impl Reader {
    /// A reader; `flusher` when the kernel stages records.
    pub fn new(flusher: Option<crate::kernel::stage::Flusher>, ring_bytes: u32) -> Self {
        Self {
            flusher,
            reorder: crate::engine::reorder::Reorder::default(),
            flush_errors: 0,
            busy_since: None,
            busy_stalls: 0,
            max_held: ((f64::from(ring_bytes) * HELD_RECORDS_PER_RING_BYTE) as usize).max(4096),
            overflows: 0,
            cfi: None,
        }
    }

    /// What unwinding did (zeros when the kernel copies no stacks).
    pub fn unwind_stats(&self) -> crate::host::unwind::UnwindStats {
        self.cfi
            .as_ref()
            .map(crate::host::unwind::CfiStacks::stats)
            .unwrap_or_default()
    }

    /// Reads what the ring holds and hands it to `pipeline`, the lines to
    /// `out`.
    pub fn read(
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
            let split = crate::engine::decode::split_timed(&item, |ts, raw| reorder.push(ts, raw));
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
fn log_malformed(decoded: Result<(), crate::engine::decode::DecodeError>, pipeline: &Pipeline) {
    if let Err(e) = decoded {
        if pipeline.malformed <= MALFORMED_LOG_LIMIT {
            log::warn!("dropping a malformed record: {e}");
        }
    }
}

/// Reads what the ring holds, in ring order, and hands it on.
fn drain(
    ring: &mut RingBuf<MapData>,
    mut cfi: Option<&mut crate::host::unwind::CfiStacks>,
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
/// flushing the outputs every `MAX_BATCH_LINES` lines: a ring that
/// refills as fast as it is read must not grow one endless batch.
#[derive(Default)]
pub struct Feeder {
    /// Scratch: one record's lines.
    lines: Vec<String>,
    /// Lines since the last flush.
    batched: usize,
}

impl Feeder {
    /// Hands one raw record on. A malformed record is counted and dropped
    /// (the first few logged), never fatal.
    pub fn feed(
        &mut self,
        pipeline: &mut Pipeline,
        raw: &[u8],
        out: &mut Out,
    ) -> anyhow::Result<()> {
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
