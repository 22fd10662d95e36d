//! An in-process checkpoint store.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Checkpoint, CheckpointStore, SetOutcome, StoreError};

/// Checkpoints kept in memory: for tests, benches, and consumers that need no persistence.
/// Monotonic like every store. Clones share nothing; wrap it in an `Arc` to share.
#[derive(Debug, Default)]
pub struct MemoryStore {
    checkpoints: Mutex<HashMap<(String, String), Checkpoint>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every stored checkpoint of `namespace`, by shard id.
    pub fn snapshot(&self, namespace: &str) -> HashMap<String, Checkpoint> {
        self.lock()
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, shard), c)| (shard.clone(), *c))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Checkpoint>> {
        // A panic while holding this lock cannot leave the map half-updated (single inserts),
        // so a poisoned lock is still consistent.
        self.checkpoints
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        Ok(self
            .lock()
            .get(&(namespace.to_owned(), shard_id.to_owned()))
            .copied())
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let mut map = self.lock();
        match map.entry((namespace.to_owned(), shard_id.to_owned())) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(checkpoint);
                Ok(SetOutcome::Advanced)
            }
            std::collections::hash_map::Entry::Occupied(mut slot) if checkpoint > *slot.get() => {
                slot.insert(checkpoint);
                Ok(SetOutcome::Advanced)
            }
            std::collections::hash_map::Entry::Occupied(_) => Ok(SetOutcome::NotAdvanced),
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let mut all: Vec<_> = self.snapshot(namespace).into_iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    #[tokio::test]
    async fn never_moves_backwards_and_namespaces_are_isolated() {
        let store = MemoryStore::new();
        assert_eq!(store.get("a", "s").await.unwrap(), None);
        assert_eq!(
            store.set("a", "s", at(100)).await.unwrap(),
            SetOutcome::Advanced
        );
        assert_eq!(
            store.set("a", "s", at(99)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(store.get("a", "s").await.unwrap(), Some(at(100)));
        assert_eq!(store.get("b", "s").await.unwrap(), None);
        store.set("a", "s", Checkpoint::ShardEnd).await.unwrap();
        assert_eq!(
            store.set("a", "s", at(1000)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(
            store.get("a", "s").await.unwrap(),
            Some(Checkpoint::ShardEnd)
        );
    }
}
