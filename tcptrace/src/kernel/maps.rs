//! Two facts about the kernel's maps that the modules reading them share,
//! kept below all of them: the page size (the unit of the ring buffer and
//! of a mapped map) and the sum of a per-CPU counter.

use aya::maps::{MapData, PerCpuArray};

/// The kernel's page size: the unit of the ring buffer's size and of a
/// mapped map (4096 should sysconf ever fail).
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Counter `i` of a kernel per-CPU counter array, summed over CPUs (0 when
/// it cannot be read: a counter is never worth failing for).
pub fn per_cpu_sum(counts: &PerCpuArray<MapData, u64>, i: u32) -> u64 {
    counts
        .get(&i, 0)
        .map(|per_cpu| per_cpu.iter().sum())
        .unwrap_or(0)
}
