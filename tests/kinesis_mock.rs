//! The consumer against kinesis-mock (an external emulator on 127.0.0.1:4570; start it with
//! `source scripts/env.sh && ensure_kinesis_mock`, which `scripts/test` does): every record
//! once and in shard order through `records()` and `run_until()`, resharding (split and merge)
//! while consuming, ListShards pagination, and the error for a missing stream.
//!
//! kinesis-mock is used here (not ferrokinesis) because these paths need ChildShards, working
//! ListShards pagination and real split/merge semantics. Its PutRecords gets slower as a stream
//! grows, so every stream here stays at a few thousand records.
//!
//! Set `RUST_LOG=kinesis_tower=debug` to see the consumer's logs of a failing test.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::types::Shard;
use aws_sdk_kinesis::Client;
use futures::{FutureExt, StreamExt};
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{
    Batch, BatchEnd, Checkpoint, Consumer, ConsumerBuilder, EnhancedFanOut, Error, SequenceNumber,
    StartPosition,
};
use kinesis_tower::{BoxError, CheckpointStore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

/// Deadline for reading everything that was put (kinesis-mock is shared and can be slow).
const READ_DEADLINE: Duration = Duration::from_secs(120);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Creates a stream with `shards` shards on kinesis-mock, runs `body` with a client and the
/// stream's name, and deletes the stream afterwards, also when `body` panics.
async fn with_stream<F, Fut>(prefix: &str, shards: i32, body: F)
where
    F: FnOnce(Client, String) -> Fut,
    Fut: Future<Output = ()>,
{
    init_tracing();
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name(prefix);
    common::create_stream(&client, &stream, shards).await;
    let outcome = AssertUnwindSafe(body(client.clone(), stream.clone()))
        .catch_unwind()
        .await;
    common::delete_stream(&client, &stream).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// How a test's consumer reads the shards: each test that says so runs with both readers and
/// the same assertions.
#[derive(Clone, Copy, Debug)]
enum Reading {
    /// GetRecords in a loop.
    Polling,
    /// SubscribeToShard as a registered stream consumer (deregistered when the run ends).
    FanOut,
}

impl Reading {
    fn configure(self, builder: ConsumerBuilder) -> ConsumerBuilder {
        match self {
            Reading::Polling => builder,
            Reading::FanOut => builder.enhanced_fan_out(
                EnhancedFanOut::new("kinesis-tower-tests").deregister_on_shutdown(true),
            ),
        }
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what()` after `limit`.
async fn wait_until(
    limit: Duration,
    mut cond: impl FnMut() -> bool,
    what: impl FnOnce() -> String,
) {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("not reached within {limit:?}: {}", what());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` records over `keys` partition keys; the data names the record.
fn sample_records(n: usize, keys: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                format!("pk-{}", i % keys),
                format!("record-{i}").into_bytes(),
            )
        })
        .collect()
}

/// What PutRecords reported, per shard, in put order: (sequence number, index of the record).
fn put_order(written: &[(String, String)]) -> BTreeMap<String, Vec<(SequenceNumber, usize)>> {
    let mut per_shard: BTreeMap<String, Vec<(SequenceNumber, usize)>> = BTreeMap::new();
    for (i, (shard, seq)) in written.iter().enumerate() {
        let seq = SequenceNumber::parse(seq)
            .unwrap_or_else(|e| panic!("PutRecords returned a bad sequence number {seq}: {e}"));
        per_shard.entry(shard.clone()).or_default().push((seq, i));
    }
    per_shard
}

/// A record as the consumer delivered it.
#[derive(Clone, Debug)]
struct Seen {
    shard: String,
    seq: SequenceNumber,
    key: String,
    data: Vec<u8>,
}

/// Every record was delivered exactly once, with its partition key and data, and per shard in
/// the order PutRecords reported (kinesis-mock's put order is its shard order).
fn assert_every_record_once_in_shard_order(
    records: &[(String, Vec<u8>)],
    written: &[(String, String)],
    seen: &[Seen],
) {
    let expected = put_order(written);
    let mut by_position: HashMap<(String, SequenceNumber), usize> = HashMap::new();
    for (shard, list) in &expected {
        for (seq, i) in list {
            by_position.insert((shard.clone(), *seq), *i);
        }
    }
    let mut delivered: HashMap<(String, SequenceNumber), usize> = HashMap::new();
    for s in seen {
        let i = *by_position
            .get(&(s.shard.clone(), s.seq))
            .unwrap_or_else(|| panic!("delivered a record that was never put: {s:?}"));
        assert_eq!(s.key, records[i].0, "partition key of {s:?}");
        assert_eq!(s.data, records[i].1, "data of {s:?}");
        *delivered.entry((s.shard.clone(), s.seq)).or_default() += 1;
    }
    let duplicates: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "delivered more than once: {duplicates:?}"
    );
    let missing: Vec<_> = by_position
        .keys()
        .filter(|k| !delivered.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} records never delivered, e.g. {:?}",
        missing.len(),
        by_position.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    for (shard, list) in &expected {
        let want: Vec<SequenceNumber> = list.iter().map(|(seq, _)| *seq).collect();
        let got: Vec<SequenceNumber> = seen
            .iter()
            .filter(|s| &s.shard == shard)
            .map(|s| s.seq)
            .collect();
        assert_eq!(got, want, "shard {shard}: delivery order != put order");
        let mut sorted = want.clone();
        sorted.sort();
        assert_eq!(sorted, want, "shard {shard}: put order is sequence order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stream_reads_every_record_once_in_shard_order() {
    records_stream_reads_every_record_once_in_shard_order_with(Reading::Polling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stream_reads_every_record_once_in_shard_order_over_fan_out() {
    records_stream_reads_every_record_once_in_shard_order_with(Reading::FanOut).await;
}

async fn records_stream_reads_every_record_once_in_shard_order_with(reading: Reading) {
    with_stream("kt-records", 4, |client, stream| async move {
        let records = sample_records(2_000, 50);
        let written = common::put_records(&client, &stream, &records).await;
        assert_eq!(
            put_order(&written).len(),
            4,
            "50 partition keys spread over all 4 shards"
        );

        let consumer = reading
            .configure(Consumer::builder())
            .client(client.clone())
            .stream_name(&stream)
            .app_name("records-stream")
            .start_position(StartPosition::TrimHorizon)
            .poll_interval(Duration::from_millis(100))
            .build()
            .expect("valid configuration");
        let mut records_stream = consumer.records();
        let stop = records_stream.shutdown_handle();
        let mut seen = Vec::new();
        let deadline = Instant::now() + READ_DEADLINE;
        while seen.len() < records.len() {
            let item = tokio::time::timeout_at(deadline, records_stream.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "only {} of {} records within {READ_DEADLINE:?}",
                        seen.len(),
                        records.len()
                    )
                });
            let Some(record) = item else {
                let outcome = stop.shutdown().await;
                panic!(
                    "record stream ended after {} records: {outcome:?}",
                    seen.len()
                );
            };
            seen.push(Seen {
                shard: record.shard_id.to_string(),
                seq: record.sequence_number,
                key: record.partition_key.to_string(),
                data: record.data.to_vec(),
            });
        }
        // Nothing more comes (a duplicate would). This can only fail on a real duplicate.
        if let Ok(extra) = tokio::time::timeout(Duration::from_secs(1), records_stream.next()).await
        {
            panic!("unexpected item after every record was read: {extra:?}");
        }
        tokio::time::timeout(Duration::from_secs(30), records_stream.shutdown())
            .await
            .expect("shutdown within 30 s")
            .expect("clean shutdown");
        assert_every_record_once_in_shard_order(&records, &written, &seen);
    })
    .await;
}

/// A handler that records every batch: records in handling order, and batch ends.
#[derive(Clone, Default)]
struct Recorder {
    records: Arc<Mutex<Vec<Seen>>>,
    ends: Arc<Mutex<Vec<(String, BatchEnd)>>>,
    count: Arc<AtomicU64>,
}

impl Recorder {
    fn take(&self, batch: &Batch) {
        let mut records = self.records.lock().unwrap();
        for r in &batch.records {
            records.push(Seen {
                shard: r.shard_id.to_string(),
                seq: r.sequence_number,
                key: r.partition_key.to_string(),
                data: r.data.to_vec(),
            });
        }
        if let Some(end) = batch.end {
            self.ends
                .lock()
                .unwrap()
                .push((batch.shard_id.to_string(), end));
        }
        self.count
            .fetch_add(batch.records.len() as u64, Ordering::SeqCst);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.records.lock().unwrap().clone()
    }

    fn ends(&self) -> Vec<(String, BatchEnd)> {
        self.ends.lock().unwrap().clone()
    }

    fn service(
        &self,
    ) -> impl tower::Service<Batch, Response = (), Error = BoxError, Future = impl Send> + Clone
    {
        let recorder = self.clone();
        service_fn(move |batch: Batch| {
            recorder.take(&batch);
            async { Ok::<_, BoxError>(()) }
        })
    }
}

/// A consumer run in a task, stopped with a token.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    fn start(consumer: &Consumer, recorder: &Recorder) -> Self {
        let stop = CancellationToken::new();
        let service = CheckpointLayer::new(consumer.checkpointer()).layer(recorder.service());
        let task = tokio::spawn({
            let (consumer, stop) = (consumer.clone(), stop.clone());
            async move { consumer.run_until(service, stop.cancelled_owned()).await }
        });
        Self { stop, task }
    }

    /// Whether the run ended early (with an error: it never ends on its own otherwise).
    fn ended(&self) -> bool {
        self.task.is_finished()
    }

    async fn stop(self) {
        self.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("run_until returns within 30 s of shutdown")
            .expect("run task did not panic");
        result.unwrap_or_else(|e| panic!("run_until failed: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reads_every_record_once_in_shard_order() {
    run_reads_every_record_once_in_shard_order_with(Reading::Polling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reads_every_record_once_in_shard_order_over_fan_out() {
    run_reads_every_record_once_in_shard_order_with(Reading::FanOut).await;
}

async fn run_reads_every_record_once_in_shard_order_with(reading: Reading) {
    with_stream("kt-run", 4, |client, stream| async move {
        let records = sample_records(2_000, 50);
        let written = common::put_records(&client, &stream, &records).await;
        let expected = put_order(&written);
        assert_eq!(expected.len(), 4, "50 partition keys spread over 4 shards");

        let store = Arc::new(MemoryStore::new());
        let consumer = reading
            .configure(Consumer::builder())
            .client(client.clone())
            .stream_name(&stream)
            .app_name("run")
            .start_position(StartPosition::TrimHorizon)
            .store_arc(store.clone())
            .poll_interval(Duration::from_millis(100))
            .build()
            .expect("valid configuration");
        let recorder = Recorder::default();
        let running = Running::start(&consumer, &recorder);
        let total = records.len() as u64;
        wait_until(
            READ_DEADLINE,
            || recorder.count() >= total || running.ended(),
            || format!("{} of {total} records handled", recorder.count()),
        )
        .await;
        // A duplicate would still come in now; this wait cannot fail a correct consumer.
        tokio::time::sleep(Duration::from_secs(1)).await;
        running.stop().await;

        let seen = recorder.seen();
        assert_every_record_once_in_shard_order(&records, &written, &seen);
        for (shard, list) in &expected {
            let (last, _) = list.last().expect("shard has records");
            assert_eq!(
                store.get(consumer.namespace(), shard).await.unwrap(),
                Some(Checkpoint::at(*last)),
                "checkpoint of {shard}"
            );
        }
        // Every shard (all open) was told about the shutdown, and nothing ended otherwise.
        let ends = recorder.ends();
        assert_eq!(ends.len(), 4, "{ends:?}");
        assert!(
            ends.iter().all(|(_, e)| *e == BatchEnd::Shutdown),
            "{ends:?}"
        );
    })
    .await;
}

fn hash_range(shard: &Shard) -> (u128, u128) {
    let range = shard
        .hash_key_range()
        .unwrap_or_else(|| panic!("shard {} has no hash key range", shard.shard_id()));
    let parse = |s: &str| {
        s.parse::<u128>()
            .unwrap_or_else(|e| panic!("hash key {s} of {}: {e}", shard.shard_id()))
    };
    (
        parse(range.starting_hash_key()),
        parse(range.ending_hash_key()),
    )
}

fn is_open(shard: &Shard) -> bool {
    shard
        .sequence_number_range()
        .is_none_or(|r| r.ending_sequence_number().is_none())
}

/// Open shards sorted by hash range.
async fn open_shards(client: &Client, stream: &str) -> Vec<Shard> {
    let mut shards: Vec<Shard> = common::list_all_shards(client, stream)
        .await
        .into_iter()
        .filter(is_open)
        .collect();
    shards.sort_by_key(|s| hash_range(s).0);
    shards
}

/// Whether `upper` starts right after `lower` ends. kinesis-mock's hash ranges may be off by
/// one at shard boundaries, so a one-key overlap or gap counts as adjacent.
fn adjacent(lower: &Shard, upper: &Shard) -> bool {
    let (_, lower_end) = hash_range(lower);
    let (upper_start, _) = hash_range(upper);
    upper_start.abs_diff(lower_end) <= 2 && upper_start >= lower_end
}

/// A produced record: partition key and per-key counter, both in the data (`key/counter`).
fn payload(key: &str, counter: u64) -> Vec<u8> {
    format!("{key}/{counter}").into_bytes()
}

fn parse_payload(data: &[u8]) -> (String, u64) {
    let text = std::str::from_utf8(data).expect("payload is UTF-8");
    let (key, counter) = text.rsplit_once('/').expect("payload is key/counter");
    (key.to_owned(), counter.parse().expect("counter"))
}

/// Keys the producer writes; each PutRecords request carries one record per key, so a retried
/// entry can never overtake a later record of the same key.
const PRODUCER_KEYS: u64 = 30;

/// The producer's record of what it put: (key, counter) -> (shard, sequence number).
type Produced = Arc<Mutex<HashMap<(String, u64), (String, SequenceNumber)>>>;

/// Puts rounds of one record per key (counter = round) until `stop`, pausing between rounds.
fn spawn_producer(
    client: Client,
    stream: String,
    produced: Produced,
    rounds: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut round = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let batch: Vec<(String, Vec<u8>)> = (0..PRODUCER_KEYS)
                .map(|k| {
                    let key = format!("key-{k}");
                    let data = payload(&key, round);
                    (key, data)
                })
                .collect();
            let written = common::put_records(&client, &stream, &batch).await;
            {
                let mut produced = produced.lock().unwrap();
                for ((key, _), (shard, seq)) in batch.iter().zip(written) {
                    let seq = SequenceNumber::parse(&seq).expect("sequence number");
                    produced.insert((key.clone(), round), (shard, seq));
                }
            }
            round += 1;
            rounds.store(round, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_consuming_loses_nothing_and_keeps_key_order() {
    split_and_merge_while_consuming_loses_nothing_and_keeps_key_order_with(Reading::Polling).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_consuming_loses_nothing_and_keeps_key_order_over_fan_out() {
    split_and_merge_while_consuming_loses_nothing_and_keeps_key_order_with(Reading::FanOut).await;
}

async fn split_and_merge_while_consuming_loses_nothing_and_keeps_key_order_with(reading: Reading) {
    with_stream("kt-reshard", 3, |client, stream| async move {
        // Which shard to split and which two to merge: the lowest hash range is split, the
        // two others must be adjacent to be merged.
        let initial = open_shards(&client, &stream).await;
        assert_eq!(initial.len(), 3, "{initial:?}");
        let to_split = initial[0].clone();
        let (merge_lower, merge_upper) = (initial[1].clone(), initial[2].clone());
        assert!(
            adjacent(&merge_lower, &merge_upper),
            "shards to merge are adjacent: {:?} {:?}",
            hash_range(&merge_lower),
            hash_range(&merge_upper)
        );

        let store = Arc::new(MemoryStore::new());
        let consumer = reading.configure(Consumer::builder())
            .client(client.clone())
            .stream_name(&stream)
            .app_name("reshard")
            .start_position(StartPosition::TrimHorizon)
            .store_arc(store.clone())
            .poll_interval(Duration::from_millis(100))
            .shard_refresh_interval(Duration::from_secs(1))
            // Small reads (at most 10 records per call, 5 calls/s per shard) keep the consumer
            // behind the producer, so the parents still hold unread records when their
            // children start receiving new ones: the case where key order can break.
            .max_records_per_call(10)
            .build()
            .expect("valid configuration");
        let recorder = Recorder::default();
        let running = Running::start(&consumer, &recorder);

        let produced: Produced = Arc::default();
        let rounds = Arc::new(AtomicU64::new(0));
        let stop_producing = Arc::new(AtomicBool::new(false));
        let producer = spawn_producer(
            client.clone(),
            stream.clone(),
            produced.clone(),
            rounds.clone(),
            stop_producing.clone(),
        );
        let phase_limit = Duration::from_secs(60);
        // Records put but not handled yet (approximate: duplicates count as handled).
        let backlog = || {
            let put = produced.lock().unwrap().len() as u64;
            put.saturating_sub(recorder.count())
        };
        // Waits until the producer has put `at_least` rounds; panics if it ended early (its
        // own panic, a PutRecords failure, is printed above).
        let producer_ref = &producer;
        let wait_rounds = |at_least: u64, phase: &'static str| {
            let rounds = rounds.clone();
            async move {
                wait_until(
                    phase_limit,
                    || rounds.load(Ordering::SeqCst) >= at_least || producer_ref.is_finished(),
                    || format!("producer did not reach round {at_least} ({phase})"),
                )
                .await;
                assert!(!producer_ref.is_finished(), "the producer ended early ({phase})");
            }
        };

        // Phase 1: consume from the three original shards.
        wait_rounds(10, "before the split").await;
        wait_until(
            phase_limit,
            || recorder.count() > 0 || running.ended(),
            || "nothing handled before the split".to_owned(),
        )
        .await;
        assert!(!running.ended(), "run ended early");

        // Split the lowest shard at the middle of its hash range.
        let backlog_at_split = backlog();
        let (start, end) = hash_range(&to_split);
        let middle = start + (end - start) / 2 + 1;
        client
            .split_shard()
            .stream_name(&stream)
            .shard_to_split(to_split.shard_id())
            .new_starting_hash_key(middle.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("SplitShard: {}", common::error_chain(e)));
        common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
        let r = rounds.load(Ordering::SeqCst);
        wait_rounds(r + 10, "after the split").await;

        // Merge the two other (adjacent) shards.
        let backlog_at_merge = backlog();
        client
            .merge_shards()
            .stream_name(&stream)
            .shard_to_merge(merge_lower.shard_id())
            .adjacent_shard_to_merge(merge_upper.shard_id())
            .send()
            .await
            .unwrap_or_else(|e| panic!("MergeShards: {}", common::error_chain(e)));
        common::wait_for_stream_active(&client, &stream, Duration::from_secs(30)).await;
        let r = rounds.load(Ordering::SeqCst);
        wait_rounds(r + 10, "after the merge").await;

        stop_producing.store(true, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(60), producer)
            .await
            .expect("producer stops within 60 s")
            .expect("producer did not panic");

        // The emulator did what was asked: two children of the split shard, one child of both
        // merged shards; the parents are closed.
        let all = common::list_all_shards(&client, &stream).await;
        let children_of = |parent: &str| -> Vec<String> {
            all.iter()
                .filter(|s| {
                    s.parent_shard_id() == Some(parent)
                        || s.adjacent_parent_shard_id() == Some(parent)
                })
                .map(|s| s.shard_id().to_owned())
                .collect()
        };
        let split_children = children_of(to_split.shard_id());
        let merged_children = children_of(merge_lower.shard_id());
        assert_eq!(split_children.len(), 2, "{all:?}");
        assert_eq!(merged_children.len(), 1, "{all:?}");
        assert_eq!(children_of(merge_upper.shard_id()), merged_children);
        let parents = [
            to_split.shard_id().to_owned(),
            merge_lower.shard_id().to_owned(),
            merge_upper.shard_id().to_owned(),
        ];
        for parent in &parents {
            let shard = all.iter().find(|s| s.shard_id() == parent).unwrap();
            assert!(!is_open(shard), "{parent} is closed: {shard:?}");
        }

        // Wait until every produced record was handled (duplicates allowed).
        let wanted: HashSet<(String, u64)> = produced.lock().unwrap().keys().cloned().collect();
        let handled_keys = |recorder: &Recorder| -> HashSet<(String, u64)> {
            recorder
                .seen()
                .iter()
                .map(|s| parse_payload(&s.data))
                .collect()
        };
        wait_until(
            READ_DEADLINE,
            || running.ended() || wanted.is_subset(&handled_keys(&recorder)),
            || {
                let handled = handled_keys(&recorder);
                let missing: Vec<_> = wanted.difference(&handled).take(10).collect();
                format!(
                    "{} of {} produced records handled; missing e.g. {missing:?}; batch ends {:?}",
                    wanted.intersection(&handled).count(),
                    wanted.len(),
                    recorder.ends()
                )
            },
        )
        .await;
        running.stop().await;

        let seen = recorder.seen();
        let produced = produced.lock().unwrap().clone();
        eprintln!(
            "reshard: produced {} records in {} rounds; handled {} (duplicates {}); backlog \
             (produced - handled) at split {backlog_at_split}, at merge {backlog_at_merge}; \
             split {} -> {split_children:?}, merged {} + {} -> {merged_children:?}; batch ends {:?}",
            produced.len(),
            rounds.load(Ordering::SeqCst),
            seen.len(),
            seen.len() - handled_keys(&recorder).len(),
            to_split.shard_id(),
            merge_lower.shard_id(),
            merge_upper.shard_id(),
            recorder.ends()
        );

        // No record lost.
        let handled = handled_keys(&recorder);
        let mut missing: Vec<_> = wanted.difference(&handled).collect();
        missing.sort();
        assert!(
            missing.is_empty(),
            "{} records lost: {missing:?}",
            missing.len()
        );

        // Each record came from the shard and with the sequence number PutRecords reported,
        // with the right partition key.
        for s in &seen {
            let (key, counter) = parse_payload(&s.data);
            assert_eq!(s.key, key, "partition key of {s:?}");
            let (shard, seq) = &produced[&(key.clone(), counter)];
            assert_eq!(
                (&s.shard, &s.seq),
                (shard, seq),
                "{key}/{counter} delivered from another place than it was put"
            );
        }

        // Per partition key, records were handled in the order they were put: the first
        // occurrences of the counters increase (a re-delivered duplicate is allowed).
        let mut first_seen: HashMap<String, (u64, usize)> = HashMap::new();
        let mut firsts: HashSet<(String, u64)> = HashSet::new();
        let mut violations = Vec::new();
        for (i, s) in seen.iter().enumerate() {
            let (key, counter) = parse_payload(&s.data);
            if !firsts.insert((key.clone(), counter)) {
                continue; // a duplicate
            }
            if let Some(&(previous, at)) = first_seen.get(&key) {
                if counter < previous {
                    violations.push(format!(
                        "{key}: counter {counter} ({} {}) handled at #{i} after counter \
                         {previous} ({} {}) at #{at}",
                        s.shard, s.seq, seen[at].shard, seen[at].seq
                    ));
                }
            }
            let entry = first_seen.entry(key).or_insert((counter, i));
            if counter >= entry.0 {
                *entry = (counter, i);
            }
        }
        assert!(
            violations.is_empty(),
            "per-key order violated ({} times): {:#?}",
            violations.len(),
            &violations[..violations.len().min(20)]
        );

        // The closed parents were read to their end: ShardEnd batches and checkpoints.
        let ends = recorder.ends();
        assert!(
            ends.iter().any(|(_, e)| *e == BatchEnd::ShardEnd),
            "no batch ended a shard: {ends:?}"
        );
        for parent in &parents {
            assert!(
                ends.contains(&(parent.clone(), BatchEnd::ShardEnd)),
                "{parent} got no ShardEnd batch: {ends:?}"
            );
            assert_eq!(
                store.get(consumer.namespace(), parent).await.unwrap(),
                Some(Checkpoint::ShardEnd),
                "checkpoint of closed parent {parent}"
            );
        }
        // Records went to the children too, and every shard written to was read.
        let written_shards: HashSet<&str> = produced.values().map(|(s, _)| s.as_str()).collect();
        let delivered_shards: HashSet<&str> = seen.iter().map(|s| s.shard.as_str()).collect();
        assert_eq!(delivered_shards, written_shards);
        assert!(
            split_children
                .iter()
                .chain(&merged_children)
                .any(|child| written_shards.contains(child.as_str())),
            "no record was put to a child shard: {written_shards:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_shards_pagination_with_more_shards_than_one_page() {
    const SHARDS: usize = 12;
    with_stream("kt-pages", SHARDS as i32, |client, stream| async move {
        // Put records with varied keys until every shard has at least one.
        let mut records: Vec<(String, Vec<u8>)> = Vec::new();
        let mut written: Vec<(String, String)> = Vec::new();
        let mut round = 0;
        while put_order(&written).len() < SHARDS {
            assert!(round < 20, "records did not reach every shard: {written:?}");
            let batch: Vec<(String, Vec<u8>)> = (0..24)
                .map(|i| {
                    let n = round * 24 + i;
                    (format!("spread-{n}"), format!("record-{n}").into_bytes())
                })
                .collect();
            written.extend(common::put_records(&client, &stream, &batch).await);
            records.extend(batch);
            round += 1;
        }

        let consumer = Consumer::builder()
            .client(client.clone())
            .stream_name(&stream)
            .app_name("pages")
            .start_position(StartPosition::TrimHorizon)
            .poll_interval(Duration::from_millis(100))
            .list_shards_page_size(5)
            .build()
            .expect("valid configuration");
        let recorder = Recorder::default();
        let running = Running::start(&consumer, &recorder);
        let total = records.len() as u64;
        wait_until(
            READ_DEADLINE,
            || recorder.count() >= total || running.ended(),
            || {
                let shards: HashSet<String> =
                    recorder.seen().into_iter().map(|s| s.shard).collect();
                format!(
                    "{} of {total} records handled, from shards {shards:?}",
                    recorder.count()
                )
            },
        )
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        running.stop().await;
        let seen = recorder.seen();
        assert_every_record_once_in_shard_order(&records, &written, &seen);
        let shards: HashSet<&str> = seen.iter().map(|s| s.shard.as_str()).collect();
        assert_eq!(shards.len(), SHARDS, "{shards:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_stream_is_a_clear_error() {
    init_tracing();
    let client = common::kinesis_mock_client().await;
    let stream = common::unique_stream_name("kt-missing");
    let consumer = Consumer::builder()
        .client(client.clone())
        .stream_name(&stream)
        .app_name("missing")
        .start_position(StartPosition::TrimHorizon)
        .build()
        .expect("valid configuration");

    let err = tokio::time::timeout(
        Duration::from_secs(30),
        consumer.run(Recorder::default().service()),
    )
    .await
    .expect("run ends within 30 s")
    .expect_err("a missing stream ends run with an error");
    match &err {
        Error::StreamNotFound { stream: name, .. } => assert_eq!(name, &stream),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let message = err.to_string();
    assert!(
        message.contains(&stream) && message.contains("create it"),
        "{message}"
    );

    // records(): the stream ends, and its handle returns the same error.
    let mut records = consumer.records();
    let stop = records.shutdown_handle();
    let item = tokio::time::timeout(Duration::from_secs(30), records.next())
        .await
        .expect("record stream answers within 30 s");
    assert!(item.is_none(), "{item:?}");
    let outcome = stop.shutdown().await;
    assert!(
        matches!(&outcome, Err(Error::StreamNotFound { .. })),
        "{outcome:?}"
    );
    // Nothing was created behind our back; deleting a missing stream is a no-op.
    common::delete_stream(&client, &stream).await;
}
