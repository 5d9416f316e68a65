//! The leak duty: CLOSE_WAIT stays past `--leak-after` become leak
//! reports (enriched from /proc, sock_diag and the kernel's stacks, see
//! [`crate::host::enrich`]), printed once per group with the group's
//! summaries after. Due within a quarter of `--leak-after` (at most a
//! second) after a stay passes it.

use std::sync::Arc;
use std::time::Duration;

use aya::maps::{MapData, StackTraceMap};

use crate::agent::out::Out;
use crate::agent::parts::{Agent, Duty};
use crate::agent::reader::Feeder;
use crate::engine::clock::WallClock;
use crate::engine::decode::tuple_key;
use crate::engine::events::EventKind;
use crate::engine::identity::IdentityFilter;
use crate::engine::leak::{group_key, summary};
use crate::host::enrich::Enricher;
use crate::host::names::Names;
use crate::kernel::probe;
use crate::pipeline::{CurrentLeak, Pipeline};

/// Leak reports, every `period`.
pub struct LeakReports {
    period: Duration,
    enricher: Enricher,
    /// Sockets of the kernel's CLOSE_WAITS table handed to the pipeline.
    announced: crate::kernel::cwtable::Announced,
    /// How long a socket stays in the kernel's table before it is handed
    /// over (origin-map mode only; without it the kernel sends every entry).
    quiet_ns: Option<u64>,
    /// `--unit`, `--container`, `--pod`.
    filter: IdentityFilter,
}

impl LeakReports {
    /// Looks for leaks every `period`; `quiet` when the kernel keeps quiet
    /// CLOSE_WAIT stays in its table (origin-map mode).
    pub fn new(period: Duration, quiet: Option<Duration>) -> Self {
        Self {
            period,
            enricher: Enricher::new(),
            announced: crate::kernel::cwtable::Announced::default(),
            quiet_ns: quiet.map(|q| u64::try_from(q.as_nanos()).unwrap_or(u64::MAX)),
            filter: IdentityFilter::default(),
        }
    }

    /// Holders are named by `names`, and only leaks whose holder `filter`
    /// matches are reported.
    pub fn with_identity(mut self, names: Option<Arc<Names>>, filter: IdentityFilter) -> Self {
        if let Some(names) = names {
            self.enricher = Enricher::with_names(names);
        }
        self.filter = filter;
        self
    }
}

impl Duty for LeakReports {
    fn name(&self) -> &'static str {
        "leak reports"
    }

    fn run(&mut self, agent: &mut Agent) -> anyhow::Result<Duration> {
        let Agent {
            pipeline,
            out,
            reader,
            kernel,
            ..
        } = agent;
        if let Some(quiet_ns) = self.quiet_ns {
            announce_close_waits(
                &kernel.close_waits,
                &mut self.announced,
                quiet_ns,
                pipeline,
                out,
            )?;
        }
        let sources = LeakSources {
            stacks: &kernel.stacks,
            origins: &kernel.origins,
            last_use: kernel.last_use.as_ref(),
            cfi: reader.cfi.as_ref(),
        };
        report_leaks(pipeline, &mut self.enricher, &sources, &self.filter, out)?;
        report_leak_groups(pipeline, out)?;
        Ok(self.period)
    }
}

/// Gives the pipeline the sockets the kernel keeps in its CLOSE_WAITS
/// table that have stayed there `quiet_ns` or longer, each once: from then
/// on they are tracked (leak threshold, metrics) as if their entry had come
/// through the ring; the kernel sends their exit.
fn announce_close_waits(
    table: &crate::kernel::cwtable::CloseWaitTable,
    announced: &mut crate::kernel::cwtable::Announced,
    quiet_ns: u64,
    pipeline: &mut Pipeline,
    out: &mut Out,
) -> anyhow::Result<()> {
    if table.counts().held() == 0 {
        // An empty table: nothing to read (the usual case), nothing to remember.
        announced.fresh(Vec::new());
        return Ok(());
    }
    let fresh = announced.fresh(table.lingering(quiet_ns, WallClock::now_ns()));
    let mut feeder = Feeder::default();
    for rec in fresh {
        // The same bytes the kernel sends for an entry it did not keep.
        feeder.feed(
            pipeline,
            &crate::engine::decode::raw::state_bytes(&rec),
            out,
        )?;
    }
    Ok(())
}

/// Where a leak's origin, last use and stacks are read from.
struct LeakSources<'a> {
    /// The kernel's frame-pointer walks.
    stacks: &'a StackTraceMap<MapData>,
    /// The kernel's origins (origin-map mode).
    origins: &'a probe::OriginMap,
    /// The sockets' last-use storage, when attached.
    last_use: Option<&'a crate::kernel::lastuse_map::LastUseMap>,
    /// Stacks unwound from CFI, when the kernel copies stacks.
    cfi: Option<&'a crate::host::unwind::CfiStacks>,
}

fn report_leaks(
    pipeline: &mut Pipeline,
    enricher: &mut Enricher,
    kernel: &LeakSources<'_>,
    filter: &IdentityFilter,
    out: &mut Out,
) -> anyhow::Result<()> {
    let now_ns = WallClock::now_ns();
    let mut due = pipeline.due_leaks(now_ns);
    if due.is_empty() {
        return Ok(());
    }
    let origins = kernel.origins;
    crate::engine::leak::fill_origins(
        &mut due,
        |sk| origins.get(sk),
        crate::host::procfs::thread_comm,
    );
    let fp_of = |id: u32| -> Option<Vec<u64>> {
        kernel
            .stacks
            .get(&id, 0)
            .ok()
            .map(|trace| trace.frames().iter().map(|f| f.ip).collect())
    };
    // Each stack as the better of its two walks (see
    // `crate::host::unwind::prefer_cfi`); an id at or above `CFI_STACK` is an
    // unwound one.
    let choose = |pid: u32, ts_ns: u64, id: Option<u32>| match kernel.cfi {
        Some(cfi) => cfi.unwound.choose(pid, ts_ns, id, fp_of),
        None => id,
    };
    for c in &mut due {
        if let Some(o) = c.entered.origin.as_mut() {
            o.stack_id = choose(o.pid, o.ts_ns, o.stack_id);
        }
    }
    let stack_of = |id: u32| -> Option<Vec<u64>> {
        if id >= crate::host::unwind::CFI_STACK {
            kernel
                .cfi
                .and_then(|cfi| cfi.unwound.stack(id))
                .map(|(addrs, _)| addrs.to_vec())
        } else {
            fp_of(id)
        }
    };
    let now = std::time::SystemTime::now();
    let last_use_of = |pid: u32, fd: i32| {
        kernel
            .last_use
            .and_then(|m| m.lookup(pid, fd))
            .map(|mut u| {
                u.stack_id = choose(u.pid, u.checkout_ns, u.stack_id);
                u
            })
    };
    for leak in enricher.enrich(due, stack_of, last_use_of) {
        let holder = leak.owners.first().map(|h| &h.identity);
        if !filter.admits(holder) {
            continue;
        }
        let (origin, last_use) = &mut pipeline.truncated_stacks;
        *origin += u64::from(crate::engine::frame::is_truncated(&leak.stack));
        *last_use += u64::from(crate::engine::frame::is_truncated(&leak.last_use_stack));
        let member = tuple_key(&leak.candidate.entered.change);
        let since = leak.candidate.entered.change.ts_ns;
        pipeline.current_leaks.insert(
            member,
            CurrentLeak {
                entry: crate::output::report::entry(&leak),
                since_ns: since,
            },
        );
        let print = pipeline
            .groups
            .on_leak(group_key(&leak), member, since, now_ns, || summary(&leak));
        if print {
            log::warn!("CLOSE_WAIT leak: {}", summary(&leak));
            if pipeline.events.contains(&EventKind::Leak) {
                out.line(pipeline.format.leak(&leak, now, &pipeline.clock))?;
            }
        }
    }
    out.flush()
}

fn report_leak_groups(pipeline: &mut Pipeline, out: &mut Out) -> anyhow::Result<()> {
    let now_ns = WallClock::now_ns();
    let now = std::time::SystemTime::now();
    let reports = pipeline.groups.due_reports(now_ns);
    if pipeline.events.contains(&EventKind::Leak) {
        for report in &reports {
            let line = pipeline.format.leak_group(report, now, now_ns);
            let who = pipeline
                .owners
                .as_mut()
                .and_then(|o| o.0.of(report.key.pid));
            out.line(pipeline.format.with_identity(line, who.as_deref()))?;
        }
    }
    out.flush()
}
