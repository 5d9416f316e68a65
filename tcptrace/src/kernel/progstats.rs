//! Records the kernel never let the program write: the per-CPU recursion
//! guard of tracing programs skips a program that fires while another BPF
//! program runs on the same CPU (a softirq that interrupts one, for
//! instance), and counts the skip in the program's `recursion_misses`
//! (Linux >= 5.12). The LOST counter cannot see these, so the agent reads
//! them here and reports them with the lost records.

use std::os::fd::{AsRawFd as _, OwnedFd};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

/// One program's runs and time in the kernel, counted only while the
/// `kernel.bpf_stats_enabled` sysctl is 1 (timing every run has a cost, so
/// the kernel leaves it off by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramTime {
    /// The program's name in the object.
    pub program: String,
    /// Runs.
    pub runs: u64,
    /// Time in those runs, ns.
    pub run_ns: u64,
}

/// Duplicated fds of the loaded programs, to read their counters.
#[derive(Debug, Default)]
pub struct ProgramStats {
    programs: Vec<(String, OwnedFd)>,
}

impl ProgramStats {
    /// Watches program `name` through a duplicate of its fd.
    pub fn watch(&mut self, name: &str, fd: OwnedFd) {
        self.programs.push((name.to_string(), fd));
    }

    /// Each watched program's runs and time in the kernel since it was
    /// loaded (zero unless `kernel.bpf_stats_enabled` is 1; programs whose
    /// counters cannot be read are left out).
    pub fn run_times(&self) -> Vec<ProgramTime> {
        self.programs
            .iter()
            .filter_map(|(name, fd)| {
                prog_info(fd).map(|i| ProgramTime {
                    program: name.clone(),
                    runs: i.run_cnt,
                    run_ns: i.run_time_ns,
                })
            })
            .collect()
    }

    /// Times any watched program was skipped by the recursion guard since it
    /// was loaded, summed; 0 on kernels that do not count them.
    pub fn recursion_misses(&self) -> u64 {
        self.programs
            .iter()
            .filter_map(|(_, fd)| prog_info(fd).map(|i| i.recursion_misses))
            .sum()
    }
}

fn prog_info(fd: &OwnedFd) -> Option<bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain integers; all-zero is a valid value.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    // SAFETY: as above for the attribute union.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    let raw_fd = u32::try_from(fd.as_raw_fd()).ok()?;
    attr.info.bpf_fd = raw_fd;
    attr.info.info_len = u32::try_from(std::mem::size_of::<bpf_prog_info>()).ok()?;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD writes at most info_len bytes into
    // `info`, which lives for the duration of the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_int,
            std::ptr::from_mut(&mut attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    (ret == 0).then_some(info)
}
