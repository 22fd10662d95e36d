//! The one-command demo (`scripts/demo`): a consumer stops part-way, a new one resumes from the
//! SQLite checkpoints, and the demo proves that no record was lost or read twice.
//!
//! ```text
//! scripts/demo                                        # release build
//! cargo run --example demo --features sqlite          # debug build
//! cargo run --example demo --features sqlite -- --db /tmp/checkpoints.sqlite
//! ```
//!
//! Nothing external is needed: the demo embeds a Kinesis emulator (ferrokinesis) on
//! `127.0.0.1:<free port>`. It
//! 1. creates a stream with 2 shards and writes 1,000 orders;
//! 2. run 1: a `Consumer` reads from `TRIM_HORIZON` with checkpoints in a SQLite file
//!    (`target/demo-checkpoints.sqlite`, deleted at start) and a tower handler
//!    (`CheckpointLayer` + `PerRecordLayer` + `service_fn`); after 500 records it asks
//!    `run_until` to stop, which finishes the batches in flight and checkpoints them;
//! 3. prints the checkpoints kept in the file;
//! 4. writes 200 more orders;
//! 5. run 2: a new `Consumer` over a freshly opened `SqliteStore` on the same file reads until
//!    every order was handled;
//! 6. checks: every record handled exactly once over both runs, none re-read by run 2, and run 2
//!    started on each shard at the record right after run 1's checkpoint. It exits with status 1
//!    if any check fails.
//!
//! `RUST_LOG=kinesis_tower=debug` shows what the consumer does (default: warnings only).

#[path = "support/put.rs"]
mod put;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::StreamStatus;
use aws_sdk_kinesis::Client;
use clap::Parser;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::per_record::PerRecordLayer;
use kinesis_tower::store::SqliteStore;
use kinesis_tower::BoxError;
use kinesis_tower::{Checkpoint, Consumer, Record, SequenceNumber, ShardId, StartPosition};
use tokio::sync::Notify;
use tower::{service_fn, ServiceBuilder};
use tracing_subscriber::EnvFilter;

const STREAM: &str = "demo-orders";
const SHARDS: i32 = 2;
const FIRST_ORDERS: u64 = 1_000;
const MORE_ORDERS: u64 = 200;
/// Run 1 asks to stop once it has handled this many records.
const STOP_AFTER: u64 = 500;
/// A run that has not reached its goal by then stops anyway (and the demo fails).
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs a Kinesis consumer twice against an embedded emulator and proves that the second run
/// resumes exactly where the first stopped, from checkpoints in a SQLite file.
#[derive(Parser)]
struct Args {
    /// The SQLite checkpoint file; it is deleted at start, and kept afterwards for inspection
    #[arg(
        long,
        value_name = "PATH",
        default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/demo-checkpoints.sqlite")
    )]
    db: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if !run(&args.db).await.context("demo failed")? {
        bail!("some checks failed");
    }
    Ok(())
}

/// Runs the demo; `Ok(false)` when a check failed.
async fn run(db: &Path) -> anyhow::Result<bool> {
    println!("kinesis-tower demo: stop a consumer part-way, start a new one, check it resumes\n");

    // 1. An in-process Kinesis.
    let (endpoint, _server) = start_emulator().await?;
    let client = kinesis_client(&endpoint);
    println!("[1/6] Kinesis emulator (ferrokinesis, in this process) at {endpoint}");

    // 2. A stream with two shards, and the first orders.
    create_stream(&client).await?;
    let mut produced = Produced::default();
    put_orders(&client, 1..=FIRST_ORDERS, &mut produced).await?;
    println!(
        "[2/6] Created stream {STREAM:?} ({SHARDS} shards) and wrote orders #1-#{FIRST_ORDERS}: {}",
        per_shard(&produced.per_shard_count())
    );

    // 3. Run 1: stop after about STOP_AFTER records.
    remove_database(db)?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    println!(
        "[3/6] Run 1: Consumer from TRIM_HORIZON, checkpoints in {}\n      \
         handler: CheckpointLayer + PerRecordLayer + service_fn; it asks to stop after {STOP_AFTER} records",
        db.display()
    );
    let consumer = new_consumer(&endpoint, SqliteStore::open(db).await?)?;
    let started = Instant::now();
    let run_1_reached_goal = run_consumer(&consumer, &tally, Run::First, None)
        .await
        .context("run 1 failed")?;
    let run_1 = tally.lock().unwrap().run_summary(Run::First);
    println!(
        "      {} after {:.2?}: handled {} records ({})",
        if run_1_reached_goal {
            "stopped gracefully"
        } else {
            "gave up (deadline)"
        },
        started.elapsed(),
        run_1.total,
        per_shard(&run_1.count)
    );
    let shards = list_shards(&client).await?;
    let mut checkpoints = BTreeMap::new();
    println!("      checkpoints now in the SQLite file:");
    for shard in &shards {
        let checkpoint = consumer.checkpointer().get(shard).await?;
        let label = match checkpoint {
            Some(Checkpoint::Sequence {
                sequence_number, ..
            }) => match produced.order_of(shard, sequence_number) {
                Some(order) => format!("after order #{order} (sequence number {sequence_number})"),
                None => format!("at sequence number {sequence_number} (not a record we wrote!)"),
            },
            Some(other) => other.to_string(),
            None => "none: nothing handled on this shard yet".to_owned(),
        };
        println!("        {shard}  {label}");
        checkpoints.insert(shard.clone(), checkpoint);
    }
    drop(consumer);

    // 4. More orders while no consumer runs.
    let total = FIRST_ORDERS + MORE_ORDERS;
    put_orders(&client, FIRST_ORDERS + 1..=total, &mut produced).await?;
    println!(
        "[4/6] Wrote orders #{}-#{total} while no consumer was running",
        FIRST_ORDERS + 1
    );

    // 5. Run 2: a new consumer, a freshly opened store on the same file.
    println!(
        "[5/6] Run 2: a new Consumer over a freshly opened SqliteStore on the same file; \
         it stops once every order was handled"
    );
    let consumer = new_consumer(&endpoint, SqliteStore::open(db).await?)?;
    let started = Instant::now();
    let run_2_reached_goal = run_consumer(&consumer, &tally, Run::Second, Some(produced.len()))
        .await
        .context("run 2 failed")?;
    let run_2 = tally.lock().unwrap().run_summary(Run::Second);
    println!(
        "      {} after {:.2?}: handled {} records ({})",
        if run_2_reached_goal {
            "stopped gracefully"
        } else {
            "gave up (deadline)"
        },
        started.elapsed(),
        run_2.total,
        per_shard(&run_2.count)
    );
    for (shard, first) in &run_2.first {
        let order = produced
            .order_of(shard, *first)
            .map_or("?".to_owned(), |o| o.to_string());
        println!("        {shard}: its first record was order #{order}");
    }
    println!("        (a shard's order numbers have gaps: the partition key, the customer, picks the shard)");

    // 6. The proof.
    let tally = tally.lock().unwrap();
    let mut ok = true;
    let mut check = |passed: bool, what: String| {
        println!("      [{}] {what}", if passed { " ok " } else { "FAIL" });
        ok &= passed;
    };
    println!("[6/6] Checks");
    println!(
        "      produced {}, handled {} in run 1 + {} in run 2 = {}",
        produced.len(),
        run_1.total,
        run_2.total,
        run_1.total + run_2.total
    );
    check(
        run_1.total >= STOP_AFTER && run_1.total < FIRST_ORDERS,
        format!(
            "run 1 stopped part-way: {} of {FIRST_ORDERS} records handled",
            run_1.total
        ),
    );
    let unique = tally.unique.len() as u64;
    let unknown = tally
        .unique
        .iter()
        .filter(|(shard, seq)| produced.order_of(shard, *seq).is_none())
        .count();
    check(
        unique == produced.len() && unknown == 0,
        format!(
            "unique records handled: {unique} == produced {}{}",
            produced.len(),
            if unknown > 0 {
                format!(" ({unknown} records we never wrote!)")
            } else {
                String::new()
            }
        ),
    );
    let orders: BTreeSet<u64> = tally.handled.iter().filter_map(|h| h.order).collect();
    check(
        orders.len() as u64 == total && orders.iter().copied().eq(1..=total),
        format!(
            "every order #1-#{total} was handled ({} distinct)",
            orders.len()
        ),
    );
    check(
        tally.reread == 0,
        format!("records handled more than once (re-read): {}", tally.reread),
    );
    for shard in &shards {
        let last_of_run_1 = run_1.last.get(shard).copied();
        let checkpoint = checkpoints.get(shard).copied().flatten();
        check(
            checkpoint == last_of_run_1.map(Checkpoint::at),
            format!(
                "{shard}: run 1's checkpoint is the last record it handled ({})",
                last_of_run_1.map_or("none".to_owned(), |s| describe(&produced, shard, s))
            ),
        );
        // Run 2 must start at the first record written after that checkpoint.
        let expected = produced.first_after(shard, checkpoint.and_then(|c| c.sequence_number()));
        let actual = run_2.first.get(shard).copied();
        check(
            expected == actual,
            format!(
                "{shard}: run 2 started right after it, at {} (expected {})",
                actual.map_or("nothing".to_owned(), |s| describe(&produced, shard, s)),
                expected.map_or("nothing".to_owned(), |s| describe(&produced, shard, s)),
            ),
        );
    }
    check(
        run_2_reached_goal,
        format!("run 2 handled everything within {DEADLINE:?}"),
    );
    println!();
    if ok {
        println!(
            "PASS: run 2 resumed exactly where run 1 stopped: nothing lost, nothing read twice.\n\
             The checkpoints are in {} (table kinesis_checkpoints).",
            db.display()
        );
    } else {
        println!("FAIL: see the checks marked FAIL above.");
    }
    Ok(ok)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    First,
    Second,
}

struct Handled {
    run: Run,
    shard: ShardId,
    sequence_number: SequenceNumber,
    order: Option<u64>,
}

/// What the handler saw, over both runs.
#[derive(Default)]
struct Tally {
    handled: Vec<Handled>,
    unique: HashSet<(ShardId, SequenceNumber)>,
    /// Records handled a second time (by either run).
    reread: u64,
}

struct RunSummary {
    total: u64,
    count: BTreeMap<ShardId, u64>,
    first: BTreeMap<ShardId, SequenceNumber>,
    last: BTreeMap<ShardId, SequenceNumber>,
}

impl Tally {
    fn note(&mut self, run: Run, record: &Record) {
        if !self
            .unique
            .insert((record.shard_id.clone(), record.sequence_number))
        {
            self.reread += 1;
        }
        self.handled.push(Handled {
            run,
            shard: record.shard_id.clone(),
            sequence_number: record.sequence_number,
            order: parse_order(&record.data),
        });
    }

    fn handled_in(&self, run: Run) -> u64 {
        self.handled.iter().filter(|h| h.run == run).count() as u64
    }

    fn run_summary(&self, run: Run) -> RunSummary {
        let mut summary = RunSummary {
            total: 0,
            count: BTreeMap::new(),
            first: BTreeMap::new(),
            last: BTreeMap::new(),
        };
        for h in self.handled.iter().filter(|h| h.run == run) {
            summary.total += 1;
            *summary.count.entry(h.shard.clone()).or_default() += 1;
            summary
                .first
                .entry(h.shard.clone())
                .or_insert(h.sequence_number);
            summary.last.insert(h.shard.clone(), h.sequence_number);
        }
        summary
    }
}

/// "order #17: ..." -> 17
fn parse_order(data: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(data).ok()?;
    let rest = text.strip_prefix("order #")?;
    rest[..rest.find(':')?].parse().ok()
}

/// Every record written: shard and sequence number (from PutRecords' answers) to order number.
#[derive(Default)]
struct Produced {
    by_shard: BTreeMap<ShardId, BTreeMap<SequenceNumber, u64>>,
}

impl Produced {
    fn len(&self) -> u64 {
        self.by_shard.values().map(|m| m.len() as u64).sum()
    }

    fn order_of(&self, shard: &str, sequence_number: SequenceNumber) -> Option<u64> {
        self.by_shard.get(shard)?.get(&sequence_number).copied()
    }

    /// The first record of `shard` after `after` (or its first record).
    fn first_after(&self, shard: &str, after: Option<SequenceNumber>) -> Option<SequenceNumber> {
        let records = self.by_shard.get(shard)?;
        match after {
            None => records.keys().next().copied(),
            Some(after) => records
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .next()
                .map(|(s, _)| *s),
        }
    }

    fn per_shard_count(&self) -> BTreeMap<ShardId, u64> {
        self.by_shard
            .iter()
            .map(|(shard, m)| (shard.clone(), m.len() as u64))
            .collect()
    }
}

fn describe(produced: &Produced, shard: &str, sequence_number: SequenceNumber) -> String {
    match produced.order_of(shard, sequence_number) {
        Some(order) => format!("order #{order}"),
        None => format!("unknown record {sequence_number}"),
    }
}

fn per_shard(counts: &BTreeMap<ShardId, u64>) -> String {
    if counts.is_empty() {
        return "none".to_owned();
    }
    counts
        .iter()
        .map(|(shard, n)| format!("{shard}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A consumer of the demo stream, tuned to be quick on an emulator: short polling intervals and
/// small GetRecords answers (50 records), so that run 1 stops part-way through the stream.
fn new_consumer(endpoint: &str, store: SqliteStore) -> anyhow::Result<Consumer> {
    Ok(Consumer::builder()
        .client(kinesis_client(endpoint))
        .stream_name(STREAM)
        .app_name("demo")
        .start_position(StartPosition::TrimHorizon)
        .store(store)
        .max_records_per_call(50)
        .poll_interval(Duration::from_millis(10))
        .min_get_records_interval(Duration::from_millis(10))
        .build()?)
}

/// Runs `consumer` until run 1 has handled `STOP_AFTER` records, or run 2 has seen
/// `stop_at_unique` distinct records, or `DEADLINE` passed (then it answers `Ok(false)`).
async fn run_consumer(
    consumer: &Consumer,
    tally: &Arc<Mutex<Tally>>,
    run: Run,
    stop_at_unique: Option<u64>,
) -> Result<bool, kinesis_tower::Error> {
    let stop = Arc::new(Notify::new());
    // The per-record handler: note the record; ask for shutdown once the goal is reached.
    let handler = service_fn({
        let (tally, stop) = (tally.clone(), stop.clone());
        move |record: Record| {
            let mut tally = tally.lock().unwrap();
            tally.note(run, &record);
            let done = match stop_at_unique {
                None => tally.handled_in(run) >= STOP_AFTER,
                Some(goal) => tally.unique.len() as u64 >= goal,
            };
            if done {
                stop.notify_one();
            }
            std::future::ready(Ok::<_, BoxError>(()))
        }
    });
    let service = ServiceBuilder::new()
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .layer(PerRecordLayer::new())
        .service(handler);
    let reached_goal = Arc::new(AtomicBool::new(false));
    let shutdown = {
        let reached_goal = reached_goal.clone();
        async move {
            tokio::select! {
                () = stop.notified() => reached_goal.store(true, Ordering::SeqCst),
                () = tokio::time::sleep(DEADLINE) => {}
            }
        }
    };
    consumer.run_until(service, shutdown).await?;
    Ok(reached_goal.load(Ordering::SeqCst))
}

/// Serves ferrokinesis on 127.0.0.1 (a free port) in this process.
async fn start_emulator() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let options = ferrokinesis::store::StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        ..ferrokinesis::store::StoreOptions::default()
    };
    let (app, _store) = ferrokinesis::create_app(options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen on 127.0.0.1")?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("embedded Kinesis emulator stopped: {err}");
        }
    });
    Ok((endpoint, server))
}

/// A client for the emulator. Everything is explicit (endpoint, region, dummy credentials), so
/// the environment (`AWS_*` variables, ~/.aws) plays no part.
fn kinesis_client(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("demo", "demo", None, None, "demo"))
        .build();
    Client::from_conf(config)
}

async fn create_stream(client: &Client) -> anyhow::Result<()> {
    client
        .create_stream()
        .stream_name(STREAM)
        .shard_count(SHARDS)
        .send()
        .await
        .context("CreateStream")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(STREAM)
            .send()
            .await
            .context("DescribeStreamSummary")?;
        if summary
            .stream_description_summary()
            .is_some_and(|s| *s.stream_status() == StreamStatus::Active)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("stream {STREAM} is not ACTIVE after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn list_shards(client: &Client) -> anyhow::Result<Vec<ShardId>> {
    // Two shards fit in one page.
    let out = client
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await
        .context("ListShards")?;
    let mut shards: Vec<ShardId> = out
        .shards()
        .iter()
        .map(|s| ShardId::from(s.shard_id()))
        .collect();
    shards.sort();
    Ok(shards)
}

/// Writes orders `range` with PutRecords, and notes where each one landed.
async fn put_orders(
    client: &Client,
    range: std::ops::RangeInclusive<u64>,
    produced: &mut Produced,
) -> anyhow::Result<()> {
    const ITEMS: [&str; 5] = ["coffee beans", "teapot", "mug", "grinder", "filter papers"];
    let orders: Vec<u64> = range.collect();
    let entries = orders
        .iter()
        .map(|&n| {
            let customer = n % 97;
            let data = format!(
                "order #{n}: {} x {} for customer-{customer}",
                n % 3 + 1,
                ITEMS[(n % 5) as usize]
            );
            put::entry(format!("customer-{customer}"), None, data)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let written = put::Writer::new(client.clone(), STREAM)
        .put_all(entries)
        .await?;
    for (n, (shard, sequence_number)) in orders.into_iter().zip(written) {
        produced
            .by_shard
            .entry(ShardId::from(shard))
            .or_default()
            .insert(SequenceNumber::parse(&sequence_number)?, n);
    }
    Ok(())
}

/// Deletes the checkpoint database (and SQLite's WAL side files) so each demo starts afresh.
fn remove_database(db: &Path) -> anyhow::Result<()> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut path = db.as_os_str().to_owned();
        path.push(suffix);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot delete {path:?}")),
        }
    }
    Ok(())
}
