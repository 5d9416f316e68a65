//! `tcptrace leaks`: the current CLOSE_WAIT leaks, grouped by process,
//! last-use stack and origin stack, fastest growing first, for a person in ten seconds or for a
//! machine as JSON. Pure: renders a [`Snapshot`], which the running agent
//! writes to its state file (or `tcptrace leaks` builds from a live
//! inventory when no agent runs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::engine::frame::{application_position, is_truncated, Frame};
use crate::engine::identity::Identity;
use crate::engine::leak::Leak;

/// Version of the snapshot file layout.
pub const SNAPSHOT_SCHEMA: u32 = 2;

/// Where the agent writes its snapshot by default.
pub const DEFAULT_STATE_FILE: &str = "/run/tcptrace/leaks.json";

/// One leaked socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeakEntry {
    /// Holder pid (the first when several hold it; 0 when unknown).
    pub pid: u32,
    /// Holder command name.
    pub comm: String,
    /// Holder executable.
    pub exe: Option<String>,
    /// Holder cgroup.
    pub cgroup: Option<String>,
    /// What the cgroup says: unit, container, pod.
    #[serde(default)]
    pub identity: Identity,
    /// Holder fd.
    pub fd: Option<i32>,
    /// Local endpoint, `addr:port`.
    pub local: String,
    /// Remote endpoint, `addr:port`.
    pub remote: String,
    /// Network namespace inode.
    pub netns: Option<u32>,
    /// Milliseconds in CLOSE_WAIT when the snapshot was taken.
    pub close_wait_ms: f64,
    /// True when the age is an estimate (socket older than the agent).
    pub estimated: bool,
    /// `read_eof_never_closed`, `unread_eof`, `stopped_reading` or `unknown`.
    pub reason: String,
    /// `connect` or `accept`; `None` when the origin is unknown.
    pub origin: Option<String>,
    /// The origin stack, one `function+0x.. (file:line)` per frame.
    pub stack: Vec<String>,
    /// The origin stack's walk stopped short of its thread's entry.
    #[serde(default)]
    pub stack_truncated: bool,
    /// The socket's last use, when the kernel kept one.
    #[serde(default)]
    pub last_use: Option<LastUseEntry>,
}

/// The last use of a leaked socket (see the `leak` event's `last_use`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastUseEntry {
    /// Process of the checkout.
    pub pid: u32,
    /// Thread of the checkout.
    pub tid: u32,
    /// Thread name of the checkout.
    pub comm: String,
    /// `send` or `recv`.
    pub direction: String,
    /// The system call, when known.
    pub syscall: Option<String>,
    /// Milliseconds from the checkout to the peer's FIN (negative: after).
    pub before_fin_ms: f64,
    /// The innermost frame of the program's own code in the checkout
    /// stack (`main.update (main.go:54)`), when it has one.
    #[serde(default)]
    pub code: Option<String>,
    /// The checkout stack, one `function+0x.. (file:line)` per frame.
    pub stack: Vec<String>,
    /// The checkout stack's walk stopped short of its thread's entry.
    #[serde(default)]
    pub truncated: bool,
}

/// A process that closed connections toward a destination first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Closer {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub comm: String,
    /// TIME_WAIT sockets it created there (seen live by the agent).
    pub time_waits: u64,
}

/// TIME_WAIT sockets toward one destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimeWaitEntry {
    /// Network namespace inode.
    pub netns: Option<u32>,
    /// Local address.
    pub laddr: String,
    /// Remote `addr:port`.
    pub remote: String,
    /// Sockets in TIME_WAIT now.
    pub count: u64,
    /// Ports in the namespace's ephemeral range.
    pub range_size: u32,
    /// `count` as a percentage of the range.
    pub share_pct: f64,
    /// Who closed first (empty without an agent).
    pub closers: Vec<Closer>,
}

/// The leaks and TIME_WAIT counts at one moment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_SCHEMA`].
    pub schema: u32,
    /// The agent that wrote it (0: built by the report command itself).
    pub agent_pid: u32,
    /// RFC 3339 time it was taken.
    pub taken_at: String,
    /// The leaks.
    pub leaks: Vec<LeakEntry>,
    /// TIME_WAIT by destination, largest first.
    #[serde(default)]
    pub time_wait: Vec<TimeWaitEntry>,
}

/// The TIME_WAIT report for people.
pub fn render_time_wait_text(snapshot: &Snapshot, source: &str) -> String {
    let mut out = format!(
        "TIME_WAIT by destination ({source}, {})\n",
        snapshot.taken_at
    );
    out += "TIME_WAIT keeps a local port for 60 s on the side that closed first; toward one \
            destination only the ephemeral port range is available, and when it is full \
            connect() fails with EADDRNOTAVAIL.\n";
    if snapshot.time_wait.is_empty() {
        out += "\nNo socket is in TIME_WAIT.\n";
        return out;
    }
    out += &format!(
        "\n{:>7} {:>7}  {:<45} {}\n",
        "COUNT", "SHARE", "LOCAL -> REMOTE", "CLOSED FIRST BY"
    );
    for e in snapshot.time_wait.iter().take(20) {
        let who: Vec<String> = e
            .closers
            .iter()
            .map(|c| format!("{}/{} ({})", c.pid, c.comm, c.time_waits))
            .collect();
        out += &format!(
            "{:>7} {:>6.1}%  {:<45} {}\n",
            e.count,
            e.share_pct,
            format!("{} -> {}", e.laddr, e.remote),
            if who.is_empty() {
                "-".to_string()
            } else {
                who.join(", ")
            }
        );
    }
    if snapshot.time_wait.len() > 20 {
        out += &format!(
            "... and {} more destinations\n",
            snapshot.time_wait.len() - 20
        );
    }
    out
}

/// The TIME_WAIT report for machines.
pub fn render_time_wait_json(snapshot: &Snapshot) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        schema: u32,
        taken_at: &'a str,
        agent_pid: u32,
        destinations: &'a [TimeWaitEntry],
    }
    serde_json::to_string_pretty(&Doc {
        schema: SNAPSHOT_SCHEMA,
        taken_at: &snapshot.taken_at,
        agent_pid: snapshot.agent_pid,
        destinations: &snapshot.time_wait,
    })
    .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

/// What leaks of a group share of their last use.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupLastUse {
    /// Thread name of the first leak's checkout.
    pub comm: String,
    /// The innermost frame of the program's own code, when there is one.
    pub code: Option<String>,
    /// The shared checkout stack.
    pub stack: Vec<String>,
    /// Its walk stopped short of the thread's entry.
    pub truncated: bool,
}

/// Leaks that share a process, a last-use stack and an origin stack.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Group {
    /// Holder pid.
    pub pid: u32,
    /// Holder command name.
    pub comm: String,
    /// Holder executable.
    pub exe: Option<String>,
    /// Holder cgroup.
    pub cgroup: Option<String>,
    /// The holder's unit, container, pod.
    pub identity: Identity,
    /// `connect`, `accept` or `None` (unknown).
    pub origin: Option<String>,
    /// The shared origin stack.
    pub stack: Vec<String>,
    /// Its walk stopped short of the thread's entry.
    pub stack_truncated: bool,
    /// How many sockets.
    pub count: usize,
    /// Age of the oldest, milliseconds.
    pub oldest_ms: f64,
    /// Age of the newest, milliseconds.
    pub newest_ms: f64,
    /// New leaks per minute over the last minutes
    /// ([`crate::engine::groups::growth_per_min`]).
    pub growth_per_min: f64,
    /// What the leaks share of their last use (`None`: unknown).
    pub last_use: Option<GroupLastUse>,
    /// The leaks, oldest first.
    pub leaks: Vec<LeakEntry>,
}

/// What makes leaks one group in the report: holder pid, last-use stack
/// (and its thread where the stack has no frame of the program's own, as
/// an interpreter's), origin, origin stack.
type ReportKey = (
    u32,
    Option<(Vec<String>, Option<String>)>,
    Option<String>,
    Vec<String>,
);

/// Groups by (process, last-use stack, origin, origin stack), the fastest
/// growing first (a forgotten checkout keeps growing; sockets idle in a
/// pool stop at its size), then the largest, then the oldest.
pub fn group(snapshot: &Snapshot) -> Vec<Group> {
    let mut by: BTreeMap<ReportKey, Vec<LeakEntry>> = BTreeMap::new();
    for l in &snapshot.leaks {
        let last_use = l.last_use.as_ref().map(|u| {
            let thread = u.code.is_none().then(|| u.comm.clone());
            (u.stack.clone(), thread)
        });
        by.entry((l.pid, last_use, l.origin.clone(), l.stack.clone()))
            .or_default()
            .push(l.clone());
    }
    let mut groups: Vec<Group> = by
        .into_iter()
        .filter_map(|((pid, _, origin, stack), mut leaks)| {
            leaks.sort_by(|a, b| b.close_wait_ms.total_cmp(&a.close_wait_ms));
            let first = leaks.first()?;
            let newest_ms = leaks.last().map_or(0.0, |l| l.close_wait_ms);
            Some(Group {
                pid,
                comm: first.comm.clone(),
                exe: first.exe.clone(),
                cgroup: first.cgroup.clone(),
                identity: first.identity.clone(),
                origin,
                stack,
                stack_truncated: first.stack_truncated,
                count: leaks.len(),
                oldest_ms: first.close_wait_ms,
                newest_ms,
                growth_per_min: crate::engine::groups::growth_per_min(
                    leaks.iter().map(|l| l.close_wait_ms),
                ),
                last_use: first.last_use.as_ref().map(|u| GroupLastUse {
                    comm: u.comm.clone(),
                    code: u.code.clone(),
                    stack: u.stack.clone(),
                    truncated: u.truncated,
                }),
                leaks,
            })
        })
        .collect();
    groups.sort_by(|a, b| {
        b.growth_per_min
            .total_cmp(&a.growth_per_min)
            .then(b.count.cmp(&a.count))
            .then(b.oldest_ms.total_cmp(&a.oldest_ms))
    });
    groups
}

fn age(ms: f64) -> String {
    let s = ms / 1000.0;
    if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// Said under a stack whose walk stopped short.
const TRUNCATED: &str =
    "    ... (the walk stopped here: code without frame pointers, or an interpreter)\n";

/// The human report; `source` says where the snapshot came from.
pub fn render_text(snapshot: &Snapshot, source: &str) -> String {
    let groups = group(snapshot);
    let mut out = format!("CLOSE_WAIT leaks ({source}, {})\n", snapshot.taken_at);
    out += "CLOSE_WAIT means the peer closed the connection and the program never called close(): \
            look for a return path (an error, an EOF) that skips close() after the call shown below.\n";
    if groups.is_empty() {
        out += "\nNo socket is in CLOSE_WAIT past the leak threshold.\n";
        return out;
    }
    for g in &groups {
        out += &format!(
            "\npid {} {}: {} socket{} in CLOSE_WAIT, oldest {}{}\n",
            g.pid,
            g.comm,
            g.count,
            if g.count == 1 { "" } else { "s" },
            age(g.oldest_ms),
            if g.leaks.iter().any(|l| l.estimated) {
                " (estimated)"
            } else {
                ""
            }
        );
        if g.count > 1 {
            out += &format!(
                "  newest {}, {:.1} new per minute\n",
                age(g.newest_ms),
                g.growth_per_min
            );
        }
        if let Some(who) = g.identity.describe() {
            out += &format!("  in {who}\n");
        }
        if let Some(exe) = &g.exe {
            out += &format!("  executable {exe}");
            if let Some(cg) = &g.cgroup {
                out += &format!(", cgroup {cg}");
            }
            out += "\n";
        }
        if let Some(u) = &g.last_use {
            if u.stack.is_empty() {
                out += &format!("  last used by thread {} (no stack)\n", u.comm);
            } else {
                out += &format!("  last used by thread {} at:\n", u.comm);
                for frame in u.stack.iter().take(8) {
                    out += &format!("    {frame}\n");
                }
                if u.truncated {
                    out += TRUNCATED;
                }
            }
        }
        match (&g.origin, g.stack.is_empty()) {
            (Some(o), false) => {
                out += &format!("  opened by {o}() at:\n");
                for frame in g.stack.iter().take(8) {
                    out += &format!("    {frame}\n");
                }
                if g.stack_truncated {
                    out += TRUNCATED;
                }
            }
            (Some(o), true) => {
                out += &format!(
                    "  opened by {o}() (no stack: frame pointers missing, or past \
                     --stacks-per-second?)\n"
                )
            }
            (None, _) => {
                out += "  origin unknown: opened before the agent started, or while its \
                        process was past --stacks-per-second\n"
            }
        }
        for l in g.leaks.iter().take(3) {
            out += &format!(
                "  e.g. {} -> {}{} for {} ({})\n",
                l.local,
                l.remote,
                l.fd.map_or_else(String::new, |fd| format!(" fd {fd}")),
                age(l.close_wait_ms),
                match l.reason.as_str() {
                    "read_eof_never_closed" => "read the EOF, never closed",
                    "unread_eof" => "untouched since the peer closed",
                    "stopped_reading" => "stopped reading: unread data",
                    _ => "holder unknown",
                }
            );
        }
        if g.count > 3 {
            out += &format!("  ... and {} more\n", g.count - 3);
        }
    }
    out
}

/// The machine report: the groups as one JSON document.
pub fn render_json(snapshot: &Snapshot) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        schema: u32,
        taken_at: &'a str,
        agent_pid: u32,
        groups: Vec<Group>,
    }
    serde_json::to_string_pretty(&Doc {
        schema: SNAPSHOT_SCHEMA,
        taken_at: &snapshot.taken_at,
        agent_pid: snapshot.agent_pid,
        groups: group(snapshot),
    })
    .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

/// The leak as `tcptrace leaks` lists it (its age is set when written).
pub fn entry(leak: &Leak) -> LeakEntry {
    let t = &leak.candidate.entered;
    let c = &t.change;
    let holder = leak.owners.first();
    LeakEntry {
        pid: holder
            .map(|h| h.pid)
            .or(t.owner.as_ref().map(|o| o.pid))
            .unwrap_or(0),
        comm: holder
            .map(|h| h.comm.clone())
            .or(t.owner.as_ref().map(|o| o.comm.clone()))
            .unwrap_or_default(),
        exe: holder.and_then(|h| h.exe.clone()),
        cgroup: holder.and_then(|h| h.cgroup.clone()),
        identity: holder.map(|h| h.identity.clone()).unwrap_or_default(),
        fd: holder.map(|h| h.fd).or(t.owner.as_ref().and_then(|o| o.fd)),
        local: std::net::SocketAddr::new(c.laddr, c.lport).to_string(),
        remote: std::net::SocketAddr::new(c.raddr, c.rport).to_string(),
        netns: c.netns,
        close_wait_ms: leak.candidate.close_wait_ms,
        estimated: leak.candidate.estimated,
        reason: leak.reason.name().to_string(),
        origin: t.origin.as_ref().map(|o| o.syscall.name().to_string()),
        stack: named_frames(&leak.stack),
        stack_truncated: is_truncated(&leak.stack),
        last_use: leak.last_use.as_ref().map(|u| LastUseEntry {
            pid: u.pid,
            tid: u.tid,
            comm: u.comm.clone(),
            direction: u.direction.name().to_string(),
            syscall: u.syscall.map(str::to_string),
            before_fin_ms: leak.last_use_before_fin_ms().unwrap_or(0.0),
            code: application_position(&leak.last_use_stack)
                .map(|i| leak.last_use_stack[i].display_short()),
            stack: named_frames(&leak.last_use_stack),
            truncated: is_truncated(&leak.last_use_stack),
        }),
    }
}

/// Every named frame, displayed.
fn named_frames(stack: &[Frame]) -> Vec<String> {
    stack
        .iter()
        .filter(|f| f.function.is_some())
        .map(Frame::display)
        .collect()
}

/// The TIME_WAIT part of a snapshot.
pub fn time_wait_entries(
    pressure: &crate::engine::timewait::PortPressure,
    ranges: &std::collections::HashMap<u32, crate::engine::timewait::PortRange>,
) -> Vec<TimeWaitEntry> {
    pressure
        .counts()
        .into_iter()
        .map(|(dest, count)| {
            let range = dest
                .netns
                .and_then(|n| ranges.get(&n).copied())
                .unwrap_or(crate::engine::timewait::DEFAULT_RANGE);
            TimeWaitEntry {
                netns: dest.netns,
                laddr: dest.laddr.to_string(),
                remote: std::net::SocketAddr::new(dest.raddr, dest.rport).to_string(),
                count,
                range_size: range.size(),
                share_pct: (count as f64 * 1000.0 / f64::from(range.size())).round() / 10.0,
                closers: pressure
                    .top_closers(&dest, 3)
                    .into_iter()
                    .map(|(pid, comm, time_waits)| Closer {
                        pid,
                        comm,
                        time_waits,
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ms: f64, stack: &[&str]) -> LeakEntry {
        LeakEntry {
            pid,
            comm: format!("svc{pid}"),
            exe: Some(format!("/usr/bin/svc{pid}")),
            cgroup: Some("/system.slice/svc.service".into()),
            identity: Identity::from_cgroup("/system.slice/svc.service"),
            fd: Some(7),
            local: "127.0.0.1:45346".into(),
            remote: "10.0.0.3:3306".into(),
            netns: Some(1),
            close_wait_ms: ms,
            estimated: false,
            reason: "read_eof_never_closed".into(),
            origin: Some("connect".into()),
            stack: stack.iter().map(|s| s.to_string()).collect(),
            stack_truncated: false,
            last_use: None,
        }
    }

    #[test]
    fn time_wait_report() {
        let mut snap = snapshot();
        snap.time_wait = vec![TimeWaitEntry {
            netns: Some(1),
            laddr: "127.0.0.1".into(),
            remote: "127.0.0.1:5000".into(),
            count: 95,
            range_size: 100,
            share_pct: 95.0,
            closers: vec![Closer {
                pid: 7,
                comm: "churn".into(),
                time_waits: 95,
            }],
        }];
        let text = render_time_wait_text(&snap, "x");
        assert!(
            text.contains("95.0%  127.0.0.1 -> 127.0.0.1:5000"),
            "{text}"
        );
        assert!(text.contains("7/churn (95)"), "{text}");
        let v: serde_json::Value =
            serde_json::from_str(&render_time_wait_json(&snap)).expect("json");
        assert_eq!(v["destinations"][0]["count"], 95);
        // Old snapshots without time_wait still parse.
        let old = r#"{"schema":1,"agent_pid":1,"taken_at":"t","leaks":[]}"#;
        assert!(serde_json::from_str::<Snapshot>(old).is_ok());
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            time_wait: Vec::new(),
            schema: SNAPSHOT_SCHEMA,
            agent_pid: 1,
            taken_at: "2026-11-24T19:00:00Z".into(),
            leaks: vec![
                entry(2, 5_000.0, &["b (b.c:1)"]),
                entry(1, 61_000.0, &["update (main.go:22)", "main (main.go:40)"]),
                entry(1, 30_000.0, &["update (main.go:22)", "main (main.go:40)"]),
                entry(1, 1_000.0, &["other (x.go:1)"]),
            ],
        }
    }

    #[test]
    fn groups_by_process_and_stack_largest_first() {
        let g = group(&snapshot());
        assert_eq!(g.len(), 3);
        assert_eq!((g[0].pid, g[0].count, g[0].oldest_ms), (1, 2, 61_000.0));
        assert_eq!(g[1].oldest_ms, 5_000.0, "then the oldest");
    }

    #[test]
    fn last_use_splits_a_shared_origin_and_the_growing_group_comes_first() {
        let used_by = |mut e: LeakEntry, f: &str| {
            e.last_use = Some(LastUseEntry {
                pid: e.pid,
                tid: e.pid + 1,
                comm: f.into(),
                direction: "send".into(),
                syscall: Some("write".into()),
                before_fin_ms: 2_000.0,
                code: Some(format!("{f} (main.go:1)")),
                stack: vec![format!("{f} (main.go:1)"), "main.main (main.go:9)".into()],
                truncated: false,
            });
            e
        };
        let origin = ["main.initDB (main.go:30)", "main.main (main.go:9)"];
        let mut snap = snapshot();
        snap.leaks = vec![
            // One idle in the pool for ten minutes...
            used_by(entry(1, 600_000.0, &origin), "main.initDB"),
            // ...and forgotten checkouts, one a minute.
            used_by(entry(1, 30_000.0, &origin), "main.update"),
            used_by(entry(1, 90_000.0, &origin), "main.update"),
        ];
        let g = group(&snap);
        assert_eq!(g.len(), 2, "{g:?}");
        assert_eq!(g[0].count, 2);
        assert_eq!(
            g[0].last_use.as_ref().map(|u| u.stack[0].as_str()),
            Some("main.update (main.go:1)")
        );
        assert_eq!((g[0].oldest_ms, g[0].newest_ms), (90_000.0, 30_000.0));
        assert!(g[0].growth_per_min > g[1].growth_per_min);
        let text = render_text(&snap, "x");
        let update = text
            .find("last used by thread main.update at:")
            .expect("last use");
        let opened = text.find("opened by connect() at:").expect("origin");
        assert!(update < opened, "{text}");
        assert!(text.contains("newest 30.0 s"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&render_json(&snap)).expect("json");
        assert_eq!(
            v["groups"][0]["last_use"]["stack"][0],
            "main.update (main.go:1)"
        );
        assert_eq!(v["groups"][1]["stack"][0], "main.initDB (main.go:30)");
        // Interpreter stacks (libc frames alone): the thread tells apart.
        let thread = |pid: u32, comm: &str| {
            let mut e = used_by(entry(pid, 1_000.0, &origin), "x");
            if let Some(u) = e.last_use.as_mut() {
                u.comm = comm.into();
                u.code = None;
                u.stack = vec!["__libc_send+0x19 (send.c:28)".into()];
                u.truncated = true;
            }
            e
        };
        let mut interp = snapshot();
        interp.leaks = vec![
            thread(7, "update"),
            thread(7, "update"),
            thread(7, "initdb"),
        ];
        let g = group(&interp);
        assert_eq!(g.iter().map(|g| g.count).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(
            g[0].last_use.as_ref().map(|u| u.comm.as_str()),
            Some("update")
        );
        assert!(render_text(&interp, "x").contains("... (the walk stopped here"));
        // A file written before last use still reads.
        let old = r#"{"pid":1,"comm":"c","exe":null,"cgroup":null,"fd":3,"local":"l","remote":"r",
            "netns":null,"close_wait_ms":1.0,"estimated":false,"reason":"unknown","origin":null,"stack":[]}"#;
        assert!(serde_json::from_str::<LeakEntry>(old).is_ok());
    }

    #[test]
    fn text_report_reads_in_ten_seconds() {
        let text = render_text(&snapshot(), "from the running agent");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("CLOSE_WAIT means the peer closed"));
        assert!(text.contains("pid 1 svc1: 2 sockets in CLOSE_WAIT, oldest 1.0 min"));
        assert!(text.contains("    update (main.go:22)"));
        assert!(text.contains("fd 7 for 1.0 min (read the EOF, never closed)"));
        let empty = Snapshot {
            leaks: Vec::new(),
            ..snapshot()
        };
        assert!(render_text(&empty, "x").contains("No socket is in CLOSE_WAIT"));
    }

    #[test]
    fn json_report_round_trips_groups() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&snapshot())).expect("json");
        assert_eq!(v["groups"][0]["count"], 2);
        assert_eq!(v["groups"][0]["stack"][0], "update (main.go:22)");
    }
}
