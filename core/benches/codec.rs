//! Encode and decode throughput of both codecs: a 16 KiB DATA frame and small
//! control frames. Figures go to docs/performance.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nowconnect_core::codec::{v1, v2};
use nowconnect_core::{Cid, Epoch, Frame, Limits, MeshHeader};

fn frames() -> (Frame, Vec<Frame>) {
    let data = Frame::Data {
        cid: Cid(42),
        seq: 7,
        payload: Bytes::from((0..16384).map(|i| (i % 251) as u8).collect::<Vec<u8>>()),
    };
    let h = MeshHeader {
        cid: Cid(42),
        connector: "ldap".into(),
        agent_id: "agent-1".into(),
        seq: 7,
        epoch: Epoch(3),
    };
    let small = vec![
        Frame::Credit {
            cid: Cid(42),
            bytes: 65536,
        },
        Frame::Fin {
            cid: Cid(42),
            seq: Some(9),
        },
        Frame::Ping { nonce: 1 },
        Frame::MCredit { h, bytes: 65536 },
    ];
    (data, small)
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let (data, small) = frames();

    let mut g = c.benchmark_group("data_16k");
    g.throughput(Throughput::Bytes(16384));
    let enc2 = v2::encode(&data, &limits).unwrap();
    let enc1 = v1::encode(&data, &limits).unwrap();
    g.bench_function("v2_encode", |b| {
        b.iter(|| v2::encode(black_box(&data), &limits).unwrap())
    });
    g.bench_function("v2_decode", |b| {
        b.iter(|| v2::decode(black_box(&enc2), &limits).unwrap())
    });
    g.bench_function("v1_encode", |b| {
        b.iter(|| v1::encode(black_box(&data), &limits).unwrap())
    });
    g.bench_function("v1_decode", |b| {
        b.iter(|| v1::decode(black_box(&enc1), &limits).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("small_frames");
    g.throughput(Throughput::Elements(small.len() as u64));
    let enc2: Vec<Bytes> = small
        .iter()
        .map(|f| v2::encode(f, &limits).unwrap())
        .collect();
    let enc1: Vec<String> = small
        .iter()
        .map(|f| v1::encode(f, &limits).unwrap())
        .collect();
    g.bench_function("v2_encode", |b| {
        b.iter(|| {
            for f in &small {
                black_box(v2::encode(black_box(f), &limits).unwrap());
            }
        })
    });
    g.bench_function("v2_decode", |b| {
        b.iter(|| {
            for m in &enc2 {
                black_box(v2::decode(black_box(m), &limits).unwrap());
            }
        })
    });
    g.bench_function("v1_encode", |b| {
        b.iter(|| {
            for f in &small {
                black_box(v1::encode(black_box(f), &limits).unwrap());
            }
        })
    });
    g.bench_function("v1_decode", |b| {
        b.iter(|| {
            for m in &enc1 {
                black_box(v1::decode(black_box(m), &limits).unwrap());
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
