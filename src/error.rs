//! The consumer's error type.

use kinesis_tower_layers::{BoxError, StoreError};

use crate::kinesis::KinesisError;

/// Everything that can end a consumer. Each variant names the stream (and shard, where one is
/// involved) and says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The consumer's configuration is invalid; nothing was started.
    #[error("invalid consumer configuration: {field}: {reason}")]
    Config {
        /// The builder method / field at fault.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// The stream (or a shard of it) does not exist.
    #[error("stream {stream} not found ({}{}): create it, or fix the stream name/ARN and region/endpoint", source.operation(), shard_suffix(shard.as_deref()))]
    StreamNotFound {
        /// The stream.
        stream: String,
        /// The shard, when the call was about one.
        shard: Option<String>,
        /// The underlying error.
        #[source]
        source: KinesisError,
    },

    /// A shard that ListShards still lists cannot be read (GetShardIterator/GetRecords answer
    /// ResourceNotFound). A shard that has disappeared from the listing (expired by
    /// retention) is not an error: it is treated as finished.
    #[error("shard {shard} of stream {stream} is listed but cannot be read ({}): {source}; check the stream's state, or report it if it persists", source.operation())]
    ShardNotFound {
        /// The stream.
        stream: String,
        /// The shard.
        shard: String,
        /// The underlying error.
        #[source]
        source: KinesisError,
    },

    /// The checkpoint store says a shard ended, but the stream lists it open: the stream was most
    /// likely deleted and re-created under the same name, and the checkpoints are the old
    /// stream's. Nothing was read, so nothing is skipped silently.
    #[error("checkpoint store says shard {shard} of stream {stream} ended (namespace {namespace}), but the stream lists it open: if the stream was deleted and re-created, delete the checkpoints of namespace {namespace} (or use a new app_name) to read it from the start position")]
    EndedShardIsOpen {
        /// The stream.
        stream: String,
        /// The checkpoint namespace.
        namespace: String,
        /// The shard.
        shard: String,
    },

    /// Kinesis refused access.
    #[error("access denied to stream {stream} ({}{}): grant kinesis:ListShards, kinesis:GetShardIterator and kinesis:GetRecords on it to these credentials", source.operation(), shard_suffix(shard.as_deref()))]
    AccessDenied {
        /// The stream.
        stream: String,
        /// The shard, when the call was about one.
        shard: Option<String>,
        /// The underlying error.
        #[source]
        source: KinesisError,
    },

    /// Kinesis answered with an error that retrying will not fix.
    #[error("Kinesis {} failed for stream {stream}{}: {source}", source.operation(), shard_suffix(shard.as_deref()))]
    Kinesis {
        /// The stream.
        stream: String,
        /// The shard, when the call was about one.
        shard: Option<String>,
        /// The underlying error.
        #[source]
        source: KinesisError,
    },

    /// The handler (the service given to `run`) failed; the shard's checkpoint stays before the
    /// failed batch, so its records are delivered again on the next run. When the error is a
    /// [`PartialFailure`](crate::checkpoint::PartialFailure) (from `KeyedConcurrencyLayer`) and
    /// `CheckpointLayer` is in the stack, the checkpoint moved to the part of the batch that
    /// succeeded first, and the next run delivers again from the record after it.
    #[error("handler failed on stream {stream}, shard {shard}{}: {source}", sequence_suffix(first_sequence_number.as_deref(), last_sequence_number.as_deref()))]
    Handler {
        /// The stream.
        stream: String,
        /// The shard whose batch failed.
        shard: String,
        /// The batch's first sequence number, if it had records.
        first_sequence_number: Option<String>,
        /// The batch's last sequence number, if it had records.
        last_sequence_number: Option<String>,
        /// The handler's error.
        #[source]
        source: BoxError,
    },

    /// The service given to `run` reported, through `poll_ready`, that it cannot take requests.
    #[error("handler service of stream {stream} failed in poll_ready: {source}")]
    ServiceNotReady {
        /// The stream.
        stream: String,
        /// The service's error.
        #[source]
        source: BoxError,
    },

    /// The checkpoint store failed.
    #[error("checkpoint store failed for stream {stream}{}: {source}", shard_suffix(shard.as_deref()))]
    Store {
        /// The stream.
        stream: String,
        /// The shard, when the operation was about one.
        shard: Option<String>,
        /// The store's error.
        #[source]
        source: Box<StoreError>,
    },

    /// Shutdown did not finish the in-flight work within the drain timeout; those batches were
    /// dropped unacknowledged and will be delivered again on the next run.
    #[error("shutdown of stream {stream} timed out after {timeout:?} with batches still in flight on shards {shards:?}: raise drain_timeout or make the handler honour cancellation")]
    DrainTimeout {
        /// The stream.
        stream: String,
        /// The drain timeout.
        timeout: std::time::Duration,
        /// Shards whose batch was still being handled.
        shards: Vec<String>,
    },

    /// The checkpoint store did not finish flushing within the drain timeout at the end of a
    /// run; checkpoints it still held may be lost (their records are delivered again).
    #[error("flushing the checkpoint store of stream {stream} did not finish within {timeout:?}: check that the store's back-end is reachable, or raise drain_timeout")]
    FlushTimeout {
        /// The stream.
        stream: String,
        /// The time allowed.
        timeout: std::time::Duration,
    },

    /// Enhanced fan-out could not be set up or used: the stream consumer could not be
    /// registered, found or made active, or the credentials may not use it.
    #[error("enhanced fan-out consumer {consumer} of stream {stream}: {reason}")]
    FanOut {
        /// The stream.
        stream: String,
        /// The stream consumer's name.
        consumer: String,
        /// What went wrong and what to do.
        reason: String,
        /// The Kinesis failure behind it, if there was one.
        #[source]
        source: Option<Box<KinesisError>>,
    },

    /// A background task of the consumer panicked or was cancelled unexpectedly.
    #[error("internal task of stream {stream} failed: {reason}")]
    Task {
        /// The stream.
        stream: String,
        /// What happened.
        reason: String,
    },
}

fn shard_suffix(shard: Option<&str>) -> String {
    shard.map(|s| format!(", shard {s}")).unwrap_or_default()
}

fn sequence_suffix(first: Option<&str>, last: Option<&str>) -> String {
    match (first, last) {
        (Some(f), Some(l)) => format!(", records {f}..={l}"),
        _ => String::new(),
    }
}

impl Error {
    /// Whether running the consumer again (after a pause) may succeed without changing
    /// anything: throttling, timeouts, a handler or store that failed for a passing reason.
    /// Configuration, missing streams and denied access are not retryable.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Config { .. }
            | Error::EndedShardIsOpen { .. }
            | Error::StreamNotFound { .. }
            | Error::ShardNotFound { .. }
            | Error::AccessDenied { .. } => false,
            Error::Kinesis { source, .. } => source.is_retryable(),
            Error::FanOut { source, .. } => {
                source.as_deref().is_some_and(KinesisError::is_retryable)
            }
            Error::Store { source, .. } => source.is_retryable(),
            Error::Handler { .. }
            | Error::ServiceNotReady { .. }
            | Error::DrainTimeout { .. }
            | Error::FlushTimeout { .. }
            | Error::Task { .. } => true,
        }
    }

    /// True for configuration errors (fix the builder call named in the message).
    pub fn is_config(&self) -> bool {
        matches!(self, Error::Config { .. })
    }

    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Config {
            field,
            reason: reason.into(),
        }
    }

    /// Turns a fatal Kinesis error into the variant that says what to fix.
    pub(crate) fn from_kinesis(stream: &str, shard: Option<&str>, source: KinesisError) -> Self {
        use crate::kinesis::KinesisErrorKind as K;
        let stream = stream.to_owned();
        let shard = shard.map(str::to_owned);
        match source.kind() {
            K::ResourceNotFound => Error::StreamNotFound {
                stream,
                shard,
                source,
            },
            K::AccessDenied => Error::AccessDenied {
                stream,
                shard,
                source,
            },
            _ => Error::Kinesis {
                stream,
                shard,
                source,
            },
        }
    }
}
