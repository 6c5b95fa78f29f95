//! Criterion benchmarks of kubefim's hot paths: the subtree-keeping BLAKE3 digest against
//! plain BLAKE3 (its overhead must stay near zero), the record chunk codec, a whole scan of a
//! generated tree (per-file overhead: open, fstat, xattrs, read, hash), and loading a policy of
//! many rules (must grow linearly: a duplicate check once compared every pair of rules).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kubefim_baseline::hash::digest_bytes;
use kubefim_baseline::policy::Policy;
use kubefim_baseline::record::{CHUNK_RECORDS, FileRecord, PathRecord, decode_chunk, encode_chunk};
use kubefim_baseline::scan::{Scan, ScanProgress, ScanSink, ScannedEntry};

fn digest(c: &mut Criterion) {
    let mut g = c.benchmark_group("digest");
    for size in [4 << 10, 1 << 20, 16 << 20] {
        let data: Vec<u8> = (0..size).map(|i: usize| u8::try_from(i % 251).expect("below 251")).collect();
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("kubefim_subtrees", size), &data, |b, d| {
            b.iter(|| digest_bytes(black_box(d)))
        });
        g.bench_with_input(BenchmarkId::new("blake3_plain", size), &data, |b, d| b.iter(|| blake3::hash(black_box(d))));
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let record = FileRecord {
        kind: kubefim_baseline::record::FileKind::File,
        size: 1 << 20,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns: 1_700_000_000_000_000_000,
        ctime_ns: 1_700_000_000_000_000_000,
        dev: 2049,
        inode: 123_456,
        nlink: 1,
        link_target: None,
        xattrs: vec![(b"security.capability".to_vec(), vec![1; 20])],
        digest: Some(digest_bytes(&vec![7; 1 << 20])),
        content_stored: false,
        rule: 0,
        error: None,
        flags: Some(0),
    };
    let chunk: Vec<PathRecord> = (0..CHUNK_RECORDS)
        .map(|i| (format!("/usr/lib/x86_64-linux-gnu/lib{i}.so").into_bytes(), record.clone()))
        .collect();
    let bytes = encode_chunk(&chunk);
    c.bench_function("record_chunk_encode", |b| b.iter(|| encode_chunk(black_box(&chunk))));
    c.bench_function("record_chunk_decode", |b| b.iter(|| decode_chunk(black_box(&bytes))));
}

struct Count;
impl ScanSink for Count {
    fn entry(&self, entry: ScannedEntry) {
        black_box(entry);
    }
}

fn scan(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    for d in 0..20 {
        let sub = dir.path().join(format!("d{d}"));
        std::fs::create_dir(&sub).expect("mkdir");
        for f in 0..100 {
            std::fs::write(sub.join(format!("f{f}")), vec![b'x'; 4096 + f * 37]).expect("write");
        }
    }
    let yaml = format!(
        "apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {{name: bench}}\nspec:\n  rules:\n    - path: {}\n",
        dir.path().display()
    );
    let policy = Policy::from_yaml(&yaml, "bench").expect("policy");
    let mut g = c.benchmark_group("scan");
    g.throughput(Throughput::Elements(2021));
    g.bench_function("2000_files_4k", |b| b.iter(|| Scan::whole_policy(&policy).run(&Count, &ScanProgress::default())));
    g.finish();
}

/// A policy of `n` rules, one path each, as big policies are written (one line per rule).
fn policy_of(n: usize) -> String {
    let mut yaml =
        String::from("apiVersion: kubefim.io/v1alpha1\nkind: FimPolicy\nmetadata: {name: big}\nspec:\n  rules:\n");
    for i in 0..n {
        yaml.push_str(&format!("    - path: /srv/app-{:03}/conf-{i}\n", i % 997));
    }
    yaml
}

fn policy_load(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_load");
    g.sample_size(10);
    for n in [8_000, 80_000] {
        let yaml = policy_of(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &yaml, |b, yaml| {
            b.iter(|| Policy::from_yaml(black_box(yaml), "bench").expect("policy"))
        });
    }
    g.finish();
}

criterion_group!(benches, digest, codec, scan, policy_load);
criterion_main!(benches);
