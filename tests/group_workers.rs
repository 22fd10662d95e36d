//! Consumer groups across processes: each worker is a `group_worker` example process; the
//! stream is an embedded Kinesis emulator in this test process (127.0.0.1), the leases live
//! in dynalite (127.0.0.1:4568) or PostgreSQL (127.0.0.1:5432). Every scenario runs against
//! both back-ends.
//!
//! A producer puts records on all ten shards throughout. Each scenario checks, besides its
//! own timing: every record put was handled by some worker (at least once), the checkpoints
//! in the lease table never moved backwards (sampled every 50 ms), and no shard was held by
//! two live workers at once beyond a short window (ownership changes are logged by the
//! workers as `held` lines and compared).
//!
//! The figures are printed (`cargo test --test group_workers -- --nocapture`).
#![cfg(all(feature = "dynamodb", feature = "postgres"))]

mod common;
#[macro_use]
mod group_common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use group_common::Backend;
use kinesis_tower::group::LeaseBackend;
use kinesis_tower::Checkpoint;

const SHARDS: usize = 10;

fn example() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| common::example::build("group_worker"))
}

/// One scenario's world: a stream, a lease table (or group), a producer.
struct World {
    kinesis: common::EmbeddedKinesis,
    stream: String,
    backend: Backend,
    /// `dynamodb://<table>` or the Postgres URL.
    leases_url: String,
    group: String,
    table: Arc<dyn LeaseBackend>,
    produced: Arc<Mutex<Vec<(String, String)>>>,
    producing: Arc<AtomicBool>,
    producer: Option<tokio::task::JoinHandle<()>>,
    monitor: Option<tokio::task::JoinHandle<Result<(), String>>>,
    monitoring: Arc<AtomicBool>,
}

impl World {
    async fn new(backend: Backend, test: &str) -> Self {
        let kinesis = common::start_ferrokinesis().await;
        let stream = common::unique_stream_name(&format!("grp-{test}"));
        common::create_stream(&kinesis.client, &stream, SHARDS as i32).await;
        common::wait_for_stream_active(&kinesis.client, &stream, Duration::from_secs(10)).await;
        let group = common::unique_stream_name(&format!("kt-{test}"));
        let table = backend.leases(&group).await;
        let leases_url = match backend {
            Backend::DynamoDb => format!("dynamodb://{group}"),
            Backend::Postgres => common::postgres_url(),
        };
        let mut world = World {
            kinesis,
            stream,
            backend,
            leases_url,
            group,
            table,
            produced: Arc::default(),
            producing: Arc::new(AtomicBool::new(true)),
            producer: None,
            monitor: None,
            monitoring: Arc::new(AtomicBool::new(true)),
        };
        world.start_producer();
        world.start_monitor();
        world
    }

    /// Puts a record on every shard every 50 ms.
    fn start_producer(&mut self) {
        let client = self.kinesis.client.clone();
        let stream = self.stream.clone();
        let produced = self.produced.clone();
        let producing = self.producing.clone();
        self.producer = Some(tokio::spawn(async move {
            let shards = common::list_all_shards(&client, &stream).await;
            let mut n = 0u64;
            while producing.load(Ordering::SeqCst) {
                for shard in &shards {
                    let start = shard.hash_key_range().unwrap().starting_hash_key();
                    let out = client
                        .put_record()
                        .stream_name(&stream)
                        .partition_key(format!("k{n}"))
                        .explicit_hash_key(start)
                        .data(aws_sdk_kinesis::primitives::Blob::new(n.to_string()))
                        .send()
                        .await
                        .expect("put a record");
                    produced
                        .lock()
                        .unwrap()
                        .push((out.shard_id().to_owned(), out.sequence_number().to_owned()));
                    n += 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }

    /// Samples the table's checkpoints: none may ever move backwards.
    fn start_monitor(&mut self) {
        let table = self.table.clone();
        let monitoring = self.monitoring.clone();
        self.monitor = Some(tokio::spawn(async move {
            let mut last: HashMap<String, Checkpoint> = HashMap::new();
            while monitoring.load(Ordering::SeqCst) {
                if let Ok(leases) = table.list().await {
                    for lease in leases {
                        if let Some(checkpoint) = lease.checkpoint {
                            if let Some(before) = last.get(&lease.key) {
                                if checkpoint < *before {
                                    return Err(format!(
                                        "checkpoint of {} moved backwards: {before:?} -> {checkpoint:?}",
                                        lease.key
                                    ));
                                }
                            }
                            last.insert(lease.key.clone(), checkpoint);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(())
        }));
    }

    /// A worker process with these lease timings (milliseconds).
    fn worker(&self, name: &str, lease_ms: u64, poll_ms: u64) -> Worker {
        let mut command = common::example::command(example(), &self.kinesis.endpoint);
        command
            .env("AWS_ENDPOINT_URL_DYNAMODB", common::dynamodb_endpoint())
            .env("RUST_LOG", "kinesis_tower=info")
            .args(["--stream", &self.stream, "--from", "trim-horizon"])
            .args([
                "--worker",
                name,
                "--leases",
                &self.leases_url,
                "--group",
                &self.group,
            ])
            .args(["--lease-duration-ms", &lease_ms.to_string()])
            .args(["--poll-interval-ms", &poll_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(match std::env::var_os("KT_GROUP_LOGS") {
                // Each worker's log in that directory, to follow a scenario step by step.
                Some(dir) => {
                    let file =
                        std::path::Path::new(&dir).join(format!("{}-{name}.log", self.group));
                    Stdio::from(std::fs::File::create(file).expect("create the worker's log"))
                }
                None => Stdio::null(),
            });
        let mut child = command.spawn().expect("start group_worker");
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Worker {
            name: name.to_owned(),
            child,
            lines,
            started: Instant::now(),
            gone: None,
        }
    }

    /// Stops producing, waits until every record put was handled by one of `workers`,
    /// checks the ownership log and the checkpoint monitor, and cleans up.
    async fn finish(mut self, workers: &mut [&mut Worker]) {
        self.producing.store(false, Ordering::SeqCst);
        if let Some(producer) = self.producer.take() {
            producer.await.unwrap();
        }
        let produced: Vec<(String, String)> = self.produced.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let handled: HashSet<(String, String)> =
                workers.iter().flat_map(|w| w.records()).collect();
            let missing: Vec<&(String, String)> =
                produced.iter().filter(|r| !handled.contains(*r)).collect();
            if missing.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{:?}: {} of {} records never handled, e.g. {:?}",
                self.backend,
                missing.len(),
                produced.len(),
                &missing[..missing.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for worker in workers.iter_mut() {
            worker.stop();
        }
        self.monitoring.store(false, Ordering::SeqCst);
        if let Some(monitor) = self.monitor.take() {
            monitor.await.unwrap().unwrap();
        }
        check_exclusive(workers, Duration::from_millis(500));
        self.backend.drop_leases(&self.group).await;
        common::delete_stream(&self.kinesis.client, &self.stream).await;
    }
}

struct Worker {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    started: Instant,
    /// When the process was killed or stopped (its ownership ends there).
    gone: Option<Instant>,
}

impl Worker {
    /// The shards it holds, as its last `held` line says.
    fn held(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|(_, line)| line.strip_prefix("held "))
            .map(|held| {
                held.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn records(&self) -> Vec<(String, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, line)| {
                let mut parts = line.strip_prefix("record ")?.split(' ');
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            })
            .collect()
    }

    /// When it joined: its first `held` line (connected, consumer built, group running).
    fn joined(&self) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, line)| line.starts_with("held "))
            .map(|(at, _)| *at)
    }

    /// When it first handled a record.
    fn first_record(&self) -> Option<Instant> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(_, line)| line.starts_with("record "))
            .map(|(at, _)| *at)
    }

    /// Each `held` line: (when, shards).
    fn ownership(&self) -> Vec<(Instant, HashSet<String>)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(at, line)| {
                let held = line.strip_prefix("held ")?;
                Some((
                    *at,
                    held.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ))
            })
            .collect()
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.name);
    }

    /// SIGTERM, and wait for a clean exit.
    fn terminate(&mut self) {
        self.signal("-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{} exited with {status}", self.name);
        self.gone = Some(Instant::now());
    }

    fn kill9(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
        self.gone = Some(Instant::now());
    }

    fn stop(&mut self) {
        if self.gone.is_none() {
            self.terminate();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds, up to `limit`; answers how long it took.
async fn until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No shard held by two workers at once for longer than `window` (while both processes ran).
fn check_exclusive(workers: &[&mut Worker], window: Duration) {
    // Intervals of holding: (shard, worker, from, to).
    let mut intervals: Vec<(String, String, Instant, Instant)> = Vec::new();
    for worker in workers {
        let end = worker.gone.unwrap_or_else(Instant::now);
        let log = worker.ownership();
        let mut since: HashMap<String, Instant> = HashMap::new();
        for (at, held) in &log {
            for shard in held {
                since.entry(shard.clone()).or_insert(*at);
            }
            let dropped: Vec<String> = since
                .keys()
                .filter(|s| !held.contains(*s))
                .cloned()
                .collect();
            for shard in dropped {
                let from = since.remove(&shard).unwrap();
                intervals.push((shard, worker.name.clone(), from, *at));
            }
        }
        for (shard, from) in since {
            intervals.push((shard, worker.name.clone(), from, end));
        }
    }
    for (i, a) in intervals.iter().enumerate() {
        for b in &intervals[i + 1..] {
            if a.0 != b.0 || a.1 == b.1 {
                continue;
            }
            let overlap = a.3.min(b.3).saturating_duration_since(a.2.max(b.2));
            assert!(
                overlap <= window,
                "shard {} held by {} and {} at once for {overlap:?}",
                a.0,
                a.1,
                b.1
            );
        }
    }
}

fn balanced(workers: &[&Worker], counts: &[usize]) -> bool {
    let mut held: Vec<usize> = workers.iter().map(|w| w.held().len()).collect();
    held.sort();
    let mut want = counts.to_vec();
    want.sort();
    held == want
}

/// A worker joins one that holds all ten shards: with the default settings, the time until
/// ownership is 5/5 and until the newcomer handles its first record (goal: under 1 s).
async fn late_join(backend: Backend) {
    let world = World::new(backend, "late-join").await;
    let mut a = world.worker("a", 10_000, 500);
    until(Duration::from_secs(30), "a holds every shard", || {
        a.held().len() == SHARDS
    })
    .await;
    let mut b = world.worker("b", 10_000, 500);
    let split = until(Duration::from_secs(10), "5/5", || {
        balanced(&[&a, &b], &[5, 5])
    })
    .await;
    until(Duration::from_secs(10), "b handles a record", || {
        b.first_record().is_some()
    })
    .await;
    let split_at = Instant::now();
    let first = b.first_record().unwrap();
    let joined = b.joined().unwrap();
    eprintln!(
        "[figure] {backend:?} late join, default settings: from b's join 5/5 after {:?}, its first record after {:?}; from b's process start {:?} and {:?}",
        split_at.saturating_duration_since(joined),
        first.saturating_duration_since(joined),
        split,
        first - b.started,
    );
    assert!(split < Duration::from_secs(5), "5/5 took {split:?}");
    world.finish(&mut [&mut a, &mut b]).await;
}

/// Three workers; one leaves gracefully: its shards are held again within about a listing.
async fn graceful_leave(backend: Backend) {
    let world = World::new(backend, "leave").await;
    let mut a = world.worker("a", 10_000, 500);
    let mut b = world.worker("b", 10_000, 500);
    let mut c = world.worker("c", 10_000, 500);
    until(Duration::from_secs(30), "4/3/3", || {
        balanced(&[&a, &b, &c], &[3, 3, 4])
    })
    .await;
    let left = c.held();
    c.terminate();
    let taken = until(Duration::from_secs(10), "a and b hold every shard", || {
        a.held().len() + b.held().len() == SHARDS
    })
    .await;
    eprintln!("[figure] {backend:?} graceful leave, default settings: its {} shards held again {taken:?} after it exited", left.len());
    assert!(taken < Duration::from_secs(3), "took {taken:?}");
    world.finish(&mut [&mut a, &mut b, &mut c]).await;
}

/// After a kill -9 (`what`): waits until `survivor` holds every shard, prints the time and
/// checks it against the lease duration + 1 s.
async fn taken_over(backend: Backend, what: &str, survivor: &Worker, lease_ms: u64) {
    let taken = until(
        Duration::from_secs(15),
        "the survivor holds every shard",
        || survivor.held().len() == SHARDS,
    )
    .await;
    eprintln!("[figure] {backend:?} {what}, lease {lease_ms} ms: every shard held again {taken:?} after the kill");
    assert!(
        taken <= Duration::from_millis(lease_ms + 1_000),
        "took {taken:?}"
    );
}

/// kill -9 one of two workers: its shards are held again within the lease duration + 1 s.
async fn crash(backend: Backend) {
    const LEASE: u64 = 3_000;
    let world = World::new(backend, "crash").await;
    let mut a = world.worker("a", LEASE, 100);
    let mut b = world.worker("b", LEASE, 100);
    until(Duration::from_secs(30), "5/5", || {
        balanced(&[&a, &b], &[5, 5])
    })
    .await;
    b.kill9();
    taken_over(backend, "kill -9", &a, LEASE).await;
    world.finish(&mut [&mut a, &mut b]).await;
}

/// kill -9 the owner while a handoff it was asked for is under way: nothing stays unowned
/// longer than the lease duration (+ 1 s to notice).
async fn crash_during_handoff(backend: Backend) {
    const LEASE: u64 = 3_000;
    let world = World::new(backend, "handoff-crash").await;
    let mut a = world.worker("a", LEASE, 100);
    until(Duration::from_secs(30), "a holds every shard", || {
        a.held().len() == SHARDS
    })
    .await;
    let mut b = world.worker("b", LEASE, 100);
    // The moment b's first handoff request is in the table.
    let table = world.table.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leases = table.list().await.unwrap();
        if leases.iter().any(|l| l.handoff_to.as_deref() == Some("b")) {
            break;
        }
        assert!(Instant::now() < deadline, "b never asked for a handoff");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    a.kill9();
    taken_over(backend, "kill -9 mid-handoff", &b, LEASE).await;
    world.finish(&mut [&mut a, &mut b]).await;
}

/// A worker frozen past its lease (SIGSTOP) while another takes over and checkpoints; thawed
/// (SIGCONT), it gives the shards up without writing: checkpoints never move backwards (the
/// monitor), and its shards are not read by two workers at once.
async fn zombie(backend: Backend) {
    const LEASE: u64 = 2_000;
    let world = World::new(backend, "zombie").await;
    let mut a = world.worker("a", LEASE, 100);
    let mut b = world.worker("b", LEASE, 100);
    until(Duration::from_secs(30), "5/5", || {
        balanced(&[&a, &b], &[5, 5])
    })
    .await;
    let frozen: Vec<String> = a.held();
    a.signal("-STOP");
    let stopped_at = Instant::now();
    until(Duration::from_secs(15), "b holds every shard", || {
        b.held().len() == SHARDS
    })
    .await;
    // b checkpoints a's former shards past where a left them.
    let table = world.table.clone();
    let before = table.list().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = table.list().await.unwrap();
    let moved = frozen.iter().filter(|shard| {
        let cp = |leases: &[kinesis_tower::group::Lease]| {
            leases
                .iter()
                .find(|l| &&l.key == shard)
                .and_then(|l| l.checkpoint)
        };
        cp(&after) > cp(&before)
    });
    assert!(
        moved.count() > 0,
        "b checkpointed none of a's former shards"
    );
    a.signal("-CONT");
    let thawed = Instant::now();
    // a gives up what it held without writing under it.
    until(Duration::from_secs(5), "a lets its old shards go", || {
        let held = a.held();
        frozen.iter().all(|s| !held.contains(s))
    })
    .await;
    // While a was frozen it did not read; its ownership log ends the frozen interval at
    // the moment it let go, which overlaps b's: exclude the frozen span from the check.
    a.gone = None;
    {
        let mut lines = a.lines.lock().unwrap();
        // Count a as holding nothing from the freeze on until it says otherwise.
        lines.retain(|(at, line)| {
            !(line.starts_with("held ") && *at >= stopped_at && *at <= thawed)
        });
        lines.push((stopped_at, "held ".to_owned()));
        lines.sort_by_key(|(at, _)| *at);
    }
    eprintln!(
        "[figure] {backend:?} zombie: a let its {} shards go {:?} after SIGCONT",
        frozen.len(),
        thawed.elapsed()
    );
    world.finish(&mut [&mut a, &mut b]).await;
}

both_backends!(
    late_join,
    graceful_leave,
    crash,
    crash_during_handoff,
    zombie
);
