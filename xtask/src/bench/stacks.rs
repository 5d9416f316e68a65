//! The churn workload's stack pass: what copying user stacks in the kernel
//! and unwinding them in the agent (`--stack-copy`, CFI) costs, and how
//! many stacks a second the pair holds without losing any.
//!
//! The churn makes a connection (a `connect()` and an `accept()`, each an
//! origin whose stack is walked and copied within `--stacks-per-second`)
//! as fast as it can, so raising the limit raises the stack rate until the
//! kernel's copies, the ring buffer or the agent's unwinder gives out. Each
//! limit gets rounds side by side with no-tracer rounds; the figures come
//! from the agent's own counters (`tcptrace_stack_copies_total`,
//! `tcptrace_unwound_stacks_total`, `tcptrace_unwind_seconds_total`,
//! `tcptrace_stack_copy_bytes_total`) and its CPU time from /proc.

use std::time::Duration;

use anyhow::{Context as _, Result};

use super::{
    churn, cpu_seconds, json_number, labelled, median, scrape, sum_f64, sum_of, BenchOpts, Bins,
    Mode, Netns, Tracer,
};
use crate::{cargo, say};

/// The `--stacks-per-second` limits measured: the default, then up to
/// every connection (0).
const LIMITS: &[u32] = &[1000, 4000, 16000, 64000, 0];

/// The agent's stack counters at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct StackCounts {
    sent: f64,
    ring_busy: f64,
    lost: f64,
    bytes: f64,
    complete: f64,
    partial: f64,
    failed: f64,
    unwind_seconds: f64,
    lost_records: f64,
}

impl StackCounts {
    fn scrape(tracer: &Tracer) -> Result<Self> {
        let port = tracer.metrics_port.context("the agent's metrics port")?;
        let text = scrape(port)?;
        let by = |name: &str, label: &str, value: &str| {
            labelled(&text, name, label)
                .into_iter()
                .find(|(v, _)| v == value)
                .map_or(0.0, |(_, n)| n)
        };
        let copies = "tcptrace_stack_copies_total";
        let unwound = "tcptrace_unwound_stacks_total";
        Ok(Self {
            sent: by(copies, "outcome", "sent"),
            ring_busy: by(copies, "outcome", "ring_busy"),
            lost: by(copies, "outcome", "lost"),
            bytes: sum_f64(&text, "tcptrace_stack_copy_bytes_total"),
            complete: by(unwound, "result", "complete"),
            partial: by(unwound, "result", "partial"),
            failed: by(unwound, "result", "failed"),
            unwind_seconds: sum_f64(&text, "tcptrace_unwind_seconds_total"),
            lost_records: sum_of(&text, "tcptrace_ring_buffer_lost_records_total") as f64,
        })
    }

    /// `self - before`, field by field.
    fn since(self, before: Self) -> Self {
        Self {
            sent: self.sent - before.sent,
            ring_busy: self.ring_busy - before.ring_busy,
            lost: self.lost - before.lost,
            bytes: self.bytes - before.bytes,
            complete: self.complete - before.complete,
            partial: self.partial - before.partial,
            failed: self.failed - before.failed,
            unwind_seconds: self.unwind_seconds - before.unwind_seconds,
            lost_records: self.lost_records - before.lost_records,
        }
    }

    fn add(&mut self, o: Self) {
        self.sent += o.sent;
        self.ring_busy += o.ring_busy;
        self.lost += o.lost;
        self.bytes += o.bytes;
        self.complete += o.complete;
        self.partial += o.partial;
        self.failed += o.failed;
        self.unwind_seconds += o.unwind_seconds;
        self.lost_records += o.lost_records;
    }

    fn unwound(&self) -> f64 {
        self.complete + self.partial + self.failed
    }

    /// Nothing dropped: every copy taken went through, none waited for a
    /// busy ring, no record was lost.
    fn lossless(&self) -> bool {
        self.ring_busy == 0.0 && self.lost == 0.0 && self.lost_records == 0.0
    }
}

/// One limit's rounds.
struct Row {
    limit: u32,
    /// Connections/s with the agent, median over rounds.
    per_second: f64,
    /// Median of the rounds' rate over their no-tracer round's.
    ratio: f64,
    counts: StackCounts,
    /// Agent CPU seconds over the rounds.
    cpu: f64,
    /// Seconds of churn over the rounds.
    seconds: f64,
}

/// One churn round under the agent at `limit`: connections/s, the
/// counters' change, the agent's CPU seconds.
fn agent_round(
    limit: u32,
    opts: &BenchOpts,
    bins: &Bins,
    ns: &Netns,
) -> Result<(f64, StackCounts, f64)> {
    let scratch = cargo::target_dir()?.join("bench");
    std::fs::create_dir_all(&scratch)?;
    let mut tracer =
        Tracer::start(Mode::AgentStacks(limit), &bins.agent, &scratch)?.context("the agent")?;
    let before = StackCounts::scrape(&tracer)?;
    let cpu_before = cpu_seconds(tracer.pid());
    let out = churn(opts, bins, ns)?;
    // Let the agent unwind what the churn left in the ring.
    std::thread::sleep(Duration::from_millis(500));
    let counts = StackCounts::scrape(&tracer)?.since(before);
    let cpu = cpu_before
        .zip(cpu_seconds(tracer.pid()))
        .map_or(0.0, |(a, b)| b - a);
    tracer.stop()?;
    let rate = json_number(&out, "per_second").context("churn printed no rate")?;
    Ok((rate, counts, cpu))
}

/// The no-tracer reference round's rate.
fn none_round(opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<f64> {
    json_number(&churn(opts, bins, ns)?, "per_second").context("churn printed no rate")
}

fn measure(limit: u32, opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<Row> {
    let mut rates = Vec::new();
    let mut ratios = Vec::new();
    let mut counts = StackCounts::default();
    let mut cpu = 0.0;
    for round in 0..opts.stack_rounds {
        // Alternate which goes first, so drift is shared.
        let (none, (rate, c, cpu_s)) = if round % 2 == 0 {
            let none = none_round(opts, bins, ns)?;
            (none, agent_round(limit, opts, bins, ns)?)
        } else {
            let a = agent_round(limit, opts, bins, ns)?;
            (none_round(opts, bins, ns)?, a)
        };
        rates.push(rate);
        if none > 0.0 {
            ratios.push(rate / none);
        }
        counts.add(c);
        cpu += cpu_s;
    }
    Ok(Row {
        limit,
        per_second: median(&mut rates),
        ratio: median(&mut ratios),
        counts,
        cpu,
        seconds: opts.seconds * opts.stack_rounds as f64,
    })
}

fn limit_name(limit: u32) -> String {
    match limit {
        0 => "0 (every connection)".to_string(),
        n if n == DEFAULT_LIMIT => format!("{n} (default)"),
        n => n.to_string(),
    }
}

/// `--stacks-per-second`'s default (the first of [`LIMITS`]).
const DEFAULT_LIMIT: u32 = 1000;

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| --stacks-per-second | stacks/s unwound | bytes per stack | complete / partial / failed | agent CPU µs per stack | unwinder µs per stack | copies skipped (ring busy) | copies lost | records lost | connections/s | ratio to none |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for r in rows {
        let c = &r.counts;
        let unwound = c.unwound();
        let per = |x: f64| {
            if unwound > 0.0 {
                format!("{:.1}", x / unwound * 1e6)
            } else {
                "-".to_string()
            }
        };
        t.push_str(&format!(
            "| {} | {:.0} | {} | {:.0} / {:.0} / {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} |\n",
            limit_name(r.limit),
            unwound / r.seconds,
            if c.sent > 0.0 {
                format!("{:.0}", c.bytes / c.sent)
            } else {
                "-".to_string()
            },
            c.complete,
            c.partial,
            c.failed,
            per(r.cpu),
            per(c.unwind_seconds),
            c.ring_busy,
            c.lost,
            c.lost_records,
            r.per_second,
            r.ratio,
        ));
    }
    t
}

/// The stack pass's text for BENCHMARKS.md (a subsection of the churn
/// section).
pub(super) fn section(opts: &BenchOpts, bins: &Bins, ns: &Netns) -> Result<String> {
    let mut rows = Vec::new();
    for &limit in LIMITS {
        let row = measure(limit, opts, bins, ns)
            .with_context(|| format!("the stack pass at --stacks-per-second {limit}"))?;
        say!(
            "stacks: --stacks-per-second {:<22} {:>7.0} stacks/s unwound, ratio {:.3}",
            limit_name(limit),
            row.counts.unwound() / row.seconds,
            row.ratio
        );
        rows.push(row);
    }
    let table = table(&rows);
    println!("\n{table}");
    let held = rows
        .iter()
        .filter(|r| r.counts.lossless())
        .map(|r| r.counts.unwound() / r.seconds)
        .fold(0.0, f64::max);
    let first_loss = rows
        .iter()
        .find(|r| !r.counts.lossless())
        .map(|r| limit_name(r.limit));
    Ok(format!(
        "### Stack copies and unwinding\n\n\
         The same churn under the agent (default flags, `--stack-copy 16K`) at rising \
         `--stacks-per-second`, {} rounds of {} s per limit, each beside a no-tracer \
         round. Every walked origin stack (the churn's `connect()` and `accept()`) is \
         copied by the kernel into the ring buffer and unwound by the agent from the \
         binary's CFI as it arrives.\n\n\
         {table}\n\
         - highest stack rate held without loss: {held:.0} stacks/s{}\n\n\
         Bytes per stack is what each copy put through the ring (the 64-byte header and \
         the stack from its pointer to the end of its page, then whole pages, up to \
         16K). Agent CPU per stack is all the agent's CPU time (user + system) during \
         the rounds over the stacks it unwound, its other work included; the unwinder's \
         is its own time (`tcptrace_unwind_seconds_total`). Copies skipped are those the \
         kernel did not take because the ring was more than half full (state records go \
         first); the leaks of those connections fall back on the frame-pointer walk. A \
         limit is lossless when nothing was skipped or lost. The churn's ratio at the \
         default limit is the cost at the default; the main table's `--stack-copy off` \
         row is the same agent without copies.\n",
        opts.stack_rounds,
        opts.seconds,
        match first_loss {
            Some(l) => format!(" (the first limit with copies skipped or lost: {l})"),
            None => " (no limit measured lost any)".to_string(),
        },
    ))
}
