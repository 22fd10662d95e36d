//! `run`: the dispatcher that drives a `tower::Service<Batch>` over every shard.
//!
//! One loop owns the service. Readers (one task per shard) and the shard lister send events;
//! the loop keeps a queue per shard and at most one call in flight per shard (so each shard's
//! batches are handled in order), calls `poll_ready` before every call (so tower's
//! `ConcurrencyLimit`, `RateLimit`, `Buffer` and friends apply across shards), starts children
//! when their parents' last batch succeeded, and on shutdown or failure drains what is in
//! flight, flushes the store, and stops every task it started before returning.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kinesis_tower_layers::{
    Batch, BatchEnd, BoxError, Checkpoint, Checkpointer, ShardId, StoreError,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tower::Service;
use tracing::Instrument;

use super::buffer::{BufferPermit, ShardBuffer};
use super::lineage::Lineage;
use super::reader::{read_shard, Event};
use super::settings::Settings;
use super::Shared;
use crate::backoff::Backoff;
use crate::kinesis::ShardDescription;
use crate::Error;

/// Attempts of one listing before it waits for the next refresh tick.
const LISTING_ATTEMPTS: u32 = 5;

/// The final store flush gets at least this long, whatever the drain timeout.
const MIN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// Why a call did not succeed.
enum Failure {
    /// The service failed.
    Handler(BoxError),
    /// The service succeeded on a shard's last batch, but recording the shard's end failed.
    Store(StoreError),
}

struct Completed {
    shard: ShardId,
    end: Option<BatchEnd>,
    first: Option<String>,
    last: Option<String>,
    result: Result<(), Failure>,
}

/// The handler service with its future and error types erased.
///
/// `run` works on this rather than on a generic `S: Service<Batch>`: when a generic `async fn`
/// holds `S::Future`s across awaits, the compiler cannot prove the future `Send` for services
/// whose impls require `E: Into<BoxError>` (tower's `Timeout`, among others), and users could
/// not spawn a run inside an `async` block. Erased, `run` needs no such proof.
pub(crate) trait Dispatch: Send {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;
    fn call(&mut self, batch: Batch) -> BoxFuture<'static, Result<(), BoxError>>;
}

/// Erases a `Service<Batch>` into a [`Dispatch`].
pub(crate) struct Erased<S>(pub(crate) S);

impl<S> Dispatch for Erased<S>
where
    S: Service<Batch> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, batch: Batch) -> BoxFuture<'static, Result<(), BoxError>> {
        let future = self.0.call(batch);
        Box::pin(async move { future.await.map(drop).map_err(Into::into) })
    }
}

/// A call in flight: the service's future and the batch's buffer room, held until it completes.
/// For a closed shard's last batch, once the call succeeded, the shard's end is recorded
/// (`Checkpointer::shard_ended`) before its children may start.
async fn tracked(
    future: BoxFuture<'static, Result<(), BoxError>>,
    permit: BufferPermit,
    shard: ShardId,
    end: Option<BatchEnd>,
    (first, last): (Option<String>, Option<String>),
    shard_end: Option<(Checkpointer, Option<Checkpoint>)>,
) -> Completed {
    let mut result = future.await.map_err(Failure::Handler);
    drop(permit);
    if let (Ok(()), Some((checkpointer, last_delivered))) = (&result, shard_end) {
        result = checkpointer
            .shard_ended(&shard, last_delivered)
            .await
            .map_err(Failure::Store);
    }
    Completed {
        shard,
        end,
        first,
        last,
        result,
    }
}

#[derive(PartialEq, Eq)]
enum Phase {
    Running,
    Draining { deadline: Instant },
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
    let settings = &shared.settings;
    let stream = settings.stream.stream_name().to_owned();
    let (events_tx, mut events) = mpsc::unbounded_channel::<Event>();
    let mut tasks = JoinSet::new();
    let mut lineage = Lineage::new(settings.start_position.clone());
    let mut lanes: HashMap<ShardId, Lane> = HashMap::new();
    let mut dispatchable: VecDeque<ShardId> = VecDeque::new();
    let mut in_flight = FuturesUnordered::new();
    let mut listing_in_flight = false;
    let mut listing_wanted = false;
    let mut refresh = tokio::time::interval(settings.shard_refresh_interval);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut shutdown = pin!(shutdown);
    let mut phase = Phase::Running;
    let mut failure: Option<Error> = None;
    // Shards whose reads answered ResourceNotFound, waiting for a listing to tell whether they
    // expired (finished) or something is wrong (fatal).
    // Each with the number of listings started when it was reported: only a listing started
    // after that can tell (one already in flight may predate the expiry).
    let mut gone: HashMap<ShardId, (Error, u64)> = HashMap::new();
    let mut listings_started: u64 = 0;

    let schedule = |lanes: &mut HashMap<ShardId, Lane>,
                    dispatchable: &mut VecDeque<ShardId>,
                    shard: &ShardId| {
        if let Some(lane) = lanes.get_mut(shard) {
            if !lane.in_flight && !lane.scheduled && !lane.queue.is_empty() {
                lane.scheduled = true;
                dispatchable.push_back(shard.clone());
            }
        }
    };

    loop {
        if let Phase::Draining { .. } = phase {
            if in_flight.is_empty() && dispatchable.is_empty() {
                break;
            }
        }
        let draining = phase != Phase::Running;
        let deadline = match phase {
            Phase::Draining { deadline } => deadline,
            Phase::Running => Instant::now(),
        };
        tokio::select! {
            biased;
            () = &mut shutdown, if !draining => {
                tracing::info!(%stream, "shutdown requested; draining");
                begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, true, &mut tasks);
            }
            () = sleep_until(deadline), if draining => {
                if in_flight.is_empty() {
                    // Only markers were left to deliver: nothing was cut short.
                    break;
                }
                let shards = lanes
                    .iter()
                    .filter(|(_, lane)| lane.in_flight)
                    .map(|(id, _)| id.to_string())
                    .collect();
                failure.get_or_insert(Error::DrainTimeout {
                    stream: stream.clone(),
                    timeout: settings.drain_timeout,
                    shards,
                });
                break;
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let Completed { shard, end, first, last, result } = done;
                if let Some(lane) = lanes.get_mut(&shard) {
                    lane.in_flight = false;
                }
                match result {
                    Ok(()) => {
                        if end == Some(BatchEnd::ShardEnd) {
                            lanes.remove(&shard);
                            lineage.finish(&shard, true);
                            listing_wanted = true;
                            if !draining {
                                start_ready(&shared, &mut lineage, &mut lanes, &mut tasks, &events_tx);
                            }
                        } else {
                            schedule(&mut lanes, &mut dispatchable, &shard);
                        }
                    }
                    Err(Failure::Handler(source)) => {
                        tracing::error!(%stream, %shard, error = %source, "handler failed; stopping");
                        failure.get_or_insert(Error::Handler {
                            stream: stream.clone(),
                            shard: shard.to_string(),
                            first_sequence_number: first,
                            last_sequence_number: last,
                            source,
                        });
                        begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                    }
                    Err(Failure::Store(source)) => {
                        tracing::error!(%stream, %shard, error = %source, "recording the end of the shard failed; stopping");
                        failure.get_or_insert(Error::Store {
                            stream: stream.clone(),
                            shard: Some(shard.to_string()),
                            source: Box::new(source),
                        });
                        begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                    }
                }
            }
            ready = std::future::poll_fn(|cx| service.poll_ready(cx)), if !dispatchable.is_empty() => {
                if let Err(source) = ready {
                    failure.get_or_insert(Error::ServiceNotReady { stream: stream.clone(), source });
                    // The service is broken: nothing more can be dispatched.
                    dispatchable.clear();
                    begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                    continue;
                }
                let Some(shard) = dispatchable.pop_front() else { continue };
                let Some(lane) = lanes.get_mut(&shard) else { continue };
                lane.scheduled = false;
                let Some((batch, permit)) = lane.queue.pop_front() else { continue };
                lane.in_flight = true;
                let end = batch.end;
                let first = batch.records.first().map(|r| r.sequence_number.to_string());
                let last = batch.records.last().map(|r| r.sequence_number.to_string());
                if let Some(record) = batch.records.last() {
                    lane.last_delivered = Some(record.checkpoint());
                }
                let shard_end = (end == Some(BatchEnd::ShardEnd))
                    .then(|| (shared.checkpointer.clone(), lane.last_delivered));
                let future = service.call(batch);
                in_flight.push(tracked(future, permit, shard, end, (first, last), shard_end));
            }
            Some(event) = events.recv(), if !draining => match event {
                Event::Batch { batch, permit } => {
                    let shard = batch.shard_id.clone();
                    let Some(lane) = lanes.get_mut(&shard) else { continue };
                    if batch.is_empty() && batch.end.is_none() {
                        // A heartbeat: only when enabled, at most one per interval per shard,
                        // and never queued behind other batches.
                        let Some(interval) = settings.heartbeat_interval else { continue };
                        let due = lane.last_heartbeat.is_none_or(|at| at.elapsed() >= interval);
                        if !due || !lane.queue.is_empty() {
                            continue;
                        }
                        lane.last_heartbeat = Some(Instant::now());
                    }
                    lane.queue.push_back((batch, permit));
                    schedule(&mut lanes, &mut dispatchable, &shard);
                }
                Event::Children(children) => lineage.merge_children(&children),
                Event::AlreadyFinished { shard, read } => {
                    lanes.remove(&shard);
                    lineage.finish(&shard, read);
                    start_ready(&shared, &mut lineage, &mut lanes, &mut tasks, &events_tx);
                }
                Event::Failed { shard, error } => {
                    tracing::error!(%stream, %shard, %error, "shard reader failed; stopping");
                    failure.get_or_insert(error);
                    begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                }
                Event::ShardGone { shard, error } => {
                    tracing::warn!(%stream, %shard, %error, "shard not found; checking whether it expired");
                    gone.insert(shard, (error, listings_started));
                    listing_wanted = true;
                }
                Event::Listing(Ok(listing)) => {
                    listing_in_flight = false;
                    if !lineage.has_listing() {
                        if let Err(error) = check_start_shard(settings, &listing) {
                            failure.get_or_insert(error);
                            begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                            continue;
                        }
                    }
                    let decided: Vec<ShardId> = gone
                        .iter()
                        .filter(|(_, (_, at))| *at < listings_started)
                        .map(|(shard, _)| shard.clone())
                        .collect();
                    for shard in decided {
                        let Some((error, _)) = gone.remove(&shard) else { continue };
                        if listing.iter().any(|s| s.shard_id == shard) {
                            failure.get_or_insert(error);
                            begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                        } else if let Some(lane) = lanes.get_mut(&shard) {
                            // Expired: what was fetched is still handled, then the shard ends
                            // like a closed one (children start after its last batch).
                            tracing::warn!(%stream, %shard, "shard expired (no longer listed); ending it after its queued batches");
                            lane.queue.push_back((
                                Batch::empty(shard.clone(), Some(BatchEnd::ShardEnd)),
                                BufferPermit::default(),
                            ));
                            schedule(&mut lanes, &mut dispatchable, &shard);
                        } else {
                            lineage.finish(&shard, true);
                        }
                    }
                    lineage.merge_listing(listing);
                    if phase == Phase::Running {
                        start_ready(&shared, &mut lineage, &mut lanes, &mut tasks, &events_tx);
                    }
                }
                Event::ListingUnavailable(cause) => {
                    listing_in_flight = false;
                    if !lineage.has_listing() {
                        // Never listed: the endpoint, region or network is wrong, not passing.
                        failure.get_or_insert(Error::from_kinesis(&stream, None, cause));
                        begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                    }
                }
                Event::Listing(Err(error)) => {
                    listing_in_flight = false;
                    failure.get_or_insert(error);
                    begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                // Reap finished readers and listers (a JoinSet keeps them until joined), and
                // turn a panic into an error instead of a shard that silently stops.
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!(%stream, error = %e, "a consumer task panicked; stopping");
                        failure.get_or_insert(Error::Task { stream: stream.clone(), reason: e.to_string() });
                        begin_drain(&mut phase, &mut lanes, &mut dispatchable, settings.drain_timeout, false, &mut tasks);
                    }
                }
            }
            _ = refresh.tick(), if !draining && !listing_in_flight => {
                listing_wanted = true;
            }
        }
        if listing_wanted && !listing_in_flight && phase == Phase::Running {
            listing_wanted = false;
            listing_in_flight = true;
            listings_started += 1;
            let shared = shared.clone();
            let tx = events_tx.clone();
            tasks.spawn(async move {
                let event = match list_shards(&shared).await {
                    Ok(result) => Event::Listing(result),
                    Err(cause) => Event::ListingUnavailable(cause),
                };
                let _ = tx.send(event);
            });
        }
    }

    // Stop every task (readers, lister) and wait for them: none outlives `run`.
    tasks.shutdown().await;
    // A reader failure that arrived while draining still decides the outcome.
    while let Ok(event) = events.try_recv() {
        if let Event::Failed { error, .. } = event {
            failure.get_or_insert(error);
        }
    }
    drop(in_flight);
    // drain_timeout(0) means "do not wait for handlers", not "do not flush".
    let flush_timeout = settings.drain_timeout.max(MIN_FLUSH_TIMEOUT);
    match tokio::time::timeout(flush_timeout, shared.checkpointer.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(source)) => {
            failure.get_or_insert(Error::Store {
                stream: stream.clone(),
                shard: None,
                source: Box::new(source),
            });
        }
        Err(_) => {
            failure.get_or_insert(Error::FlushTimeout {
                stream: stream.clone(),
                timeout: flush_timeout,
            });
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Stops the readers and keeps only in-flight work; on a graceful stop, each shard still being
/// read gets a last empty batch marked [`BatchEnd::Shutdown`] so layers can flush what they hold.
fn begin_drain(
    phase: &mut Phase,
    lanes: &mut HashMap<ShardId, Lane>,
    dispatchable: &mut VecDeque<ShardId>,
    drain_timeout: std::time::Duration,
    graceful: bool,
    tasks: &mut JoinSet<()>,
) {
    if *phase != Phase::Running {
        return;
    }
    *phase = Phase::Draining {
        deadline: Instant::now() + drain_timeout,
    };
    // Stop fetching at once. Queued batches are dropped unhandled: their records are read
    // again from the checkpoint next time.
    tasks.abort_all();
    dispatchable.clear();
    for (shard, lane) in lanes.iter_mut() {
        lane.queue.clear();
        lane.scheduled = false;
        if graceful {
            lane.queue.push_back((
                Batch::empty(shard.clone(), Some(BatchEnd::Shutdown)),
                BufferPermit::default(),
            ));
            if !lane.in_flight {
                lane.scheduled = true;
                dispatchable.push_back(shard.clone());
            }
        }
    }
}

/// Starts a reader for every shard whose parents have finished.
fn start_ready(
    shared: &Arc<Shared>,
    lineage: &mut Lineage,
    lanes: &mut HashMap<ShardId, Lane>,
    tasks: &mut JoinSet<()>,
    events: &mpsc::UnboundedSender<Event>,
) {
    let settings = &shared.settings;
    for (shard, fallback) in lineage.take_ready() {
        lanes.insert(shard.clone(), Lane::default());
        let span = tracing::info_span!(
            "kinesis_shard",
            stream = %settings.stream.stream_name(),
            shard = %shard
        );
        let buffer = ShardBuffer::new(settings.buffer_records, settings.buffer_bytes);
        tasks.spawn(
            read_shard(shared.clone(), shard, fallback, buffer, events.clone()).instrument(span),
        );
    }
}

/// One complete ListShards (every page). `Err` with the last error after repeated transient
/// failures (the next refresh tries again; running shards are not affected); `Ok(Err)` for
/// errors that retrying will not fix.
async fn list_shards(
    shared: &Shared,
) -> Result<Result<Vec<ShardDescription>, Error>, crate::kinesis::KinesisError> {
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    'attempt: loop {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = crate::kinesis::timed(
                "ListShards",
                shared.api.list_shards(
                    &settings.stream,
                    token.as_deref(),
                    settings.list_shards_page_size,
                ),
            )
            .await;
            match page {
                Ok(page) => {
                    shards.extend(page.shards);
                    match page.next_token {
                        Some(next) => token = Some(next),
                        None => {
                            tracing::debug!(shards = shards.len(), "listed shards");
                            return Ok(Ok(shards));
                        }
                    }
                }
                Err(e) if e.is_retryable() => {
                    if backoff.attempts() >= LISTING_ATTEMPTS {
                        tracing::warn!(error = %e, "ListShards keeps failing; trying again at the next refresh");
                        return Err(e);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "ListShards failed; backing off");
                    tokio::time::sleep(delay).await;
                    continue 'attempt;
                }
                Err(e) => {
                    return Ok(Err(Error::from_kinesis(
                        settings.stream.stream_name(),
                        None,
                        e,
                    )))
                }
            }
        }
    }
}

/// A sequence-number start position must name a shard of the stream.
fn check_start_shard(settings: &Settings, listing: &[ShardDescription]) -> Result<(), Error> {
    use super::settings::StartPosition;
    let shard = match &settings.start_position {
        StartPosition::AtSequenceNumber { shard_id, .. }
        | StartPosition::AfterSequenceNumber { shard_id, .. } => shard_id,
        _ => return Ok(()),
    };
    if listing.iter().any(|s| &s.shard_id == shard) {
        Ok(())
    } else {
        Err(Error::config(
            "start_position",
            format!(
                "shard {shard} of the sequence-number start position is not a shard of stream {}",
                settings.stream.stream_name()
            ),
        ))
    }
}
