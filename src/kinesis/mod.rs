//! The narrow slice of the Kinesis API the consumer uses, as a trait.
//!
//! [`KinesisApi`] is implemented for `aws_sdk_kinesis::Client`; with the `test-util` feature an
//! in-memory implementation with fault injection (`memory::MemoryKinesis`) is available for
//! unit tests and benches.

#[cfg(any(test, feature = "test-util"))]
pub mod memory;
mod sdk;
mod subscription;

pub(crate) use sdk::EnvClient;
pub use subscription::{ConsumerStatus, StreamConsumer, Subscription, SubscriptionEvent};

use std::fmt;
use std::time::SystemTime;

use futures::future::BoxFuture;
use kinesis_tower_layers::{BoxError, Record, SequenceNumber, ShardId};

/// Which stream: by name, or by ARN (the name is taken from the ARN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRef {
    name: String,
    arn: Option<String>,
}

impl StreamRef {
    /// A stream by name.
    pub fn name(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arn: None,
        }
    }

    /// A stream by ARN (`arn:aws:kinesis:<region>:<account>:stream/<name>`).
    pub fn arn(arn: impl Into<String>) -> Result<Self, crate::Error> {
        let arn = arn.into();
        let name = arn
            .strip_prefix("arn:")
            .and_then(|rest| rest.split_once(":stream/"))
            .map(|(_, name)| name.to_owned())
            .filter(|name| !name.is_empty())
            .ok_or_else(|| {
                crate::Error::config(
                    "stream_arn",
                    format!("{arn:?} is not a Kinesis stream ARN (arn:aws:kinesis:<region>:<account>:stream/<name>)"),
                )
            })?;
        Ok(Self {
            name,
            arn: Some(arn),
        })
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.name
    }

    /// The stream's ARN, when it was given by ARN.
    pub fn stream_arn(&self) -> Option<&str> {
        self.arn.as_deref()
    }
}

impl fmt::Display for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// One shard as ListShards describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardDescription {
    /// The shard's id.
    pub shard_id: ShardId,
    /// The shard it was split from, or the first of the two it was merged from.
    pub parent_shard_id: Option<ShardId>,
    /// The second shard of a merge.
    pub adjacent_parent_shard_id: Option<ShardId>,
    /// The first sequence number of the shard.
    pub starting_sequence_number: Option<SequenceNumber>,
    /// The last sequence number of a closed shard; `None` while the shard is open.
    pub ending_sequence_number: Option<SequenceNumber>,
}

impl ShardDescription {
    /// An open shard without parents.
    pub fn new(shard_id: impl Into<ShardId>) -> Self {
        Self {
            shard_id: shard_id.into(),
            parent_shard_id: None,
            adjacent_parent_shard_id: None,
            starting_sequence_number: None,
            ending_sequence_number: None,
        }
    }

    /// The shard's parents (zero, one or two).
    pub fn parents(&self) -> impl Iterator<Item = &ShardId> {
        self.parent_shard_id
            .iter()
            .chain(self.adjacent_parent_shard_id.iter())
    }

    /// Whether the shard is closed (split or merged).
    pub fn is_closed(&self) -> bool {
        self.ending_sequence_number.is_some()
    }
}

/// One page of a ListShards answer.
#[derive(Clone, Debug, Default)]
pub struct ShardPage {
    /// The shards of this page.
    pub shards: Vec<ShardDescription>,
    /// The token for the next page, if any.
    pub next_token: Option<String>,
}

/// Where a shard iterator starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IteratorPosition {
    /// After the newest record.
    Latest,
    /// At the oldest record kept.
    TrimHorizon,
    /// At the first record at or after this time.
    AtTimestamp(SystemTime),
    /// At this record.
    AtSequenceNumber(SequenceNumber),
    /// Just after this record.
    AfterSequenceNumber(SequenceNumber),
}

/// A child shard reported by GetRecords at the end of a closed shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildShard {
    /// The child's id.
    pub shard_id: ShardId,
    /// All its parents.
    pub parent_shards: Vec<ShardId>,
}

/// One GetRecords answer.
#[derive(Clone, Debug, Default)]
pub struct RecordsPage {
    /// The records, in shard order.
    pub records: Vec<Record>,
    /// The iterator for the next call; `None` when the shard is closed and fully read.
    pub next_iterator: Option<String>,
    /// How far behind the tip of the shard this answer is.
    pub millis_behind_latest: Option<i64>,
    /// At the end of a closed shard: its children.
    pub child_shards: Vec<ChildShard>,
}

/// What kind of failure a Kinesis call had; decides retry or stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KinesisErrorKind {
    /// ProvisionedThroughputExceeded, LimitExceeded, KMS throttling: back off and retry.
    Throttled,
    /// The shard iterator expired: get a new one and go on.
    ExpiredIterator,
    /// The stream or shard does not exist.
    ResourceNotFound,
    /// Access denied (IAM or KMS).
    AccessDenied,
    /// The request was invalid (a bug or a bad configuration).
    InvalidArgument,
    /// A timeout, a connection failure, a 5xx: retry with backoff.
    Transient,
    /// ResourceInUse: the resource is busy (a stream being updated; a shard subscribed again
    /// within 5 seconds; a stream consumer that exists already): retry with backoff, or, for
    /// a registration, use the one that exists.
    ResourceInUse,
    /// Anything else: not retried.
    Other,
}

/// A failed Kinesis call: the kind decides what the consumer does; the source is the SDK's error.
#[derive(Debug)]
pub struct KinesisError {
    kind: KinesisErrorKind,
    operation: &'static str,
    message: String,
    source: Option<BoxError>,
}

impl KinesisError {
    /// A new error of `kind` in `operation`.
    pub fn new(
        kind: KinesisErrorKind,
        operation: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            operation,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> KinesisErrorKind {
        self.kind
    }

    /// The Kinesis operation (`GetRecords`, ...).
    pub fn operation(&self) -> &'static str {
        self.operation
    }

    /// Whether the consumer retries it (with backoff).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            KinesisErrorKind::Throttled
                | KinesisErrorKind::Transient
                | KinesisErrorKind::ResourceInUse
                | KinesisErrorKind::ExpiredIterator
        )
    }
}

impl fmt::Display for KinesisError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}): {}", self.operation, self.kind, self.message)
    }
}

impl std::error::Error for KinesisError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The longest the consumer waits for one Kinesis call before it counts as a transient failure
/// (a hung connection must not stall a shard, or the shard listing, forever).
pub(crate) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bounds a Kinesis call by [`CALL_TIMEOUT`].
pub(crate) async fn timed<T>(
    operation: &'static str,
    call: impl std::future::Future<Output = Result<T, KinesisError>>,
) -> Result<T, KinesisError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(KinesisError::new(
                KinesisErrorKind::Transient,
                operation,
                format!("no answer within {CALL_TIMEOUT:?}"),
            ))
        })
}

/// What a [`KinesisApi`] without enhanced fan-out answers to its fan-out calls.
fn fan_out_unsupported(operation: &'static str) -> KinesisError {
    KinesisError::new(
        KinesisErrorKind::Other,
        operation,
        "this KinesisApi implementation does not support enhanced fan-out: read by polling \
         (remove .enhanced_fan_out(..)), or implement the stream-consumer calls",
    )
}

/// The Kinesis calls the consumer makes. Implemented for `aws_sdk_kinesis::Client`; implement it
/// to read from something else (a proxy, a recording, a fault-injecting wrapper).
///
/// The polling calls are required; the enhanced fan-out calls (stream ARN, stream consumers,
/// SubscribeToShard) have defaults that answer "not supported", so an implementation that only
/// polls need not write them.
pub trait KinesisApi: Send + Sync + 'static {
    /// ListShards: the first page (`next_token` is `None`) or the page after `next_token`.
    fn list_shards<'a>(
        &'a self,
        stream: &'a StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> BoxFuture<'a, Result<ShardPage, KinesisError>>;

    /// GetShardIterator.
    fn get_shard_iterator<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<String, KinesisError>>;

    /// GetRecords with at most `limit` records; the records carry `shard_id`.
    fn get_records<'a>(
        &'a self,
        stream: &'a StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, KinesisError>>;

    /// DescribeStreamSummary: the stream's ARN (what stream consumers are registered under).
    fn stream_arn<'a>(
        &'a self,
        stream: &'a StreamRef,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        let _ = stream;
        Box::pin(async { Err(fan_out_unsupported("DescribeStreamSummary")) })
    }

    /// RegisterStreamConsumer: registers an enhanced fan-out consumer named `name`. Kinesis
    /// answers ResourceInUse when one of that name exists.
    fn register_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        let _ = (stream_arn, name);
        Box::pin(async { Err(fan_out_unsupported("RegisterStreamConsumer")) })
    }

    /// DescribeStreamConsumer: the consumer named `name` (ResourceNotFound when there is none).
    fn describe_stream_consumer<'a>(
        &'a self,
        stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        let _ = (stream_arn, name);
        Box::pin(async { Err(fan_out_unsupported("DescribeStreamConsumer")) })
    }

    /// DeregisterStreamConsumer.
    fn deregister_stream_consumer<'a>(
        &'a self,
        consumer_arn: &'a str,
    ) -> BoxFuture<'a, Result<(), KinesisError>> {
        let _ = consumer_arn;
        Box::pin(async { Err(fan_out_unsupported("DeregisterStreamConsumer")) })
    }

    /// SubscribeToShard: the shard's records from `position`, pushed as events until the
    /// subscription ends (Kinesis ends each after 5 minutes) or the shard does (the last event
    /// names the children). Records carry `shard_id`. Dropping the [`Subscription`] cancels it.
    fn subscribe_to_shard<'a>(
        &'a self,
        consumer_arn: &'a str,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<Subscription, KinesisError>> {
        let _ = (consumer_arn, shard_id, position);
        Box::pin(async { Err(fan_out_unsupported("SubscribeToShard")) })
    }
}
