//! Shared support for the integration tests (`mod common;` in each test file).
//!
//! Two Kinesis back-ends:
//! * kinesis-mock, an external process on `KINESIS_MOCK_ENDPOINT` (default
//!   `http://127.0.0.1:4570`), started by `scripts/env.sh` (`ensure_kinesis_mock`, which
//!   `scripts/test` calls). Use it for resharding, ListShards pagination, ChildShards,
//!   UpdateShardCount and enhanced fan-out.
//! * ferrokinesis, embedded in the test process on a `127.0.0.1:0` listener
//!   ([`start_ferrokinesis`]). Fast and isolated, but with known quirks (no ListShards
//!   pagination, no ChildShards, MillisBehindLatest always 0): don't test those paths on it.
//!
//! The helpers panic with a descriptive message on failure: they are test set-up, not the
//! code under test.
#![allow(dead_code)]

pub mod example;
#[path = "../../examples/support/put.rs"]
mod put;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::types::{Shard, StreamStatus};
use aws_sdk_kinesis::Client;

/// Default endpoint of the external kinesis-mock emulator.
pub const DEFAULT_KINESIS_MOCK_ENDPOINT: &str = "http://127.0.0.1:4570";

/// Endpoint of the external kinesis-mock: `KINESIS_MOCK_ENDPOINT`, else
/// [`DEFAULT_KINESIS_MOCK_ENDPOINT`].
pub fn kinesis_mock_endpoint() -> String {
    std::env::var("KINESIS_MOCK_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_KINESIS_MOCK_ENDPOINT.to_string())
}

/// A client for the external kinesis-mock (see [`kinesis_mock_endpoint`]).
pub async fn kinesis_mock_client() -> Client {
    kinesis_client(&kinesis_mock_endpoint()).await
}

/// A client for an emulator at `endpoint`: region us-east-1, static `test`/`test`
/// credentials, the SDK's default retries.
pub async fn kinesis_client(endpoint: &str) -> Client {
    Client::new(&sdk_config(endpoint).await)
}

/// Like [`kinesis_client`] but with SDK retries off, for tests that assert error codes
/// (the SDK retries 5xx and throttling errors by default).
pub async fn kinesis_client_without_retries(endpoint: &str) -> Client {
    let config = aws_sdk_kinesis::config::Builder::from(&sdk_config(endpoint).await)
        .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
        .build();
    Client::from_conf(config)
}

async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "kinesis-tower-tests",
        ))
        .endpoint_url(endpoint)
        .load()
        .await
}

/// An in-process ferrokinesis serving on `127.0.0.1:<ephemeral port>`.
/// The server task is aborted when this is dropped.
pub struct EmbeddedKinesis {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    pub addr: std::net::SocketAddr,
    /// A client for this emulator (default retries).
    pub client: Client,
    /// The emulator's state, for white-box inspection.
    pub store: ferrokinesis::store::Store,
    server: tokio::task::JoinHandle<()>,
}

impl EmbeddedKinesis {
    /// A fresh client for this emulator with SDK retries off.
    pub async fn client_without_retries(&self) -> Client {
        kinesis_client_without_retries(&self.endpoint).await
    }
}

impl Drop for EmbeddedKinesis {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Starts an embedded ferrokinesis with no create/delete/update delays and a shard limit
/// of 1000 (its default limit is 10 and its default delays are 500 ms).
pub async fn start_ferrokinesis() -> EmbeddedKinesis {
    start_ferrokinesis_with(|options| options).await
}

/// [`start_ferrokinesis`] with more options set by `configure` (e.g. a short SubscribeToShard
/// session).
pub async fn start_ferrokinesis_with(
    configure: impl FnOnce(ferrokinesis::store::StoreOptions) -> ferrokinesis::store::StoreOptions,
) -> EmbeddedKinesis {
    let options = configure(ferrokinesis::store::StoreOptions {
        create_stream_ms: 0,
        delete_stream_ms: 0,
        update_stream_ms: 0,
        shard_limit: 1000,
        ..ferrokinesis::store::StoreOptions::default()
    });
    let (app, store) = ferrokinesis::create_app(options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0 for ferrokinesis");
    let addr = listener.local_addr().expect("ferrokinesis local_addr");
    let server = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("embedded ferrokinesis stopped: {err}");
        }
    });
    let endpoint = format!("http://{addr}");
    let client = kinesis_client(&endpoint).await;
    EmbeddedKinesis {
        endpoint,
        addr,
        client,
        store,
        server,
    }
}

/// A stream name unique across test processes and calls:
/// `<prefix>-<pid>-<nanos since epoch>-<counter>`.
pub fn unique_stream_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos}-{n}", std::process::id())
}

/// Creates a provisioned stream with `shards` shards and waits (up to 30 s) until it is
/// ACTIVE.
pub async fn create_stream(client: &Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateStream {name}: {}", error_chain(e)));
    wait_for_stream_active(client, name, Duration::from_secs(30)).await;
}

/// Polls DescribeStreamSummary until the stream is ACTIVE; panics after `timeout`.
pub async fn wait_for_stream_active(client: &Client, name: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = match client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
        {
            Ok(out) => out
                .stream_description_summary()
                .map(|s| s.stream_status().clone()),
            Err(e) if is_resource_not_found(&e) => None,
            Err(e) => panic!("DescribeStreamSummary {name}: {}", error_chain(e)),
        };
        if status == Some(StreamStatus::Active) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("stream {name} not ACTIVE after {timeout:?} (last status: {status:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes a stream (and its consumers); a stream that does not exist is not an error.
pub async fn delete_stream(client: &Client, name: &str) {
    match client
        .delete_stream()
        .stream_name(name)
        .enforce_consumer_deletion(true)
        .send()
        .await
    {
        Ok(_) => {}
        Err(e) if is_resource_not_found(&e) => {}
        Err(e) => panic!("DeleteStream {name}: {}", error_chain(e)),
    }
}

/// Writes `records` (partition key, data) with PutRecords in requests of at most 500
/// records / 5 MiB, sending the rejected entries of partial failures again (up to 20 attempts,
/// waits from up to 25 ms doubling to 500 ms). Returns each record's `(shard_id,
/// sequence_number)`, in input order.
pub async fn put_records(
    client: &Client,
    stream: &str,
    records: &[(String, Vec<u8>)],
) -> Vec<(String, String)> {
    let entries: Vec<_> = records
        .iter()
        .map(|(key, data)| {
            put::entry(key.clone(), None, data.clone()).expect("an entry with its required fields")
        })
        .collect();
    put::Writer::new(client.clone(), stream)
        .max_attempts(20)
        .backoff(Duration::from_millis(25), Duration::from_millis(500))
        .put_all(entries)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// All shards of a stream (open and closed), following ListShards `NextToken`s with the
/// service's default page size. The follow-up requests carry only the token (Kinesis
/// rejects StreamName together with NextToken).
pub async fn list_all_shards(client: &Client, stream: &str) -> Vec<Shard> {
    list_all_shards_paged(client, stream, None).await
}

/// [`list_all_shards`] with an explicit page size (`MaxResults`), to exercise pagination.
/// Don't pass a small page size to ferrokinesis: its NextToken handling is broken.
pub async fn list_all_shards_paged(
    client: &Client,
    stream: &str,
    page_size: Option<i32>,
) -> Vec<Shard> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    let mut pages = 0usize;
    loop {
        let request = match &next_token {
            None => client.list_shards().stream_name(stream),
            Some(token) => client.list_shards().next_token(token),
        };
        let out = request
            .set_max_results(page_size)
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListShards {stream}: {}", error_chain(e)));
        shards.extend_from_slice(out.shards());
        pages += 1;
        assert!(pages <= 100_000, "ListShards {stream}: too many pages");
        match out.next_token() {
            Some(token) if !token.is_empty() => next_token = Some(token.to_string()),
            _ => return shards,
        }
    }
}

fn is_resource_not_found<E, R>(err: &aws_sdk_kinesis::error::SdkError<E, R>) -> bool
where
    E: aws_sdk_kinesis::error::ProvideErrorMetadata,
{
    err.as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "ResourceNotFoundException")
}

/// An error with all its sources, for panic messages (SdkError's Display alone says only
/// "service error").
pub fn error_chain(err: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(err))
}

/// The floor the benches compare with: every record of every shard with bare aws-sdk-kinesis
/// GetRecords loops, one task per shard, as fast as it goes; answers how many it read.
pub async fn bare_sdk_loop(client: &aws_sdk_kinesis::Client, stream: &str) -> u64 {
    let shards = list_all_shards(client, stream).await;
    let mut tasks = Vec::new();
    for shard in shards {
        let (client, stream) = (client.clone(), stream.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut iterator = client
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(shard.shard_id)
                .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("iterator")
                .shard_iterator;
            let mut read = 0u64;
            while let Some(it) = iterator {
                let page = client
                    .get_records()
                    .shard_iterator(it)
                    .limit(10_000)
                    .send()
                    .await
                    .expect("records");
                if page.records.is_empty() {
                    break;
                }
                read += page.records.len() as u64;
                iterator = page.next_shard_iterator;
            }
            read
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("reader");
    }
    total
}

/// The PostgreSQL the tests use: `KT_POSTGRES_URL`, else the local server's `test` database.
pub fn postgres_url() -> String {
    std::env::var("KT_POSTGRES_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The DynamoDB the tests use: `AWS_ENDPOINT_URL_DYNAMODB`, else dynalite on 127.0.0.1:4568.
pub fn dynamodb_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:4568".to_owned())
}

/// A DynamoDB client for [`dynamodb_endpoint`]: region us-east-1, test credentials.
#[cfg(feature = "dynamodb")]
pub async fn dynamodb_client() -> aws_sdk_dynamodb::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "kinesis-tower-tests",
        ))
        .endpoint_url(dynamodb_endpoint())
        .load()
        .await;
    aws_sdk_dynamodb::Client::new(&config)
}

/// The complete lines of the audit consumer's log (`examples/audit_consumer.rs`), each split
/// into its four tab-separated fields. A line the consumer is writing at that moment (not yet
/// ended by its newline) is left out: it is read complete next time.
pub fn audit_lines(path: &std::path::Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .map(|line| {
            let fields: Vec<String> = line.split('\t').map(str::to_owned).collect();
            assert_eq!(fields.len(), 4, "malformed audit line {line:?}");
            fields
        })
        .collect()
}

/// A consumer running `process_until` in a task, until [`Running::stop`] (or a drop of the
/// stop signal).
pub struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    run: Option<tokio::task::JoinHandle<Result<(), kinesis_tower::Error>>>,
}

impl Running {
    /// Starts `consumer.process_until(handler, ..)` in a task.
    pub fn start<S>(consumer: &kinesis_tower::Consumer, handler: S) -> Self
    where
        S: tower::Service<kinesis_tower::Batch> + Send + 'static,
        S::Response: Into<kinesis_tower::Processed>,
        S::Future: Send + 'static,
        S::Error: Into<kinesis_tower::BoxError>,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(consumer.process_until(handler, async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            run: Some(run),
        }
    }

    /// Asks the run to stop, without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the run and waits (up to 60 s) for how it ended; `None` if it was waited for
    /// already.
    pub async fn stop(&mut self) -> Option<Result<(), kinesis_tower::Error>> {
        self.signal_stop();
        let run = self.run.take()?;
        Some(
            tokio::time::timeout(Duration::from_secs(60), run)
                .await
                .expect("the consumer did not stop within 60 s")
                .expect("the consumer's task"),
        )
    }
}
