//! Records shared by the tcptrace kernel program and the agent.
//!
//! Every type here is `#[repr(C)]` and crosses the kernel/user boundary as raw
//! bytes: through the ring buffer (records) or as a load-time global (the
//! [`KernelConfig`]). Each record starts with a `u32` kind so that the agent can
//! tell them apart and reject anything it does not know. Change a layout and
//! you must bump [`RECORD_LAYOUT_VERSION`] and the agent's decoder together.
#![no_std]

/// Bumped whenever a record layout below changes.
pub const RECORD_LAYOUT_VERSION: u32 = 6;

/// Kind tag of a [`StateRecord`].
pub const RECORD_STATE: u32 = 1;
/// Kind tag of an [`AcceptRecord`].
pub const RECORD_ACCEPT: u32 = 2;
/// Kind tag of a [`ResetRecord`].
pub const RECORD_RESET: u32 = 3;
/// Kind tag of a [`StateRecordV4`].
pub const RECORD_STATE_V4: u32 = 4;
/// Kind tag of a [`StateBatch`].
pub const RECORD_STATE_BATCH: u32 = 5;
/// Kind tag of a [`UserStackHeader`] and the stack bytes after it.
pub const RECORD_USER_STACK: u32 = 6;

/// Length of a task's `comm`, as in the kernel's `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;

/// `AF_INET`, as the tracepoint reports it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the tracepoint reports it.
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`: the only protocol the kernel program forwards.
pub const IPPROTO_TCP: u16 = 6;

/// Kernel TCP state numbers (`include/net/tcp_states.h`).
pub mod tcp_state {
    /// TCP_ESTABLISHED
    pub const ESTABLISHED: i32 = 1;
    /// TCP_SYN_SENT
    pub const SYN_SENT: i32 = 2;
    /// TCP_SYN_RECV
    pub const SYN_RECV: i32 = 3;
    /// TCP_FIN_WAIT1
    pub const FIN_WAIT1: i32 = 4;
    /// TCP_FIN_WAIT2
    pub const FIN_WAIT2: i32 = 5;
    /// TCP_TIME_WAIT
    pub const TIME_WAIT: i32 = 6;
    /// TCP_CLOSE
    pub const CLOSE: i32 = 7;
    /// TCP_CLOSE_WAIT
    pub const CLOSE_WAIT: i32 = 8;
    /// TCP_LAST_ACK
    pub const LAST_ACK: i32 = 9;
    /// TCP_LISTEN
    pub const LISTEN: i32 = 10;
    /// TCP_CLOSING
    pub const CLOSING: i32 = 11;
    /// TCP_NEW_SYN_RECV
    pub const NEW_SYN_RECV: i32 = 12;
}

/// One `sock:inet_sock_set_state` transition of a TCP socket.
///
/// `ctx_*` describe the task that was running when the transition fired.
/// That is the socket's owner only when the transition runs in the owner's
/// own system call (connect, close); in softirq context it is whatever task
/// happened to be on the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateRecord {
    /// [`RECORD_STATE`].
    pub kind: u32,
    /// Process id (tgid) of the context task.
    pub ctx_tgid: u32,
    /// Thread id of the context task.
    pub ctx_tid: u32,
    /// Inode of the socket's network namespace; 0 when it could not be read.
    pub netns: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`: the socket's identity while it lives.
    pub skaddr: u64,
    /// State left.
    pub oldstate: i32,
    /// State entered.
    pub newstate: i32,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// Padding; zero.
    pub _pad0: u16,
    /// The fd passed to `connect()` when this transition ran inside the
    /// context task's `connect()` call; -1 otherwise.
    pub connect_fd: i32,
    /// User stack of the context task (id in the `STACKS` map) on
    /// CLOSE -> SYN_SENT, which runs inside `connect()`; -1 otherwise or
    /// when the stack could not be taken.
    pub stack_id: i32,
    /// Local address, network byte order; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    /// Remote address, network byte order; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
    /// `comm` of the context task, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Inode of the socket's file (as in `/proc/PID/fd` links and
    /// `/proc/net/tcp`), read on CLOSE -> SYN_SENT and on entering
    /// CLOSE_WAIT; 0 otherwise or when unknown.
    pub ino: u64,
}

/// A [`StateRecord`] in 64 bytes instead of 112, for the transitions that
/// make up most of a stream of every transition: those of an IPv4 socket
/// that carry none of the fields only a `connect()` or an entry into
/// CLOSE_WAIT fills (`connect_fd`, `stack_id` and `ino` are -1, -1 and 0,
/// the family is [`AF_INET`]). Nothing is lost: the agent decodes it into
/// the same transition.
///
/// Why a second layout: writing a record costs the CPU that makes the
/// transition about one cache miss per 64 bytes (the agent's CPU read that
/// part of the ring last), and in the benchmark's churn that is most of a
/// record's cost. 64 bytes and the ring's 8-byte header make 72 where the
/// full record makes 120.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateRecordV4 {
    /// [`RECORD_STATE_V4`].
    pub kind: u32,
    /// Process id (tgid) of the context task.
    pub ctx_tgid: u32,
    /// Thread id of the context task.
    pub ctx_tid: u32,
    /// Inode of the socket's network namespace; 0 when it could not be read.
    pub netns: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the `struct sock`.
    pub skaddr: u64,
    /// State left (the kernel's numbers fit a byte).
    pub oldstate: u8,
    /// State entered.
    pub newstate: u8,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    /// Padding; zero.
    pub _pad0: u16,
    /// Local address, network byte order.
    pub saddr: [u8; 4],
    /// Remote address, network byte order.
    pub daddr: [u8; 4],
    /// `comm` of the context task, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// True when a kernel state number fits [`StateRecordV4`]'s byte (they
/// all do; a garbage one goes in a full record, for the agent to reject).
#[inline(always)]
pub const fn state_fits_byte(state: i32) -> bool {
    state >= 0 && state <= u8::MAX as i32
}

/// An `accept()`/`accept4()` that returned a TCP socket: who now holds it.
///
/// Emitted from the syscall exit tracepoint, so the context task is the
/// socket's owner.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptRecord {
    /// [`RECORD_ACCEPT`].
    pub kind: u32,
    /// Process id (tgid) of the accepting task.
    pub tgid: u32,
    /// Thread id of the accepting task.
    pub tid: u32,
    /// The new file descriptor.
    pub fd: i32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the accepted `struct sock`.
    pub skaddr: u64,
    /// `comm` of the accepting task, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// User stack of the accepting task (id in the `STACKS` map); -1 when
    /// it could not be taken.
    pub stack_id: i32,
    /// Padding; zero.
    pub _pad0: u32,
    /// Inode of the accepted socket's file; 0 when unknown.
    pub ino: u64,
}

/// A RST received or sent on a socket: its next CLOSE is an abort, not a
/// passage into TIME_WAIT.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRecord {
    /// [`RECORD_RESET`].
    pub kind: u32,
    /// [`RESET_RECEIVED`] or [`RESET_SENT`].
    pub direction: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    /// Kernel address of the socket.
    pub skaddr: u64,
}

/// [`ResetRecord::direction`]: `tcp:tcp_receive_reset`.
pub const RESET_RECEIVED: u32 = 0;
/// [`ResetRecord::direction`]: `tcp:tcp_send_reset`.
pub const RESET_SENT: u32 = 1;

/// Bit in [`KernelConfig::flags`]: the `sk_net`/`net_inum` offsets are valid.
pub const CONFIG_NETNS: u32 = 1 << 0;
/// Bit in [`KernelConfig::flags`]: the fd-to-socket walk offsets are valid.
pub const CONFIG_ACCEPT: u32 = 1 << 1;
/// Bit in [`KernelConfig::flags`]: the socket-to-inode offsets are valid.
pub const CONFIG_INODE: u32 = 1 << 2;
/// Bit in [`KernelConfig::flags`]: keep each connection's origin in the
/// `ORIGINS` table (written at connect()/accept(), freed when the socket
/// closes; see [`OriginSlot`]) instead of sending it through the ring
/// buffer. The agent reads an origin only for the few sockets that become
/// leak candidates, so a healthy connection costs a slot claimed and freed,
/// not two records.
pub const CONFIG_ORIGIN_MAP: u32 = 1 << 3;

/// Slots of the kernel's per-CPU `ORIGIN_COUNTS`: origins inserted into
/// `ORIGINS`, removed from it, not kept because every slot they could take
/// was in use, and connections whose origin stack was not walked because
/// their process was over its `stacks_per_second` budget.
pub const ORIGINS_INSERTED: u32 = 0;
/// See [`ORIGINS_INSERTED`].
pub const ORIGINS_REMOVED: u32 = 1;
/// See [`ORIGINS_INSERTED`].
pub const ORIGINS_FULL: u32 = 2;
/// See [`ORIGINS_INSERTED`].
pub const STACKS_OVER_BUDGET: u32 = 3;
/// Number of `ORIGIN_COUNTS` slots.
pub const ORIGIN_COUNT_SLOTS: u32 = 4;

/// [`OriginSlot::syscall`]: `connect()`.
pub const ORIGIN_CONNECT: u32 = 1;
/// [`OriginSlot::syscall`]: `accept()`/`accept4()`.
pub const ORIGIN_ACCEPT: u32 = 2;

/// Where a connection came from, kept in a slot of the kernel's `ORIGINS`
/// table while the socket lives (see [`CONFIG_ORIGIN_MAP`]).
///
/// The table is an array probed by socket address ([`socket_slot`], then
/// up to [`SLOT_PROBES`] consecutive slots): claiming a slot is one
/// compare-and-swap of [`OriginSlot::sk`] and freeing it one store, where a
/// hash map took a bucket lock, an allocation and an RCU-deferred free on
/// each connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginSlot {
    /// Kernel address of the socket; 0 for a free slot.
    pub sk: u64,
    /// `bpf_ktime_get_ns()` of the call.
    pub ts_ns: u64,
    /// [`ORIGIN_CONNECT`] or [`ORIGIN_ACCEPT`].
    pub syscall: u32,
    /// Process id (tgid) of the caller.
    pub tgid: u32,
    /// Thread id of the caller (its name is read from /proc when needed).
    pub tid: u32,
    /// The fd passed to connect() or returned by accept(); -1 when unknown.
    pub fd: i32,
    /// User stack id in the `STACKS` map; -1 when not taken.
    pub stack_id: i32,
    /// Padding; zero.
    pub _pad0: u32,
}

/// Slots looked at, from [`socket_slot`] on, to place or find a socket in
/// the `ORIGINS` and `CLOSE_WAITS` tables.
pub const SLOT_PROBES: u32 = 8;

/// Bit in [`KernelConfig::flags`]: keep sockets that enter CLOSE_WAIT in
/// the `CLOSE_WAITS` table (a [`StateRecord`] of the entry per slot, slot
/// found by [`socket_slot`]; an array the agent maps into its memory)
/// instead of sending the entry. On leaving CLOSE_WAIT after less than
/// [`KernelConfig::cw_quiet_ms`], the kernel only counts the linger time
/// (`CW_COUNTS`) and sends nothing; after longer, it sends the entry it
/// kept, then the exit. The agent reads the table on its leak tick and
/// takes in every socket there for at least that long, so a healthy
/// connection's passage through CLOSE_WAIT costs no record at all. A
/// socket that finds no free slot is sent as before.
pub const CONFIG_CW_TABLE: u32 = 1 << 4;

/// Bit in [`KernelConfig::flags`]: a CPU stages its short records
/// ([`StateRecordV4`]) in a per-CPU [`StateBatch`] and sends them
/// [`STAGED_RECORDS`] at a time, one ring-buffer reservation instead of
/// one each; the agent's `flush_stage` program sends a CPU's partial batch
/// when the agent runs it on that CPU, every time it reads the ring.
/// For streams of every transition, where the ring's lock and barriers
/// were a third of a record's cost.
pub const CONFIG_STAGE: u32 = 1 << 5;

/// Records a [`StateBatch`] holds.
pub const STAGED_RECORDS: usize = 16;

/// Short records staged on one CPU, oldest first, sent as one ring-buffer
/// record of `8 + 64 * count` bytes (only the staged records).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateBatch {
    /// [`RECORD_STATE_BATCH`].
    pub kind: u32,
    /// Records in `records`, 1 to [`STAGED_RECORDS`] when sent.
    pub count: u32,
    /// The staged records; those past `count` are not sent.
    pub records: [StateRecordV4; STAGED_RECORDS],
}

/// What the kernel's `flush_stage` program returns when the CPU was
/// staging a record as the agent's run interrupted it: nothing was sent,
/// run it again.
pub const FLUSH_BUSY: u32 = 1;

/// Slots of the kernel's per-CPU `CW_COUNTS`: sockets kept in the
/// `CLOSE_WAITS` table, ...
pub const CW_KEPT: u32 = 0;
/// ... those that left it after a quiet linger (counted only), ...
pub const CW_QUIET: u32 = 1;
/// ... those that left it after a longer one (sent), ...
pub const CW_SENT: u32 = 2;
/// ... and entries sent because every slot they could take was in use.
pub const CW_FULL: u32 = 3;
/// First of the [`LINGER_BUCKETS`] counts of quiet linger times.
pub const CW_LINGER: u32 = 4;
/// Sum of quiet linger times, nanoseconds.
pub const CW_LINGER_SUM_NS: u32 = CW_LINGER + LINGER_BUCKETS;
/// Number of `CW_COUNTS` slots.
pub const CW_COUNT_SLOTS: u32 = CW_LINGER_SUM_NS + 1;

/// Linger-time buckets, in powers of ten of milliseconds: `<1ms, <10ms,
/// <100ms, <1s, <10s, <100s, >=100s`.
pub const LINGER_BUCKETS: u32 = 7;

/// The [`LINGER_BUCKETS`] bucket of a linger of `ns` nanoseconds.
#[inline(always)]
pub fn linger_bucket(ns: u64) -> u32 {
    let ms = ns / 1_000_000;
    if ms < 1 {
        0
    } else if ms < 10 {
        1
    } else if ms < 100 {
        2
    } else if ms < 1_000 {
        3
    } else if ms < 10_000 {
        4
    } else if ms < 100_000 {
        5
    } else {
        6
    }
}

/// The first slot of socket `sk` in a table of `1 << bits`
/// slots (`bits` in 1..=31): the top bits of MurmurHash3's 64-bit
/// finalizer of the address. (A single multiply by the golden ratio put
/// slab neighbours, a fixed stride apart, on a third of the slots.)
#[inline(always)]
pub fn socket_slot(sk: u64, bits: u32) -> u32 {
    let bits = if bits == 0 || bits > 31 { 1 } else { bits };
    let mut h = sk >> 4;
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h >> (64 - bits)) as u32
}

/// The `i`th slot (of [`SLOT_PROBES`]) socket `sk` may take in a table of
/// `1 << bits` slots: the slots after [`socket_slot`], wrapping around.
#[inline(always)]
pub fn probe_slot(sk: u64, bits: u32, i: u32) -> u32 {
    let mask = (1u32 << (bits & 31)).wrapping_sub(1);
    socket_slot(sk, bits).wrapping_add(i) & mask
}

/// Layout facts the kernel program needs and cannot know at compile time.
///
/// The agent reads tracepoint field offsets from tracefs `format` files and
/// kernel struct member offsets from `/sys/kernel/btf/vmlinux`, then passes
/// this struct as the global `TCPTRACE_CONFIG` at load time. A Rust eBPF
/// program gets no CO-RE relocations from the compiler; this is the
/// do-it-yourself equivalent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// `inet_sock_set_state.skaddr` offset.
    pub tp_skaddr: u32,
    /// `inet_sock_set_state.oldstate` offset.
    pub tp_oldstate: u32,
    /// `inet_sock_set_state.newstate` offset.
    pub tp_newstate: u32,
    /// `inet_sock_set_state.sport` offset.
    pub tp_sport: u32,
    /// `inet_sock_set_state.dport` offset.
    pub tp_dport: u32,
    /// `inet_sock_set_state.family` offset.
    pub tp_family: u32,
    /// `inet_sock_set_state.protocol` offset.
    pub tp_protocol: u32,
    /// `inet_sock_set_state.protocol` size in bytes (1 before Linux 5.6, 2 since).
    pub tp_protocol_size: u32,
    /// `inet_sock_set_state.saddr` offset.
    pub tp_saddr: u32,
    /// `inet_sock_set_state.daddr` offset.
    pub tp_daddr: u32,
    /// `inet_sock_set_state.saddr_v6` offset.
    pub tp_saddr_v6: u32,
    /// `inet_sock_set_state.daddr_v6` offset.
    pub tp_daddr_v6: u32,
    /// `sys_enter_connect.fd` offset.
    pub enter_connect_fd: u32,
    /// `sys_exit_accept.ret` offset.
    pub exit_accept_ret: u32,
    /// `sys_exit_accept4.ret` offset.
    pub exit_accept4_ret: u32,
    /// Offset of `__sk_common.skc_net` in `struct sock`.
    pub sk_net: u32,
    /// Offset of `ns.inum` in `struct net`.
    pub net_inum: u32,
    /// Offset of `files` in `struct task_struct`.
    pub task_files: u32,
    /// Offset of `fdt` in `struct files_struct`.
    pub files_fdt: u32,
    /// Offset of `max_fds` in `struct fdtable`.
    pub fdt_max_fds: u32,
    /// Offset of `fd` in `struct fdtable`.
    pub fdt_fd: u32,
    /// Offset of `private_data` in `struct file`.
    pub file_private_data: u32,
    /// Offset of `sk` in `struct socket`.
    pub socket_sk: u32,
    /// Offset of `__sk_common.skc_family` in `struct sock`: accept records
    /// are sent for AF_INET/AF_INET6 sockets only.
    pub sk_family: u32,
    /// Offset of `sk_socket` in `struct sock`.
    pub sk_socket: u32,
    /// Offset of `vfs_inode` in `struct socket_alloc` (a `struct socket`
    /// followed by its inode).
    pub socket_inode: u32,
    /// Offset of `i_ino` in `struct inode`.
    pub inode_ino: u32,
    /// `tcp_receive_reset.skaddr` offset.
    pub rst_recv_skaddr: u32,
    /// `tcp_send_reset.skaddr` offset.
    pub rst_send_skaddr: u32,
    /// [`CONFIG_NETNS`] | [`CONFIG_ACCEPT`] | [`CONFIG_INODE`] |
    /// [`CONFIG_ORIGIN_MAP`].
    pub flags: u32,
    /// Records are submitted without waking the agent (it polls on a
    /// timer), except the one that brings the unread data past a multiple
    /// of this many bytes; 0 wakes it on every record. A wakeup runs an interrupt inside the BPF program, and
    /// softirqs that run on its exit cannot run BPF programs (the kernel's
    /// per-CPU recursion guard drops them): fewer wakeups, fewer misses.
    pub wakeup_bytes: u32,
    /// A transition is sent to the agent when its new state's bit (`1 <<
    /// state`) is in this mask or its old state's bit is in
    /// [`KernelConfig::emit_old`]; every transition is counted in
    /// `TRANSITIONS` either way. The agent asks only for what its events
    /// need (all of them when it prints every transition).
    pub emit_new: u32,
    /// See [`KernelConfig::emit_new`].
    pub emit_old: u32,
    /// User stacks walked at connect()/accept() per process per second on
    /// each CPU, at most (0: every one). A process that opens connections
    /// faster gets stacks for a sample of them; with the origin map, its
    /// connections past the budget keep no origin at all (for accept(),
    /// the walk from the fd to the socket would cost as much as the
    /// stack).
    pub stacks_per_second: u32,
    /// log2 of the number of slots of the `ORIGINS` table.
    pub origin_slot_bits: u32,
    /// log2 of the number of slots of the `CLOSE_WAITS` table.
    pub cw_slot_bits: u32,
    /// A stay in CLOSE_WAIT shorter than this (milliseconds) is only
    /// counted (see [`CONFIG_CW_TABLE`]).
    pub cw_quiet_ms: u32,
    /// Offset of `sk_protocol` (a `u16`, Linux >= 5.6) in `struct sock`,
    /// for the BTF state program, which reads the socket where the
    /// tracepoint's record would have copied it (see the fields after it).
    pub sk_protocol: u32,
    /// Offset of `__sk_common.skc_num` (local port, host order; cleared
    /// as the socket leaves its port, before its CLOSE).
    pub sk_num: u32,
    /// Offset of `inet_sport` in `struct inet_sock` (local port, network
    /// order; kept until the socket is freed): the record's port.
    pub inet_sport: u32,
    /// Offset of `__sk_common.skc_dport` (remote port, network order).
    pub sk_dport: u32,
    /// Offset of `__sk_common.skc_rcv_saddr` (local IPv4 address).
    pub sk_rcv_saddr: u32,
    /// Offset of `__sk_common.skc_daddr` (remote IPv4 address).
    pub sk_daddr: u32,
    /// Offset of `__sk_common.skc_v6_rcv_saddr` (local IPv6 address).
    pub sk_v6_rcv_saddr: u32,
    /// Offset of `__sk_common.skc_v6_daddr` (remote IPv6 address).
    pub sk_v6_daddr: u32,
    /// Pages of user stack copied (with the user registers) where a stack
    /// is walked, for the agent to unwind from CFI (see
    /// [`UserStackHeader`]); 0 copies none. At most [`STACK_COPY_PAGES`].
    pub stack_copy_pages: u32,
}

/// [`LastUse`] direction: a send (`sock:sock_send_length`).
pub const IO_SEND: u32 = 0;
/// [`LastUse`] direction: a receive (`sock:sock_recv_length`).
pub const IO_RECV: u32 = 1;

/// The last use of a TCP socket by a program, kept by the kernel in the
/// socket's own storage (`LAST_USE`, a `BPF_MAP_TYPE_SK_STORAGE` freed
/// with the socket) and read by the agent only for a leaked socket,
/// through a duplicate of a holder's fd.
///
/// Every send and receive in process context updates `last_*` (a lookup,
/// a compare and a few stores); the first one after an idle gap of at
/// least [`LAST_USE_GAP`]'s jiffies, or by another process than the one
/// before ([`is_checkout`]), is a *checkout*: the moment a pooled
/// connection is taken out of its pool by the code that will use it. Only
/// then is the user stack walked (within the process's stack budget) and
/// the precise clock read, so that a busy stream costs no walk after its
/// first I/O.
///
/// Why jiffies for every I/O: `bpf_ktime_get_ns` cost 28 ns per I/O on the
/// benchmark's VM, a third of the program; jiffies are one load. A
/// checkout gap is milliseconds, and a tick (1 to 10 ms) is precision
/// enough for it and for the latest I/O's time.
///
/// Two threads doing I/O on one socket at the same instant may mix their
/// fields; each field stays a value one of them wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastUse {
    /// Jiffies of the latest send or receive.
    pub last_jiffies: u64,
    /// `bpf_ktime_get_ns()` of the latest checkout.
    pub checkout_ns: u64,
    /// Jiffies of the latest checkout (with `checkout_ns`, turns
    /// `last_jiffies` into a time).
    pub checkout_jiffies: u64,
    /// Process id (tgid) of the checkout.
    pub tgid: u32,
    /// Thread id of the checkout.
    pub tid: u32,
    /// Process id of the latest send or receive.
    pub last_tgid: u32,
    /// User stack of the checkout (id in `STACKS`); -1 when not walked
    /// (past the budget, or the walk failed).
    pub stack_id: i32,
    /// System call number of the checkout (x86_64 numbers); -1 when unknown.
    pub syscall_nr: i32,
    /// Bit 0: the checkout's direction ([`IO_RECV`] set); bit 1: the
    /// latest I/O's direction.
    pub dirs: u32,
    /// Checkouts seen on this socket.
    pub checkouts: u32,
    /// Sends and receives seen on this socket.
    pub ios: u32,
    /// `comm` of the checkout's thread, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Most pages of user stack a [`UserStackHeader`] carries.
pub const STACK_COPY_PAGES: u32 = 4;
/// Most bytes of user stack a [`UserStackHeader`] carries.
pub const STACK_COPY_BYTES: usize = STACK_COPY_PAGES as usize * 4096;

/// [`UserStackHeader::what`]: the stack of a `connect()`.
pub const STACK_OF_CONNECT: u32 = ORIGIN_CONNECT;
/// [`UserStackHeader::what`]: the stack of an `accept()`.
pub const STACK_OF_ACCEPT: u32 = ORIGIN_ACCEPT;
/// [`UserStackHeader::what`]: the stack of a last-use checkout.
pub const STACK_OF_LAST_USE: u32 = 3;

/// The top of a user stack and the registers to unwind it with, taken
/// where the kernel walks a stack with frame pointers (an origin at
/// `connect()`/`accept()`, a last-use checkout) so that the agent can
/// unwind it from the binaries' CFI (`.eh_frame`), which a build without
/// frame pointers still has. `len` bytes of the stack, from `sp` up,
/// follow the header in the same ring-buffer record; the copy stops at
/// the first page that cannot be read (not resident), so that a page
/// swapped out loses the frames above it, not the whole copy.
///
/// The bytes are the program's own memory (locals, buffers): the agent
/// unwinds them as they arrive and keeps none of them.
///
/// The record names what it belongs to by the socket and the clock read
/// of that moment: `(skaddr, ts_ns)` equals an origin's
/// ([`OriginSlot::sk`], [`OriginSlot::ts_ns`]; an [`AcceptRecord`]'s or a
/// connect's [`StateRecord`]'s `skaddr` and `ts_ns`) or a last use's
/// ([`LastUse::checkout_ns`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserStackHeader {
    /// [`RECORD_USER_STACK`].
    pub kind: u32,
    /// [`STACK_OF_CONNECT`], [`STACK_OF_ACCEPT`] or [`STACK_OF_LAST_USE`].
    pub what: u32,
    /// Process id (tgid) of the task.
    pub tgid: u32,
    /// Thread id of the task.
    pub tid: u32,
    /// Kernel address of the socket the stack belongs to.
    pub skaddr: u64,
    /// `bpf_ktime_get_ns()` of the origin or checkout.
    pub ts_ns: u64,
    /// User instruction pointer at the system call's entry.
    pub ip: u64,
    /// User stack pointer at the system call's entry.
    pub sp: u64,
    /// User frame pointer (`rbp`) at the system call's entry.
    pub bp: u64,
    /// The frame-pointer walk of the same moment (id in `STACKS`); -1
    /// when it was not taken.
    pub fp_stack_id: i32,
    /// Bytes of stack after the header.
    pub len: u32,
}

/// A [`UserStackHeader`] and room for its bytes: the kernel's per-CPU
/// scratch value it is assembled in (too large for the BPF stack) before
/// the header and its `len` bytes are copied to the ring.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserStackCopy {
    /// The header.
    pub header: UserStackHeader,
    /// The stack, from `header.sp` up.
    pub bytes: [u8; STACK_COPY_BYTES],
}

/// Slots of the kernel's per-CPU `STACK_COPY_COUNTS`: copies sent, ...
pub const COPIES_SENT: u32 = 0;
/// ... not taken because the ring buffer was more than half full (the
/// state records come first), ...
pub const COPIES_RING_BUSY: u32 = 1;
/// ... lost because the ring was full, ...
pub const COPIES_LOST: u32 = 2;
/// ... and copies cut short by a page that could not be read.
pub const COPIES_SHORT: u32 = 3;
/// Number of `STACK_COPY_COUNTS` slots.
pub const COPY_COUNT_SLOTS: u32 = 4;

/// Index of the checkout gap, in jiffies, in the kernel's one-slot
/// `LAST_USE_GAP` array: the agent writes it once it knows the kernel's
/// tick rate (see `tcptrace::engine::lastuse`), before it attaches the programs.
pub const LAST_USE_GAP: u32 = 0;

/// Whether an I/O by process `tgid` at jiffy `now` on a socket whose
/// latest I/O was at `last` by `last_tgid` is a checkout (see
/// [`LastUse`]): the first I/O ever (`last` 0, as fresh storage is zeroed),
/// the first after `gap` jiffies of silence, or the first by another
/// process (a socket passed over fork or SCM_RIGHTS). The difference is
/// signed: a thread on another CPU may have stored a later `last` between
/// this one's clock read and its compare.
#[inline(always)]
pub const fn is_checkout(last: u64, last_tgid: u32, now: u64, tgid: u32, gap: u64) -> bool {
    let idle = now.wrapping_sub(last) as i64;
    last == 0 || last_tgid != tgid || idle >= gap as i64
}

/// Slots of the kernel's per-CPU `LAST_USE_COUNTS`: checkouts seen, ...
pub const LU_CHECKOUTS: u32 = 0;
/// ... stacks walked for them, ...
pub const LU_STACKS: u32 = 1;
/// ... and I/Os whose socket storage could not be had (the socket's
/// option memory, `net.core.optmem_max`, was used up): not recorded.
pub const LU_NO_STORAGE: u32 = 2;
/// Number of `LAST_USE_COUNTS` slots.
pub const LU_COUNT_SLOTS: u32 = 3;

/// The fd a thread passed to `connect()`, kept per CPU until the
/// CLOSE -> SYN_SENT transition that the same call makes moments later.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectSlot {
    /// Thread id of the caller.
    pub tid: u32,
    /// The fd argument.
    pub fd: i32,
    /// When connect() was entered, monotonic ns.
    pub ts_ns: u64,
}

/// Stack walks of one process on one CPU in the current one-second window:
/// a slot of the kernel's per-CPU `STACK_BUDGET` array, chosen by
/// [`stack_budget_slot`]. A process that finds another in its slot takes
/// the slot over, with a fresh window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StackBudget {
    /// Start of the window, monotonic ns.
    pub window_ns: u64,
    /// Walks in the window.
    pub used: u32,
    /// The process whose walks these are.
    pub tgid: u32,
}

/// log2 of the slots of the kernel's `STACK_BUDGET` array, per CPU.
pub const STACK_BUDGET_BITS: u32 = 10;

/// The `STACK_BUDGET` slot of process `tgid` (Fibonacci hashing: pids
/// come in runs, and a run must spread over the slots).
#[inline(always)]
pub const fn stack_budget_slot(tgid: u32) -> u32 {
    tgid.wrapping_mul(0x9e37_79b9) >> (32 - STACK_BUDGET_BITS)
}

/// Slots of the kernel's transition counter: `old * TRANSITION_STATES + new`.
pub const TRANSITION_STATES: u32 = 16;

impl KernelConfig {
    /// All offsets zero and every optional feature off: the compiled-in
    /// default, always replaced by the agent at load time.
    pub const ZERO: Self = Self {
        tp_skaddr: 0,
        tp_oldstate: 0,
        tp_newstate: 0,
        tp_sport: 0,
        tp_dport: 0,
        tp_family: 0,
        tp_protocol: 0,
        tp_protocol_size: 0,
        tp_saddr: 0,
        tp_daddr: 0,
        tp_saddr_v6: 0,
        tp_daddr_v6: 0,
        enter_connect_fd: 0,
        exit_accept_ret: 0,
        exit_accept4_ret: 0,
        sk_net: 0,
        net_inum: 0,
        task_files: 0,
        files_fdt: 0,
        fdt_max_fds: 0,
        fdt_fd: 0,
        file_private_data: 0,
        socket_sk: 0,
        sk_family: 0,
        sk_socket: 0,
        socket_inode: 0,
        inode_ino: 0,
        rst_recv_skaddr: 0,
        rst_send_skaddr: 0,
        flags: 0,
        wakeup_bytes: 0,
        emit_new: 0,
        emit_old: 0,
        stacks_per_second: 0,
        origin_slot_bits: 0,
        cw_slot_bits: 0,
        cw_quiet_ms: 0,
        sk_protocol: 0,
        sk_num: 0,
        inet_sport: 0,
        sk_dport: 0,
        sk_rcv_saddr: 0,
        sk_daddr: 0,
        sk_v6_rcv_saddr: 0,
        sk_v6_daddr: 0,
        stack_copy_pages: 0,
    };
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers and byte arrays, no padding left
    // uninitialised by the kernel program (it zeroes the padding fields).
    unsafe impl aya::Pod for super::StateRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AcceptRecord {}
    // SAFETY: only `u32` fields.
    unsafe impl aya::Pod for super::KernelConfig {}
    // SAFETY: plain integers, no padding.
    unsafe impl aya::Pod for super::ResetRecord {}
    // SAFETY: plain integers; the padding field is zeroed.
    unsafe impl aya::Pod for super::OriginSlot {}
    // SAFETY: plain integers and a byte array, no padding.
    unsafe impl aya::Pod for super::LastUse {}
    // SAFETY: plain integers, no padding.
    unsafe impl aya::Pod for super::UserStackHeader {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_are_stable() {
        // The agent's decoder depends on these exact sizes.
        assert_eq!(size_of::<StateRecord>(), 112);
        assert_eq!(size_of::<StateRecordV4>(), 64);
        assert_eq!(size_of::<StateBatch>(), 8 + 64 * STAGED_RECORDS);
        assert_eq!(size_of::<AcceptRecord>(), 64);
        assert_eq!(align_of::<StateRecord>(), 8);
        assert_eq!(size_of::<KernelConfig>(), 46 * 4);
        assert_eq!(size_of::<UserStackHeader>(), 64);
        assert_eq!(size_of::<UserStackCopy>(), 64 + STACK_COPY_BYTES);
        assert_eq!(size_of::<LastUse>(), 72);
        assert_eq!(size_of::<ResetRecord>(), 24);
        assert_eq!(size_of::<OriginSlot>(), 40);
    }

    #[test]
    fn linger_buckets_are_powers_of_ten_of_milliseconds() {
        let ms = 1_000_000;
        assert_eq!(linger_bucket(0), 0);
        assert_eq!(linger_bucket(ms - 1), 0);
        assert_eq!(linger_bucket(ms), 1);
        assert_eq!(linger_bucket(99 * ms), 2);
        assert_eq!(linger_bucket(999 * ms), 3);
        assert_eq!(linger_bucket(1_000 * ms), 4);
        assert_eq!(linger_bucket(99_999 * ms), 5);
        assert_eq!(linger_bucket(100_000 * ms), 6);
        assert_eq!(linger_bucket(u64::MAX), LINGER_BUCKETS - 1);
    }

    #[test]
    fn origin_slots_spread_slab_neighbours_over_the_table() {
        // Sockets come from a slab: addresses a fixed stride apart. They
        // must land as if at random: 1024 keys in 1024 slots occupy about
        // 1 - 1/e of them, none by more than a few.
        let bits = 10;
        for stride in [64, 2048, 2304, 2432, 4096] {
            let mut used = [0u32; 1 << 10];
            for i in 0..1024u64 {
                let slot = socket_slot(0xffff_8881_0000_0000 + i * stride, bits);
                assert!(slot < 1 << bits);
                used[slot as usize] += 1;
            }
            let occupied = used.iter().filter(|&&n| n > 0).count();
            assert!(used.iter().all(|&n| n <= 8), "stride {stride}");
            assert!(occupied > 600, "stride {stride}: {occupied} slots");
        }
        assert!(socket_slot(12345, 0) < 2 && socket_slot(12345, 40) < 2);
    }

    #[test]
    fn probes_follow_the_first_slot_and_wrap_around() {
        let bits = 4;
        let sk = (0..u64::MAX)
            .map(|n| 0xffff_8881_0000_0000 + n * 64)
            .find(|&sk| socket_slot(sk, bits) == 14)
            .expect("an address whose first slot is 14");
        let mut slots = [0u32; SLOT_PROBES as usize];
        for (i, slot) in (0..SLOT_PROBES).zip(&mut slots) {
            *slot = probe_slot(sk, bits, i);
        }
        assert_eq!(slots, [14, 15, 0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_checkout_is_the_first_io_after_a_gap_or_by_another_process() {
        // Jiffies: a gap of 3 ticks (10 ms at HZ=250, rounded up).
        let gap = 3;
        let t = 4_295_000_000;
        // Fresh storage is zeroed: the first I/O ever is a checkout.
        assert!(is_checkout(0, 0, t, 42, gap));
        // A busy stream: every I/O within the gap of the one before.
        assert!(!is_checkout(t, 42, t, 42, gap));
        assert!(!is_checkout(t, 42, t + gap - 1, 42, gap));
        // Idle for the gap: taken out of the pool again.
        assert!(is_checkout(t, 42, t + gap, 42, gap));
        // Another process (fork, fd passing), however soon.
        assert!(is_checkout(t, 42, t, 43, gap));
        // A clock read on another CPU a tick behind: no checkout.
        assert!(!is_checkout(t, 42, t - 1, 42, gap));
        // A zero gap makes every I/O a checkout.
        assert!(is_checkout(t, 42, t, 42, 0));
    }

    #[test]
    fn stack_budget_slots_spread_a_run_of_pids() {
        // Processes started together have consecutive pids: 100 of them
        // must not crowd a few of the 1024 slots.
        let mut used = [0u32; 1 << STACK_BUDGET_BITS];
        for tgid in 4000..4100 {
            let slot = stack_budget_slot(tgid);
            assert!(slot < 1 << STACK_BUDGET_BITS);
            used[slot as usize] += 1;
        }
        assert!(used.iter().all(|&n| n <= 2));
        assert_eq!(size_of::<StackBudget>(), 16);
    }
}
