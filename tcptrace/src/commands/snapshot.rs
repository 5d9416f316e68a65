//! `tcptrace leaks` and `tcptrace timewait`: read the running agent's state
//! file, or, with no agent running, take a live inventory (sock_diag +
//! /proc) so the commands are useful on any host.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::Context as _;

use crate::engine::clock::WallClock;
use crate::host::{inventory, procfs};
use crate::output::format::Format;
use crate::output::report::{self, LeakEntry, Snapshot, SNAPSHOT_SCHEMA};

fn alive(pid: u32) -> bool {
    pid != 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The agent's snapshot, when a live agent wrote it.
fn from_agent(state_file: &str) -> Option<Snapshot> {
    let text = std::fs::read_to_string(state_file).ok()?;
    let snap: Snapshot = serde_json::from_str(&text).ok()?;
    (snap.schema == SNAPSHOT_SCHEMA && alive(snap.agent_pid)).then_some(snap)
}

/// How long a live inventory waits for a container's name.
const NAME_WAIT: Duration = Duration::from_secs(1);

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
                identity: holder.map(|h| h.identity.clone()).unwrap_or_default(),
                fd: holder.map(|h| h.fd),
                local: std::net::SocketAddr::new(c.laddr, c.lport).to_string(),
                remote: std::net::SocketAddr::new(c.raddr, c.rport).to_string(),
                netns: c.netns,
                close_wait_ms: now_ns.saturating_sub(f.since_ns) as f64 / 1e6,
                estimated: true,
                reason: crate::engine::leak::classify(recv_q).name().to_string(),
                origin: None,
                stack: Vec::new(),
                stack_truncated: false,
                last_use: None,
            }
        })
        .collect::<Vec<LeakEntry>>();
    let mut leaks = leaks;
    // Container and pod names, as the agent would give them.
    if let Ok(names) = crate::host::names::Names::start(crate::host::names::Sources::default()) {
        for l in &mut leaks {
            names.fill_waiting(&mut l.identity, NAME_WAIT);
        }
    }
    Snapshot {
        schema: SNAPSHOT_SCHEMA,
        agent_pid: 0,
        taken_at: crate::output::format::rfc3339(std::time::SystemTime::now()),
        leaks,
        time_wait: Vec::new(),
    }
}

/// TIME_WAIT counts of every namespace now, from the kernel.
fn live_time_wait() -> Snapshot {
    let sweep = crate::host::portspace::sweep();
    let mut pressure = crate::engine::timewait::PortPressure::new();
    let now_ns = WallClock::now_ns();
    for v in &sweep.views {
        pressure.reconcile(Some(v.netns), &v.time_wait, now_ns);
    }
    let ranges = crate::host::portspace::ranges(&sweep, &HashMap::new());
    Snapshot {
        schema: SNAPSHOT_SCHEMA,
        agent_pid: 0,
        taken_at: crate::output::format::rfc3339(std::time::SystemTime::now()),
        leaks: Vec::new(),
        time_wait: report::time_wait_entries(&pressure, &ranges),
    }
}

/// Prints the TIME_WAIT report.
pub fn timewait(format: Option<Format>, state_file: &str) -> anyhow::Result<()> {
    let (snapshot, source) = match from_agent(state_file) {
        Some(s) => {
            let source = format!("from the running agent, pid {}", s.agent_pid);
            (s, source)
        }
        None => (
            live_time_wait(),
            "live from the kernel, no agent running: closers unknown".to_string(),
        ),
    };
    let text = match pick(format) {
        Format::Text => report::render_time_wait_text(&snapshot, &source),
        Format::Json => report::render_time_wait_json(&snapshot),
    };
    print(&text)
}

fn pick(format: Option<Format>) -> Format {
    format.unwrap_or(if std::io::stdout().is_terminal() {
        Format::Text
    } else {
        Format::Json
    })
}

fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end()).context("writing the report")
}

/// What `tcptrace leaks` prints, besides the report.
#[derive(Clone, Debug, Default)]
pub struct LeaksView {
    /// Only leaks of these units, containers, pods.
    pub filter: crate::engine::identity::IdentityFilter,
    /// Folded stacks instead of the report.
    pub folded: bool,
    /// Also write a flame graph here.
    pub flamegraph: Option<std::path::PathBuf>,
}

/// Prints the CLOSE_WAIT leak report (or folded stacks), and writes the
/// flame graph when asked.
pub fn leaks(
    format: Option<Format>,
    state_file: &str,
    leak_after: Duration,
    view: &LeaksView,
) -> anyhow::Result<()> {
    let (mut snapshot, source) = match from_agent(state_file) {
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
    snapshot
        .leaks
        .retain(|l| view.filter.admits(Some(&l.identity)));
    if let Some(path) = &view.flamegraph {
        let svg = crate::output::flame::svg(&snapshot, &source)?;
        std::fs::write(path, svg)
            .with_context(|| format!("writing the flame graph to {}", path.display()))?;
        eprintln!(
            "flame graph of {} leaked sockets written to {}",
            snapshot.leaks.len(),
            path.display()
        );
    }
    let text = if view.folded {
        let lines = crate::output::flame::folded(&snapshot);
        if lines.is_empty() {
            // No leak, no stack: an empty input for the flame graph tools.
            return Ok(());
        }
        lines.join("\n")
    } else {
        match pick(format) {
            Format::Text => report::render_text(&snapshot, &source),
            Format::Json => report::render_json(&snapshot),
        }
    };
    print(&text)
}
