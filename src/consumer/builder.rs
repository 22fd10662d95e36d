//! `ConsumerBuilder`: every setting, validated into [`Settings`] by `build`.

use std::sync::Arc;
use std::time::Duration;

use kinesis_tower_layers::{CheckpointStore, Checkpointer, MemoryStore, ShardId};

use super::assignment::{AssignmentFilter, EveryShard, OnlyShards};
use super::handle::{Consumer, Shared};
use super::settings::{defaults, validate_name, Settings, StartPosition};
use crate::kinesis::{KinesisApi, StreamRef};
use crate::Error;

/// Builds a [`Consumer`]; every setting is validated by [`build`](ConsumerBuilder::build).
#[derive(Default)]
pub struct ConsumerBuilder {
    api: Option<Arc<dyn KinesisApi>>,
    stream: Option<Result<StreamRef, Error>>,
    app_name: Option<String>,
    store: Option<Arc<dyn CheckpointStore>>,
    start_position: StartPosition,
    poll_interval: Option<Duration>,
    min_get_records_interval: Option<Duration>,
    max_records_per_call: Option<usize>,
    buffer_records: Option<usize>,
    buffer_bytes: Option<usize>,
    shard_refresh_interval: Option<Duration>,
    drain_timeout: Option<Duration>,
    list_shards_page_size: Option<usize>,
    read_bytes_per_second: Option<u64>,
    heartbeat_interval: Option<Duration>,
    filter: Option<Arc<dyn AssignmentFilter>>,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder").finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    /// Reads with this SDK client.
    pub fn client(mut self, client: aws_sdk_kinesis::Client) -> Self {
        self.api = Some(Arc::new(client));
        self
    }

    /// Reads with a client made from this configuration (region, credentials, endpoint).
    pub fn sdk_config(self, config: &aws_config::SdkConfig) -> Self {
        self.client(aws_sdk_kinesis::Client::new(config))
    }

    /// Reads through any [`KinesisApi`] implementation.
    pub fn kinesis_api(mut self, api: Arc<dyn KinesisApi>) -> Self {
        self.api = Some(api);
        self
    }

    /// The stream, by name.
    pub fn stream_name(mut self, name: impl Into<String>) -> Self {
        self.stream = Some(Ok(StreamRef::name(name)));
        self
    }

    /// The stream, by ARN.
    pub fn stream_arn(mut self, arn: impl Into<String>) -> Self {
        self.stream = Some(StreamRef::arn(arn));
        self
    }

    /// The application name: checkpoints are kept under `<app name>/<stream name>`, so
    /// several applications can read one stream with one store. Default `default`.
    pub fn app_name(mut self, name: impl Into<String>) -> Self {
        self.app_name = Some(name.into());
        self
    }

    /// Where checkpoints are kept. Default: a [`MemoryStore`] (nothing survives a restart).
    pub fn store(mut self, store: impl CheckpointStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// A shared store.
    pub fn store_arc(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where shards without a checkpoint start at the first run. Default `Latest`.
    pub fn start_position(mut self, position: StartPosition) -> Self {
        self.start_position = position;
        self
    }

    /// How long a caught-up shard waits before polling again. Default 200 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = Some(interval);
        self
    }

    /// The shortest time between two GetRecords calls of one shard. Default 200 ms, which keeps
    /// each shard under Kinesis's limit of 5 calls per second.
    pub fn min_get_records_interval(mut self, interval: Duration) -> Self {
        self.min_get_records_interval = Some(interval);
        self
    }

    /// Records per GetRecords call, 1 to 10,000. Default 10,000.
    pub fn max_records_per_call(mut self, records: usize) -> Self {
        self.max_records_per_call = Some(records);
        self
    }

    /// The most records fetched but not yet handled, per shard. Default 20,000.
    pub fn buffer_records(mut self, records: usize) -> Self {
        self.buffer_records = Some(records);
        self
    }

    /// The most bytes (data + partition keys) fetched but not yet handled, per shard; one
    /// GetRecords answer larger than this is still taken, alone. Default 32 MiB.
    pub fn buffer_bytes(mut self, bytes: usize) -> Self {
        self.buffer_bytes = Some(bytes);
        self
    }

    /// How often the shard list is refreshed (new shards, closed shards). Default 30 s; it is
    /// also refreshed whenever a shard ends.
    pub fn shard_refresh_interval(mut self, interval: Duration) -> Self {
        self.shard_refresh_interval = Some(interval);
        self
    }

    /// How long shutdown waits for in-flight batches. Default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// The read rate each shard's reader keeps under, in bytes per second: after a large
    /// answer, the next GetRecords waits until the rate allows it. Default 2 MiB/s, Kinesis's
    /// per-shard read limit; raise it for sources without that limit (tests, benches).
    pub fn read_bytes_per_second(mut self, bytes: u64) -> Self {
        self.read_bytes_per_second = Some(bytes);
        self
    }

    /// Delivers an empty batch (a heartbeat) to the service for a shard whose poll returned
    /// nothing, at most once per `interval` per shard, whether a layer asked for one or not.
    ///
    /// Not needed for `BatchLayer`: it asks for the heartbeats it needs through
    /// [`Batch::wake`](kinesis_tower_layers::Batch::wake), so with the defaults a quiet
    /// shard's buffered records are handed over within `max_wait` plus one poll interval.
    /// Set it for layers of your own that hold records and do not use `Batch::wake`.
    /// Heartbeats are service calls and count against tower's `RateLimit` and
    /// `ConcurrencyLimit` like any other. Off by default.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = Some(interval);
        self
    }

    /// Restricts the consumer to the shards `filter` lets through (see
    /// [`AssignmentFilter`]). Default: every shard.
    pub fn assignment_filter(mut self, filter: impl AssignmentFilter) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Reads only these shards (as the Go library's `ScanShard` reads one). Children of a
    /// chosen shard are not read unless chosen too.
    pub fn shards<I, S>(self, shards: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<ShardId>,
    {
        self.assignment_filter(OnlyShards::new(shards))
    }

    /// Shards per ListShards page, 1 to 10,000. Default: the service's (1,000).
    pub fn list_shards_page_size(mut self, shards: usize) -> Self {
        self.list_shards_page_size = Some(shards);
        self
    }

    /// Validates every setting and builds the consumer.
    pub fn build(self) -> Result<Consumer, Error> {
        let api = self.api.ok_or_else(|| {
            Error::config(
                "client",
                "no Kinesis client: call .client(..), .sdk_config(..) or .kinesis_api(..)",
            )
        })?;
        let stream = self.stream.ok_or_else(|| {
            Error::config(
                "stream_name",
                "no stream: call .stream_name(..) or .stream_arn(..)",
            )
        })??;
        validate_name("stream_name", stream.stream_name())?;
        let app_name = self
            .app_name
            .unwrap_or_else(|| defaults::APP_NAME.to_owned());
        validate_name("app_name", &app_name)?;

        let max_records_per_call = bounded(
            "max_records_per_call",
            self.max_records_per_call,
            defaults::MAX_RECORDS_PER_CALL as usize,
            1,
            10_000,
        )?;
        let buffer_records = bounded(
            "buffer_records",
            self.buffer_records,
            defaults::BUFFER_RECORDS as usize,
            1,
            u32::MAX as usize,
        )?;
        let buffer_bytes = bounded(
            "buffer_bytes",
            self.buffer_bytes,
            defaults::BUFFER_BYTES as usize,
            1,
            u32::MAX as usize,
        )?;
        let list_shards_page_size = self
            .list_shards_page_size
            .map(|n| bounded("list_shards_page_size", Some(n), n, 1, 10_000))
            .transpose()?
            .map(|n| n as i32);
        let poll_interval = duration(
            "poll_interval",
            self.poll_interval,
            defaults::POLL_INTERVAL,
            Duration::ZERO,
        )?;
        let min_get_records_interval = duration(
            "min_get_records_interval",
            self.min_get_records_interval,
            defaults::MIN_GET_RECORDS_INTERVAL,
            Duration::ZERO,
        )?;
        let shard_refresh_interval = duration(
            "shard_refresh_interval",
            self.shard_refresh_interval,
            defaults::SHARD_REFRESH_INTERVAL,
            Duration::from_millis(100),
        )?;
        let drain_timeout = duration(
            "drain_timeout",
            self.drain_timeout,
            defaults::DRAIN_TIMEOUT,
            Duration::ZERO,
        )?;

        let heartbeat_interval = self
            .heartbeat_interval
            .map(|interval| {
                duration(
                    "heartbeat_interval",
                    Some(interval),
                    interval,
                    Duration::from_millis(1),
                )
            })
            .transpose()?;
        let settings = Settings {
            stream,
            app_name,
            start_position: self.start_position,
            poll_interval,
            min_get_records_interval,
            max_records_per_call: max_records_per_call as u32,
            buffer_records: buffer_records as u32,
            buffer_bytes: buffer_bytes as u32,
            read_bytes_per_second: match self.read_bytes_per_second {
                Some(0) => {
                    return Err(Error::config(
                        "read_bytes_per_second",
                        "0 would stop every reader: use at least 1",
                    ))
                }
                Some(rate) => rate,
                None => defaults::READ_BYTES_PER_SECOND,
            },
            shard_refresh_interval,
            drain_timeout,
            heartbeat_interval,
            list_shards_page_size,
            backoff_base: defaults::BACKOFF_BASE,
            backoff_max: defaults::BACKOFF_MAX,
        };
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn CheckpointStore>);
        let checkpointer = Checkpointer::from_arc(store, settings.namespace())
            .with_stream_label(settings.stream.stream_name());
        Ok(Consumer::new(Shared {
            settings,
            api,
            checkpointer,
            filter: self.filter.unwrap_or_else(|| Arc::new(EveryShard)),
            #[cfg(test)]
            probe: Default::default(),
        }))
    }
}

fn bounded(
    field: &'static str,
    value: Option<usize>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, Error> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Error::config(
            field,
            format!("{value} is out of range: allowed {min} to {max}"),
        ))
    }
}

/// One hour: the longest any interval or timeout may be set to.
const MAX_DURATION: Duration = Duration::from_secs(3600);

fn duration(
    field: &'static str,
    value: Option<Duration>,
    default: Duration,
    min: Duration,
) -> Result<Duration, Error> {
    let value = value.unwrap_or(default);
    if value >= min && value <= MAX_DURATION {
        Ok(value)
    } else {
        Err(Error::config(
            field,
            format!("{value:?} is out of range: allowed {min:?} to {MAX_DURATION:?}"),
        ))
    }
}
