//! An in-memory Kinesis with fault injection, for unit tests and benches (feature `test-util`).
//!
//! It keeps one stream's shards and records in memory, hands out iterators, and can be told to
//! fail the next calls of a shard with a given [`KinesisErrorKind`] (throttling, expired
//! iterators, 5xx, missing stream), which no local emulator produces. It also counts what it
//! served, so tests can assert what the consumer fetched.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::future::BoxFuture;
use kinesis_tower_layers::{Record, SequenceNumber, ShardId};

use super::{
    ChildShard, ConsumerStatus, IteratorPosition, KinesisApi, KinesisError, KinesisErrorKind,
    RecordsPage, ShardDescription, ShardPage, StreamConsumer, StreamRef, Subscription,
    SubscriptionEvent,
};

/// Which call a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// ListShards.
    ListShards,
    /// GetShardIterator.
    GetShardIterator,
    /// GetRecords.
    GetRecords,
    /// SubscribeToShard (the call that opens a subscription).
    SubscribeToShard,
    /// The next event of an open subscription: the fault arrives in its place and ends the
    /// subscription, as a connection reset mid-stream does.
    SubscriptionEvent,
}

#[derive(Debug)]
struct Shard {
    description: ShardDescription,
    records: Vec<Record>,
}

#[derive(Debug, Default)]
struct State {
    shards: Vec<Shard>,
    next_sequence: u128,
    /// Iterators of an older generation are expired.
    generation: u64,
    faults: HashMap<(Option<ShardId>, Operation), VecDeque<KinesisErrorKind>>,
    deleted: bool,
    records_served: u64,
    get_records_calls: HashMap<ShardId, u64>,
    iterator_requests: Vec<(ShardId, IteratorPosition)>,
    /// Registered stream consumers by name (ARN, and the describes left before it is active).
    consumers: HashMap<String, (String, usize)>,
    /// Describes a new consumer answers `Creating` to before it is active.
    consumer_activation_describes: usize,
    /// Events a subscription sends before the server ends it (Kinesis: 5 minutes).
    events_per_subscription: Option<usize>,
    subscription_requests: Vec<(ShardId, IteratorPosition)>,
    /// Records per subscription event.
    event_record_limit: usize,
}

/// An in-memory, single-stream Kinesis. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct MemoryKinesis {
    state: Arc<Mutex<State>>,
    /// Subscriptions open now (dropped ones are not counted).
    open_subscriptions: Arc<AtomicUsize>,
}

/// How often an open subscription looks for new records of a caught-up shard.
const SUBSCRIPTION_POLL: Duration = Duration::from_millis(5);

/// The stream's ARN in this in-memory Kinesis.
const STREAM_ARN: &str = "arn:aws:kinesis:us-east-1:000000000000:stream/memory";

impl MemoryKinesis {
    /// A stream with `shards` open shards named `shardId-000000000000`, ...
    pub fn with_shards(shards: usize) -> Self {
        let kinesis = Self::default();
        for i in 0..shards {
            kinesis.add_shard(shard_name(i), &[]);
        }
        kinesis
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an open shard with the given parents (which should be closed).
    pub fn add_shard(&self, shard_id: impl Into<ShardId>, parents: &[&str]) -> ShardId {
        let shard_id = shard_id.into();
        let mut description = ShardDescription::new(shard_id.clone());
        description.parent_shard_id = parents.first().map(|p| ShardId::from(*p));
        description.adjacent_parent_shard_id = parents.get(1).map(|p| ShardId::from(*p));
        let mut state = self.lock();
        description.starting_sequence_number = Some(next_sequence(&mut state));
        state.shards.push(Shard {
            description,
            records: Vec::new(),
        });
        shard_id
    }

    /// Closes a shard: no more puts; readers reach its end.
    pub fn close_shard(&self, shard_id: &str) {
        let mut state = self.lock();
        let ending = next_sequence(&mut state);
        if let Some(shard) = state
            .shards
            .iter_mut()
            .find(|s| &*s.description.shard_id == shard_id)
        {
            let last = shard.records.last().map(|r| r.sequence_number);
            shard.description.ending_sequence_number = Some(last.unwrap_or(ending));
        }
    }

    /// Removes a shard, as retention does with a closed shard some time after it closed: it is no
    /// longer listed, and reading it answers ResourceNotFound.
    pub fn remove_shard(&self, shard_id: &str) {
        self.lock()
            .shards
            .retain(|s| &*s.description.shard_id != shard_id);
    }

    /// Appends a record to an open shard; returns its sequence number.
    ///
    /// # Panics
    /// If the shard does not exist or is closed (a test bug).
    pub fn put(
        &self,
        shard_id: &str,
        partition_key: &str,
        data: impl Into<Bytes>,
    ) -> SequenceNumber {
        let mut state = self.lock();
        let sequence_number = next_sequence(&mut state);
        let shard = state
            .shards
            .iter_mut()
            .find(|s| &*s.description.shard_id == shard_id)
            .expect("put to a shard that does not exist");
        assert!(!shard.description.is_closed(), "put to a closed shard");
        shard.records.push(Record {
            shard_id: shard.description.shard_id.clone(),
            sequence_number,
            sub_sequence_number: None,
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            data: data.into(),
            approximate_arrival_timestamp: Some(SystemTime::now()),
        });
        sequence_number
    }

    /// Appends `count` records of `size` bytes to every open shard.
    pub fn fill(&self, count: usize, size: usize) {
        let data = Bytes::from(vec![b'x'; size]);
        let shards: Vec<ShardId> = self
            .lock()
            .shards
            .iter()
            .filter(|s| !s.description.is_closed())
            .map(|s| s.description.shard_id.clone())
            .collect();
        for shard in shards {
            for i in 0..count {
                self.put(&shard, &format!("pk-{}", i % 64), data.clone());
            }
        }
    }

    /// Makes the next `times` calls of `operation` (on `shard`, or on any shard with `None`) fail
    /// with `kind`.
    pub fn inject(
        &self,
        shard: Option<&str>,
        operation: Operation,
        kind: KinesisErrorKind,
        times: usize,
    ) {
        let mut state = self.lock();
        let queue = state
            .faults
            .entry((shard.map(ShardId::from), operation))
            .or_default();
        queue.extend(std::iter::repeat_n(kind, times));
    }

    /// Expires every iterator handed out so far.
    pub fn expire_iterators(&self) {
        self.lock().generation += 1;
    }

    /// Makes the stream disappear: every call answers ResourceNotFound.
    pub fn delete_stream(&self) {
        self.lock().deleted = true;
    }

    /// Total records returned by GetRecords so far.
    pub fn records_served(&self) -> u64 {
        self.lock().records_served
    }

    /// GetRecords calls made on `shard`.
    pub fn get_records_calls(&self, shard: &str) -> u64 {
        self.lock()
            .get_records_calls
            .get(shard)
            .copied()
            .unwrap_or(0)
    }

    /// Every GetShardIterator request so far, in order.
    pub fn iterator_requests(&self) -> Vec<(ShardId, IteratorPosition)> {
        self.lock().iterator_requests.clone()
    }

    /// Makes the server end every subscription after `events` events (Kinesis ends each after
    /// 5 minutes; 0: at once, as a misbehaving server might); the reader must subscribe again
    /// after the last record it delivered.
    pub fn end_subscriptions_after(&self, events: usize) {
        self.lock().events_per_subscription = Some(events);
    }

    /// At most `records` records per subscription event (default 10,000).
    pub fn event_record_limit(&self, records: usize) {
        self.lock().event_record_limit = records.max(1);
    }

    /// A newly registered consumer is `Creating` for the next `describes` describes.
    pub fn consumer_activation_describes(&self, describes: usize) {
        self.lock().consumer_activation_describes = describes;
    }

    /// Every SubscribeToShard request so far, in order.
    pub fn subscription_requests(&self) -> Vec<(ShardId, IteratorPosition)> {
        self.lock().subscription_requests.clone()
    }

    /// Subscriptions open now (a cancelled one, dropped by the reader, no longer counts).
    pub fn open_subscriptions(&self) -> usize {
        self.open_subscriptions.load(Ordering::SeqCst)
    }

    /// The registered stream consumers' names.
    pub fn stream_consumers(&self) -> Vec<String> {
        self.lock().consumers.keys().cloned().collect()
    }

    /// Every record of `shard`.
    pub fn records(&self, shard: &str) -> Vec<Record> {
        self.lock()
            .shards
            .iter()
            .find(|s| &*s.description.shard_id == shard)
            .map(|s| s.records.clone())
            .unwrap_or_default()
    }
}

/// The name the n-th shard gets in [`MemoryKinesis::with_shards`].
pub fn shard_name(n: usize) -> String {
    format!("shardId-{n:012}")
}

fn next_sequence(state: &mut State) -> SequenceNumber {
    state.next_sequence += 1;
    // Realistic width (56 digits), numerically increasing.
    SequenceNumber::parse(&format!("4959{:052}", state.next_sequence))
        .expect("generated sequence numbers are valid")
}

/// Where a read from `position` starts in `records`.
fn start_index(records: &[Record], position: IteratorPosition) -> usize {
    match position {
        IteratorPosition::TrimHorizon => 0,
        IteratorPosition::Latest => records.len(),
        IteratorPosition::AtTimestamp(t) => records
            .iter()
            .position(|r| r.approximate_arrival_timestamp.is_some_and(|a| a >= t))
            .unwrap_or(records.len()),
        IteratorPosition::AtSequenceNumber(s) => records.partition_point(|r| r.sequence_number < s),
        IteratorPosition::AfterSequenceNumber(s) => {
            records.partition_point(|r| r.sequence_number <= s)
        }
    }
}

/// The children of `shard`, as Kinesis reports them at its end.
fn children_of(state: &State, shard: &ShardId) -> Vec<ChildShard> {
    state
        .shards
        .iter()
        .filter(|s| s.description.parents().any(|p| p == shard))
        .map(|s| ChildShard {
            shard_id: s.description.shard_id.clone(),
            parent_shards: s.description.parents().cloned().collect(),
        })
        .collect()
}

fn not_found(operation: &'static str, what: String) -> KinesisError {
    KinesisError::new(KinesisErrorKind::ResourceNotFound, operation, what)
}

/// One open in-memory subscription: where it has got to, and how many events it may still send.
struct OpenSubscription {
    kinesis: MemoryKinesis,
    shard: ShardId,
    index: usize,
    events_left: Option<usize>,
    ended: bool,
}

impl OpenSubscription {
    /// The next event, waiting while the shard is open and has nothing new; `None` when the
    /// subscription is over.
    async fn next(&mut self) -> Option<Result<SubscriptionEvent, KinesisError>> {
        if self.ended || self.events_left == Some(0) {
            return None;
        }
        loop {
            {
                let mut state = self.kinesis.lock();
                if let Some(kind) =
                    take_fault(&mut state, Some(&self.shard), Operation::SubscriptionEvent)
                {
                    self.ended = true;
                    return Some(Err(fault(kind, "SubscribeToShard")));
                }
                let limit = match state.event_record_limit {
                    0 => 10_000,
                    n => n,
                };
                let children = children_of(&state, &self.shard);
                let Some(shard) = state
                    .shards
                    .iter()
                    .find(|s| s.description.shard_id == self.shard)
                else {
                    self.ended = true;
                    return Some(Err(not_found(
                        "SubscribeToShard",
                        format!("shard {} not found", self.shard),
                    )));
                };
                let end = (self.index + limit).min(shard.records.len());
                let records = shard.records[self.index..end].to_vec();
                let at_end = end == shard.records.len();
                let closed = shard.description.is_closed();
                if !records.is_empty() || closed {
                    self.index = end;
                    state.records_served += records.len() as u64;
                    let last = closed && at_end;
                    self.ended = last;
                    if let Some(left) = self.events_left.as_mut() {
                        *left -= 1;
                    }
                    return Some(Ok(SubscriptionEvent {
                        continuation_sequence_number: (!last).then(|| {
                            records
                                .last()
                                .map_or_else(String::new, |r| r.sequence_number.to_string())
                        }),
                        millis_behind_latest: Some(if at_end { 0 } else { 1000 }),
                        child_shards: if last { children } else { Vec::new() },
                        records,
                    }));
                }
            }
            tokio::time::sleep(SUBSCRIPTION_POLL).await;
        }
    }
}

/// Counts a subscription as open until it is dropped.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn take_fault(
    state: &mut State,
    shard: Option<&ShardId>,
    operation: Operation,
) -> Option<KinesisErrorKind> {
    if state.deleted {
        return Some(KinesisErrorKind::ResourceNotFound);
    }
    for key in [(shard.cloned(), operation), (None, operation)] {
        if let Some(kind) = state.faults.get_mut(&key).and_then(VecDeque::pop_front) {
            return Some(kind);
        }
    }
    None
}

fn fault(kind: KinesisErrorKind, operation: &'static str) -> KinesisError {
    KinesisError::new(kind, operation, format!("injected {kind:?}"))
}

fn parse_iterator(iterator: &str) -> Option<(u64, ShardId, usize)> {
    let mut parts = iterator.splitn(3, '|');
    let generation = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    let shard = parts.next()?;
    Some((generation, ShardId::from(shard), index))
}

impl KinesisApi for MemoryKinesis {
    fn list_shards<'a>(
        &'a self,
        _stream: &'a StreamRef,
        next_token: Option<&'a str>,
        max_results: Option<i32>,
    ) -> BoxFuture<'a, Result<ShardPage, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            if let Some(kind) = take_fault(&mut state, None, Operation::ListShards) {
                return Err(fault(kind, "ListShards"));
            }
            let start: usize = next_token.map_or(Ok(0), str::parse).map_err(|_| {
                KinesisError::new(KinesisErrorKind::InvalidArgument, "ListShards", "bad token")
            })?;
            let page = max_results.map_or(1000, |m| m.max(1) as usize);
            let start = start.min(state.shards.len());
            let end = start.saturating_add(page).min(state.shards.len());
            let shards = state.shards[start..end]
                .iter()
                .map(|s| s.description.clone())
                .collect();
            let next_token = (end < state.shards.len()).then(|| end.to_string());
            Ok(ShardPage { shards, next_token })
        })();
        Box::pin(async move { result })
    }

    fn get_shard_iterator<'a>(
        &'a self,
        _stream: &'a StreamRef,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            if let Some(kind) = take_fault(&mut state, Some(shard_id), Operation::GetShardIterator)
            {
                return Err(fault(kind, "GetShardIterator"));
            }
            state.iterator_requests.push((shard_id.clone(), position));
            let generation = state.generation;
            let shard = state
                .shards
                .iter()
                .find(|s| &s.description.shard_id == shard_id)
                .ok_or_else(|| {
                    KinesisError::new(
                        KinesisErrorKind::ResourceNotFound,
                        "GetShardIterator",
                        format!("shard {shard_id} not found"),
                    )
                })?;
            let index = start_index(&shard.records, position);
            Ok(format!("{generation}|{index}|{shard_id}"))
        })();
        Box::pin(async move { result })
    }

    fn get_records<'a>(
        &'a self,
        _stream: &'a StreamRef,
        shard_id: &'a ShardId,
        iterator: &'a str,
        limit: i32,
    ) -> BoxFuture<'a, Result<RecordsPage, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            *state.get_records_calls.entry(shard_id.clone()).or_default() += 1;
            if let Some(kind) = take_fault(&mut state, Some(shard_id), Operation::GetRecords) {
                return Err(fault(kind, "GetRecords"));
            }
            let (generation, iterator_shard, index) =
                parse_iterator(iterator).ok_or_else(|| {
                    KinesisError::new(
                        KinesisErrorKind::InvalidArgument,
                        "GetRecords",
                        "bad iterator",
                    )
                })?;
            if generation != state.generation {
                return Err(KinesisError::new(
                    KinesisErrorKind::ExpiredIterator,
                    "GetRecords",
                    "iterator expired",
                ));
            }
            let children = children_of(&state, &iterator_shard);
            let shard = state
                .shards
                .iter()
                .find(|s| s.description.shard_id == iterator_shard)
                .ok_or_else(|| {
                    KinesisError::new(KinesisErrorKind::ResourceNotFound, "GetRecords", "no shard")
                })?;
            let end = (index + limit.max(0) as usize).min(shard.records.len());
            let records = shard.records[index..end].to_vec();
            let at_end = end == shard.records.len();
            let closed = shard.description.is_closed();
            let millis_behind_latest = Some(if at_end { 0 } else { 1000 });
            state.records_served += records.len() as u64;
            let (next_iterator, child_shards) = if closed && at_end {
                (None, children)
            } else {
                (
                    Some(format!("{generation}|{end}|{iterator_shard}")),
                    Vec::new(),
                )
            };
            Ok(RecordsPage {
                records,
                next_iterator,
                millis_behind_latest,
                child_shards,
            })
        })();
        Box::pin(async move { result })
    }

    fn stream_arn<'a>(
        &'a self,
        _stream: &'a StreamRef,
    ) -> BoxFuture<'a, Result<String, KinesisError>> {
        Box::pin(async { Ok(STREAM_ARN.to_owned()) })
    }

    fn register_stream_consumer<'a>(
        &'a self,
        _stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            if state.consumers.contains_key(name) {
                return Err(KinesisError::new(
                    KinesisErrorKind::ResourceInUse,
                    "RegisterStreamConsumer",
                    format!("ResourceInUseException: consumer {name} exists"),
                ));
            }
            let arn = format!("{STREAM_ARN}/consumer/{name}:1");
            let describes = state.consumer_activation_describes;
            state
                .consumers
                .insert(name.to_owned(), (arn.clone(), describes));
            let status = if describes == 0 {
                ConsumerStatus::Active
            } else {
                ConsumerStatus::Creating
            };
            Ok(StreamConsumer {
                name: name.to_owned(),
                arn,
                status,
            })
        })();
        Box::pin(async move { result })
    }

    fn describe_stream_consumer<'a>(
        &'a self,
        _stream_arn: &'a str,
        name: &'a str,
    ) -> BoxFuture<'a, Result<StreamConsumer, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            let (arn, describes) = state.consumers.get_mut(name).ok_or_else(|| {
                not_found(
                    "DescribeStreamConsumer",
                    format!("consumer {name} not found"),
                )
            })?;
            let status = if *describes == 0 {
                ConsumerStatus::Active
            } else {
                *describes -= 1;
                ConsumerStatus::Creating
            };
            Ok(StreamConsumer {
                name: name.to_owned(),
                arn: arn.clone(),
                status,
            })
        })();
        Box::pin(async move { result })
    }

    fn deregister_stream_consumer<'a>(
        &'a self,
        consumer_arn: &'a str,
    ) -> BoxFuture<'a, Result<(), KinesisError>> {
        self.lock()
            .consumers
            .retain(|_, (arn, _)| arn != consumer_arn);
        Box::pin(async { Ok(()) })
    }

    fn subscribe_to_shard<'a>(
        &'a self,
        consumer_arn: &'a str,
        shard_id: &'a ShardId,
        position: IteratorPosition,
    ) -> BoxFuture<'a, Result<Subscription, KinesisError>> {
        let result = (|| {
            let mut state = self.lock();
            if let Some(kind) = take_fault(&mut state, Some(shard_id), Operation::SubscribeToShard)
            {
                return Err(fault(kind, "SubscribeToShard"));
            }
            if !state
                .consumers
                .values()
                .any(|(arn, describes)| arn == consumer_arn && *describes == 0)
            {
                return Err(not_found(
                    "SubscribeToShard",
                    format!("no active consumer {consumer_arn}"),
                ));
            }
            state
                .subscription_requests
                .push((shard_id.clone(), position));
            let shard = state
                .shards
                .iter()
                .find(|s| &s.description.shard_id == shard_id)
                .ok_or_else(|| {
                    not_found("SubscribeToShard", format!("shard {shard_id} not found"))
                })?;
            let subscription = OpenSubscription {
                kinesis: self.clone(),
                shard: shard_id.clone(),
                index: start_index(&shard.records, position),
                events_left: state.events_per_subscription,
                ended: false,
            };
            self.open_subscriptions.fetch_add(1, Ordering::SeqCst);
            let guard = OpenGuard(self.open_subscriptions.clone());
            let events =
                futures::stream::unfold((subscription, guard), |(mut open, guard)| async move {
                    let event = open.next().await?;
                    Some((event, (open, guard)))
                });
            Ok(Box::pin(events) as Subscription)
        })();
        Box::pin(async move { result })
    }
}
