//! The NETLINK_SOCK_DIAG reply parser: whatever one `recv` returns (the
//! kernel's messages, cut anywhere, or garbage), `parse_messages` returns
//! sockets or an error, never panics, and finds no more sockets than the
//! bytes can hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace::host::sockdiag::parse_messages;

/// `struct nlmsghdr` plus `struct inet_diag_msg`: the least one socket takes.
const LEAST_PER_SOCKET: usize = 16 + 72;

fuzz_target!(|data: &[u8]| {
    match parse_messages(data) {
        Ok((sockets, _done)) => {
            assert!(sockets.len() * LEAST_PER_SOCKET <= data.len());
            for s in &sockets {
                let _ = s.is_time_wait_bucket();
                // One family per socket: both addresses are v4 or both v6.
                assert_eq!(s.laddr.is_ipv4(), s.raddr.is_ipv4());
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
