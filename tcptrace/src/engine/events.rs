//! What the operator asked to see (`--events`), and what that asks of the
//! kernel: which transitions it must send, and whether it keeps
//! connections' origins itself. Below the CLI that parses it and the
//! kernel edge that configures the programs from it.

use crate::engine::filter::Filter;

/// Kinds of events the agent prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum EventKind {
    /// Every state transition (`state_change`).
    StateChange,
    /// Sockets leaving CLOSE_WAIT (`close_wait_end`).
    CloseWait,
    /// CLOSE_WAIT leaks (`leak`, `leak_end`, `leak_group`).
    Leak,
    /// Connections entering TIME_WAIT (`time_wait`): can be the busiest stream.
    TimeWait,
    /// Destinations whose TIME_WAIT sockets fill 50/80/95 % of the port range.
    PortPressure,
    /// Periodic counts (`summary`, every --summary-interval): proof of life, drop counters.
    Summary,
}

/// A set of [`EventKind`]s: a bit each, since the pipeline asks it several
/// times for every transition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSet(u8);

impl EventSet {
    fn bit(kind: EventKind) -> u8 {
        1 << kind as u8
    }

    /// True when `kind` is in the set.
    pub fn contains(&self, kind: &EventKind) -> bool {
        self.0 & Self::bit(*kind) != 0
    }

    /// Adds `kind`.
    pub fn insert(&mut self, kind: EventKind) {
        self.0 |= Self::bit(kind);
    }
}

impl FromIterator<EventKind> for EventSet {
    fn from_iter<I: IntoIterator<Item = EventKind>>(kinds: I) -> Self {
        let mut set = Self::default();
        for kind in kinds {
            set.insert(kind);
        }
        set
    }
}

impl<const N: usize> From<[EventKind; N]> for EventSet {
    fn from(kinds: [EventKind; N]) -> Self {
        kinds.into_iter().collect()
    }
}

/// The transitions the kernel must send for `events`, as (new-state mask,
/// old-state mask) of `1 << state` bits (see `KernelConfig::emit_new`).
/// Printing every transition needs them all; the detectors need far fewer,
/// and every record not sent is work the host's CPU does not do.
///
/// With `origin_map` (see [`uses_origin_map`]) the kernel keeps origins
/// itself, so neither connect()'s CLOSE -> SYN_SENT nor accept() is sent;
/// nor is the end of a socket, unless TIME_WAIT needs it.
pub fn kernel_interest(events: &crate::engine::events::EventSet, origin_map: bool) -> (u32, u32) {
    use tcptrace_common::tcp_state as k;
    if events.contains(&EventKind::StateChange) {
        return (u32::MAX, u32::MAX);
    }
    let bit = |s: i32| 1u32 << s;
    // Entering and leaving CLOSE_WAIT.
    let mut new = bit(k::CLOSE_WAIT);
    let old = bit(k::CLOSE_WAIT);
    if !origin_map {
        // The owner and origin of a connect() (CLOSE -> SYN_SENT), and the
        // end of every socket (the tracker forgets it).
        new |= bit(k::SYN_SENT) | bit(k::CLOSE);
    }
    if events.contains(&EventKind::TimeWait) || events.contains(&EventKind::PortPressure) {
        // Who closed first (the task that moved it to FIN_WAIT1), and the
        // CLOSE that hands the connection to TIME_WAIT.
        new |= bit(k::FIN_WAIT1) | bit(k::CLOSE);
    }
    (new, old)
}

/// True when the kernel should keep connection origins in its `ORIGINS`
/// map (`CONFIG_ORIGIN_MAP`) rather than send them: when no line needs the
/// owner of every socket as it changes state. Printing every transition
/// does, `close_wait` lines name every lingering socket's owner, and
/// `--pid` selects sockets by owner as they go. The agent then reads an
/// origin, and finds the holders under /proc, only for leak candidates.
pub fn uses_origin_map(events: &crate::engine::events::EventSet, filter: &Filter) -> bool {
    !events.contains(&EventKind::StateChange)
        && !events.contains(&EventKind::CloseWait)
        && filter.pids.is_empty()
}
