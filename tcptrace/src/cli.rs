//! Command-line interface.

use clap::Parser;

use crate::decode::Family;
use crate::filter::Filter;
use crate::output::Format;
use crate::probe::DEFAULT_RING_BYTES;
use crate::state::TcpState;

/// tcptrace: every TCP state change on this host, with who owns the socket.
#[derive(Debug, Parser)]
#[command(
    name = "tcptrace",
    version,
    about = "Trace every TCP state change on this host, with the socket's owner and how long it stayed in each state",
    long_about = "Trace every TCP state change on this host (all network namespaces), with the \
socket's owner and how long it stayed in each state.\n\n\
Each line is one transition of one socket: its addresses, the state it left and the one it \
entered, the milliseconds it spent in the state it left, the process that owns it (the one \
that called connect() or accept() on it) and the task that happened to be running when the \
kernel made the change (often not the owner: most transitions run in softirq context).\n\n\
A socket that sits in CLOSE_WAIT means its peer closed and the owner never called close(): \
watch for long CLOSE_WAIT -> LAST_ACK durations, or run with --state CLOSE_WAIT.\n\n\
Needs root, or CAP_BPF and CAP_PERFMON, and Linux >= 5.8 with BTF.",
    after_help = "Examples:\n  \
tcptrace                          every transition, JSON lines when piped\n  \
tcptrace --format text --port 3306  transitions of connections to or from port 3306\n  \
tcptrace --state close_wait        transitions into and out of CLOSE_WAIT\n  \
tcptrace --pid 4242 -6             IPv6 sockets owned by process 4242\n\n\
Logs go to stderr; set RUST_LOG=debug for more."
)]
pub struct Cli {
    /// Output format [default: json when stdout is not a terminal, text when it is]
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Only sockets owned by PID: the process that called connect() on them, or accept()
    /// (from the accept on). Repeat for several.
    #[arg(long = "pid", value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,

    /// Only connections with PORT at either end. Repeat for several.
    #[arg(long = "port", value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,

    /// Only IPv4 sockets.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only transitions into or out of STATE (e.g. CLOSE_WAIT, time_wait). Repeat, or
    /// separate with commas.
    #[arg(long = "state", value_name = "STATE", value_delimiter = ',')]
    pub states: Vec<TcpState>,

    /// Size of the kernel-to-agent ring buffer: a power of two, at least one page; K and M
    /// suffixes accepted. Raise it if the agent reports lost records.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_RING_BYTES, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
}

/// Parses a ring buffer size: `4096`, `256K`, `16M`.
pub fn parse_ring_size(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1u64 << 20),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 256K, 16M)"))?;
    let bytes = n.saturating_mul(mult);
    // SAFETY: sysconf cannot fail for _SC_PAGESIZE.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if bytes < page || !bytes.is_power_of_two() || bytes > 1 << 30 {
        return Err(format!(
            "{s} is not a power of two between the page size ({page}) and 1G"
        ));
    }
    u32::try_from(bytes).map_err(|_| format!("{s} is too large"))
}

impl Cli {
    /// The output filter these options describe.
    pub fn filter(&self) -> Filter {
        Filter {
            pids: self.pids.iter().copied().collect(),
            ports: self.ports.iter().copied().collect(),
            family: if self.ipv4 {
                Some(Family::Ipv4)
            } else if self.ipv6 {
                Some(Family::Ipv6)
            } else {
                None
            },
            states: self.states.iter().copied().collect(),
        }
    }

    /// The chosen format, defaulting on whether stdout is a terminal.
    pub fn format(&self, stdout_is_terminal: bool) -> Format {
        self.format.unwrap_or(if stdout_is_terminal {
            Format::Text
        } else {
            Format::Json
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("256K"), Ok(256 << 10));
        assert_eq!(parse_ring_size("16m"), Ok(16 << 20));
        assert!(parse_ring_size("3000").is_err());
        assert!(parse_ring_size("12K").is_err());
        assert!(parse_ring_size("x").is_err());
        assert!(parse_ring_size("4G").is_err());
        assert!(parse_ring_size("").is_err());
    }

    #[test]
    fn filters_from_flags() {
        let cli = Cli::try_parse_from([
            "tcptrace",
            "--pid",
            "7",
            "--port",
            "80",
            "--port",
            "443",
            "-6",
            "--state",
            "close_wait,LAST_ACK",
        ])
        .expect("valid");
        let f = cli.filter();
        assert_eq!(f.ports.len(), 2);
        assert_eq!(f.family, Some(Family::Ipv6));
        assert!(f.states.contains(&TcpState::LastAck));
        assert_eq!(cli.format(true), Format::Text);
        assert_eq!(cli.format(false), Format::Json);
    }

    #[test]
    fn bad_values_are_rejected() {
        for args in [
            &["tcptrace", "--port", "70000"][..],
            &["tcptrace", "--port", "0"],
            &["tcptrace", "--pid", "abc"],
            &["tcptrace", "--state", "BOGUS"],
            &["tcptrace", "--format", "xml"],
            &["tcptrace", "-4", "-6"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?} accepted");
        }
    }
}
