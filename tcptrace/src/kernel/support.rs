//! What the kernel offers, probed once at start-up ([`probe`]), and what
//! the agent makes of it ([`plan`]): run with everything, run without a
//! feature and say so in one line each, or stop with one line naming
//! what is missing and what would provide it.
//!
//! The decision is pure, so that every combination a kernel can present
//! is tested with made-up probe results; [`probe`] only asks the kernel.

use std::fmt;
use std::path::Path;

/// One feature, as the probe found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    /// There.
    Yes,
    /// Not there, and why the probe thinks so.
    No(String),
    /// The probe could not tell (for example refused by a security
    /// module): the agent goes on, and the loader reports what fails.
    Unknown(String),
}

impl Probed {
    /// Not known to be missing.
    pub fn usable(&self) -> bool {
        !matches!(self, Probed::No(_))
    }
}

/// What the probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// BPF ring buffer maps (Linux >= 5.8): the only way records leave the
    /// kernel.
    pub ring_buffer: Probed,
    /// Tracepoint programs.
    pub tracepoint_programs: Probed,
    /// Kernel BTF at /sys/kernel/btf/vmlinux: the BTF state program,
    /// network namespaces, accepted sockets' owners.
    pub btf: Probed,
    /// `sock:inet_sock_set_state` (Linux >= 4.16).
    pub state_tracepoint: Probed,
    /// `syscalls:sys_exit_accept4` and `sys_exit_accept`
    /// (CONFIG_FTRACE_SYSCALLS).
    pub accept_tracepoints: Probed,
    /// `tcp:tcp_receive_reset` and `tcp:tcp_send_reset`.
    pub reset_tracepoints: Probed,
}

/// How the agent runs on this kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Read BTF (the BTF state program and the offsets it gives).
    pub btf: bool,
    /// Hook accept() (needs its tracepoints and BTF to find the socket).
    pub accept_hooks: bool,
    /// Hook RSTs.
    pub reset_hooks: bool,
    /// One line per feature the agent goes without, saying what is lost.
    pub without: Vec<String>,
}

/// The kernel lacks something the agent cannot run without.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// What is missing, each with the probe's reason.
    pub what: Vec<String>,
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this kernel cannot run tcptrace: {}; tcptrace needs Linux >= 5.12 with \
             CONFIG_BPF_SYSCALL and CONFIG_BPF_EVENTS (see README, Requirements)",
            self.what.join("; ")
        )
    }
}

impl std::error::Error for Missing {}

/// Decides from `f` how the agent runs, or why it cannot.
pub fn plan(f: &Features) -> Result<Plan, Missing> {
    let mut what = Vec::new();
    if let Probed::No(why) = &f.ring_buffer {
        // A perf-buffer transport would reach older kernels, at several
        // times the cost per record and with per-CPU ordering to undo;
        // every supported distribution kernel has the ring buffer.
        what.push(format!(
            "no BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux >= 5.8): {why}"
        ));
    }
    if let Probed::No(why) = &f.tracepoint_programs {
        what.push(format!(
            "no BPF tracepoint programs (CONFIG_BPF_EVENTS): {why}"
        ));
    }
    if let Probed::No(why) = &f.state_tracepoint {
        what.push(format!(
            "no tracepoint sock:inet_sock_set_state (Linux >= 4.16): {why}"
        ));
    }
    if !what.is_empty() {
        return Err(Missing { what });
    }
    let mut without = Vec::new();
    let btf = f.btf.usable();
    if let Probed::No(why) = &f.btf {
        without.push(format!(
            "no kernel BTF ({why}): the classic tracepoint program instead of the BTF one; \
             network namespaces and owners of accepted sockets will be unknown \
             (CONFIG_DEBUG_INFO_BTF=y provides it)"
        ));
    }
    let accept_hooks = match (&f.accept_tracepoints, btf) {
        (Probed::No(why), _) => {
            without.push(format!(
                "no accept() tracepoints ({why}; CONFIG_FTRACE_SYSCALLS provides them): \
                 accepted sockets will have no origin"
            ));
            false
        }
        (_, false) => {
            without.push(
                "no accept() hooks without BTF (it locates the accepted socket): accepted \
                 sockets will have no origin"
                    .to_string(),
            );
            false
        }
        (_, true) => true,
    };
    let reset_hooks = f.reset_tracepoints.usable();
    if let Probed::No(why) = &f.reset_tracepoints {
        without.push(format!(
            "no RST tracepoints ({why}): connections aborted by RST may be counted as \
             TIME_WAIT"
        ));
    }
    Ok(Plan {
        btf,
        accept_hooks,
        reset_hooks,
        without,
    })
}

/// Whether tracefs has the event `category:name`.
fn tracepoint(tracefs: &Path, category: &str, name: &str) -> Probed {
    let format = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    match std::fs::metadata(&format) {
        Ok(_) => Probed::Yes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Probed::No(format!("{} does not exist", format.display()))
        }
        Err(e) => Probed::Unknown(format!("{}: {e}", format.display())),
    }
}

/// Both of `names` in `category`: the first that is not [`Probed::Yes`].
fn tracepoints(tracefs: &Path, category: &str, names: &[&str]) -> Probed {
    names
        .iter()
        .map(|name| tracepoint(tracefs, category, name))
        .find(|p| *p != Probed::Yes)
        .unwrap_or(Probed::Yes)
}

fn map_type(map: aya::maps::MapType) -> Probed {
    match aya::sys::is_map_supported(map) {
        Ok(true) => Probed::Yes,
        Ok(false) => Probed::No("the kernel refuses to create one".to_string()),
        Err(e) => Probed::Unknown(e.to_string()),
    }
}

/// Asks the kernel (needs the privileges to load BPF programs).
pub fn probe(tracefs: &Path) -> Features {
    let tracepoint_programs =
        match aya::sys::is_program_supported(aya::programs::ProgramType::TracePoint) {
            Ok(true) => Probed::Yes,
            Ok(false) => Probed::No("the kernel refuses to load one".to_string()),
            Err(e) => Probed::Unknown(e.to_string()),
        };
    let btf_path = Path::new("/sys/kernel/btf/vmlinux");
    let btf = match std::fs::metadata(btf_path) {
        Ok(_) => Probed::Yes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Probed::No(format!("{} does not exist", btf_path.display()))
        }
        Err(e) => Probed::Unknown(format!("{}: {e}", btf_path.display())),
    };
    Features {
        ring_buffer: map_type(aya::maps::MapType::RingBuf),
        tracepoint_programs,
        btf,
        state_tracepoint: tracepoint(tracefs, "sock", "inet_sock_set_state"),
        accept_tracepoints: tracepoints(
            tracefs,
            "syscalls",
            &["sys_exit_accept4", "sys_exit_accept"],
        ),
        reset_tracepoints: tracepoints(tracefs, "tcp", &["tcp_receive_reset", "tcp_send_reset"]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn everything() -> Features {
        Features {
            ring_buffer: Probed::Yes,
            tracepoint_programs: Probed::Yes,
            btf: Probed::Yes,
            state_tracepoint: Probed::Yes,
            accept_tracepoints: Probed::Yes,
            reset_tracepoints: Probed::Yes,
        }
    }

    fn no(why: &str) -> Probed {
        Probed::No(why.to_string())
    }

    #[test]
    fn a_full_kernel_runs_with_everything_and_says_nothing() {
        let plan = plan(&everything()).expect("runs");
        assert_eq!(
            plan,
            Plan {
                btf: true,
                accept_hooks: true,
                reset_hooks: true,
                without: vec![],
            }
        );
    }

    #[test]
    fn no_ring_buffer_is_one_line_naming_it() {
        let f = Features {
            ring_buffer: no("EINVAL"),
            ..everything()
        };
        let e = plan(&f).expect_err("cannot run");
        let line = e.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("this kernel cannot run tcptrace: no BPF ring buffer"));
        assert!(line.contains("Linux >= 5.8"), "{line}");
        assert!(line.contains("EINVAL"), "the probe's reason: {line}");
    }

    #[test]
    fn every_missing_essential_is_named_at_once() {
        let f = Features {
            ring_buffer: no("a"),
            tracepoint_programs: no("b"),
            state_tracepoint: no("c"),
            ..everything()
        };
        let e = plan(&f).expect_err("cannot run");
        assert_eq!(e.what.len(), 3, "{e}");
        assert!(e.to_string().contains("sock:inet_sock_set_state"));
    }

    #[test]
    fn an_unknown_probe_lets_the_loader_decide() {
        let f = Features {
            ring_buffer: Probed::Unknown("EPERM".to_string()),
            btf: Probed::Unknown("EACCES".to_string()),
            ..everything()
        };
        let plan = plan(&f).expect("runs");
        assert!(plan.btf && plan.without.is_empty());
    }

    #[test]
    fn without_btf_the_classic_program_and_no_accept_hooks() {
        let f = Features {
            btf: no("/sys/kernel/btf/vmlinux does not exist"),
            ..everything()
        };
        let plan = plan(&f).expect("runs");
        assert!(!plan.btf);
        assert!(!plan.accept_hooks, "the hook needs BTF to find the socket");
        assert!(plan.reset_hooks);
        assert_eq!(plan.without.len(), 2, "{:?}", plan.without);
        assert!(plan.without[0].contains("classic tracepoint program"));
        assert!(plan.without[0].contains("CONFIG_DEBUG_INFO_BTF"));
    }

    #[test]
    fn without_syscall_tracepoints_no_accept_hooks() {
        let f = Features {
            accept_tracepoints: no("sys_exit_accept4 does not exist"),
            ..everything()
        };
        let plan = plan(&f).expect("runs");
        assert!(plan.btf && !plan.accept_hooks);
        assert_eq!(plan.without.len(), 1);
        assert!(plan.without[0].contains("CONFIG_FTRACE_SYSCALLS"));
    }

    #[test]
    fn without_reset_tracepoints_it_says_what_is_lost() {
        let f = Features {
            reset_tracepoints: no("x"),
            ..everything()
        };
        let plan = plan(&f).expect("runs");
        assert!(!plan.reset_hooks && plan.accept_hooks && plan.btf);
        assert_eq!(plan.without.len(), 1);
        assert!(plan.without[0].contains("RST"));
    }

    #[test]
    fn the_probe_sees_this_kernel() {
        // Any kernel the tests run on has the tracepoint's category or not;
        // a tracefs that is not there makes every tracepoint missing.
        let f = probe(Path::new("/nonexistent-tracefs"));
        assert!(matches!(f.state_tracepoint, Probed::No(_)));
        assert!(matches!(f.accept_tracepoints, Probed::No(_)));
        assert!(plan(&f).is_err());
    }
}
