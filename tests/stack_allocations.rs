//! Heap allocations per batch through the full recommended stack, counted by a global
//! allocator: `MetricsLayer` → `BatchLayer` → `CheckpointLayer` (`MemoryStore`) →
//! `RetryLayer` → `DeaggregateLayer` → a no-op handler, called directly with pre-built batches
//! (the consumer's conversion of GetRecords answers, which allocates the records themselves,
//! is not part of this path).
//!
//! The stack may allocate a small, fixed number of times per batch (the batches `BatchLayer`
//! hands over, the checkpoint write, the request `RetryLayer` keeps for a retry), never per
//! record: the tests compare batches of 100 and of 1,000 records, which must cost the same
//! number of allocations per batch.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kinesis_tower::batch::BatchLayer;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kpl::{Aggregator, DeaggregateLayer};
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::retry::RetryLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::PartitionKey;
use kinesis_tower::{Batch, BoxError, Checkpointer, Record, SequenceNumber, ShardId};
use tower::{service_fn, Service, ServiceBuilder};

struct Counting;

/// Allocations (and reallocations) made while a thread's `COUNTING` flag was set.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set around the measured loop only, on the thread that runs it: the other tests of this
    /// file and the harness's threads are not counted.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The allocator's count is global: the tests of this file take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SHARD: &str = "shardId-000000000000";
const BATCHES: usize = 1_000;
const WARM_UP: usize = 10;

/// Allocations made by `f` on this thread.
fn allocations_of<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let out = f();
    COUNTING.with(|c| c.set(false));
    (ALLOCATIONS.load(Ordering::Relaxed) - before, out)
}

fn seq(n: u64) -> SequenceNumber {
    SequenceNumber::parse(&format!("4959{n:030}")).expect("valid")
}

/// Data as the consumer makes it from a GetRecords answer (a `Bytes` over the record's own
/// vector), already shared: a `Bytes` made from a vector allocates its shared header on its
/// first clone, once in the record's life, whichever layer clones it first.
fn owned_data(bytes: Vec<u8>) -> Bytes {
    let data = Bytes::from(bytes);
    drop(data.clone());
    data
}

/// `batches` batches of `records` plain records of 100 bytes, every record with its own data.
fn plain_batches(batches: usize, records: usize) -> Vec<Batch> {
    let shard = ShardId::from(SHARD);
    let keys: Vec<PartitionKey> = (0..16)
        .map(|k| PartitionKey::from(format!("pk-{k}")))
        .collect();
    let mut n = 0u64;
    (0..batches)
        .map(|_| {
            let records = (0..records)
                .map(|_| {
                    n += 1;
                    Record {
                        shard_id: shard.clone(),
                        sequence_number: seq(n),
                        sub_sequence_number: None,
                        partition_key: keys[n as usize % keys.len()].clone(),
                        explicit_hash_key: None,
                        data: owned_data(vec![b'x'; 100]),
                        approximate_arrival_timestamp: None,
                    }
                })
                .collect();
            Batch::new(shard.clone(), records)
        })
        .collect()
}

/// `batches` batches of `aggregates` KPL aggregates of `user_records` user records of 100
/// bytes, each aggregate's user records under 4 partition keys.
fn aggregated_batches(batches: usize, aggregates: usize, user_records: usize) -> Vec<Batch> {
    let shard = ShardId::from(SHARD);
    let mut aggregator = Aggregator::new();
    let mut n = 0u64;
    (0..batches)
        .map(|_| {
            let records = (0..aggregates)
                .map(|_| {
                    n += 1;
                    for u in 0..user_records {
                        let full = aggregator
                            .add(&format!("pk-{}", u % 4), None, vec![b'x'; 100])
                            .expect("fits");
                        assert!(full.is_none(), "the user records fit one aggregate");
                    }
                    let aggregate = aggregator.finish().expect("not empty");
                    Record {
                        shard_id: shard.clone(),
                        sequence_number: seq(n),
                        sub_sequence_number: None,
                        partition_key: aggregate.partition_key.as_str().into(),
                        explicit_hash_key: None,
                        data: owned_data(aggregate.data.to_vec()),
                        approximate_arrival_timestamp: None,
                    }
                })
                .collect();
            Batch::new(shard.clone(), records)
        })
        .collect()
}

/// What a measurement found.
#[derive(Debug)]
struct Measured {
    allocations: u64,
    batches: u64,
    records: u64,
}

impl Measured {
    fn per_batch(&self) -> f64 {
        self.allocations as f64 / self.batches as f64
    }

    fn per_record(&self) -> f64 {
        self.allocations as f64 / self.records as f64
    }
}

/// Builds the stack once (`BatchLayer` flushing every `max_records` input records, so each
/// call hands over one batch), warms it up on `warm_up` (metric handles registered, map
/// entries made, thread-local buffers grown), then counts the allocations of calling it
/// with every batch of `measured`, on a current-thread runtime.
fn measure(max_records: usize, warm_up: Vec<Batch>, measured: Vec<Batch>) -> Measured {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let checkpointer = Checkpointer::new(MemoryStore::new(), "app/stream");
    let handled = Arc::new(AtomicU64::new(0));
    let handler = {
        let handled = handled.clone();
        service_fn(move |batch: Batch| {
            handled.fetch_add(batch.len() as u64, Ordering::Relaxed);
            std::future::ready(Ok::<_, BoxError>(()))
        })
    };
    let mut service = ServiceBuilder::new()
        .layer(MetricsLayer::new("stream"))
        .layer(BatchLayer::new().max_records(max_records))
        .layer(CheckpointLayer::new(checkpointer.clone()))
        .layer(RetryLayer::new())
        .layer(DeaggregateLayer::new())
        .service(handler);
    let last = measured.last().and_then(Batch::checkpoint);
    let batches = measured.len() as u64;
    let mut call_all = |batches: Vec<Batch>| {
        rt.block_on(async {
            for batch in batches {
                poll_fn(|cx| service.poll_ready(cx)).await.expect("ready");
                service.call(batch).await.expect("handled");
            }
        })
    };
    call_all(warm_up);
    handled.store(0, Ordering::Relaxed);
    let (allocations, ()) = allocations_of(|| call_all(measured));
    let records = handled.load(Ordering::Relaxed);
    // The path really ran: every batch reached the handler and was checkpointed.
    assert_eq!(
        rt.block_on(checkpointer.get(SHARD)).expect("store"),
        last,
        "the last batch was checkpointed"
    );
    Measured {
        allocations,
        batches,
        records,
    }
}

/// The per-batch count may differ by this much between batch sizes (a vector's growth, a
/// map's rehash): a per-record allocation would differ by hundreds.
const MARGIN_PER_BATCH: f64 = 2.0;

/// Per-batch allocations of the plain path, one to spare. Found: 6 per batch, whatever the
/// records per batch: the `VecDeque` of batches `BatchLayer` hands over, the copy of the
/// request `RetryLayer` keeps for a retry (the records vector: the records themselves are
/// shared, not copied), the boxed checkpoint-write future of `CheckpointLayer`, the store's
/// boxed `set` future, and the two key strings `MemoryStore` makes.
const PLAIN_PER_BATCH_BOUND: f64 = 7.0;

#[test]
fn plain_records_allocate_a_constant_per_batch_not_per_record() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let small = measure(
        100,
        plain_batches(WARM_UP, 100),
        plain_batches(BATCHES, 100),
    );
    let large = measure(
        1_000,
        plain_batches(WARM_UP, 1_000),
        plain_batches(BATCHES, 1_000),
    );
    println!(
        "plain, 100 records per batch: {} allocations over {} batches, {:.2} per batch, {:.4} per record",
        small.allocations, small.batches, small.per_batch(), small.per_record()
    );
    println!(
        "plain, 1,000 records per batch: {} allocations over {} batches, {:.2} per batch, {:.4} per record",
        large.allocations, large.batches, large.per_batch(), large.per_record()
    );
    assert_eq!(small.records, (BATCHES * 100) as u64);
    assert_eq!(large.records, (BATCHES * 1_000) as u64);
    for m in [&small, &large] {
        assert!(m.per_record() < 1.0, "{m:?}: an allocation per record");
        assert!(
            m.per_batch() <= PLAIN_PER_BATCH_BOUND,
            "{m:?}: more than {PLAIN_PER_BATCH_BOUND} allocations per batch"
        );
    }
    assert!(
        (large.per_batch() - small.per_batch()).abs() <= MARGIN_PER_BATCH,
        "allocations per batch grow with the records per batch: {small:?} vs {large:?}"
    );
}

/// Per-batch allocations of the aggregated path: the plain path's, plus what deaggregating
/// needs: the vector of user records (grown while aggregates are expanded) and one shared
/// string per entry of each aggregate's partition key table (4 here), never one per user
/// record. Found: 51 and 52 per batch (6 + 10 × 4 + the vector's growth).
const KPL_PER_BATCH_BOUND: f64 = 56.0;

#[test]
fn aggregated_records_allocate_per_batch_and_key_not_per_user_record() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // 10 aggregates per batch of 10 or of 100 user records: 100 or 1,000 user records.
    let small = measure(
        10,
        aggregated_batches(WARM_UP, 10, 10),
        aggregated_batches(BATCHES, 10, 10),
    );
    let large = measure(
        10,
        aggregated_batches(WARM_UP, 10, 100),
        aggregated_batches(BATCHES, 10, 100),
    );
    println!(
        "KPL, 10 aggregates × 10 user records per batch: {} allocations over {} batches, {:.2} per batch, {:.4} per user record",
        small.allocations, small.batches, small.per_batch(), small.per_record()
    );
    println!(
        "KPL, 10 aggregates × 100 user records per batch: {} allocations over {} batches, {:.2} per batch, {:.4} per user record",
        large.allocations, large.batches, large.per_batch(), large.per_record()
    );
    assert_eq!(small.records, (BATCHES * 100) as u64);
    assert_eq!(large.records, (BATCHES * 1_000) as u64);
    for m in [&small, &large] {
        assert!(m.per_record() < 1.0, "{m:?}: an allocation per user record");
        assert!(
            m.per_batch() <= KPL_PER_BATCH_BOUND,
            "{m:?}: more than {KPL_PER_BATCH_BOUND} allocations per batch"
        );
    }
    assert!(
        (large.per_batch() - small.per_batch()).abs() <= MARGIN_PER_BATCH + 4.0,
        "allocations per batch grow with the user records per batch: {small:?} vs {large:?}"
    );
}
