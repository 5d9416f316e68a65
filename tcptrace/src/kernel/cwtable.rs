//! The kernel's `CLOSE_WAITS` table (see [`CONFIG_CW_TABLE`]): sockets in
//! CLOSE_WAIT that the kernel keeps instead of sending, read in place
//! through a read-only shared mapping of the array.
//!
//! The kernel claims a slot by its `skaddr`, writes the entry, and sets
//! `kind` last with an atomic (a full barrier); it clears `kind` first when
//! the socket leaves. A slot copied while it changes is skipped and read
//! again on the next tick.
//!
//! [`CONFIG_CW_TABLE`]: tcptrace_common::CONFIG_CW_TABLE

use anyhow::{bail, Context as _};
use aya::maps::{Map, MapData, PerCpuArray};
use tcptrace_common::{
    StateRecord, CW_FULL, CW_KEPT, CW_LINGER, CW_LINGER_SUM_NS, CW_QUIET, CW_SENT, LINGER_BUCKETS,
    RECORD_STATE,
};

use crate::engine::closewait::LingerHistogram;
use crate::kernel::mapped::MappedArray;

/// The table, mapped, and its per-CPU counts.
pub struct CloseWaitTable {
    table: MappedArray<StateRecord>,
    counts: PerCpuArray<MapData, u64>,
}

/// What the kernel counted for the table since load.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CloseWaitCounts {
    /// Sockets kept on entering CLOSE_WAIT.
    pub kept: u64,
    /// Of those, left after a quiet linger: counted only.
    pub quiet: u64,
    /// Of those, left after a longer one: sent at their exit.
    pub sent: u64,
    /// Entries sent because the table had no slot for them.
    pub full: u64,
    /// Linger times of the quiet ones.
    pub quiet_linger: LingerHistogram,
}

impl CloseWaitCounts {
    /// Sockets in the table now.
    pub fn held(&self) -> u64 {
        self.kept.saturating_sub(self.quiet + self.sent)
    }
}

impl CloseWaitTable {
    /// Maps `map` (an array of `slots` [`StateRecord`]s created with
    /// BPF_F_MMAPABLE) read-only; `counts` is its `CW_COUNTS` map.
    pub fn open(map: Map, slots: usize, counts: Map) -> anyhow::Result<Self> {
        let Map::Array(map) = map else {
            bail!("the CLOSE_WAITS map is not an array");
        };
        let counts = PerCpuArray::try_from(counts).context("opening the CW_COUNTS map")?;
        Ok(Self {
            table: MappedArray::open(map, slots, "CLOSE_WAITS")?,
            counts,
        })
    }

    /// Entries of sockets in CLOSE_WAIT since at least `min_age_ns` before
    /// `now_ns` (both `CLOCK_MONOTONIC`, as the kernel's timestamps).
    pub fn lingering(&self, min_age_ns: u64, now_ns: u64) -> Vec<StateRecord> {
        (0..self.table.len())
            .filter_map(|i| self.read(i))
            .filter(|rec| now_ns.saturating_sub(rec.ts_ns) >= min_age_ns)
            .collect()
    }

    /// A whole entry of slot `i`, or `None` for a free slot or one that
    /// changed while it was copied.
    fn read(&self, i: usize) -> Option<StateRecord> {
        // Held: `kind` says a whole record, for this socket since this time.
        self.table.stable_copy(i, |s| {
            // SAFETY: plain fields of a slot (or of a copy), read volatile.
            let (kind, sk, ts) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*s).kind)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*s).skaddr)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*s).ts_ns)),
                )
            };
            (kind == RECORD_STATE && sk != 0).then_some((sk, ts))
        })
    }

    /// The kernel's counts, summed over CPUs (zeros when unreadable).
    pub fn counts(&self) -> CloseWaitCounts {
        let slot = |i: u32| crate::kernel::maps::per_cpu_sum(&self.counts, i);
        let mut quiet_linger = LingerHistogram::default();
        for (b, count) in quiet_linger.buckets.iter_mut().enumerate() {
            *count = slot(CW_LINGER + b as u32);
        }
        debug_assert_eq!(quiet_linger.buckets.len(), LINGER_BUCKETS as usize);
        quiet_linger.count = quiet_linger.buckets.iter().sum();
        quiet_linger.sum_ms = slot(CW_LINGER_SUM_NS) as f64 / 1e6;
        CloseWaitCounts {
            kept: slot(CW_KEPT),
            quiet: slot(CW_QUIET),
            sent: slot(CW_SENT),
            full: slot(CW_FULL),
            quiet_linger,
        }
    }
}

/// Remembers which kept entries the pipeline has been given, so that each
/// goes in once (and an exit the kernel sends with a copy of the entry
/// finds the pipeline already holding it: the pipeline ignores a repeat).
#[derive(Debug, Default)]
pub struct Announced {
    seen: std::collections::HashSet<(u64, u64)>,
}

impl Announced {
    /// Of `lingering` (a whole scan), the entries not given before;
    /// forgets entries no longer in the table.
    pub fn fresh(&mut self, lingering: Vec<StateRecord>) -> Vec<StateRecord> {
        let now: std::collections::HashSet<(u64, u64)> =
            lingering.iter().map(|r| (r.skaddr, r.ts_ns)).collect();
        let fresh = lingering
            .into_iter()
            .filter(|r| !self.seen.contains(&(r.skaddr, r.ts_ns)))
            .collect();
        self.seen = now;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sk: u64, ts_ns: u64) -> StateRecord {
        let mut rec: StateRecord = unsafe { std::mem::zeroed() };
        rec.kind = RECORD_STATE;
        rec.skaddr = sk;
        rec.ts_ns = ts_ns;
        rec
    }

    #[test]
    fn each_kept_entry_is_announced_once_while_it_stays() {
        let mut a = Announced::default();
        let got = |v: Vec<StateRecord>| -> Vec<u64> { v.iter().map(|r| r.skaddr).collect() };
        assert_eq!(got(a.fresh(vec![entry(1, 10), entry(2, 20)])), vec![1, 2]);
        assert_eq!(
            got(a.fresh(vec![entry(1, 10), entry(2, 20)])),
            Vec::<u64>::new()
        );
        // 2 left; 1 stays; 3 arrives; the address of 2 comes back later,
        // a new socket (another entry time): announced again.
        assert_eq!(got(a.fresh(vec![entry(1, 10), entry(3, 30)])), vec![3]);
        assert_eq!(got(a.fresh(vec![entry(2, 40)])), vec![2]);
    }

    #[test]
    fn held_is_kept_minus_what_left() {
        let c = CloseWaitCounts {
            kept: 10,
            quiet: 6,
            sent: 3,
            ..Default::default()
        };
        assert_eq!(c.held(), 1);
        assert_eq!(CloseWaitCounts::default().held(), 0);
    }
}
