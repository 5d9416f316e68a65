//! TCP states as the kernel numbers and names them.

use std::fmt;
use std::str::FromStr;

use tcptrace_common::tcp_state as k;

/// A kernel TCP state (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcpState {
    /// Connection open, data flows.
    Established,
    /// `connect()` sent a SYN.
    SynSent,
    /// A SYN arrived on a listener; the child socket awaits the final ACK.
    SynRecv,
    /// Local side closed first, FIN sent.
    FinWait1,
    /// Our FIN was acknowledged; waiting for the peer's FIN.
    FinWait2,
    /// Waiting 2*MSL after the close (a separate mini-socket in Linux).
    TimeWait,
    /// No connection.
    Close,
    /// The peer closed; only the local application's `close()` ends this.
    CloseWait,
    /// Local close after the peer's; waiting for the last ACK.
    LastAck,
    /// Listening socket.
    Listen,
    /// Both sides closed at the same time.
    Closing,
    /// A request socket (SYN received, not yet a full socket).
    NewSynRecv,
}

/// Every state, in kernel numbering order.
pub const ALL_STATES: [TcpState; 12] = [
    TcpState::Established,
    TcpState::SynSent,
    TcpState::SynRecv,
    TcpState::FinWait1,
    TcpState::FinWait2,
    TcpState::TimeWait,
    TcpState::Close,
    TcpState::CloseWait,
    TcpState::LastAck,
    TcpState::Listen,
    TcpState::Closing,
    TcpState::NewSynRecv,
];

impl TcpState {
    /// The state with kernel number `n`, if there is one.
    pub fn from_kernel(n: i32) -> Option<Self> {
        Some(match n {
            k::ESTABLISHED => Self::Established,
            k::SYN_SENT => Self::SynSent,
            k::SYN_RECV => Self::SynRecv,
            k::FIN_WAIT1 => Self::FinWait1,
            k::FIN_WAIT2 => Self::FinWait2,
            k::TIME_WAIT => Self::TimeWait,
            k::CLOSE => Self::Close,
            k::CLOSE_WAIT => Self::CloseWait,
            k::LAST_ACK => Self::LastAck,
            k::LISTEN => Self::Listen,
            k::CLOSING => Self::Closing,
            k::NEW_SYN_RECV => Self::NewSynRecv,
            _ => return None,
        })
    }

    /// The kernel's name without the `TCP_` prefix, e.g. `CLOSE_WAIT`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Established => "ESTABLISHED",
            Self::SynSent => "SYN_SENT",
            Self::SynRecv => "SYN_RECV",
            Self::FinWait1 => "FIN_WAIT1",
            Self::FinWait2 => "FIN_WAIT2",
            Self::TimeWait => "TIME_WAIT",
            Self::Close => "CLOSE",
            Self::CloseWait => "CLOSE_WAIT",
            Self::LastAck => "LAST_ACK",
            Self::Listen => "LISTEN",
            Self::Closing => "CLOSING",
            Self::NewSynRecv => "NEW_SYN_RECV",
        }
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

/// A state name that is not one of the kernel's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownState(pub String);

impl fmt::Display for UnknownState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ALL_STATES.iter().map(|s| s.name()).collect();
        write!(
            f,
            "unknown TCP state {:?}; expected one of {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownState {}

impl FromStr for TcpState {
    type Err = UnknownState;

    /// Case-insensitive; accepts the kernel's `TCP_` prefix and `-` for `_`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        let norm = norm.strip_prefix("TCP_").unwrap_or(&norm);
        ALL_STATES
            .iter()
            .copied()
            .find(|st| st.name() == norm)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_numbers_round_trip() {
        for (i, st) in ALL_STATES.iter().enumerate() {
            assert_eq!(TcpState::from_kernel(i as i32 + 1), Some(*st));
        }
        assert_eq!(TcpState::from_kernel(0), None);
        assert_eq!(TcpState::from_kernel(13), None);
        assert_eq!(TcpState::from_kernel(-1), None);
    }

    #[test]
    fn parses_names_leniently() {
        assert_eq!("close_wait".parse(), Ok(TcpState::CloseWait));
        assert_eq!("TCP_TIME_WAIT".parse(), Ok(TcpState::TimeWait));
        assert_eq!("fin-wait1".parse(), Ok(TcpState::FinWait1));
        let err = "BOGUS".parse::<TcpState>().unwrap_err();
        assert!(err.to_string().contains("CLOSE_WAIT"));
    }
}
