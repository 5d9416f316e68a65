//! The tracepoint `format` file parser: whatever text tracefs returns,
//! `parse_format` keeps only well-formed fields, and the lookups the agent
//! makes on it (`field`, `offset` with the sizes it accepts) return, never
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace::kernel::tracefs::parse_format;

/// The fields and accepted sizes the agent asks for (layout.rs: the
/// `sock:inet_sock_set_state` record and the syscall exit records).
const LOOKUPS: &[(&str, &[u32])] = &[
    ("skaddr", &[8]),
    ("oldstate", &[4]),
    ("newstate", &[4]),
    ("sport", &[2]),
    ("dport", &[2]),
    ("family", &[2]),
    ("protocol", &[1, 2]),
    ("saddr", &[4]),
    ("daddr", &[4]),
    ("saddr_v6", &[16]),
    ("daddr_v6", &[16]),
    ("ret", &[8]),
    ("fd", &[8]),
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let format = parse_format(&text);
    // A field comes from one line, and has a name.
    assert!(format.fields.len() <= text.lines().count());
    for field in &format.fields {
        assert!(!field.name.is_empty());
        let found = format.field(&field.name).expect("a parsed field is found");
        assert_eq!(found.name, field.name);
    }
    for (name, sizes) in LOOKUPS {
        match format.offset("sock:inet_sock_set_state", name, sizes) {
            Ok(offset) => {
                let field = format.field(name).expect("an offset comes from a field");
                assert_eq!(field.offset, offset);
                assert!(sizes.contains(&field.size));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
