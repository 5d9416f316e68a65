//! decode -> tracker -> filter -> format, for one record at a time. Pure:
//! bytes in, lines out; the agent owns all I/O.

use std::time::SystemTime;

use crate::clock::WallClock;
use crate::decode::{self, DecodeError, Record};
use crate::filter::Filter;
use crate::output::{Format, Lost};
use crate::tracker::Tracker;

/// The middle of the agent.
#[derive(Debug)]
pub struct Pipeline {
    /// Per-socket state.
    pub tracker: Tracker,
    /// What to show.
    pub filter: Filter,
    /// How to show it.
    pub format: Format,
    /// Kernel time to wall time.
    pub clock: WallClock,
    /// Records rejected by the decoder.
    pub malformed: u64,
}

impl Pipeline {
    /// A pipeline with an empty tracker.
    pub fn new(filter: Filter, format: Format, clock: WallClock) -> Self {
        Self {
            tracker: Tracker::default(),
            filter,
            format,
            clock,
            malformed: 0,
        }
    }

    /// Handles one raw record: `Ok(Some(line))` when it produces output,
    /// `Err` when it is malformed (counted, never fatal).
    pub fn handle(&mut self, raw: &[u8]) -> Result<Option<String>, DecodeError> {
        let record = decode::decode(raw).inspect_err(|_| self.malformed += 1)?;
        Ok(match record {
            Record::State(change) => {
                let t = self.tracker.on_state(change);
                self.filter
                    .matches(&t)
                    .then(|| self.format.transition(&t, self.clock.wall(t.change.ts_ns)))
            }
            Record::Accept(accept) => {
                self.tracker.on_accept(&accept);
                None
            }
        })
    }

    /// The line reporting `lost` records.
    pub fn lost_line(&self, lost: Lost) -> String {
        self.format.lost(lost, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::raw;
    use tcptrace_common::tcp_state as k;

    #[test]
    fn a_client_life_becomes_json_lines() {
        let mut p = Pipeline::new(
            Filter::default(),
            Format::Json,
            WallClock::with_offset_ns(0),
        );
        let states = [
            (k::CLOSE, k::SYN_SENT),
            (k::SYN_SENT, k::ESTABLISHED),
            (k::ESTABLISHED, k::FIN_WAIT1),
            (k::FIN_WAIT1, k::FIN_WAIT2),
            (k::FIN_WAIT2, k::CLOSE),
        ];
        let mut lines = Vec::new();
        for (i, (old, new)) in states.into_iter().enumerate() {
            let mut rec = raw::ipv4_state(
                1,
                i as u64 * 1_000_000,
                old,
                new,
                ([127, 0, 0, 1], 4),
                ([127, 0, 0, 1], 5),
            );
            if i == 0 {
                rec.connect_fd = 3;
            }
            lines.push(
                p.handle(&raw::state_bytes(&rec))
                    .expect("valid")
                    .expect("unfiltered"),
            );
        }
        let v: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert!(v[0]["prev_state_ms"].is_null());
        assert_eq!(v[1]["prev_state_ms"], 1.0);
        assert_eq!(v[4]["new"], "CLOSE");
        assert!(v.iter().all(|l| l["pid"] == 100 && l["fd"] == 3));
        assert!(p.tracker.is_empty());
    }

    #[test]
    fn malformed_records_are_counted_and_do_not_stop_the_stream() {
        let mut p = Pipeline::new(
            Filter::default(),
            Format::Json,
            WallClock::with_offset_ns(0),
        );
        assert!(p.handle(&[1, 2, 3]).is_err());
        assert!(p.handle(&[0; 200]).is_err());
        assert_eq!(p.malformed, 2);
        let rec = raw::ipv4_state(
            1,
            0,
            k::CLOSE,
            k::SYN_SENT,
            ([127, 0, 0, 1], 4),
            ([127, 0, 0, 1], 5),
        );
        assert!(p.handle(&raw::state_bytes(&rec)).expect("valid").is_some());
    }
}
