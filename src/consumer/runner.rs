//! `run`: the dispatcher that drives a `tower::Service<Batch>` over every shard.
//!
//! One loop owns the service. Readers (one task per shard) and the shard lister send events;
//! the dispatcher keeps a queue per shard and at most one call in flight per shard (so each
//! shard's batches are handled in order), calls `poll_ready` before every call (so tower's
//! `ConcurrencyLimit`, `RateLimit`, `Buffer` and friends apply across shards), starts children
//! when their parents' last batch succeeded, and on shutdown or failure drains what is in
//! flight, flushes the store, and stops every task it started before returning.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kinesis_tower_layers::{Batch, BatchEnd, Checkpoint, ShardId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tracing::Instrument;

use super::buffer::{BufferPermit, ShardBuffer};
use super::lineage::Lineage;
use super::listing::{check_start_shard, list_shards};
use super::reader::{read_shard, Event};
use super::service::{tracked, Completed, Dispatch, Failure};
use super::Shared;
use crate::kinesis::ShardDescription;
use crate::Error;

/// The final store flush gets at least this long, whatever the drain timeout.
const MIN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Lane {
    queue: VecDeque<(Batch, BufferPermit)>,
    in_flight: bool,
    /// Queued in `dispatchable` (queue non-empty and nothing in flight).
    scheduled: bool,
    /// The last record handed to the service in this run.
    last_delivered: Option<Checkpoint>,
    /// When the last heartbeat was queued.
    last_heartbeat: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { deadline: Instant },
}

/// Everything `run` knows between two events.
struct Dispatcher {
    shared: Arc<Shared>,
    stream: String,
    events: mpsc::UnboundedSender<Event>,
    /// Readers and listers; aborted on drain, joined before `run` returns.
    tasks: JoinSet<()>,
    lineage: Lineage,
    lanes: HashMap<ShardId, Lane>,
    /// Shards with a batch queued and nothing in flight, in the order they became so.
    dispatchable: VecDeque<ShardId>,
    phase: Phase,
    failure: Option<Error>,
    listing_in_flight: bool,
    listing_wanted: bool,
    listings_started: u64,
    /// Shards whose reads answered ResourceNotFound, each with the number of listings started
    /// when it was reported: only a listing started after that can tell whether the shard
    /// expired (it ends) or something is wrong (fatal); one in flight may predate the expiry.
    gone: HashMap<ShardId, (Error, u64)>,
}

/// Runs the dispatcher until `shutdown` completes or something fails.
pub(crate) async fn run<F>(
    shared: Arc<Shared>,
    mut service: Box<dyn Dispatch>,
    shutdown: F,
) -> Result<(), Error>
where
    F: Future<Output = ()>,
{
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut d = Dispatcher {
        stream: shared.settings.stream.stream_name().to_owned(),
        lineage: Lineage::new(shared.settings.start_position.clone()),
        shared,
        events: events_tx,
        tasks: JoinSet::new(),
        lanes: HashMap::new(),
        dispatchable: VecDeque::new(),
        phase: Phase::Running,
        failure: None,
        listing_in_flight: false,
        listing_wanted: false,
        listings_started: 0,
        gone: HashMap::new(),
    };
    let mut in_flight = FuturesUnordered::new();
    let mut refresh = tokio::time::interval(d.shared.settings.shard_refresh_interval);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = pin!(shutdown);

    loop {
        let deadline = match d.phase {
            Phase::Draining { deadline } => {
                if in_flight.is_empty() && d.dispatchable.is_empty() {
                    break;
                }
                Some(deadline)
            }
            Phase::Running => None,
        };
        let draining = deadline.is_some();
        tokio::select! {
            biased;
            () = &mut shutdown, if !draining => {
                tracing::info!(stream = %d.stream, "shutdown requested; draining");
                d.begin_drain(true);
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if draining => {
                if !in_flight.is_empty() {
                    let shards = d.lanes.iter()
                        .filter(|(_, lane)| lane.in_flight)
                        .map(|(id, _)| id.to_string())
                        .collect();
                    let timeout = d.shared.settings.drain_timeout;
                    d.failure.get_or_insert(Error::DrainTimeout { stream: d.stream.clone(), timeout, shards });
                }
                // Otherwise only markers were left to deliver: nothing was cut short.
                break;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => d.completed(done),
            ready = std::future::poll_fn(|cx| service.poll_ready(cx)), if !d.dispatchable.is_empty() => {
                match ready {
                    Ok(()) => {
                        if let Some(call) = d.next_call(&mut *service) {
                            in_flight.push(call);
                        }
                    }
                    Err(source) => {
                        // The service is broken: nothing more can be dispatched.
                        d.dispatchable.clear();
                        let stream = d.stream.clone();
                        d.fail(Error::ServiceNotReady { stream, source });
                    }
                }
            }
            Some(event) = events.recv(), if !draining => d.event(event),
            Some(joined) = d.tasks.join_next(), if !d.tasks.is_empty() => {
                // Reap finished readers and listers (a JoinSet keeps them until joined), and
                // turn a panic into an error instead of a shard that silently stops.
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!(stream = %d.stream, error = %e, "a consumer task panicked; stopping");
                        let stream = d.stream.clone();
                        d.fail(Error::Task { stream, reason: e.to_string() });
                    }
                }
            }
            _ = refresh.tick(), if !draining && !d.listing_in_flight => d.listing_wanted = true,
        }
        d.list_if_wanted();
    }

    // Stop every task (readers, lister) and wait for them: none outlives `run`.
    d.tasks.shutdown().await;
    // A reader failure that arrived while draining still decides the outcome.
    while let Ok(event) = events.try_recv() {
        if let Event::Failed { error, .. } = event {
            d.failure.get_or_insert(error);
        }
    }
    drop(in_flight);
    d.flush().await;
    match d.failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

impl Dispatcher {
    /// Records the first failure and stops (in-flight calls still finish).
    fn fail(&mut self, error: Error) {
        self.failure.get_or_insert(error);
        self.begin_drain(false);
    }

    /// Stops the readers and keeps only in-flight work; on a graceful stop, each shard still
    /// being read gets a last empty batch marked [`BatchEnd::Shutdown`] so layers can flush.
    fn begin_drain(&mut self, graceful: bool) {
        if self.phase != Phase::Running {
            return;
        }
        self.phase = Phase::Draining {
            deadline: Instant::now() + self.shared.settings.drain_timeout,
        };
        // Stop fetching at once. Queued batches are dropped unhandled: their records are read
        // again from the checkpoint next time.
        self.tasks.abort_all();
        self.dispatchable.clear();
        for (shard, lane) in self.lanes.iter_mut() {
            lane.queue.clear();
            lane.scheduled = false;
            if graceful {
                lane.queue.push_back((
                    Batch::empty(shard.clone(), Some(BatchEnd::Shutdown)),
                    BufferPermit::default(),
                ));
                if !lane.in_flight {
                    lane.scheduled = true;
                    self.dispatchable.push_back(shard.clone());
                }
            }
        }
    }

    /// Queues the shard for dispatch if it has a batch waiting and nothing in flight.
    fn schedule(&mut self, shard: &ShardId) {
        if let Some(lane) = self.lanes.get_mut(shard) {
            if !lane.in_flight && !lane.scheduled && !lane.queue.is_empty() {
                lane.scheduled = true;
                self.dispatchable.push_back(shard.clone());
            }
        }
    }

    /// Hands the next waiting batch to the (ready) service.
    fn next_call(&mut self, service: &mut dyn Dispatch) -> Option<impl Future<Output = Completed>> {
        let shard = self.dispatchable.pop_front()?;
        let lane = self.lanes.get_mut(&shard)?;
        lane.scheduled = false;
        let (batch, permit) = lane.queue.pop_front()?;
        lane.in_flight = true;
        let end = batch.end;
        let first = batch.records.first().map(|r| r.sequence_number.to_string());
        let last = batch.records.last().map(|r| r.sequence_number.to_string());
        if let Some(record) = batch.records.last() {
            lane.last_delivered = Some(record.checkpoint());
        }
        let shard_end = (end == Some(BatchEnd::ShardEnd))
            .then(|| (self.shared.checkpointer.clone(), lane.last_delivered));
        let future = service.call(batch);
        Some(tracked(
            future,
            permit,
            shard,
            end,
            (first, last),
            shard_end,
        ))
    }

    /// A call finished.
    fn completed(&mut self, done: Completed) {
        let Completed {
            shard,
            end,
            first,
            last,
            result,
        } = done;
        if let Some(lane) = self.lanes.get_mut(&shard) {
            lane.in_flight = false;
        }
        let stream = self.stream.clone();
        match result {
            Ok(()) if end == Some(BatchEnd::ShardEnd) => {
                self.lanes.remove(&shard);
                self.lineage.finish(&shard, true);
                self.listing_wanted = true;
                self.start_ready();
            }
            Ok(()) => self.schedule(&shard),
            Err(Failure::Handler(source)) => {
                tracing::error!(%stream, %shard, error = %source, "handler failed; stopping");
                self.fail(Error::Handler {
                    stream,
                    shard: shard.to_string(),
                    first_sequence_number: first,
                    last_sequence_number: last,
                    source,
                });
            }
            Err(Failure::Store(source)) => {
                tracing::error!(%stream, %shard, error = %source, "recording the end of the shard failed; stopping");
                self.fail(Error::Store {
                    stream,
                    shard: Some(shard.to_string()),
                    source: Box::new(source),
                });
            }
        }
    }

    /// A reader or the lister reported something.
    fn event(&mut self, event: Event) {
        match event {
            Event::Batch { batch, permit } => self.queue(batch, permit),
            Event::Children(children) => self.lineage.merge_children(&children),
            Event::AlreadyFinished { shard, read } => {
                self.lanes.remove(&shard);
                self.lineage.finish(&shard, read);
                self.start_ready();
            }
            Event::Failed { shard, error } => {
                tracing::error!(stream = %self.stream, %shard, %error, "shard reader failed; stopping");
                self.fail(error);
            }
            Event::ShardGone { shard, error } => {
                tracing::warn!(stream = %self.stream, %shard, %error, "shard not found; checking whether it expired");
                self.gone.insert(shard, (error, self.listings_started));
                self.listing_wanted = true;
            }
            Event::Listing(Ok(listing)) => {
                self.listing_in_flight = false;
                self.listed(listing);
            }
            Event::Listing(Err(error)) => {
                self.listing_in_flight = false;
                self.fail(error);
            }
            Event::ListingUnavailable(cause) => {
                self.listing_in_flight = false;
                if !self.lineage.has_listing() {
                    // Never listed: the endpoint, region or network is wrong, not passing.
                    let error = Error::from_kinesis(&self.stream, None, cause);
                    self.fail(error);
                }
            }
        }
    }

    /// Queues a reader's batch on its shard's lane.
    fn queue(&mut self, batch: Batch, permit: BufferPermit) {
        let shard = batch.shard_id.clone();
        let heartbeat_interval = self.shared.settings.heartbeat_interval;
        let Some(lane) = self.lanes.get_mut(&shard) else {
            return;
        };
        if batch.is_empty() && batch.end.is_none() {
            // A heartbeat: only when enabled, at most one per interval per shard, and never
            // queued behind other batches.
            let Some(interval) = heartbeat_interval else {
                return;
            };
            let due = lane
                .last_heartbeat
                .is_none_or(|at| at.elapsed() >= interval);
            if !due || !lane.queue.is_empty() {
                return;
            }
            lane.last_heartbeat = Some(Instant::now());
        }
        lane.queue.push_back((batch, permit));
        self.schedule(&shard);
    }

    /// A complete listing arrived.
    fn listed(&mut self, listing: Vec<ShardDescription>) {
        if !self.lineage.has_listing() {
            if let Err(error) = check_start_shard(&self.shared.settings, &listing) {
                self.fail(error);
                return;
            }
        }
        let decided: Vec<ShardId> = self
            .gone
            .iter()
            .filter(|(_, (_, at))| *at < self.listings_started)
            .map(|(shard, _)| shard.clone())
            .collect();
        for shard in decided {
            let Some((error, _)) = self.gone.remove(&shard) else {
                continue;
            };
            if listing.iter().any(|s| s.shard_id == shard) {
                self.fail(error);
            } else if let Some(lane) = self.lanes.get_mut(&shard) {
                // Expired: what was fetched is still handled, then the shard ends like a
                // closed one (children start after its last batch).
                tracing::warn!(stream = %self.stream, %shard, "shard expired (no longer listed); ending it after its queued batches");
                lane.queue.push_back((
                    Batch::empty(shard.clone(), Some(BatchEnd::ShardEnd)),
                    BufferPermit::default(),
                ));
                self.schedule(&shard);
            } else {
                self.lineage.finish(&shard, true);
            }
        }
        self.lineage.merge_listing(listing);
        self.start_ready();
    }

    /// Starts a reader for every shard whose parents have finished (unless stopping).
    fn start_ready(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        let settings = &self.shared.settings;
        for (shard, fallback) in self.lineage.take_ready() {
            self.lanes.insert(shard.clone(), Lane::default());
            let span = tracing::info_span!(
                "kinesis_shard",
                stream = %settings.stream.stream_name(),
                shard = %shard
            );
            let buffer = ShardBuffer::new(settings.buffer_records, settings.buffer_bytes);
            let reader = read_shard(
                self.shared.clone(),
                shard,
                fallback,
                buffer,
                self.events.clone(),
            );
            self.tasks.spawn(reader.instrument(span));
        }
    }

    /// Starts a listing when one is wanted and none is running.
    fn list_if_wanted(&mut self) {
        if !self.listing_wanted || self.listing_in_flight || self.phase != Phase::Running {
            return;
        }
        self.listing_wanted = false;
        self.listing_in_flight = true;
        self.listings_started += 1;
        let shared = self.shared.clone();
        let events = self.events.clone();
        self.tasks.spawn(async move {
            let event = match list_shards(&shared).await {
                Ok(result) => Event::Listing(result),
                Err(cause) => Event::ListingUnavailable(cause),
            };
            let _ = events.send(event);
        });
    }

    /// The final flush, bounded: `drain_timeout(0)` means "do not wait for handlers", not
    /// "do not flush".
    async fn flush(&mut self) {
        let timeout = self.shared.settings.drain_timeout.max(MIN_FLUSH_TIMEOUT);
        let stream = self.stream.clone();
        match tokio::time::timeout(timeout, self.shared.checkpointer.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => {
                self.failure.get_or_insert(Error::Store {
                    stream,
                    shard: None,
                    source: Box::new(source),
                });
            }
            Err(_) => {
                self.failure
                    .get_or_insert(Error::FlushTimeout { stream, timeout });
            }
        }
    }
}
