//! Up-front capability check, so that a missing privilege is one clear
//! sentence instead of an EPERM from deep inside the loader.

use std::fmt;

/// CAP_SYS_ADMIN: implies everything below on any kernel.
const CAP_SYS_ADMIN: u32 = 21;
/// CAP_PERFMON (Linux >= 5.8): attach tracepoints, read kernel memory.
const CAP_PERFMON: u32 = 38;
/// CAP_BPF (Linux >= 5.8): load programs, create maps.
const CAP_BPF: u32 = 39;

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

/// Parses the `CapEff:` line of /proc/<pid>/status.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Checks the current process.
pub fn check() -> Result<(), NotPrivileged> {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
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
