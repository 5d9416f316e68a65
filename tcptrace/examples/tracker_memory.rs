//! The tracker's memory with N sockets (default 1 000 000), each with an
//! owner and an origin as the agent learns them from connect(): what the
//! agent's RSS grows by when the host holds that many connections. Run by
//! `cargo xtask bench`; prints one line.

use std::net::{IpAddr, Ipv4Addr};

use tcptrace::engine::decode::{Family, StateChange, Task};
use tcptrace::engine::state::TcpState;
use tcptrace::engine::tracker::Tracker;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn change(sk: u64, ts_ns: u64, old: TcpState, new: TcpState) -> StateChange {
    StateChange {
        ts_ns,
        sk,
        netns: Some(4026531840),
        family: Family::Ipv4,
        laddr: IpAddr::V4(Ipv4Addr::new(10, 0, (sk >> 16) as u8, (sk >> 8) as u8)),
        lport: (sk & 0xffff) as u16,
        raddr: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)),
        rport: 443,
        old,
        new,
        ctx: Task {
            pid: 4242,
            tid: 4243,
            comm: "orders-svc".into(),
        },
        connect_fd: Some(7),
        stack_id: Some(12),
        ino: Some(sk),
    }
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let before = rss_bytes();
    let mut tracker = Tracker::new(n);
    for i in 0..n as u64 {
        let sk = 0xffff_8880_0000_0000 + i * 2048;
        tracker.on_state(change(sk, i, TcpState::Close, TcpState::SynSent));
        tracker.on_state(change(sk, i + 1, TcpState::SynSent, TcpState::Established));
    }
    let after = rss_bytes();
    let grown = after.saturating_sub(before);
    println!(
        "{} sockets tracked: RSS {:.1} MiB ({:.1} MiB for the tracker, {} bytes per socket)",
        tracker.len(),
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0,
        grown / tracker.len().max(1) as u64
    );
}
