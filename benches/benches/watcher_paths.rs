//! Criterion benchmarks of the watcher's hot paths, on its real types (through
//! `kubefim_watcher::bench`, the `bench` feature): decoding a ring-buffer record into a
//! `KernelEvent` (every event pays it), the debounce queue (every event on a monitored path
//! is noted there; a storm is taken out in one go), and the baseline index's lookups (an
//! inode event asks which paths have that inode; a path event, which entry a path is).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::SystemTime;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kubefim_common::{EVENT_HAS_PATHS, EVENT_HAS_TARGET, EventHeader, InodeKey, Op, PATH_CAP, PathEvent};
use kubefim_watcher::bench::{BaselineIndex, DebounceQueue, FileOp};
use kubefim_watcher::kernel::KernelEvent;

fn header(op: Op, flags: u32) -> EventHeader {
    EventHeader {
        op: op as u32,
        flags,
        pid: 4242,
        tid: 4242,
        ppid: 1,
        uid: 0,
        gid: 0,
        arg: 0,
        cgroup_id: 7,
        time_ns: 1_000_000,
        target: InodeKey { dev: 2049, ino: 123_456 },
        parent: InodeKey::default(),
        start: [InodeKey::default(); 2],
        dirfd: [-100; 2],
        comm: *b"bench\0\0\0\0\0\0\0\0\0\0\0",
        mnt_ns: 4_026_531_841,
        _reserved: 0,
    }
}

/// The bytes of a `#[repr(C)]` record as the ring buffer holds them.
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: T is one of common's #[repr(C)] event structs, plain data with no padding
    // (common asserts their sizes); reading its bytes is what the kernel side's output is.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn event_decode(c: &mut Criterion) {
    let write = bytes_of(&header(Op::Write, EVENT_HAS_TARGET));
    let mut paths = [[0u8; PATH_CAP]; 2];
    for (slot, path) in paths.iter_mut().zip([&b"/etc/ssh/sshd_config.tmp"[..], b"/etc/ssh/sshd_config"]) {
        slot[..path.len()].copy_from_slice(path);
    }
    let rename = bytes_of(&PathEvent { header: header(Op::Rename, EVENT_HAS_PATHS), paths });
    let mut g = c.benchmark_group("event_decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("inode_event_write", |b| b.iter(|| KernelEvent::decode(black_box(&write))));
    g.bench_function("path_event_rename", |b| b.iter(|| KernelEvent::decode(black_box(&rename))));
    g.finish();
}

fn loop_paths(n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| PathBuf::from(format!("/var/tmp/kubefim-bench/tree/loop/f{i:05}"))).collect()
}

fn debounce(c: &mut Criterion) {
    let mut g = c.benchmark_group("debounce");
    let now = SystemTime::now();
    // The loop workload's steady state: writes and closes round-robin over 200 pending paths.
    let paths = loop_paths(200);
    let mut queue = DebounceQueue::new(4242);
    let mut i = 0usize;
    g.throughput(Throughput::Elements(1));
    g.bench_function("note_write_close_200_paths", |b| {
        b.iter(|| {
            let path = &paths[i % paths.len()];
            queue.note(black_box(path), Some(FileOp::Write), false, now);
            queue.note(black_box(path), None, true, now);
            i += 1;
            queue.next_due()
        })
    });
    // A storm over many paths, then everything taken at once (as at a due time).
    for n in [1_000, 20_000] {
        let paths = loop_paths(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("storm_then_take_due", n), &paths, |b, paths| {
            b.iter_batched_ref(
                || DebounceQueue::new(4242),
                |queue| {
                    for path in paths {
                        queue.note(path, Some(FileOp::Write), false, now);
                        queue.note(path, None, true, now);
                    }
                    queue.take_due(true)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn index(c: &mut Criterion) {
    // A baseline of 100 directories of 1,000 files (100,101 entries with / and the root).
    let mut paths = Vec::new();
    for d in 0..100u64 {
        paths.push((format!("/srv/tree/d{d:04}").into_bytes(), InodeKey { dev: 2049, ino: 1_000_000 + d }, true));
        for f in 0..1000u64 {
            paths.push((
                format!("/srv/tree/d{d:04}/f{f:04}").into_bytes(),
                InodeKey { dev: 2049, ino: d * 1000 + f },
                false,
            ));
        }
    }
    let index = BaselineIndex::build(paths.iter().map(|(p, k, d)| (p.as_slice(), *k, *d)));
    let probes: Vec<u64> = (0..1024u64).map(|i| (i * 7919) % 100_000).collect();
    let lookups: Vec<PathBuf> =
        probes.iter().map(|i| PathBuf::from(format!("/srv/tree/d{:04}/f{:04}", i / 1000, i % 1000))).collect();
    let mut g = c.benchmark_group("index_100k");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("paths_of_inode_hit", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            index.paths_of_inode(black_box(InodeKey { dev: 2049, ino: probes[i] }))
        })
    });
    // The common case on a node: an inode the baseline does not have.
    g.bench_function("paths_of_inode_miss", |b| {
        b.iter(|| {
            i = (i + 1) % probes.len();
            index.paths_of_inode(black_box(InodeKey { dev: 2050, ino: probes[i] }))
        })
    });
    g.bench_function("lookup_path", |b| {
        b.iter(|| {
            i = (i + 1) % lookups.len();
            index.lookup(black_box(&lookups[i]))
        })
    });
    g.finish();
}

criterion_group!(benches, event_decode, debounce, index);
criterion_main!(benches);
