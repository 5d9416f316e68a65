//! The /proc text parsers: an fd link (`socket:[INODE]`), `/proc/PID/cgroup`,
//! `/proc/net/tcp{,6}` and `/proc/PID/stat` (the start time that keys the
//! symbolizer's cache). Each gets the same text and must return, never
//! panic, with results that come from that text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace::host::procfs::{parse_cgroup, parse_net_tcp, socket_inode};
use tcptrace::host::symbolize::parse_start_time;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);

    if socket_inode(&text).is_some() {
        assert!(text.starts_with("socket:[") && text.ends_with(']'));
    }
    if let Some(path) = parse_cgroup(&text) {
        assert!(text.contains(path.as_str()));
    }
    // One row per line at most, the header line never one.
    let rows = parse_net_tcp(&text);
    assert!(rows.len() <= text.lines().count().saturating_sub(1));
    if parse_start_time(&text).is_some() {
        assert!(text.contains(')'));
    }
});
