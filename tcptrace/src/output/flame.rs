//! The leaks as a flame graph: one box per frame, as wide as the sockets
//! in CLOSE_WAIT under it. Each leak's stack is the code that used its
//! socket last (where the kernel kept no last use, the code that opened
//! it), rooted at who holds it: the pod, container or unit, then the
//! program (by name, so that a service's processes stack up as one). [`folded`] is pure; [`svg`] draws with inferno, the Rust port
//! of flamegraph.pl (the SVG it makes is the one people know, searchable
//! and zoomable in a browser).

use std::collections::BTreeMap;

use crate::output::report::{LeakEntry, Snapshot};

/// A frame's text fit for a folded line: no `;` (the separator), no line
/// breaks, no spaces at the ends.
fn clean(frame: &str) -> String {
    frame
        .replace(';', ":")
        .replace(['\n', '\r'], " ")
        .trim()
        .to_string()
}

/// The frames of one leak, root first.
fn frames(l: &LeakEntry) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(p) = &l.identity.pod {
        out.push(match (&p.namespace, &p.name) {
            (Some(ns), Some(n)) => format!("pod {ns}/{n}"),
            _ => format!("pod {}", p.uid),
        });
    }
    if let Some(c) = &l.identity.container {
        out.push(match &c.name {
            Some(n) => format!("container {n}"),
            None => format!("container {}", c.short_id()),
        });
    } else if let Some(u) = &l.identity.unit {
        out.push(format!("unit {u}"));
    }
    // The program by name, not by pid: the processes of one service
    // (workers, restarts) leak from the same code, and stack up as one.
    out.push(if l.comm.is_empty() {
        format!("pid {}", l.pid)
    } else {
        l.comm.clone()
    });
    // Stacks are kept innermost first.
    let (kind, stack) = match &l.last_use {
        Some(u) if !u.stack.is_empty() => ("last use", &u.stack),
        _ if !l.stack.is_empty() => (l.origin.as_deref().unwrap_or("opened"), &l.stack),
        _ => ("no stack", &l.stack),
    };
    out.push(format!("[{kind}]"));
    out.extend(stack.iter().rev().cloned());
    out.iter().map(|f| clean(f)).collect()
}

/// One folded line per distinct stack, `root;...;leaf COUNT`, sorted.
pub fn folded(snapshot: &Snapshot) -> Vec<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in &snapshot.leaks {
        *counts.entry(frames(l).join(";")).or_default() += 1;
    }
    counts
        .into_iter()
        .map(|(stack, n)| format!("{stack} {n}"))
        .collect()
}

/// The flame graph of `snapshot` as SVG; `source` goes in the subtitle.
pub fn svg(snapshot: &Snapshot, source: &str) -> anyhow::Result<Vec<u8>> {
    let lines = folded(snapshot);
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = format!("CLOSE_WAIT leaks, {}", snapshot.taken_at);
    opts.subtitle = Some(source.to_string());
    opts.count_name = "sockets".to_string();
    opts.name_type = "Frame:".to_string();
    opts.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Red);
    let mut out = Vec::new();
    if lines.is_empty() {
        // inferno refuses an empty graph; say so in one box.
        let none = ["no socket in CLOSE_WAIT past the leak threshold 1"];
        inferno::flamegraph::from_lines(&mut opts, none.iter().copied(), &mut out)?;
    } else {
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::identity::Identity;
    use crate::output::report::LastUseEntry;

    const ID: &str = "3f1b6c7d2e9a4b8c0d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c";

    fn leak(pid: u32, cgroup: &str, stack: &[&str], last_use: Option<&[&str]>) -> LeakEntry {
        LeakEntry {
            pid,
            comm: "svc".into(),
            exe: None,
            cgroup: Some(cgroup.into()),
            identity: Identity::from_cgroup(cgroup),
            fd: Some(3),
            local: "127.0.0.1:1".into(),
            remote: "127.0.0.1:2".into(),
            netns: None,
            close_wait_ms: 1.0,
            estimated: false,
            reason: "unread_eof".into(),
            origin: Some("connect".into()),
            stack: stack.iter().map(|s| s.to_string()).collect(),
            stack_truncated: false,
            last_use: last_use.map(|s| LastUseEntry {
                pid,
                tid: pid,
                comm: "svc".into(),
                direction: "send".into(),
                syscall: None,
                before_fin_ms: 1.0,
                code: None,
                stack: s.iter().map(|s| s.to_string()).collect(),
                truncated: false,
            }),
        }
    }

    fn snapshot(leaks: Vec<LeakEntry>) -> Snapshot {
        Snapshot {
            schema: crate::output::report::SNAPSHOT_SCHEMA,
            agent_pid: 1,
            taken_at: "2026-12-06T00:00:00Z".into(),
            leaks,
            time_wait: Vec::new(),
        }
    }

    #[test]
    fn stacks_fold_root_first_with_the_last_use_before_the_origin() {
        let c = format!("/machine.slice/libpod-{ID}.scope");
        let s = snapshot(vec![
            leak(
                7,
                &c,
                &["connect", "open_conn", "main"],
                Some(&["send", "checkout; retry", "main"]),
            ),
            leak(
                7,
                &c,
                &["connect", "open_conn", "main"],
                Some(&["send", "checkout; retry", "main"]),
            ),
            leak(9, "/system.slice/web.service", &["accept", "serve"], None),
            leak(9, "/system.slice/web.service", &[], None),
        ]);
        assert_eq!(
            folded(&s),
            [
                "container 3f1b6c7d2e9a;svc;[last use];main;checkout: retry;send 2",
                "unit web.service;svc;[connect];serve;accept 1",
                "unit web.service;svc;[no stack] 1",
            ]
        );
    }

    #[test]
    fn the_svg_is_a_flame_graph_even_with_no_leak() {
        let s = snapshot(vec![leak(7, "/system.slice/web.service", &["f"], None)]);
        let svg = String::from_utf8(svg(&s, "test").expect("svg")).expect("utf8");
        assert!(
            svg.starts_with("<?xml") && svg.contains("<svg"),
            "{}",
            &svg[..100]
        );
        assert!(svg.contains("unit web.service"));
        let empty = String::from_utf8(super::svg(&snapshot(Vec::new()), "test").expect("svg"))
            .expect("utf8");
        assert!(empty.contains("no socket in CLOSE_WAIT"));
    }
}
