//! `ConsumerBuilder`: every setting, validated into [`Settings`] by `build`.

use std::sync::Arc;
use std::time::Duration;

use kinesis_tower_layers::{CheckpointStore, Checkpointer, MemoryStore, ShardId};

use super::assignment::{AssignmentFilter, EveryShard, OnlyShards};
use super::handle::{Consumer, Shared};
use super::settings::{EnhancedFanOut, Settings, StartPosition};
use crate::group::ConsumerGroup;
use crate::kinesis::{EnvClient, KinesisApi, StreamRef};
use crate::Error;

/// Builds a [`Consumer`]; every setting is validated by [`build`](ConsumerBuilder::build).
///
/// Only the stream is required. Without a client, the consumer reads with one made from the
/// AWS configuration in the environment (region, credentials, endpoint), loaded on first use.
#[derive(Default)]
pub struct ConsumerBuilder {
    api: Option<Arc<dyn KinesisApi>>,
    stream: Option<Result<StreamRef, Error>>,
    store: Option<Arc<dyn CheckpointStore>>,
    filter: Option<Arc<dyn AssignmentFilter>>,
    group: Option<ConsumerGroup>,
    settings: Settings,
}

impl std::fmt::Debug for ConsumerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder").finish_non_exhaustive()
    }
}

impl ConsumerBuilder {
    /// Reads with this SDK client. Default: a client made from the AWS configuration in the
    /// environment (`aws_config::load_from_env`), on first use.
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
        self.settings.app_name = name.into();
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
        self.settings.start_position = position;
        self
    }

    /// How long a caught-up shard waits before polling again. Default 200 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.settings.poll_interval = interval;
        self
    }

    /// The shortest time between two GetRecords calls of one shard. Default 200 ms, which keeps
    /// each shard under Kinesis's limit of 5 calls per second.
    pub fn min_get_records_interval(mut self, interval: Duration) -> Self {
        self.settings.min_get_records_interval = interval;
        self
    }

    /// Records per GetRecords call, 1 to 10,000. Default 10,000.
    pub fn max_records_per_call(mut self, records: usize) -> Self {
        self.settings.max_records_per_call = saturating_u32(records);
        self
    }

    /// The most records fetched but not yet handled, per shard. Default 20,000.
    pub fn buffer_records(mut self, records: usize) -> Self {
        self.settings.buffer_records = saturating_u32(records);
        self
    }

    /// The most bytes (data + partition keys) fetched but not yet handled, per shard; one
    /// GetRecords answer larger than this is still taken, alone. Default 32 MiB.
    pub fn buffer_bytes(mut self, bytes: usize) -> Self {
        self.settings.buffer_bytes = saturating_u32(bytes);
        self
    }

    /// How often the shard list is refreshed (new shards, closed shards). Default 30 s; it is
    /// also refreshed whenever a shard ends.
    pub fn shard_refresh_interval(mut self, interval: Duration) -> Self {
        self.settings.shard_refresh_interval = interval;
        self
    }

    /// How long shutdown waits for in-flight batches. Default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.settings.drain_timeout = timeout;
        self
    }

    /// The read rate each shard's reader keeps under, in bytes per second: after a large
    /// answer, the next GetRecords waits until the rate allows it. Default 2 MiB/s, Kinesis's
    /// per-shard read limit; raise it for sources without that limit (tests, benches).
    pub fn read_bytes_per_second(mut self, bytes: u64) -> Self {
        self.settings.read_bytes_per_second = bytes;
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
        self.settings.heartbeat_interval = Some(interval);
        self
    }

    /// Reads every shard through enhanced fan-out (SubscribeToShard) as the stream consumer
    /// `fan_out` names (a name, or [`EnhancedFanOut`] with its options), instead of polling
    /// GetRecords. Everything else (start positions, checkpoints, layers, `records()`,
    /// resharding, groups) works the same. The polling settings (`poll_interval`,
    /// `min_get_records_interval`, `read_bytes_per_second`) do not apply; the buffer caps do.
    pub fn enhanced_fan_out(mut self, fan_out: impl Into<EnhancedFanOut>) -> Self {
        self.settings.fan_out = Some(fan_out.into());
        self
    }

    /// Restricts the consumer to the shards `filter` lets through (see
    /// [`AssignmentFilter`]). Default: every shard.
    pub fn assignment_filter(mut self, filter: impl AssignmentFilter) -> Self {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Joins a consumer group: this consumer reads the shards whose leases it holds, and
    /// keeps their checkpoints on the lease rows (the group's table is the checkpoint store,
    /// so `.store(..)` cannot be set too). See [`group`](crate::group).
    pub fn group(mut self, group: ConsumerGroup) -> Self {
        self.group = Some(group);
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
        self.settings.list_shards_page_size = Some(i32::try_from(shards).unwrap_or(i32::MAX));
        self
    }

    /// Validates every setting and builds the consumer.
    pub fn build(self) -> Result<Consumer, Error> {
        let mut settings = self.settings;
        settings.stream = self.stream.ok_or_else(|| {
            Error::config(
                "stream_name",
                "no stream: call .stream_name(..) or .stream_arn(..)",
            )
        })??;
        settings.validate()?;
        let api = self
            .api
            .unwrap_or_else(|| Arc::new(EnvClient::default()) as Arc<dyn KinesisApi>);
        let mut store = self.store;
        let mut filter = self.filter;
        if let Some(group) = self.group {
            if store.is_some() {
                return Err(Error::config(
                    "store",
                    "a consumer group keeps checkpoints in its lease table: remove .store(..)",
                ));
            }
            if filter.is_some() {
                return Err(Error::config(
                    "assignment_filter",
                    "a consumer group decides which shards this consumer reads: remove .shards(..) / .assignment_filter(..)",
                ));
            }
            group.set_stream(settings.stream.stream_name());
            store = Some(Arc::new(group.store()));
            filter = Some(Arc::new(group));
        }
        let store_configured = store.is_some();
        let store =
            store.unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn CheckpointStore>);
        let checkpointer = Checkpointer::from_arc(store, settings.namespace())
            .with_stream_label(settings.stream.stream_name());
        Ok(Consumer::new(Shared {
            settings,
            api,
            checkpointer,
            filter: filter.unwrap_or_else(|| Arc::new(EveryShard)),
            store_configured,
            #[cfg(test)]
            probe: Default::default(),
        }))
    }
}

/// Counts beyond `u32` are kept as `u32::MAX` (out of range where the limit is lower).
fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
