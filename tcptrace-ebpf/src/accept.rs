//! The `accept()` hooks: the socket an accept returned, and its fd, sent
//! as an accept record (and kept as the socket's origin).

use aya_ebpf::helpers::{bpf_get_current_task, bpf_ktime_get_ns};
use aya_ebpf::macros::tracepoint;
use aya_ebpf::programs::TracePointContext;
use core::ptr::addr_of_mut;

use tcptrace_common::{
    AcceptRecord, AF_INET, AF_INET6, CONFIG_ACCEPT, CONFIG_ORIGIN_MAP, ORIGIN_ACCEPT,
    RECORD_ACCEPT, STACK_OF_ACCEPT,
};

use crate::config::config;
use crate::fields::{ctx_at, socket_ino};
use crate::helpers::{current_ids, read_ctx, read_kernel, write_current_comm};
use crate::origins::{keep, stack_allowed};
use crate::ring::send;
use crate::stack_copy::copy_user_stack;
use crate::stacks::user_stack;

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept(&ctx, config().exit_accept4_ret);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept(&ctx, config().exit_accept_ret);
    0
}

/// Where a syscall exit tracepoint's `ret` is on every usual kernel
/// (after the 8-byte common header and `__syscall_nr`).
const SYSCALL_EXIT_RET: u32 = 16;

/// Finds the `struct sock` behind the fd `accept()` returned (its `ret`,
/// at `ret_offset` in the context):
/// current->files->fdt->fd[ret]->private_data (a `struct socket`)->sk.
/// This runs for every accept() on the host: up to the stack budget, it
/// reads only the fields it needs, and `ret` with a plain load.
#[inline(always)]
fn on_accept(ctx: &TracePointContext, ret_offset: u32) -> Option<()> {
    let cfg = config();
    if cfg.flags & CONFIG_ACCEPT == 0 {
        return None;
    }
    let ret = if ret_offset == SYSCALL_EXIT_RET {
        ctx_at::<i64>(ctx, SYSCALL_EXIT_RET as usize)
    } else {
        read_ctx::<i64>(ctx, ret_offset)?
    };
    if ret < 0 {
        return None;
    }
    let fd = ret as u64;
    let walk_stack = stack_allowed(ctx, cfg.stacks_per_second);
    if !walk_stack && cfg.flags & CONFIG_ORIGIN_MAP != 0 {
        // Without its stack, an accept() origin would tell the agent only
        // what /proc tells it of a leak's owner; not keeping it saves the
        // walk from the fd to the socket, which costs as much as a stack.
        return None;
    }
    let task = unsafe { bpf_get_current_task() };
    let files = read_kernel::<u64>(task + u64::from(cfg.task_files))?;
    let fdt = read_kernel::<u64>(files + u64::from(cfg.files_fdt))?;
    let max_fds = read_kernel::<u32>(fdt + u64::from(cfg.fdt_max_fds))?;
    if fd >= u64::from(max_fds) {
        return None;
    }
    let fd_array = read_kernel::<u64>(fdt + u64::from(cfg.fdt_fd))?;
    let file = read_kernel::<u64>(fd_array + fd * 8)?;
    let socket = read_kernel::<u64>(file + u64::from(cfg.file_private_data))?;
    let sk = read_kernel::<u64>(socket + u64::from(cfg.socket_sk))?;
    let family = read_kernel::<u16>(sk + u64::from(cfg.sk_family))?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let stack_id = if walk_stack { user_stack(ctx) } else { -1 };
    let now = unsafe { bpf_ktime_get_ns() };
    if walk_stack {
        copy_user_stack(STACK_OF_ACCEPT, sk, now, stack_id);
    }
    if cfg.flags & CONFIG_ORIGIN_MAP != 0 {
        keep(sk, ORIGIN_ACCEPT, fd as i32, now, stack_id);
        return Some(());
    }
    let ino = socket_ino(cfg, socket);

    send(cfg, |rec: *mut AcceptRecord| unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_ACCEPT);
        let (tgid, tid) = current_ids();
        addr_of_mut!((*rec).tgid).write(tgid);
        addr_of_mut!((*rec).tid).write(tid);
        addr_of_mut!((*rec).fd).write(fd as i32);
        addr_of_mut!((*rec).ts_ns).write(now);
        addr_of_mut!((*rec).skaddr).write(sk);
        write_current_comm(addr_of_mut!((*rec).comm));
        addr_of_mut!((*rec).stack_id).write(stack_id);
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).ino).write(ino);
    })
}
