//! Kernel timestamps (CLOCK_MONOTONIC, from `bpf_ktime_get_ns`) to wall time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps monotonic nanoseconds to wall-clock time with an offset measured
/// once and refreshed by [`WallClock::resync`] (NTP may step the wall clock).
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// Wall time minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clocks used here always exist
    // on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(id, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl WallClock {
    /// Measures the offset now.
    pub fn new() -> Self {
        let mut c = Self { offset_ns: 0 };
        c.resync();
        c
    }

    /// A clock with a fixed offset (tests).
    pub fn with_offset_ns(offset_ns: i128) -> Self {
        Self { offset_ns }
    }

    /// Measures the offset again.
    pub fn resync(&mut self) {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        self.offset_ns = real - mono;
    }

    /// Wall-clock time of monotonic timestamp `ts_ns`.
    pub fn wall(&self, ts_ns: u64) -> SystemTime {
        let ns = i128::from(ts_ns) + self.offset_ns;
        if ns <= 0 {
            return UNIX_EPOCH;
        }
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        UNIX_EPOCH + Duration::from_nanos(ns)
    }

    /// Monotonic nanoseconds now.
    pub fn now_ns() -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_applies() {
        let c = WallClock::with_offset_ns(1_000_000_000);
        assert_eq!(
            c.wall(500),
            UNIX_EPOCH + Duration::from_nanos(1_000_000_500)
        );
        let c = WallClock::with_offset_ns(-10);
        assert_eq!(c.wall(5), UNIX_EPOCH);
    }

    #[test]
    fn live_clock_is_close_to_now() {
        let c = WallClock::new();
        let wall = c.wall(WallClock::now_ns());
        let diff = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }
}
