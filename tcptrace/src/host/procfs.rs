//! Who holds a socket, read from /proc the way `ss -p` does: every
//! process whose fd table has a `socket:[INODE]` link. Done only for leak
//! candidates, in one pass over /proc for all of them.
//!
//! Inodes are global, so this works for sockets in any network namespace;
//! the receive queue is read from `/proc/PID/net/tcp{,6}` of a holder, which
//! shows that holder's namespace.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use crate::engine::identity::Identity;
use crate::engine::leak::Holder;

/// `socket:[12345]` -> 12345.
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The cgroup path from the text of `/proc/PID/cgroup`.
pub fn parse_cgroup(text: &str) -> Option<String> {
    let paths: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let id = parts.next()?;
            let _controllers = parts.next()?;
            Some((id, parts.next()?))
        })
        .collect();
    // The unified (v2) path, unless a hybrid host leaves it at the root
    // while the v1 hierarchies place the process (cgroupfs drivers on
    // hybrid hosts do); then systemd's own hierarchy, then any v1 one.
    let unified = paths.iter().find(|(id, _)| *id == "0");
    let placed = |(_, path): &&(&str, &str)| *path != "/";
    unified
        .filter(placed)
        .or_else(|| paths.iter().filter(placed).find(|(_, p)| !p.is_empty()))
        .or(unified)
        .or_else(|| paths.first())
        .map(|(_, path)| path.to_string())
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Whether process `pid` exists (a signal 0, which touches no file).
pub fn is_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The name of thread `tid` of process `tgid` (what the kernel's `comm`
/// was at the call), empty once it has exited.
pub fn thread_comm(tgid: u32, tid: u32) -> String {
    read_trimmed(&Path::new("/proc").join(format!("{tgid}/task/{tid}/comm"))).unwrap_or_default()
}

/// Finds every holder of every inode in `inodes`, in one scan of /proc.
/// Processes that exit during the scan are skipped.
pub fn holders(inodes: &HashSet<u64>) -> HashMap<u64, Vec<Holder>> {
    holders_under(Path::new("/proc"), inodes)
}

/// [`holders`] with another procfs root (tests).
pub fn holders_under(proc_root: &Path, inodes: &HashSet<u64>) -> HashMap<u64, Vec<Holder>> {
    let mut found: HashMap<u64, Vec<Holder>> = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(entries) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        let mut mine: Vec<(u64, i32)> = Vec::new();
        for fd in fds.flatten() {
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Some(ino) = fs::read_link(fd.path())
                .ok()
                .and_then(|l| l.to_str().and_then(socket_inode))
            else {
                continue;
            };
            if inodes.contains(&ino) {
                mine.push((ino, n));
            }
        }
        if mine.is_empty() {
            continue;
        }
        // Only now pay for the per-process details.
        let comm = read_trimmed(&dir.join("comm")).unwrap_or_default();
        let exe = fs::read_link(dir.join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cgroup = fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|t| parse_cgroup(&t));
        let identity = cgroup
            .as_deref()
            .map(Identity::from_cgroup)
            .unwrap_or_default();
        for (ino, fd) in mine {
            found.entry(ino).or_default().push(Holder {
                pid,
                comm: comm.clone(),
                fd,
                exe: exe.clone(),
                cgroup: cgroup.clone(),
                identity: identity.clone(),
            });
        }
    }
    for list in found.values_mut() {
        list.sort_by_key(|h| (h.pid, h.fd));
    }
    found
}

/// One row of `/proc/net/tcp{,6}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpRow {
    /// Kernel state number (`8` is CLOSE_WAIT).
    pub state: u8,
    /// Bytes (and the FIN, which counts one) received but not read.
    pub rx_queue: u64,
    /// Socket inode; 0 for orphans.
    pub inode: u64,
}

/// Parses the rows of a `/proc/net/tcp` or `tcp6` file (header skipped,
/// malformed rows ignored).
pub fn parse_net_tcp(text: &str) -> Vec<TcpRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let rx = f.get(4)?.split(':').nth(1)?;
            let rx_queue = u64::from_str_radix(rx, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some(TcpRow {
                state,
                rx_queue,
                inode,
            })
        })
        .collect()
}

/// Receive queues by socket inode, as seen from process `pid`'s network
/// namespace: what the program has not read (a received FIN counts one).
pub fn recv_queues(pid: u32) -> HashMap<u64, u64> {
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|file| fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok())
        .flat_map(|text| parse_net_tcp(&text))
        .filter(|r| r.inode != 0)
        .map(|r| (r.inode, r.rx_queue))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn parses_links_and_cgroups() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
        assert_eq!(
            parse_cgroup("0::/system.slice/orders.service\n").as_deref(),
            Some("/system.slice/orders.service")
        );
        assert_eq!(
            parse_cgroup("12:pids:/kubepods/pod1\n1:name=systemd:/x\n").as_deref(),
            Some("/kubepods/pod1")
        );
        assert_eq!(parse_cgroup(""), None);
        // A hybrid host whose unified hierarchy leaves the process at its
        // root: the v1 hierarchies say where it is.
        assert_eq!(
            parse_cgroup(
                "9:name=systemd:/libpod_parent/libpod-x\n4:memory:/libpod_parent/libpod-x\n0::/\n"
            )
            .as_deref(),
            Some("/libpod_parent/libpod-x")
        );
        assert_eq!(
            parse_cgroup("1:name=systemd:/\n0::/\n").as_deref(),
            Some("/")
        );
    }

    #[test]
    fn parses_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 0100007F:A0B2 08 00000000:00000001 00:00000000 00000000     0        0 31337 1 0000000000000000 20 4 30 10 -1\n garbage\n";
        assert_eq!(
            parse_net_tcp(text),
            vec![TcpRow {
                state: 8,
                rx_queue: 1,
                inode: 31337
            }]
        );
    }

    #[test]
    fn finds_this_process_as_holder_of_its_own_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let link = fs::read_link(format!("/proc/self/fd/{}", client.as_raw_fd())).expect("link");
        let ino = socket_inode(&link.to_string_lossy()).expect("socket link");
        let found = holders(&[ino].into());
        let list = &found[&ino];
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].pid, std::process::id());
        assert_eq!(list[0].fd, client.as_raw_fd());
        assert!(list[0].exe.is_some());
        assert_eq!(recv_queues(std::process::id()).get(&ino), Some(&0));
        // Sanity: the same inode as fstat reports.
        let meta = fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd())).expect("stat");
        assert_eq!(meta.ino(), ino);
    }
}
