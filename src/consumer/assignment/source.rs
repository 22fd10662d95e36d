//! The source of assignment events: one task that lists the stream's shards (at start, on an
//! interval, and whenever a shard ends), keeps the lineage, and says which shards may start.
//!
//! It hears back from the consumer (a shard ended and its end is durable, a closed shard's
//! children, a shard that could not be found) through [`Feedback`], and tells the consumer
//! what is not an assignment (a fatal error, a shard that expired) through [`SourceEvent`].

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kinesis_tower_layers::{Checkpoint, ShardId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::discovery::{check_start_shard, list_shards};
use super::lineage::{Lineage, Read};
use super::{Assignment, Assignments};
use crate::consumer::handle::Shared;
use crate::kinesis::{ChildShard, KinesisError, ShardDescription};
use crate::Error;

/// What the consumer tells the source.
#[derive(Debug)]
pub(crate) enum Feedback {
    /// The consumer took the shard's start (it passed the assignment filter).
    Reading(ShardId),
    /// The shard is finished (its `ShardEnd` is durable, or it needed no reading); `read` says
    /// how this consumer read it, which decides where its children start.
    Finished { shard: ShardId, read: Read },
    /// The consumer stopped reading the shard (revoked) before its end: whoever reads it next
    /// writes its end, which its children then wait for in the store.
    Released(ShardId),
    /// A closed shard's children, as its last GetRecords reported them.
    Children(Vec<ChildShard>),
    /// Kinesis says the shard does not exist: expired, or something is wrong. `error` is what
    /// to report if a listing still shows it.
    Gone { shard: ShardId, error: Error },
    /// The store says the shard ended, but the listing its start came from showed it open.
    /// `error` is what to report if a listing started now still shows it open (a stream
    /// re-created under the same name); if it shows it closed, the shard is finished (someone
    /// read it to its end since that listing).
    EndedWhileListedOpen { shard: ShardId, error: Error },
}

/// What the source tells the consumer besides assignments.
#[derive(Debug)]
pub(crate) enum SourceEvent {
    /// Something retrying will not fix: the run ends with it.
    Failed(Error),
    /// The shard expired (retention) while it was read: end it after what was fetched.
    Expired(ShardId),
    /// How many shards the lineage keeps (after each listing).
    #[cfg_attr(not(test), allow(dead_code))]
    LineageSize(usize),
}

/// The source's channels, as the consumer sees them.
pub(crate) struct SourceHandle {
    /// Every assignment event (before the filter).
    pub(crate) assignments: Assignments,
    pub(crate) events: mpsc::UnboundedReceiver<SourceEvent>,
    pub(crate) feedback: mpsc::UnboundedSender<Feedback>,
}

/// Starts the source task in `tasks`.
pub(crate) fn spawn_source(shared: Arc<Shared>, tasks: &mut JoinSet<()>) -> SourceHandle {
    let (assignments_tx, mut assignments_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (feedback_tx, feedback_rx) = mpsc::unbounded_channel();
    let source = Source {
        lineage: Lineage::new(shared.settings.start_position.clone()),
        shared,
        assignments: assignments_tx,
        events: events_tx,
        gone: HashMap::new(),
        ended_open: HashMap::new(),
        listings_started: 0,
    };
    tasks.spawn(source.run(feedback_rx));
    SourceHandle {
        assignments: futures::stream::poll_fn(move |cx| assignments_rx.poll_recv(cx)).boxed(),
        events: events_rx,
        feedback: feedback_tx,
    }
}

type Listing = Result<Result<Vec<ShardDescription>, Error>, KinesisError>;

struct Source {
    shared: Arc<Shared>,
    lineage: Lineage,
    assignments: mpsc::UnboundedSender<Assignment>,
    events: mpsc::UnboundedSender<SourceEvent>,
    /// Shards whose reads answered ResourceNotFound, each with the number of listings started
    /// when it was reported: only a listing started after that can tell whether the shard
    /// expired (it ends) or something is wrong (fatal); one in flight may predate the expiry.
    gone: HashMap<ShardId, (Error, u64)>,
    /// Shards whose stored end contradicts the listing their start came from, decided like
    /// `gone` by the next listing.
    ended_open: HashMap<ShardId, (Error, u64)>,
    listings_started: u64,
}

impl Source {
    async fn run(mut self, mut feedback: mpsc::UnboundedReceiver<Feedback>) {
        let mut refresh = tokio::time::interval(self.shared.settings.shard_refresh_interval);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // At most one listing at a time.
        let mut listing: FuturesUnordered<BoxFuture<'static, Listing>> = FuturesUnordered::new();
        let mut wanted = false;
        loop {
            if wanted && listing.is_empty() {
                wanted = false;
                self.listings_started += 1;
                let shared = self.shared.clone();
                listing.push(Box::pin(async move { list_shards(&shared).await }));
            }
            let mut listed = None;
            tokio::select! {
                message = feedback.recv() => match message {
                    Some(message) => wanted |= self.feedback(message),
                    // The consumer stopped.
                    None => return,
                },
                Some(result) = listing.next(), if !listing.is_empty() => listed = Some(result),
                _ = refresh.tick() => wanted = true,
            }
            if let Some(result) = listed {
                if !self.listed(result, &mut feedback).await {
                    return;
                }
            }
            self.start_ready();
        }
    }

    /// Handles what the consumer said; true when a new listing is wanted.
    fn feedback(&mut self, message: Feedback) -> bool {
        match message {
            Feedback::Reading(shard) => {
                self.lineage.read_here(&shard);
                false
            }
            Feedback::Finished { shard, read } => {
                self.finish(shard, read);
                // Its children may be listed by now.
                true
            }
            Feedback::Released(shard) => {
                self.lineage.released(&shard);
                false
            }
            Feedback::Children(children) => {
                self.lineage.merge_children(&children);
                false
            }
            Feedback::Gone { shard, error } => {
                self.gone.insert(shard, (error, self.listings_started));
                true
            }
            Feedback::EndedWhileListedOpen { shard, error } => {
                self.ended_open
                    .insert(shard, (error, self.listings_started));
                true
            }
        }
    }

    /// Marks a shard finished and says so downstream, once.
    fn finish(&mut self, shard: ShardId, read: Read) {
        if self.lineage.finish(&shard, read) {
            let _ = self.assignments.send(Assignment::Ended(shard));
        }
    }

    /// Sends a start for every shard that may start now.
    fn start_ready(&mut self) {
        for start in self.lineage.take_ready() {
            let _ = self.assignments.send(Assignment::Start(start));
        }
    }

    /// A listing finished; false when the source has failed and stops.
    async fn listed(
        &mut self,
        result: Listing,
        feedback: &mut mpsc::UnboundedReceiver<Feedback>,
    ) -> bool {
        let listing = match result {
            Ok(Ok(listing)) => listing,
            Ok(Err(error)) => return self.fail(error),
            Err(cause) => {
                if self.lineage.has_listing() {
                    // Running shards are not affected; the next refresh tries again.
                    return true;
                }
                // Never listed: the endpoint, region or network is wrong, not passing.
                let stream = self.shared.settings.stream.stream_name().to_owned();
                return self.fail(Error::from_kinesis(&stream, None, cause));
            }
        };
        if !self.lineage.has_listing() {
            if let Err(error) = check_start_shard(&self.shared, &listing).await {
                return self.fail(error);
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
                return self.fail(error);
            }
            // Expired: the consumer ends it after what was fetched, then reports it finished.
            let _ = self.events.send(SourceEvent::Expired(shard));
        }
        let decided: Vec<ShardId> = self
            .ended_open
            .iter()
            .filter(|(_, (_, at))| *at < self.listings_started)
            .map(|(shard, _)| shard.clone())
            .collect();
        for shard in decided {
            let Some((error, _)) = self.ended_open.remove(&shard) else {
                continue;
            };
            let open = listing
                .iter()
                .any(|s| s.shard_id == shard && !s.is_closed());
            if open {
                return self.fail(error);
            }
            self.finish(shard, Read::Resumed);
        }
        self.lineage.merge_listing(listing);
        if let Err(error) = self.finish_parents_read_elsewhere(feedback).await {
            return self.fail(error);
        }
        let _ = self
            .events
            .send(SourceEvent::LineageSize(self.lineage.len()));
        true
    }

    /// Parents this consumer does not read (the filter dropped them) are finished once the
    /// store holds their end, written by whoever read them.
    async fn finish_parents_read_elsewhere(
        &mut self,
        feedback: &mut mpsc::UnboundedReceiver<Feedback>,
    ) -> Result<(), Error> {
        let mut ended = Vec::new();
        for parent in self.lineage.parents_read_elsewhere() {
            let stored = self
                .shared
                .checkpointer
                .get(&parent)
                .await
                .map_err(|source| Error::Store {
                    stream: self.shared.settings.stream.stream_name().to_owned(),
                    shard: Some(parent.to_string()),
                    source: Box::new(source),
                })?;
            if stored == Some(Checkpoint::ShardEnd) {
                ended.push(parent);
            }
        }
        // The consumer says it reads a shard before it reads any of it: what it said while the
        // store was read is in the queue now. A shard it reads ends here when its end is
        // durable, not when a buffered store shows it pending.
        while let Ok(message) = feedback.try_recv() {
            self.feedback(message);
        }
        for parent in ended {
            if !self.lineage.is_read_here(&parent) {
                self.finish(parent, Read::Resumed);
            }
        }
        Ok(())
    }

    fn fail(&mut self, error: Error) -> bool {
        let _ = self.events.send(SourceEvent::Failed(error));
        false
    }
}
