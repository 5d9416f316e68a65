//! The pure core on one core, without root: records decoded per second,
//! transitions through the tracker per second, and whole records through
//! the pipeline in the agent's default mode and with every transition as
//! JSON. `cargo bench -p tcptrace`; regressions show here before they show
//! in `cargo xtask bench`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tcptrace::commands::cli::EventKind;
use tcptrace::engine::clock::WallClock;
use tcptrace::engine::decode::{self, raw};
use tcptrace::engine::filter::Filter;
use tcptrace::engine::tracker::Tracker;
use tcptrace::output::format::Format;
use tcptrace::pipeline::Pipeline;

/// One connection's ten transitions, client and server, as the kernel
/// records them (short IPv4 records where they hold everything) for socket
/// addresses `sk` and `sk + 1`.
fn connection(sk: u64, ts: u64) -> Vec<Vec<u8>> {
    let (client, server) = (raw::CLIENT_LIFE, raw::SERVER_LIFE);
    let lport = (sk % 60_000) as u16 + 1024;
    let mut out = Vec::new();
    for (i, ((co, cn), (so, sn))) in client.into_iter().zip(server).enumerate() {
        let t = ts + i as u64 * 1000;
        out.push(raw::kernel_bytes(&raw::ipv4_state(
            sk,
            t,
            co,
            cn,
            ([127, 0, 0, 1], lport),
            ([127, 0, 0, 1], 80),
        )));
        out.push(raw::kernel_bytes(&raw::ipv4_state(
            sk + 1,
            t,
            so,
            sn,
            ([127, 0, 0, 1], 80),
            ([127, 0, 0, 1], lport),
        )));
    }
    out
}

fn decode_records(c: &mut Criterion) {
    let records = connection(0xffff_8880_0000_0000, 0);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(records.len() as u64));
    g.bench_function("state records", |b| {
        b.iter(|| {
            for r in &records {
                let _ = black_box(decode::decode(black_box(r)));
            }
        });
    });
    g.finish();
}

fn track(c: &mut Criterion) {
    let mut g = c.benchmark_group("tracker");
    g.throughput(Throughput::Elements(10));
    let mut tracker = Tracker::default();
    let mut sk = 0xffff_8880_0000_0000u64;
    g.bench_function("one connection (10 transitions)", |b| {
        b.iter_batched(
            || {
                sk += 4096;
                connection(sk, sk)
                    .iter()
                    .filter_map(|r| match decode::decode(r) {
                        Ok(decode::Record::State(s)) => Some(s),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            },
            |changes| {
                for c in changes {
                    black_box(tracker.on_state(c));
                }
            },
            criterion::BatchSize::SmallInput,
        );
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(10));
    for (name, events) in [
        ("leaks only (default mode)", vec![EventKind::Leak]),
        ("every transition as JSON", vec![EventKind::StateChange]),
    ] {
        let mut p = Pipeline::new(
            Filter::default(),
            Format::Json,
            WallClock::with_offset_ns(0),
            30_000_000_000,
        );
        p.events = events.into_iter().collect();
        let mut sk = 0xffff_8880_0000_0000u64;
        let mut lines = Vec::new();
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    sk += 4096;
                    connection(sk, sk)
                },
                |records| {
                    for r in &records {
                        let _ = p.handle(r, &mut lines);
                    }
                    black_box(lines.len());
                    lines.clear();
                },
                criterion::BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

criterion_group!(benches, decode_records, track, pipeline);
criterion_main!(benches);
