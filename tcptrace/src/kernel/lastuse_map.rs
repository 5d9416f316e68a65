//! The kernel's last-use maps: the `LAST_USE` socket storage, read through a
//! duplicate of a holder's fd (`pidfd_getfd(2)`), its counters, and the
//! checkout gap in jiffies, set from the kernel's measured tick rate. The
//! values are decoded by [`crate::engine::lastuse`].

use std::os::fd::AsFd as _;
use std::sync::atomic::{AtomicBool, Ordering};

use aya::maps::{Array, MapData, PerCpuArray, SkStorage};
use aya::Ebpf;

use crate::engine::lastuse::{gap_jiffies, tick_rate, LastUse};
use crate::kernel::maps::per_cpu_sum;

/// Counts of the kernel's last-use program, over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastUseCounts {
    /// Checkouts seen.
    pub checkouts: u64,
    /// Stacks walked for them (the others were past the stack budget).
    pub stacks: u64,
    /// I/Os not recorded: no socket storage could be had.
    pub no_storage: u64,
}

/// The kernel's last-use storage and counters, and its tick.
pub struct LastUseMap {
    storage: SkStorage<MapData, tcptrace_common::LastUse>,
    counts: PerCpuArray<MapData, u64>,
    /// Nanoseconds per jiffy (`1e9 / CONFIG_HZ`).
    tick_ns: u64,
}

/// How long the tick rate is measured for at start-up (25 ticks at HZ=250).
const TICK_SAMPLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Why a holder's last use could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The process or its fd is gone, or cannot be reached
    /// (`pidfd_open`/`pidfd_getfd`: Linux < 5.6, Yama ptrace_scope 3,
    /// no CAP_SYS_PTRACE).
    Holder(std::io::Error),
    /// The map lookup failed for another reason than "no value".
    Map(aya::maps::MapError),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Holder(e) => write!(
                f,
                "cannot duplicate the holder's fd with pidfd_getfd ({e}); last use needs Linux >= \
                 5.6, CAP_SYS_PTRACE and a Yama ptrace_scope below 3"
            ),
            Self::Map(e) => write!(f, "reading the LAST_USE socket storage failed: {e}"),
        }
    }
}

impl std::error::Error for ReadError {}

impl LastUseMap {
    /// Takes the maps out of the loaded object, measures the kernel's tick
    /// rate (its `clock_sample` program run twice, `TICK_SAMPLE` apart)
    /// and sets the checkout gap in jiffies. Call before attaching the
    /// programs: until the gap is set, they would call every I/O a
    /// checkout.
    pub fn open(ebpf: &mut Ebpf, gap: std::time::Duration) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let hz = measure_hz(ebpf)?;
        // Borrowed, not taken: a map taken out of the object and dropped
        // closes its fd, and the programs loaded after it refer to it.
        let mut gap_map: Array<&mut aya::maps::MapData, u64> = Array::try_from(
            ebpf.map_mut("LAST_USE_GAP_JIFFIES")
                .context("the eBPF object has no LAST_USE_GAP_JIFFIES map")?,
        )
        .context("opening LAST_USE_GAP_JIFFIES")?;
        let jiffies = gap_jiffies(gap, hz);
        gap_map
            .set(tcptrace_common::LAST_USE_GAP, jiffies, 0)
            .context("setting the checkout gap")?;
        log::debug!("last use: kernel tick {hz} Hz, checkout gap {jiffies} jiffies");
        let storage = ebpf
            .take_map("LAST_USE")
            .context("the eBPF object has no LAST_USE map")?;
        let counts = ebpf
            .take_map("LAST_USE_COUNTS")
            .context("the eBPF object has no LAST_USE_COUNTS map")?;
        Ok(Self {
            storage: SkStorage::try_from(storage).context("opening the LAST_USE storage")?,
            counts: PerCpuArray::try_from(counts).context("opening LAST_USE_COUNTS")?,
            tick_ns: 1_000_000_000 / u64::from(hz),
        })
    }

    /// The last use of the socket that process `pid` holds as `fd`;
    /// `Ok(None)` when the kernel saw no I/O on it.
    pub fn of_holder(
        &self,
        pid: u32,
        fd: i32,
    ) -> Result<Option<tcptrace_common::LastUse>, ReadError> {
        let pid = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| ReadError::Holder(std::io::ErrorKind::InvalidInput.into()))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            .map_err(|e| ReadError::Holder(e.into()))?;
        let sock = rustix::process::pidfd_getfd(
            pidfd.as_fd(),
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )
        .map_err(|e| ReadError::Holder(e.into()))?;
        match self.storage.get(&sock, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(ReadError::Map(e)),
        }
        // `sock` and `pidfd` close here.
    }

    /// [`Self::of_holder`], decoded, for the leak report: `None` when
    /// there is no last use or it cannot be read. A holder that exited or closed the
    /// fd since /proc was read is a race, not a failure; any other failure
    /// is logged, as a warning the first time (it is likely to repeat for
    /// every leak: no CAP_SYS_PTRACE, Yama) and at debug level after.
    pub fn lookup(&self, pid: u32, fd: i32) -> Option<LastUse> {
        static WARNED: AtomicBool = AtomicBool::new(false);
        match self.of_holder(pid, fd) {
            Ok(found) => found.and_then(|rec| LastUse::from_kernel(&rec, self.tick_ns)),
            Err(ReadError::Holder(e))
                if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EBADF)) =>
            {
                None
            }
            Err(e) => {
                let what = format!("last use of pid {pid} fd {fd}: {e}");
                if WARNED.swap(true, Ordering::Relaxed) {
                    log::debug!("{what}");
                } else {
                    log::warn!("{what} (said once; RUST_LOG=debug shows the others)");
                }
                None
            }
        }
    }

    /// The kernel's counts now.
    pub fn counts(&self) -> LastUseCounts {
        let slot = |i| per_cpu_sum(&self.counts, i);
        LastUseCounts {
            checkouts: slot(tcptrace_common::LU_CHECKOUTS),
            stacks: slot(tcptrace_common::LU_STACKS),
            no_storage: slot(tcptrace_common::LU_NO_STORAGE),
        }
    }
}

/// The kernel's tick rate, from its jiffies read twice by `clock_sample`.
fn measure_hz(ebpf: &mut Ebpf) -> anyhow::Result<u32> {
    use anyhow::Context as _;
    let program: &mut aya::programs::RawTracePoint = ebpf
        .program_mut("clock_sample")
        .context("the eBPF object has no program clock_sample")?
        .try_into()?;
    program.load().context("loading clock_sample")?;
    let fd = program
        .fd()?
        .try_clone()
        .context("duplicating the fd of clock_sample")?;
    let clock: Array<&aya::maps::MapData, u64> = Array::try_from(
        ebpf.map("CLOCK_SAMPLE")
            .context("the eBPF object has no CLOCK_SAMPLE map")?,
    )
    .context("opening CLOCK_SAMPLE")?;
    let sample = || -> anyhow::Result<(u64, std::time::Instant)> {
        crate::kernel::stage::test_run(fd.as_fd(), None).context("running clock_sample")?;
        let jiffies = clock.get(&0, 0).context("reading CLOCK_SAMPLE")?;
        Ok((jiffies, std::time::Instant::now()))
    };
    let (j0, t0) = sample()?;
    std::thread::sleep(TICK_SAMPLE);
    let (j1, t1) = sample()?;
    let elapsed = u64::try_from((t1 - t0).as_nanos()).unwrap_or(u64::MAX);
    tick_rate(j1.wrapping_sub(j0), elapsed).with_context(|| {
        format!("the kernel's jiffies did not move in {elapsed} ns ({j0} -> {j1})")
    })
}
