//! Puts records back in time order when the kernel stages some of them
//! (`CONFIG_STAGE`). Pure: no I/O, no clock.
//!
//! With staging, a CPU holds its short records in a batch until the batch
//! is full or the agent flushes it, while other records (and other CPUs'
//! batches) go into the ring at once. So the ring no longer holds a
//! socket's transitions in the order they happened: an entry into
//! CLOSE_WAIT, sent at once, can come before the staged transition into
//! ESTABLISHED that preceded it. The agent flushes every CPU before it
//! reads the ring; every record stamped before the flush began is then in
//! the ring, or is a record still being written (which the kernel stamped
//! before it reserved ring space, and whose socket's next transition can
//! only come after). So records are held here until a flush vouches for
//! their time, and released sorted by it.

/// A held record: its kernel time and where its bytes are.
#[derive(Clone, Copy, Debug)]
struct Held {
    ts: u64,
    start: usize,
    len: usize,
}

/// Records waiting for a flush to vouch for their time, as the raw bytes
/// the kernel wrote (a short record is 64 bytes; decoded, with its comm on
/// the heap, some 170): they are decoded as they are released.
#[derive(Debug, Default)]
pub struct Reorder {
    /// The held records' bytes, back to back, in arrival order.
    bytes: Vec<u8>,
    /// Not yet released, in arrival order.
    held: Vec<Held>,
    /// Every record stamped before this has been released.
    released_to: u64,
}

impl Reorder {
    /// Holds raw record `raw`, stamped `ts`, until [`Reorder::release`]
    /// passes its time; a record older than what was already released (one
    /// still being written during the flush) goes out with the next
    /// release, first.
    pub fn push(&mut self, ts: u64, raw: &[u8]) {
        self.held.push(Held {
            ts,
            start: self.bytes.len(),
            len: raw.len(),
        });
        self.bytes.extend_from_slice(raw);
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hands `out` every held record stamped before `watermark` (the
    /// moment a flush of every CPU began), oldest first; records with the
    /// same time keep their arrival order. `u64::MAX` releases everything
    /// (the agent stops).
    pub fn release(&mut self, watermark: u64, mut out: impl FnMut(&[u8])) {
        self.released_to = self.released_to.max(watermark);
        let bytes = |h: &Held| &self.bytes[h.start..h.start + h.len];
        if self.held.is_sorted_by_key(|h| h.ts) && self.held.last().is_none_or(|h| h.ts < watermark)
        {
            self.held.iter().for_each(|h| out(bytes(h)));
            self.held.clear();
            self.bytes.clear();
            return;
        }
        // Stable: a socket's transitions stamped in the same nanosecond
        // stay in the order the ring had them.
        let mut order: Vec<usize> = (0..self.held.len()).collect();
        order.sort_by_key(|&i| self.held[i].ts);
        let split = order.partition_point(|&i| self.held[i].ts < watermark);
        for &i in &order[..split] {
            out(bytes(&self.held[i]));
        }
        // What stays moves to the front, in arrival order; the buffers
        // keep their capacity for the next read. Arrival order is storage
        // order, so each record moves down, never over one not yet moved.
        let mut kept = order.split_off(split);
        kept.sort_unstable();
        let mut end = 0;
        for (n, i) in kept.into_iter().enumerate() {
            let h = self.held[i];
            self.bytes.copy_within(h.start..h.start + h.len, end);
            self.held[n] = Held { start: end, ..h };
            end += h.len;
        }
        self.held.truncate(self.held.len() - split);
        self.bytes.truncate(end);
    }

    /// The watermark of the last release.
    pub fn released_to(&self) -> u64 {
        self.released_to
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::decode::{self, raw, Record};
    use tcptrace_common::tcp_state as k;

    fn hold(r: &mut Reorder, sk: u64, ts: u64, old: i32, new: i32) {
        let rec = raw::ipv4_state(sk, ts, old, new, ([127, 0, 0, 1], 1), ([127, 0, 0, 1], 2));
        let bytes = raw::state_bytes(&rec);
        decode::split_timed(&bytes, |ts, raw| r.push(ts, raw)).expect("a single record");
    }

    fn released(r: &mut Reorder, watermark: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        r.release(watermark, |raw| match decode::decode(raw) {
            Ok(Record::State(c)) => out.push((c.sk, c.ts_ns)),
            other => panic!("not a state record: {other:?}"),
        });
        out
    }

    #[test]
    fn a_staged_transition_goes_out_before_a_later_one_sent_at_once() {
        let mut r = Reorder::default();
        // The entry into CLOSE_WAIT went into the ring at once; the
        // staged transition into ESTABLISHED came with the flush.
        hold(&mut r, 1, 300, k::ESTABLISHED, k::CLOSE_WAIT);
        hold(&mut r, 1, 100, k::SYN_RECV, k::ESTABLISHED);
        assert_eq!(released(&mut r, 1_000), vec![(1, 100), (1, 300)]);
        assert!(r.is_empty());
    }

    #[test]
    fn records_after_the_watermark_wait_for_the_next_flush() {
        let mut r = Reorder::default();
        hold(&mut r, 1, 100, k::CLOSE, k::SYN_SENT);
        hold(&mut r, 1, 900, k::SYN_SENT, k::ESTABLISHED);
        assert_eq!(released(&mut r, 500), vec![(1, 100)]);
        assert_eq!(r.len(), 1);
        // The flush that vouches for 900 brought an older record of
        // another CPU with it.
        hold(&mut r, 2, 700, k::LISTEN, k::SYN_RECV);
        assert_eq!(released(&mut r, 1_000), vec![(2, 700), (1, 900)]);
        assert_eq!(r.released_to(), 1_000);
    }

    #[test]
    fn a_late_record_goes_out_first_with_the_next_release() {
        let mut r = Reorder::default();
        assert!(released(&mut r, 500).is_empty());
        hold(&mut r, 1, 600, k::ESTABLISHED, k::FIN_WAIT1);
        // Stamped before the last flush, written after it.
        hold(&mut r, 2, 400, k::ESTABLISHED, k::CLOSE_WAIT);
        assert_eq!(released(&mut r, 800), vec![(2, 400), (1, 600)]);
    }

    #[test]
    fn equal_times_keep_arrival_order_and_max_releases_everything() {
        let mut r = Reorder::default();
        hold(&mut r, 3, 7, k::LISTEN, k::SYN_RECV);
        hold(&mut r, 1, 5, k::FIN_WAIT1, k::FIN_WAIT2);
        hold(&mut r, 2, 5, k::FIN_WAIT2, k::CLOSE);
        hold(&mut r, 4, u64::MAX - 1, k::LISTEN, k::SYN_RECV);
        assert_eq!(
            released(&mut r, u64::MAX),
            vec![(1, 5), (2, 5), (3, 7), (4, u64::MAX - 1)]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn kept_records_survive_several_releases_whole() {
        let mut r = Reorder::default();
        for ts in [50, 10, 40, 20, 30] {
            hold(&mut r, ts, ts, k::SYN_SENT, k::ESTABLISHED);
        }
        assert_eq!(released(&mut r, 25), vec![(10, 10), (20, 20)]);
        assert_eq!(released(&mut r, 35), vec![(30, 30)]);
        hold(&mut r, 5, 5, k::SYN_SENT, k::ESTABLISHED);
        assert_eq!(released(&mut r, 100), vec![(5, 5), (40, 40), (50, 50)]);
    }
}
