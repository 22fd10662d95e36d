//! Per-shard buffer caps: fetched-but-unhandled records and bytes are bounded by semaphores.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The caps of one shard's buffer. The reader takes permits before it fetches (records) and
/// after (bytes); the permits travel with the batch and are returned when the batch has been
/// handled, so a slow handler stops its shard's reader instead of growing the heap.
#[derive(Clone, Debug)]
pub(crate) struct ShardBuffer {
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    byte_cap: u32,
}

/// Room in a shard's buffer, held by a batch until it has been handled.
#[derive(Debug, Default)]
pub(crate) struct BufferPermit {
    records: Option<OwnedSemaphorePermit>,
    bytes: Option<OwnedSemaphorePermit>,
}

impl ShardBuffer {
    pub(crate) fn new(record_cap: u32, byte_cap: u32) -> Self {
        Self {
            records: Arc::new(Semaphore::new(record_cap as usize)),
            bytes: Arc::new(Semaphore::new(byte_cap as usize)),
            byte_cap,
        }
    }

    /// Waits for room for `records` more records.
    pub(crate) async fn reserve_records(&self, records: u32) -> BufferPermit {
        let permit = self
            .records
            .clone()
            .acquire_many_owned(records)
            .await
            .expect("buffer semaphores are never closed");
        BufferPermit {
            records: Some(permit),
            bytes: None,
        }
    }

    /// Keeps only `used` of the reserved records and waits for room for `bytes` more bytes.
    /// A single answer larger than the whole byte cap waits for an empty buffer, then counts as
    /// the whole cap: memory stays within the cap plus one GetRecords answer.
    pub(crate) async fn settle(&self, permit: &mut BufferPermit, used: usize, bytes: usize) {
        if let Some(records) = permit.records.as_mut() {
            let excess = records.num_permits().saturating_sub(used);
            drop(records.split(excess));
        }
        let bytes = bytes.min(self.byte_cap as usize) as u32;
        if bytes > 0 {
            permit.bytes = Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(bytes)
                    .await
                    .expect("buffer semaphores are never closed"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn settle_returns_unused_records_and_caps_bytes() {
        let buffer = ShardBuffer::new(10, 100);
        let mut permit = buffer.reserve_records(10).await;
        assert_eq!(buffer.records.available_permits(), 0);
        buffer.settle(&mut permit, 3, 1_000).await;
        assert_eq!(buffer.records.available_permits(), 7);
        assert_eq!(buffer.bytes.available_permits(), 0);
        drop(permit);
        assert_eq!(buffer.records.available_permits(), 10);
        assert_eq!(buffer.bytes.available_permits(), 100);
    }
}
