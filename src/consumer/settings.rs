//! Validated consumer settings and the start position.

use std::time::{Duration, SystemTime};

use kinesis_tower_layers::{SequenceNumber, ShardId};

use crate::kinesis::StreamRef;

/// Where a shard without a checkpoint starts reading.
///
/// It applies only where a shard has no checkpoint: a shard with one resumes from it, whatever
/// the start position says. A shard opened at `Latest` or a timestamp first writes (durably)
/// [`Checkpoint::StartedAtTime`], and before its first record goes out (also after a
/// sequence-number start) [`Checkpoint::StartedAt`] of that record, so a restart resumes where
/// the first run started rather than at a new `LATEST` or a new timestamp: nothing put since is
/// skipped, even if the first run stopped before its first record.
///
/// A shard discovered after start-up, and the child of a shard this consumer read, starts at
/// `TRIM_HORIZON` when it has no checkpoint (at the timestamp, with `AtTimestamp`), so no record
/// written before it was discovered is lost.
///
/// [`Checkpoint::StartedAt`]: kinesis_tower_layers::Checkpoint::StartedAt
/// [`Checkpoint::StartedAtTime`]: kinesis_tower_layers::Checkpoint::StartedAtTime
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartPosition {
    /// Only records put after the consumer started (the default, as in the Go library). Closed
    /// shards without a checkpoint are not read.
    #[default]
    Latest,
    /// The oldest record kept in each shard; closed parents are read before their children.
    TrimHorizon,
    /// The first record at or after this time, in each shard, and in the children of shards
    /// read from it.
    AtTimestamp(SystemTime),
    /// One shard starts at this record. Its ancestors are not read; every other shard starts at
    /// `TRIM_HORIZON`. The shard must be listed while it has no checkpoint; once it has one,
    /// it may expire without stopping restarts.
    AtSequenceNumber {
        /// The shard the sequence number belongs to.
        shard_id: ShardId,
        /// The first record to read.
        sequence_number: SequenceNumber,
    },
    /// One shard starts just after this record. Its ancestors are not read; every other shard
    /// starts at `TRIM_HORIZON`.
    AfterSequenceNumber {
        /// The shard the sequence number belongs to.
        shard_id: ShardId,
        /// The last record not to read.
        sequence_number: SequenceNumber,
    },
}

/// Enhanced fan-out: the consumer reads each shard through SubscribeToShard as a registered
/// stream consumer, with its own 2 MiB/s per shard and records pushed as they arrive, instead
/// of polling GetRecords (which shares 2 MiB/s per shard among every polling consumer of the
/// stream and adds up to one poll interval of latency). Set with
/// [`ConsumerBuilder::enhanced_fan_out`](crate::ConsumerBuilder::enhanced_fan_out).
///
/// The stream consumer is registered under `name` at the first run, or found when it exists
/// (every worker and every restart of one application uses the same name, and so the same
/// consumer), and the run waits until it is active. It stays registered when the run ends
/// unless [`deregister_on_shutdown`](Self::deregister_on_shutdown) says otherwise: other
/// workers of the application may still be using it. Kinesis allows 20 consumers per stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnhancedFanOut {
    pub(crate) name: String,
    pub(crate) deregister_on_shutdown: bool,
    pub(crate) stall_timeout: Duration,
    pub(crate) activation_timeout: Duration,
}

impl EnhancedFanOut {
    /// Reads as the stream consumer `name` (1 to 128 of `a-z A-Z 0-9 _ . -`).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            deregister_on_shutdown: false,
            stall_timeout: defaults::FAN_OUT_STALL_TIMEOUT,
            activation_timeout: defaults::FAN_OUT_ACTIVATION_TIMEOUT,
        }
    }

    /// Deregisters the stream consumer when the run ends. Off by default: other workers of
    /// the same application may still be reading through it.
    pub fn deregister_on_shutdown(mut self, deregister: bool) -> Self {
        self.deregister_on_shutdown = deregister;
        self
    }

    /// How long a shard's subscription may wait for room in the shard's buffer (a handler that
    /// does not keep up) before it is cancelled; the shard subscribes again, after the last
    /// record it delivered, once there is room. While it waits no events are pulled, so nothing
    /// piles up in memory. Default 30 s.
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// How long the first run waits for a newly registered consumer to become active.
    /// Default 2 minutes (Kinesis takes seconds).
    pub fn activation_timeout(mut self, timeout: Duration) -> Self {
        self.activation_timeout = timeout;
        self
    }

    /// The stream consumer's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl From<&str> for EnhancedFanOut {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for EnhancedFanOut {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

/// Every setting of a consumer: the builder starts from [`Settings::default`] (the defaults),
/// its setters write here, and `build` validates the result. The one field list.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub stream: StreamRef,
    pub app_name: String,
    pub start_position: StartPosition,
    pub poll_interval: Duration,
    pub min_get_records_interval: Duration,
    pub max_records_per_call: u32,
    pub buffer_records: u32,
    pub buffer_bytes: u32,
    pub read_bytes_per_second: u64,
    pub shard_refresh_interval: Duration,
    pub drain_timeout: Duration,
    pub heartbeat_interval: Option<Duration>,
    pub list_shards_page_size: Option<i32>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub fan_out: Option<EnhancedFanOut>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            // Required: `build` fails until a stream is set.
            stream: StreamRef::name(String::new()),
            app_name: defaults::APP_NAME.to_owned(),
            start_position: StartPosition::default(),
            poll_interval: defaults::POLL_INTERVAL,
            min_get_records_interval: defaults::MIN_GET_RECORDS_INTERVAL,
            max_records_per_call: defaults::MAX_RECORDS_PER_CALL,
            buffer_records: defaults::BUFFER_RECORDS,
            buffer_bytes: defaults::BUFFER_BYTES,
            read_bytes_per_second: defaults::READ_BYTES_PER_SECOND,
            shard_refresh_interval: defaults::SHARD_REFRESH_INTERVAL,
            drain_timeout: defaults::DRAIN_TIMEOUT,
            heartbeat_interval: None,
            list_shards_page_size: None,
            backoff_base: defaults::BACKOFF_BASE,
            backoff_max: defaults::BACKOFF_MAX,
            fan_out: None,
        }
    }
}

impl Settings {
    /// Checks every setting; the error names the setting and the allowed range.
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        validate_name("stream_name", self.stream.stream_name())?;
        validate_name("app_name", &self.app_name)?;
        in_range("max_records_per_call", self.max_records_per_call, 1, 10_000)?;
        in_range("buffer_records", self.buffer_records, 1, u32::MAX)?;
        in_range("buffer_bytes", self.buffer_bytes, 1, u32::MAX)?;
        if let Some(page) = self.list_shards_page_size {
            in_range("list_shards_page_size", page, 1, 10_000)?;
        }
        in_range(
            "read_bytes_per_second",
            self.read_bytes_per_second,
            1,
            u64::MAX,
        )?;
        let any = Duration::ZERO;
        duration_in_range("poll_interval", self.poll_interval, any)?;
        duration_in_range(
            "min_get_records_interval",
            self.min_get_records_interval,
            any,
        )?;
        duration_in_range(
            "shard_refresh_interval",
            self.shard_refresh_interval,
            Duration::from_millis(100),
        )?;
        duration_in_range("drain_timeout", self.drain_timeout, any)?;
        if let Some(interval) = self.heartbeat_interval {
            duration_in_range("heartbeat_interval", interval, Duration::from_millis(1))?;
        }
        if let Some(fan_out) = &self.fan_out {
            validate_name("enhanced_fan_out", &fan_out.name)?;
            duration_in_range(
                "enhanced_fan_out.stall_timeout",
                fan_out.stall_timeout,
                Duration::from_millis(1),
            )?;
            duration_in_range(
                "enhanced_fan_out.activation_timeout",
                fan_out.activation_timeout,
                any,
            )?;
        }
        Ok(())
    }

    /// The checkpoint namespace: app name and stream name.
    pub(crate) fn namespace(&self) -> String {
        format!("{}/{}", self.app_name, self.stream.stream_name())
    }

    /// The GetRecords limit: never more records than the shard's buffer may hold.
    pub(crate) fn records_per_call(&self) -> u32 {
        self.max_records_per_call.min(self.buffer_records)
    }
}

/// Defaults, named so the docs and the builder agree.
pub(crate) mod defaults {
    use std::time::Duration;

    pub const APP_NAME: &str = "default";
    pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
    pub const MIN_GET_RECORDS_INTERVAL: Duration = Duration::from_millis(200);
    pub const MAX_RECORDS_PER_CALL: u32 = 10_000;
    pub const BUFFER_RECORDS: u32 = 20_000;
    pub const BUFFER_BYTES: u32 = 32 * 1024 * 1024;
    pub const READ_BYTES_PER_SECOND: u64 = 2 * 1024 * 1024;
    pub const SHARD_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
    pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
    pub const BACKOFF_BASE: Duration = Duration::from_millis(200);
    pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
    pub const FAN_OUT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
    pub const FAN_OUT_ACTIVATION_TIMEOUT: Duration = Duration::from_secs(120);
}

fn in_range<T>(field: &'static str, value: T, min: T, max: T) -> Result<(), crate::Error>
where
    T: PartialOrd + std::fmt::Debug,
{
    if value >= min && value <= max {
        Ok(())
    } else {
        Err(crate::Error::config(
            field,
            format!("{value:?} is out of range: allowed {min:?} to {max:?}"),
        ))
    }
}

/// One hour: the longest any interval or timeout may be set to.
const MAX_DURATION: Duration = Duration::from_secs(3600);

fn duration_in_range(
    field: &'static str,
    value: Duration,
    min: Duration,
) -> Result<(), crate::Error> {
    in_range(field, value, min, MAX_DURATION)
}

/// Kinesis stream names: 1 to 128 of `a-z A-Z 0-9 _ . -`. App names follow the same rule.
pub(crate) fn validate_name(field: &'static str, name: &str) -> Result<(), crate::Error> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(crate::Error::config(
            field,
            format!("{name:?} must be 1 to 128 characters of letters, digits, '_', '.', '-'"),
        ))
    }
}
