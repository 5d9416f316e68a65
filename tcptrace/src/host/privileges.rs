//! Privileges: an up-front capability check, so that a missing privilege
//! is one clear sentence instead of an EPERM from deep inside the loader,
//! and the drop to what the agent still needs once its programs are
//! attached ([`drop_after_attach`]).
//!
//! The capability sets, the bounding and ambient sets and `no_new_privs`
//! go through rustix; only the seccomp filter ([`forbid_exec`]) is
//! installed with libc's `prctl`, since rustix does not wrap seccomp.

use std::fmt;

use rustix::thread::{CapabilitySet, CapabilitySets};

/// CAP_SYS_ADMIN: implies everything below on any kernel.
pub const CAP_SYS_ADMIN: u32 = 21;
/// CAP_PERFMON (Linux >= 5.8): attach tracepoints, read kernel memory.
const CAP_PERFMON: u32 = 38;
/// CAP_BPF (Linux >= 5.8): load programs, create maps.
const CAP_BPF: u32 = 39;

/// CAP_DAC_READ_SEARCH: list other users' /proc/PID/fd and read their
/// binaries to symbolize stacks.
const CAP_DAC_READ_SEARCH: u32 = 2;
/// CAP_SYS_PTRACE: read other users' fd links, maps and namespaces under
/// /proc (the kernel's ptrace access check).
const CAP_SYS_PTRACE: u32 = 19;

/// CAP_CHECKPOINT_RESTORE (Linux >= 5.9): open `/proc/PID/map_files/`.
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// What the agent keeps once attached, whatever else (see
/// [`runtime_keep`]): /proc for leak owners and symbolization.
const PROC_CAPS: u64 = (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);

/// The agent lacks the privileges to load and attach its programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPrivileged {
    /// Effective uid.
    pub euid: u32,
    /// Effective capability mask, as in /proc/self/status `CapEff`.
    pub cap_eff: u64,
}

impl fmt::Display for NotPrivileged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "needs root or CAP_BPF and CAP_PERFMON (running as uid {} with effective \
             capabilities {:#x}); run it with sudo, or grant the capabilities, e.g. \
             systemd AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE",
            self.euid, self.cap_eff
        )
    }
}

impl std::error::Error for NotPrivileged {}

/// True when `cap_eff` allows loading and attaching tracepoint programs.
pub fn sufficient(cap_eff: u64) -> bool {
    let has = |cap: u32| cap_eff & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Parses the `CapEff:` line of `/proc/PID/status`.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Checks the current process.
pub fn check() -> Result<(), NotPrivileged> {
    let euid = rustix::process::geteuid().as_raw();
    // If /proc is unreadable, let the loader report the real error.
    let Some(cap_eff) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
    else {
        return Ok(());
    };
    if sufficient(cap_eff) {
        Ok(())
    } else {
        Err(NotPrivileged { euid, cap_eff })
    }
}

/// The capabilities to keep after attaching, of those `permitted`:
/// `PROC_CAPS`, and
/// - with the namespace helper ([`crate::host::nshelper`]) entering namespaces
///   for it, CAP_CHECKPOINT_RESTORE for `/proc/PID/map_files/` (where
///   symbolization finds binaries of other mount namespaces);
/// - without it, CAP_SYS_ADMIN for `setns` (and `map_files`);
/// - CAP_BPF when `bpf_syscall_checks` (kernels before 6.5 check every
///   bpf() command, the agent's map reads included, when unprivileged BPF
///   is disabled) and SYS_ADMIN, which passes that check too, is not kept.
pub fn runtime_keep(permitted: u64, helper: bool, bpf_syscall_checks: bool) -> u64 {
    let mut keep = PROC_CAPS;
    if helper {
        keep |= 1 << CAP_CHECKPOINT_RESTORE;
    } else {
        keep |= 1 << CAP_SYS_ADMIN;
    }
    if bpf_syscall_checks && keep & permitted & (1 << CAP_SYS_ADMIN) == 0 {
        keep |= 1 << CAP_BPF;
    }
    keep & permitted
}

/// Whether this kernel's bpf() checks capabilities on every command
/// (before 6.5); true when the release cannot be read.
pub fn bpf_syscall_checks() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let number = |p: Option<&str>| p.and_then(|n| n.parse::<u32>().ok());
    match (number(parts.next()), number(parts.next())) {
        (Some(major), Some(minor)) => (major, minor) < (6, 5),
        _ => true,
    }
}

/// Names of capabilities, for the log line that says what was kept.
pub fn cap_names(mask: u64) -> Vec<String> {
    const NAMES: [&str; 41] = [
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    ];
    (0..64)
        .filter(|cap| mask & (1u64 << cap) != 0)
        .map(|cap| match NAMES.get(cap) {
            Some(name) => format!("CAP_{name}"),
            None => format!("capability {cap}"),
        })
        .collect()
}

/// What [`drop_after_attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Capabilities still effective and permitted.
    pub kept: u64,
    /// Whether the bounding set was cut to `kept` (needs CAP_SETPCAP; a
    /// service manager's bounding set applies either way).
    pub bounding_set: bool,
}

/// The calling thread's permitted capability set (`capget`).
fn permitted_caps() -> std::io::Result<u64> {
    Ok(rustix::thread::capabilities(None)?.permitted.bits())
}

/// Drops every capability the agent no longer needs once its programs are
/// attached and its metrics socket bound, and sets `no_new_privs`: what
/// is kept is [`runtime_keep`] of what the process had, also in the
/// bounding set when CAP_SETPCAP allows it; the ambient and inheritable
/// sets are emptied. An attacker who took over the agent through hostile
/// input (a binary it symbolizes, a scrape) gets no more than that.
///
/// `helper_running`: the namespace helper ([`crate::host::nshelper`]) enters
/// namespaces for the agent, which then needs no CAP_SYS_ADMIN.
///
/// Capabilities and `no_new_privs` belong to a thread: this must run
/// before the agent starts any thread (its output writers), which then
/// inherit the reduced sets.
pub fn drop_after_attach(helper_running: bool) -> std::io::Result<Dropped> {
    drop_to(runtime_keep(
        permitted_caps()?,
        helper_running,
        bpf_syscall_checks(),
    ))
}

/// Keeps `keep` (of what the thread has) and drops the rest, as
/// [`drop_after_attach`] describes; also for the namespace helper.
pub fn drop_to(keep: u64) -> std::io::Result<Dropped> {
    let kept = keep & permitted_caps()?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // the capset below takes away.
    let mut bounding_set = true;
    for cap in 0..64u32 {
        if kept & (1u64 << cap) != 0 {
            continue;
        }
        let one = CapabilitySet::from_bits_retain(1u64 << cap);
        match rustix::thread::remove_capability_from_bounding_set(one) {
            Ok(()) => {}
            // Past the kernel's last capability.
            Err(rustix::io::Errno::INVAL) => break,
            Err(_) => bounding_set = false,
        }
    }
    // Nothing to clear is no failure; a kernel without ambient sets
    // (before 4.3) has none to clear.
    let _ = rustix::thread::clear_ambient_capability_set();
    let kept_set = CapabilitySet::from_bits_retain(kept);
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: kept_set,
            permitted: kept_set,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    rustix::thread::set_no_new_privs(true)?;
    forbid_exec()?;
    Ok(Dropped { kept, bounding_set })
}

/// `AUDIT_ARCH_*` of the syscalls this build makes (`seccomp_data.arch`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// x86_64's x32 syscalls carry this bit in their number.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The agent never executes a program: a seccomp filter makes `execve`
/// and `execveat` fail with EPERM for this thread and every thread it
/// starts later, as do syscalls of another ABI (i386, x32), which the
/// agent never makes and which would otherwise get around the check. Needs
/// `no_new_privs` (or CAP_SYS_ADMIN).
///
/// Why by hand, not a seccomp crate: nine instructions, and the x32 bit
/// and foreign-ABI check spelled out where a reader can verify them; it
/// must run on the main thread before any other starts, which a crate
/// gives no more help with.
pub fn forbid_exec() -> std::io::Result<()> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    // seccomp_data: the syscall number at 0, the architecture at 4.
    let program = [
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH),
        op(RET_K, 0, 0, deny),
        op(LD_W_ABS, 0, 0, 0),
        op(JGE_K, 3, 0, X32_SYSCALL_BIT),
        op(JEQ_K, 2, 0, libc::SYS_execve as u32),
        op(JEQ_K, 1, 0, libc::SYS_execveat as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET_K, 0, 0, deny),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: a valid filter program that outlives the call (the kernel
    // copies it).
    let r = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_sets() {
        assert!(sufficient(0x000001ffffffffff), "root");
        assert!(sufficient(1 << CAP_SYS_ADMIN));
        assert!(sufficient((1 << CAP_BPF) | (1 << CAP_PERFMON)));
        assert!(!sufficient(1 << CAP_BPF));
        assert!(!sufficient(0));
    }

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ffffffffff));
        assert_eq!(parse_cap_eff("CapEff:\tzz"), None);
        assert_eq!(parse_cap_eff(""), None);
    }

    #[test]
    fn runtime_keeps_proc_and_namespace_access_only() {
        let root = 0x000001ffffffffff;
        // The helper enters namespaces: no SYS_ADMIN.
        assert_eq!(
            cap_names(runtime_keep(root, true, false)),
            [
                "CAP_DAC_READ_SEARCH",
                "CAP_SYS_PTRACE",
                "CAP_CHECKPOINT_RESTORE"
            ]
        );
        // ... and on a kernel that checks every bpf() command, CAP_BPF.
        assert_eq!(
            cap_names(runtime_keep(root, true, true)),
            [
                "CAP_DAC_READ_SEARCH",
                "CAP_SYS_PTRACE",
                "CAP_BPF",
                "CAP_CHECKPOINT_RESTORE"
            ]
        );
        // No helper: SYS_ADMIN for setns, which passes bpf()'s check too.
        assert_eq!(
            cap_names(runtime_keep(root, false, true)),
            ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]
        );
        // Started with CAP_BPF and CAP_PERFMON only.
        let some = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE);
        assert_eq!(
            cap_names(runtime_keep(some, false, true)),
            ["CAP_SYS_PTRACE", "CAP_BPF"]
        );
        // Never more than the process had.
        assert_eq!(runtime_keep(0, true, true), 0);
    }

    #[test]
    fn after_forbid_exec_no_program_runs() {
        use std::os::unix::process::CommandExt as _;
        // The filter goes on in the child between fork and exec: the exec
        // itself must fail. no_new_privs first, as the agent sets it.
        let mut cmd = std::process::Command::new("/bin/true");
        // SAFETY: prctl and the filter install are async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                rustix::thread::set_no_new_privs(true)?;
                forbid_exec()
            });
        }
        let err = cmd.status().expect_err("exec must be refused");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        // Without the filter the same command runs.
        let ok = std::process::Command::new("/bin/true").status();
        assert!(ok.is_ok_and(|s| s.success()));
    }

    #[test]
    fn names_capabilities() {
        assert_eq!(
            cap_names(1 << 40 | 1 << 63),
            ["CAP_CHECKPOINT_RESTORE", "capability 63"]
        );
    }

    #[test]
    fn message_says_what_to_do() {
        let msg = NotPrivileged {
            euid: 1000,
            cap_eff: 0,
        }
        .to_string();
        assert!(msg.starts_with("needs root or CAP_BPF and CAP_PERFMON"));
        assert!(msg.contains("sudo"));
    }
}
