//! A Lambda Kinesis event turned into batches: one per run of a shard's records.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
use bytes::Bytes;
use kinesis_tower_layers::{Batch, InvalidSequenceNumber, Record, SequenceNumber, ShardId};

/// A Kinesis event that cannot be turned into batches. Lambda never sends such an event to a
/// function of a Kinesis event source mapping: the function was invoked with something else
/// (a hand-written test event, another trigger).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The event is not JSON in the shape of a Kinesis event ([`parse_event`]).
    #[error("the event is not a Kinesis event in Lambda's JSON shape ({{\"Records\": [{{\"eventID\": ..., \"kinesis\": {{...}}}}]}}): {source}")]
    NotAKinesisEvent {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The event is JSON, but has no `Records` array at the top level ([`parse_event`]).
    #[error("the event has no `Records` array at the top level: it is not a Kinesis event ({{\"Records\": [{{\"eventID\": ..., \"kinesis\": {{...}}}}]}})")]
    NoRecords,
    /// A record of the event is not in the shape of a Kinesis record: its `data` is not
    /// base64, a field has the wrong type, or a required field is missing ([`parse_event`]).
    #[error("record {index} of the event (eventID {event_id:?}) is not a Kinesis record in Lambda's shape (base64 `data`, `sequenceNumber`, `partitionKey`, `approximateArrivalTimestamp` in seconds): {source}")]
    InvalidRecord {
        /// The record's index in the event.
        index: usize,
        /// Its `eventID`, if it has one.
        event_id: Option<String>,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A record has no `eventID`, the only place where Lambda names the shard.
    #[error("record {index} of the event (sequence number {sequence_number:?}) has no eventID; Lambda names the shard there (`shardId-000000000000:<sequence number>`), so the record cannot be placed in a shard")]
    MissingEventId {
        /// The record's index in the event.
        index: usize,
        /// Its sequence number, as it came.
        sequence_number: String,
    },
    /// A record's `eventID` does not start with a shard id followed by `:`.
    #[error("record {index} of the event has eventID {event_id:?}, which does not start with a shard id and ':' (`shardId-000000000000:<sequence number>`), so the record cannot be placed in a shard")]
    NoShardInEventId {
        /// The record's index in the event.
        index: usize,
        /// The `eventID` as it came.
        event_id: String,
    },
    /// A record's `sequenceNumber` is not a Kinesis sequence number.
    #[error("record {index} of shard {shard_id} has sequence number {sequence_number:?}: {source}; Lambda sends the Kinesis sequence number (decimal digits) in kinesis.sequenceNumber")]
    InvalidSequenceNumber {
        /// The record's index in the event.
        index: usize,
        /// The shard, from its `eventID`.
        shard_id: ShardId,
        /// The sequence number as it came.
        sequence_number: String,
        /// What is wrong with it.
        #[source]
        source: InvalidSequenceNumber,
    },
}

/// Reads a Kinesis event from the JSON Lambda sends, with an error that names the record at
/// fault (the runtime itself answers an event it cannot read with an invocation error naming
/// the JSON path, and never calls the function).
///
/// Arrival times are read to the millisecond: `aws_lambda_events` 1.x (what the runtime
/// uses) reads the fraction of `approximateArrivalTimestamp` as a count of milliseconds, so
/// `1545084651.25` comes out as 25 ms past the second instead of 250; this function does
/// not.
///
/// # Errors
///
/// [`EventError::NotAKinesisEvent`] when the input is not JSON, [`EventError::NoRecords`]
/// when it has no `Records` array,
/// [`EventError::InvalidRecord`] when a record is not in the shape of a Kinesis record (its
/// `data` is not base64, say).
pub fn parse_event(json: &[u8]) -> Result<KinesisEvent, EventError> {
    let not_an_event = |source| EventError::NotAKinesisEvent { source };
    let mut value: serde_json::Value = serde_json::from_slice(json).map_err(not_an_event)?;
    let records = match value.get_mut("Records").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(records)) => records,
        _ => return Err(EventError::NoRecords),
    };
    let mut event = KinesisEvent::default();
    event.records = records
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            let event_id = value
                .get("eventID")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned);
            let arrival_millis = value
                .get("kinesis")
                .and_then(|k| k.get("approximateArrivalTimestamp"))
                .and_then(seconds_to_millis);
            let mut record =
                serde_json::from_value::<KinesisEventRecord>(value).map_err(|source| {
                    EventError::InvalidRecord {
                        index,
                        event_id,
                        source,
                    }
                })?;
            if let Some(millis) = arrival_millis {
                record.kinesis.approximate_arrival_timestamp.0 =
                    (UNIX_EPOCH + Duration::from_millis(millis)).into();
            }
            Ok(record)
        })
        .collect::<Result<_, _>>()?;
    Ok(event)
}

/// Milliseconds since the epoch of a timestamp in seconds (a number, or a string of one).
fn seconds_to_millis(value: &serde_json::Value) -> Option<u64> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.parse::<f64>().ok()?,
        _ => return None,
    };
    let millis = (seconds * 1000.0).round();
    (millis.is_finite() && millis >= 0.0 && millis < u64::MAX as f64).then_some(millis as u64)
}

/// The shard id of an `eventID` (`shardId-000000000006:4959...`): what comes before the first
/// `:`, when that is not empty.
pub fn shard_of_event_id(event_id: &str) -> Option<&str> {
    match event_id.split_once(':') {
        Some((shard, _)) if !shard.is_empty() => Some(shard),
        _ => None,
    }
}

/// The event's records as batches, in the event's order: a new batch starts wherever the
/// shard changes, so each batch holds one shard's records in order. (Lambda sends one shard's
/// records per invocation: one batch.)
///
/// Each record gets its shard from its `eventID`, its sequence number, partition key, data
/// (decoded, not copied again) and arrival time (millisecond precision) from `kinesis`;
/// KPL aggregates stay aggregated (put `DeaggregateLayer` in the stack).
///
/// # Errors
///
/// An [`EventError`] for the first record without a shard in its `eventID` or with a
/// sequence number that does not parse.
pub fn batches(event: KinesisEvent) -> Result<Vec<Batch>, EventError> {
    let mut batches: Vec<Batch> = Vec::new();
    for (index, record) in event.records.into_iter().enumerate() {
        let kinesis = record.kinesis;
        let Some(event_id) = record.event_id else {
            return Err(EventError::MissingEventId {
                index,
                sequence_number: kinesis.sequence_number,
            });
        };
        let Some(shard) = shard_of_event_id(&event_id) else {
            return Err(EventError::NoShardInEventId { index, event_id });
        };
        let shard_id = match batches.last() {
            Some(last) if *last.shard_id == *shard => last.shard_id.clone(),
            _ => ShardId::from(shard),
        };
        let sequence_number = match SequenceNumber::parse(&kinesis.sequence_number) {
            Ok(sequence_number) => sequence_number,
            Err(source) => {
                return Err(EventError::InvalidSequenceNumber {
                    index,
                    shard_id,
                    sequence_number: kinesis.sequence_number,
                    source,
                })
            }
        };
        let record = Record {
            shard_id: shard_id.clone(),
            sequence_number,
            sub_sequence_number: None,
            partition_key: kinesis.partition_key.into(),
            explicit_hash_key: None,
            data: Bytes::from(kinesis.data.0),
            approximate_arrival_timestamp: Some(SystemTime::from(
                kinesis.approximate_arrival_timestamp.0,
            )),
        };
        match batches.last_mut() {
            Some(last) if last.shard_id == shard_id => last.records.push(record),
            _ => batches.push(Batch::new(shard_id, vec![record])),
        }
    }
    Ok(batches)
}
