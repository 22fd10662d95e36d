//! The adapter over events in the JSON shape Lambda sends (`tests/data/lambda/*.json`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use lambda_runtime::Context as LambdaContext;
use tower::{service_fn, ServiceBuilder, ServiceExt};

use super::*;
use crate::checkpoint::CheckpointLayer;
use crate::kpl::DeaggregateLayer;
use crate::per_record::PerRecordLayer;
use crate::retry::RetryLayer;
use crate::store::MemoryStore;
use crate::Checkpointer;

const PLAIN: &str = include_str!("../../tests/data/lambda/plain.json");
const AGGREGATED: &str = include_str!("../../tests/data/lambda/aggregated.json");
const SHARDS: &str = include_str!("../../tests/data/lambda/shards.json");

fn event(json: &str) -> KinesisEvent {
    parse_event(json.as_bytes()).expect("a fixture in Lambda's shape")
}

/// The `sequenceNumber`s of a fixture, in order.
fn sequence_numbers(json: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    value["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kinesis"]["sequenceNumber"].as_str().unwrap().to_owned())
        .collect()
}

/// What a handler was given: (shard, sequence number, sub-sequence number, data), in order.
type Seen = Arc<Mutex<Vec<(String, String, Option<u64>, Vec<u8>)>>>;

fn keep(seen: &Seen, record: &Record) {
    seen.lock().unwrap().push((
        record.shard_id.to_string(),
        record.sequence_number.to_string(),
        record.sub_sequence_number,
        record.data.to_vec(),
    ));
}

/// A per-record handler that keeps what it is given and fails the records `fail` picks.
fn per_record(
    seen: &Seen,
    fail: impl Fn(&Record) -> bool + Clone + Send + Sync + 'static,
) -> impl Service<Batch, Response = Processed, Error = BoxError, Future: Send> + Clone + Send {
    let seen = seen.clone();
    PerRecordLayer::new().layer(service_fn(move |record: Record| {
        keep(&seen, &record);
        let failed = fail(&record);
        async move {
            if failed {
                return Err::<(), BoxError>(
                    format!("cannot load {}", record.sequence_number).into(),
                );
            }
            Ok(())
        }
    }))
}

/// Runs `event` through `service` as the runtime does: ready, then call.
async fn invoke<S>(service: S, event: KinesisEvent) -> Result<KinesisEventResponse, LambdaError>
where
    S: Service<LambdaEvent<KinesisEvent>, Response = KinesisEventResponse, Error = LambdaError>,
{
    service
        .oneshot(LambdaEvent::new(event, LambdaContext::default()))
        .await
}

/// The item identifiers of a response.
fn failures(response: &KinesisEventResponse) -> Vec<String> {
    response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone().expect("an item identifier"))
        .collect()
}

#[test]
fn plain_records_become_one_batch_of_their_shard() {
    let batches = batches(event(PLAIN)).unwrap();
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    assert_eq!(&*batch.shard_id, "shardId-000000000006");
    let sequences: Vec<String> = batch
        .records
        .iter()
        .map(|r| r.sequence_number.to_string())
        .collect();
    assert_eq!(sequences, sequence_numbers(PLAIN));
    let first = &batch.records[0];
    assert_eq!(&*first.shard_id, "shardId-000000000006");
    assert_eq!(&*first.partition_key, "customer-1");
    assert_eq!(first.data, "order-1");
    assert_eq!(first.sub_sequence_number, None);
    assert_eq!(
        first.approximate_arrival_timestamp,
        Some(UNIX_EPOCH + Duration::from_millis(1_545_084_650_987))
    );
    // Binary data comes through byte for byte.
    assert_eq!(&batch.records[2].data[..], &[0x00, 0xff, 0x10, 0x80, 0x7f]);
    // `1545084651.25` is 250 ms past the second (aws_lambda_events alone reads 25 ms).
    assert_eq!(
        batch.records[3].approximate_arrival_timestamp,
        Some(UNIX_EPOCH + Duration::from_millis(1_545_084_651_250))
    );
    assert_eq!(
        batch.records[2].approximate_arrival_timestamp,
        Some(UNIX_EPOCH + Duration::from_secs(1_545_084_651))
    );
    assert!(batch.records.iter().all(|r| r.shard_id == batch.shard_id));
}

#[test]
fn several_shards_make_one_batch_per_shard_in_the_event_order() {
    let first = batches(event(SHARDS)).unwrap();
    let shape: Vec<(String, usize)> = first
        .iter()
        .map(|b| (b.shard_id.to_string(), b.len()))
        .collect();
    assert_eq!(
        shape,
        [
            ("shardId-000000000000".to_owned(), 2),
            ("shardId-000000000001".to_owned(), 3)
        ]
    );
    let data: Vec<_> = first
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.data.clone()))
        .collect();
    assert_eq!(data, ["a-0", "a-1", "b-0", "b-1", "b-2"]);
    // A shard that comes back after another starts a new batch: order is the event's.
    let mut json: serde_json::Value = serde_json::from_str(SHARDS).unwrap();
    let records = json["Records"].as_array_mut().unwrap();
    let moved = records.remove(0);
    records.push(moved);
    let again = batches(parse_event(json.to_string().as_bytes()).unwrap()).unwrap();
    let shards: Vec<String> = again.iter().map(|b| b.shard_id.to_string()).collect();
    assert_eq!(
        shards,
        [
            "shardId-000000000000",
            "shardId-000000000001",
            "shardId-000000000000"
        ]
    );
}

#[tokio::test]
async fn every_record_reaches_the_stack_in_order_and_success_answers_no_failure() {
    for fixture in [PLAIN, SHARDS] {
        let seen = Seen::default();
        let service = LambdaService::new(per_record(&seen, |_| false));
        let response = invoke(service, event(fixture)).await.unwrap();
        assert!(failures(&response).is_empty());
        let handled: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
        assert_eq!(handled, sequence_numbers(fixture));
        // Lambda reads `{"batchItemFailures": []}` as complete success.
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"batchItemFailures": []})
        );
    }
}

#[tokio::test]
async fn a_failure_at_record_k_answers_record_k() {
    let sequences = sequence_numbers(PLAIN);
    for k in 0..sequences.len() {
        let seen = Seen::default();
        let failing = sequences[k].clone();
        let stack = ServiceBuilder::new()
            .layer(LambdaLayer::new())
            .layer(RetryLayer::new())
            .layer(DeaggregateLayer::new())
            .service(per_record(&seen, move |r| {
                r.sequence_number.to_string() == failing
            }));
        let response = invoke(stack, event(PLAIN)).await.unwrap();
        assert_eq!(
            failures(&response),
            [sequences[k].clone()],
            "failure at {k}"
        );
        // The records before it were handled once, then record k, then nothing.
        let handled: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
        assert_eq!(handled, sequences[..=k], "failure at {k}");
        assert_eq!(
            serde_json::to_value(&response).unwrap(),
            serde_json::json!({"batchItemFailures": [{"itemIdentifier": sequences[k]}]})
        );
    }
}

#[tokio::test]
async fn a_batch_handler_error_without_a_position_answers_the_batch_first_record() {
    let sequences = sequence_numbers(SHARDS);
    // The second shard's batch fails: the first shard's batch was handled, the answer is
    // the first record of the second.
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let handler = service_fn(move |batch: Batch| {
        seen.lock().unwrap().push(batch.shard_id.to_string());
        async move {
            if &*batch.shard_id == "shardId-000000000001" {
                return Err::<(), BoxError>("the warehouse is down".into());
            }
            Ok(())
        }
    });
    let response = invoke(LambdaService::new(handler), event(SHARDS))
        .await
        .unwrap();
    assert_eq!(failures(&response), [sequences[2].clone()]);
    assert_eq!(
        *calls.lock().unwrap(),
        ["shardId-000000000000", "shardId-000000000001"]
    );

    // A batch handler that says where it failed, with `RecordFailed`.
    let handler = service_fn(|batch: Batch| async move {
        match batch.records.get(1) {
            Some(second) => Err::<(), BoxError>(RecordFailed::new(second, "bad order").into()),
            None => Ok(()),
        }
    });
    let response = invoke(LambdaService::new(handler), event(PLAIN))
        .await
        .unwrap();
    assert_eq!(failures(&response), [sequence_numbers(PLAIN)[1].clone()]);
}

#[tokio::test]
async fn later_shards_are_not_handed_over_after_a_stop() {
    let sequences = sequence_numbers(SHARDS);
    let seen = Seen::default();
    let failing = sequences[1].clone();
    let service = LambdaService::new(per_record(&seen, move |r| {
        r.sequence_number.to_string() == failing
    }));
    let response = invoke(service, event(SHARDS)).await.unwrap();
    assert_eq!(failures(&response), [sequences[1].clone()]);
    let shards: Vec<String> = seen.lock().unwrap().iter().map(|r| r.0.clone()).collect();
    assert_eq!(shards, ["shardId-000000000000", "shardId-000000000000"]);
}

#[tokio::test]
async fn aggregates_arrive_aggregated_and_a_failure_inside_one_answers_the_aggregate() {
    let sequences = sequence_numbers(AGGREGATED);
    // Without DeaggregateLayer the aggregate is one record.
    assert_eq!(batches(event(AGGREGATED)).unwrap()[0].len(), 3);

    let stack = |seen: &Seen, fail: Option<(usize, Option<u64>)>| {
        let sequences = sequences.clone();
        ServiceBuilder::new()
            .layer(LambdaLayer::new())
            .layer(DeaggregateLayer::new())
            .service(per_record(seen, move |r| {
                fail.is_some_and(|(i, sub)| {
                    r.sequence_number.to_string() == sequences[i] && r.sub_sequence_number == sub
                })
            }))
    };

    // Everything passes: the user records, with sub-sequence numbers, between the plain ones.
    let seen = Seen::default();
    let response = invoke(stack(&seen, None), event(AGGREGATED)).await.unwrap();
    assert!(failures(&response).is_empty());
    let handled: Vec<(String, Option<u64>, Vec<u8>)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.1.clone(), r.2, r.3.clone()))
        .collect();
    let expected = vec![
        (sequences[0].clone(), None, b"before".to_vec()),
        (sequences[1].clone(), Some(0), b"1".to_vec()),
        (sequences[1].clone(), Some(1), b"2".to_vec()),
        (sequences[1].clone(), Some(2), b"3".to_vec()),
        (sequences[1].clone(), Some(3), b"4".to_vec()),
        (sequences[2].clone(), None, b"after".to_vec()),
    ];
    assert_eq!(handled, expected);

    // User record 2 of the aggregate fails: the answer is the aggregate, whose user records
    // 0 and 1 were handled and will come again.
    let seen = Seen::default();
    let response = invoke(stack(&seen, Some((1, Some(2)))), event(AGGREGATED))
        .await
        .unwrap();
    assert_eq!(failures(&response), [sequences[1].clone()]);
    assert_eq!(seen.lock().unwrap().len(), 4);

    // The plain record after it fails: the answer is that record.
    let seen = Seen::default();
    let response = invoke(stack(&seen, Some((2, None))), event(AGGREGATED))
        .await
        .unwrap();
    assert_eq!(failures(&response), [sequences[2].clone()]);
}

/// A batch handler that answers `answer` for every batch.
fn answering(
    answer: Processed,
) -> LambdaService<
    impl Service<Batch, Response = Processed, Error = BoxError, Future: Send> + Clone + Send,
> {
    LambdaService::new(service_fn(move |_: Batch| async move {
        Ok::<_, BoxError>(answer)
    }))
}

fn at_record(json: &str, i: usize, sub: Option<u64>) -> Checkpoint {
    Checkpoint::Sequence {
        sequence_number: SequenceNumber::parse(&sequence_numbers(json)[i]).unwrap(),
        sub_sequence_number: sub,
    }
}

#[tokio::test]
async fn checkpoint_at_answers_the_record_after_the_checkpoint() {
    let plain = sequence_numbers(PLAIN);
    let answer = |p| async move { invoke(answering(p), event(PLAIN)).await };
    let response = answer(Processed::CheckpointAt(at_record(PLAIN, 2, None)))
        .await
        .unwrap();
    assert_eq!(failures(&response), [plain[3].clone()]);
    // Up to the last record: all of it is processed.
    let response = answer(Processed::CheckpointAt(at_record(PLAIN, 4, None)))
        .await
        .unwrap();
    assert!(failures(&response).is_empty());
    // SkipCheckpoint keeps nothing: Lambda delivers the batch again.
    let response = answer(Processed::SkipCheckpoint).await.unwrap();
    assert_eq!(failures(&response), [plain[0].clone()]);
    // Past the batch: a handler bug, the whole batch fails with a message saying so.
    let past = Checkpoint::at(SequenceNumber::parse(&format!("{}0", plain[4])).unwrap());
    let error = answer(Processed::CheckpointAt(past)).await.unwrap_err();
    assert!(
        matches!(error, LambdaError::CheckpointPastBatch(_)),
        "{error}"
    );

    // Inside an aggregate: the aggregate, unless the checkpoint is its last user record.
    let aggregated = sequence_numbers(AGGREGATED);
    let answer = |p| async move { invoke(answering(p), event(AGGREGATED)).await };
    let response = answer(Processed::CheckpointAt(at_record(AGGREGATED, 1, Some(1))))
        .await
        .unwrap();
    assert_eq!(failures(&response), [aggregated[1].clone()]);
    let response = answer(Processed::CheckpointAt(at_record(AGGREGATED, 1, Some(3))))
        .await
        .unwrap();
    assert_eq!(failures(&response), [aggregated[2].clone()]);
}

#[tokio::test]
async fn retry_whole_batch_fails_the_invocation() {
    let seen = Seen::default();
    let service = LambdaService::new(PerRecordLayer::new().layer(service_fn({
        let seen = seen.clone();
        move |record: Record| {
            keep(&seen, &record);
            async move {
                Err::<(), BoxError>(RetryWholeBatch::new("the schema registry is gone").into())
            }
        }
    })));
    let error = invoke(service, event(PLAIN)).await.unwrap_err();
    let plain = sequence_numbers(PLAIN);
    match &error {
        LambdaError::RetryWholeBatch {
            shard_id,
            first_sequence_number,
            last_sequence_number,
            ..
        } => {
            assert_eq!(&**shard_id, "shardId-000000000006");
            assert_eq!(first_sequence_number.to_string(), plain[0]);
            assert_eq!(last_sequence_number.to_string(), plain[4]);
        }
        other => panic!("{other}"),
    }
    let diagnostic = Diagnostic::from(error);
    assert_eq!(diagnostic.error_type, "KinesisTower.RetryWholeBatch");
    assert!(
        diagnostic
            .error_message
            .contains("the schema registry is gone"),
        "{}",
        diagnostic.error_message
    );
}

#[tokio::test]
async fn without_partial_responses_any_stop_fails_the_invocation() {
    let plain = sequence_numbers(PLAIN);
    let seen = Seen::default();
    let failing = plain[3].clone();
    let service = LambdaLayer::new()
        .whole_batch_failures()
        .layer(per_record(&seen, move |r| {
            r.sequence_number.to_string() == failing
        }));
    let error = invoke(service, event(PLAIN)).await.unwrap_err();
    match &error {
        LambdaError::Failed {
            sequence_number, ..
        } => assert_eq!(sequence_number.to_string(), plain[3]),
        other => panic!("{other}"),
    }
    assert!(
        error.to_string().contains("ReportBatchItemFailures"),
        "{error}"
    );

    let service = LambdaLayer::new()
        .whole_batch_failures()
        .layer(service_fn(|_: Batch| async {
            Ok::<_, BoxError>(Processed::SkipCheckpoint)
        }));
    let error = invoke(service, event(PLAIN)).await.unwrap_err();
    assert!(matches!(error, LambdaError::Unprocessed { .. }), "{error}");

    let service = LambdaLayer::new()
        .whole_batch_failures()
        .layer(per_record(&Seen::default(), |_| false));
    assert!(failures(&invoke(service, event(PLAIN)).await.unwrap()).is_empty());
}

#[tokio::test]
async fn a_checkpoint_layer_in_the_stack_changes_no_answer() {
    let plain = sequence_numbers(PLAIN);
    for k in [0, 3] {
        let failing = plain[k].clone();
        let store = Arc::new(MemoryStore::new());
        let stack = ServiceBuilder::new()
            .layer(LambdaLayer::new())
            .layer(CheckpointLayer::new(Checkpointer::from_arc(
                store.clone(),
                "lambda/orders",
            )))
            .service(per_record(&Seen::default(), move |r| {
                r.sequence_number.to_string() == failing
            }));
        let response = invoke(stack, event(PLAIN)).await.unwrap();
        assert_eq!(failures(&response), [plain[k].clone()]);
    }
}

/// A stack whose readiness fails.
#[derive(Clone)]
struct NeverReady;

impl Service<Batch> for NeverReady {
    type Response = ();
    type Error = BoxError;
    type Future = std::future::Ready<Result<(), BoxError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Err("the connection pool is closed".into()))
    }

    fn call(&mut self, _: Batch) -> Self::Future {
        unreachable!("never ready")
    }
}

#[tokio::test]
async fn a_stack_that_is_not_ready_fails_its_batch_not_the_runtime() {
    let mut service = LambdaService::new(NeverReady);
    // The runtime would end the process on a poll_ready error: the adapter is always ready.
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(matches!(service.poll_ready(&mut cx), Poll::Ready(Ok(()))));
    let response = invoke(service, event(PLAIN)).await.unwrap();
    assert_eq!(failures(&response), [sequence_numbers(PLAIN)[0].clone()]);
}

#[tokio::test]
async fn bad_input_gets_a_typed_error_naming_the_record() {
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut json: serde_json::Value = serde_json::from_str(PLAIN).unwrap();
        edit(&mut json["Records"][2]);
        json.to_string()
    };

    // No eventID: no shard.
    let json = with(&|r| {
        r.as_object_mut().unwrap().remove("eventID");
    });
    let error = batches(parse_event(json.as_bytes()).unwrap()).unwrap_err();
    assert!(
        matches!(error, EventError::MissingEventId { index: 2, .. }),
        "{error}"
    );
    // An eventID without a shard.
    for id in [
        "49590338271490256608559692538361571095921575989136588898",
        ":4959",
    ] {
        let json = with(&|r| r["eventID"] = id.into());
        let error = batches(parse_event(json.as_bytes()).unwrap()).unwrap_err();
        match &error {
            EventError::NoShardInEventId { index, event_id } => {
                assert_eq!((*index, event_id.as_str()), (2, id));
            }
            other => panic!("{other}"),
        }
        assert!(
            error.to_string().contains("shardId-000000000000:"),
            "{error}"
        );
    }
    // A sequence number that does not parse.
    for bad in ["", "12x4", "-1"] {
        let json = with(&|r| r["kinesis"]["sequenceNumber"] = bad.into());
        let error = batches(parse_event(json.as_bytes()).unwrap()).unwrap_err();
        match &error {
            EventError::InvalidSequenceNumber {
                index,
                shard_id,
                sequence_number,
                ..
            } => {
                assert_eq!(*index, 2);
                assert_eq!(&**shard_id, "shardId-000000000006");
                assert_eq!(sequence_number, bad);
            }
            other => panic!("{other}"),
        }
    }
    // Data that is not base64.
    let json = with(&|r| r["kinesis"]["data"] = "not base64!".into());
    let error = parse_event(json.as_bytes()).unwrap_err();
    match &error {
        EventError::InvalidRecord {
            index, event_id, ..
        } => {
            assert_eq!(*index, 2);
            assert!(event_id
                .as_deref()
                .is_some_and(|id| id.starts_with("shardId-000000000006:")));
        }
        other => panic!("{other}"),
    }
    // Not JSON, and JSON without Records.
    assert!(matches!(
        parse_event(b"{\"Records\": [").unwrap_err(),
        EventError::NotAKinesisEvent { .. }
    ));
    assert!(matches!(
        parse_event(b"{\"detail\": {}}").unwrap_err(),
        EventError::NoRecords
    ));

    // Through the service: an invocation error, and the stack is not called.
    let seen = Seen::default();
    let json = with(&|r| r["kinesis"]["sequenceNumber"] = "12x4".into());
    let service = LambdaService::new(per_record(&seen, |_| false));
    let error = invoke(service, parse_event(json.as_bytes()).unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            LambdaError::Event(EventError::InvalidSequenceNumber { .. })
        ),
        "{error}"
    );
    assert_eq!(
        Diagnostic::from(error).error_type,
        "KinesisTower.InvalidEvent"
    );
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_empty_event_answers_no_failure() {
    let service = LambdaService::new(per_record(&Seen::default(), |_| true));
    let response = invoke(service, KinesisEvent::default()).await.unwrap();
    assert!(failures(&response).is_empty());
}
