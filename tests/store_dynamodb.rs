//! `DynamoDbStore` against dynalite on 127.0.0.1 (`AWS_ENDPOINT_URL_DYNAMODB`, default
//! `http://127.0.0.1:4568`; `scripts/env.sh` `ensure_dynalite` starts it).
//!
//! The conformance suite runs against the store and the buffered store (server-side monotonic
//! across two handles, 128-digit sequence numbers, sub-sequence order, shard end, concurrent
//! writers); the tests below cover what is DynamoDB's own: the item attributes, the table
//! schema, Query pagination, table names, a missing table, an unreachable endpoint, corrupt
//! items, and a consumer on the buffered store.
//!
//! Every test creates its own table (unique name) and deletes it.
#![cfg(feature = "dynamodb")]

mod common;
mod conformance;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{AttributeValue, BillingMode, KeyType};
use aws_sdk_dynamodb::Client;
use kinesis_tower::store::DynamoDbStore;
use kinesis_tower::Checkpoint;
use kinesis_tower::{CheckpointStore, StoreError};
use kinesis_tower_layers::testing::at;

fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "http://127.0.0.1:4568".to_owned())
}

async fn client_for(endpoint: &str, retries: bool) -> Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "tests"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let mut builder = aws_sdk_dynamodb::config::Builder::from(&config);
    if !retries {
        builder = builder.retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled());
    }
    Client::from_conf(builder.build())
}

async fn client() -> Client {
    client_for(&endpoint(), true).await
}

fn unique_table(test: &str) -> String {
    common::unique_stream_name(&format!("kt-{test}"))
}

/// A fresh table, created through the store.
async fn table(test: &str) -> DynamoDbStore {
    let store = DynamoDbStore::new(client().await, &unique_table(test)).unwrap();
    store
        .create_table()
        .await
        .unwrap_or_else(|e| panic!("create table on {}: {e}", endpoint()));
    store
}

async fn drop_table(store: &DynamoDbStore) {
    store
        .client()
        .delete_table()
        .table_name(store.table())
        .send()
        .await
        .unwrap();
}

/// A handle on the table named `scope`, creating it on first use.
async fn scoped(scope: &str) -> DynamoDbStore {
    let store = DynamoDbStore::new(client().await, scope).unwrap();
    store
        .create_table()
        .await
        .unwrap_or_else(|e| panic!("create table on {}: {e}", endpoint()));
    store
}

async fn drop_scoped(scope: &str) {
    drop_table(&DynamoDbStore::new(client().await, scope).unwrap()).await;
}

conformance::suite!(
    dynamodb_store,
    make =
        |scope: String| async move { Arc::new(scoped(&scope).await) as Arc<dyn CheckpointStore> },
    cleanup = |scope: String| async move { drop_scoped(&scope).await },
);

conformance::suite!(
    buffered_dynamodb_store,
    make = |scope: String| async move {
        // A long interval: only explicit flushes write, which is what the suite checks.
        Arc::new(
            scoped(&scope)
                .await
                .buffered()
                .flush_interval(Duration::from_secs(3600)),
        ) as Arc<dyn CheckpointStore>
    },
    cleanup = |scope: String| async move { drop_scoped(&scope).await },
);

#[tokio::test]
async fn items_carry_the_documented_attributes() {
    let s = table("attributes").await;
    let big = "7".repeat(128);
    let checkpoint = Checkpoint::Sequence {
        sequence_number: big.parse().unwrap(),
        sub_sequence_number: Some(3),
    };
    s.set("app/stream", "shardId-1", checkpoint).await.unwrap();
    s.set("app/stream", "shardId-2", Checkpoint::ShardEnd)
        .await
        .unwrap();
    let item = |shard: &'static str| {
        let s = s.clone();
        async move {
            s.client()
                .get_item()
                .table_name(s.table())
                .consistent_read(true)
                .key("namespace", AttributeValue::S("app/stream".into()))
                .key("shard_id", AttributeValue::S(shard.into()))
                .send()
                .await
                .unwrap()
                .item()
                .cloned()
                .unwrap()
        }
    };
    let one: HashMap<String, AttributeValue> = item("shardId-1").await;
    assert_eq!(one["sequence_number"], AttributeValue::S(big.clone()));
    assert_eq!(one["sub_sequence_number"], AttributeValue::N("3".into()));
    assert_eq!(one["shard_end"], AttributeValue::Bool(false));
    assert_eq!(one["sort_key"], AttributeValue::S(checkpoint.sort_key()));
    let updated = one["updated_at"].as_s().unwrap();
    assert!(
        updated.len() >= 20 && updated.ends_with('Z'),
        "RFC 3339: {updated}"
    );
    let two = item("shardId-2").await;
    assert_eq!(two["shard_end"], AttributeValue::Bool(true));
    assert!(!two.contains_key("sequence_number"));
    assert_eq!(two["sort_key"], AttributeValue::S("z".into()));
    drop_table(&s).await;
}

#[tokio::test]
async fn list_follows_query_pages_and_keeps_namespaces_apart() {
    let s = table("list").await.list_page_size(2);
    for i in (0..7).rev() {
        s.set("a", &format!("shardId-{i:03}"), at(i + 10))
            .await
            .unwrap();
    }
    s.set("b", "shardId-000", Checkpoint::ShardEnd)
        .await
        .unwrap();
    let listed = s.list("a").await.unwrap();
    let expected: Vec<(String, Checkpoint)> = (0..7)
        .map(|i| (format!("shardId-{i:03}"), at(i + 10)))
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(
        s.list("b").await.unwrap(),
        vec![("shardId-000".to_owned(), Checkpoint::ShardEnd)]
    );
    assert_eq!(s.list("c").await.unwrap(), vec![]);
    drop_table(&s).await;
}

#[tokio::test]
async fn create_table_is_idempotent_and_makes_the_documented_schema() {
    let s = table("schema").await;
    s.create_table().await.unwrap();
    let description = s
        .client()
        .describe_table()
        .table_name(s.table())
        .send()
        .await
        .unwrap();
    let t = description.table().unwrap();
    let keys: Vec<(String, KeyType)> = t
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name().to_owned(), k.key_type().clone()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("namespace".to_owned(), KeyType::Hash),
            ("shard_id".to_owned(), KeyType::Range)
        ]
    );
    assert_eq!(
        t.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );
    drop_table(&s).await;
}

#[tokio::test]
async fn invalid_table_names_are_rejected() {
    let c = client().await;
    for bad in ["", "ab", "a b", "a/b", "tä", &"x".repeat(256)] {
        let err = DynamoDbStore::new(c.clone(), bad).unwrap_err();
        assert!(
            matches!(err, StoreError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    DynamoDbStore::new(c, "my.checkpoints-2_x").unwrap();
}

#[tokio::test]
async fn a_missing_table_is_a_clear_error_that_is_not_retried() {
    let table = unique_table("missing");
    let s = DynamoDbStore::new(client().await, &table).unwrap();
    let errors = [
        s.get("ns", "shardId-1").await.unwrap_err(),
        s.set("ns", "shardId-1", at(1)).await.unwrap_err(),
        s.list("ns").await.unwrap_err(),
    ];
    for err in errors {
        assert!(!err.is_retryable(), "{err}");
        let text = common::error_chain(err);
        assert!(
            text.contains(&table) && text.contains("create_table"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn reads_of_an_unreachable_endpoint_are_errors_never_missing_checkpoints() {
    // Nothing listens there (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let s = DynamoDbStore::new(
        client_for(&format!("http://127.0.0.1:{port}"), false).await,
        "kinesis_checkpoints",
    )
    .unwrap();
    let err = s.get("ns", "shardId-3").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("dynamodb") && text.contains("get") && text.contains("shardId-3"),
        "{text}"
    );
    assert!(s.list("ns").await.unwrap_err().is_retryable());
}

#[tokio::test]
async fn an_item_not_written_by_the_store_is_corrupt_not_missing() {
    let s = table("corrupt").await;
    s.client()
        .put_item()
        .table_name(s.table())
        .item("namespace", AttributeValue::S("ns".into()))
        .item("shard_id", AttributeValue::S("shard".into()))
        .item("sequence_number", AttributeValue::S("123".into()))
        .send()
        .await
        .unwrap();
    let err = s.get("ns", "shard").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    let err = s.list("ns").await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    drop_table(&s).await;
}

/// A consumer on the buffered store: the run's end flushes, so every shard's checkpoint is its
/// last record, and a second run delivers nothing again.
#[tokio::test]
async fn a_consumer_on_the_buffered_store_checkpoints_everything_by_the_end_of_its_run() {
    use kinesis_tower::checkpoint::CheckpointLayer;
    use kinesis_tower::{Batch, BoxError};
    use kinesis_tower::{Consumer, StartPosition};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_util::sync::CancellationToken;
    use tower::{service_fn, Layer};

    const TOTAL: usize = 600;
    let s = table("consumer").await;
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("ddb-consumer");
    common::create_stream(&kinesis.client, &stream, 2).await;
    let records: Vec<(String, Vec<u8>)> = (0..TOTAL)
        .map(|i| (format!("pk-{i}"), format!("id-{i}").into_bytes()))
        .collect();
    let written = common::put_records(&kinesis.client, &stream, &records).await;
    let mut last: HashMap<String, kinesis_tower::SequenceNumber> = HashMap::new();
    for (shard, seq) in written {
        let seq = seq.parse().unwrap();
        let entry = last.entry(shard).or_insert(seq);
        if seq > *entry {
            *entry = seq;
        }
    }

    let run = |stop_after: Option<usize>| {
        let store = DynamoDbStore::new(s.client().clone(), s.table())
            .unwrap()
            .buffered()
            .flush_interval(Duration::from_millis(200));
        let consumer = Consumer::builder()
            .client(kinesis.client.clone())
            .stream_name(&stream)
            .app_name("ddb-consumer")
            .start_position(StartPosition::TrimHorizon)
            .store(store)
            .max_records_per_call(50)
            .poll_interval(Duration::from_millis(20))
            .build()
            .unwrap();
        let handled = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let handler = service_fn({
            let handled = handled.clone();
            let stop = stop.clone();
            move |batch: Batch| {
                let n = handled.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
                if stop_after.is_some_and(|target| n >= target) {
                    stop.cancel();
                }
                async { Ok::<(), BoxError>(()) }
            }
        });
        let service = CheckpointLayer::new(consumer.checkpointer()).layer(handler);
        async move {
            let deadline = match stop_after {
                Some(_) => Duration::from_secs(60),
                // Nothing is left to read: a second of polling shows whether anything comes.
                None => Duration::from_secs(1),
            };
            let stopping = stop.clone();
            let timer = tokio::spawn(async move {
                tokio::time::sleep(deadline).await;
                stopping.cancel();
            });
            let result = consumer.run_until(service, stop.cancelled_owned()).await;
            timer.abort();
            result.unwrap();
            (
                consumer.namespace().to_owned(),
                handled.load(Ordering::SeqCst),
            )
        }
    };

    let (namespace, handled) = run(Some(TOTAL)).await;
    assert!(handled >= TOTAL, "first run handled {handled} of {TOTAL}");
    let stored: HashMap<String, Checkpoint> =
        s.list(&namespace).await.unwrap().into_iter().collect();
    assert_eq!(stored.len(), last.len(), "{stored:?}");
    for (shard, seq) in &last {
        assert_eq!(stored[shard], Checkpoint::at(*seq), "shard {shard}");
    }
    let (_, again) = run(None).await;
    assert_eq!(again, 0, "the second run re-delivered records");
    common::delete_stream(&kinesis.client, &stream).await;
    drop_table(&s).await;
}
