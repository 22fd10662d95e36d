//! The enhanced fan-out calls for the AWS SDK client: stream ARN, stream consumers and
//! SubscribeToShard (an event stream turned into a [`Subscription`]).

use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::{self as sdk, ShardIteratorType, StartingPosition};

use aws_sdk_kinesis::Client;
use kinesis_tower_layers::ShardId;

use super::{classify, convert_page, invalid_response, kind_of_code};
use crate::kinesis::{
    ConsumerStatus, IteratorPosition, KinesisError, KinesisErrorKind, StreamConsumer, StreamRef,
    Subscription, SubscriptionEvent,
};

pub(super) async fn stream_arn(
    client: &Client,
    stream: &StreamRef,
) -> Result<String, KinesisError> {
    if let Some(arn) = stream.stream_arn() {
        return Ok(arn.to_owned());
    }
    let output = client
        .describe_stream_summary()
        .stream_name(stream.stream_name())
        .send()
        .await
        .map_err(|e| classify("DescribeStreamSummary", e))?;
    output
        .stream_description_summary
        .map(|d| d.stream_arn)
        .ok_or_else(|| {
            invalid_response(
                "DescribeStreamSummary",
                format!("Kinesis returned no description of stream {stream}"),
            )
        })
}

fn status(status: &sdk::ConsumerStatus) -> ConsumerStatus {
    match status {
        sdk::ConsumerStatus::Active => ConsumerStatus::Active,
        sdk::ConsumerStatus::Deleting => ConsumerStatus::Deleting,
        // Creating, and anything newer than this SDK: not usable yet.
        _ => ConsumerStatus::Creating,
    }
}

pub(super) async fn register(
    client: &Client,
    stream_arn: &str,
    name: &str,
) -> Result<StreamConsumer, KinesisError> {
    let output = client
        .register_stream_consumer()
        .stream_arn(stream_arn)
        .consumer_name(name)
        .send()
        .await
        .map_err(|e| classify("RegisterStreamConsumer", e))?;
    let consumer = output.consumer.ok_or_else(|| {
        invalid_response(
            "RegisterStreamConsumer",
            format!("Kinesis returned no consumer for {name}"),
        )
    })?;
    Ok(StreamConsumer {
        status: status(&consumer.consumer_status),
        name: consumer.consumer_name,
        arn: consumer.consumer_arn,
    })
}

pub(super) async fn describe(
    client: &Client,
    stream_arn: &str,
    name: &str,
) -> Result<StreamConsumer, KinesisError> {
    let output = client
        .describe_stream_consumer()
        .stream_arn(stream_arn)
        .consumer_name(name)
        .send()
        .await
        .map_err(|e| classify("DescribeStreamConsumer", e))?;
    let consumer = output.consumer_description.ok_or_else(|| {
        invalid_response(
            "DescribeStreamConsumer",
            format!("Kinesis returned no description of consumer {name}"),
        )
    })?;
    Ok(StreamConsumer {
        status: status(&consumer.consumer_status),
        name: consumer.consumer_name,
        arn: consumer.consumer_arn,
    })
}

pub(super) async fn deregister(client: &Client, consumer_arn: &str) -> Result<(), KinesisError> {
    client
        .deregister_stream_consumer()
        .consumer_arn(consumer_arn)
        .send()
        .await
        .map_err(|e| classify("DeregisterStreamConsumer", e))?;
    Ok(())
}

fn starting_position(position: IteratorPosition) -> StartingPosition {
    let builder = StartingPosition::builder();
    let builder = match position {
        IteratorPosition::Latest => builder.r#type(ShardIteratorType::Latest),
        IteratorPosition::TrimHorizon => builder.r#type(ShardIteratorType::TrimHorizon),
        IteratorPosition::AtTimestamp(t) => builder
            .r#type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_smithy_types::DateTime::from(t)),
        IteratorPosition::AtSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AtSequenceNumber)
            .sequence_number(s.to_string()),
        IteratorPosition::AfterSequenceNumber(s) => builder
            .r#type(ShardIteratorType::AfterSequenceNumber)
            .sequence_number(s.to_string()),
    };
    builder
        .build()
        .expect("a starting position with a type always builds")
}

pub(super) async fn subscribe(
    client: &Client,
    consumer_arn: &str,
    shard_id: &ShardId,
    position: IteratorPosition,
) -> Result<Subscription, KinesisError> {
    let output = client
        .subscribe_to_shard()
        .consumer_arn(consumer_arn)
        .shard_id(shard_id.as_str())
        .starting_position(starting_position(position))
        .send()
        .await
        .map_err(|e| classify("SubscribeToShard", e))?;
    let events = output.event_stream;
    let shard_id = shard_id.clone();
    let stream = futures::stream::unfold(Some(events), move |events| {
        let shard_id = shard_id.clone();
        async move {
            let mut events = events?;
            loop {
                match events.recv().await {
                    Ok(None) => return None,
                    Ok(Some(sdk::SubscribeToShardEventStream::SubscribeToShardEvent(event))) => {
                        let event = convert_event(&shard_id, event);
                        // After a malformed event, the subscription ends.
                        let next = event.is_ok().then_some(events);
                        return Some((event, next));
                    }
                    // An event kind newer than this SDK: nothing in it to read.
                    Ok(Some(_)) => continue,
                    Err(e) => return Some((Err(classify_event_error(e)), None)),
                }
            }
        }
    });
    Ok(Box::pin(stream))
}

fn convert_event(
    shard_id: &ShardId,
    event: sdk::SubscribeToShardEvent,
) -> Result<SubscriptionEvent, KinesisError> {
    let (records, child_shards) = convert_page(
        "SubscribeToShard",
        shard_id,
        event.records,
        event.child_shards,
    )?;
    Ok(SubscriptionEvent {
        records,
        // Kinesis leaves it out on the shard's last event.
        continuation_sequence_number: Some(event.continuation_sequence_number)
            .filter(|c| !c.is_empty()),
        millis_behind_latest: Some(event.millis_behind_latest),
        child_shards,
    })
}

/// A failure inside the event stream: a modelled error by its kind (some servers send it
/// without an error code), as for any call: ResourceInUse and KMS throttling are retried, a KMS
/// key that is disabled or missing is not; a broken connection, a garbled frame or an error
/// this SDK does not know is transient (the reader subscribes again after the last record it
/// delivered).
fn classify_event_error<R>(
    err: SdkError<sdk::error::SubscribeToShardEventStreamError, R>,
) -> KinesisError
where
    R: std::fmt::Debug + Send + Sync + 'static,
{
    use sdk::error::SubscribeToShardEventStreamError as E;
    let kind = match &err {
        SdkError::ServiceError(service) => match service.err() {
            E::ResourceNotFoundException(_) => KinesisErrorKind::ResourceNotFound,
            E::ResourceInUseException(_) => KinesisErrorKind::ResourceInUse,
            E::KmsThrottlingException(_) => KinesisErrorKind::Throttled,
            E::KmsAccessDeniedException(_) => KinesisErrorKind::AccessDenied,
            E::KmsDisabledException(_)
            | E::KmsInvalidStateException(_)
            | E::KmsNotFoundException(_)
            | E::KmsOptInRequired(_) => KinesisErrorKind::Other,
            E::InternalFailureException(_) => KinesisErrorKind::Transient,
            other => match kind_of_code(other.code()) {
                KinesisErrorKind::Other => KinesisErrorKind::Transient,
                kind => kind,
            },
        },
        _ => KinesisErrorKind::Transient,
    };
    let message = DisplayErrorContext(&err).to_string();
    KinesisError::new(kind, "SubscribeToShard", message).with_source(err)
}
