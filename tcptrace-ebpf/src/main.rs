//! tcptrace kernel program.
//!
//! Hot path: `sock:inet_sock_set_state` copies one transition of a TCP socket
//! into the ring buffer, nothing more. Process-context hooks record who owns
//! a socket: the fd given to `connect()` (looked up when the CLOSE->SYN_SENT
//! transition runs inside that call) and the socket `accept()` returned.
//!
//! Field and struct offsets come from [`TCPTRACE_CONFIG`], filled in by the
//! agent at load time from tracefs and BTF; nothing here assumes a layout.
#![no_std]
#![no_main]

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf, StackTrace},
    programs::{tracing::StackIdContext, TracePointContext},
    EbpfContext, Global,
};
use tcptrace_common::{
    tcp_state, AcceptRecord, KernelConfig, ResetRecord, StateRecord, AF_INET, AF_INET6,
    CONFIG_ACCEPT, CONFIG_INODE, CONFIG_NETNS, IPPROTO_TCP, RECORD_ACCEPT, RECORD_RESET,
    RECORD_STATE, RESET_RECEIVED, RESET_SENT,
};

/// Layout facts, set by the agent with `EbpfLoader::override_global`.
#[unsafe(no_mangle)]
static TCPTRACE_CONFIG: Global<KernelConfig> = Global::new(KernelConfig::ZERO);

/// Records to user space. The agent may resize it (`--ring-buffer-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records dropped because [`EVENTS`] was full, per CPU (index 0).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// fd of a `connect()` in progress, by thread id. Bounded: a thread is in at
/// most one connect at a time, and LRU evicts threads that died mid-call.
#[map]
static CONNECT_FD: LruHashMap<u32, i32> = LruHashMap::with_max_entries(16384, 0);

/// User stacks of connect() and accept() callers, deduplicated by the
/// kernel (a leaking call site takes one slot however often it leaks).
/// Taken only in those two process-context places, never on other
/// transitions.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// `BPF_F_USER_STACK`: walk the user-space stack of the current task.
const BPF_F_USER_STACK: u64 = 256;

#[inline(always)]
fn user_stack_id(ctx: &TracePointContext) -> i32 {
    ctx.get_stackid(&STACKS, BPF_F_USER_STACK)
        .map_or(-1, |id| id as i32)
}

/// Inode number of the file behind `socket` (a `struct socket` embedded in
/// a `struct socket_alloc` next to its inode), 0 when unknown.
#[inline(always)]
fn socket_ino(cfg: &KernelConfig, socket: u64) -> u64 {
    if cfg.flags & CONFIG_INODE == 0 || socket == 0 {
        return 0;
    }
    read_kernel::<u64>(socket + u64::from(cfg.socket_inode) + u64::from(cfg.inode_ino)).unwrap_or(0)
}

/// Inode of the socket file of `sk`, 0 when it has none (orphaned) or unknown.
#[inline(always)]
fn sk_ino(cfg: &KernelConfig, sk: u64) -> u64 {
    if cfg.flags & CONFIG_INODE == 0 {
        return 0;
    }
    read_kernel::<u64>(sk + u64::from(cfg.sk_socket)).map_or(0, |socket| socket_ino(cfg, socket))
}

/// `BPF_RB_NO_WAKEUP`, `BPF_RB_FORCE_WAKEUP`, `BPF_RB_AVAIL_DATA`.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Flags for a submit: wake the agent only once enough data waits (see
/// [`KernelConfig::wakeup_bytes`]); the agent polls on a timer otherwise.
#[inline(always)]
fn wakeup_flags(cfg: &KernelConfig) -> u64 {
    if cfg.wakeup_bytes == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA) >= u64::from(cfg.wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
fn count_lost() {
    if let Some(counter) = LOST.get_ptr_mut(0) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
fn read_ctx<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[inline(always)]
fn read_kernel<T>(addr: u64) -> Option<T> {
    if addr == 0 {
        return None;
    }
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    on_state_change(&ctx);
    0
}

#[inline(always)]
fn on_state_change(ctx: &TracePointContext) -> Option<()> {
    let cfg = TCPTRACE_CONFIG.load();
    let protocol = if cfg.tp_protocol_size == 1 {
        u16::from(read_ctx::<u8>(ctx, cfg.tp_protocol)?)
    } else {
        read_ctx::<u16>(ctx, cfg.tp_protocol)?
    };
    if protocol != IPPROTO_TCP {
        return None;
    }
    let family = read_ctx::<u16>(ctx, cfg.tp_family)?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let skaddr = read_ctx::<u64>(ctx, cfg.tp_skaddr)?;
    let oldstate = read_ctx::<i32>(ctx, cfg.tp_oldstate)?;
    let newstate = read_ctx::<i32>(ctx, cfg.tp_newstate)?;

    let pid_tgid = ctx.pid() as u64 | (u64::from(ctx.tgid()) << 32);
    let tid = pid_tgid as u32;
    let in_connect = oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT;
    let (connect_fd, stack_id) = if in_connect {
        // Runs inside connect(): the current task is the owner, and its
        // stack is the code path that opened the connection.
        (
            CONNECT_FD.get_ptr(tid).map_or(-1, |fd| unsafe { *fd }),
            user_stack_id(ctx),
        )
    } else {
        (-1, -1)
    };
    let ino = if in_connect || newstate == tcp_state::CLOSE_WAIT {
        sk_ino(&cfg, skaddr)
    } else {
        0
    };
    let netns = if cfg.flags & CONFIG_NETNS != 0 {
        read_kernel::<u64>(skaddr + u64::from(cfg.sk_net))
            .and_then(|net| read_kernel::<u32>(net + u64::from(cfg.net_inum)))
            .unwrap_or(0)
    } else {
        0
    };

    let Some(mut entry) = EVENTS.reserve::<StateRecord>(0) else {
        count_lost();
        return None;
    };
    // Write straight into the reservation: the BPF stack is 512 bytes.
    let rec = entry.as_mut_ptr();
    unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_STATE);
        addr_of_mut!((*rec).ctx_tgid).write((pid_tgid >> 32) as u32);
        addr_of_mut!((*rec).ctx_tid).write(tid);
        addr_of_mut!((*rec).netns).write(netns);
        addr_of_mut!((*rec).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*rec).skaddr).write(skaddr);
        addr_of_mut!((*rec).oldstate).write(oldstate);
        addr_of_mut!((*rec).newstate).write(newstate);
        addr_of_mut!((*rec).family).write(family);
        addr_of_mut!((*rec).sport).write(read_ctx::<u16>(ctx, cfg.tp_sport).unwrap_or(0));
        addr_of_mut!((*rec).dport).write(read_ctx::<u16>(ctx, cfg.tp_dport).unwrap_or(0));
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).connect_fd).write(connect_fd);
        addr_of_mut!((*rec).stack_id).write(stack_id);
        addr_of_mut!((*rec).ino).write(ino);
        let (saddr, daddr) = if family == AF_INET {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            let s4 = read_ctx::<[u8; 4]>(ctx, cfg.tp_saddr).unwrap_or([0; 4]);
            let d4 = read_ctx::<[u8; 4]>(ctx, cfg.tp_daddr).unwrap_or([0; 4]);
            s[..4].copy_from_slice(&s4);
            d[..4].copy_from_slice(&d4);
            (s, d)
        } else {
            (
                read_ctx::<[u8; 16]>(ctx, cfg.tp_saddr_v6).unwrap_or([0; 16]),
                read_ctx::<[u8; 16]>(ctx, cfg.tp_daddr_v6).unwrap_or([0; 16]),
            )
        };
        addr_of_mut!((*rec).saddr).write(saddr);
        addr_of_mut!((*rec).daddr).write(daddr);
        addr_of_mut!((*rec).comm).write(bpf_get_current_comm().unwrap_or([0; 16]));
    }
    entry.submit(wakeup_flags(&cfg));
    Some(())
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let cfg = TCPTRACE_CONFIG.load();
    on_reset(&ctx, cfg.rst_recv_skaddr, RESET_RECEIVED);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let cfg = TCPTRACE_CONFIG.load();
    on_reset(&ctx, cfg.rst_send_skaddr, RESET_SENT);
    0
}

/// A RST on a socket: tells an abort from a passage into TIME_WAIT.
#[inline(always)]
fn on_reset(ctx: &TracePointContext, skaddr_offset: u32, direction: u32) -> Option<()> {
    let skaddr = read_ctx::<u64>(ctx, skaddr_offset)?;
    if skaddr == 0 {
        // A RST answering a segment for no socket: nothing to attribute.
        return None;
    }
    let Some(mut entry) = EVENTS.reserve::<ResetRecord>(0) else {
        count_lost();
        return None;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_RESET);
        addr_of_mut!((*rec).direction).write(direction);
        addr_of_mut!((*rec).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*rec).skaddr).write(skaddr);
    }
    entry.submit(wakeup_flags(&TCPTRACE_CONFIG.load()));
    Some(())
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let cfg = TCPTRACE_CONFIG.load();
    if let Some(fd) = read_ctx::<u64>(&ctx, cfg.enter_connect_fd) {
        // Failure only means the LRU map could not take the entry: the
        // transition then reports no fd, which the agent handles.
        let _ = CONNECT_FD.insert(ctx.pid(), fd as i32, 0);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_connect")]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let _ = CONNECT_FD.remove(ctx.pid());
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    let cfg = TCPTRACE_CONFIG.load();
    on_accept(&ctx, &cfg, cfg.exit_accept4_ret);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_accept")]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    let cfg = TCPTRACE_CONFIG.load();
    on_accept(&ctx, &cfg, cfg.exit_accept_ret);
    0
}

/// Finds the `struct sock` behind the fd `accept()` returned:
/// current->files->fdt->fd[ret]->private_data (a `struct socket`)->sk.
#[inline(always)]
fn on_accept(ctx: &TracePointContext, cfg: &KernelConfig, ret_offset: u32) -> Option<()> {
    if cfg.flags & CONFIG_ACCEPT == 0 {
        return None;
    }
    let ret = read_ctx::<i64>(ctx, ret_offset)?;
    if ret < 0 {
        return None;
    }
    let fd = ret as u64;
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
    let ino = socket_ino(cfg, socket);
    let stack_id = user_stack_id(ctx);

    let Some(mut entry) = EVENTS.reserve::<AcceptRecord>(0) else {
        count_lost();
        return None;
    };
    let rec = entry.as_mut_ptr();
    unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_ACCEPT);
        addr_of_mut!((*rec).tgid).write(ctx.tgid());
        addr_of_mut!((*rec).tid).write(ctx.pid());
        addr_of_mut!((*rec).fd).write(fd as i32);
        addr_of_mut!((*rec).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*rec).skaddr).write(sk);
        addr_of_mut!((*rec).comm).write(bpf_get_current_comm().unwrap_or([0; 16]));
        addr_of_mut!((*rec).stack_id).write(stack_id);
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).ino).write(ino);
    }
    entry.submit(wakeup_flags(&TCPTRACE_CONFIG.load()));
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_kernel` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
