//! Runs the kernel's `flush_stage` program on every CPU, so that short
//! records staged there (`CONFIG_STAGE`) reach the ring: the kernel edge of
//! staging. The agent does it each time before it reads the ring; see
//! [`crate::engine::reorder`] for what it does with the time it gets back.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{anyhow, Context};
use aya::programs::{ProgramFd, RawTracePoint};
use aya::Ebpf;
use tcptrace_common::FLUSH_BUSY;

use crate::engine::clock::WallClock;

/// The kernel program that sends a CPU's staged records.
pub const FLUSH_PROGRAM: &str = "flush_stage";

/// Runs a CPU is given to finish the record it is staging: its program
/// takes well under a microsecond, so a second run nearly always finds
/// the batch free.
const BUSY_TRIES: u32 = 8;

/// The loaded `flush_stage` program and the CPUs to run it on.
pub struct Flusher {
    program: ProgramFd,
    cpus: Vec<u32>,
}

/// Staging is not available on this kernel (or for this agent): the
/// caller loads the program again without it.
#[derive(Debug)]
pub struct StageUnavailable(pub anyhow::Error);

impl std::fmt::Display for StageUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for StageUnavailable {}

impl Flusher {
    /// Loads `flush_stage` from `ebpf` and runs it once on every online
    /// CPU, which proves the kernel can (`BPF_F_TEST_RUN_ON_CPU` came in
    /// Linux 5.10).
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, StageUnavailable> {
        Self::load_inner(ebpf).map_err(StageUnavailable)
    }

    fn load_inner(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(FLUSH_PROGRAM)
            .ok_or_else(|| anyhow!("the eBPF object has no program {FLUSH_PROGRAM}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading {FLUSH_PROGRAM}"))?;
        let program = program
            .fd()?
            .try_clone()
            .with_context(|| format!("duplicating the fd of {FLUSH_PROGRAM}"))?;
        let cpus = aya::util::online_cpus()
            .map_err(|(path, e)| anyhow!("reading the online CPUs from {path}: {e}"))?;
        let flusher = Self { program, cpus };
        flusher
            .flush()
            .with_context(|| format!("running {FLUSH_PROGRAM} on each CPU (needs Linux 5.10+)"))?;
        Ok(flusher)
    }

    /// Sends every CPU's staged records into the ring. Returns the
    /// monotonic time the flush began: every record stamped before it is
    /// now in the ring, or being written by a program that stamped it
    /// before it reserved its place. `None` when a CPU's batch stayed busy
    /// through every try (records of that CPU may still be staged).
    pub fn flush(&self) -> io::Result<Option<u64>> {
        let began = WallClock::now_ns();
        let mut complete = true;
        for &cpu in &self.cpus {
            let mut flushed = false;
            for _ in 0..BUSY_TRIES {
                if run_on_cpu(self.program.as_fd(), cpu)? != FLUSH_BUSY {
                    flushed = true;
                    break;
                }
            }
            complete &= flushed;
        }
        Ok(complete.then_some(began))
    }
}

/// `BPF_PROG_TEST_RUN`.
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_F_TEST_RUN_ON_CPU`.
const BPF_F_TEST_RUN_ON_CPU: u32 = 1;

/// The `test` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, so that it is zero: the kernel rejects unknown nonzero bytes.
    _pad: u32,
}

/// Runs raw tracepoint program `program` on `cpu` (through an interrupt
/// there, unless it is this CPU) and returns what it returned. aya has no
/// call for this.
fn run_on_cpu(program: BorrowedFd<'_>, cpu: u32) -> io::Result<u32> {
    test_run(program, Some(cpu))
}

/// Runs raw tracepoint program `program` once (on `cpu`, or on the
/// calling thread's CPU) with `BPF_PROG_TEST_RUN` and returns what it
/// returned.
pub(crate) fn test_run(program: BorrowedFd<'_>, cpu: Option<u32>) -> io::Result<u32> {
    let mut attr = TestRunAttr {
        prog_fd: u32::try_from(program.as_raw_fd())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        flags: if cpu.is_some() {
            BPF_F_TEST_RUN_ON_CPU
        } else {
            0
        },
        cpu: cpu.unwrap_or(0),
        ..TestRunAttr::default()
    };
    // SAFETY: `attr` is a valid, zero-padded `bpf_attr` prefix of the
    // size passed, alive for the call; the kernel writes only `retval`
    // (and `duration`) into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(attr.retval)
}

#[cfg(test)]
mod tests {
    use super::TestRunAttr;

    /// The offsets of the kernel's `bpf_attr.test` (include/uapi/linux/bpf.h).
    #[test]
    fn test_run_attr_matches_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(TestRunAttr, data_in), 16);
        assert_eq!(std::mem::offset_of!(TestRunAttr, ctx_in), 48);
        assert_eq!(std::mem::offset_of!(TestRunAttr, flags), 64);
        assert_eq!(std::mem::offset_of!(TestRunAttr, cpu), 68);
        assert_eq!(std::mem::offset_of!(TestRunAttr, batch_size), 72);
        assert_eq!(std::mem::size_of::<TestRunAttr>(), 80);
    }
}
