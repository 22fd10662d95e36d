//! `KinesisApi` for the AWS SDK client.

mod fan_out;

use std::error::Error as StdError;
use std::time::SystemTime;

use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_sdk_kinesis::Client;
use futures::future::BoxFuture;
use kinesis_tower_layers::{Record, SequenceNumber, ShardId};

use super::{
    ChildShard, IteratorPosition, KinesisApi, KinesisError, KinesisErrorKind, RecordsPage,
    ShardDescription, ShardPage, StreamConsumer, StreamRef, Subscription,
};

/// Sorts an SDK error into a [`KinesisErrorKind`] by its error code and HTTP status.
fn classify<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> KinesisError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let kind = match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            KinesisErrorKind::Transient
        }
        SdkError::ServiceError(service) => kind_of_code(service.err().code()),
        _ => KinesisErrorKind::Other,
    };
    let status_is_5xx = err
        .raw_response()
        .is_some_and(|r| r.status().is_server_error());
    let kind = if kind == KinesisErrorKind::Other && status_is_5xx {
        KinesisErrorKind::Transient
    } else {
        kind
    };
    // A service error says enough in its code and message; for the others (connection
    // refused, timeouts) the root cause is deep in the source chain: print the whole chain.
    let message = match (&err, err.code()) {
        (SdkError::ServiceError(_), Some(code)) => match err.message() {
            Some(m) => format!("{code}: {m}"),
            None => code.to_owned(),
        },
        _ => DisplayErrorContext(&err).to_string(),
    };
    KinesisError::new(kind, operation, message).with_source(err)
}

fn kind_of_code(code: Option<&str>) -> KinesisErrorKind {
    match code.unwrap_or_default() {
        "ProvisionedThroughputExceededException"
        | "LimitExceededException"
        | "ThrottlingException"
        | "KMSThrottlingException"
        | "RequestLimitExceeded" => KinesisErrorKind::Throttled,
        "ExpiredIteratorException" => KinesisErrorKind::ExpiredIterator,
        "ResourceNotFoundException" => KinesisErrorKind::ResourceNotFound,
        "AccessDeniedException"
        | "KMSAccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "MissingAuthenticationToken" => KinesisErrorKind::AccessDenied,
        "InvalidArgumentException" | "ValidationException" => KinesisErrorKind::InvalidArgument,
        "InternalFailure"
        | "InternalFailureException"
        | "ServiceUnavailable"
        | "ServiceUnavailableException" => KinesisErrorKind::Transient,
        "ResourceInUseException" => KinesisErrorKind::ResourceInUse,
        _ => KinesisErrorKind::Other,
    }
}

fn invalid_response(operation: &'static str, what: String) -> KinesisError {
    KinesisError::new(KinesisErrorKind::Other, operation, what)
}

fn parse_sequence(
    operation: &'static str,
    shard: &str,
    value: &str,
) -> Result<SequenceNumber, KinesisError> {
    SequenceNumber::parse(value).map_err(|e| {
        invalid_response(
            operation,
            format!("Kinesis returned an invalid sequence number for shard {shard}: {e}"),
        )
    })
}

fn convert_record(
    operation: &'static str,
    shard_id: &ShardId,
    record: aws_sdk_kinesis::types::Record,
) -> Result<Record, KinesisError> {
    let sequence_number = parse_sequence(operation, shard_id, &record.sequence_number)?;
    Ok(Record {
        shard_id: shard_id.clone(),
        sequence_number,
        sub_sequence_number: None,
        partition_key: record.partition_key.unwrap_or_default().into(),
        explicit_hash_key: None,
        data: record.data.into_bytes(),
        approximate_arrival_timestamp: record
            .approximate_arrival_timestamp
            .and_then(|t| SystemTime::try_from(t).ok()),
    })
}

/// The records and child shards of a GetRecords answer or a SubscribeToShard event.
fn convert_page(
    operation: &'static str,
    shard_id: &ShardId,
    records: Vec<aws_sdk_kinesis::types::Record>,
    child_shards: Option<Vec<aws_sdk_kinesis::types::ChildShard>>,
) -> Result<(Vec<Record>, Vec<ChildShard>), KinesisError> {
    // Sized up front: `collect` into a `Result` cannot know the length, and growing a vector of
    // thousands of records by doubling copies it and faults fresh pages in at every step.
    let mut converted = Vec::with_capacity(records.len());
    for record in records {
        converted.push(convert_record(operation, shard_id, record)?);
    }
    let child_shards = child_shards
        .unwrap_or_default()
        .into_iter()
        .map(|c| ChildShard {
            shard_id: c.shard_id.into(),
            parent_shards: c.parent_shards.into_iter().map(Into::into).collect(),
        })
        .collect();
    Ok((converted, child_shards))
}

/// A Kinesis client made on first use from the AWS configuration in the environment
/// (`aws_config::load_from_env`: region, credentials and endpoint from the environment
/// variables, the shared config files, the container or instance role); what a consumer built
/// without a client reads through.
#[derive(Default)]
pub(crate) struct EnvClient {
    client: tokio::sync::OnceCell<Result<Client, KinesisError>>,
}

impl EnvClient {
    async fn client(&self, operation: &'static str) -> Result<&Client, KinesisError> {
        let client = self
            .client
            .get_or_init(|| async {
                let config = aws_config::load_from_env().await;
                if config.region().is_none() {
                    return Err(KinesisError::new(
                        KinesisErrorKind::InvalidArgument,
                        operation,
                        "no AWS region in the environment: set AWS_REGION (or a profile's \
                         region), or give the builder a client with .client(..) or \
                         .sdk_config(..)",
                    ));
                }
                Ok(Client::new(&config))
            })
            .await;
        client
            .as_ref()
            .map_err(|e| KinesisError::new(e.kind(), operation, e.message.clone()))
    }
}

impl KinesisApi for EnvClient {
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> BoxFuture<'a, Result<ShardPage, KinesisError>> {
        Box::pin(async move {
            let client = self.client("ListShards").await?;
            KinesisApi::list_shards(client, stream, next_token, max_results).await
        })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        Box::pin(async move {
            let client = self.client("GetShardIterator").await?;
            KinesisApi::get_shard_iterator(client, stream, shard_id, position).await
        })
    }

    fn get_records<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, KinesisError>> {
        Box::pin(async move {
            let client = self.client("GetRecords").await?;
            KinesisApi::get_records(client, stream, shard_id, iterator, limit).await
        })
    }

    fn stream_arn<'a>(
        &'a self,
        stream: &'a StreamRef,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        Box::pin(async move {
            let client = self.client("DescribeStreamSummary").await?;
            fan_out::stream_arn(client, stream).await
        })
    }

    fn register_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        Box::pin(async move {
            let client = self.client("RegisterStreamConsumer").await?;
            fan_out::register(client, stream_arn, name).await
        })
    }

    fn describe_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        Box::pin(async move {
            let client = self.client("DescribeStreamConsumer").await?;
            fan_out::describe(client, stream_arn, name).await
        })
    }

    fn deregister_stream_consumer<'a>(
        &'a self,
        consumer_arn: &'a str,
    ) -> BoxFuture<'a, Result<(), KinesisError>> {
        Box::pin(async move {
            let client = self.client("DeregisterStreamConsumer").await?;
            fan_out::deregister(client, consumer_arn).await
        })
    }

    fn subscribe_to_shard<'a>(
        &'a self,
        consumer_arn: &'a str,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<Subscription, KinesisError>> {
        Box::pin(async move {
            let client = self.client("SubscribeToShard").await?;
            fan_out::subscribe(client, consumer_arn, shard_id, position).await
        })
    }
}

impl KinesisApi for Client {
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> BoxFuture<'a, Result<ShardPage, KinesisError>> {
        Box::pin(async move {
            let mut request = self.list_shards().set_max_results(max_results);
            // With a NextToken, the stream must not be named again (Kinesis rejects it).
            request = match (next_token, stream.stream_arn()) {
                (Some(token), _) => request.next_token(token),
                (None, Some(arn)) => request.stream_arn(arn),
                (None, None) => request.stream_name(stream.stream_name()),
            };
            let output = request
                .send()
                .await
                .map_err(|e| classify("ListShards", e))?;
            let mut shards = Vec::with_capacity(output.shards.as_ref().map_or(0, Vec::len));
            for shard in output.shards.unwrap_or_default() {
                let range = shard.sequence_number_range;
                let starting_sequence_number = range
                    .as_ref()
                    .map(|r| {
                        parse_sequence("ListShards", &shard.shard_id, &r.starting_sequence_number)
                    })
                    .transpose()?;
                let ending_sequence_number = range
                    .as_ref()
                    .and_then(|r| r.ending_sequence_number.as_deref())
                    .map(|e| parse_sequence("ListShards", &shard.shard_id, e))
                    .transpose()?;
                shards.push(ShardDescription {
                    shard_id: shard.shard_id.into(),
                    parent_shard_id: shard.parent_shard_id.map(Into::into),
                    adjacent_parent_shard_id: shard.adjacent_parent_shard_id.map(Into::into),
                    starting_sequence_number,
                    ending_sequence_number,
                });
            }
            Ok(ShardPage {
                shards,
                next_token: output.next_token,
            })
        })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        Box::pin(async move {
            let mut request = self.get_shard_iterator().shard_id(shard_id.as_str());
            request = match stream.stream_arn() {
                Some(arn) => request.stream_arn(arn),
                None => request.stream_name(stream.stream_name()),
            };
            request = match position {
                IteratorPosition::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
                IteratorPosition::TrimHorizon => {
                    request.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                IteratorPosition::AtTimestamp(t) => request
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(aws_smithy_types::DateTime::from(t)),
                IteratorPosition::AtSequenceNumber(s) => request
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(s.to_string()),
                IteratorPosition::AfterSequenceNumber(s) => request
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(s.to_string()),
            };
            let output = request
                .send()
                .await
                .map_err(|e| classify("GetShardIterator", e))?;
            output.shard_iterator.ok_or_else(|| {
                invalid_response(
                    "GetShardIterator",
                    format!("Kinesis returned no iterator for shard {shard_id}"),
                )
            })
        })
    }

    fn get_records<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, KinesisError>> {
        Box::pin(async move {
            let output = self
                .get_records()
                .shard_iterator(iterator)
                .limit(limit)
                .set_stream_arn(stream.stream_arn().map(str::to_owned))
                .send()
                .await
                .map_err(|e| classify("GetRecords", e))?;
            let (records, child_shards) =
                convert_page("GetRecords", shard_id, output.records, output.child_shards)?;
            Ok(RecordsPage {
                records,
                next_iterator: output.next_shard_iterator,
                millis_behind_latest: output.millis_behind_latest,
                child_shards,
            })
        })
    }

    fn stream_arn<'a>(
        &'a self,
        stream: &'a StreamRef,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        Box::pin(fan_out::stream_arn(self, stream))
    }

    fn register_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        Box::pin(fan_out::register(self, stream_arn, name))
    }

    fn describe_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        Box::pin(fan_out::describe(self, stream_arn, name))
    }

    fn deregister_stream_consumer<'a>(
        &'a self,
        consumer_arn: &'a str,
    ) -> BoxFuture<'a, Result<(), KinesisError>> {
        Box::pin(fan_out::deregister(self, consumer_arn))
    }

    fn subscribe_to_shard<'a>(
        &'a self,
        consumer_arn: &'a str,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<Subscription, KinesisError>> {
        Box::pin(fan_out::subscribe(self, consumer_arn, shard_id, position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_map_to_kinds() {
        assert_eq!(
            kind_of_code(Some("ProvisionedThroughputExceededException")),
            KinesisErrorKind::Throttled
        );
        assert_eq!(
            kind_of_code(Some("ExpiredIteratorException")),
            KinesisErrorKind::ExpiredIterator
        );
        assert_eq!(
            kind_of_code(Some("ResourceNotFoundException")),
            KinesisErrorKind::ResourceNotFound
        );
        assert_eq!(kind_of_code(None), KinesisErrorKind::Other);
    }
}
