//! Where a transition's fields come from: the socket itself through BTF
//! offsets ([`SockFields`]), the classic tracepoint record at offsets from
//! tracefs ([`OffsetFields`]) or at the fixed offsets of known kernels
//! ([`FixedFields`]); the socket's inode and network namespace.

use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;
use aya_ebpf::programs::{BtfTracePointContext, TracePointContext};
use aya_ebpf::EbpfContext;
use tcptrace_common::{KernelConfig, CONFIG_INODE, CONFIG_NETNS};

use crate::connect::{connect_fd, syscall_fd_from_regs};
use crate::helpers::{addr16, read_ctx, read_kernel};

/// Inode number of the file behind `socket` (a `struct socket` embedded in
/// a `struct socket_alloc` next to its inode), 0 when unknown.
#[inline(always)]
pub(crate) fn socket_ino(cfg: &KernelConfig, socket: u64) -> u64 {
    if cfg.flags & CONFIG_INODE == 0 || socket == 0 {
        return 0;
    }
    read_kernel::<u64>(socket + u64::from(cfg.socket_inode) + u64::from(cfg.inode_ino)).unwrap_or(0)
}

/// Inode of the socket file of `sk`, 0 when it has none (orphaned) or unknown.
#[inline(always)]
pub(crate) fn sk_ino(cfg: &KernelConfig, sk: u64) -> u64 {
    if cfg.flags & CONFIG_INODE == 0 {
        return 0;
    }
    read_kernel::<u64>(sk + u64::from(cfg.sk_socket)).map_or(0, |socket| socket_ino(cfg, socket))
}

/// The BTF tracepoint's arguments: `struct sock *sk`, `int oldstate`,
/// `int newstate`. The verifier types `sk` from BTF, so a load from it at
/// a known offset is a plain load (a fault reads zero); the offsets come
/// from [`TCPTRACE_CONFIG`](crate::config::TCPTRACE_CONFIG), which the loader freezes read-only, so the
/// verifier sees them as the constants it needs. The fields are those the
/// tracepoint's record copies, from the same socket; the local address
/// from `__sk_common.skc_rcv_saddr`, which a TCP socket sets with the
/// `inet_sock.inet_saddr` the record uses (at bind, connect and accept),
/// beyond `struct sock`, where a `struct sock` pointer cannot load.
pub(crate) struct SockFields<'a> {
    /// The tracepoint's arguments (the socket is the first).
    pub(crate) ctx: &'a BtfTracePointContext,
    /// The BTF offsets to read it with.
    pub(crate) cfg: &'a KernelConfig,
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
pub(crate) trait Fields {
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
pub(crate) struct OffsetFields<'a> {
    /// The tracepoint record.
    pub(crate) ctx: &'a TracePointContext,
    /// Its field offsets, from tracefs.
    pub(crate) cfg: &'a KernelConfig,
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
pub(crate) struct FixedFields<'a> {
    /// The tracepoint record.
    pub(crate) ctx: &'a TracePointContext,
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
pub(crate) fn ctx_at<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
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

/// The inode of the socket's network namespace, 0 when unknown.
#[inline(always)]
pub(crate) fn netns_of<F: Fields>(cfg: &KernelConfig, f: &F, skaddr: u64) -> u32 {
    if cfg.flags & CONFIG_NETNS != 0 {
        f.netns(cfg, skaddr)
    } else {
        0
    }
}
