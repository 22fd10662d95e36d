//! The assignment seam: a filter over the stream of assignment events decides which shards a
//! consumer reads, and can take one away mid-run. Time is paused: sleeps complete as soon as every
//! task is idle.

use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use futures::stream;
use futures::StreamExt;
use kinesis_tower::assignment::{Assignment, Assignments, Revocation};
use kinesis_tower::kinesis::memory::{shard_name, MemoryKinesis};
use kinesis_tower::store::{BufferedStore, MemoryStore};
use kinesis_tower::testing::{
    builder, closed_parent_with_child, sequences, wait_for, Running, Seen,
};
use kinesis_tower::{Batch, BatchEnd, BoxError, Checkpoint, CheckpointStore, SequenceNumber};
use tokio::sync::mpsc;
use tower::service_fn;

/// Even shards only; revocations come from the test through a channel.
fn even_shards_with_revocations(
    revocations: mpsc::UnboundedReceiver<Assignment>,
) -> impl Fn(Assignments) -> Assignments + Send + Sync + 'static {
    let revocations = StdMutex::new(Some(revocations));
    move |events: Assignments| -> Assignments {
        let even = events.filter(|event| {
            let keep = match event {
                Assignment::Start(start) => {
                    let n: usize = start.shard_id().as_str()[8..].parse().unwrap();
                    n % 2 == 0
                }
                _ => true,
            };
            async move { keep }
        });
        let mut revocations = revocations.lock().unwrap().take().expect("one run");
        let revocations = stream::poll_fn(move |cx| revocations.poll_recv(cx));
        stream::select(even, revocations).boxed()
    }
}

#[tokio::test(start_paused = true)]
async fn a_filter_chooses_the_shards_and_a_revoked_shard_finishes_flushes_and_stops() {
    let kinesis = MemoryKinesis::with_shards(4);
    for shard in 0..4 {
        for i in 0..6 {
            kinesis.put(&shard_name(shard), &format!("k{i}"), "v");
        }
    }
    let memory = Arc::new(MemoryStore::new());
    let store = BufferedStore::new(memory.clone()).flush_interval(Duration::from_secs(3600));
    let (revoke, revocations) = mpsc::unbounded_channel();
    let consumer = builder(&kinesis)
        .store(store)
        .max_records_per_call(2)
        .assignment_filter(even_shards_with_revocations(revocations))
        .build()
        .unwrap();
    let revoked_shard = shard_name(2);
    let seen = Seen::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (seen, gate, revoked_shard) = (seen.clone(), gate.clone(), revoked_shard.clone());
        service_fn(move |batch: Batch| {
            let (seen, gate) = (seen.clone(), gate.clone());
            let hold = batch.shard_id.as_str() == revoked_shard && !batch.is_empty();
            async move {
                if hold {
                    gate.acquire().await.unwrap().forget();
                }
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let run = Running::checkpointed(&consumer, handler);
    wait_for(Duration::from_secs(10), || {
        seen.of(&shard_name(0)).len() == 6
    })
    .await;
    // The revoked shard's first batch is in flight (held); its reader has fetched ahead.
    wait_for(Duration::from_secs(10), || {
        kinesis.get_records_calls(&revoked_shard) >= 2
    })
    .await;
    let (revocation, done) = Revocation::new(revoked_shard.as_str());
    revoke.send(Assignment::Revoke(revocation)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = kinesis.get_records_calls(&revoked_shard);
    assert!(
        seen.of(&revoked_shard).is_empty(),
        "the in-flight batch is still held"
    );
    gate.add_permits(100);
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("revocation completes");
    // The in-flight batch finished, and nothing after it was handed over.
    let first_two: Vec<SequenceNumber> = sequences(&kinesis, &revoked_shard)[..2].to_vec();
    assert_eq!(seen.of(&revoked_shard), first_two);
    let ends = seen.ends();
    assert!(
        ends.contains(&(revoked_shard.as_str().into(), BatchEnd::Revoked)),
        "a last batch marked Revoked: {ends:?}"
    );
    // Its checkpoint was flushed to the store behind the buffer.
    assert_eq!(
        memory
            .snapshot(consumer.namespace())
            .get(revoked_shard.as_str()),
        Some(&Checkpoint::at(first_two[1]))
    );
    // Its reader stopped.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(kinesis.get_records_calls(&revoked_shard), calls);
    assert_eq!(seen.of(&revoked_shard).len(), 2);
    run.stop().await.unwrap();
    // Odd shards were never read.
    for odd in [1, 3] {
        assert_eq!(kinesis.get_records_calls(&shard_name(odd)), 0);
        assert!(seen.of(&shard_name(odd)).is_empty());
    }
}

#[tokio::test(start_paused = true)]
async fn chosen_shards_are_the_only_ones_read() {
    let kinesis = MemoryKinesis::with_shards(3);
    for shard in 0..3 {
        kinesis.put(&shard_name(shard), "k", "v");
    }
    let consumer = builder(&kinesis).shards([shard_name(1)]).build().unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    wait_for(Duration::from_secs(10), || seen.count() == 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard_name(1)).len(), 1);
    assert_eq!(seen.count(), 1);
}

/// A chosen child whose parent is read elsewhere starts once the parent's end is in the store.
#[tokio::test(start_paused = true)]
async fn a_chosen_child_waits_for_a_parent_read_elsewhere_to_end_in_the_store() {
    let kinesis = closed_parent_with_child();
    let store = Arc::new(MemoryStore::new());
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .shards(["c"])
        .shard_refresh_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::start(&consumer, seen.handler());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(seen.of("c").is_empty(), "c started before its parent ended");
    // Another worker finishes p.
    store
        .set(consumer.namespace(), "p", Checkpoint::ShardEnd)
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), || seen.of("c").len() == 1).await;
    run.stop().await.unwrap();
    assert!(seen.of("p").is_empty());
}

/// Passes every event, and keeps a copy of each for the test.
fn recording(
    seen: Arc<StdMutex<Vec<String>>>,
) -> impl Fn(Assignments) -> Assignments + Send + Sync + 'static {
    move |events: Assignments| -> Assignments {
        let seen = seen.clone();
        events
            .inspect(move |event| {
                let kind = match event {
                    Assignment::Start(_) => "start",
                    Assignment::Ended(_) => "ended",
                    _ => "other",
                };
                seen.lock()
                    .unwrap()
                    .push(format!("{kind} {}", event.shard_id()));
            })
            .boxed()
    }
}

/// On a restart where a parent ended in an earlier run, the filter hears of its end once,
/// even when the store shows the end before the consumer took the parent's start (here the
/// filter holds that start for a second, across several listings).
#[tokio::test(start_paused = true)]
async fn a_shards_end_is_told_once() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    kinesis.put("p", "k", "v");
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    kinesis.put("c", "k", "v");
    let store = Arc::new(MemoryStore::new());
    let events = Arc::new(StdMutex::new(Vec::new()));
    let record = recording(events.clone());
    let hold_p = move |events: Assignments| -> Assignments {
        record(events)
            .then(|event| async move {
                if matches!(&event, Assignment::Start(s) if s.shard_id().as_str() == "p") {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                event
            })
            .boxed()
    };
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .shard_refresh_interval(Duration::from_millis(100))
        .assignment_filter(hold_p)
        .build()
        .unwrap();
    store
        .set(consumer.namespace(), "p", Checkpoint::ShardEnd)
        .await
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    wait_for(Duration::from_secs(10), || seen.of("c").len() == 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    run.stop().await.unwrap();
    let events = events.lock().unwrap().clone();
    let ended_p = events.iter().filter(|e| *e == "ended p").count();
    assert_eq!(ended_p, 1, "{events:?}");
}

/// A start held back by the filter while its shard closed and was read to its end elsewhere:
/// the stored end is right after all (the next listing shows the shard closed), not an error.
#[tokio::test(start_paused = true)]
async fn a_held_start_of_a_shard_that_ended_meanwhile_is_finished_not_an_error() {
    let kinesis = MemoryKinesis::default();
    kinesis.add_shard("p", &[]);
    let store = Arc::new(MemoryStore::new());
    let (release, released) = tokio::sync::watch::channel(false);
    let hold_p = move |events: Assignments| -> Assignments {
        let released = released.clone();
        events
            .then(move |event| {
                let mut released = released.clone();
                async move {
                    if matches!(&event, Assignment::Start(s) if s.shard_id().as_str() == "p") {
                        let _ = released.wait_for(|r| *r).await;
                    }
                    event
                }
            })
            .boxed()
    };
    let consumer = builder(&kinesis)
        .store_arc(store.clone())
        .assignment_filter(hold_p)
        .build()
        .unwrap();
    let seen = Seen::default();
    let run = Running::checkpointed(&consumer, seen.handler());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Meanwhile p is split, and another worker reads it to its end.
    kinesis.close_shard("p");
    kinesis.add_shard("c", &["p"]);
    let child = kinesis.put("c", "k", "child");
    store
        .set(consumer.namespace(), "p", Checkpoint::ShardEnd)
        .await
        .unwrap();
    release.send(true).unwrap();
    wait_for(Duration::from_secs(60), || {
        run.is_finished() || seen.of("c").len() == 1
    })
    .await;
    assert!(!run.is_finished(), "the run ended: {:?}", run.join().await);
    run.stop().await.unwrap();
    assert_eq!(seen.of("c"), vec![child]);
}

/// Revoked, then assigned again before the revocation finished (a lease that flaps): the
/// shard is read again once released, from its checkpoint.
#[tokio::test(start_paused = true)]
async fn a_shard_assigned_again_while_being_revoked_is_read_again() {
    let kinesis = MemoryKinesis::with_shards(1);
    let shard = shard_name(0);
    kinesis.put(&shard, "k", "first");
    let (tx, rx) = mpsc::unbounded_channel::<Assignment>();
    let starts = Arc::new(StdMutex::new(Vec::new()));
    let filter = {
        let rx = StdMutex::new(Some(rx));
        let starts = starts.clone();
        move |events: Assignments| -> Assignments {
            let starts = starts.clone();
            let events = events.inspect(move |event| {
                if let Assignment::Start(start) = event {
                    starts.lock().unwrap().push(start.clone());
                }
            });
            let mut rx = rx.lock().unwrap().take().expect("one run");
            stream::select(events, stream::poll_fn(move |cx| rx.poll_recv(cx))).boxed()
        }
    };
    let consumer = builder(&kinesis).assignment_filter(filter).build().unwrap();
    let seen = Seen::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (seen, gate) = (seen.clone(), gate.clone());
        service_fn(move |batch: Batch| {
            let (seen, gate) = (seen.clone(), gate.clone());
            async move {
                if batch.end == Some(BatchEnd::Revoked) {
                    // The revocation's last batch takes a while.
                    gate.acquire().await.unwrap().forget();
                }
                seen.take(&batch);
                Ok::<_, BoxError>(())
            }
        })
    };
    let run = Running::checkpointed(&consumer, handler);
    wait_for(Duration::from_secs(10), || seen.count() == 1).await;
    let (revocation, done) = Revocation::new(shard.as_str());
    tx.send(Assignment::Revoke(revocation)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = starts.lock().unwrap()[0].clone();
    tx.send(Assignment::Start(start)).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(10);
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("revocation completes");
    let second = kinesis.put(&shard, "k", "second");
    wait_for(Duration::from_secs(10), || seen.count() == 2).await;
    run.stop().await.unwrap();
    assert_eq!(seen.of(&shard)[1], second);
}
