//! Who a process is, as an operator knows it: its systemd unit, its
//! container (id and runtime) and its Kubernetes pod (UID and QoS class),
//! read from its cgroup path alone. Pure: [`Identity::from_cgroup`] parses
//! the path of `/proc/PID/cgroup`; the names that only a runtime knows
//! (container name, pod name and namespace) are filled in later by
//! [`crate::host::names`], when it can read them.
//!
//! The layouts, as systemd, the container runtimes and the kubelet make
//! them (cgroup v2 paths; v1 ones look the same under each hierarchy):
//!
//! | who | path |
//! | --- | --- |
//! | a systemd service | `/system.slice/nginx.service` |
//! | a login session | `/user.slice/user-1000.slice/session-3.scope` |
//! | Docker (systemd driver) | `/system.slice/docker-<id>.scope` |
//! | Docker (cgroupfs driver) | `/docker/<id>` |
//! | Podman (systemd) | `/machine.slice/libpod-<id>.scope`, rootless under `user@UID.service/user.slice/` |
//! | Podman (cgroupfs) | `/libpod_parent/libpod-<id>` |
//! | Podman in a unit (quadlet, `--cgroups=split`) | `/system.slice/app.service/libpod-payload-<id>` |
//! | containerd CRI (systemd) | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` |
//! | containerd (systemd, in its own unit) | `/system.slice/containerd.service/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>` |
//! | CRI-O (systemd) | `.../kubepods-besteffort-pod<uid>.slice/crio-<id>.scope` |
//! | any CRI (cgroupfs) | `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/pod<uid>/<id>` (Guaranteed) |
//!
//! A pod UID in a systemd slice name has `_` for `-`; it is given back
//! with dashes, as the API shows it. A runtime's own helper processes
//! (`libpod-conmon-<id>.scope`, `crio-conmon-<id>.scope`) are no
//! container.

use serde::{Deserialize, Serialize};

/// The container runtime a cgroup path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Docker (moby).
    Docker,
    /// containerd, through its CRI plugin or `ctr`.
    Containerd,
    /// CRI-O.
    Crio,
    /// Podman (libpod).
    Podman,
    /// A Kubernetes container whose runtime the path does not name (the
    /// kubelet's cgroupfs driver).
    Cri,
}

impl Runtime {
    /// The name used in JSON and text.
    pub fn name(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Containerd => "containerd",
            Self::Crio => "crio",
            Self::Podman => "podman",
            Self::Cri => "cri",
        }
    }
}

/// A Kubernetes pod's quality-of-service class, from its cgroup parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Qos {
    /// Requests equal limits for every container (no class segment).
    Guaranteed,
    /// Some requests below limits.
    Burstable,
    /// No requests nor limits.
    BestEffort,
}

impl Qos {
    /// The name Kubernetes uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Guaranteed => "Guaranteed",
            Self::Burstable => "Burstable",
            Self::BestEffort => "BestEffort",
        }
    }
}

/// A container.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Container {
    /// The full id (64 hex digits).
    pub id: String,
    /// Who runs it.
    pub runtime: Runtime,
    /// Its name, when the runtime told ([`crate::host::names`]).
    pub name: Option<String>,
}

impl Container {
    /// The id, short (12 digits) as `docker ps` and `podman ps` show it; a
    /// shorter one (from a state file that was tampered with) whole.
    pub fn short_id(&self) -> &str {
        self.id.get(..12).unwrap_or(&self.id)
    }
}

/// A Kubernetes pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Pod {
    /// The pod's UID, with dashes.
    pub uid: String,
    /// Its QoS class.
    pub qos: Qos,
    /// Its name, when known.
    pub name: Option<String>,
    /// Its namespace, when known.
    pub namespace: Option<String>,
}

/// A process's identity from its cgroup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// The innermost systemd unit (`nginx.service`, `session-3.scope`) above
    /// any container: the unit that runs it (a quadlet's service), or the
    /// process's own.
    pub unit: Option<String>,
    /// The container, when the process runs in one.
    pub container: Option<Container>,
    /// The pod, when the container belongs to one.
    pub pod: Option<Pod>,
}

/// Whether `s` is a full container id: 64 lowercase hex digits.
fn is_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The container a systemd scope or cgroupfs segment names, with the
/// previous segment (cgroupfs drivers put the runtime there).
fn container_of(segment: &str, parent: Option<&str>) -> Option<(String, Runtime)> {
    // containerd in its own unit: `kubepods-...-pod<uid>.slice:cri-containerd:<id>`.
    if let Some((_, rest)) = segment.split_once(":cri-containerd:") {
        return is_id(rest).then(|| (rest.to_string(), Runtime::Containerd));
    }
    let scope = segment.strip_suffix(".scope").unwrap_or(segment);
    const PREFIXES: [(&str, Runtime); 5] = [
        ("docker-", Runtime::Docker),
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::Crio),
        ("libpod-payload-", Runtime::Podman),
        ("libpod-", Runtime::Podman),
    ];
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = scope.strip_prefix(prefix) {
            // `libpod-conmon-<id>`, `crio-conmon-<id>`: the runtime's
            // monitor, not the container; they fail `is_id`.
            return is_id(id).then(|| (id.to_string(), runtime));
        }
    }
    // cgroupfs drivers: a bare id under the runtime's directory or a pod's.
    let runtime = match parent? {
        "docker" => Runtime::Docker,
        "libpod_parent" => Runtime::Podman,
        p if p.starts_with("pod") => Runtime::Cri,
        _ => return None,
    };
    is_id(segment).then(|| (segment.to_string(), runtime))
}

/// The pod a slice or cgroupfs segment names, with the previous segment
/// (the cgroupfs QoS directory).
fn pod_of(segment: &str, parent: Option<&str>) -> Option<Pod> {
    let pod = |uid: &str, qos: Qos| {
        let uid = uid.replace('_', "-");
        (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(
            Pod {
                uid,
                qos,
                name: None,
                namespace: None,
            },
        )
    };
    // systemd: `kubepods-burstable-pod<uid>.slice`, `kubepods-pod<uid>.slice`
    // (also before a `:cri-containerd:` suffix).
    let slice = segment.split(':').next().unwrap_or(segment);
    if let Some(name) = slice.strip_suffix(".slice") {
        for (prefix, qos) in [
            ("kubepods-burstable-pod", Qos::Burstable),
            ("kubepods-besteffort-pod", Qos::BestEffort),
            ("kubepods-pod", Qos::Guaranteed),
        ] {
            if let Some(uid) = name.strip_prefix(prefix) {
                return pod(uid, qos);
            }
        }
        return None;
    }
    // cgroupfs: `kubepods/burstable/pod<uid>`, `kubepods/pod<uid>`.
    let uid = segment.strip_prefix("pod")?;
    let qos = match parent {
        Some("burstable") => Qos::Burstable,
        Some("besteffort") => Qos::BestEffort,
        Some("kubepods") => Qos::Guaranteed,
        _ => return None,
    };
    pod(uid, qos)
}

/// A systemd unit name that is not a container's own scope.
fn unit_of(segment: &str) -> Option<&str> {
    let unit = segment.ends_with(".service") || segment.ends_with(".scope");
    (unit && container_of(segment, None).is_none() && !segment.contains("conmon-"))
        .then_some(segment)
}

impl Identity {
    /// Parses a cgroup path (`/proc/PID/cgroup`'s, as
    /// [`crate::host::procfs::parse_cgroup`] gives it).
    pub fn from_cgroup(path: &str) -> Self {
        let mut id = Self::default();
        let mut parent: Option<&str> = None;
        for segment in path.split('/').filter(|s| !s.is_empty()) {
            if id.container.is_none() {
                if let Some((cid, runtime)) = container_of(segment, parent) {
                    id.container = Some(Container {
                        id: cid,
                        runtime,
                        name: None,
                    });
                } else if let Some(unit) = unit_of(segment) {
                    id.unit = Some(unit.to_string());
                }
            }
            if id.pod.is_none() {
                id.pod = pod_of(segment, parent);
            }
            parent = Some(segment);
        }
        if id.pod.is_some() {
            // A pod's containers run in no unit of their own: what the path
            // named above them (`containerd.service`) is the runtime's.
            id.unit = None;
        }
        id
    }

    /// For people: `container tt-leaky (podman 3f1b6c7d2e9a)`,
    /// `pod shop/orders-7d9f (Burstable), container orders (containerd
    /// 3f1b6c7d2e9a)`, `unit nginx.service`; `None` when there is nothing
    /// to say.
    pub fn describe(&self) -> Option<String> {
        let container = self.container.as_ref().map(|c| {
            let short = c.short_id();
            match &c.name {
                Some(n) => format!("container {n} ({} {short})", c.runtime.name()),
                None => format!("container {short} ({})", c.runtime.name()),
            }
        });
        let pod = self.pod.as_ref().map(|p| {
            let name = match (&p.namespace, &p.name) {
                (Some(ns), Some(n)) => format!("{ns}/{n}"),
                _ => p.uid.clone(),
            };
            format!("pod {name} ({})", p.qos.name())
        });
        let unit = self.unit.as_ref().map(|u| format!("unit {u}"));
        let parts: Vec<String> = [pod, container, unit].into_iter().flatten().collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// Whether the path named nothing an operator would know it by.
    pub fn is_empty(&self) -> bool {
        self.unit.is_none() && self.container.is_none() && self.pod.is_none()
    }

    /// Whether this identity matches an operator's `--unit`, `--container`
    /// or `--pod` value: a unit by its name (with or without `.service`);
    /// a container by name or by a prefix of its id; a pod by name,
    /// `namespace/name` or a prefix of its UID.
    pub fn matches(&self, filter: &IdentityFilter) -> bool {
        let unit = filter.units.is_empty()
            || self.unit.as_deref().is_some_and(|u| {
                filter
                    .units
                    .iter()
                    .any(|f| u == f || u.strip_suffix(".service") == Some(f.as_str()))
            });
        let container = filter.containers.is_empty()
            || self.container.as_ref().is_some_and(|c| {
                filter.containers.iter().any(|f| {
                    c.name.as_deref() == Some(f.as_str()) || (f.len() >= 4 && c.id.starts_with(f))
                })
            });
        let pod = filter.pods.is_empty()
            || self.pod.as_ref().is_some_and(|p| {
                filter.pods.iter().any(|f| {
                    let qualified = match (&p.namespace, &p.name) {
                        (Some(ns), Some(n)) => Some(format!("{ns}/{n}")),
                        _ => None,
                    };
                    p.name.as_deref() == Some(f.as_str())
                        || qualified.as_deref() == Some(f.as_str())
                        || (f.len() >= 4 && p.uid.starts_with(f))
                })
            });
        unit && container && pod
    }
}

/// Who a process is, by pid, for the events that name an owner. Kept
/// behind a trait so that the pipeline stays free of /proc: the agent's
/// is [`crate::host::owners::OwnerIdentities`]; tests and benchmarks have
/// none.
pub trait OwnerIdentity: Send {
    /// The identity of process `pid` (`None` or an empty one: unknown,
    /// the process exited).
    fn of(&mut self, pid: u32) -> Option<std::sync::Arc<Identity>>;
}

/// `--unit`, `--container`, `--pod`: each list empty for no filter; a
/// process must match every list that is not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityFilter {
    /// Unit names.
    pub units: Vec<String>,
    /// Container names or id prefixes.
    pub containers: Vec<String>,
    /// Pod names, `namespace/name`, or UID prefixes.
    pub pods: Vec<String>,
}

impl IdentityFilter {
    /// Whether any list is set.
    pub fn is_active(&self) -> bool {
        !(self.units.is_empty() && self.containers.is_empty() && self.pods.is_empty())
    }

    /// Whether an owner whose identity is `who` passes: every one when no
    /// list is set, else only a known identity that matches.
    pub fn admits(&self, who: Option<&Identity>) -> bool {
        !self.is_active() || who.is_some_and(|i| i.matches(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1b6c7d2e9a4b8c0d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c";
    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    fn container(path: &str) -> Option<(String, Runtime)> {
        Identity::from_cgroup(path)
            .container
            .map(|c| (c.id, c.runtime))
    }

    #[test]
    fn systemd_services_and_sessions_are_units() {
        let id = Identity::from_cgroup("/system.slice/nginx.service");
        assert_eq!(id.unit.as_deref(), Some("nginx.service"));
        assert!(id.container.is_none() && id.pod.is_none());
        let id = Identity::from_cgroup("/user.slice/user-1000.slice/session-3.scope");
        assert_eq!(id.unit.as_deref(), Some("session-3.scope"));
        // A service's own sub-cgroup (systemd's delegation) keeps the unit.
        let id = Identity::from_cgroup("/system.slice/mariadb.service/payload");
        assert_eq!(id.unit.as_deref(), Some("mariadb.service"));
        assert!(Identity::from_cgroup("/").is_empty());
        assert!(Identity::from_cgroup("").is_empty());
    }

    #[test]
    fn docker_with_either_driver() {
        let want = Some((ID.to_string(), Runtime::Docker));
        assert_eq!(container(&format!("/system.slice/docker-{ID}.scope")), want);
        assert_eq!(container(&format!("/docker/{ID}")), want);
        // No unit of its own: the scope is the container's.
        assert_eq!(
            Identity::from_cgroup(&format!("/system.slice/docker-{ID}.scope")).unit,
            None
        );
    }

    #[test]
    fn podman_rootful_rootless_cgroupfs_and_in_a_unit() {
        let want = Some((ID.to_string(), Runtime::Podman));
        assert_eq!(
            container(&format!("/machine.slice/libpod-{ID}.scope")),
            want
        );
        assert_eq!(
            container(&format!("/machine.slice/libpod-{ID}.scope/container")),
            want
        );
        assert_eq!(container(&format!("/libpod_parent/libpod-{ID}")), want);
        let rootless =
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope");
        assert_eq!(container(&rootless), want);
        let quadlet =
            Identity::from_cgroup(&format!("/system.slice/app.service/libpod-payload-{ID}"));
        assert_eq!(quadlet.unit.as_deref(), Some("app.service"));
        assert_eq!(
            quadlet.container.map(|c| (c.id, c.runtime)),
            Some((ID.to_string(), Runtime::Podman))
        );
        // conmon, the runtime's monitor, is no container.
        let conmon = Identity::from_cgroup(&format!("/machine.slice/libpod-conmon-{ID}.scope"));
        assert!(
            conmon.container.is_none() && conmon.unit.is_none(),
            "{conmon:?}"
        );
    }

    #[test]
    fn kubernetes_pods_with_their_qos_class() {
        let slice_uid = UID.replace('-', "_");
        let containerd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/\
             cri-containerd-{ID}.scope"
        );
        let id = Identity::from_cgroup(&containerd);
        let pod = id.pod.as_ref().expect("a pod");
        assert_eq!((pod.uid.as_str(), pod.qos), (UID, Qos::Burstable));
        assert_eq!(
            id.container.as_ref().map(|c| c.runtime),
            Some(Runtime::Containerd)
        );
        assert_eq!(id.unit, None);

        let crio = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{slice_uid}.slice/\
             crio-{ID}.scope"
        );
        let id = Identity::from_cgroup(&crio);
        assert_eq!(id.pod.map(|p| p.qos), Some(Qos::BestEffort));
        assert_eq!(id.container.map(|c| c.runtime), Some(Runtime::Crio));

        let guaranteed =
            format!("/kubepods.slice/kubepods-pod{slice_uid}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            Identity::from_cgroup(&guaranteed).pod.map(|p| p.qos),
            Some(Qos::Guaranteed)
        );

        // containerd's systemd cgroups in its own unit.
        let own_unit = format!(
            "/system.slice/containerd.service/kubepods-burstable-pod{slice_uid}.slice:cri-containerd:{ID}"
        );
        let id = Identity::from_cgroup(&own_unit);
        assert_eq!(id.pod.map(|p| p.uid), Some(UID.to_string()));
        assert_eq!(
            id.container.map(|c| (c.id, c.runtime)),
            Some((ID.to_string(), Runtime::Containerd))
        );
        assert_eq!(id.unit, None, "containerd.service is the runtime's unit");

        // The kubelet's cgroupfs driver.
        for (path, qos) in [
            (format!("/kubepods/burstable/pod{UID}/{ID}"), Qos::Burstable),
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                Qos::BestEffort,
            ),
            (format!("/kubepods/pod{UID}/{ID}"), Qos::Guaranteed),
        ] {
            let id = Identity::from_cgroup(&path);
            assert_eq!(id.pod.map(|p| p.qos), Some(qos), "{path}");
            assert_eq!(
                id.container.map(|c| c.runtime),
                Some(Runtime::Cri),
                "{path}"
            );
        }
        // A pod's sandbox (pause) cgroup before any container.
        let id = Identity::from_cgroup(&format!("/kubepods/burstable/pod{UID}"));
        assert!(id.pod.is_some() && id.container.is_none());
    }

    #[test]
    fn near_misses_are_not_containers() {
        for path in [
            "/system.slice/docker.service",
            "/system.slice/docker-abc.scope",
            &format!("/system.slice/docker-{}.scope", &ID[..63]),
            &format!("/system.slice/docker-{}.scope", ID.to_uppercase()),
            "/kubepods/burstable/podnot-a-uid",
        ] {
            let id = Identity::from_cgroup(path);
            assert!(id.container.is_none() && id.pod.is_none(), "{path}: {id:?}");
        }
        assert_eq!(
            Identity::from_cgroup("/system.slice/docker.service")
                .unit
                .as_deref(),
            Some("docker.service")
        );
    }

    #[test]
    fn filters_match_names_prefixes_and_units() {
        let mut id = Identity::from_cgroup(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        ));
        if let Some(c) = id.container.as_mut() {
            c.name = Some("orders".into());
        }
        if let Some(p) = id.pod.as_mut() {
            p.name = Some("orders-7d9f".into());
            p.namespace = Some("shop".into());
        }
        let f = |units: &[&str], containers: &[&str], pods: &[&str]| IdentityFilter {
            units: units.iter().map(|s| s.to_string()).collect(),
            containers: containers.iter().map(|s| s.to_string()).collect(),
            pods: pods.iter().map(|s| s.to_string()).collect(),
        };
        assert!(id.matches(&f(&[], &[], &[])));
        assert!(id.matches(&f(&[], &["orders"], &[])));
        assert!(id.matches(&f(&[], &[&ID[..12]], &[])));
        assert!(!id.matches(&f(&[], &["ord"], &[])), "a name is whole");
        assert!(id.matches(&f(&[], &[], &["shop/orders-7d9f"])));
        assert!(id.matches(&f(&[], &[], &["orders-7d9f"])));
        assert!(id.matches(&f(&[], &[], &[&UID[..8]])));
        assert!(!id.matches(&f(&["nginx"], &[], &[])), "no unit");
        let svc = Identity::from_cgroup("/system.slice/nginx.service");
        assert!(svc.matches(&f(&["nginx"], &[], &[])));
        assert!(svc.matches(&f(&["nginx.service"], &[], &[])));
        assert!(
            !svc.matches(&f(&["nginx"], &["x1234"], &[])),
            "every list must match"
        );
        assert_eq!(
            id.container.as_ref().map(Container::short_id),
            Some(&ID[..12])
        );
        let odd = Container {
            id: "abc".into(),
            runtime: Runtime::Docker,
            name: None,
        };
        assert_eq!(
            odd.short_id(),
            "abc",
            "a short id from a state file is no panic"
        );
    }
}
