//! The warning for the commonest mistake: a store is configured, the stack handles records,
//! and nothing checkpoints them (no `CheckpointLayer`, no commits), so a restart reads
//! everything again.

use std::time::Duration;

use kinesis_tower_layers::Checkpointer;
use tokio::time::Instant;

/// How long records may be handled without any checkpoint before the warning.
const GRACE: Duration = Duration::from_secs(60);

/// Watches whether handled records ever get checkpointed; warns once if not.
pub(super) struct UncheckpointedWatch {
    /// Off without a configured store (nothing is meant to survive) and after the warning.
    armed: bool,
    /// When the first records were handled.
    since: Option<Instant>,
    records: u64,
}

impl UncheckpointedWatch {
    pub(super) fn new(store_configured: bool) -> Self {
        Self {
            armed: store_configured,
            since: None,
            records: 0,
        }
    }

    /// A batch of `records` records was handled successfully.
    pub(super) fn handled(&mut self, records: usize, checkpointer: &Checkpointer, stream: &str) {
        if !self.armed || records == 0 {
            return;
        }
        self.records += records as u64;
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GRACE {
            self.check(checkpointer, stream);
        }
    }

    /// The run ends: warn if records were handled and none was ever checkpointed.
    pub(super) fn finished(&mut self, checkpointer: &Checkpointer, stream: &str) {
        if self.since.is_some() {
            self.check(checkpointer, stream);
        }
    }

    fn check(&mut self, checkpointer: &Checkpointer, stream: &str) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if checkpointer.progress_writes() == 0 {
            tracing::warn!(
                stream,
                records = self.records,
                "records were handled and none was checkpointed, so a restart reads them all \
                 again: wrap the handler in CheckpointLayer (Consumer::process does), or commit \
                 through the Checkpointer"
            );
        }
    }

    /// Whether the warning was given (for tests).
    #[cfg(test)]
    pub(super) fn warned(&self, checkpointer: &Checkpointer) -> bool {
        !self.armed && self.since.is_some() && checkpointer.progress_writes() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesis_tower_layers::{Checkpoint, MemoryStore, SequenceNumber};

    #[tokio::test(start_paused = true)]
    async fn warns_once_a_minute_of_handled_records_left_no_checkpoint() {
        let checkpointer = Checkpointer::new(MemoryStore::new(), "app/s");
        let mut watch = UncheckpointedWatch::new(true);
        watch.handled(10, &checkpointer, "s");
        tokio::time::advance(GRACE / 2).await;
        watch.handled(10, &checkpointer, "s");
        assert!(!watch.warned(&checkpointer));
        tokio::time::advance(GRACE).await;
        watch.handled(10, &checkpointer, "s");
        assert!(watch.warned(&checkpointer));
    }

    #[tokio::test(start_paused = true)]
    async fn no_warning_when_records_were_checkpointed_or_no_store_was_configured() {
        let checkpointer = Checkpointer::new(MemoryStore::new(), "app/s");
        let mut watch = UncheckpointedWatch::new(true);
        watch.handled(10, &checkpointer, "s");
        let at = Checkpoint::Sequence {
            sequence_number: SequenceNumber::from(7),
            sub_sequence_number: None,
        };
        checkpointer.set("shard-0", at).await.unwrap();
        tokio::time::advance(GRACE * 2).await;
        watch.handled(10, &checkpointer, "s");
        assert!(!watch.warned(&checkpointer));

        let unchecked = Checkpointer::new(MemoryStore::new(), "app/s");
        let mut watch = UncheckpointedWatch::new(false);
        watch.handled(10, &unchecked, "s");
        watch.finished(&unchecked, "s");
        assert!(!watch.warned(&unchecked));
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_ends_early_without_checkpoints_warns_at_the_end() {
        let checkpointer = Checkpointer::new(MemoryStore::new(), "app/s");
        let mut watch = UncheckpointedWatch::new(true);
        watch.handled(3, &checkpointer, "s");
        assert!(!watch.warned(&checkpointer));
        watch.finished(&checkpointer, "s");
        assert!(watch.warned(&checkpointer));
    }
}
