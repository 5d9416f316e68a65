//! Names of containers and pods, which the cgroup path does not carry
//! ([`crate::engine::identity`]): a container's name from its runtime, a
//! pod's name and namespace from the kubelet.
//!
//! Where each comes from, first that answers:
//! 1. a runtime's API socket (`--runtime-socket`; by default Docker's
//!    `/run/docker.sock` and Podman's `/run/podman/podman.sock`, when they
//!    exist): `GET /containers/ID/json`, the Docker API that Podman serves
//!    too;
//! 2. the runtime's own state on disk, for a runtime whose service is not
//!    running (Podman runs none by default): Podman's and CRI-O's
//!    `containers.json` under `/var/lib/containers/storage`, Docker's
//!    `/var/lib/docker/containers/ID/config.v2.json`;
//! 3. for Kubernetes, the kubelet's log directories, named after what the
//!    API knows: `/var/log/containers/POD_NAMESPACE_CONTAINER-ID.log` and
//!    `/var/log/pods/NAMESPACE_POD_UID/` (containerd's and CRI-O's CRI
//!    sockets speak gRPC, which the agent does not).
//!
//! Not found: rootless Podman's containers (their state is in the user's
//! home) and containers of a runtime in another mount namespace than the
//! agent's (a DaemonSet must mount the host's `/var/log` and
//! `/var/lib/containers` or the sockets to see them).
//!
//! Look-ups run on a thread of their own and are cached (a miss too, for a
//! minute): the event path only reads the cache ([`Names::fill`]); the leak
//! report waits a moment for a container it sees the first time
//! ([`Names::fill_waiting`]).

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::engine::identity::{Identity, Runtime};

/// The runtimes' API sockets looked at by default.
pub const DEFAULT_SOCKETS: [&str; 3] = [
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
];
/// How long a socket may take to answer one request.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a name that was not found stays not found.
const MISS_TTL: Duration = Duration::from_secs(60);
/// Most names kept (each kind); the cache starts over past it.
const MAX_CACHED: usize = 8192;

/// Where names are read from; [`Sources::default`] is the host's.
#[derive(Clone, Debug)]
pub struct Sources {
    /// API sockets (those that do not exist are skipped).
    pub sockets: Vec<PathBuf>,
    /// containers/storage roots (Podman, CRI-O, Buildah).
    pub storage: Vec<PathBuf>,
    /// Docker's data root.
    pub docker_root: PathBuf,
    /// The kubelet's `/var/log/containers`.
    pub container_logs: PathBuf,
    /// The kubelet's `/var/log/pods`.
    pub pod_logs: PathBuf,
}

impl Default for Sources {
    fn default() -> Self {
        Self {
            sockets: DEFAULT_SOCKETS.iter().map(PathBuf::from).collect(),
            storage: vec![PathBuf::from("/var/lib/containers/storage")],
            docker_root: PathBuf::from("/var/lib/docker"),
            container_logs: PathBuf::from("/var/log/containers"),
            pod_logs: PathBuf::from("/var/log/pods"),
        }
    }
}

/// What is looked up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Container(String, Runtime),
    Pod(String),
}

/// A container's names: its own, and for a Kubernetes container its pod's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ContainerNames {
    name: Option<String>,
    pod: Option<(String, String)>,
}

/// A cached answer.
#[derive(Clone, Debug)]
enum Answer {
    Container(ContainerNames),
    /// (namespace, name).
    Pod(Option<(String, String)>),
}

#[derive(Default)]
struct Cache {
    answers: HashMap<Key, (Answer, Instant)>,
    pending: HashSet<Key>,
}

/// The name cache and its look-up thread.
pub struct Names {
    cache: Arc<(Mutex<Cache>, Condvar)>,
    requests: mpsc::Sender<Key>,
}

impl Names {
    /// Starts the look-up thread over `sources`.
    pub fn start(sources: Sources) -> std::io::Result<Self> {
        let cache: Arc<(Mutex<Cache>, Condvar)> = Arc::default();
        let (requests, incoming) = mpsc::channel::<Key>();
        let shared = Arc::clone(&cache);
        std::thread::Builder::new()
            .name("tcptrace-names".into())
            .spawn(move || {
                for key in incoming {
                    let answer = look_up(&sources, &key);
                    let (lock, ready) = &*shared;
                    if let Ok(mut c) = lock.lock() {
                        if c.answers.len() >= MAX_CACHED {
                            c.answers.clear();
                        }
                        c.pending.remove(&key);
                        c.answers.insert(key, (answer, Instant::now()));
                    }
                    ready.notify_all();
                }
            })?;
        Ok(Self { cache, requests })
    }

    /// What `identity` needs looked up.
    fn keys(identity: &Identity) -> Vec<Key> {
        let mut keys = Vec::new();
        if let Some(c) = &identity.container {
            keys.push(Key::Container(c.id.clone(), c.runtime));
        }
        if let Some(p) = &identity.pod {
            keys.push(Key::Pod(p.uid.clone()));
        }
        keys
    }

    /// Fills in the names the cache has, and asks for the others; true
    /// when nothing is left to ask. Never waits.
    pub fn fill(&self, identity: &mut Identity) -> bool {
        let keys = Self::keys(identity);
        if keys.is_empty() {
            return true;
        }
        let Ok(mut c) = self.cache.0.lock() else {
            return true;
        };
        let mut done = true;
        for key in keys {
            match c.answers.get(&key) {
                Some((answer, at)) if fresh(answer, *at) => apply(identity, answer),
                _ => {
                    done = false;
                    if c.pending.insert(key.clone()) {
                        let _ = self.requests.send(key);
                    }
                }
            }
        }
        done
    }

    /// [`Names::fill`], waiting up to `wait` for what it asked.
    pub fn fill_waiting(&self, identity: &mut Identity, wait: Duration) {
        let deadline = Instant::now() + wait;
        while !self.fill(identity) {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let (lock, ready) = &*self.cache;
            let Ok(guard) = lock.lock() else { return };
            if guard.pending.is_empty() {
                continue;
            }
            let _ = ready.wait_timeout(guard, deadline - now);
        }
    }
}

/// Whether a cached answer still holds: a found name does (an id is not
/// reused), a miss for [`MISS_TTL`].
fn fresh(answer: &Answer, at: Instant) -> bool {
    let found = match answer {
        Answer::Container(n) => n.name.is_some(),
        Answer::Pod(p) => p.is_some(),
    };
    found || at.elapsed() < MISS_TTL
}

/// Writes an answer into `identity`.
fn apply(identity: &mut Identity, answer: &Answer) {
    match answer {
        Answer::Container(n) => {
            if let Some(c) = identity.container.as_mut() {
                c.name = n.name.clone().or(c.name.take());
            }
            if let (Some(p), Some((ns, name))) = (identity.pod.as_mut(), &n.pod) {
                p.namespace.get_or_insert_with(|| ns.clone());
                p.name.get_or_insert_with(|| name.clone());
            }
        }
        Answer::Pod(Some((ns, name))) => {
            if let Some(p) = identity.pod.as_mut() {
                p.namespace = Some(ns.clone());
                p.name = Some(name.clone());
            }
        }
        Answer::Pod(None) => {}
    }
}

/// Looks one key up, every source in order.
fn look_up(sources: &Sources, key: &Key) -> Answer {
    match key {
        Key::Container(id, runtime) => {
            let mut names = ContainerNames::default();
            if let Some((pod, namespace, container)) =
                kubelet_container(&sources.container_logs, id)
            {
                names.name = Some(container);
                names.pod = Some((namespace, pod));
                return Answer::Container(names);
            }
            names.name = sources
                .sockets
                .iter()
                .filter(|s| s.exists())
                .find_map(|s| api_name(s, id).ok().flatten())
                .or_else(|| match runtime {
                    Runtime::Docker => docker_state_name(&sources.docker_root, id),
                    _ => sources
                        .storage
                        .iter()
                        .find_map(|root| storage_name(root, id)),
                });
            Answer::Container(names)
        }
        Key::Pod(uid) => Answer::Pod(kubelet_pod(&sources.pod_logs, uid)),
    }
}

/// A container's name from a Docker-API socket: `None` when the runtime
/// does not know the id (another runtime's container).
fn api_name(socket: &Path, id: &str) -> std::io::Result<Option<String>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(SOCKET_TIMEOUT))?;
    s.set_write_timeout(Some(SOCKET_TIMEOUT))?;
    // HTTP/1.0: the server closes after its answer, which is read whole.
    write!(
        s,
        "GET /containers/{id}/json HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    s.take(4 << 20).read_to_end(&mut reply)?;
    Ok(parse_api_reply(&reply))
}

/// The `Name` of a `GET /containers/ID/json` answer (status 200 only),
/// without Docker's leading `/`.
pub fn parse_api_reply(reply: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(reply).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.lines().next()?.split_whitespace().nth(1)?;
    if status != "200" {
        return None;
    }
    docker_name(&serde_json::from_str(body).ok()?)
}

/// The `Name` of a Docker container's JSON (the API's and `config.v2.json`
/// alike), without Docker's leading `/`.
fn docker_name(v: &serde_json::Value) -> Option<String> {
    let name = v.get("Name")?.as_str()?;
    Some(name.trim_start_matches('/').to_string()).filter(|n| !n.is_empty())
}

/// A container's name from containers/storage's `containers.json` files
/// (one per graph driver: `overlay-containers/`, `vfs-containers/`).
fn storage_name(root: &Path, id: &str) -> Option<String> {
    let dirs = std::fs::read_dir(root).ok()?;
    dirs.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-containers"))
        .find_map(|e| {
            let text = std::fs::read_to_string(e.path().join("containers.json")).ok()?;
            parse_storage(&text, id)
        })
}

/// The first name of container `id` in a `containers.json` text.
pub fn parse_storage(text: &str, id: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let entries: Vec<Entry> = serde_json::from_str(text).ok()?;
    entries
        .into_iter()
        .find(|e| e.id == id)
        .and_then(|e| e.names.into_iter().next())
}

/// A container's name from Docker's own state.
fn docker_state_name(root: &Path, id: &str) -> Option<String> {
    let path = root.join("containers").join(id).join("config.v2.json");
    docker_name(&serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?)
}

/// (pod, namespace, container) of a Kubernetes container, from the
/// kubelet's `/var/log/containers` link names.
fn kubelet_container(dir: &Path, id: &str) -> Option<(String, String, String)> {
    let suffix = format!("-{id}.log");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        parse_container_log_name(name.strip_suffix(&suffix)?)
    })
}

/// `POD_NAMESPACE_CONTAINER` (a log link's name without `-ID.log`) split;
/// none of the three may hold `_` (Kubernetes names are DNS labels).
pub fn parse_container_log_name(stem: &str) -> Option<(String, String, String)> {
    let mut parts = stem.splitn(3, '_');
    let (pod, ns, container) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = |s: &str| !s.is_empty() && !s.contains('_');
    (ok(pod) && ok(ns) && ok(container))
        .then(|| (pod.to_string(), ns.to_string(), container.to_string()))
}

/// (namespace, name) of a pod, from `/var/log/pods/NAMESPACE_NAME_UID`.
fn kubelet_pod(dir: &Path, uid: &str) -> Option<(String, String)> {
    let suffix = format!("_{uid}");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let (ns, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
        (!ns.is_empty() && !pod.is_empty() && !pod.contains('_'))
            .then(|| (ns.to_string(), pod.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::identity::{Container, Pod, Qos};

    const ID: &str = "3f1b6c7d2e9a4b8c0d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c";
    const UID: &str = "0a1b2c3d-4e5f-6789-abcd-ef0123456789";

    #[test]
    fn api_replies_give_the_name_only_when_found() {
        let ok = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Id\":\"x\",\"Name\":\"/web-1\"}";
        assert_eq!(parse_api_reply(ok).as_deref(), Some("web-1"));
        let missing = b"HTTP/1.0 404 Not Found\r\n\r\n{\"message\":\"No such container\"}";
        assert_eq!(parse_api_reply(missing), None);
        assert_eq!(parse_api_reply(b"garbage"), None);
        assert_eq!(parse_api_reply(b"HTTP/1.0 200 OK\r\n\r\nnot json"), None);
    }

    #[test]
    fn a_docker_api_socket_is_asked_over_http_1_0() {
        use std::io::BufRead as _;
        let path = std::env::temp_dir().join(format!("tcptrace-api-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        // As Podman 4.3's service answers (checked by hand against it).
        let server = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().expect("accept");
                let mut line = String::new();
                std::io::BufReader::new(&s)
                    .read_line(&mut line)
                    .expect("request");
                let reply = if line.contains(ID) {
                    "HTTP/1.0 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n\r\n\
                     {\"Id\":\"x\",\"Name\":\"/tt-api\"}"
                } else {
                    "HTTP/1.0 404 Not Found\r\n\r\n{\"cause\":\"no such container\"}"
                };
                s.write_all(reply.as_bytes()).expect("reply");
                asked.push(line);
            }
            asked
        });
        assert_eq!(
            api_name(&path, ID).expect("asked").as_deref(),
            Some("tt-api")
        );
        assert_eq!(api_name(&path, "other").expect("asked"), None);
        let asked = server.join().expect("server");
        assert_eq!(asked[0], format!("GET /containers/{ID}/json HTTP/1.0\r\n"));
        let _ = std::fs::remove_file(&path);
        // No socket: an error, and the next source is tried.
        assert!(api_name(&path, ID).is_err());
    }

    #[test]
    fn storage_and_log_names() {
        let json = format!(
            r#"[{{"id":"other","names":["a"]}},{{"id":"{ID}","names":["tt-leaky"],"image":"i"}}]"#
        );
        assert_eq!(parse_storage(&json, ID).as_deref(), Some("tt-leaky"));
        assert_eq!(parse_storage(&json, "nope"), None);
        assert_eq!(parse_storage("{", ID), None);
        assert_eq!(
            parse_container_log_name("orders-7d9f_shop_orders"),
            Some(("orders-7d9f".into(), "shop".into(), "orders".into()))
        );
        assert_eq!(parse_container_log_name("no-underscores"), None);
    }

    #[test]
    fn the_cache_fills_names_from_the_kubelets_logs() {
        let dir = std::env::temp_dir().join(format!("tcptrace-names-{}", std::process::id()));
        let containers = dir.join("containers");
        let pods = dir.join("pods");
        std::fs::create_dir_all(&containers).expect("dir");
        std::fs::create_dir_all(pods.join(format!("shop_orders-7d9f_{UID}"))).expect("dir");
        std::fs::write(
            containers.join(format!("orders-7d9f_shop_orders-{ID}.log")),
            "",
        )
        .expect("log link");
        let names = Names::start(Sources {
            sockets: Vec::new(),
            storage: Vec::new(),
            docker_root: dir.join("docker"),
            container_logs: containers,
            pod_logs: pods,
        })
        .expect("start");
        let mut id = Identity {
            unit: None,
            container: Some(Container {
                id: ID.into(),
                runtime: Runtime::Containerd,
                name: None,
            }),
            pod: Some(Pod {
                uid: UID.into(),
                qos: Qos::Burstable,
                name: None,
                namespace: None,
            }),
        };
        // Not known yet: asked, not waited for.
        let mut first = id.clone();
        let _ = names.fill(&mut first);
        names.fill_waiting(&mut id, Duration::from_secs(5));
        assert_eq!(
            id.container.as_ref().and_then(|c| c.name.as_deref()),
            Some("orders")
        );
        let pod = id.pod.as_ref().expect("pod");
        assert_eq!(
            (pod.namespace.as_deref(), pod.name.as_deref()),
            (Some("shop"), Some("orders-7d9f"))
        );
        // From the cache now.
        let mut again = first.clone();
        if let Some(c) = again.container.as_mut() {
            c.name = None;
        }
        assert!(names.fill(&mut again));
        assert_eq!(
            again.container.and_then(|c| c.name).as_deref(),
            Some("orders")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
