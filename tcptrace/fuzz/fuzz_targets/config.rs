//! The `--config` file parser: whatever the file holds (TOML or not, known
//! keys with any values), `config::parse` returns settings or an error that
//! names a line of the file, never panics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tcptrace::commands::config::parse;

/// Whether the file sets `metrics` to anything but a boolean. Its value
/// parser resolves a hostname (`metrics = "somehost"`), and a fuzzer must
/// not send the machine's resolver a query per input; every other option
/// is parsed without I/O. The same TOML parser as tcptrace's decides.
fn sets_a_metrics_address(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return false; // tcptrace's parse stops at the TOML error too
    };
    table
        .iter()
        .any(|(key, value)| key.replace('_', "-") == "metrics" && !value.is_bool())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // a config file is read with read_to_string: UTF-8 only
    };
    if sets_a_metrics_address(text) {
        return;
    }
    let last_line = text.matches('\n').count() + 1;
    match parse(Path::new("fuzz.toml"), text) {
        Ok(settings) => {
            for s in &settings {
                assert!((1..=last_line).contains(&s.line), "{s:?}");
                assert!(!s.name.is_empty());
            }
        }
        Err(e) => {
            if let Some(line) = e.line {
                assert!((1..=last_line).contains(&line), "{e}");
            }
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }
});
