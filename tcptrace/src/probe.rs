//! Loading and attaching the kernel program: the only place that talks to
//! the BPF syscall.

use anyhow::{anyhow, Context as _};
use aya::maps::{MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};

use crate::layout::{Layout, STATE_TP};
use crate::privileges::NotPrivileged;

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

/// The kernel's per-CPU count of records it could not reserve room for.
pub struct LostCounter(PerCpuArray<MapData, u64>);

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

fn load_inner(layout: &Layout, ring_bytes: u32) -> anyhow::Result<Probes> {
    let mut ebpf = EbpfLoader::new()
        .override_global("TCPTRACE_CONFIG", &layout.config, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(PROGRAM)
        .context("loading the eBPF program")?;

    let (cat, name) = STATE_TP;
    attach(&mut ebpf, name, cat, name)
        .with_context(|| format!("attaching to tracepoint {cat}:{name}"))?;
    for (category, prog) in layout.optional_tracepoints() {
        if let Err(e) = attach(&mut ebpf, prog, category, prog) {
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
    let lost = LostCounter(PerCpuArray::try_from(lost).context("opening the LOST counter")?);
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

fn attach(ebpf: &mut Ebpf, prog: &str, category: &str, name: &str) -> anyhow::Result<()> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("the eBPF object has no program {prog}"))?
        .try_into()?;
    program.load().with_context(|| format!("loading {prog}"))?;
    program.attach(category, name)?;
    Ok(())
}

impl LostCounter {
    /// Records lost since the program was loaded, summed over CPUs.
    pub fn total(&self) -> anyhow::Result<u64> {
        let per_cpu = self.0.get(&0, 0).context("reading the LOST counter")?;
        Ok(per_cpu.iter().sum())
    }
}
