//! One handler stack (`examples/support/orders.rs`), two hosts:
//!
//! - the built `lambda` example, under the real `lambda_runtime`, against a Lambda Runtime API
//!   served by this test on 127.0.0.1 (next invocation, response, error), invoked with Kinesis
//!   events in Lambda's shape: the answers are checked, partial batch responses included;
//! - the same stack, unchanged, under `Consumer::run_until` over an embedded Kinesis emulator.
#![cfg(feature = "lambda")]

mod common;

#[path = "../examples/support/orders.rs"]
mod orders;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::kpl::Aggregator;
use kinesis_tower::per_record::RecordFailed;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::{
    Checkpoint, CheckpointStore, Consumer, Error, Record, SequenceNumber, StartPosition,
};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::Layer;

const PLAIN: &str = include_str!("data/lambda/plain.json");
const AGGREGATED: &str = include_str!("data/lambda/aggregated.json");
const SHARDS: &str = include_str!("data/lambda/shards.json");
const KPL_VECTORS: &str = include_str!("data/kpl/vectors.json");

/// What the function answered for an invocation.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    /// `POST .../invocation/{id}/response` and its JSON body.
    Response(Value),
    /// `POST .../invocation/{id}/error`: the `lambda-runtime-function-error-type` header and
    /// the JSON body.
    Error(String, Value),
}

/// The Runtime API's state: invocations not yet taken, and the answers, by request id.
#[derive(Default)]
struct Api {
    queue: Mutex<VecDeque<(String, String)>>,
    queued: Notify,
    answers: Mutex<Vec<(String, Answer)>>,
}

/// `GET /2018-06-01/runtime/invocation/next`: the next event, with the headers the runtime
/// requires; a long poll while none is queued, as Lambda's.
async fn next(State(api): State<Arc<Api>>) -> (StatusCode, HeaderMap, String) {
    let (id, body) = loop {
        let notified = api.queued.notified();
        if let Some(invocation) = api.queue.lock().unwrap().pop_front() {
            break invocation;
        }
        notified.await;
    };
    let deadline = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + Duration::from_secs(60);
    let mut headers = HeaderMap::new();
    headers.insert("lambda-runtime-aws-request-id", id.parse().unwrap());
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.as_millis().to_string().parse().unwrap(),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-2:123456789012:function:orders"
            .parse()
            .unwrap(),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
            .parse()
            .unwrap(),
    );
    headers.insert("content-type", "application/json".parse().unwrap());
    (StatusCode::OK, headers, body)
}

async fn response(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    body: String,
) -> (StatusCode, &'static str) {
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    api.answers
        .lock()
        .unwrap()
        .push((id, Answer::Response(body)));
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#)
}

async fn error(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: String,
) -> (StatusCode, &'static str) {
    let kind = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
    api.answers
        .lock()
        .unwrap()
        .push((id, Answer::Error(kind, body)));
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#)
}

/// Serves the Runtime API on 127.0.0.1; its `host:port`.
async fn serve(api: Arc<Api>) -> String {
    let app = Router::new()
        .route("/2018-06-01/runtime/invocation/next", get(next))
        .route(
            "/2018-06-01/runtime/invocation/{id}/response",
            post(response),
        )
        .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

/// The function process; killed when dropped.
struct Function {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    log: std::path::PathBuf,
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Function {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn start(runtime_api: &str, dir: &std::path::Path) -> Function {
    let example = common::example::build("lambda");
    let log = dir.join("stderr.log");
    let mut child = std::process::Command::new(&example)
        .env("AWS_LAMBDA_RUNTIME_API", runtime_api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "orders")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("RUST_LOG", "warn")
        .env_remove("AWS_LAMBDA_MAX_CONCURRENCY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start the lambda example");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let lines = stdout.clone();
    let pipe = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push(line);
        }
    });
    Function { child, stdout, log }
}

/// The `sequenceNumber`s of an event, in order.
fn sequence_numbers(event: &Value) -> Vec<String> {
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kinesis"]["sequenceNumber"].as_str().unwrap().to_owned())
        .collect()
}

/// The aggregated fixture with the aggregate replaced by one whose second user record is
/// binary (not an order).
fn aggregate_with_a_bad_user_record() -> Value {
    let vectors: Vec<Value> = serde_json::from_str(KPL_VECTORS).unwrap();
    let binary = vectors
        .iter()
        .find(|v| v["name"] == "binary data")
        .expect("the binary data vector");
    let mut event: Value = serde_json::from_str(AGGREGATED).unwrap();
    event["Records"][1]["kinesis"]["data"] = binary["data"].clone();
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_answers_lambda_with_partial_batch_responses() {
    let api = Arc::new(Api::default());
    let address = serve(api.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    let shards: Value = serde_json::from_str(SHARDS).unwrap();
    let plain: Value = serde_json::from_str(PLAIN).unwrap();
    let aggregated: Value = serde_json::from_str(AGGREGATED).unwrap();
    let bad_aggregate = aggregate_with_a_bad_user_record();
    let mut bad_sequence = shards.clone();
    bad_sequence["Records"][0]["kinesis"]["sequenceNumber"] = "49590x".into();
    let invocations = [
        ("all-orders", &shards),
        // Record 2 of plain.json is binary: the function fails part-way.
        ("binary-at-2", &plain),
        ("aggregated", &aggregated),
        ("bad-user-record", &bad_aggregate),
        ("bad-sequence-number", &bad_sequence),
    ];
    for (id, event) in &invocations {
        api.queue
            .lock()
            .unwrap()
            .push_back((id.to_string(), event.to_string()));
    }
    api.queued.notify_waiters();
    let function = start(&address, dir.path());

    let deadline = Instant::now() + Duration::from_secs(120);
    while api.answers.lock().unwrap().len() < invocations.len() {
        // The first /next may come after the notification: wake it again.
        api.queued.notify_waiters();
        assert!(
            Instant::now() < deadline,
            "{} answers in 120 s: {:?}; log:\n{}",
            api.answers.lock().unwrap().len(),
            api.answers.lock().unwrap(),
            function.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answers = api.answers.lock().unwrap().clone();
    let ids: Vec<&str> = answers.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        invocations.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "one invocation at a time, in order"
    );
    let answer = |id: &str| answers.iter().find(|(i, _)| i == id).unwrap().1.clone();
    let none = Answer::Response(json!({"batchItemFailures": []}));
    let failure =
        |seq: &str| Answer::Response(json!({"batchItemFailures": [{"itemIdentifier": seq}]}));

    assert_eq!(answer("all-orders"), none);
    assert_eq!(answer("binary-at-2"), failure(&sequence_numbers(&plain)[2]));
    assert_eq!(answer("aggregated"), none);
    // A user record of the aggregate fails: the answer is the aggregate.
    assert_eq!(
        answer("bad-user-record"),
        failure(&sequence_numbers(&bad_aggregate)[1])
    );
    match answer("bad-sequence-number") {
        Answer::Error(kind, body) => {
            assert_eq!(kind, "unhandled");
            assert_eq!(body["errorType"], "KinesisTower.InvalidEvent");
            let message = body["errorMessage"].as_str().unwrap();
            assert!(message.contains("49590x"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // What the handler printed: each order handled once, nothing after a failure.
    let stdout = function.stdout.lock().unwrap().clone();
    let s = sequence_numbers(&shards);
    let p = sequence_numbers(&plain);
    let a = sequence_numbers(&aggregated);
    let expected = vec![
        format!("shardId-000000000000 {} a: a-0", s[0]),
        format!("shardId-000000000000 {} a: a-1", s[1]),
        format!("shardId-000000000001 {} b: b-0", s[2]),
        format!("shardId-000000000001 {} b: b-1", s[3]),
        format!("shardId-000000000001 {} b: b-2", s[4]),
        format!("shardId-000000000006 {} customer-1: order-1", p[0]),
        format!("shardId-000000000006 {} customer-2: order-2", p[1]),
        format!("shardId-000000000002 {} plain-before: before", a[0]),
        format!("shardId-000000000002 {}/0 clé-ü: 1", a[1]),
        format!("shardId-000000000002 {}/1 日本語キー: 2", a[1]),
        format!("shardId-000000000002 {}/2 🎉🎉🎉: 3", a[1]),
        format!("shardId-000000000002 {}/3 clé-ü: 4", a[1]),
        format!("shardId-000000000002 {} plain-after: after", a[2]),
        // The bad aggregate's event: the plain record before it, then its first user record
        // is binary: nothing more.
        format!("shardId-000000000002 {} plain-before: before", a[0]),
    ];
    assert_eq!(stdout, expected, "log:\n{}", function.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_stack_runs_under_the_consumer() {
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("lambda-stack");
    common::create_stream(&kinesis.client, &stream, 1).await;
    let mut aggregator = Aggregator::new();
    for i in 0..3 {
        aggregator
            .add(&format!("user-{i}"), None, format!("kpl-order-{i}"))
            .unwrap();
    }
    let aggregate = aggregator.finish().unwrap();
    let mut records: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("customer-{i}"), format!("order-{i}").into_bytes()))
        .collect();
    records.push((aggregate.partition_key.clone(), aggregate.data.to_vec()));
    let written = common::put_records(&kinesis.client, &stream, &records).await;

    let store = Arc::new(MemoryStore::new());
    let consumer = Consumer::builder()
        .client(kinesis.client.clone())
        .stream_name(&stream)
        .start_position(StartPosition::TrimHorizon)
        .store_arc(store.clone())
        .build()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = {
        let seen = seen.clone();
        move |record: &Record, order: &str| seen.lock().unwrap().push(orders::line(record, order))
    };
    // The stack of the example, as it is; a consumer adds the checkpoints.
    let service =
        CheckpointLayer::new(consumer.checkpointer()).layer(orders::stack(&stream, out.clone()));
    let stop = Arc::new(Notify::new());
    let run = tokio::spawn({
        let stop = stop.clone();
        consumer.run_until(service, async move { stop.notified().await })
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 6 {
        assert!(Instant::now() < deadline, "{:?}", seen.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.notify_one();
    run.await.unwrap().unwrap();
    let (shard, last) = written.last().unwrap().clone();
    let expected: Vec<String> = (0..3)
        .map(|i| format!("{shard} {} customer-{i}: order-{i}", written[i].1))
        .chain((0..3).map(|i| format!("{shard} {last}/{i} user-{i}: kpl-order-{i}")))
        .collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    let last = SequenceNumber::parse(&last).unwrap();
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(Checkpoint::at(last))
    );

    // A record that is not an order ends the run with the error naming it, as the function
    // answers it; the checkpoint stays before it.
    let more = vec![
        ("customer-9".to_owned(), vec![0xff, 0xfe]),
        ("customer-10".to_owned(), b"order-10".to_vec()),
    ];
    let bad = common::put_records(&kinesis.client, &stream, &more).await;
    seen.lock().unwrap().clear();
    let service = CheckpointLayer::new(consumer.checkpointer()).layer(orders::stack(&stream, out));
    let error = tokio::time::timeout(Duration::from_secs(60), consumer.run(service))
        .await
        .expect("the run ends on the bad record")
        .unwrap_err();
    assert!(matches!(error, Error::Handler { .. }), "{error}");
    let failed = RecordFailed::find(&error).expect("the error names the record");
    assert_eq!(
        failed.position,
        Checkpoint::at(SequenceNumber::parse(&bad[0].1).unwrap())
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    assert_eq!(
        store.get(consumer.namespace(), &shard).await.unwrap(),
        Some(Checkpoint::at(last))
    );
}
