//! The kernel BTF reader: whatever `/sys/kernel/btf/vmlinux` holds, `parse`
//! returns a `Btf` or an error, and every member lookup the agent makes
//! (layout.rs) returns, never panics or loops without end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace::kernel::btf::Btf;

/// The lookups of layout.rs, plus the short names the seed blob defines.
const LOOKUPS: &[(&str, &[&str])] = &[
    ("sock", &["__sk_common", "skc_net", "net"]),
    ("net", &["ns", "inum"]),
    ("sock", &["sk_protocol"]),
    ("sock", &["__sk_common", "skc_family"]),
    ("sock", &["__sk_common", "skc_num"]),
    ("inet_sock", &["inet_sport"]),
    ("sock", &["__sk_common", "skc_dport"]),
    ("sock", &["__sk_common", "skc_rcv_saddr"]),
    ("sock", &["__sk_common", "skc_daddr"]),
    ("sock", &["__sk_common", "skc_v6_rcv_saddr"]),
    ("sock", &["__sk_common", "skc_v6_daddr"]),
    ("sock", &["sk_socket"]),
    ("socket_alloc", &["vfs_inode"]),
    ("inode", &["i_ino"]),
    ("task_struct", &["files"]),
    ("files_struct", &["fdt"]),
    ("fdtable", &["max_fds"]),
    ("fdtable", &["fd"]),
    ("file", &["private_data"]),
    ("socket", &["sk"]),
    ("sock_common", &["skc_rcv_saddr"]),
    ("sock", &["sk_val"]),
    ("possible_net_t", &["net"]),
    ("loop", &["x"]),
    ("holder", &["x", "y"]),
];

fuzz_target!(|data: &[u8]| {
    match Btf::parse(data) {
        Ok(btf) => {
            for (ty, path) in LOOKUPS {
                if let Err(e) = btf.member_offset(ty, path) {
                    let _ = e.to_string();
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
