//! Owners' identities for every event that names an owner: process id to
//! unit, container and pod ([`crate::engine::identity`]), read from
//! `/proc/PID/cgroup` the first time a pid owns a socket and kept a few
//! seconds (a pid that is reused gets its new identity after that). The
//! names come from [`crate::host::names`], not waited for here unless a
//! filter needs them (`--container NAME`, `--pod NAME`: the first line of
//! a container not seen before then waits up to [`NAME_WAIT`] for its
//! name); otherwise a line printed before its container's name is known
//! carries the id only.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::identity::{Identity, OwnerIdentity};
use crate::engine::tracker::FastMap;
use crate::host::names::Names;

/// How long a pid's identity is kept before /proc is read again.
const TTL: Duration = Duration::from_secs(10);
/// Most pids kept; the cache starts over past it.
const MAX_PIDS: usize = 16_384;
/// How long a line waits for a name that a filter needs.
pub const NAME_WAIT: Duration = Duration::from_millis(300);

/// The cache.
pub struct OwnerIdentities {
    /// By pid; looked up for every printed line, hence the fast hasher.
    by_pid: FastMap<u32, (Instant, Arc<Identity>)>,
    names: Option<Arc<Names>>,
    proc_root: PathBuf,
    /// Wait for names (a filter matches by them).
    wait: bool,
}

impl OwnerIdentities {
    /// Reads `/proc`; names containers and pods with `names`.
    pub fn new(names: Option<Arc<Names>>) -> Self {
        Self::under(PathBuf::from("/proc"), names)
    }

    /// Reads `proc_root` instead of `/proc` (tests).
    pub fn under(proc_root: PathBuf, names: Option<Arc<Names>>) -> Self {
        Self {
            by_pid: FastMap::default(),
            names,
            proc_root,
            wait: false,
        }
    }

    /// Waits up to [`NAME_WAIT`] for a container's or pod's name the first
    /// time it is seen: for filters that match by name.
    pub fn waiting_for_names(mut self, wait: bool) -> Self {
        self.wait = wait;
        self
    }

    /// Fills in names from `names`, waiting when told to.
    fn name(names: Option<&Names>, wait: bool, id: &mut Identity) {
        match names {
            Some(names) if wait => names.fill_waiting(id, NAME_WAIT),
            Some(names) => {
                let _ = names.fill(id);
            }
            None => {}
        }
    }

    /// The identity `/proc/PID/cgroup` gives, if it can be read.
    fn read(&self, pid: u32) -> Option<Identity> {
        let text =
            std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")).ok()?;
        let path = crate::host::procfs::parse_cgroup(&text)?;
        Some(Identity::from_cgroup(&path))
    }

    /// Whether `id` names something the names thread may know by now.
    fn unnamed(id: &Identity) -> bool {
        id.container.as_ref().is_some_and(|c| c.name.is_none())
            || id.pod.as_ref().is_some_and(|p| p.name.is_none())
    }
}

impl OwnerIdentity for OwnerIdentities {
    fn of(&mut self, pid: u32) -> Option<Arc<Identity>> {
        if let Some((at, id)) = self.by_pid.get_mut(&pid) {
            if at.elapsed() < TTL {
                if Self::unnamed(id) && self.names.is_some() {
                    let mut named = Identity::clone(id);
                    Self::name(self.names.as_deref(), self.wait, &mut named);
                    if named != **id {
                        *id = Arc::new(named);
                    }
                }
                return Some(Arc::clone(id));
            }
        }
        // A process gone (or unreadable) is cached as nobody in particular
        // too: its sockets' later lines must not read /proc again each.
        let mut id = self.read(pid).unwrap_or_default();
        Self::name(self.names.as_deref(), self.wait, &mut id);
        if self.by_pid.len() >= MAX_PIDS {
            self.by_pid.clear();
        }
        let id = Arc::new(id);
        self.by_pid.insert(pid, (Instant::now(), Arc::clone(&id)));
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_is_read_once_and_kept() {
        let root = std::env::temp_dir().join(format!("tcptrace-owners-{}", std::process::id()));
        std::fs::create_dir_all(root.join("42")).expect("dir");
        std::fs::write(root.join("42/cgroup"), "0::/system.slice/orders.service\n")
            .expect("cgroup");
        let mut owners = OwnerIdentities::under(root.clone(), None);
        let id = owners.of(42).expect("an identity");
        assert_eq!(id.unit.as_deref(), Some("orders.service"));
        // Kept: a change on disk shows only after the TTL.
        std::fs::write(root.join("42/cgroup"), "0::/system.slice/other.service\n").expect("cgroup");
        assert_eq!(
            owners.of(42).and_then(|i| i.unit.clone()).as_deref(),
            Some("orders.service")
        );
        assert!(
            owners.of(43).is_some_and(|i| i.is_empty()),
            "no such process: nobody in particular"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
