//! `BufferedStore`: keeps checkpoints in memory and writes them to a store on an interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, CheckpointStore, StoreError};
use tokio::time::Instant;

/// The flush interval unless another is given (the Go library's default).
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// How many writes one flush keeps in flight at once.
const FLUSH_CONCURRENCY: usize = 16;

/// A checkpoint store that buffers writes in memory and writes them to the store it wraps every
/// flush interval (1 s by default) and on [`flush`](CheckpointStore::flush).
///
/// This is the durability mode of the Postgres, MySQL and DynamoDB stores (each has a
/// `buffered()` method), and it wraps any other [`CheckpointStore`] too. A handler that
/// checkpoints every small batch then costs one round trip per shard and interval instead of one
/// per batch.
///
/// - `set` only touches memory and coalesces per shard: only the greatest checkpoint of each
///   (namespace, shard) is kept, and one older than what this store already holds or wrote is
///   refused ([`SetOutcome::NotAdvanced`]).
/// - The wrapped store's own guard keeps the stored checkpoint monotonic, so several processes
///   (or a lagging flush) never move it backwards.
/// - `get` and `list` read the wrapped store and see the pending writes.
/// - A failed flush keeps the failed checkpoints pending for the next flush (a newer `set` in the
///   meantime replaces them) and returns the first error; the interval flush logs its errors and
///   tries again at the next tick. `Consumer::run` flushes before it returns.
/// - A crash loses at most one interval of checkpoints: those records are delivered again
///   (at least once), nothing is skipped.
///
/// The background flush starts with the first `set` (on the current tokio runtime) and ends when
/// the store is dropped; call `flush` before dropping it to write what is pending.
///
/// ```
/// # async fn example() -> Result<(), kinesis_tower::StoreError> {
/// use std::time::Duration;
/// use kinesis_tower::store::{BufferedStore, MemoryStore};
///
/// let store = BufferedStore::new(MemoryStore::new()).flush_interval(Duration::from_millis(500));
/// # Ok(()) }
/// ```
pub struct BufferedStore<S> {
    shared: Arc<Shared<S>>,
    interval: Duration,
}

struct Shared<S> {
    inner: S,
    /// What this store holds per (namespace, shard): the greatest checkpoint it was given or
    /// wrote, and whether it still has to be written.
    entries: Mutex<HashMap<Key, Entry>>,
    /// One flush at a time, so a slow flush and the next tick do not write the same entries.
    flushing: tokio::sync::Mutex<()>,
    ticker: OnceLock<()>,
}

type Key = (Arc<str>, Arc<str>);

#[derive(Clone, Copy)]
struct Entry {
    checkpoint: Checkpoint,
    dirty: bool,
}

impl<S: CheckpointStore> BufferedStore<S> {
    /// Buffers writes to `inner`, flushing every [`DEFAULT_FLUSH_INTERVAL`].
    pub fn new(inner: S) -> Self {
        Self {
            interval: DEFAULT_FLUSH_INTERVAL,
            shared: Arc::new(Shared {
                inner,
                entries: Mutex::default(),
                flushing: tokio::sync::Mutex::new(()),
                ticker: OnceLock::new(),
            }),
        }
    }

    /// Flushes every `interval` instead (call before the store is used). `Duration::ZERO` turns
    /// the interval flush off: writes then only go out on [`flush`](CheckpointStore::flush).
    /// So does `Duration::MAX`, or any interval too long for the clock to reach.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// The interval between background flushes.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.shared.inner
    }

    /// How many checkpoints wait for the next flush.
    pub fn pending(&self) -> usize {
        self.shared.lock().values().filter(|e| e.dirty).count()
    }

    fn start_ticker(&self) {
        if self.interval.is_zero() {
            return;
        }
        self.shared.ticker.get_or_init(|| {
            let weak = Arc::downgrade(&self.shared);
            let interval = self.interval;
            tokio::spawn(tick(weak, interval));
        });
    }
}

/// The background flush: ends once the store is dropped, or at once when `interval` reaches
/// beyond what an [`Instant`] can hold (a tick that never comes).
///
/// Each tick is an interval after the previous one, or after the end of a flush that overran
/// it. Ticks are computed with checked arithmetic and waited for with `sleep` (which takes
/// any duration), so no interval, however long, overflows.
async fn tick<S: CheckpointStore>(store: Weak<Shared<S>>, interval: Duration) {
    let mut last = Instant::now();
    loop {
        let Some(due) = next_tick(last, interval, Instant::now()) else {
            return;
        };
        // `sleep` caps very long durations: sleep again until the tick is due.
        loop {
            let left = due.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(left).await;
        }
        last = due;
        let Some(shared) = store.upgrade() else {
            return;
        };
        if let Err(error) = shared.flush().await {
            tracing::warn!(%error, "interval flush of buffered checkpoints failed; they stay pending for the next flush");
        }
    }
}

/// The tick after the one at `last`: an interval later, or an interval after `now` when that
/// has passed already; `None` when it is beyond what an [`Instant`] can hold.
fn next_tick(last: Instant, interval: Duration, now: Instant) -> Option<Instant> {
    match last.checked_add(interval)? {
        due if due >= now => Some(due),
        _ => now.checked_add(interval),
    }
}

impl<S> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Entry>> {
        // Every update is a single insert or field write: a panic elsewhere cannot leave the map
        // half-updated.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn known(&self, namespace: &str, shard_id: &str) -> Option<Checkpoint> {
        let key: Key = (namespace.into(), shard_id.into());
        self.lock().get(&key).map(|e| e.checkpoint)
    }
}

impl<S: CheckpointStore> Shared<S> {
    async fn flush(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.flushing.lock().await;
        let pending: Vec<(Key, Checkpoint)> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, e)| (k.clone(), e.checkpoint))
            .collect();
        let results: Vec<_> = stream::iter(pending)
            .map(|(key, checkpoint)| async move {
                let result = self.inner.set(&key.0, &key.1, checkpoint).await;
                (key, checkpoint, result)
            })
            .buffer_unordered(FLUSH_CONCURRENCY)
            .collect()
            .await;
        let mut first_error = None;
        let mut entries = self.lock();
        for (key, written, result) in results {
            match result {
                Ok(_) => {
                    // Written (or refused by the store's guard because it already holds a
                    // later one): clean, unless a newer checkpoint arrived meanwhile.
                    if let Some(entry) = entries.get_mut(&key) {
                        if entry.checkpoint == written {
                            entry.dirty = false;
                        }
                    }
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl<S: CheckpointStore> CheckpointStore for BufferedStore<S> {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let stored = self.shared.inner.get(namespace, shard_id).await?;
        let known = self.shared.known(namespace, shard_id);
        Ok(stored.max(known))
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        self.start_ticker();
        let key: Key = (namespace.into(), shard_id.into());
        let mut entries = self.shared.lock();
        match entries.get_mut(&key) {
            Some(entry) if checkpoint <= entry.checkpoint => Ok(SetOutcome::NotAdvanced),
            Some(entry) => {
                *entry = Entry {
                    checkpoint,
                    dirty: true,
                };
                Ok(SetOutcome::Advanced)
            }
            None => {
                entries.insert(
                    key,
                    Entry {
                        checkpoint,
                        dirty: true,
                    },
                );
                Ok(SetOutcome::Advanced)
            }
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.shared.flush().await?;
        self.shared.inner.flush().await
    }

    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let mut all: HashMap<String, Checkpoint> = self
            .shared
            .inner
            .list(namespace)
            .await?
            .into_iter()
            .collect();
        for ((ns, shard), entry) in self.shared.lock().iter() {
            if &**ns == namespace {
                let slot = all.entry(shard.to_string()).or_insert(entry.checkpoint);
                *slot = (*slot).max(entry.checkpoint);
            }
        }
        let mut all: Vec<_> = all.into_iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }
}

impl<S> std::fmt::Debug for BufferedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferedStore")
            .field("interval", &self.interval)
            .field("entries", &self.shared.lock().len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use kinesis_tower_layers::testing::{at, FaultyStore};
    use kinesis_tower_layers::MemoryStore;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn coalesces_per_shard_and_writes_on_the_interval() {
        let store = BufferedStore::new(FaultyStore::new());
        for n in 1..=100 {
            store.set("ns", "a", at(n)).await.unwrap();
            store.set("ns", "b", at(n * 2)).await.unwrap();
        }
        assert_eq!(store.inner().writes(), 0);
        assert_eq!(store.get("ns", "a").await.unwrap(), Some(at(100)));
        assert_eq!(store.inner().memory().get("ns", "a").await.unwrap(), None);
        tokio::time::sleep(DEFAULT_FLUSH_INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(store.inner().writes(), 2);
        assert_eq!(
            store.inner().memory().get("ns", "b").await.unwrap(),
            Some(at(200))
        );
        assert_eq!(store.pending(), 0);
        // Nothing new: the next tick writes nothing.
        tokio::time::sleep(DEFAULT_FLUSH_INTERVAL).await;
        assert_eq!(store.inner().writes(), 2);
    }

    #[tokio::test]
    async fn refuses_older_checkpoints_and_reads_see_pending_ones() {
        let store = BufferedStore::new(MemoryStore::new()).flush_interval(Duration::ZERO);
        assert_eq!(
            store.set("ns", "a", at(10)).await.unwrap(),
            SetOutcome::Advanced
        );
        assert_eq!(
            store.set("ns", "a", at(9)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(
            store.set("ns", "a", at(10)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(
            store.list("ns").await.unwrap(),
            vec![("a".to_owned(), at(10))]
        );
        store.flush().await.unwrap();
        // Still refused after the flush.
        assert_eq!(
            store.set("ns", "a", at(9)).await.unwrap(),
            SetOutcome::NotAdvanced
        );
        assert_eq!(store.inner().get("ns", "a").await.unwrap(), Some(at(10)));
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_checkpoints_pending_and_a_newer_one_replaces_them() {
        let store = BufferedStore::new(FaultyStore::new()).flush_interval(Duration::ZERO);
        store.set("ns", "a", at(5)).await.unwrap();
        store.inner().fail_writes(true);
        let error = store.flush().await.unwrap_err();
        assert!(error.is_retryable(), "{error}");
        assert_eq!(store.pending(), 1);
        store.set("ns", "a", at(7)).await.unwrap();
        store.inner().fail_writes(false);
        store.flush().await.unwrap();
        assert_eq!(store.pending(), 0);
        assert_eq!(
            store.inner().memory().get("ns", "a").await.unwrap(),
            Some(at(7))
        );
        assert_eq!(store.inner().writes(), 1);
    }

    #[tokio::test]
    async fn the_wrapped_stores_guard_wins_over_a_lagging_buffer() {
        let shared = Arc::new(MemoryStore::new());
        shared.set("ns", "a", at(50)).await.unwrap();
        let store = BufferedStore::new(shared.clone()).flush_interval(Duration::ZERO);
        store.set("ns", "a", at(20)).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(shared.get("ns", "a").await.unwrap(), Some(at(50)));
        assert_eq!(store.get("ns", "a").await.unwrap(), Some(at(50)));
    }

    /// `Duration::MAX` is an interval that never elapses: no interval flush, and no panic in
    /// the background flush (driven here, in the test's task, so that a panic fails the test).
    #[tokio::test(start_paused = true)]
    async fn a_flush_interval_of_duration_max_never_ticks() {
        let store = BufferedStore::new(FaultyStore::new()).flush_interval(Duration::MAX);
        assert_eq!(store.interval(), Duration::MAX);
        store.set("ns", "a", at(1)).await.unwrap();
        let day = Duration::from_secs(24 * 3600);
        let ticker = tick(Arc::downgrade(&store.shared), store.interval());
        let _ = tokio::time::timeout(day, ticker).await;
        tokio::time::sleep(day).await;
        assert_eq!(store.inner().writes(), 0);
        assert_eq!(store.pending(), 1);
        store.flush().await.unwrap();
        assert_eq!(store.inner().writes(), 1);
        assert_eq!(
            store.inner().memory().get("ns", "a").await.unwrap(),
            Some(at(1))
        );
    }

    #[test]
    fn the_next_tick_keeps_the_cadence_delays_after_an_overrun_and_saturates() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let ms = Duration::from_millis;
        // On time: an interval after the last tick, whenever the flush ended.
        assert_eq!(next_tick(t0, second, t0 + ms(300)), Some(t0 + second));
        // A flush that overran the tick: an interval after its end.
        assert_eq!(next_tick(t0, second, t0 + ms(1_500)), Some(t0 + ms(2_500)));
        assert_eq!(next_tick(t0, Duration::MAX, t0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_background_flush_ends_with_the_store() {
        let inner = Arc::new(MemoryStore::new());
        let store = BufferedStore::new(inner.clone());
        store.set("ns", "a", at(1)).await.unwrap();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1);
        drop(store);
        tokio::time::sleep(DEFAULT_FLUSH_INTERVAL * 2).await;
        assert_eq!(
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            0
        );
    }
}
