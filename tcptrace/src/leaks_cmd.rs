//! `tcptrace leaks`: reads the running agent's state file, or, with no
//! agent running, takes a live inventory (sock_diag + /proc) so the command
//! is useful on any host.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;

use crate::clock::WallClock;
use crate::output::Format;
use crate::report::{self, LeakEntry, Snapshot, SNAPSHOT_SCHEMA};
use crate::{inventory, procfs};

fn alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The agent's snapshot, when a live agent wrote it.
fn from_agent(state_file: &str) -> Option<Snapshot> {
    let text = std::fs::read_to_string(state_file).ok()?;
    let snap: Snapshot = serde_json::from_str(&text).ok()?;
    (snap.schema == SNAPSHOT_SCHEMA && alive(snap.agent_pid)).then_some(snap)
}

/// Every socket in CLOSE_WAIT for at least `older_than`, now.
fn live(older_than: Duration) -> Snapshot {
    let now_ns = WallClock::now_ns();
    let (found, _) = inventory::take(now_ns);
    let min_ns = u64::try_from(older_than.as_nanos()).unwrap_or(u64::MAX);
    let found: Vec<_> = found
        .into_iter()
        .filter(|f| now_ns.saturating_sub(f.since_ns) >= min_ns)
        .collect();
    let inodes: HashSet<u64> = found.iter().filter_map(|f| f.entered.ino).collect();
    let holders = procfs::holders(&inodes);
    let mut queues: HashMap<u32, HashMap<u64, u64>> = HashMap::new();
    let leaks = found
        .iter()
        .map(|f| {
            let c = &f.entered.change;
            let holder = f
                .entered
                .ino
                .and_then(|i| holders.get(&i))
                .and_then(|h| h.first());
            let recv_q = holder.zip(f.entered.ino).and_then(|(h, ino)| {
                queues
                    .entry(h.pid)
                    .or_insert_with(|| procfs::recv_queues(h.pid))
                    .get(&ino)
                    .copied()
            });
            LeakEntry {
                pid: holder.map_or(0, |h| h.pid),
                comm: holder.map(|h| h.comm.clone()).unwrap_or_default(),
                exe: holder.and_then(|h| h.exe.clone()),
                cgroup: holder.and_then(|h| h.cgroup.clone()),
                fd: holder.map(|h| h.fd),
                local: std::net::SocketAddr::new(c.laddr, c.lport).to_string(),
                remote: std::net::SocketAddr::new(c.raddr, c.rport).to_string(),
                netns: c.netns,
                close_wait_ms: now_ns.saturating_sub(f.since_ns) as f64 / 1e6,
                estimated: true,
                reason: crate::leak::classify(recv_q).name().to_string(),
                origin: None,
                stack: Vec::new(),
            }
        })
        .collect();
    Snapshot {
        schema: SNAPSHOT_SCHEMA,
        agent_pid: 0,
        taken_at: crate::output::rfc3339(std::time::SystemTime::now()),
        leaks,
    }
}

/// Prints the report.
pub fn run(format: Option<Format>, state_file: &str, leak_after: Duration) -> anyhow::Result<()> {
    let (snapshot, source) = match from_agent(state_file) {
        Some(s) => {
            let source = format!("from the running agent, pid {}", s.agent_pid);
            (s, source)
        }
        None => (
            live(leak_after),
            "live inventory, no agent running: ages estimated, code paths unknown; \
             run the agent to see where connections are opened"
                .to_string(),
        ),
    };
    let format = format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    });
    let text = match format {
        Format::Text => report::render_text(&snapshot, &source),
        Format::Json => report::render_json(&snapshot),
    };
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end()).context("writing the report")?;
    Ok(())
}
