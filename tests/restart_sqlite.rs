//! Restarting a consumer on a SQLite checkpoint file, against the embedded ferrokinesis.
//!
//! * `restart_after_abrupt_stop_loses_nothing_and_bounds_redelivery`: the first run is
//!   dropped mid-flight (a crash: a batch may have been handled without its checkpoint being
//!   written). The second run, on the same file, must deliver everything not yet handled, and
//!   re-deliver exactly the records handled after each shard's stored checkpoint: at most one
//!   batch (`max_records_per_call`) per shard.
//! * `graceful_stop_then_restart_redelivers_nothing`: the first run is stopped with
//!   `run_until`; its drain writes every handled batch's checkpoint, so the second run
//!   re-delivers nothing.
//!
//! The stop point is random; set `KT_RESTART_SEED` to replay a run (the seed is printed).
#![cfg(feature = "sqlite")]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::store::SqliteStore;
use kinesis_tower::{Batch, Checkpoint, Consumer, SequenceNumber, ShardId, StartPosition};
use kinesis_tower::{BoxError, CheckpointStore};
use tokio_util::sync::CancellationToken;
use tower::{service_fn, Layer};

const APP: &str = "restart-test";
const SHARDS: i32 = 4;
const MAX_RECORDS_PER_CALL: usize = 1_000;
/// What the handler spends on each batch after recording it.
const HANDLER_WORK: Duration = Duration::from_millis(1);
/// Guards against hangs only; a healthy phase takes a few seconds.
const PHASE_DEADLINE: Duration = Duration::from_secs(300);

/// One record as handed to the handler.
#[derive(Clone, Debug)]
struct Delivery {
    shard: ShardId,
    seq: SequenceNumber,
    id: usize,
}

/// When a phase's stop token is cancelled (from inside the handler).
#[derive(Clone, Copy, Debug)]
enum StopWhen {
    /// Once this run has handled at least this many records.
    Handled(usize),
    /// Once every id has been seen at least once, over all runs.
    AllSeen,
}

/// What one run's handler saw. `seen`/`distinct` are shared by all runs of a test.
struct Recorder {
    deliveries: Mutex<Vec<Delivery>>,
    handled: AtomicUsize,
    seen: Arc<Mutex<Vec<bool>>>,
    distinct: Arc<AtomicUsize>,
    stop_when: StopWhen,
    stop: CancellationToken,
}

impl Recorder {
    fn new(seen: &Arc<Mutex<Vec<bool>>>, distinct: &Arc<AtomicUsize>, stop_when: StopWhen) -> Self {
        Self {
            deliveries: Mutex::new(Vec::new()),
            handled: AtomicUsize::new(0),
            seen: seen.clone(),
            distinct: distinct.clone(),
            stop_when,
            stop: CancellationToken::new(),
        }
    }

    fn take(&self, batch: &Batch) -> Result<(), BoxError> {
        let mut deliveries = self.deliveries.lock().unwrap();
        let mut seen = self.seen.lock().unwrap();
        for record in &batch.records {
            let id = parse_id(&record.data).ok_or_else(|| {
                format!(
                    "record {} of shard {} carries no id: {:?}",
                    record.sequence_number, record.shard_id, record.data
                )
            })?;
            if id >= seen.len() {
                return Err(format!("id {id} out of range").into());
            }
            if !seen[id] {
                seen[id] = true;
                self.distinct.fetch_add(1, Ordering::SeqCst);
            }
            deliveries.push(Delivery {
                shard: record.shard_id.clone(),
                seq: record.sequence_number,
                id,
            });
        }
        let handled = self.handled.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
        let stop = match self.stop_when {
            StopWhen::Handled(n) => handled >= n,
            StopWhen::AllSeen => self.distinct.load(Ordering::SeqCst) == seen.len(),
        };
        if stop {
            self.stop.cancel();
        }
        Ok(())
    }

    /// The handler, wrapped in a `CheckpointLayer`: records the batch at once (the side
    /// effect), then takes a millisecond before it succeeds, so that several shards have a
    /// handled-but-not-yet-checkpointed batch at any moment, as a real handler doing I/O would.
    fn service(
        self: &Arc<Self>,
        consumer: &Consumer,
    ) -> impl tower::Service<
        Batch,
        Response = kinesis_tower::Processed,
        Error = BoxError,
        Future = impl Send,
    > + Send
           + 'static {
        let recorder = self.clone();
        let handler = service_fn(move |batch: Batch| {
            let taken = recorder.take(&batch);
            async move {
                taken?;
                tokio::time::sleep(HANDLER_WORK).await;
                Ok::<(), BoxError>(())
            }
        });
        CheckpointLayer::new(consumer.checkpointer()).layer(handler)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }
}

fn payload(id: usize) -> Vec<u8> {
    format!("id-{id:07}").into_bytes()
}

fn parse_id(data: &[u8]) -> Option<usize> {
    std::str::from_utf8(data)
        .ok()?
        .strip_prefix("id-")?
        .parse()
        .ok()
}

/// A stream filled with `total` records, and what PutRecords said about them.
struct Fixture {
    kinesis: common::EmbeddedKinesis,
    stream: String,
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    total: usize,
    /// Per shard, the sequence numbers PutRecords returned, sorted.
    expected: BTreeMap<ShardId, Vec<SequenceNumber>>,
    /// id -> (shard, sequence number) as PutRecords returned them.
    placement: Vec<(ShardId, SequenceNumber)>,
}

impl Fixture {
    async fn new(prefix: &str, total: usize) -> Self {
        let kinesis = common::start_ferrokinesis().await;
        let stream = common::unique_stream_name(prefix);
        common::create_stream(&kinesis.client, &stream, SHARDS).await;
        let records: Vec<(String, Vec<u8>)> = (0..total)
            .map(|i| (format!("pk-{i}"), payload(i)))
            .collect();
        let started = Instant::now();
        let written = common::put_records(&kinesis.client, &stream, &records).await;
        eprintln!("put {total} records in {:?}", started.elapsed());
        assert_eq!(written.len(), total);
        let mut expected: BTreeMap<ShardId, Vec<SequenceNumber>> = BTreeMap::new();
        let mut placement = Vec::with_capacity(total);
        for (shard, seq) in written {
            let shard = ShardId::from(shard);
            let seq = SequenceNumber::parse(&seq).expect("PutRecords returns decimal sequences");
            expected.entry(shard.clone()).or_default().push(seq);
            placement.push((shard, seq));
        }
        for seqs in expected.values_mut() {
            seqs.sort();
            let before = seqs.len();
            seqs.dedup();
            assert_eq!(
                before,
                seqs.len(),
                "PutRecords returned duplicate sequences"
            );
        }
        assert_eq!(
            expected.len(),
            SHARDS as usize,
            "records landed on every shard: {:?}",
            expected.keys().collect::<Vec<_>>()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("checkpoints.db");
        Self {
            kinesis,
            stream,
            _dir: dir,
            db,
            total,
            expected,
            placement,
        }
    }

    fn consumer(&self, store: Arc<SqliteStore>) -> Consumer {
        Consumer::builder()
            .client(self.kinesis.client.clone())
            .stream_name(&self.stream)
            .app_name(APP)
            .start_position(StartPosition::TrimHorizon)
            .store_arc(store)
            .max_records_per_call(MAX_RECORDS_PER_CALL)
            .min_get_records_interval(Duration::from_millis(10))
            .poll_interval(Duration::from_millis(20))
            .drain_timeout(Duration::from_secs(60))
            .build()
            .expect("valid consumer configuration")
    }

    /// Checkpoints per shard, read with a fresh store on the same file.
    async fn checkpoints(&self, namespace: &str) -> BTreeMap<ShardId, Option<SequenceNumber>> {
        read_checkpoints(&self.db, namespace, self.expected.keys()).await
    }

    /// Every delivery is of a record that was written, on the shard it was written to.
    fn check_placement(&self, deliveries: &[Delivery], phase: &str) {
        for d in deliveries {
            let (shard, seq) = &self.placement[d.id];
            assert!(
                *shard == d.shard && *seq == d.seq,
                "{phase}: id {} delivered as {}/{}, but was written as {shard}/{seq}",
                d.id,
                d.shard,
                d.seq
            );
        }
    }
}

async fn read_checkpoints<'a>(
    db: &Path,
    namespace: &str,
    shards: impl Iterator<Item = &'a ShardId>,
) -> BTreeMap<ShardId, Option<SequenceNumber>> {
    let store = SqliteStore::open(db).await.expect("reopen the SQLite file");
    let mut out = BTreeMap::new();
    for shard in shards {
        let checkpoint = store.get(namespace, shard).await.expect("read checkpoint");
        let seq = match checkpoint {
            None => None,
            Some(Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number: None,
            }) => Some(sequence_number),
            Some(other) => panic!("shard {shard}: unexpected checkpoint {other}"),
        };
        out.insert(shard.clone(), seq);
    }
    store.pool().close().await;
    out
}

fn per_shard(deliveries: &[Delivery]) -> HashMap<ShardId, Vec<SequenceNumber>> {
    let mut out: HashMap<ShardId, Vec<SequenceNumber>> = HashMap::new();
    for d in deliveries {
        out.entry(d.shard.clone()).or_default().push(d.seq);
    }
    out
}

/// How many of `expected` (one shard's sorted sequences) a checkpoint covers: the index just
/// after the checkpointed record (0 without a checkpoint). Panics if the checkpoint is not a
/// written record.
fn covered(shard: &ShardId, expected: &[SequenceNumber], cp: Option<SequenceNumber>) -> usize {
    match cp {
        None => 0,
        Some(cp) => {
            expected.binary_search(&cp).unwrap_or_else(|_| {
                panic!("shard {shard}: checkpoint {cp} is not a written record")
            }) + 1
        }
    }
}

/// Phase 2 shared by both tests: a new consumer on the same file runs until every id has been
/// seen, then stops gracefully. Checks that each shard resumed right after its checkpoint, read
/// to its end without gaps or repeats, and ended checkpointed at its last record. Returns the
/// deliveries.
async fn resume_and_finish(
    fx: &Fixture,
    seen: &Arc<Mutex<Vec<bool>>>,
    distinct: &Arc<AtomicUsize>,
    checkpoints: &BTreeMap<ShardId, Option<SequenceNumber>>,
) -> Vec<Delivery> {
    let store = Arc::new(
        SqliteStore::open(&fx.db)
            .await
            .expect("reopen the SQLite file"),
    );
    let consumer = fx.consumer(store.clone());
    let namespace = consumer.namespace().to_owned();
    let recorder = Arc::new(Recorder::new(seen, distinct, StopWhen::AllSeen));
    let started = Instant::now();
    if distinct.load(Ordering::SeqCst) == fx.total {
        // Phase 1 saw everything already: stop as soon as the run starts.
        recorder.stop.cancel();
    }
    let run = consumer.run_until(
        recorder.service(&consumer),
        recorder.stop.clone().cancelled_owned(),
    );
    match tokio::time::timeout(PHASE_DEADLINE, run).await {
        Ok(result) => result.expect("phase 2 run_until ends cleanly"),
        Err(_) => panic!(
            "phase 2 hung: {} of {} ids seen after {PHASE_DEADLINE:?} ({} handled in phase 2)",
            distinct.load(Ordering::SeqCst),
            fx.total,
            recorder.handled()
        ),
    }
    eprintln!(
        "phase 2: {} records in {:?}",
        recorder.handled(),
        started.elapsed()
    );
    drop(consumer);
    store.pool().close().await;

    let deliveries = recorder.deliveries();
    fx.check_placement(&deliveries, "phase 2");
    let by_shard = per_shard(&deliveries);
    for (shard, expected) in &fx.expected {
        let from = covered(shard, expected, checkpoints[shard]);
        let got = by_shard.get(shard).cloned().unwrap_or_default();
        if let (Some(first), Some(cp)) = (got.first(), checkpoints[shard]) {
            assert!(
                *first > cp,
                "shard {shard}: phase 2 started at {first}, not after checkpoint {cp}"
            );
        }
        assert!(
            got == expected[from..],
            "shard {shard}: phase 2 delivered {} records (first {:?}, last {:?}); expected the {} \
             records after checkpoint {:?} in order, without gaps or repeats",
            got.len(),
            got.first(),
            got.last(),
            expected.len() - from,
            checkpoints[shard]
        );
    }
    let missing: Vec<usize> = seen
        .lock()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, s)| !**s)
        .map(|(i, _)| i)
        .take(20)
        .collect();
    assert!(
        missing.is_empty(),
        "ids never delivered (first 20): {missing:?}"
    );

    // A graceful stop writes every handled batch's checkpoint: each shard ends at its last record.
    let finals = read_checkpoints(&fx.db, &namespace, fx.expected.keys()).await;
    for (shard, expected) in &fx.expected {
        assert_eq!(
            finals[shard],
            expected.last().copied(),
            "shard {shard}: checkpoint after the graceful stop"
        );
    }
    deliveries
}

fn seed() -> u64 {
    let seed = std::env::var("KT_RESTART_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("seed {seed} (KT_RESTART_SEED={seed} to replay)");
    seed
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_abrupt_stop_loses_nothing_and_bounds_redelivery() {
    init_tracing();
    const TOTAL: usize = 100_000;
    let mut rng = fastrand::Rng::with_seed(seed());
    let stop_after = rng.usize(TOTAL / 10..=TOTAL * 9 / 10);
    let fx = Fixture::new("restart-abrupt", TOTAL).await;
    let seen = Arc::new(Mutex::new(vec![false; TOTAL]));
    let distinct = Arc::new(AtomicUsize::new(0));

    // Phase 1: run, then drop the run future once `stop_after` records were handled.
    let store = Arc::new(
        SqliteStore::open(&fx.db)
            .await
            .expect("open the SQLite file"),
    );
    let consumer = fx.consumer(store.clone());
    let namespace = consumer.namespace().to_owned();
    let recorder = Arc::new(Recorder::new(
        &seen,
        &distinct,
        StopWhen::Handled(stop_after),
    ));
    let started = Instant::now();
    {
        let run = consumer.run(recorder.service(&consumer));
        tokio::select! {
            result = run => panic!("phase 1 run ended by itself: {result:?}"),
            () = recorder.stop.cancelled() => {}
            () = tokio::time::sleep(PHASE_DEADLINE) => panic!(
                "phase 1 hung: {} of {stop_after} records handled after {PHASE_DEADLINE:?}",
                recorder.handled()
            ),
        }
        // `run` is dropped here: the crash.
    }
    let handled_at_stop = recorder.handled();
    eprintln!(
        "phase 1: target {stop_after}, dropped after {handled_at_stop} records in {:?}",
        started.elapsed()
    );
    drop(consumer);
    // A checkpoint write already handed to SQLite when the future was dropped may still land;
    // closing the pool waits for every connection, so what we read next is final.
    store.pool().close().await;
    drop(store);
    let phase1 = recorder.deliveries();
    assert_eq!(
        phase1.len(),
        handled_at_stop,
        "the handler ran after the run future was dropped"
    );
    fx.check_placement(&phase1, "phase 1");

    // The bound: per shard, what was handled beyond the stored checkpoint.
    let checkpoints = fx.checkpoints(&namespace).await;
    let phase1_by_shard = per_shard(&phase1);
    let mut expected_redelivered: HashSet<usize> = HashSet::new();
    let mut beyond_per_shard = BTreeMap::new();
    for (shard, expected) in &fx.expected {
        let handled = phase1_by_shard.get(shard).cloned().unwrap_or_default();
        assert!(
            handled == expected[..handled.len()],
            "shard {shard}: phase 1 deliveries are not the shard's first {} records in order",
            handled.len()
        );
        let cp = checkpoints[shard];
        let covered = covered(shard, expected, cp);
        assert!(
            covered <= handled.len(),
            "shard {shard}: checkpoint {cp:?} is past the {} records handled (records would be lost)",
            handled.len()
        );
        let beyond = handled.len() - covered;
        beyond_per_shard.insert(shard.clone(), beyond);
        assert!(
            beyond <= MAX_RECORDS_PER_CALL,
            "shard {shard}: {beyond} records handled after checkpoint {cp:?}: more than one batch \
             ({MAX_RECORDS_PER_CALL}) was in flight"
        );
        expected_redelivered.extend(
            phase1
                .iter()
                .filter(|d| d.shard == *shard && cp.is_none_or(|cp| d.seq > cp))
                .map(|d| d.id),
        );
    }
    eprintln!("phase 1: handled beyond the stored checkpoint, per shard: {beyond_per_shard:?}");

    // Phase 2: resume on the same file and read to the end.
    let phase2 = resume_and_finish(&fx, &seen, &distinct, &checkpoints).await;
    let phase1_ids: HashSet<usize> = phase1.iter().map(|d| d.id).collect();
    let redelivered: HashSet<usize> = phase2
        .iter()
        .map(|d| d.id)
        .filter(|id| phase1_ids.contains(id))
        .collect();
    eprintln!(
        "re-delivered {} records (bound {})",
        redelivered.len(),
        SHARDS as usize * MAX_RECORDS_PER_CALL
    );
    assert!(
        redelivered == expected_redelivered,
        "re-delivered {} records, expected exactly the {} handled after the checkpoints \
         ({} unexpected, {} missing)",
        redelivered.len(),
        expected_redelivered.len(),
        redelivered.difference(&expected_redelivered).count(),
        expected_redelivered.difference(&redelivered).count()
    );
    assert!(redelivered.len() <= SHARDS as usize * MAX_RECORDS_PER_CALL);
    assert_eq!(phase1.len() + phase2.len(), TOTAL + redelivered.len());

    common::delete_stream(&fx.kinesis.client, &fx.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_then_restart_redelivers_nothing() {
    init_tracing();
    const TOTAL: usize = 10_000;
    let mut rng = fastrand::Rng::with_seed(seed());
    let stop_after = rng.usize(TOTAL / 10..=TOTAL * 9 / 10);
    let fx = Fixture::new("restart-graceful", TOTAL).await;
    let seen = Arc::new(Mutex::new(vec![false; TOTAL]));
    let distinct = Arc::new(AtomicUsize::new(0));

    // Phase 1: stop gracefully (run_until's shutdown future) once `stop_after` were handled.
    let store = Arc::new(
        SqliteStore::open(&fx.db)
            .await
            .expect("open the SQLite file"),
    );
    let consumer = fx.consumer(store.clone());
    let namespace = consumer.namespace().to_owned();
    let recorder = Arc::new(Recorder::new(
        &seen,
        &distinct,
        StopWhen::Handled(stop_after),
    ));
    let run = consumer.run_until(
        recorder.service(&consumer),
        recorder.stop.clone().cancelled_owned(),
    );
    match tokio::time::timeout(PHASE_DEADLINE, run).await {
        Ok(result) => result.expect("phase 1 run_until ends cleanly"),
        Err(_) => panic!(
            "phase 1 hung: {} of {stop_after} records handled after {PHASE_DEADLINE:?}",
            recorder.handled()
        ),
    }
    drop(consumer);
    store.pool().close().await;
    drop(store);
    let phase1 = recorder.deliveries();
    eprintln!(
        "phase 1: target {stop_after}, stopped gracefully after {} records",
        phase1.len()
    );
    fx.check_placement(&phase1, "phase 1");

    // Every handled batch was checkpointed by the drain: each checkpoint is the last record
    // handled on its shard.
    let checkpoints = fx.checkpoints(&namespace).await;
    let phase1_by_shard = per_shard(&phase1);
    for (shard, expected) in &fx.expected {
        let handled = phase1_by_shard.get(shard).cloned().unwrap_or_default();
        assert!(
            handled == expected[..handled.len()],
            "shard {shard}: phase 1 deliveries are not the shard's first {} records in order",
            handled.len()
        );
        assert_eq!(
            checkpoints[shard],
            handled.last().copied(),
            "shard {shard}: checkpoint after a graceful stop is the last handled record"
        );
    }

    let phase2 = resume_and_finish(&fx, &seen, &distinct, &checkpoints).await;
    let phase1_ids: HashSet<usize> = phase1.iter().map(|d| d.id).collect();
    let redelivered = phase2.iter().filter(|d| phase1_ids.contains(&d.id)).count();
    eprintln!("re-delivered {redelivered} records");
    assert_eq!(redelivered, 0, "a graceful stop must not cause re-delivery");
    assert_eq!(phase1.len() + phase2.len(), TOTAL);

    common::delete_stream(&fx.kinesis.client, &fx.stream).await;
}
