//! Cost of the singleflight primitive on its own: the uncontended fast path
//! every request pays, and a burst of identical requests on one key.

use std::hint::black_box;
use std::thread;
use std::time::{Duration, Instant};

use chorus::singleflight::{Claim, Group};
use criterion::{criterion_group, criterion_main, Criterion};

fn uncontended(c: &mut Criterion) {
    let group: Group<u64, (), u64> = Group::new();
    c.bench_function("claim_complete_uncontended", |b| {
        b.iter(|| match group.claim(black_box(7), || ()) {
            Claim::Leader(leader) => leader.complete(black_box(1)),
            // Single-threaded: nobody else can hold the key.
            Claim::Follower(_) => unreachable!("no other claimant"),
        })
    });
}

fn eight_threads_one_key(c: &mut Criterion) {
    const THREADS: usize = 8;
    let group: Group<u64, (), u64> = Group::new();
    // One iteration is every thread doing one `run` on the shared key; the
    // threads live for the whole batch so spawning is not what gets timed.
    c.bench_function("run_8_threads_one_key", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        for i in 0..iters {
                            let _ = black_box(group.run(0, || black_box(i)));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = uncontended, eight_threads_one_key
}
criterion_main!(benches);
