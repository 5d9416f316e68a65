//! The ring-buffer record decoder: whatever bytes the ring hands over (a
//! record of any kind, a batch of short records, garbage), `decode`,
//! `decode_each` and `split_timed` return, never panic, and agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tcptrace::engine::decode::{decode, decode_each, split_timed, Record};
use tcptrace_common::{RECORD_STATE_BATCH, STAGED_RECORDS};

/// The kernel time a decoded record carries.
fn time_of(record: &Record) -> u64 {
    match record {
        Record::State(change) => change.ts_ns,
        Record::Accept(accept) => accept.ts_ns,
        Record::Reset(reset) => reset.ts_ns,
    }
}

fuzz_target!(|data: &[u8]| {
    let single = decode(data);
    let is_batch = data.get(..4) == Some(&RECORD_STATE_BATCH.to_ne_bytes()[..]);

    let mut each = Vec::new();
    let each_result = decode_each(data, |r| each.push(r));
    if !is_batch {
        // Not a batch: decode_each is decode.
        assert_eq!(each_result.is_ok(), single.is_ok());
        assert_eq!(each.len(), usize::from(single.is_ok()));
    } else {
        // A batch holds at most STAGED_RECORDS records of 64 bytes after its
        // 8-byte header: never more records than the bytes given can hold.
        assert!(each.len() <= STAGED_RECORDS);
        assert!(each.is_empty() || 8 + each.len() * 64 <= data.len());
    }

    // split_timed hands on pieces of `data` (never more bytes than given),
    // each with the time its record decodes to.
    let base = data.as_ptr() as usize;
    let mut pieces = 0usize;
    let mut bytes = 0usize;
    let mut decoded = Vec::new();
    let split = split_timed(data, |ts, raw| {
        let start = raw.as_ptr() as usize;
        assert!(start >= base && start + raw.len() <= base + data.len());
        pieces += 1;
        bytes += raw.len();
        if let Ok(record) = decode(raw) {
            assert_eq!(time_of(&record), ts, "split_timed's time is the record's");
            decoded.push(record);
        }
    });
    assert!(bytes <= data.len());
    assert!(pieces <= STAGED_RECORDS.max(1));
    // Holding records and decoding them later gives what decoding at once
    // gives: the same good records, in the same order; a batch split_timed
    // rejects (its header, or a record of another kind) is one decode_each
    // rejects too.
    assert_eq!(decoded, each);
    if split.is_err() {
        assert!(is_batch && each_result.is_err());
    }
});
