//! A JSON object written field by field into one `String`, for the line
//! printed on every transition (up to a million a second with
//! `--events state-change`): integers through `itoa`, IPv4 addresses octet
//! by octet, the timestamp's date and time formatted once per second, and
//! strings escaped exactly as serde_json escapes them (so every line has
//! the same bytes the serde-derived events would have).
//!
//! Why by hand, not serde_json: this is the agent's hot path (a line per
//! transition), and writing field by field into one reused `String` builds
//! no struct or value per line; the rarer events still go through
//! serde_json, and the tests hold the two to the same bytes.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

/// One JSON object under construction; [`JsonLine::finish`] closes it.
pub struct JsonLine {
    out: String,
    first: bool,
}

impl JsonLine {
    /// An empty object with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut out = String::with_capacity(capacity);
        out.push('{');
        Self { out, first: true }
    }

    /// Starts the member `name` (a plain ASCII key: never escaped).
    fn key(&mut self, name: &str) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(name);
        self.out.push_str("\":");
        &mut self.out
    }

    /// An unsigned integer member.
    pub fn u64(&mut self, name: &str, v: u64) -> &mut Self {
        let mut b = itoa::Buffer::new();
        self.key(name).push_str(b.format(v));
        self
    }

    /// A signed integer member.
    pub fn i64(&mut self, name: &str, v: i64) -> &mut Self {
        let mut b = itoa::Buffer::new();
        self.key(name).push_str(b.format(v));
        self
    }

    /// An unsigned integer member, or null.
    pub fn opt_u64(&mut self, name: &str, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u64(name, v),
            None => self.null(name),
        }
    }

    /// A signed integer member, or null.
    pub fn opt_i64(&mut self, name: &str, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.i64(name, v),
            None => self.null(name),
        }
    }

    /// A null member.
    pub fn null(&mut self, name: &str) -> &mut Self {
        self.key(name).push_str("null");
        self
    }

    /// A string member, escaped.
    pub fn str(&mut self, name: &str, v: &str) -> &mut Self {
        escape_into(self.key(name), v);
        self
    }

    /// A string member, or null.
    pub fn opt_str(&mut self, name: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.str(name, v),
            None => self.null(name),
        }
    }

    /// A number with serde_json's float formatting (null when not finite).
    pub fn opt_f64(&mut self, name: &str, v: Option<f64>) -> &mut Self {
        let out = self.key(name);
        match v.filter(|v| v.is_finite()) {
            Some(v) => {
                // One float per line: serde_json's own formatter, through a
                // small stack buffer, keeps the bytes identical.
                let mut buf = [0u8; 40];
                let mut rest = &mut buf[..];
                let written = serde_json::to_writer(&mut rest, &v)
                    .ok()
                    .map(|()| 40 - rest.len());
                match written.and_then(|n| std::str::from_utf8(&buf[..n]).ok()) {
                    Some(s) => out.push_str(s),
                    None => out.push_str("null"),
                }
            }
            None => out.push_str("null"),
        }
        self
    }

    /// An IP address as a string.
    pub fn ip(&mut self, name: &str, v: IpAddr) -> &mut Self {
        let out = self.key(name);
        out.push('"');
        match v {
            IpAddr::V4(a) => {
                let mut b = itoa::Buffer::new();
                for (i, octet) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push('.');
                    }
                    out.push_str(b.format(octet));
                }
            }
            // Zero compression rules: std's formatting, as serde would.
            IpAddr::V6(a) => {
                let _ = write!(out, "{a}");
            }
        }
        out.push('"');
        self
    }

    /// A kernel address as lower-case hex, as a string.
    pub fn hex(&mut self, name: &str, v: u64) -> &mut Self {
        let _ = write!(self.key(name), "\"{v:x}\"");
        self
    }

    /// `t` as RFC 3339 UTC with microseconds, as a string.
    pub fn rfc3339_micros(&mut self, name: &str, t: SystemTime) -> &mut Self {
        let out = self.key(name);
        out.push('"');
        push_rfc3339_micros(out, t);
        out.push('"');
        self
    }

    /// The finished line.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

thread_local! {
    /// The last second formatted: (unix seconds, `YYYY-MM-DDTHH:MM:SS`).
    static LAST_SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// Appends `2026-11-24T19:00:00.123456Z`, as
/// `humantime::format_rfc3339_micros` writes it; the date and time of day
/// are formatted once per second.
fn push_rfc3339_micros(out: &mut String, t: SystemTime) {
    let Ok(since) = t.duration_since(UNIX_EPOCH) else {
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(t));
        return;
    };
    let secs = since.as_secs();
    LAST_SECOND.with(|cache| {
        let mut cache = cache.borrow_mut();
        if cache.0 != secs {
            let whole = UNIX_EPOCH + std::time::Duration::from_secs(secs);
            // `...SSZ` without fractional digits: keep all but the `Z`.
            let s = humantime::format_rfc3339_seconds(whole).to_string();
            cache.1 = s.trim_end_matches('Z').to_string();
            cache.0 = secs;
        }
        out.push_str(&cache.1);
    });
    let micros = since.subsec_micros();
    let mut b = itoa::Buffer::new();
    let digits = b.format(micros);
    out.push('.');
    for _ in digits.len()..6 {
        out.push('0');
    }
    out.push_str(digits);
    out.push('Z');
}

/// Appends `s` as a JSON string, escaped as serde_json's compact
/// formatter does: `"` and `\`, the short forms `\b \f \n \r \t`, and
/// `\u00xx` (lower-case hex) for the other control characters.
fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x0c => "\\f",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_does() {
        let mut samples: Vec<String> = (0u8..=0x7f).map(|b| char::from(b).to_string()).collect();
        samples.extend(
            [
                "",
                "plain",
                "a\"b\\c",
                "tab\there",
                "é日本\u{1f600}",
                "\u{7f}\u{80}",
                "x\u{0}y",
            ]
            .map(String::from),
        );
        for s in samples {
            let mut out = String::new();
            escape_into(&mut out, &s);
            assert_eq!(out, serde_json::to_string(&s).expect("json"), "{s:?}");
        }
    }

    #[test]
    fn numbers_addresses_and_times_match_serde_and_humantime() {
        let mut line = JsonLine::with_capacity(64);
        line.u64("a", u64::MAX)
            .i64("b", -3)
            .opt_u64("c", None)
            .opt_f64("d", Some(1.235))
            .opt_f64("e", Some(2.0))
            .opt_f64("f", Some(f64::NAN))
            .ip("g", "10.0.255.3".parse().expect("ip"))
            .ip("h", "fe80::1:2".parse().expect("ip"))
            .hex("i", 0xffff_8881_0abc_d000)
            .opt_str("j", Some("q\""));
        let v: serde_json::Value = serde_json::from_str(&line.finish()).expect("valid JSON");
        let expected = serde_json::json!({
            "a": u64::MAX, "b": -3, "c": null, "d": 1.235, "e": 2.0, "f": null,
            "g": "10.0.255.3", "h": "fe80::1:2", "i": "ffff88810abcd000", "j": "q\"",
        });
        assert_eq!(v, expected);
        let mut line = JsonLine::with_capacity(8);
        line.opt_f64("e", Some(2.0));
        assert_eq!(line.finish(), r#"{"e":2.0}"#, "floats keep serde's form");

        for micros in [0u64, 7, 123_456, 999_999, 1_764_010_800_123_456] {
            for offset in [0u64, 1, 59_999_999] {
                let t = UNIX_EPOCH + Duration::from_micros(micros + offset);
                let mut out = String::new();
                push_rfc3339_micros(&mut out, t);
                assert_eq!(out, humantime::format_rfc3339_micros(t).to_string());
            }
        }
    }
}
