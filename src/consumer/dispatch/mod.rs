//! `run`: drives a `tower::Service<Batch>` with the batches of every assigned shard.
//!
//! One loop owns the service. It takes the (filtered) stream of assignment events and starts a
//! reader per assigned shard; readers send their batches here. The loop keeps a lane per shard
//! with at most one call in flight (so each shard's batches are handled in order), calls
//! `poll_ready` before every call (so tower's `ConcurrencyLimit`, `RateLimit`, `Buffer` and
//! friends apply across shards), and tells the assignment source when a shard is finished (its
//! `ShardEnd` durable), which is when its children may start. On shutdown or failure it drains
//! what is in flight, flushes the store, and stops every task it started before returning.

mod call;
mod unchecked;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kinesis_tower_layers::{Batch, BatchEnd, Checkpoint, ShardId, StoreError, Wake};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{sleep_until, Instant};
use tracing::Instrument;

pub(crate) use call::{Dispatch, Erased};

use super::assignment::{
    spawn_source, Assignment, Feedback, Read, Revocation, ShardStart, SourceEvent,
};
use super::handle::Shared;
use super::reader::{
    BufferPermit, FanOutReader, PollingReader, ReaderEvent, ReaderOutput, ShardBuffer, ShardReader,
};
use crate::Error;
use call::{tracked, Completed, Failure};
use unchecked::UncheckpointedWatch;

/// The final store flush gets at least this long, whatever the drain timeout.
const MIN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a closed shard's end may wait for its last record to be checkpointed before the
/// consumer warns that its children are held back.
const SHARD_END_PATIENCE: Duration = Duration::from_secs(30);

fn pin_boxed<F: Future + Send + 'static>(future: F) -> BoxFuture<'static, F::Output> {
    Box::pin(future)
}

struct Lane {
    queue: VecDeque<(Batch, BufferPermit)>,
    in_flight: bool,
    /// Queued in `dispatchable` (queue non-empty and nothing in flight).
    scheduled: bool,
    /// The last record handed to the service in this run.
    last_delivered: Option<Checkpoint>,
    /// When the last heartbeat was queued.
    last_heartbeat: Option<Instant>,
    /// The heartbeat the shard's layers asked for.
    wake: Wake,
    /// The reader resumed from a stored checkpoint.
    resumed: bool,
    /// Stops the shard's reader.
    reader: AbortHandle,
    /// Revoked: the reader is stopped, the `Revoked` batch is queued; these wait for it.
    revocations: Vec<Revocation>,
    /// A start that came while the shard was being revoked: read it again once released.
    restart: Option<ShardStart>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Draining { deadline: Instant },
}

type Flushed = BoxFuture<'static, (ShardId, Read, Result<(), StoreError>)>;

/// Everything `run` knows between two events.
struct Dispatcher {
    shared: Arc<Shared>,
    stream: String,
    reader: Arc<dyn ShardReader>,
    reader_events: mpsc::UnboundedSender<(ShardId, ReaderEvent)>,
    feedback: mpsc::UnboundedSender<Feedback>,
    /// Readers and the assignment source; aborted on drain, joined before `run` returns.
    tasks: JoinSet<()>,
    lanes: HashMap<ShardId, Lane>,
    /// Shards with a batch queued and nothing in flight, in the order they became so.
    dispatchable: VecDeque<ShardId>,
    phase: Phase,
    failure: Option<Error>,
    /// Closed shards whose last batch was handled, waiting for their `ShardEnd` to be
    /// written and flushed before their children may start.
    endings: FuturesUnordered<Flushed>,
    ending: HashSet<ShardId>,
    /// Revoked shards whose last batch was handled, waiting for the store flush.
    released: FuturesUnordered<BoxFuture<'static, Vec<Revocation>>>,
    /// Warns when handled records are never checkpointed.
    unchecked: UncheckpointedWatch,
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
    let (reader_events_tx, mut reader_events) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let source = spawn_source(shared.clone(), &mut tasks);
    let mut assignments = shared.filter.filter(source.assignments);
    let mut source_events = source.events;
    let shared_store_configured = shared.store_configured;
    let mut d = Dispatcher {
        stream: shared.settings.stream.stream_name().to_owned(),
        reader: match &shared.settings.fan_out {
            Some(fan_out) => Arc::new(FanOutReader::new(shared.clone(), fan_out.clone())),
            None => Arc::new(PollingReader::new(shared.clone())),
        },
        shared,
        reader_events: reader_events_tx,
        feedback: source.feedback,
        tasks,
        lanes: HashMap::new(),
        dispatchable: VecDeque::new(),
        phase: Phase::Running,
        failure: None,
        endings: FuturesUnordered::new(),
        ending: HashSet::new(),
        released: FuturesUnordered::new(),
        unchecked: UncheckpointedWatch::new(shared_store_configured),
    };
    let mut in_flight = FuturesUnordered::new();
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
            Some((shard, event)) = reader_events.recv(), if !draining => d.reader_event(shard, event),
            Some(event) = source_events.recv(), if !draining => d.source_event(event),
            Some(assignment) = assignments.next(), if !draining => d.assignment(assignment),
            Some((shard, read, flushed)) = d.endings.next(), if !d.endings.is_empty() && !draining => {
                d.ended_durably(shard, read, flushed);
            }
            Some(revocations) = d.released.next(), if !d.released.is_empty() => {
                revocations.into_iter().for_each(Revocation::complete);
            }
            Some(joined) = d.tasks.join_next(), if !d.tasks.is_empty() => {
                // Reap finished readers (a JoinSet keeps them until joined), and turn a panic
                // into an error instead of a shard that silently stops.
                if let Err(e) = joined {
                    if e.is_panic() {
                        tracing::error!(stream = %d.stream, error = %e, "a consumer task panicked; stopping");
                        let stream = d.stream.clone();
                        d.fail(Error::Task { stream, reason: e.to_string() });
                    }
                }
            }
        }
    }

    // Stop every task (readers, the assignment source) and wait for them: none outlives `run`.
    d.tasks.shutdown().await;
    // A reader failure that arrived while draining still decides the outcome.
    while let Ok((_, event)) = reader_events.try_recv() {
        if let ReaderEvent::Failed(error) = event {
            d.failure.get_or_insert(error);
        }
    }
    while let Ok(event) = source_events.try_recv() {
        if let SourceEvent::Failed(error) = event {
            d.failure.get_or_insert(error);
        }
    }
    drop(in_flight);
    d.flush().await;
    // Only now may the filter let the shards go (a group releases its leases).
    let finish_timeout = d.shared.settings.drain_timeout.max(MIN_FLUSH_TIMEOUT);
    if tokio::time::timeout(finish_timeout, d.shared.filter.finish())
        .await
        .is_err()
    {
        tracing::warn!(stream = %d.stream, "the assignment filter did not finish in {finish_timeout:?}");
    }
    d.unchecked.finished(&d.shared.checkpointer, &d.stream);
    if tokio::time::timeout(finish_timeout, d.reader.finish())
        .await
        .is_err()
    {
        tracing::warn!(stream = %d.stream, "the shard reader did not finish in {finish_timeout:?}");
    }
    d.finish();
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
        self.shared.filter.stopping();
        self.phase = Phase::Draining {
            deadline: Instant::now()
                .checked_add(self.shared.settings.drain_timeout)
                .unwrap_or_else(far_future),
        };
        // Stop fetching at once. Queued batches are dropped unhandled: their records are read
        // again from the checkpoint next time.
        self.tasks.abort_all();
        self.dispatchable.clear();
        for (shard, lane) in self.lanes.iter_mut() {
            let revoked = lane
                .queue
                .iter()
                .any(|(b, _)| b.end == Some(BatchEnd::Revoked));
            lane.queue.clear();
            lane.scheduled = false;
            if graceful || revoked {
                let end = if revoked {
                    BatchEnd::Revoked
                } else {
                    BatchEnd::Shutdown
                };
                lane.queue.push_back((
                    Batch::empty(shard.clone(), Some(end)),
                    BufferPermit::default(),
                ));
                if !lane.in_flight {
                    lane.scheduled = true;
                    self.dispatchable.push_back(shard.clone());
                }
            }
        }
    }

    /// After the final flush: revocations still waiting are complete (the run flushed every
    /// checkpoint), and the checkpointer forgets the ends this run no longer waits for.
    fn finish(&mut self) {
        for (shard, lane) in self.lanes.drain() {
            lane.revocations.into_iter().for_each(Revocation::complete);
            self.shared.checkpointer.forget_ended(&shard);
        }
        for shard in self.ending.drain() {
            self.shared.checkpointer.forget_ended(&shard);
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
        let (mut batch, permit) = lane.queue.pop_front()?;
        lane.in_flight = true;
        batch.wake = lane.wake.clone();
        let end = batch.end;
        let first = batch.records.first().map(|r| r.sequence_number);
        let last = batch.records.last().map(|r| r.sequence_number);
        let records = batch.records.len();
        if let Some(record) = batch.records.last() {
            lane.last_delivered = Some(record.checkpoint());
        }
        let shard_end = (end == Some(BatchEnd::ShardEnd))
            .then(|| (self.shared.checkpointer.clone(), lane.last_delivered));
        let future = service.call(batch, permit);
        Some(tracked(
            future,
            shard,
            end,
            (first, last, records),
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
            records,
            result,
        } = done;
        if result.is_ok() {
            self.unchecked
                .handled(records, &self.shared.checkpointer, &self.stream);
        }
        if let Some(lane) = self.lanes.get_mut(&shard) {
            lane.in_flight = false;
        }
        let stream = self.stream.clone();
        match result {
            Ok(()) if end == Some(BatchEnd::ShardEnd) => {
                let Some(lane) = self.lanes.remove(&shard) else {
                    return;
                };
                let read = if lane.resumed {
                    Read::Resumed
                } else {
                    Read::FromStart
                };
                // Revoked while its last batch was in flight: the shard is done all the same.
                self.complete_after_flush(lane.revocations);
                self.await_durable_end(shard, read);
            }
            Ok(()) if end == Some(BatchEnd::Revoked) => {
                if let Some(lane) = self.lanes.remove(&shard) {
                    self.release(shard, lane.revocations);
                    if let Some(start) = lane.restart {
                        self.start(start);
                    }
                }
            }
            Ok(()) => self.schedule(&shard),
            Err(Failure::Handler(source)) if lease_lost(&*source) => {
                // A group moved the shard elsewhere: stop it here, keep the rest running.
                tracing::warn!(%stream, %shard, error = %source, "lease lost while handling a batch; stopping the shard");
                self.drop_lane(&shard);
            }
            Err(Failure::Handler(source)) => {
                tracing::error!(%stream, %shard, error = %source, "handler failed; stopping");
                self.fail(Error::Handler {
                    stream,
                    shard: shard.to_string(),
                    first_sequence_number: first.map(|s| s.to_string()),
                    last_sequence_number: last.map(|s| s.to_string()),
                    source,
                });
            }
            Err(Failure::Store(source @ StoreError::LeaseLost { .. })) => {
                tracing::warn!(%stream, %shard, error = %source, "lease lost at the end of the shard; its new owner ends it");
                self.drop_lane(&shard);
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

    /// Stops a shard at once, without a last batch: its lease is gone, so nothing it would
    /// write could land.
    fn drop_lane(&mut self, shard: &ShardId) {
        if let Some(lane) = self.lanes.remove(shard) {
            lane.reader.abort();
            self.dispatchable.retain(|s| s != shard);
            self.release(shard.clone(), lane.revocations);
            if let Some(start) = lane.restart {
                self.start(start);
            }
        }
    }

    /// A closed shard's last batch was handled: once its `ShardEnd` is written (at once with
    /// `CheckpointLayer`; when the last record is committed with `records()`) and flushed, its
    /// children may start. Until then they wait, as the KCL's do.
    fn await_durable_end(&mut self, shard: ShardId, read: Read) {
        let checkpointer = self.shared.checkpointer.clone();
        let stream = self.stream.clone();
        let mut written = pin_boxed(checkpointer.shard_end_written(&shard));
        self.ending.insert(shard.clone());
        self.endings.push(Box::pin(async move {
            // Waiting is normal for a moment (a stream user commits what it processed); a
            // long wait means nothing checkpoints this consumer's records: say so, loudly.
            if tokio::time::timeout(SHARD_END_PATIENCE, &mut written)
                .await
                .is_err()
            {
                tracing::warn!(%stream, %shard,
                    "shard read to its end {SHARD_END_PATIENCE:?} ago, but its last record is not \
                     checkpointed: its children wait until it is. Add CheckpointLayer to the \
                     service given to run, or commit the records you processed (a checkpoint at \
                     the last user record of a KPL aggregate does not cover the aggregate: keep \
                     CheckpointLayer outside DeaggregateLayer)");
                written.await;
            }
            let flushed = checkpointer.flush().await;
            (shard, read, flushed)
        }));
    }

    /// A closed shard's end is durable: the source may start its children.
    fn ended_durably(&mut self, shard: ShardId, read: Read, flushed: Result<(), StoreError>) {
        self.ending.remove(&shard);
        match flushed {
            Ok(()) => {
                let _ = self.feedback.send(Feedback::Finished { shard, read });
            }
            Err(source) => {
                let stream = self.stream.clone();
                tracing::error!(%stream, %shard, error = %source, "flushing the end of the shard failed; stopping");
                self.fail(Error::Store {
                    stream,
                    shard: Some(shard.to_string()),
                    source: Box::new(source),
                });
            }
        }
    }

    /// A revoked shard's last batch was handled: flush, then say the revocation is complete.
    fn release(&mut self, shard: ShardId, revocations: Vec<Revocation>) {
        self.shared.checkpointer.forget_ended(&shard);
        let _ = self.feedback.send(Feedback::Released(shard));
        self.complete_after_flush(revocations);
    }

    /// Completes `revocations` once the store has been flushed.
    fn complete_after_flush(&mut self, revocations: Vec<Revocation>) {
        if revocations.is_empty() {
            return;
        }
        let checkpointer = self.shared.checkpointer.clone();
        let stream = self.stream.clone();
        self.released.push(Box::pin(async move {
            if let Err(error) = checkpointer.flush().await {
                tracing::warn!(%stream, %error, "flushing checkpoints of a revoked shard failed; the run's final flush tries again");
            }
            revocations
        }));
    }

    /// An assignment event (after the filter).
    fn assignment(&mut self, assignment: Assignment) {
        match assignment {
            Assignment::Start(start) => self.start(start),
            Assignment::Ended(_) => {}
            Assignment::Revoke(revocation) => self.revoke(revocation),
        }
    }

    /// Starts a reader for the shard.
    fn start(&mut self, start: ShardStart) {
        let shard = start.shard_id.clone();
        if self.phase != Phase::Running || self.ending.contains(&shard) {
            // Stopping; or the shard was read to its end and its end is on its way to the
            // store: reading it again would find nothing.
            return;
        }
        if let Some(lane) = self.lanes.get_mut(&shard) {
            if !lane.revocations.is_empty() {
                // Being revoked: read it again once released.
                lane.restart = Some(start);
            }
            return;
        }
        let settings = &self.shared.settings;
        let span = tracing::info_span!(
            "kinesis_shard",
            stream = %settings.stream.stream_name(),
            shard = %shard
        );
        let buffer = ShardBuffer::new(settings.buffer_records, settings.buffer_bytes);
        let output = ReaderOutput::new(shard.clone(), self.reader_events.clone());
        let reader = self
            .tasks
            .spawn(self.reader.read(start, buffer, output).instrument(span));
        self.lanes.insert(
            shard.clone(),
            Lane {
                queue: VecDeque::new(),
                in_flight: false,
                scheduled: false,
                last_delivered: None,
                last_heartbeat: None,
                wake: Wake::new(),
                resumed: false,
                reader,
                revocations: Vec::new(),
                restart: None,
            },
        );
        let _ = self.feedback.send(Feedback::Reading(shard));
    }

    /// Stops reading a shard: its reader stops, what it fetched and nobody handled yet is
    /// dropped (read again from the checkpoint by whoever reads the shard next), its in-flight
    /// batch finishes, then a last batch marked [`BatchEnd::Revoked`] lets layers flush.
    fn revoke(&mut self, revocation: Revocation) {
        let shard = revocation.shard_id.clone();
        let Some(lane) = self.lanes.get_mut(&shard) else {
            // Not read here, or read to its end already: done once what it wrote is flushed.
            self.complete_after_flush(vec![revocation]);
            return;
        };
        lane.restart = None;
        tracing::info!(stream = %self.stream, %shard, "shard revoked; finishing its in-flight work");
        lane.reader.abort();
        lane.revocations.push(revocation);
        if lane.revocations.len() > 1 {
            // Already being revoked.
            return;
        }
        lane.queue.clear();
        lane.queue.push_back((
            Batch::empty(shard.clone(), Some(BatchEnd::Revoked)),
            BufferPermit::default(),
        ));
        self.dispatchable.retain(|s| *s != shard);
        if let Some(lane) = self.lanes.get_mut(&shard) {
            lane.scheduled = false;
        }
        self.schedule(&shard);
    }

    /// A reader reported something.
    fn reader_event(&mut self, shard: ShardId, event: ReaderEvent) {
        match event {
            ReaderEvent::Batch { batch, permit } => self.queue(batch, permit),
            ReaderEvent::Resumed => {
                if let Some(lane) = self.lanes.get_mut(&shard) {
                    lane.resumed = true;
                }
            }
            ReaderEvent::Children(children) => {
                let _ = self.feedback.send(Feedback::Children(children));
            }
            ReaderEvent::AlreadyFinished { read } => {
                if self.lanes.remove(&shard).is_some() {
                    let _ = self.feedback.send(Feedback::Finished { shard, read });
                }
            }
            ReaderEvent::Failed(error) if lease_lost(&error) => {
                // A group moved the shard elsewhere while its reader wrote where it started.
                tracing::warn!(stream = %self.stream, %shard, %error, "lease lost while starting the shard; stopping the shard");
                self.drop_lane(&shard);
            }
            ReaderEvent::Failed(error) => {
                tracing::error!(stream = %self.stream, %shard, %error, "shard reader failed; stopping");
                self.fail(error);
            }
            ReaderEvent::EndedWhileListedOpen(error) => {
                tracing::warn!(stream = %self.stream, %shard, %error, "stored end of a shard listed open; checking the listing again");
                if self.lanes.remove(&shard).is_some() {
                    let _ = self
                        .feedback
                        .send(Feedback::EndedWhileListedOpen { shard, error });
                }
            }
            ReaderEvent::Gone(error) => {
                tracing::warn!(stream = %self.stream, %shard, %error, "shard not found; checking whether it expired");
                let _ = self.feedback.send(Feedback::Gone { shard, error });
            }
        }
    }

    /// The assignment source reported something.
    fn source_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Failed(error) => {
                tracing::error!(stream = %self.stream, %error, "shard discovery failed; stopping");
                self.fail(error);
            }
            SourceEvent::Expired(shard) => match self.lanes.get_mut(&shard) {
                // What was fetched is still handled, then the shard ends like a closed one.
                Some(lane) if lane.revocations.is_empty() => {
                    tracing::info!(stream = %self.stream, %shard, "shard expired (no longer listed); ending it after its queued batches");
                    lane.queue.push_back((
                        Batch::empty(shard.clone(), Some(BatchEnd::ShardEnd)),
                        BufferPermit::default(),
                    ));
                    self.schedule(&shard);
                }
                Some(_) => {}
                None => {
                    let read = Read::Resumed;
                    let _ = self.feedback.send(Feedback::Finished { shard, read });
                }
            },
            SourceEvent::LineageSize(size) => {
                #[cfg(test)]
                self.shared.probe.lineage_size(size);
                let _ = size;
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
        if !lane.revocations.is_empty() {
            // Revoked: the reader was stopped; this was on its way.
            return;
        }
        if batch.is_empty() && batch.end.is_none() {
            // A heartbeat: when a layer asked for one by now (a `BatchLayer`'s deadline), or
            // when enabled for every idle poll, at most one per interval per shard; never
            // queued behind other batches.
            let now = Instant::now();
            let asked = lane.wake.is_due(now);
            let periodic = heartbeat_interval.is_some_and(|interval| {
                lane.last_heartbeat
                    .is_none_or(|at| now.saturating_duration_since(at) >= interval)
            });
            if !(asked || periodic) || !lane.queue.is_empty() || lane.in_flight {
                return;
            }
            lane.last_heartbeat = Some(now);
        }
        lane.queue.push_back((batch, permit));
        self.schedule(&shard);
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

/// Whether `error` (or an error it wraps) says a consumer group lease was lost.
fn lease_lost(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(error) = next {
        let store = error
            .downcast_ref::<StoreError>()
            .or_else(|| error.downcast_ref::<Box<StoreError>>().map(|b| &**b));
        if matches!(store, Some(StoreError::LeaseLost { .. })) {
            return true;
        }
        next = error.source();
    }
    false
}

/// An instant no deadline reaches (about 30 years from now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}
