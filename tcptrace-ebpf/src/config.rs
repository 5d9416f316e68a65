//! The layout facts the agent fills in at load time ([`TCPTRACE_CONFIG`]):
//! tracepoint field offsets, BTF struct offsets, what to send.

use aya_ebpf::Global;
use tcptrace_common::KernelConfig;

/// Layout facts, set by the agent with `EbpfLoader::override_global`.
///
/// In `.rodata`, which the loader freezes read-only: the verifier then
/// knows the offsets as constants, which [`SockFields`](crate::fields::SockFields)' typed loads need.
#[unsafe(no_mangle)]
static TCPTRACE_CONFIG: Global<KernelConfig> = Global::new(KernelConfig::ZERO);

/// [`TCPTRACE_CONFIG`] in place: each field is loaded where it is used,
/// never the whole of it copied (45 loads, which cost more than most paths
/// that need two fields). The address goes through a volatile read so that
/// the compiler cannot fold the zeros the loader replaces.
#[inline(always)]
pub(crate) fn config() -> &'static KernelConfig {
    // `Global<T>` holds nothing but its `T`.
    let cfg = core::ptr::addr_of!(TCPTRACE_CONFIG).cast::<KernelConfig>();
    unsafe { &*core::ptr::read_volatile(&cfg) }
}

/// `BPF_F_MMAPABLE`.
pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;
