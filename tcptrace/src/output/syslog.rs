//! RFC 5424 syslog messages carrying the JSON line as the message. Pure.

use std::time::SystemTime;

/// `daemon`: the facility of system daemons.
pub const FACILITY_DAEMON: u8 = 3;

/// Severity of an event: leaks, lost records and port pressure are
/// warnings, a leak that ended is a notice, everything else is info.
pub fn severity(event: Option<&str>) -> u8 {
    match event {
        Some("leak" | "leak_group" | "lost" | "port_pressure") => 4,
        Some("leak_end") => 5,
        _ => 6,
    }
}

/// The `event` field of a JSON line, found without parsing it all.
pub fn event_of(line: &str) -> Option<&str> {
    let rest = line.split_once("\"event\":\"")?.1;
    rest.split_once('"').map(|(e, _)| e)
}

/// The machine's host name, for the HOSTNAME field (`-` when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
        .unwrap_or_else(|| "-".to_string())
}

/// `<PRI>1 TIMESTAMP HOSTNAME tcptrace PROCID MSGID - MSG`, MSGID being the
/// event name.
pub fn format(line: &str, facility: u8, host: &str, pid: u32, now: SystemTime) -> String {
    let event = event_of(line);
    let pri = u16::from(facility) * 8 + u16::from(severity(event));
    let msgid = event
        .filter(|e| !e.is_empty() && e.len() <= 32 && e.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("-");
    format!(
        "<{pri}>1 {} {host} tcptrace {pid} {msgid} - {line}",
        humantime::format_rfc3339_micros(now)
    )
}

/// TCP framing (RFC 6587 octet counting): `LEN SP MSG`.
pub fn octet_counted(msg: &str) -> String {
    format!("{} {msg}", msg.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn leak_is_a_warning_with_the_json_intact() {
        let json = r#"{"schema":1,"event":"leak","message":"a \"quoted\" b"}"#;
        let at = UNIX_EPOCH + Duration::from_secs(1_764_010_800);
        let m = format(json, FACILITY_DAEMON, "host1", 42, at);
        assert_eq!(
            m,
            format!("<28>1 2025-11-24T19:00:00.000000Z host1 tcptrace 42 leak - {json}")
        );
        assert_eq!(octet_counted("abc"), "3 abc");
    }

    #[test]
    fn severities_and_event_names() {
        assert_eq!(
            event_of(r#"{"event":"state_change"}"#),
            Some("state_change")
        );
        assert_eq!(event_of("TEXT LINE"), None);
        assert_eq!(severity(Some("state_change")), 6);
        assert_eq!(severity(Some("leak_end")), 5);
        assert_eq!(severity(None), 6);
        let m = format("plain text", FACILITY_DAEMON, "h", 1, UNIX_EPOCH);
        assert!(
            m.starts_with("<30>1 ") && m.contains(" tcptrace 1 - - plain text"),
            "{m}"
        );
    }
}
