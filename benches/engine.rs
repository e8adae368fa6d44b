//! Micro-benchmarks of the envelope engine's hot paths: ciphertext parsing, seal/open under a cached
//! local KEK, and whole Engine::encrypt/decrypt/status calls with the in-memory backend (no gRPC).
//!
//! Run: `cargo bench --bench engine` (or `make bench-engine`).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kms_plugin::backend::memory::MemoryBackend;
use kms_plugin::backend::Backend;
use kms_plugin::engine::kek::{digest_of, LocalKek};
use kms_plugin::engine::{format, Api, Binding, Engine, EngineConfig};

const KEY_ID: &str = "memory:bench-key@1";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn kek_and_ciphertext(rt: &tokio::runtime::Runtime) -> (LocalKek, Vec<u8>) {
    let backend = MemoryBackend::new("bench-key");
    let secret = LocalKek::generate_secret();
    let wrapped = rt.block_on(backend.wrap(&secret[..])).expect("wrap");
    let kek = LocalKek::new(&secret[..], &wrapped, KEY_ID.into()).expect("kek");
    let ct = kek.seal(&[7u8; 32], Binding::V2 { key_id: KEY_ID });
    (kek, ct)
}

fn local_kek(c: &mut Criterion) {
    let rt = runtime();
    let (kek, ct) = kek_and_ciphertext(&rt);
    let mut g = c.benchmark_group("local_kek");
    g.throughput(Throughput::Elements(1));
    g.bench_function("parse", |b| {
        b.iter(|| format::parse(black_box(&ct)).unwrap())
    });
    g.bench_function("cache_digest", |b| {
        let p = format::parse(&ct).unwrap();
        b.iter(|| digest_of(black_box(p.key_ref), black_box(p.wrapped)))
    });
    g.bench_function("seal_32B_v2", |b| {
        b.iter(|| kek.seal(black_box(&[7u8; 32]), Binding::V2 { key_id: KEY_ID }))
    });
    g.bench_function("open_32B_v2", |b| {
        b.iter(|| {
            let p = format::parse(black_box(&ct)).unwrap();
            kek.open(&p, Binding::V2 { key_id: KEY_ID }).unwrap()
        })
    });
    g.finish();
}

/// Same-run A/B of the KEK cache hit path: keyed by a SHA-256 digest of the wrapped KEK (before) or by
/// the ciphertext header bytes (now). A 1000-entry cache, like the default `--kek-cache-size`.
fn cache_lookup(c: &mut Criterion) {
    let rt = runtime();
    let (kek, ct) = kek_and_ciphertext(&rt);
    let p = format::parse(&ct).unwrap();
    let by_digest: quick_cache::sync::Cache<[u8; 32], u64> = quick_cache::sync::Cache::new(1000);
    let by_header: quick_cache::sync::Cache<Box<[u8]>, u64> = quick_cache::sync::Cache::new(1000);
    for i in 0..999u64 {
        let mut fake = p.header.to_vec();
        fake.extend_from_slice(&i.to_be_bytes());
        by_digest.insert(digest_of("other", &fake), i);
        by_header.insert(fake.into(), i);
    }
    by_digest.insert(*kek.digest(), 1);
    by_header.insert(p.header.into(), 1);
    let mut g = c.benchmark_group("cache_hit");
    g.bench_function("sha256_digest_key", |b| {
        b.iter(|| {
            let p = format::parse(black_box(&ct)).unwrap();
            by_digest.get(&digest_of(p.key_ref, p.wrapped)).unwrap()
        })
    });
    g.bench_function("header_key", |b| {
        b.iter(|| {
            let p = format::parse(black_box(&ct)).unwrap();
            by_header.get(p.header).unwrap()
        })
    });
    g.finish();
}

fn engine(c: &mut Criterion) {
    let rt = runtime();
    let backend = Arc::new(MemoryBackend::new("bench-key"));
    let engine = Engine::new(backend, EngineConfig::default());
    rt.block_on(engine.probe(true)).expect("probe");
    let sealed = rt.block_on(engine.encrypt(&[9u8; 32], Api::V2)).unwrap();
    let v1 = rt.block_on(engine.encrypt(&[9u8; 32], Api::V1)).unwrap();
    let key_id = sealed.key_id.clone();

    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(1));
    g.bench_function("status", |b| b.iter(|| black_box(engine.status())));
    g.bench_function("decrypt_v2_cached", |b| {
        b.iter(|| {
            rt.block_on(engine.decrypt(
                black_box(&sealed.ciphertext),
                Binding::V2 { key_id: &key_id },
            ))
            .unwrap()
        })
    });
    g.bench_function("decrypt_v1_cached", |b| {
        b.iter(|| {
            rt.block_on(engine.decrypt(black_box(&v1.ciphertext), Binding::V1))
                .unwrap()
        })
    });
    g.bench_function("encrypt_v2", |b| {
        b.iter(|| {
            rt.block_on(engine.encrypt(black_box(&[9u8; 32]), Api::V2))
                .unwrap()
        })
    });
    g.bench_function("encrypt_v1", |b| {
        b.iter(|| {
            rt.block_on(engine.encrypt(black_box(&[9u8; 32]), Api::V1))
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, local_kek, cache_lookup, engine);
criterion_main!(benches);
