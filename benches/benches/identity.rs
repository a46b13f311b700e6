//! `SpiffeId::parse`: runs on every handshake and every policy principal.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use std::hint::black_box;

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("spiffe_id_parse");
    for id in meshkit_benches::SAMPLE_IDS {
        group.throughput(Throughput::Bytes(id.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(id.len()), id, |b, id| {
            b.iter(|| SpiffeId::parse(black_box(id)))
        });
    }
    // Baseline in the same run: copying the string into an Arc<str>, the allocation parse cannot avoid.
    group.bench_function("baseline_arc_str_copy", |b| {
        b.iter(|| std::sync::Arc::<str>::from(black_box(meshkit_benches::SAMPLE_IDS[0])))
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
