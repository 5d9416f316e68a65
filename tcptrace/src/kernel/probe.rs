//! Loading and attaching the kernel program: the only place that talks to
//! the BPF syscall.

use anyhow::{anyhow, bail, Context as _};
use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf, StackTraceMap};
use aya::programs::{BtfTracePoint, TracePoint};
use aya::{Ebpf, EbpfLoader};
use std::collections::HashSet;
use std::os::fd::AsFd as _;

use crate::engine::state::TcpState;
use crate::host::privileges::NotPrivileged;
use crate::kernel::layout::StateProgram;
use crate::kernel::layout::{
    Layout, BTF_STATE_PROGRAM, FIXED_STATE_PROGRAM, OFFSETS_STATE_PROGRAM, STATE_TP,
};
use crate::kernel::maps::per_cpu_sum;
use crate::kernel::progstats::ProgramStats;
use crate::kernel::stage::{Flusher, StageUnavailable};
use tcptrace_common::{
    probe_slot, OriginSlot, CONFIG_CW_TABLE, CONFIG_ORIGIN_MAP, CONFIG_STAGE, ORIGINS_FULL,
    ORIGINS_INSERTED, ORIGINS_REMOVED, SLOT_PROBES, STACKS_OVER_BUDGET, TRANSITION_STATES,
};

/// The kernel program, built by build.rs from `tcptrace-ebpf`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Default ring buffer size: about 70,000 full records of 120 bytes (with
/// the ring's header; most IPv4 transitions take 72, or 64 in a batch), 150 ms of
/// every transition of a host churning 50,000 connections a second. The
/// agent drains it every 20 ms or sooner, but shares its CPU with its own
/// outputs and periodic work: 1 MiB (18 ms at that rate) lost records to
/// those hiccups in `cargo xtask bench`; 8 MiB lost none. Kernel memory,
/// charged to the agent's cgroup, not its RSS.
pub const DEFAULT_RING_BYTES: u32 = 8 << 20;

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
    /// The kernel's counts of user stack copies (see
    /// [`ProbeOptions::stack_copy_pages`]).
    pub stack_copies: StackCopyCounter,
    /// Every transition, counted in the kernel.
    pub transitions: TransitionCounter,
    /// Origins of live connections, when the kernel keeps them.
    pub origins: OriginMap,
    /// Sockets in CLOSE_WAIT the kernel keeps, when it does.
    pub close_waits: crate::kernel::cwtable::CloseWaitTable,
    /// Where the kernel finds a connect()'s fd.
    pub connect_fd: ConnectFd,
    /// The state program attached (see [`crate::kernel::layout::Layout::state_program`]).
    pub state_program: &'static str,
    /// The tracepoints attached, as `category:name`.
    pub tracepoints: Vec<String>,
    /// Runs `flush_stage` on every CPU, when the kernel stages short
    /// records ([`ProbeOptions::stage`]).
    pub flusher: Option<crate::kernel::stage::Flusher>,
    /// The last-use storage, when its two programs are attached
    /// ([`ProbeOptions::last_use_gap`]).
    pub last_use: Option<crate::kernel::lastuse_map::LastUseMap>,
}

/// The kernel's `ORIGINS` table: each live connection's origin in a slot
/// found from its socket address (filled only with
/// [`ProbeOptions::origin_map`]; see [`OriginSlot`]), and its per-CPU
/// counts.
pub struct OriginMap {
    slots: Array<MapData, OriginSlot>,
    /// The same map, to map for a scan ([`Self::live_captures`]).
    fd: std::os::fd::OwnedFd,
    bits: u32,
    counts: PerCpuArray<MapData, u64>,
}

/// Entries of the kernel's `STACKS` map by default: distinct user stacks
/// of connect()/accept() kept at once, about 1 KiB of kernel memory each
/// (127 frames). It is a hash table that never grows: a stack whose bucket
/// another holds is not kept (that origin goes without its stack).
pub const DEFAULT_MAX_STACKS: u32 = 16384;

/// log2 of the slots of the `CLOSE_WAITS` table for an agent that
/// watches at most `max_close_wait` sockets in CLOSE_WAIT: an eighth of
/// that, as a power of two from 16 to 1 M slots (112 bytes each; 32768,
/// 3.5 MiB, at the default `--max-close-wait`). Past that, entries are
/// sent as records, as without the table: most stays are quiet and leave
/// the table within the leak check's interval.
pub fn cw_table_bits(max_close_wait: usize) -> u32 {
    let eighth = u32::try_from(max_close_wait / 8).unwrap_or(u32::MAX);
    eighth
        .clamp(16, 1 << 20)
        .next_power_of_two()
        .trailing_zeros()
}

/// Slots of the `ORIGINS` table for at most `max` origins: the next power
/// of two (a lookup masks the slot number), at least 16. Returns log2.
pub fn origin_slot_bits(max: u32) -> u32 {
    max.max(16)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
        .trailing_zeros()
}

/// What the kernel's origin map holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginCounts {
    /// Origins kept now.
    pub live: u64,
    /// Origins not kept since load: the map was full.
    pub full: u64,
    /// Connections opened since load whose origin stack was not walked:
    /// their process was over `--stacks-per-second`.
    pub over_budget: u64,
}

impl OriginMap {
    /// The origin of socket `sk`, if the kernel has one (the newest, should
    /// a stale copy share its address).
    pub fn get(&self, sk: u64) -> Option<OriginSlot> {
        (0..SLOT_PROBES)
            .filter_map(|i| self.slots.get(&probe_slot(sk, self.bits, i), 0).ok())
            .filter(|slot| slot.sk == sk)
            .max_by_key(|slot| slot.ts_ns)
    }

    /// The (process, clock read) of every origin kept now: the connections
    /// still open whose origin the kernel keeps. A scan of the table
    /// mapped for the while (a few ms for a million slots; nothing when
    /// none is kept); empty when it cannot be mapped (logged).
    pub fn live_captures(&self) -> HashSet<(u32, u64)> {
        if self.counts().live == 0 {
            return HashSet::new();
        }
        let slots = self.slots.len() as usize;
        let table = match crate::kernel::mapped::MappedArray::<OriginSlot>::map(
            self.fd.as_fd(),
            slots,
            "ORIGINS",
        ) {
            Ok(t) => t,
            Err(e) => {
                log::debug!("{e:#}");
                return HashSet::new();
            }
        };
        (0..slots)
            .filter_map(|i| read_origin(&table, i))
            .map(|slot| (slot.tgid, slot.ts_ns))
            .collect()
    }

    /// Counts summed over CPUs (zero when they cannot be read).
    pub fn counts(&self) -> OriginCounts {
        let slot = |i: u32| per_cpu_sum(&self.counts, i);
        let (inserted, removed) = (slot(ORIGINS_INSERTED), slot(ORIGINS_REMOVED));
        OriginCounts {
            // Per-CPU sums read one after the other can cross.
            live: inserted.saturating_sub(removed),
            full: slot(ORIGINS_FULL),
            over_budget: slot(STACKS_OVER_BUDGET),
        }
    }
}

/// Slot `i` of the mapped origin table, when it holds an origin that did
/// not change while it was copied (the kernel claims a slot by its `sk`
/// first, then writes the rest; it frees it by clearing `sk`).
fn read_origin(
    table: &crate::kernel::mapped::MappedArray<OriginSlot>,
    i: usize,
) -> Option<OriginSlot> {
    // Held: a socket address owns the slot.
    table.stable_copy(i, |s| {
        // SAFETY: a plain field of a slot (or of a copy), read volatile.
        let sk = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*s).sk)) };
        (sk != 0).then_some(sk)
    })
}

/// The kernel's per-CPU count of every TCP transition by (old, new) state,
/// including those it does not send to the agent.
pub struct TransitionCounter(PerCpuArray<MapData, u64>);

impl TransitionCounter {
    /// Non-zero counts by (old, new) state, summed over CPUs.
    pub fn counts(&self) -> Vec<((TcpState, TcpState), u64)> {
        let n = TRANSITION_STATES;
        let mut out = Vec::new();
        for old in 0..n {
            for new in 0..n {
                let Ok(per_cpu) = self.0.get(&(old * n + new), 0) else {
                    continue;
                };
                let total: u64 = per_cpu.iter().sum();
                let states = (
                    TcpState::from_kernel(old as i32),
                    TcpState::from_kernel(new as i32),
                );
                if let (Some(o), Some(w)) = states {
                    if total > 0 {
                        out.push(((o, w), total));
                    }
                }
            }
        }
        out
    }
}

/// Records the kernel could not deliver: the program's per-CPU count of
/// records it found no room for in the ring buffer, and the runs the
/// kernel's recursion guard skipped (see [`crate::kernel::progstats`]).
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
            .and_then(|s| crate::host::privileges::parse_cap_eff(&s))
            .unwrap_or(0);
        err.context(NotPrivileged { euid, cap_eff })
    } else {
        err
    }
}

/// How the kernel program is to run.
#[derive(Clone, Copy, Debug)]
pub struct ProbeOptions {
    /// Size of the ring buffer, bytes.
    pub ring_bytes: u32,
    /// The (new, old) state masks of the transitions to send (see
    /// [`crate::engine::events::kernel_interest`]).
    pub interest: (u32, u32),
    /// Which state program to attach.
    pub state_program: crate::kernel::layout::StateProgram,
    /// User stack walks per process per second (0: all).
    pub stacks_per_second: u32,
    /// Entries of the kernel's `STACKS` map ([`DEFAULT_MAX_STACKS`]).
    pub max_stacks: u32,
    /// Sockets in CLOSE_WAIT the agent watches: sizes the kernel's
    /// `CLOSE_WAITS` table ([`cw_table_bits`]).
    pub max_close_wait: usize,
    /// Keep sockets that enter CLOSE_WAIT in the kernel's `CLOSE_WAITS`
    /// table (see [`tcptrace_common::CONFIG_CW_TABLE`]) instead of sending
    /// them; send only those that stay at least this long.
    pub close_wait_quiet: Option<std::time::Duration>,
    /// Keep origins in the kernel's `ORIGINS` table, sized for this many
    /// (see [`crate::engine::events::uses_origin_map`], [`origin_slot_bits`]);
    /// `None` sends them instead.
    pub origin_map: Option<u32>,
    /// Stage short records in per-CPU batches ([`tcptrace_common::CONFIG_STAGE`])
    /// where the kernel can; for streams of every transition.
    pub stage: bool,
    /// Keep each TCP socket's last use (`sock:sock_send_length` and
    /// `sock:sock_recv_length`), a checkout being the first I/O after this
    /// long without one; `None`: off.
    pub last_use_gap: Option<std::time::Duration>,
    /// Pages of user stack copied beside each stack walk, for the agent
    /// to unwind from CFI (see [`stack_copy_pages`]); 0: frame pointers
    /// only.
    pub stack_copy_pages: u32,
}

/// The kernel's per-CPU `STACK_COPY_COUNTS`.
pub struct StackCopyCounter {
    counts: PerCpuArray<MapData, u64>,
    /// Pages copied per stack (0: copies are off).
    pub pages: u32,
}

/// What the kernel did with stack copies since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackCopyCounts {
    /// Copies sent through the ring.
    pub sent: u64,
    /// Not taken: the ring was more than half full.
    pub ring_busy: u64,
    /// Lost: the ring was full.
    pub lost: u64,
    /// Cut short by a page that could not be read.
    pub short: u64,
}

impl StackCopyCounter {
    /// Counts summed over CPUs (zero when they cannot be read).
    pub fn counts(&self) -> StackCopyCounts {
        let slot = |i: u32| per_cpu_sum(&self.counts, i);
        StackCopyCounts {
            sent: slot(tcptrace_common::COPIES_SENT),
            ring_busy: slot(tcptrace_common::COPIES_RING_BUSY),
            lost: slot(tcptrace_common::COPIES_LOST),
            short: slot(tcptrace_common::COPIES_SHORT),
        }
    }
}

/// Pages of user stack the kernel copies for `bytes` of `--stack-copy`
/// (rounded up, at most [`tcptrace_common::STACK_COPY_PAGES`]); 0 where
/// it cannot: an architecture other than x86_64 (the registers' layout),
/// or a kernel without BTF (`btf`, as [`crate::kernel::support`] probed it:
/// `bpf_task_pt_regs` takes a BTF task).
pub fn stack_copy_pages(bytes: u32, btf: bool) -> u32 {
    if !cfg!(target_arch = "x86_64") || !btf {
        return 0;
    }
    bytes.div_ceil(4096).min(tcptrace_common::STACK_COPY_PAGES)
}

/// Loads the program and attaches every hook it supports.
pub fn load_and_attach(layout: &Layout, options: &ProbeOptions) -> anyhow::Result<Probes> {
    match load_inner(layout, options) {
        Err(e) if options.stage && e.downcast_ref::<StageUnavailable>().is_some() => {
            // The first line says what failed; a verifier log follows it.
            let full = format!("{e:#}");
            let what = full.lines().next().unwrap_or_default();
            log::warn!("{what}; sending every record to the ring buffer on its own");
            log::debug!("{full}");
            let unstaged = ProbeOptions {
                stage: false,
                ..*options
            };
            load_inner(layout, &unstaged).map_err(explain)
        }
        loaded => loaded.map_err(explain),
    }
}

/// Wake the agent each time the unread data passes another this-many-th
/// of the ring buffer; between, the agent's poll timer collects the
/// records in batches.
const WAKEUP_SHARE: u32 = 8;

fn load_inner(layout: &Layout, options: &ProbeOptions) -> anyhow::Result<Probes> {
    let ring_bytes = options.ring_bytes;
    let mut config = layout.config;
    config.wakeup_bytes = ring_bytes / WAKEUP_SHARE;
    (config.emit_new, config.emit_old) = options.interest;
    config.stacks_per_second = options.stacks_per_second;
    config.stack_copy_pages = options.stack_copy_pages;
    // Unused tables get one slot.
    let mut cw_slots = 1;
    if let Some(quiet) = options.close_wait_quiet {
        config.flags |= CONFIG_CW_TABLE;
        config.cw_slot_bits = cw_table_bits(options.max_close_wait);
        config.cw_quiet_ms = u32::try_from(quiet.as_millis()).unwrap_or(u32::MAX);
        cw_slots = 1 << config.cw_slot_bits;
    }
    if options.stage {
        config.flags |= CONFIG_STAGE;
    }

    let mut origin_slots = 1;
    if let Some(max) = options.origin_map {
        config.flags |= CONFIG_ORIGIN_MAP;
        config.origin_slot_bits = origin_slot_bits(max);
        origin_slots = 1 << config.origin_slot_bits;
    }
    let mut ebpf = EbpfLoader::new()
        .override_global("TCPTRACE_CONFIG", &config, true)
        .map_max_entries("EVENTS", ring_bytes)
        .map_max_entries("ORIGINS", origin_slots)
        .map_max_entries("CLOSE_WAITS", cw_slots)
        .map_max_entries("STACKS", options.max_stacks)
        .load(PROGRAM)
        .context("loading the eBPF program")?;
    // Before attaching: a kernel that cannot run it gets the program again
    // without staging (see `load_and_attach`).
    let flusher = if options.stage {
        Some(
            Flusher::load(&mut ebpf)
                .map_err(|e| anyhow::Error::new(e).context("staging records"))?,
        )
    } else {
        None
    };

    let mut programs = ProgramStats::default();
    let (cat, name) = STATE_TP;
    let mut chain = state_program_chain(layout, options.state_program)
        .into_iter()
        .peekable();
    let mut state_program = OFFSETS_STATE_PROGRAM;
    while let Some(program) = chain.next() {
        state_program = program;
        match attach_state(&mut ebpf, program, &mut programs) {
            Ok(()) => break,
            Err(e) => match chain.peek() {
                // An older kernel (bpf_task_pt_regs came in 5.15, BTF
                // tracepoints in 5.5) or a verifier that refuses a
                // program: the next one does the same job.
                Some(next) => log::warn!("{program} did not load ({e:#}); using {next}"),
                None => {
                    return Err(e.context(format!("attaching {program} to tracepoint {cat}:{name}")))
                }
            },
        }
    }
    log::debug!("{cat}:{name}: program {state_program}");
    let mut tracepoints = vec![format!("{cat}:{name}")];
    let connect_fd = connect_fd_source(state_program, layout.connect_hooks);
    for (category, prog) in layout.optional_tracepoints() {
        if prog == CONNECT_HOOK && connect_fd != ConnectFd::Hook {
            continue;
        }
        match attach(&mut ebpf, prog, category, prog, &mut programs) {
            Ok(()) => tracepoints.push(format!("{category}:{prog}")),
            Err(e) => log::warn!(
                "could not attach {category}:{prog} ({e:#}); owners or RST aborts may be unknown"
            ),
        }
    }

    let last_use = options
        .last_use_gap
        .and_then(|gap| attach_last_use(&mut ebpf, gap, &mut programs, &mut tracepoints));

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
    let stack_copies = StackCopyCounter {
        counts: PerCpuArray::try_from(
            ebpf.take_map("STACK_COPY_COUNTS")
                .ok_or_else(|| anyhow!("the eBPF object has no STACK_COPY_COUNTS map"))?,
        )
        .context("opening the STACK_COPY_COUNTS map")?,
        pages: options.stack_copy_pages,
    };
    let transitions = ebpf
        .take_map("TRANSITIONS")
        .ok_or_else(|| anyhow!("the eBPF object has no TRANSITIONS map"))?;
    let transitions = TransitionCounter(
        PerCpuArray::try_from(transitions).context("opening the TRANSITIONS counter")?,
    );
    let origins = ebpf
        .take_map("ORIGINS")
        .ok_or_else(|| anyhow!("the eBPF object has no ORIGINS map"))?;
    let origin_counts = ebpf
        .take_map("ORIGIN_COUNTS")
        .ok_or_else(|| anyhow!("the eBPF object has no ORIGIN_COUNTS map"))?;
    let close_waits = crate::kernel::cwtable::CloseWaitTable::open(
        ebpf.take_map("CLOSE_WAITS")
            .ok_or_else(|| anyhow!("the eBPF object has no CLOSE_WAITS map"))?,
        cw_slots as usize,
        ebpf.take_map("CW_COUNTS")
            .ok_or_else(|| anyhow!("the eBPF object has no CW_COUNTS map"))?,
    )?;
    let Map::Array(origins) = origins else {
        bail!("the ORIGINS map is not an array");
    };
    let origins_fd = origins
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating the ORIGINS map's fd")?;
    let origins = OriginMap {
        slots: Array::try_from(Map::Array(origins)).context("opening the ORIGINS table")?,
        fd: origins_fd,
        bits: config.origin_slot_bits,
        counts: PerCpuArray::try_from(origin_counts).context("opening the ORIGIN_COUNTS map")?,
    };
    Ok(Probes {
        ebpf,
        ring,
        lost,
        stacks,
        stack_copies,
        transitions,
        origins,
        close_waits,
        connect_fd,
        state_program,
        tracepoints,
        flusher,
        last_use,
    })
}

/// The tracepoints last use runs on (Linux >= 6.3), and the programs.
pub const LAST_USE_TPS: [(&str, &str); 2] = [
    ("sock_send_length", "sock_send_length"),
    ("sock_recv_length", "sock_recv_length"),
];

/// Attaches the last-use programs and opens their storage; `None`, with
/// one warning saying what goes without, when the kernel cannot (no
/// `sock:sock_*_length` tracepoints before 6.3, no BTF, no socket storage
/// for tracing programs before 5.11). Leaks are then reported with their
/// origin only.
fn attach_last_use(
    ebpf: &mut Ebpf,
    gap: std::time::Duration,
    stats: &mut ProgramStats,
    tracepoints: &mut Vec<String>,
) -> Option<crate::kernel::lastuse_map::LastUseMap> {
    let attached = (|| -> anyhow::Result<crate::kernel::lastuse_map::LastUseMap> {
        let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        // The gap is set before the programs run.
        let map = crate::kernel::lastuse_map::LastUseMap::open(ebpf, gap)?;
        for (prog, tp) in LAST_USE_TPS {
            attach_btf_to(ebpf, prog, tp, &btf, stats)?;
        }
        Ok(map)
    })();
    match attached {
        Ok(map) => {
            tracepoints.extend(LAST_USE_TPS.iter().map(|(_, tp)| format!("sock:{tp}")));
            Some(map)
        }
        Err(e) => {
            log::warn!(
                "last use is off: {e:#}; it needs the sock:sock_send_length and \
                 sock:sock_recv_length tracepoints (Linux >= 6.3) with BTF; leaks name the \
                 code that opened the connection only"
            );
            None
        }
    }
}

/// The hook that tells the offsets program which fd a connect() is for.
const CONNECT_HOOK: &str = "sys_enter_connect";

/// Where the kernel finds the fd a connect() is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFd {
    /// The syscall's registers, read by the fixed state program on x86_64:
    /// no syscall-entry hook.
    Registers,
    /// A `sys_enter_connect` hook.
    Hook,
    /// Nowhere: connect origins carry no fd (holders still come from /proc).
    Unknown,
}

impl std::fmt::Display for ConnectFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConnectFd::Registers => "syscall registers",
            ConnectFd::Hook => "sys_enter_connect hook",
            ConnectFd::Unknown => "unknown",
        })
    }
}

/// The state programs to try, in order: with `Auto`, each falls back to
/// the next if it does not load.
fn state_program_chain(layout: &Layout, choice: StateProgram) -> Vec<&'static str> {
    let first = layout.state_program(choice);
    let mut chain = vec![first];
    if choice == StateProgram::Auto {
        if first == BTF_STATE_PROGRAM {
            chain.push(layout.classic_state_program());
        }
        if chain.last() == Some(&FIXED_STATE_PROGRAM) {
            chain.push(OFFSETS_STATE_PROGRAM);
        }
    }
    chain
}

/// Loads and attaches state program `prog` to [`STATE_TP`].
fn attach_state(ebpf: &mut Ebpf, prog: &str, stats: &mut ProgramStats) -> anyhow::Result<()> {
    let (cat, name) = STATE_TP;
    if prog == BTF_STATE_PROGRAM {
        attach_btf(ebpf, prog, stats)
    } else {
        attach(ebpf, prog, cat, name, stats)
    }
}

/// Loads and attaches `prog` as a BTF tracepoint on [`STATE_TP`].
fn attach_btf(ebpf: &mut Ebpf, prog: &str, stats: &mut ProgramStats) -> anyhow::Result<()> {
    let (_, name) = STATE_TP;
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    attach_btf_to(ebpf, prog, name, &btf, stats)
}

/// Loads `prog` as a BTF tracepoint program for tracepoint `name` and
/// attaches it.
fn attach_btf_to(
    ebpf: &mut Ebpf,
    prog: &str,
    name: &str,
    btf: &aya::Btf,
    stats: &mut ProgramStats,
) -> anyhow::Result<()> {
    let program: &mut BtfTracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| anyhow!("the eBPF object has no program {prog}"))?
        .try_into()?;
    program
        .load(name, btf)
        .with_context(|| format!("loading {prog}"))?;
    program
        .attach()
        .with_context(|| format!("attaching {prog} to the {name} tracepoint"))?;
    watch(stats, prog, program.fd());
    Ok(())
}

/// Has `stats` watch the runs of program `prog` (its `fd`).
fn watch(
    stats: &mut ProgramStats,
    prog: &str,
    fd: Result<&aya::programs::ProgramFd, aya::programs::ProgramError>,
) {
    match fd
        .map_err(anyhow::Error::from)
        .and_then(|fd| Ok(fd.as_fd().try_clone_to_owned()?))
    {
        Ok(fd) => stats.watch(prog, fd),
        Err(e) => {
            log::warn!("cannot watch {prog}'s skipped runs ({e:#}); they will not be counted")
        }
    }
}

/// Which [`ConnectFd`] goes with the attached state program.
fn connect_fd_source(state_program: &str, connect_hooks: bool) -> ConnectFd {
    let from_registers = [FIXED_STATE_PROGRAM, BTF_STATE_PROGRAM].contains(&state_program);
    if from_registers && cfg!(target_arch = "x86_64") {
        ConnectFd::Registers
    } else if connect_hooks {
        ConnectFd::Hook
    } else {
        ConnectFd::Unknown
    }
}

/// Loads the object and attaches only its no-op program to the state
/// tracepoint, and with `syscall_hooks` another to the accept() exit
/// tracepoints the agent hooks, and with `io` two more, as BTF tracepoints,
/// to `sock_send_length` and `sock_recv_length` (every socket send and
/// receive, where the agent's last-use programs run): the floors of `cargo
/// xtask bench`. Detached on drop; the stats watch every attached program.
pub fn attach_bench_floor(
    syscall_hooks: bool,
    btf: bool,
    io: bool,
) -> anyhow::Result<(Ebpf, ProgramStats)> {
    let mut ebpf = EbpfLoader::new()
        .load(PROGRAM)
        .context("loading the eBPF program")
        .map_err(explain)?;
    let (cat, name) = STATE_TP;
    let mut stats = ProgramStats::default();
    if btf {
        attach_btf(&mut ebpf, "bench_floor_btf", &mut stats).map_err(explain)?;
    } else {
        attach(&mut ebpf, "bench_floor", cat, name, &mut stats)
            .with_context(|| format!("attaching the no-op program to {cat}:{name}"))
            .map_err(explain)?;
    }
    if io {
        let kernel_btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
        for (prog, tp) in [
            ("bench_floor_send", "sock_send_length"),
            ("bench_floor_recv", "sock_recv_length"),
        ] {
            let program: &mut BtfTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("the eBPF object has no program {prog}"))?
                .try_into()?;
            program
                .load(tp, &kernel_btf)
                .with_context(|| format!("loading {prog} for the sock:{tp} tracepoint"))
                .map_err(explain)?;
            program
                .attach()
                .with_context(|| format!("attaching {prog} to sock:{tp} (Linux >= 6.3 has it)"))
                .map_err(explain)?;
            watch(&mut stats, prog, program.fd());
        }
    }
    if syscall_hooks {
        let program: &mut TracePoint = ebpf
            .program_mut("bench_floor_syscall")
            .ok_or_else(|| anyhow!("the eBPF object has no program bench_floor_syscall"))?
            .try_into()?;
        program.load().context("loading bench_floor_syscall")?;
        for tp in ["sys_exit_accept4", "sys_exit_accept"] {
            program
                .attach("syscalls", tp)
                .with_context(|| format!("attaching the no-op program to syscalls:{tp}"))
                .map_err(explain)?;
        }
        stats.watch(
            "bench_floor_syscall",
            program.fd()?.as_fd().try_clone_to_owned()?,
        );
    }
    Ok((ebpf, stats))
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
    watch(stats, prog, program.fd());
    Ok(())
}

impl LostCounter {
    /// The attached programs' runs and kernel time (see
    /// [`crate::kernel::progstats::ProgramTime`]).
    pub fn program_times(&self) -> Vec<crate::kernel::progstats::ProgramTime> {
        self.programs.run_times()
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixed_and_btf_programs_need_no_connect_hook_on_x86_64() {
        for program in [FIXED_STATE_PROGRAM, BTF_STATE_PROGRAM] {
            let source = connect_fd_source(program, true);
            if cfg!(target_arch = "x86_64") {
                assert_eq!(source, ConnectFd::Registers);
            } else {
                assert_eq!(source, ConnectFd::Hook);
            }
        }
        assert_eq!(
            connect_fd_source(OFFSETS_STATE_PROGRAM, true),
            ConnectFd::Hook
        );
        assert_eq!(
            connect_fd_source(OFFSETS_STATE_PROGRAM, false),
            ConnectFd::Unknown
        );
    }

    fn layout(fixed_record: bool, sock_fields: bool) -> Layout {
        // Any other record layout takes the offsets program.
        let offsets =
            crate::kernel::layout::FIXED_STATE_OFFSETS.map(|o| o + u32::from(!fixed_record));
        Layout {
            config: crate::kernel::layout::config_with_state_offsets(offsets, 2),
            connect_hooks: true,
            accept_hooks: true,
            reset_hooks: true,
            sock_fields,
        }
    }

    #[test]
    fn auto_tries_btf_then_the_classic_programs_and_a_choice_only_itself() {
        use StateProgram::*;
        let chain = |fixed, btf, choice| state_program_chain(&layout(fixed, btf), choice);
        assert_eq!(
            chain(true, true, Auto),
            [
                BTF_STATE_PROGRAM,
                FIXED_STATE_PROGRAM,
                OFFSETS_STATE_PROGRAM
            ]
        );
        assert_eq!(
            chain(false, true, Auto),
            [BTF_STATE_PROGRAM, OFFSETS_STATE_PROGRAM]
        );
        // No BTF, or a kernel older than 5.6.
        assert_eq!(
            chain(true, false, Auto),
            [FIXED_STATE_PROGRAM, OFFSETS_STATE_PROGRAM]
        );
        assert_eq!(chain(false, false, Auto), [OFFSETS_STATE_PROGRAM]);
        assert_eq!(chain(true, true, Fixed), [FIXED_STATE_PROGRAM]);
        assert_eq!(chain(true, true, Offsets), [OFFSETS_STATE_PROGRAM]);
        assert_eq!(chain(false, false, Btf), [BTF_STATE_PROGRAM]);
    }

    #[test]
    fn the_close_wait_table_is_an_eighth_of_what_the_agent_watches() {
        assert_eq!(
            cw_table_bits(crate::engine::closewait::DEFAULT_MAX_LINGERING),
            15
        );
        assert_eq!(cw_table_bits(1), 4, "16 slots at least");
        assert_eq!(cw_table_bits(8 * 1000), 10);
        assert_eq!(cw_table_bits(usize::MAX), 20, "1 M slots at most");
    }

    #[test]
    fn the_origin_table_has_a_power_of_two_slots_for_the_asked_maximum() {
        assert_eq!(origin_slot_bits(0), 4);
        assert_eq!(origin_slot_bits(10), 4);
        assert_eq!(origin_slot_bits(1_000_000), 20);
        assert_eq!(origin_slot_bits(1 << 20), 20);
        assert_eq!(origin_slot_bits(u32::MAX), 31);
    }
}
