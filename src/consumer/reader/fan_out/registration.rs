//! The stream consumer an enhanced fan-out run reads as: found, or registered, and waited for
//! until active, once per run; deregistered at the end when asked.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::consumer::handle::Shared;
use crate::consumer::settings::EnhancedFanOut;
use crate::kinesis::{timed, ConsumerStatus, KinesisError, KinesisErrorKind, StreamConsumer};
use crate::retrying::retry;
use crate::Error;

/// How often a consumer that is not active yet is described again (Kinesis allows 20
/// DescribeStreamConsumer calls per second per stream, shared by every worker).
const ACTIVATION_POLL: Duration = Duration::from_millis(500);

/// The permissions enhanced fan-out needs, for the access-denied message.
const PERMISSIONS: &str = "grant kinesis:DescribeStreamSummary, kinesis:RegisterStreamConsumer, \
     kinesis:DescribeStreamConsumer and kinesis:SubscribeToShard on the stream and its consumers, \
     kinesis:ListShards, kinesis:GetShardIterator and kinesis:GetRecords on the stream (shard \
     listing, and the end check of quiet shards), and kinesis:DeregisterStreamConsumer to \
     deregister on shutdown";

/// The run's stream consumer: set up by the first shard that needs it, shared by the others.
pub(super) struct Registration {
    shared: Arc<Shared>,
    fan_out: EnhancedFanOut,
    arn: OnceCell<String>,
}

impl Registration {
    pub fn new(shared: Arc<Shared>, fan_out: EnhancedFanOut) -> Self {
        Self {
            shared,
            fan_out,
            arn: OnceCell::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.fan_out.name
    }

    pub fn stall_timeout(&self) -> Duration {
        self.fan_out.stall_timeout
    }

    /// The consumer's ARN: found or registered, and active, at the first call of the run.
    pub async fn consumer_arn(&self) -> Result<String, Error> {
        self.arn.get_or_try_init(|| self.set_up()).await.cloned()
    }

    /// A fan-out error: what went wrong with the consumer, and the Kinesis failure behind it.
    pub fn error(&self, reason: impl Into<String>, source: Option<KinesisError>) -> Error {
        let reason = match &source {
            Some(e) if e.kind() == KinesisErrorKind::AccessDenied => {
                format!("{}: {e}: {PERMISSIONS}", reason.into())
            }
            Some(e) => format!("{}: {e}", reason.into()),
            None => reason.into(),
        };
        Error::FanOut {
            stream: self.shared.settings.stream.stream_name().to_owned(),
            consumer: self.fan_out.name.clone(),
            reason,
            source: source.map(Box::new),
        }
    }

    /// Calls `call`, each attempt bounded in time, until it answers something other than
    /// throttling or a passing failure (a few times at most: these calls are made once per
    /// run, or when something is wrong).
    async fn call<T, F, Fut>(&self, operation: &'static str, mut call: F) -> Result<T, KinesisError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, KinesisError>>,
    {
        let settings = &self.shared.settings;
        let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
        retry(
            &mut backoff,
            8,
            |e: &KinesisError| {
                matches!(
                    e.kind(),
                    KinesisErrorKind::Throttled | KinesisErrorKind::Transient
                )
            },
            |error, delay, _| tracing::warn!(%error, ?delay, "{operation} failed; backing off"),
            || timed(operation, call()),
        )
        .await
    }

    /// Whether the consumer this run reads as (`arn`) is gone: deregistered, being deleted, or
    /// registered anew under another ARN. `Err` when that cannot be told (the lookup failed).
    pub async fn is_gone(&self, arn: &str) -> Result<bool, KinesisError> {
        let api = &self.shared.api;
        let stream = &self.shared.settings.stream;
        let name = self.fan_out.name.as_str();
        let stream_arn = self
            .call("DescribeStreamSummary", || api.stream_arn(stream))
            .await?;
        match self
            .call("DescribeStreamConsumer", || {
                api.describe_stream_consumer(&stream_arn, name)
            })
            .await
        {
            Ok(consumer) => Ok(consumer.arn != arn || consumer.status == ConsumerStatus::Deleting),
            Err(e) if e.kind() == KinesisErrorKind::ResourceNotFound => Ok(true),
            Err(e) => Err(e),
        }
    }

    async fn set_up(&self) -> Result<String, Error> {
        let api = &self.shared.api;
        let stream = &self.shared.settings.stream;
        let name = self.fan_out.name.as_str();
        let stream_arn = self
            .call("DescribeStreamSummary", || api.stream_arn(stream))
            .await
            .map_err(|e| self.error("the stream's ARN could not be read", Some(e)))?;
        let deadline = Instant::now() + self.fan_out.activation_timeout;
        loop {
            let consumer = match self
                .call("DescribeStreamConsumer", || {
                    api.describe_stream_consumer(&stream_arn, name)
                })
                .await
            {
                Ok(consumer) => consumer,
                Err(e) if e.kind() == KinesisErrorKind::ResourceNotFound => {
                    self.register(&stream_arn).await?
                }
                Err(e) => return Err(self.error("it could not be described", Some(e))),
            };
            match consumer.status {
                ConsumerStatus::Active => {
                    tracing::info!(consumer = name, arn = %consumer.arn, "enhanced fan-out consumer active");
                    return Ok(consumer.arn);
                }
                status => {
                    if Instant::now() >= deadline {
                        return Err(self.error(
                            format!(
                                "still {status:?} after {:?}: check it in the Kinesis console, \
                                 or raise EnhancedFanOut::activation_timeout",
                                self.fan_out.activation_timeout
                            ),
                            None,
                        ));
                    }
                    tracing::debug!(consumer = name, ?status, "waiting for the stream consumer");
                    tokio::time::sleep(ACTIVATION_POLL).await;
                }
            }
        }
    }

    /// Registers the consumer; another worker registering it at the same moment is fine (its
    /// registration is then described).
    async fn register(&self, stream_arn: &str) -> Result<StreamConsumer, Error> {
        let api = &self.shared.api;
        let name = self.fan_out.name.as_str();
        tracing::info!(consumer = name, "registering the enhanced fan-out consumer");
        let registered = self
            .call("RegisterStreamConsumer", || {
                api.register_stream_consumer(stream_arn, name)
            })
            .await;
        match registered {
            Ok(consumer) => Ok(consumer),
            // Registered meanwhile by another worker (or being deleted): describe it again.
            Err(e) if e.kind() == KinesisErrorKind::ResourceInUse => Ok(StreamConsumer {
                name: name.to_owned(),
                arn: String::new(),
                status: ConsumerStatus::Creating,
            }),
            Err(e) if e.kind() == KinesisErrorKind::Throttled => Err(self.error(
                "Kinesis refused to register it (20 consumers per stream at most, 5 \
                 registrations per second): deregister unused consumers",
                Some(e),
            )),
            Err(e) => Err(self.error("it could not be registered", Some(e))),
        }
    }

    /// Deregisters the consumer (registered or found by this run) when asked to.
    pub async fn finish(&self) {
        if !self.fan_out.deregister_on_shutdown {
            return;
        }
        let Some(arn) = self.arn.get() else {
            return;
        };
        let api = &self.shared.api;
        match self
            .call("DeregisterStreamConsumer", || {
                api.deregister_stream_consumer(arn)
            })
            .await
        {
            Ok(()) => tracing::info!(
                consumer = self.name(),
                "enhanced fan-out consumer deregistered"
            ),
            Err(error) => {
                tracing::warn!(consumer = self.name(), %error, "the enhanced fan-out consumer could not be deregistered")
            }
        }
    }
}
