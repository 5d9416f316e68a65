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

use crate::decode::Record;

/// The kernel timestamp of a record.
pub fn record_ts(record: &Record) -> u64 {
    match record {
        Record::State(c) => c.ts_ns,
        Record::Accept(a) => a.ts_ns,
        Record::Reset(r) => r.ts_ns,
    }
}

/// What a released record leaves in its place until the rest is moved.
const STAND_IN: Record = Record::Reset(crate::decode::Reset {
    ts_ns: 0,
    sk: 0,
    sent: false,
});

/// Records waiting for a flush to vouch for their time.
#[derive(Debug, Default)]
pub struct Reorder {
    /// Not yet released, in arrival order.
    held: Vec<Record>,
    /// Every record stamped before this has been released.
    released_to: u64,
}

impl Reorder {
    /// Holds `record` until [`Reorder::release`] passes its time; a record
    /// older than what was already released (one that was still being
    /// written during the flush) goes out with the next release, first.
    pub fn push(&mut self, record: Record) {
        self.held.push(record);
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
    pub fn release(&mut self, watermark: u64, mut out: impl FnMut(Record)) {
        self.released_to = self.released_to.max(watermark);
        if self.held.is_empty() {
            return;
        }
        if self.held.is_sorted_by_key(record_ts)
            && self.held.last().map(record_ts) < Some(watermark)
        {
            self.held.drain(..).for_each(out);
            return;
        }
        // Sort (time, arrival) pairs, not the records: a record is some
        // 150 bytes, and a sort moves each one many times. The arrival
        // index keeps records of the same nanosecond in ring order.
        let mut order: Vec<(u64, usize)> = self
            .held
            .iter()
            .enumerate()
            .map(|(i, r)| (record_ts(r), i))
            .collect();
        order.sort_unstable();
        let split = order.partition_point(|&(ts, _)| ts < watermark);
        // Records are taken out in place (a heap-free stand-in left
        // behind), so that a full ring's worth is not held twice.
        let mut take = |i: usize| std::mem::replace(&mut self.held[i], STAND_IN);
        for &(_, i) in &order[..split] {
            out(take(i));
        }
        // What stays keeps its arrival order.
        let mut kept: Vec<usize> = order[split..].iter().map(|&(_, i)| i).collect();
        kept.sort_unstable();
        let kept: Vec<Record> = kept.into_iter().map(take).collect();
        self.held = kept;
    }

    /// The watermark of the last release.
    pub fn released_to(&self) -> u64 {
        self.released_to
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{self, raw};
    use tcptrace_common::tcp_state as k;

    fn change(sk: u64, ts: u64, old: i32, new: i32) -> Record {
        let rec = raw::ipv4_state(sk, ts, old, new, ([127, 0, 0, 1], 1), ([127, 0, 0, 1], 2));
        decode::decode(&raw::state_bytes(&rec)).expect("valid record")
    }

    fn released(r: &mut Reorder, watermark: u64) -> Vec<u64> {
        let mut out = Vec::new();
        r.release(watermark, |rec| out.push(record_ts(&rec)));
        out
    }

    #[test]
    fn a_staged_transition_goes_out_before_a_later_one_sent_at_once() {
        let mut r = Reorder::default();
        // The entry into CLOSE_WAIT went into the ring at once; the
        // staged transition into ESTABLISHED came with the flush.
        r.push(change(1, 300, k::ESTABLISHED, k::CLOSE_WAIT));
        r.push(change(1, 100, k::SYN_RECV, k::ESTABLISHED));
        assert_eq!(released(&mut r, 1_000), vec![100, 300]);
        assert!(r.is_empty());
    }

    #[test]
    fn records_after_the_watermark_wait_for_the_next_flush() {
        let mut r = Reorder::default();
        r.push(change(1, 100, k::CLOSE, k::SYN_SENT));
        r.push(change(1, 900, k::SYN_SENT, k::ESTABLISHED));
        assert_eq!(released(&mut r, 500), vec![100]);
        assert_eq!(r.len(), 1);
        // The flush that vouches for 900 brought an older record of
        // another CPU with it.
        r.push(change(2, 700, k::LISTEN, k::SYN_RECV));
        assert_eq!(released(&mut r, 1_000), vec![700, 900]);
        assert_eq!(r.released_to(), 1_000);
    }

    #[test]
    fn a_late_record_goes_out_first_with_the_next_release() {
        let mut r = Reorder::default();
        assert!(released(&mut r, 500).is_empty());
        r.push(change(1, 600, k::ESTABLISHED, k::FIN_WAIT1));
        // Stamped before the last flush, written after it.
        r.push(change(2, 400, k::ESTABLISHED, k::CLOSE_WAIT));
        assert_eq!(released(&mut r, 800), vec![400, 600]);
    }

    #[test]
    fn equal_times_keep_arrival_order_and_max_releases_everything() {
        let mut r = Reorder::default();
        r.push(change(1, 5, k::FIN_WAIT1, k::FIN_WAIT2));
        r.push(change(1, 5, k::FIN_WAIT2, k::CLOSE));
        r.push(change(2, u64::MAX - 1, k::LISTEN, k::SYN_RECV));
        let mut order = Vec::new();
        r.release(u64::MAX, |rec| {
            if let Record::State(c) = rec {
                order.push((c.sk, c.new));
            }
        });
        use crate::state::TcpState;
        assert_eq!(
            order,
            vec![
                (1, TcpState::FinWait2),
                (1, TcpState::Close),
                (2, TcpState::SynRecv)
            ]
        );
    }
}
