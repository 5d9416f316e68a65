//! Builds the [`KernelConfig`] the kernel program needs: tracepoint field
//! offsets from tracefs and kernel struct offsets from BTF.
//!
//! Only `sock:inet_sock_set_state` is required. The syscall tracepoints
//! (ownership) and BTF (network namespace, accepted sockets) are optional:
//! without them the agent still reports every transition, with `null`
//! where it cannot know, and says so once at start-up.

use std::path::Path;

use anyhow::Context as _;
use tcptrace_common::{KernelConfig, CONFIG_ACCEPT, CONFIG_INODE, CONFIG_NETNS};

use crate::kernel::btf::Btf;
use crate::kernel::support::Plan;
use crate::kernel::tracefs::{self, TracefsError};

/// The main tracepoint.
pub const STATE_TP: (&str, &str) = ("sock", "inet_sock_set_state");

/// The state program for the usual (Linux >= 5.6) tracepoint layout.
pub const FIXED_STATE_PROGRAM: &str = "inet_sock_set_state_fixed";
/// The state program that reads fields at tracefs offsets, any layout.
pub const OFFSETS_STATE_PROGRAM: &str = "inet_sock_set_state";
/// The state program attached as a BTF tracepoint, reading the socket
/// (needs kernel BTF and Linux >= 5.6: a two-byte `sk_protocol`).
pub const BTF_STATE_PROGRAM: &str = "inet_sock_set_state_btf";

/// What the kernel offers, resolved.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Passed to the kernel program.
    pub config: KernelConfig,
    /// `sys_enter_connect` can be attached (`sys_exit_connect` exists too:
    /// both mean syscall tracepoints are built in).
    pub connect_hooks: bool,
    /// `sys_exit_accept`/`sys_exit_accept4` can be attached.
    pub accept_hooks: bool,
    /// `tcp:tcp_receive_reset`/`tcp:tcp_send_reset` can be attached.
    pub reset_hooks: bool,
    /// BTF locates the socket fields [`BTF_STATE_PROGRAM`] reads.
    pub sock_fields: bool,
}

/// The `inet_sock_set_state` field offsets of Linux >= 5.6 (non-RT), in the
/// order skaddr, oldstate, newstate, sport, dport, family, protocol (2
/// bytes), saddr, daddr, saddr_v6, daddr_v6: the layout the kernel program's
/// fast variant (`inet_sock_set_state_fixed`) reads with plain loads.
pub const FIXED_STATE_OFFSETS: [u32; 11] = [8, 16, 20, 24, 26, 28, 30, 32, 36, 40, 56];

/// Whether `cfg`'s tracepoint offsets are [`FIXED_STATE_OFFSETS`].
pub fn has_fixed_state_layout(cfg: &KernelConfig) -> bool {
    cfg.tp_protocol_size == 2
        && [
            cfg.tp_skaddr,
            cfg.tp_oldstate,
            cfg.tp_newstate,
            cfg.tp_sport,
            cfg.tp_dport,
            cfg.tp_family,
            cfg.tp_protocol,
            cfg.tp_saddr,
            cfg.tp_daddr,
            cfg.tp_saddr_v6,
            cfg.tp_daddr_v6,
        ] == FIXED_STATE_OFFSETS
}

impl Layout {
    /// The kernel program for the state tracepoint: with `Auto`, the BTF
    /// one where BTF locates the socket's fields, else the fast classic one
    /// when the tracepoint's layout is the usual one, else the one reading
    /// tracefs offsets.
    pub fn state_program(&self, choice: crate::kernel::layout::StateProgram) -> &'static str {
        use crate::kernel::layout::StateProgram;
        match choice {
            StateProgram::Auto if self.sock_fields => BTF_STATE_PROGRAM,
            StateProgram::Auto => self.classic_state_program(),
            StateProgram::Btf => BTF_STATE_PROGRAM,
            StateProgram::Offsets => OFFSETS_STATE_PROGRAM,
            StateProgram::Fixed => FIXED_STATE_PROGRAM,
        }
    }

    /// The classic tracepoint program `Auto` takes without the BTF one:
    /// the fast one for the usual layout.
    pub fn classic_state_program(&self) -> &'static str {
        if has_fixed_state_layout(&self.config) {
            FIXED_STATE_PROGRAM
        } else {
            OFFSETS_STATE_PROGRAM
        }
    }

    /// Optional tracepoints to attach, as (category, name); each program
    /// is named after its tracepoint.
    pub fn optional_tracepoints(&self) -> Vec<(&'static str, &'static str)> {
        let mut v = Vec::new();
        if self.connect_hooks {
            v.push(("syscalls", "sys_enter_connect"));
        }
        if self.accept_hooks {
            v.extend([
                ("syscalls", "sys_exit_accept4"),
                ("syscalls", "sys_exit_accept"),
            ]);
        }
        if self.reset_hooks {
            v.extend([("tcp", "tcp_receive_reset"), ("tcp", "tcp_send_reset")]);
        }
        v
    }
}

fn state_tp_offsets(tracefs: &Path, cfg: &mut KernelConfig) -> Result<(), TracefsError> {
    let (cat, name) = STATE_TP;
    let fmt = tracefs::read_format(tracefs, cat, name)?;
    let tp = format!("{cat}:{name}");
    let off = |field: &str, sizes: &[u32]| fmt.offset(&tp, field, sizes);
    cfg.tp_skaddr = off("skaddr", &[8])?;
    cfg.tp_oldstate = off("oldstate", &[4])?;
    cfg.tp_newstate = off("newstate", &[4])?;
    cfg.tp_sport = off("sport", &[2])?;
    cfg.tp_dport = off("dport", &[2])?;
    cfg.tp_family = off("family", &[2])?;
    cfg.tp_protocol = off("protocol", &[1, 2])?;
    cfg.tp_protocol_size = fmt.field("protocol").map_or(2, |f| f.size);
    cfg.tp_saddr = off("saddr", &[4])?;
    cfg.tp_daddr = off("daddr", &[4])?;
    cfg.tp_saddr_v6 = off("saddr_v6", &[16])?;
    cfg.tp_daddr_v6 = off("daddr_v6", &[16])?;
    Ok(())
}

fn syscall_offset(tracefs: &Path, name: &str, field: &str) -> Result<u32, TracefsError> {
    let fmt = tracefs::read_format(tracefs, "syscalls", name)?;
    fmt.offset(&format!("syscalls:{name}"), field, &[8])
}

fn btf_offsets(btf: &Btf, cfg: &mut KernelConfig) -> anyhow::Result<()> {
    cfg.sk_net = btf.member_offset("sock", &["__sk_common", "skc_net", "net"])?;
    cfg.net_inum = btf.member_offset("net", &["ns", "inum"])?;
    cfg.flags |= CONFIG_NETNS;
    Ok(())
}

/// What [`BTF_STATE_PROGRAM`] reads from `struct sock` in place of the
/// tracepoint's record. `member_offset` refuses a bitfield: before Linux
/// 5.6, `sk_protocol` was one, and that kernel gets a classic program.
fn btf_sock_offsets(btf: &Btf, cfg: &mut KernelConfig) -> anyhow::Result<()> {
    let common = |field: &str| btf.member_offset("sock", &["__sk_common", field]);
    cfg.sk_protocol = btf.member_offset("sock", &["sk_protocol"])?;
    cfg.sk_family = common("skc_family")?;
    cfg.sk_num = common("skc_num")?;
    cfg.inet_sport = btf.member_offset("inet_sock", &["inet_sport"])?;
    cfg.sk_dport = common("skc_dport")?;
    cfg.sk_rcv_saddr = common("skc_rcv_saddr")?;
    cfg.sk_daddr = common("skc_daddr")?;
    cfg.sk_v6_rcv_saddr = common("skc_v6_rcv_saddr")?;
    cfg.sk_v6_daddr = common("skc_v6_daddr")?;
    Ok(())
}

fn btf_inode_offsets(btf: &Btf, cfg: &mut KernelConfig) -> anyhow::Result<()> {
    cfg.sk_socket = btf.member_offset("sock", &["sk_socket"])?;
    cfg.socket_inode = btf.member_offset("socket_alloc", &["vfs_inode"])?;
    cfg.inode_ino = btf.member_offset("inode", &["i_ino"])?;
    cfg.flags |= CONFIG_INODE;
    Ok(())
}

fn btf_accept_offsets(btf: &Btf, cfg: &mut KernelConfig) -> anyhow::Result<()> {
    cfg.task_files = btf.member_offset("task_struct", &["files"])?;
    cfg.files_fdt = btf.member_offset("files_struct", &["fdt"])?;
    cfg.fdt_max_fds = btf.member_offset("fdtable", &["max_fds"])?;
    cfg.fdt_fd = btf.member_offset("fdtable", &["fd"])?;
    cfg.file_private_data = btf.member_offset("file", &["private_data"])?;
    cfg.socket_sk = btf.member_offset("socket", &["sk"])?;
    cfg.sk_family = btf.member_offset("sock", &["__sk_common", "skc_family"])?;
    Ok(())
}

/// Resolves everything `plan` uses; fails only when the main tracepoint
/// is unusable. What the plan goes without was said already: only a
/// feature that is there but cannot be used is logged here.
pub fn resolve(tracefs: &Path, plan: &Plan) -> anyhow::Result<Layout> {
    let mut cfg = KernelConfig::ZERO;
    state_tp_offsets(tracefs, &mut cfg)?;

    let connect = syscall_offset(tracefs, "sys_enter_connect", "fd")
        .and_then(|fd| tracefs::read_format(tracefs, "syscalls", "sys_exit_connect").map(|_| fd));
    let connect_hooks = match connect {
        Ok(fd) => {
            cfg.enter_connect_fd = fd;
            true
        }
        Err(e) => {
            log::warn!("connect() hooks unavailable, client sockets will have no fd: {e}");
            false
        }
    };

    let btf = if plan.btf {
        Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")
    } else {
        Err(anyhow::anyhow!("not there"))
    };
    let btf = match btf {
        Ok(btf) => Some(btf),
        Err(_) if !plan.btf => None,
        Err(e) => {
            log::warn!(
                "no kernel BTF ({e:#}): network namespaces and owners of accepted sockets \
                 will be unknown; a kernel with CONFIG_DEBUG_INFO_BTF=y fixes this"
            );
            None
        }
    };
    let mut sock_fields = false;
    if let Some(btf) = &btf {
        match btf_sock_offsets(btf, &mut cfg) {
            Ok(()) => sock_fields = true,
            Err(e) => log::info!(
                "the BTF state program cannot read this kernel's sockets ({e:#}); \
                 using the classic tracepoint program"
            ),
        }
        if let Err(e) = btf_offsets(btf, &mut cfg) {
            log::warn!(
                "cannot locate the socket's network namespace in BTF: {e:#}; netns will be null"
            );
        }
        if let Err(e) = btf_inode_offsets(btf, &mut cfg) {
            log::warn!("cannot locate socket inodes in BTF: {e:#}; leak owners will be unknown");
        }
    }

    let accept = syscall_offset(tracefs, "sys_exit_accept4", "ret")
        .and_then(|r4| syscall_offset(tracefs, "sys_exit_accept", "ret").map(|r| (r4, r)));
    let accept_hooks = match (accept, &btf) {
        _ if !plan.accept_hooks => false,
        (Ok((r4, r)), Some(btf)) => match btf_accept_offsets(btf, &mut cfg) {
            Ok(()) => {
                cfg.exit_accept4_ret = r4;
                cfg.exit_accept_ret = r;
                cfg.flags |= CONFIG_ACCEPT;
                true
            }
            Err(e) => {
                log::warn!("cannot resolve fds to sockets from BTF ({e:#}); accepted sockets will have no owner");
                false
            }
        },
        (Err(e), _) => {
            log::warn!("accept() hooks unavailable ({e}); accepted sockets will have no owner");
            false
        }
        (Ok(_), None) => false,
    };

    let resets = tracefs::read_format(tracefs, "tcp", "tcp_receive_reset")
        .and_then(|f| f.offset("tcp:tcp_receive_reset", "skaddr", &[8]))
        .and_then(|recv| {
            tracefs::read_format(tracefs, "tcp", "tcp_send_reset")
                .and_then(|f| f.offset("tcp:tcp_send_reset", "skaddr", &[8]))
                .map(|send| (recv, send))
        });
    let reset_hooks = match resets {
        _ if !plan.reset_hooks => false,
        Ok((recv, send)) => {
            cfg.rst_recv_skaddr = recv;
            cfg.rst_send_skaddr = send;
            true
        }
        Err(e) => {
            log::warn!(
                "RST tracepoints unavailable ({e}); connections aborted by RST may be counted \
                 as TIME_WAIT"
            );
            false
        }
    };

    Ok(Layout {
        config: cfg,
        connect_hooks,
        accept_hooks,
        reset_hooks,
        sock_fields,
    })
}

/// A config with only the state tracepoint's record offsets, in the order
/// of [`FIXED_STATE_OFFSETS`], and its protocol field size: for tests.
/// `--state-program`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateProgram {
    /// The BTF program where the kernel has BTF, else the fast classic one
    /// when the layout allows it.
    Auto,
    /// A BTF tracepoint program reading the socket (Linux >= 5.6 with BTF).
    Btf,
    /// Fields read at the offsets tracefs gives.
    Offsets,
    /// Fields at the Linux >= 5.6 offsets (fails to attach on other layouts).
    Fixed,
}

#[cfg(test)]
pub(crate) fn config_with_state_offsets(offsets: [u32; 11], protocol_size: u32) -> KernelConfig {
    let mut c = KernelConfig::ZERO;
    [
        c.tp_skaddr,
        c.tp_oldstate,
        c.tp_newstate,
        c.tp_sport,
        c.tp_dport,
        c.tp_family,
        c.tp_protocol,
        c.tp_saddr,
        c.tp_daddr,
        c.tp_saddr_v6,
        c.tp_daddr_v6,
    ] = offsets;
    c.tp_protocol_size = protocol_size;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_program_only_for_the_usual_layout() {
        assert!(has_fixed_state_layout(&config_with_state_offsets(
            FIXED_STATE_OFFSETS,
            2
        )));
        // Before 5.6: a one-byte protocol.
        assert!(!has_fixed_state_layout(&config_with_state_offsets(
            FIXED_STATE_OFFSETS,
            1
        )));
        // A bigger common header (PREEMPT_RT) shifts everything.
        let shifted = FIXED_STATE_OFFSETS.map(|o| o + 8);
        assert!(!has_fixed_state_layout(&config_with_state_offsets(
            shifted, 2
        )));
        let layout = Layout {
            config: config_with_state_offsets(shifted, 2),
            connect_hooks: true,
            accept_hooks: true,
            reset_hooks: true,
            sock_fields: false,
        };
        use crate::kernel::layout::StateProgram;
        assert_eq!(
            layout.state_program(StateProgram::Auto),
            OFFSETS_STATE_PROGRAM
        );
        assert_eq!(
            layout.state_program(StateProgram::Fixed),
            FIXED_STATE_PROGRAM
        );
    }

    #[test]
    fn this_kernel_uses_the_usual_layout_or_says_why_not() {
        // Where tracefs is readable, resolve the real layout: either the
        // fast path applies, or the offsets differ from the usual ones.
        let Ok(tracefs) = crate::kernel::tracefs::locate_or_mount() else {
            return;
        };
        let everything = Plan {
            btf: true,
            accept_hooks: true,
            reset_hooks: true,
            without: Vec::new(),
        };
        let Ok(layout) = resolve(&tracefs, &everything) else {
            return;
        };
        let fixed = has_fixed_state_layout(&layout.config);
        let offsets = [layout.config.tp_skaddr, layout.config.tp_oldstate];
        assert_eq!(fixed, offsets == [8, 16] && layout.config.tp_protocol == 30);
        // A kernel with BTF (>= 5.6) has the socket fields the BTF program reads.
        if let Ok(btf) = Btf::from_sys_fs() {
            let mut cfg = KernelConfig::ZERO;
            if btf.member_offset("sock", &["sk_protocol"]).is_ok() {
                btf_sock_offsets(&btf, &mut cfg).expect("socket fields in BTF");
                assert!(layout.sock_fields);
                assert_ne!(cfg.sk_num, cfg.sk_dport);
                assert!(cfg.inet_sport as usize >= cfg.sk_v6_daddr as usize + 16);
            }
        }
    }
}
