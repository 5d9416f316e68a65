//! Loading and attaching the kernel program: the only place that talks to
//! the BPF syscall.

use anyhow::{anyhow, Context as _};
use aya::maps::{MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use std::os::fd::AsFd as _;

use crate::layout::{Layout, STATE_TP};
use crate::privileges::NotPrivileged;
use crate::progstats::ProgramStats;

/// The kernel program, built by build.rs from `tcptrace-ebpf`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Default ring buffer size: about 10,000 transitions of 104 bytes, a
/// second of a very busy host, so that a reader hiccup loses nothing.
pub const DEFAULT_RING_BYTES: u32 = 1 << 20;

/// The loaded, attached program and the maps the agent reads.
pub struct Probes {
    /// Programs and links: dropping this detaches everything.
    pub ebpf: Ebpf,
    /// Records from the kernel.
    pub ring: RingBuf<MapData>,
    /// Records dropped because the ring was full.
    pub lost: LostCounter,
    /// User stacks taken at connect() and accept().
    pub stacks: StackTraceMap<MapData>,
}

/// Records the kernel could not deliver: the program's per-CPU count of
/// records it found no room for in the ring buffer, and the runs the
/// kernel's recursion guard skipped (see [`crate::progstats`]).
pub struct LostCounter {
    ring_full: PerCpuArray<MapData, u64>,
    programs: ProgramStats,
}

/// Lost records since load, by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LostCounts {
    /// No room in the ring buffer: raise `--ring-buffer-size`.
    pub ring_full: u64,
    /// Skipped by the kernel because another BPF program was running on
    /// the same CPU (a softirq interrupting it).
    pub missed: u64,
}

impl LostCounts {
    /// Both causes together.
    pub fn total(self) -> u64 {
        self.ring_full + self.missed
    }
}

/// True when the error chain holds an EPERM/EACCES from the kernel.
fn is_permission_error(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == libc::EPERM || code == libc::EACCES)
    })
}

fn explain(err: anyhow::Error) -> anyhow::Error {
    if is_permission_error(&err) {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        let cap_eff = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| crate::privileges::parse_cap_eff(&s))
            .unwrap_or(0);
        err.context(NotPrivileged { euid, cap_eff })
    } else {
        err
    }
}

/// Loads the program with `layout` and attaches every hook it supports.
pub fn load_and_attach(layout: &Layout, ring_bytes: u32) -> anyhow::Result<Probes> {
    load_inner(layout, ring_bytes).map_err(explain)
}

/// Wake the agent early once this share of the ring buffer is full; below
/// it, the agent's poll timer collects the records in batches.
const WAKEUP_SHARE: u32 = 8;

fn load_inner(layout: &Layout, ring_bytes: u32) -> anyhow::Result<Probes> {
    let mut config = layout.config;
    config.wakeup_bytes = ring_bytes / WAKEUP_SHARE;
    let mut ebpf = EbpfLoader::new()
        .override_global("TCPTRACE_CONFIG", &config, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(PROGRAM)
        .context("loading the eBPF program")?;

    let mut programs = ProgramStats::default();
    let (cat, name) = STATE_TP;
    attach(&mut ebpf, name, cat, name, &mut programs)
        .with_context(|| format!("attaching to tracepoint {cat}:{name}"))?;
    for (category, prog) in layout.optional_tracepoints() {
        if let Err(e) = attach(&mut ebpf, prog, category, prog, &mut programs) {
            log::warn!(
                "could not attach {category}:{prog} ({e:#}); owners or RST aborts may be unknown"
            );
        }
    }

    let ring = ebpf
        .take_map("EVENTS")
        .ok_or_else(|| anyhow!("the eBPF object has no EVENTS map"))?;
    let ring = RingBuf::try_from(ring).context("opening the EVENTS ring buffer")?;
    let lost = ebpf
        .take_map("LOST")
        .ok_or_else(|| anyhow!("the eBPF object has no LOST map"))?;
    let lost = LostCounter {
        ring_full: PerCpuArray::try_from(lost).context("opening the LOST counter")?,
        programs,
    };
    let stacks = ebpf
        .take_map("STACKS")
        .ok_or_else(|| anyhow!("the eBPF object has no STACKS map"))?;
    let stacks = StackTraceMap::try_from(stacks).context("opening the STACKS map")?;
    Ok(Probes {
        ebpf,
        ring,
        lost,
        stacks,
    })
}

fn attach(
    ebpf: &mut Ebpf,
    prog: &str,
    category: &str,
    name: &str,
    stats: &mut ProgramStats,
) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("the eBPF object has no program {prog}"))?
        .try_into()?;
    program.load().with_context(|| format!("loading {prog}"))?;
    program.attach(category, name)?;
    match program
        .fd()
        .map_err(anyhow::Error::from)
        .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
    {
        Ok(fd) => stats.watch(prog, fd),
        Err(e) => {
            log::warn!("cannot watch {prog}'s skipped runs ({e:#}); they will not be counted")
        }
    }
    Ok(())
}

impl LostCounter {
    /// Records lost since the program was loaded, by cause.
    pub fn counts(&self) -> anyhow::Result<LostCounts> {
        let per_cpu = self
            .ring_full
            .get(&0, 0)
            .context("reading the LOST counter")?;
        Ok(LostCounts {
            ring_full: per_cpu.iter().sum(),
            missed: self.programs.recursion_misses(),
        })
    }
}
