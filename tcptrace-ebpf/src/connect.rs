//! The `connect()` hook: the fd a connecting socket has, kept per thread
//! for the CLOSE -> SYN_SENT transition that runs inside the call (or read
//! from the syscall's registers where the architecture allows).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::TracePointContext;
use aya_ebpf::EbpfContext;
use tcptrace_common::ConnectSlot;

use crate::config::config;
use crate::helpers::{read_ctx, read_kernel};

/// The fd of the `connect()` this CPU entered last (see [`ConnectSlot`]): a
/// per-CPU slot costs a plain store, where a hash map cost an insert on
/// entry and a delete on exit.
#[map]
static CONNECT_FD: PerCpuArray<ConnectSlot> = PerCpuArray::with_max_entries(1, 0);

/// A connect() slot older than this is stale (the CLOSE -> SYN_SENT
/// transition follows the syscall's entry within microseconds).
const CONNECT_SLOT_NS: u64 = 10_000_000;

/// x86_64 `struct pt_regs` (the ptrace ABI, fixed): the first syscall
/// argument (`di`) and the syscall number (`orig_ax`).
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_DI: u64 = 112;
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_ORIG_AX: u64 = 120;
/// x86_64 syscalls whose first argument is the fd of a socket that may
/// connect: connect(2), and sendto(2)/sendmsg(2) with MSG_FASTOPEN.
#[cfg(bpf_target_arch = "x86_64")]
const FD_FIRST_SYSCALLS: [u64; 3] = [42, 44, 46];

/// The number of the system call the current task is in (x86_64
/// numbers), -1 when unknown or not in one. BTF programs only:
/// `bpf_task_pt_regs` needs Linux >= 5.15 and a BTF task pointer.
#[inline(always)]
pub(crate) fn current_syscall_nr() -> i32 {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_task_pt_regs};
        let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
        read_kernel::<u64>(regs + PT_REGS_ORIG_AX).map_or(-1, |nr| nr as i32)
    }
    #[cfg(not(bpf_target_arch = "x86_64"))]
    {
        -1
    }
}

/// The fd argument of the syscall the current task is in (see
/// [`FD_FIRST_SYSCALLS`]), -1 for any other (io_uring, a 32-bit task).
/// `bpf_task_pt_regs` needs Linux >= 5.15: on an older kernel this program
/// fails to load and the agent falls back to the other one and the
/// `sys_enter_connect` hook.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn syscall_fd_from_regs() -> i32 {
    use aya_ebpf::helpers::{bpf_get_current_task_btf, bpf_task_pt_regs};
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let Some(nr) = read_kernel::<u64>(regs + PT_REGS_ORIG_AX) else {
        return -1;
    };
    if !FD_FIRST_SYSCALLS.contains(&nr) {
        return -1;
    }
    read_kernel::<u64>(regs + PT_REGS_DI).map_or(-1, |fd| fd as i32)
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if let (Some(fd), Some(slot)) = (
        read_ctx::<u64>(&ctx, cfg.enter_connect_fd),
        CONNECT_FD.get_ptr_mut(0),
    ) {
        unsafe {
            *slot = ConnectSlot {
                tid: ctx.pid(),
                fd: fd as i32,
                ts_ns: bpf_ktime_get_ns(),
            };
        }
    }
    0
}

/// The fd thread `tid` passed to the connect() it is in, if this CPU saw
/// it enter moments ago; -1 otherwise.
#[inline(always)]
pub(crate) fn connect_fd(tid: u32, now: u64) -> i32 {
    let Some(slot) = CONNECT_FD.get_ptr(0) else {
        return -1;
    };
    let slot = unsafe { *slot };
    let fresh = now.wrapping_sub(slot.ts_ns) < CONNECT_SLOT_NS;
    if slot.tid == tid && fresh {
        slot.fd
    } else {
        -1
    }
}
