//! Live heap, counted by a global allocator, stays bounded: it does not grow with uptime (shard
//! refreshes, finished tasks) nor with the backlog when the handler is slow (per-shard buffer
//! caps). Runs over the in-memory Kinesis with paused time.
#![cfg(feature = "test-util")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::kinesis::memory::MemoryKinesis;
use kinesis_tower::testing::{builder, Running};
use kinesis_tower::Record;
use kinesis_tower::{Batch, BoxError};
use tokio::sync::Mutex;

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - layout.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The allocator is global: the tests of this file take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn live_heap_does_not_grow_with_shard_refreshes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let kinesis = MemoryKinesis::with_shards(1);
    let consumer = builder(&kinesis)
        .shard_refresh_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let handler = tower::service_fn(|_b: Batch| async { Ok::<_, BoxError>(()) });
    let run = Running::start(&consumer, handler);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = live();
    // 10,000 refreshes.
    tokio::time::sleep(Duration::from_secs(1_000)).await;
    let after = live();
    run.stop().await.unwrap();
    assert!(
        after - before < 64 * 1024,
        "live heap grew by {} bytes over 10,000 shard refreshes",
        after - before
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn live_heap_is_bounded_by_the_buffer_caps_whatever_the_backlog() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const SHARDS: usize = 4;
    const CAP: usize = 1_000;
    let kinesis = MemoryKinesis::with_shards(SHARDS);
    // A backlog 50 times the caps; the source shares each record's data, so it costs little.
    kinesis.fill(50_000, 100);
    let consumer = builder(&kinesis)
        .buffer_records(CAP)
        .max_records_per_call(500)
        .min_get_records_interval(Duration::ZERO)
        .read_bytes_per_second(u64::MAX)
        .build()
        .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let gate = gate.clone();
        tower::service_fn(move |_b: Batch| {
            let gate = gate.clone();
            async move {
                gate.acquire().await.unwrap().forget();
                Ok::<_, BoxError>(())
            }
        })
    };
    let before = live();
    let run = Running::start(&consumer, handler);
    // The handler is stuck: the readers fill their buffers and stop.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let stuck = live() - before;
    // What the caps allow: CAP records per shard (each a `Record` plus its share of the
    // source's buffers), plus a fixed overhead for tasks, channels and the runtime.
    let per_record = std::mem::size_of::<Record>() as isize;
    let bound = (SHARDS * CAP) as isize * per_record + 512 * 1024;
    assert!(
        stuck < bound,
        "live heap grew by {stuck} bytes with a stuck handler; caps allow {bound}"
    );
    assert!(
        kinesis.records_served() <= (SHARDS * CAP) as u64,
        "fetched {} records past the caps",
        kinesis.records_served()
    );
    gate.add_permits(usize::MAX >> 4);
    run.stop().await.unwrap();
}
