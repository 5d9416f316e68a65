//! tcptrace kernel program.
//!
//! Hot path: `sock:inet_sock_set_state` counts one transition of a TCP
//! socket, and copies it into the ring buffer or the CLOSE_WAIT table when
//! the agent asked for it. Where the kernel has BTF, the program is attached
//! as a BTF tracepoint and reads the socket ([`inet_sock_set_state_btf`]);
//! otherwise, as a classic one that reads the record the kernel fills.
//! Process-context hooks record who owns a socket: the fd given to
//! `connect()` (looked up when the CLOSE->SYN_SENT transition runs inside
//! that call) and the socket `accept()` returned.
//!
//! Field and struct offsets come from [`TCPTRACE_CONFIG`], filled in by the
//! agent at load time from tracefs and BTF; nothing here assumes a layout.
#![no_std]
#![no_main]
// BPF inline assembly: the target has no compare-and-swap in Rust's
// atomics (and lowers atomics as single-threaded), see `cmpxchg`.
#![feature(asm_experimental_arch)]

mod last_use;
mod stack_copy;

use core::ptr::addr_of_mut;

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel, generated},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, PerCpuArray, RingBuf, StackTrace},
    programs::{tracing::StackIdContext, BtfTracePointContext, TracePointContext},
    EbpfContext, Global,
};
use tcptrace_common::{
    linger_bucket, probe_slot, stack_budget_slot, state_fits_byte, tcp_state, AcceptRecord,
    ConnectSlot, KernelConfig, OriginSlot, ResetRecord, StackBudget, StateBatch, StateRecord,
    StateRecordV4, AF_INET, AF_INET6, COMM_LEN, CONFIG_ACCEPT, CONFIG_CW_TABLE, CONFIG_INODE,
    CONFIG_NETNS, CONFIG_ORIGIN_MAP, CONFIG_STAGE, CW_COUNT_SLOTS, CW_FULL, CW_KEPT, CW_LINGER,
    CW_LINGER_SUM_NS, CW_QUIET, CW_SENT, FLUSH_BUSY, IPPROTO_TCP, ORIGINS_FULL, ORIGINS_INSERTED,
    ORIGINS_REMOVED, ORIGIN_ACCEPT, ORIGIN_CONNECT, ORIGIN_COUNT_SLOTS, RECORD_ACCEPT,
    RECORD_RESET, RECORD_STATE, RECORD_STATE_BATCH, RECORD_STATE_V4, RESET_RECEIVED, RESET_SENT,
    SLOT_PROBES, STACKS_OVER_BUDGET, STACK_BUDGET_BITS, STACK_OF_ACCEPT, STACK_OF_CONNECT,
    STAGED_RECORDS, TRANSITION_STATES,
};

/// Layout facts, set by the agent with `EbpfLoader::override_global`.
///
/// In `.rodata`, which the loader freezes read-only: the verifier then
/// knows the offsets as constants, which [`SockFields`]' typed loads need.
#[unsafe(no_mangle)]
static TCPTRACE_CONFIG: Global<KernelConfig> = Global::new(KernelConfig::ZERO);

/// [`TCPTRACE_CONFIG`] in place: each field is loaded where it is used,
/// never the whole of it copied (45 loads, which cost more than most paths
/// that need two fields). The address goes through a volatile read so that
/// the compiler cannot fold the zeros the loader replaces.
#[inline(always)]
fn config() -> &'static KernelConfig {
    // `Global<T>` holds nothing but its `T`.
    let cfg = core::ptr::addr_of!(TCPTRACE_CONFIG).cast::<KernelConfig>();
    unsafe { &*core::ptr::read_volatile(&cfg) }
}

/// Records to user space. The agent may resize it (`--ring-buffer-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records dropped because [`EVENTS`] was full, per CPU (index 0).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Every TCP transition, counted per CPU by `old * 16 + new`, whether or not
/// it is sent to the agent (see `KernelConfig::emit_new`).
#[map]
static TRANSITIONS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(TRANSITION_STATES * TRANSITION_STATES, 0);

/// The fd of the `connect()` this CPU entered last (see [`ConnectSlot`]): a
/// per-CPU slot costs a plain store, where a hash map cost an insert on
/// entry and a delete on exit.
#[map]
static CONNECT_FD: PerCpuArray<ConnectSlot> = PerCpuArray::with_max_entries(1, 0);

/// A connect() slot older than this is stale (the CLOSE -> SYN_SENT
/// transition follows the syscall's entry within microseconds).
const CONNECT_SLOT_NS: u64 = 10_000_000;

/// Stack walks per process in the current second, per CPU (see
/// `KernelConfig::stacks_per_second`): an array slot by pid costs a load
/// and a store, where a hash map's lookup cost as much as the walk it
/// saved.
#[map]
static STACK_BUDGET: PerCpuArray<StackBudget> =
    PerCpuArray::with_max_entries(1 << STACK_BUDGET_BITS, 0);

/// User stacks of connect() and accept() callers, deduplicated by the
/// kernel (a leaking call site takes one slot however often it leaks).
/// Taken only in those two process-context places, never on other
/// transitions.
#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(16384, 0);

/// Each live connection's origin, by socket address, when the agent asked
/// for it ([`CONFIG_ORIGIN_MAP`]): a slot is claimed at connect()/accept()
/// and freed when the socket reaches CLOSE (see [`OriginSlot`]). The agent
/// sizes it from its `--max-sockets`; when every slot a socket may take is
/// in use, that connection only goes without a known origin. Mappable: the
/// agent scans it in place to tell which connections still live (and
/// forgets the unwound stacks of those that closed).
#[map]
static ORIGINS: Array<OriginSlot> = Array::with_max_entries(1 << 20, BPF_F_MMAPABLE);

/// Per CPU: origins inserted into [`ORIGINS`], removed from it, and not
/// kept because it was full. The agent's gauge of live origins is the
/// difference of the first two; the third is loss it reports.
#[map]
static ORIGIN_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(ORIGIN_COUNT_SLOTS, 0);

/// Adds `n` to slot `slot` of the per-CPU counters `counters` (a slot
/// out of range counts nothing).
#[inline(always)]
fn bump(counters: &PerCpuArray<u64>, slot: u32, n: u64) {
    if let Some(counter) = counters.get_ptr_mut(slot) {
        // Per-CPU slot: no other writer can race this increment.
        unsafe { *counter += n };
    }
}

#[inline(always)]
fn count_origins(slot: u32) {
    bump(&ORIGIN_COUNTS, slot, 1);
}

/// The `i`th slot socket `sk` may take in `table` of `1 << bits` slots
/// ([`ORIGINS`], [`CLOSE_WAITS`]; see [`probe_slot`]).
#[inline(always)]
fn slot_probe<T>(table: &Array<T>, sk: u64, bits: u32, i: u32) -> Option<*mut T> {
    table.get_ptr_mut(probe_slot(sk, bits, i))
}

/// Keeps the current task's `syscall` (with `fd`, at `ts_ns`, its stack
/// `stack_id`) as the origin of `sk`, in the first slot [`take_slot`]
/// gives. Only a claimed slot is counted as inserted.
#[inline(always)]
fn keep(sk: u64, syscall: u32, fd: i32, ts_ns: u64, stack_id: i32) {
    let bits = origin_bits();
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&ORIGINS, sk, bits, i) else {
            return;
        };
        // SAFETY: `slot` points into the array map's value, 8-aligned.
        if let Some(claimed) = unsafe { take_slot(addr_of_mut!((*slot).sk), sk) } {
            unsafe {
                addr_of_mut!((*slot).ts_ns).write(ts_ns);
                addr_of_mut!((*slot).syscall).write(syscall);
                let (tgid, tid) = current_ids();
                addr_of_mut!((*slot).tgid).write(tgid);
                addr_of_mut!((*slot).tid).write(tid);
                addr_of_mut!((*slot).fd).write(fd);
                addr_of_mut!((*slot).stack_id).write(stack_id);
                addr_of_mut!((*slot)._pad0).write(0);
            }
            if claimed {
                count_origins(ORIGINS_INSERTED);
                live_origins_add(1);
            }
            return;
        }
    }
    count_origins(ORIGINS_FULL);
}

/// Whether the slot whose owner word is `owner` is `sk`'s to write: it
/// holds `sk` already (left by a freed socket at the same address whose
/// last transition went unseen), or a compare-and-swap claims it free now.
/// `Some(true)` when claimed.
///
/// # Safety
/// `owner` must point into a map value, 8-aligned.
#[inline(always)]
unsafe fn take_slot(owner: *mut u64, sk: u64) -> Option<bool> {
    let held = unsafe { core::ptr::read_volatile(owner) };
    let claimed = held == 0 && unsafe { cmpxchg(owner, 0, sk) } == 0;
    (claimed || held == sk).then_some(claimed)
}

/// Origins in [`ORIGINS`] now, over all CPUs (index 0), kept by atomic
/// adds as slots are claimed and freed (rare: only connections within the
/// stack budget keep one). While it is zero, as it is most of the time
/// when a churn's connections outrun the budget, a CLOSE skips the probe
/// loop: one read of a line no CPU is writing, for eight slot lookups.
#[map]
static ORIGINS_LIVE: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn live_origins_add(delta: u64) {
    if let Some(live) = ORIGINS_LIVE.get_ptr_mut(0) {
        // SAFETY: points into the array map's value, 8-aligned.
        unsafe { atomic_add(live, delta) };
    }
}

/// True unless [`ORIGINS_LIVE`] says no origin is kept (then no socket's
/// CLOSE has a slot to free).
#[inline(always)]
fn origins_live() -> bool {
    ORIGINS_LIVE
        .get_ptr(0)
        .is_none_or(|n| unsafe { core::ptr::read_volatile(n) } != 0)
}

/// Frees every slot of [`ORIGINS`] that holds `sk` (one, unless an
/// unseen CLOSE left a stale copy). A socket's origin is kept, and counted
/// in [`ORIGINS_LIVE`], before its CLOSE can run (both follow the socket's
/// own state changes), so a zero count means it has none: callers look
/// at [`origins_live`] first.
#[inline(always)]
fn forget(sk: u64) {
    let bits = origin_bits();
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&ORIGINS, sk, bits, i) else {
            return;
        };
        // SAFETY: as in `keep`.
        let owner = unsafe { addr_of_mut!((*slot).sk) };
        if unsafe { core::ptr::read_volatile(owner) } == sk
            && unsafe { cmpxchg(owner, sk, 0) } == sk
        {
            count_origins(ORIGINS_REMOVED);
            live_origins_add(u64::MAX);
        }
    }
}

/// Atomically adds `delta` to `*ptr` (`u64::MAX` subtracts one):
/// BPF_ATOMIC | BPF_ADD, by hand for the reason given at [`cmpxchg`].
///
/// # Safety
/// `ptr` must point into a map value, 8-aligned.
#[inline(always)]
unsafe fn atomic_add(ptr: *mut u64, delta: u64) {
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({ptr} + 0) += {delta}",
            ptr = in(reg) ptr,
            delta = in(reg) delta,
        );
    }
}

/// Atomically replaces `*ptr` with `new` if it holds `old`; returns what it
/// held. BPF_ATOMIC | BPF_CMPXCHG (Linux >= 5.12), written by hand: Rust's
/// BPF target offers no compare-and-swap, and lowers its atomics as if
/// there were one CPU.
///
/// # Safety
/// `ptr` must point into a map value, 8-aligned.
#[inline(always)]
unsafe fn cmpxchg(ptr: *mut u64, old: u64, new: u64) -> u64 {
    let mut r0 = old;
    unsafe {
        core::arch::asm!(
            "r0 = cmpxchg_64({ptr} + 0, r0, {new})",
            ptr = in(reg) ptr,
            new = in(reg) new,
            inout("r0") r0,
        );
    }
    r0
}

/// Sockets in CLOSE_WAIT, each slot the [`StateRecord`] of its entry,
/// when the agent asked ([`CONFIG_CW_TABLE`]). `skaddr` is the slot's
/// owner (claimed and freed by compare-and-swap, as in [`ORIGINS`]);
/// `kind` is written last and cleared first, so that the agent, which maps
/// the array into its memory, reads only whole entries.
#[map]
static CLOSE_WAITS: Array<StateRecord> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE`.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Per CPU: see [`CW_KEPT`] and the slots after it.
#[map]
static CW_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(CW_COUNT_SLOTS, 0);

#[inline(always)]
fn count_cw(slot: u32, n: u64) {
    bump(&CW_COUNTS, slot, n);
}

/// [`CONFIG_CW_TABLE`]: keeps a transition into or out of CLOSE_WAIT in
/// the table; true when that is all it needs (nothing to send).
#[inline(always)]
fn close_wait_in_table<F: Fields>(cfg: &KernelConfig, f: &F, t: Wanted) -> bool {
    let (oldstate, newstate, _) = t;
    let Some(sk) = f.skaddr() else {
        return false;
    };
    if newstate == tcp_state::CLOSE_WAIT {
        cw_enter(cfg, f, t, sk)
    } else if oldstate == tcp_state::CLOSE_WAIT {
        cw_leave(cfg, sk)
    } else {
        false
    }
}

/// Writes the entry of `sk` into CLOSE_WAIT in a slot of its own; false
/// when every slot it may take is in use (counted; the entry is sent).
#[inline(always)]
fn cw_enter<F: Fields>(cfg: &KernelConfig, f: &F, t: Wanted, sk: u64) -> bool {
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&CLOSE_WAITS, sk, cfg.cw_slot_bits, i) else {
            return false;
        };
        // SAFETY: `slot` points into the array map's value, 8-aligned.
        if let Some(claimed) = unsafe { take_slot(addr_of_mut!((*slot).skaddr), sk) } {
            let kind = unsafe { addr_of_mut!((*slot).kind) };
            unsafe { core::ptr::write_volatile(kind, 0) };
            let now = unsafe { bpf_ktime_get_ns() };
            fill_state(slot, 0, cfg, f, t, sk, now, -1, -1);
            // Last: the agent takes a slot whose kind is set as whole.
            unsafe { publish(slot) };
            if claimed {
                // (A slot still holding this address lost its exit: it
                // was counted when taken.)
                count_cw(CW_KEPT, 1);
            }
            return true;
        }
    }
    count_cw(CW_FULL, 1);
    false
}

/// Frees the slot of `sk` as it leaves CLOSE_WAIT. A quiet stay is only
/// counted (true: nothing to send); a longer one sends the entry the slot
/// kept, and the exit follows as usual (false). A socket not in the table
/// (entered before the agent, or when it was full) is sent as usual.
#[inline(always)]
fn cw_leave(cfg: &KernelConfig, sk: u64) -> bool {
    for i in 0..SLOT_PROBES {
        let Some(slot) = slot_probe(&CLOSE_WAITS, sk, cfg.cw_slot_bits, i) else {
            return false;
        };
        let owner = unsafe { addr_of_mut!((*slot).skaddr) };
        let kind = unsafe { addr_of_mut!((*slot).kind) };
        if unsafe { core::ptr::read_volatile(owner) } != sk
            || unsafe { core::ptr::read_volatile(kind) } != RECORD_STATE
        {
            continue;
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let linger = now.wrapping_sub(unsafe { (*slot).ts_ns });
        let quiet = linger < u64::from(cfg.cw_quiet_ms) * 1_000_000;
        if quiet {
            count_cw(CW_QUIET, 1);
            count_cw(CW_LINGER + linger_bucket(linger), 1);
            count_cw(CW_LINGER_SUM_NS, linger);
        } else {
            send_kept(cfg, slot);
            count_cw(CW_SENT, 1);
        }
        unsafe {
            core::ptr::write_volatile(kind, 0);
            cmpxchg(owner, sk, 0);
        }
        return quiet;
    }
    false
}

/// Sends the entry kept in `slot`.
#[inline(always)]
fn send_kept(cfg: &KernelConfig, slot: *mut StateRecord) {
    send(cfg, |rec: *mut StateRecord| unsafe { rec.write(*slot) });
}

/// Reserves a `T` in the ring buffer, has `fill` write it in place (the
/// BPF stack is 512 bytes), and submits it; a full ring counts a lost
/// record. `fill` gets a pointer to the reservation and must write every
/// field.
#[inline(always)]
fn send<T: 'static>(cfg: &KernelConfig, fill: impl FnOnce(*mut T)) -> Option<()> {
    let Some(mut entry) = EVENTS.reserve::<T>(0) else {
        count_lost();
        return None;
    };
    fill(entry.as_mut_ptr());
    entry.submit(wakeup_flags(cfg));
    Some(())
}

/// Sets the `kind` of a [`CLOSE_WAITS`] slot whose other fields are
/// written, with a compare-and-swap of the 64-bit word it begins (kind,
/// then ctx_tgid, little-endian): an atomic is a full barrier, so the
/// agent never sees the kind before the fields.
///
/// # Safety
/// `slot` must point into the map's value.
#[inline(always)]
unsafe fn publish(slot: *mut StateRecord) {
    let word = unsafe { addr_of_mut!((*slot).kind) }.cast::<u64>();
    let held = unsafe { core::ptr::read_volatile(word) };
    unsafe { cmpxchg(word, held, (held & !0xffff_ffff) | u64::from(RECORD_STATE)) };
}

/// `KernelConfig::origin_slot_bits`.
#[inline(always)]
fn origin_bits() -> u32 {
    config().origin_slot_bits
}

/// `BPF_F_USER_STACK`: walk the user-space stack of the current task.
const BPF_F_USER_STACK: u64 = 256;

/// Whether the current process may have its stack walked now: always
/// without a `budget` (`KernelConfig::stacks_per_second`), else while its
/// walks in the current window (at least a second long) on this CPU stay
/// within it. Walks past the budget are
/// counted. The clock (a VM exit on some hypervisors: tens of ns) is read
/// only to open a window, and past the budget on every
/// [`BUDGET_CLOCK_EVERY`]th call, so that a process far past it pays a few
/// loads per connection.
#[inline(always)]
fn stack_allowed<C: StackIdContext>(ctx: &C, budget: u32) -> bool {
    let allowed = budget_allows(ctx, budget);
    if !allowed {
        count_origins(STACKS_OVER_BUDGET);
    }
    allowed
}

/// [`stack_allowed`] without counting a refusal: last use counts its own.
#[inline(always)]
fn budget_allows<C: StackIdContext>(ctx: &C, budget: u32) -> bool {
    if budget == 0 {
        return true;
    }
    let tgid = ctx.tgid();
    let Some(b) = STACK_BUDGET.get_ptr_mut(stack_budget_slot(tgid)) else {
        return true;
    };
    // Per-CPU slot: no other writer can race these updates.
    unsafe {
        let used = (*b).used;
        if (*b).tgid != tgid {
            open_window(b, tgid);
            true
        } else if used < budget {
            (*b).used = used + 1;
            true
        } else {
            (*b).used = used.saturating_add(1);
            let check = (used - budget) % BUDGET_CLOCK_EVERY == BUDGET_CLOCK_EVERY - 1;
            if check && bpf_ktime_get_ns().wrapping_sub((*b).window_ns) >= 1_000_000_000 {
                open_window(b, tgid);
                true
            } else {
                false
            }
        }
    }
}

/// Past its budget, a process's calls read the clock once in this many:
/// a window ends at most this many connections late.
const BUDGET_CLOCK_EVERY: u32 = 64;

/// Starts a window of `tgid` in budget slot `b`, with its first walk.
///
/// # Safety
/// `b` must point into the per-CPU map's value.
#[inline(always)]
unsafe fn open_window(b: *mut StackBudget, tgid: u32) {
    unsafe {
        *b = StackBudget {
            window_ns: bpf_ktime_get_ns(),
            used: 1,
            tgid,
        };
    }
}

/// The current task's user stack (-1 when the walk fails).
#[inline(always)]
fn user_stack<C: StackIdContext>(ctx: &C) -> i32 {
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

/// Per CPU: records submitted, and the ring's unread data, in multiples
/// of [`KernelConfig::wakeup_bytes`], when this CPU last looked.
#[map]
static WAKE: PerCpuArray<WakeState> = PerCpuArray::with_max_entries(1, 0);

/// See [`WAKE`].
#[repr(C)]
#[derive(Clone, Copy)]
struct WakeState {
    submitted: u32,
    level: u32,
}

/// A CPU looks at the ring's fill level once in this many records.
const WAKE_CHECK_EVERY: u32 = 16;

/// Flags for a submit: wake the agent when the unread data has passed
/// another multiple of [`KernelConfig::wakeup_bytes`] since this CPU last
/// looked; the agent polls on a timer otherwise. Waking on every record
/// past the mark, until the agent catches up, cost a self-interrupt each
/// (an MSR write, a trap to the hypervisor in a VM): a tenth of the churn.
/// Looking costs a read of the consumer's position, a cache line the agent
/// writes from another CPU: done once in [`WAKE_CHECK_EVERY`] records, a
/// crossing is seen at most that many records (of this CPU) late, a
/// small share of a mark.
#[inline(always)]
fn wakeup_flags(cfg: &KernelConfig) -> u64 {
    if cfg.wakeup_bytes == 0 {
        return 0;
    }
    let Some(w) = WAKE.get_ptr_mut(0) else {
        return 0;
    };
    // Per-CPU slot: no other writer can race these updates.
    unsafe {
        let submitted = (*w).submitted.wrapping_add(1);
        (*w).submitted = submitted;
        if submitted % WAKE_CHECK_EVERY != 0 {
            return BPF_RB_NO_WAKEUP;
        }
        let level = (EVENTS.query(BPF_RB_AVAIL_DATA) / u64::from(cfg.wakeup_bytes)) as u32;
        let crossed = level > (*w).level;
        (*w).level = level;
        if crossed {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        }
    }
}

#[inline(always)]
fn state_bit(state: i32) -> u32 {
    if (0..32).contains(&state) {
        1 << state
    } else {
        0
    }
}

#[inline(always)]
fn count_transition(old: i32, new: i32) {
    let states = TRANSITION_STATES as i32;
    if !(0..states).contains(&old) || !(0..states).contains(&new) {
        return;
    }
    bump(&TRANSITIONS, (old * states + new) as u32, 1);
}

#[inline(always)]
fn count_lost() {
    count_lost_n(1);
}

#[inline(always)]
fn count_lost_n(n: u64) {
    bump(&LOST, 0, n);
}

#[inline(always)]
fn read_ctx<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

/// The current task's (process id, thread id), from one helper call
/// (`EbpfContext::tgid()` and `pid()` make one each).
#[inline(always)]
fn current_ids() -> (u32, u32) {
    let id = aya_ebpf::helpers::bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
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
    let cfg = config();
    let f = OffsetFields { ctx: &ctx, cfg };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, cfg);
    }
    0
}

/// The same program for the tracepoint layout of Linux >= 5.6 (the agent
/// attaches it when tracefs shows exactly [`FixedFields`]' offsets): fields
/// are plain loads from the context instead of a helper call each, and a
/// transition the agent did not ask for costs a few loads and a counter.
/// This path runs about ten times per connection.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state_fixed(ctx: TracePointContext) -> u32 {
    let f = FixedFields { ctx: &ctx };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, config());
    }
    0
}

/// What both state programs do with a TCP transition: keep or forget an
/// origin, keep a CLOSE_WAIT stay in the table, send what the agent asked
/// for and the table did not take.
#[inline(always)]
fn on_transition<C: StackIdContext, F: Fields>(ctx: &C, f: &F, t: Wanted, cfg: &KernelConfig) {
    if cfg.flags & CONFIG_ORIGIN_MAP != 0 {
        keep_origin(ctx, f, t);
    }
    if wanted(t, cfg.emit_new, cfg.emit_old)
        && (cfg.flags & CONFIG_CW_TABLE == 0 || !close_wait_in_table(cfg, f, t))
    {
        emit_state(ctx, cfg, f, t);
    }
}

/// A TCP transition of an IPv4/IPv6 socket: (old, new, family).
type Wanted = (i32, i32, u16);

/// Counts every TCP transition of an IPv4/IPv6 socket and returns it.
#[inline(always)]
fn tcp_transition<F: Fields>(f: &F) -> Option<Wanted> {
    if f.protocol()? != IPPROTO_TCP {
        return None;
    }
    let family = f.family()?;
    if family != AF_INET && family != AF_INET6 {
        return None;
    }
    let oldstate = f.oldstate()?;
    let newstate = f.newstate()?;
    count_transition(oldstate, newstate);
    Some((oldstate, newstate, family))
}

/// True when the agent asked for this transition.
#[inline(always)]
fn wanted((oldstate, newstate, _): Wanted, emit_new: u32, emit_old: u32) -> bool {
    emit_new & state_bit(newstate) != 0 || emit_old & state_bit(oldstate) != 0
}

/// [`CONFIG_ORIGIN_MAP`]: a connection's origin goes into [`ORIGINS`] when
/// connect() makes it (CLOSE -> SYN_SENT runs inside the call) and its
/// process is within its stack budget, and leaves it when the socket
/// closes, whatever the agent asked to be sent.
#[inline(always)]
fn keep_origin<C: StackIdContext, F: Fields>(
    ctx: &C,
    f: &F,
    (oldstate, newstate, _): Wanted,
) -> Option<()> {
    // The socket's address only where it is needed: on the BTF program,
    // taking it costs a round trip through a per-CPU word, and most
    // transitions need neither branch.
    if newstate == tcp_state::CLOSE {
        // Most sockets were never inserted (listeners, sockets older than
        // the agent): with none kept, as under churn past the budget, a
        // load is all that costs.
        if origins_live() {
            forget(f.skaddr()?);
        }
    } else if oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT {
        // Past the budget, as for accept(): an origin without its stack
        // tells the agent nothing /proc does not.
        if stack_allowed(ctx, config().stacks_per_second) {
            let sk = f.skaddr()?;
            let now = unsafe { bpf_ktime_get_ns() };
            let fd = f.connect_fd(ctx.pid(), now);
            let stack_id = user_stack(ctx);
            keep(sk, ORIGIN_CONNECT, fd, now, stack_id);
            stack_copy::copy_user_stack(STACK_OF_CONNECT, sk, now, stack_id);
        }
    }
    Some(())
}

/// The state program where the kernel has BTF, the agent's first choice:
/// attached as a BTF tracepoint, it gets the tracepoint's arguments (the
/// socket and the two states) where the classic programs get a record the
/// kernel fills for them, field by field, on every transition whether or
/// not they need it. On the benchmark's VM a no-op classic program takes
/// some 3 % of the churn's rate, a no-op BTF one about 1 % (`cargo xtask
/// bench`, the floors). The fields the record would hold are read from the
/// socket when needed, with plain loads the verifier checks against BTF.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state_btf(ctx: BtfTracePointContext) -> i32 {
    let cfg = config();
    let f = SockFields { ctx: &ctx, cfg };
    if let Some(t) = tcp_transition(&f) {
        on_transition(&ctx, &f, t, cfg);
    }
    0
}

/// The BTF tracepoint's arguments: `struct sock *sk`, `int oldstate`,
/// `int newstate`. The verifier types `sk` from BTF, so a load from it at
/// a known offset is a plain load (a fault reads zero); the offsets come
/// from [`TCPTRACE_CONFIG`], which the loader freezes read-only, so the
/// verifier sees them as the constants it needs. The fields are those the
/// tracepoint's record copies, from the same socket; the local address
/// from `__sk_common.skc_rcv_saddr`, which a TCP socket sets with the
/// `inet_sock.inet_saddr` the record uses (at bind, connect and accept),
/// beyond `struct sock`, where a `struct sock` pointer cannot load.
struct SockFields<'a> {
    ctx: &'a BtfTracePointContext,
    cfg: &'a KernelConfig,
}

impl SockFields<'_> {
    /// `sk`, as the verifier's typed pointer: only for [`Self::load`].
    #[inline(always)]
    fn sk(&self) -> u64 {
        self.ctx.arg(0)
    }
    #[inline(always)]
    fn load<T: Copy>(&self, offset: u32) -> T {
        unsafe { *((self.sk() + u64::from(offset)) as *const T) }
    }
}

/// Per CPU: one word through which [`SockFields::skaddr`] turns the
/// socket pointer into a number (see there).
#[map]
static SK_NUMBER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

impl Fields for SockFields<'_> {
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        Some(self.load::<u16>(self.cfg.sk_protocol))
    }
    #[inline(always)]
    fn family(&self) -> Option<u16> {
        Some(self.load::<u16>(self.cfg.sk_family))
    }
    /// The socket's address as a number: the verifier refuses arithmetic
    /// other than adding offsets on a typed pointer, and the tables hash
    /// the address; a word read back from map memory is a number to it.
    #[inline(always)]
    fn skaddr(&self) -> Option<u64> {
        let word = SK_NUMBER.get_ptr_mut(0)?;
        unsafe {
            core::ptr::write_volatile(word, self.sk());
            Some(core::ptr::read_volatile(word))
        }
    }
    #[inline(always)]
    fn oldstate(&self) -> Option<i32> {
        Some(self.ctx.arg::<u64>(1) as i32)
    }
    #[inline(always)]
    fn newstate(&self) -> Option<i32> {
        Some(self.ctx.arg::<u64>(2) as i32)
    }
    /// `skc_num`, the same port as the record's `inet_sport` while the
    /// socket holds it; once it has left it (a CLOSE), `inet_sport`, with
    /// a helper: it lies beyond `struct sock`, where a typed load cannot go.
    #[inline(always)]
    fn sport(&self) -> u16 {
        let num = self.load::<u16>(self.cfg.sk_num);
        if num != 0 {
            return num;
        }
        self.skaddr()
            .and_then(|sk| read_kernel::<u16>(sk + u64::from(self.cfg.inet_sport)))
            .map_or(0, u16::from_be)
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        u16::from_be(self.load::<u16>(self.cfg.sk_dport))
    }
    #[inline(always)]
    fn addrs_v4(&self) -> ([u8; 4], [u8; 4]) {
        (
            self.load::<u32>(self.cfg.sk_rcv_saddr).to_ne_bytes(),
            self.load::<u32>(self.cfg.sk_daddr).to_ne_bytes(),
        )
    }
    #[inline(always)]
    fn addrs_v6(&self) -> ([u8; 16], [u8; 16]) {
        let v6 = |off: u32| addr16(self.load::<u64>(off), self.load::<u64>(off + 8));
        (v6(self.cfg.sk_v6_rcv_saddr), v6(self.cfg.sk_v6_daddr))
    }
    /// As [`FixedFields`]' (x86_64).
    #[cfg(bpf_target_arch = "x86_64")]
    #[inline(always)]
    fn connect_fd(&self, _tid: u32, _now: u64) -> i32 {
        syscall_fd_from_regs()
    }
    /// Two plain loads: `sk->__sk_common.skc_net.net`, typed `struct net *`
    /// by the verifier, then its `ns.inum`.
    #[inline(always)]
    fn netns(&self, cfg: &KernelConfig, _skaddr: u64) -> u32 {
        let net = self.load::<u64>(cfg.sk_net);
        if net == 0 {
            return 0;
        }
        unsafe { *((net + u64::from(cfg.net_inum)) as *const u32) }
    }
}

/// How the state handler reads the tracepoint's fields.
trait Fields {
    fn protocol(&self) -> Option<u16>;
    fn family(&self) -> Option<u16>;
    fn skaddr(&self) -> Option<u64>;
    fn oldstate(&self) -> Option<i32>;
    fn newstate(&self) -> Option<i32>;
    fn sport(&self) -> u16;
    fn dport(&self) -> u16;
    fn addrs_v4(&self) -> ([u8; 4], [u8; 4]);
    fn addrs_v6(&self) -> ([u8; 16], [u8; 16]);
    /// The fd of the connect() running in this context (CLOSE -> SYN_SENT)
    /// by thread `tid`, at `now`; -1 when unknown.
    #[inline(always)]
    fn connect_fd(&self, tid: u32, now: u64) -> i32 {
        connect_fd(tid, now)
    }
    /// The inode number of the network namespace of the socket at
    /// `skaddr` (`cfg` has [`CONFIG_NETNS`]), 0 when unknown.
    #[inline(always)]
    fn netns(&self, cfg: &KernelConfig, skaddr: u64) -> u32 {
        read_kernel::<u64>(skaddr + u64::from(cfg.sk_net))
            .and_then(|net| read_kernel::<u32>(net + u64::from(cfg.net_inum)))
            .unwrap_or(0)
    }
}

/// Offsets from tracefs, read with `bpf_probe_read`: any layout.
struct OffsetFields<'a> {
    ctx: &'a TracePointContext,
    cfg: &'a KernelConfig,
}

impl Fields for OffsetFields<'_> {
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        if self.cfg.tp_protocol_size == 1 {
            read_ctx::<u8>(self.ctx, self.cfg.tp_protocol).map(u16::from)
        } else {
            read_ctx::<u16>(self.ctx, self.cfg.tp_protocol)
        }
    }
    #[inline(always)]
    fn family(&self) -> Option<u16> {
        read_ctx::<u16>(self.ctx, self.cfg.tp_family)
    }
    #[inline(always)]
    fn skaddr(&self) -> Option<u64> {
        read_ctx::<u64>(self.ctx, self.cfg.tp_skaddr)
    }
    #[inline(always)]
    fn oldstate(&self) -> Option<i32> {
        read_ctx::<i32>(self.ctx, self.cfg.tp_oldstate)
    }
    #[inline(always)]
    fn newstate(&self) -> Option<i32> {
        read_ctx::<i32>(self.ctx, self.cfg.tp_newstate)
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        read_ctx::<u16>(self.ctx, self.cfg.tp_sport).unwrap_or(0)
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        read_ctx::<u16>(self.ctx, self.cfg.tp_dport).unwrap_or(0)
    }
    #[inline(always)]
    fn addrs_v4(&self) -> ([u8; 4], [u8; 4]) {
        (
            read_ctx::<[u8; 4]>(self.ctx, self.cfg.tp_saddr).unwrap_or([0; 4]),
            read_ctx::<[u8; 4]>(self.ctx, self.cfg.tp_daddr).unwrap_or([0; 4]),
        )
    }
    #[inline(always)]
    fn addrs_v6(&self) -> ([u8; 16], [u8; 16]) {
        (
            read_ctx::<[u8; 16]>(self.ctx, self.cfg.tp_saddr_v6).unwrap_or([0; 16]),
            read_ctx::<[u8; 16]>(self.ctx, self.cfg.tp_daddr_v6).unwrap_or([0; 16]),
        )
    }
}

/// The Linux >= 5.6 layout of `inet_sock_set_state` (after the 8-byte
/// common header): skaddr 8, oldstate 16, newstate 20, sport 24, dport 26,
/// family 28, protocol 30 (u16), saddr 32, daddr 36, saddr_v6 40,
/// daddr_v6 56. Mirrored by the agent's `layout::FIXED_STATE_OFFSETS`.
struct FixedFields<'a> {
    ctx: &'a TracePointContext,
}

impl FixedFields<'_> {
    #[inline(always)]
    fn at<T: Copy>(&self, offset: usize) -> T {
        ctx_at(self.ctx, offset)
    }
}

/// A plain load from the context at a constant, naturally aligned offset
/// (the verifier checks it against the event's size at attach time), where
/// `read_ctx` costs a helper call.
#[inline(always)]
fn ctx_at<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<T>() }
}

impl Fields for FixedFields<'_> {
    #[inline(always)]
    fn protocol(&self) -> Option<u16> {
        Some(self.at::<u16>(30))
    }
    #[inline(always)]
    fn family(&self) -> Option<u16> {
        Some(self.at::<u16>(28))
    }
    #[inline(always)]
    fn skaddr(&self) -> Option<u64> {
        Some(self.at::<u64>(8))
    }
    #[inline(always)]
    fn oldstate(&self) -> Option<i32> {
        Some(self.at::<i32>(16))
    }
    #[inline(always)]
    fn newstate(&self) -> Option<i32> {
        Some(self.at::<i32>(20))
    }
    #[inline(always)]
    fn sport(&self) -> u16 {
        self.at::<u16>(24)
    }
    #[inline(always)]
    fn dport(&self) -> u16 {
        self.at::<u16>(26)
    }
    #[inline(always)]
    fn addrs_v4(&self) -> ([u8; 4], [u8; 4]) {
        (
            self.at::<u32>(32).to_ne_bytes(),
            self.at::<u32>(36).to_ne_bytes(),
        )
    }
    /// On x86_64, from the registers the syscall entered with: no
    /// `sys_enter_connect` hook (whose attachment alone makes every
    /// syscall on the host pay for its entry tracepoint). The agent then
    /// attaches none.
    #[cfg(bpf_target_arch = "x86_64")]
    #[inline(always)]
    fn connect_fd(&self, _tid: u32, _now: u64) -> i32 {
        syscall_fd_from_regs()
    }
    #[inline(always)]
    fn addrs_v6(&self) -> ([u8; 16], [u8; 16]) {
        let v6 = |off: usize| addr16(self.at::<u64>(off), self.at::<u64>(off + 8));
        (v6(40), v6(56))
    }
}

/// An IPv6 address from its two 8-byte halves as loaded (two loads cost
/// less than a 16-byte copy).
#[inline(always)]
fn addr16(first: u64, second: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&first.to_ne_bytes());
    out[8..].copy_from_slice(&second.to_ne_bytes());
    out
}

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
fn current_syscall_nr() -> i32 {
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
fn syscall_fd_from_regs() -> i32 {
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

#[inline(always)]
fn emit_state<C: StackIdContext, F: Fields>(
    ctx: &C,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate, family): Wanted,
) -> Option<()> {
    let skaddr = f.skaddr()?;

    let in_connect = oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT;
    if family == AF_INET
        && !in_connect
        && newstate != tcp_state::CLOSE_WAIT
        && state_fits_byte(oldstate)
        && state_fits_byte(newstate)
    {
        // No fd, stack or inode to carry: the short record says it all.
        if cfg.flags & CONFIG_STAGE != 0 && stage(cfg, f, (oldstate, newstate), skaddr) {
            return Some(());
        }
        let now = unsafe { bpf_ktime_get_ns() };
        return send(cfg, |rec| {
            fill_state_v4(rec, cfg, f, (oldstate, newstate), skaddr, now);
        });
    }
    let now = unsafe { bpf_ktime_get_ns() };
    // With the origin map, the origin (and its stack) is already there.
    let (connect_fd, stack_id, walked) = if in_connect && cfg.flags & CONFIG_ORIGIN_MAP == 0 {
        // Runs inside connect(): the current task is the owner, and its
        // stack is the code path that opened the connection.
        let walked = stack_allowed(ctx, cfg.stacks_per_second);
        let stack_id = if walked { user_stack(ctx) } else { -1 };
        (f.connect_fd(ctx.pid(), now), stack_id, walked)
    } else {
        (-1, -1, false)
    };
    if walked {
        stack_copy::copy_user_stack(STACK_OF_CONNECT, skaddr, now, stack_id);
    }

    send(cfg, |rec| {
        let t = (oldstate, newstate, family);
        fill_state(
            rec,
            RECORD_STATE,
            cfg,
            f,
            t,
            skaddr,
            now,
            connect_fd,
            stack_id,
        );
    })
}

/// Writes transition `t` of socket `skaddr` at `now` into `rec` (a ring
/// reservation, or a [`CLOSE_WAITS`] slot, whose `kind` comes last, see
/// `cw_enter`); the socket's network namespace, and for a record its
/// inode, are read here. A table entry goes without the inode (two
/// dependent reads per connection): the few entries that linger get it
/// from the agent's sock_diag lookup by four-tuple, as `ss` does.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn fill_state<F: Fields>(
    rec: *mut StateRecord,
    kind: u32,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate, family): Wanted,
    skaddr: u64,
    now: u64,
    connect_fd: i32,
    stack_id: i32,
) {
    let in_connect = oldstate == tcp_state::CLOSE && newstate == tcp_state::SYN_SENT;
    let ino = if kind == RECORD_STATE && (in_connect || newstate == tcp_state::CLOSE_WAIT) {
        sk_ino(cfg, skaddr)
    } else {
        0
    };
    let netns = netns_of(cfg, f, skaddr);
    // Entering CLOSE_WAIT runs in softirq context (the peer's FIN), on
    // whatever task the CPU was running: only a line that prints every
    // transition shows that task.
    let ctx_unused = cfg.flags & CONFIG_ORIGIN_MAP != 0 && newstate == tcp_state::CLOSE_WAIT;
    let (ctx_tgid, ctx_tid) = if ctx_unused { (0, 0) } else { current_ids() };
    unsafe {
        addr_of_mut!((*rec).kind).write(kind);
        addr_of_mut!((*rec).ctx_tgid).write(ctx_tgid);
        addr_of_mut!((*rec).ctx_tid).write(ctx_tid);
        addr_of_mut!((*rec).netns).write(netns);
        addr_of_mut!((*rec).ts_ns).write(now);
        addr_of_mut!((*rec).skaddr).write(skaddr);
        addr_of_mut!((*rec).oldstate).write(oldstate);
        addr_of_mut!((*rec).newstate).write(newstate);
        addr_of_mut!((*rec).family).write(family);
        addr_of_mut!((*rec).sport).write(f.sport());
        addr_of_mut!((*rec).dport).write(f.dport());
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).connect_fd).write(connect_fd);
        addr_of_mut!((*rec).stack_id).write(stack_id);
        addr_of_mut!((*rec).ino).write(ino);
        let (saddr, daddr) = if family == AF_INET {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            let (s4, d4) = f.addrs_v4();
            s[..4].copy_from_slice(&s4);
            d[..4].copy_from_slice(&d4);
            (s, d)
        } else {
            f.addrs_v6()
        };
        addr_of_mut!((*rec).saddr).write(saddr);
        addr_of_mut!((*rec).daddr).write(daddr);
        if ctx_unused {
            addr_of_mut!((*rec).comm).write([0; COMM_LEN]);
        } else {
            write_current_comm(addr_of_mut!((*rec).comm));
        }
    }
}

/// This CPU's staged short records ([`CONFIG_STAGE`]), and whether one of
/// the two programs that touch them is at work on this CPU: the state
/// program can interrupt `flush_stage` (a softirq's transition), and
/// `flush_stage`, run by the agent through an interrupt, can interrupt the
/// state program. Each runs to its end before the one it interrupted goes
/// on, so a plain flag set before and cleared after is enough; whoever
/// finds it set keeps its hands off the batch.
#[repr(C)]
struct Stage {
    busy: u64,
    batch: StateBatch,
}

/// See [`Stage`].
#[map]
static STAGE: PerCpuArray<Stage> = PerCpuArray::with_max_entries(1, 0);

/// [`CONFIG_STAGE`]: adds a short record to this CPU's batch, and sends the
/// batch when it is full; false when the batch is busy (the caller sends
/// the record on its own). The clock is read after the flag is set, so
/// that a record the agent's flush did not find has a time after that
/// flush: the agent releases records in time order up to the moment it
/// flushed every CPU.
#[inline(always)]
fn stage<F: Fields>(cfg: &KernelConfig, f: &F, states: (i32, i32), skaddr: u64) -> bool {
    let Some(st) = STAGE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: `st` points into this CPU's map value; see [`Stage`].
    unsafe {
        let busy = addr_of_mut!((*st).busy);
        if core::ptr::read_volatile(busy) != 0 {
            return false;
        }
        core::ptr::write_volatile(busy, 1);
        let n = (*st).batch.count as usize;
        if n < STAGED_RECORDS {
            let now = bpf_ktime_get_ns();
            let rec = addr_of_mut!((*st).batch.records[n]);
            fill_state_v4(rec, cfg, f, states, skaddr, now);
            if n + 1 == STAGED_RECORDS {
                (*st).batch.count = STAGED_RECORDS as u32;
                send_batch(cfg, st);
            } else {
                (*st).batch.count = (n + 1) as u32;
            }
        }
        core::ptr::write_volatile(busy, 0);
        n < STAGED_RECORDS
    }
}

/// Sends the staged batch (its `count` records) and empties it.
///
/// # Safety
/// `st` must point into this CPU's [`STAGE`] value, with its flag set.
#[inline(always)]
unsafe fn send_batch(cfg: &KernelConfig, st: *mut Stage) {
    unsafe {
        let n = (*st).batch.count as usize;
        if n == 0 || n > STAGED_RECORDS {
            (*st).batch.count = 0;
            return;
        }
        (*st).batch.kind = RECORD_STATE_BATCH;
        // LLVM writes the sum as `n << 6 | 8`, whose bound the verifier
        // loses track of: a check it cannot fold away gives it back.
        let len = core::ptr::read_volatile(&(8 + n * core::mem::size_of::<StateRecordV4>()));
        if len > core::mem::size_of::<StateBatch>() {
            (*st).batch.count = 0;
            return;
        }
        let bytes = core::slice::from_raw_parts(addr_of_mut!((*st).batch).cast::<u8>(), len);
        if EVENTS.output::<[u8]>(bytes, wakeup_flags(cfg)).is_err() {
            count_lost_n(n as u64);
        }
        (*st).batch.count = 0;
    }
}

/// Sends this CPU's staged records ([`CONFIG_STAGE`]). Never attached: the
/// agent runs it on each CPU (`BPF_PROG_TEST_RUN` with
/// `BPF_F_TEST_RUN_ON_CPU`) before it reads the ring, so that no record
/// waits in a batch longer than the agent's poll interval. Returns
/// [`FLUSH_BUSY`] when it interrupted the state program at work on the
/// batch (nothing sent; the agent runs it again), else 0.
///
/// Written without aya's `raw_tracepoint` macro, whose wrapper returns 0
/// whatever the program returns (the agent never saw `FLUSH_BUSY`, and
/// took a busy CPU's batch for flushed); the section name is all the
/// loader needs.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/tcptrace_flush_stage")]
pub fn flush_stage(_ctx: *mut core::ffi::c_void) -> u32 {
    let Some(st) = STAGE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: as in `stage`.
    unsafe {
        let busy = addr_of_mut!((*st).busy);
        if core::ptr::read_volatile(busy) != 0 {
            return FLUSH_BUSY;
        }
        core::ptr::write_volatile(busy, 1);
        send_batch(config(), st);
        core::ptr::write_volatile(busy, 0);
    }
    0
}

/// Writes the current task's `comm` into `dst`, NUL padded (zeros when
/// the helper fails). The raw helper writes it in place: aya's wrapper
/// returns a `Result<[u8; 16], _>`, and moving that into a record took
/// some 100 instructions of byte copies and two `memset` calls per record
/// (`bpftool prog dump xlated`).
///
/// # Safety
/// `dst` must point to 16 writable bytes (a ring reservation or map value).
#[inline(always)]
unsafe fn write_current_comm(dst: *mut [u8; COMM_LEN]) {
    // The kernel pads with NULs, and on failure zeroes the whole buffer.
    unsafe { generated::bpf_get_current_comm(dst.cast(), COMM_LEN as u32) };
}

/// The inode of the socket's network namespace, 0 when unknown.
#[inline(always)]
fn netns_of<F: Fields>(cfg: &KernelConfig, f: &F, skaddr: u64) -> u32 {
    if cfg.flags & CONFIG_NETNS != 0 {
        f.netns(cfg, skaddr)
    } else {
        0
    }
}

/// Writes IPv4 transition `(oldstate, newstate)` of socket `skaddr` at
/// `now` into the short record `rec` (a ring reservation); see
/// [`StateRecordV4`] for which transitions go this way.
#[inline(always)]
fn fill_state_v4<F: Fields>(
    rec: *mut StateRecordV4,
    cfg: &KernelConfig,
    f: &F,
    (oldstate, newstate): (i32, i32),
    skaddr: u64,
    now: u64,
) {
    let netns = netns_of(cfg, f, skaddr);
    let (ctx_tgid, ctx_tid) = current_ids();
    let (saddr, daddr) = f.addrs_v4();
    unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_STATE_V4);
        addr_of_mut!((*rec).ctx_tgid).write(ctx_tgid);
        addr_of_mut!((*rec).ctx_tid).write(ctx_tid);
        addr_of_mut!((*rec).netns).write(netns);
        addr_of_mut!((*rec).ts_ns).write(now);
        addr_of_mut!((*rec).skaddr).write(skaddr);
        // state_fits_byte() checked both.
        addr_of_mut!((*rec).oldstate).write(oldstate as u8);
        addr_of_mut!((*rec).newstate).write(newstate as u8);
        addr_of_mut!((*rec).sport).write(f.sport());
        addr_of_mut!((*rec).dport).write(f.dport());
        addr_of_mut!((*rec)._pad0).write(0);
        addr_of_mut!((*rec).saddr).write(saddr);
        addr_of_mut!((*rec).daddr).write(daddr);
        write_current_comm(addr_of_mut!((*rec).comm));
    }
}

/// The benchmark's floor: the same tracepoint with a program that does
/// nothing, so that `cargo xtask bench` can tell the cost of running any
/// program there from the cost of ours. Never attached by the agent.
#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn bench_floor(_ctx: TracePointContext) -> u32 {
    0
}

/// The benchmark's second floor: attached to the accept() exit
/// tracepoints next to [`bench_floor`], it shows what the agent's syscall
/// hooks cost by their presence alone (every syscall on the host then takes
/// the tracing path).
#[tracepoint(category = "syscalls", name = "sys_exit_accept4")]
pub fn bench_floor_syscall(_ctx: TracePointContext) -> u32 {
    0
}

/// The benchmark's third floor: a program that does nothing on the same
/// tracepoint, attached the way the agent's [`inet_sock_set_state_btf`]
/// is (a BTF tracepoint: the kernel passes its arguments, and fills no
/// record).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn bench_floor_btf(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[tracepoint(category = "tcp", name = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let cfg = config();
    on_reset(&ctx, cfg.rst_recv_skaddr, RESET_RECEIVED);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let cfg = config();
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
    send(config(), |rec: *mut ResetRecord| unsafe {
        addr_of_mut!((*rec).kind).write(RECORD_RESET);
        addr_of_mut!((*rec).direction).write(direction);
        addr_of_mut!((*rec).ts_ns).write(bpf_ktime_get_ns());
        addr_of_mut!((*rec).skaddr).write(skaddr);
    })
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
fn connect_fd(tid: u32, now: u64) -> i32 {
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
        stack_copy::copy_user_stack(STACK_OF_ACCEPT, sk, now, stack_id);
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible: `bpf_probe_read_kernel` is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
