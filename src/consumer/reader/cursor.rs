//! Where a shard's reading starts and has got to, whichever reader reads it: the stored
//! checkpoint or the start position, the durable-start rule, and the records fetched turned
//! into batches.

use std::time::{Duration, SystemTime};

use kinesis_tower_layers::kpl::is_aggregate;
use kinesis_tower_layers::{Batch, Checkpoint, Record, SequenceNumber};

use super::context::{ShardContext, Stop};
use super::ReaderEvent;
use crate::consumer::assignment::{Fallback, Read, ShardStart};
use crate::kinesis::IteratorPosition;
use crate::Error;

/// How much earlier than our clock an anchored LATEST start begins (see [`Cursor::opened`]).
const LATEST_ANCHOR_MARGIN: Duration = Duration::from_secs(30);

/// One shard's reading position and what is still to be done about its start.
pub(super) struct Cursor {
    /// Where the next read starts: after the last record fetched, or the start.
    position: IteratorPosition,
    /// A checkpoint inside a KPL aggregate: the first records delivered carry it.
    resume_after: Option<Checkpoint>,
    /// The start is recorded at the first record fetched (it depends on when it happened).
    start_to_record: bool,
    /// A start in time is durable (stored, or recorded when the read opened).
    started_in_time: bool,
    /// The read resumes from a stored checkpoint.
    from_checkpoint: bool,
    /// `opened` has run.
    opened: bool,
}

impl Cursor {
    /// Where the shard's reading starts: its stored checkpoint, or `start`'s position. `None`
    /// when the shard needs no reading (the consumer has been told why).
    pub async fn open(ctx: &ShardContext, start: &ShardStart) -> Result<Option<Self>, Stop> {
        let checkpoint = ctx.stored_checkpoint().await?;
        // Resuming inside a KPL aggregate reads it again from its start: the first records
        // delivered say which of its user records were processed (`Batch::resume_after`).
        let resume_after = checkpoint.filter(|c| {
            matches!(
                c,
                Checkpoint::Sequence {
                    sub_sequence_number: Some(_),
                    ..
                }
            )
        });
        if checkpoint == Some(Checkpoint::ShardEnd) && start.listed_open {
            // Wrong, unless the shard closed (and was read to its end elsewhere) since the
            // listing the start came from: the next listing decides.
            ctx.output
                .send(ReaderEvent::EndedWhileListedOpen(Error::EndedShardIsOpen {
                    stream: ctx.stream_name().to_owned(),
                    namespace: ctx.shared.checkpointer.namespace().to_owned(),
                    shard: ctx.shard.to_string(),
                }));
            return Ok(None);
        }
        let stored = checkpoint.map(resume_position);
        let from_checkpoint = matches!(stored, Some(Some(_)));
        let position = match (stored, start.fallback) {
            (Some(Some(position)), _) => position,
            (Some(None), _) => {
                ctx.already_finished(Read::Resumed);
                return Ok(None);
            }
            (None, Fallback::Skip) => {
                ctx.already_finished(Read::No);
                return Ok(None);
            }
            (None, Fallback::Read(position)) => position,
        };
        // Without a record-precise start, a start that depends on when it happens is recorded
        // at its first record before that goes out (TRIM_HORIZON is the same position at every
        // start; a start in time was recorded when the read opened, this narrows it).
        let started_at_record = checkpoint
            .is_some_and(|c| c.is_progress() || matches!(c, Checkpoint::StartedAt { .. }));
        tracing::info!(?position, from_checkpoint, "reading shard");
        if from_checkpoint {
            ctx.output.send(ReaderEvent::Resumed);
        }
        Ok(Some(Self {
            position,
            resume_after,
            start_to_record: !started_at_record && position != IteratorPosition::TrimHorizon,
            started_in_time: matches!(checkpoint, Some(Checkpoint::StartedAtTime { .. })),
            from_checkpoint,
            opened: false,
        }))
    }

    /// Where the next read starts.
    pub fn position(&self) -> IteratorPosition {
        self.position
    }

    /// Whether the record at `sequence_number` lies before where the next read starts (it was
    /// read already, or is before the start): a source that answers from an earlier position
    /// than asked must not deliver it again.
    pub fn is_behind(&self, sequence_number: SequenceNumber) -> bool {
        match self.position {
            IteratorPosition::AfterSequenceNumber(last) => sequence_number <= last,
            IteratorPosition::AtSequenceNumber(first) => sequence_number < first,
            _ => false,
        }
    }

    /// The first read (an iterator, a subscription) opened at `opened_at`. LATEST is anchored
    /// in time: a later read (an expired iterator renewed, a subscription opened again) before
    /// any record starts at this moment instead of jumping to the tip and losing what came in.
    /// Kinesis compares the timestamp with its own clock: the anchor is a margin earlier, so a
    /// clock behind ours loses nothing (at the cost of reading that margin again). A start in
    /// time becomes durable here, before anything is read: a run that stops before its first
    /// record leaves it too.
    pub async fn opened(&mut self, ctx: &ShardContext, opened_at: SystemTime) -> Result<(), Stop> {
        if std::mem::replace(&mut self.opened, true) {
            return Ok(());
        }
        if self.position == IteratorPosition::Latest {
            let anchor = opened_at
                .checked_sub(LATEST_ANCHOR_MARGIN)
                .unwrap_or(opened_at);
            self.position = IteratorPosition::AtTimestamp(anchor);
        }
        if !self.from_checkpoint {
            if let IteratorPosition::AtTimestamp(at) = self.position {
                let started = Checkpoint::StartedAtTime {
                    timestamp_millis: millis_since_epoch(at),
                };
                ctx.record_start(started, true).await?;
                self.started_in_time = true;
            }
        }
        Ok(())
    }

    /// Fetched records, in shard order, as the shard's next batch: the position moves past
    /// them, a start that depends on when it happened is recorded at the first (before it goes
    /// out), and a plain record that a checkpoint inside it already covers is left out.
    pub async fn batch(
        &mut self,
        ctx: &ShardContext,
        mut records: Vec<Record>,
        millis_behind_latest: Option<i64>,
    ) -> Result<Batch, Stop> {
        if let Some(last) = records.last() {
            self.position = IteratorPosition::AfterSequenceNumber(last.sequence_number);
        }
        if self.start_to_record {
            if let Some(first) = records.first() {
                let started = Checkpoint::StartedAt {
                    sequence_number: first.sequence_number,
                };
                ctx.record_start(started, !self.started_in_time).await?;
                self.start_to_record = false;
            }
        }
        if let Some(Checkpoint::Sequence {
            sequence_number, ..
        }) = self.resume_after
        {
            if records.first().is_some_and(|first| {
                first.sequence_number == sequence_number && !is_aggregate(&first.data)
            }) {
                // A plain record is its own only user record (index 0), so a checkpoint
                // inside it (as the KCL writes for every record) covers it whole.
                records.remove(0);
                self.resume_after = None;
            }
        }
        let mut batch = Batch::new(ctx.shard.clone(), records);
        batch.millis_behind_latest = millis_behind_latest;
        if !batch.is_empty() {
            batch.resume_after = self.resume_after.take();
        }
        Ok(batch)
    }
}

/// Where to resume after a stored checkpoint; `None` when the shard has ended.
fn resume_position(checkpoint: Checkpoint) -> Option<IteratorPosition> {
    match checkpoint {
        Checkpoint::ShardEnd => None,
        // Nothing processed yet: read again from where the first run started.
        Checkpoint::StartedAt { sequence_number } => {
            Some(IteratorPosition::AtSequenceNumber(sequence_number))
        }
        Checkpoint::StartedAtTime { timestamp_millis } => Some(IteratorPosition::AtTimestamp(
            SystemTime::UNIX_EPOCH + Duration::from_millis(timestamp_millis),
        )),
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number: None,
        } => Some(IteratorPosition::AfterSequenceNumber(sequence_number)),
        // Part of a KPL aggregate was processed: read the aggregate again; the first batch
        // carries the checkpoint in `resume_after`, so a deaggregating layer drops the user
        // records already processed (without one they come again: at least once).
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number: Some(_),
        } => Some(IteratorPosition::AtSequenceNumber(sequence_number)),
        // A kind this version does not know: read the whole shard rather than skip any of it.
        _ => Some(IteratorPosition::TrimHorizon),
    }
}

/// Milliseconds since the Unix epoch (0 before it).
fn millis_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
