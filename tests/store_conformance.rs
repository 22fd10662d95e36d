//! The conformance suite over the stores that need no server: memory, a buffered store, SQLite.
//! The server-backed stores run the same suite in their own test files.

mod conformance;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kinesis_tower::store::BufferedStore;
use kinesis_tower::store::MemoryStore;
use kinesis_tower::CheckpointStore;

type Registry = Mutex<HashMap<String, Arc<MemoryStore>>>;

/// One memory store per scope, so two handles of a check see the same data.
fn registry() -> &'static Registry {
    static STORES: OnceLock<Registry> = OnceLock::new();
    STORES.get_or_init(Mutex::default)
}

fn memory(scope: &str) -> Arc<MemoryStore> {
    registry()
        .lock()
        .unwrap()
        .entry(scope.to_owned())
        .or_default()
        .clone()
}

fn forget_memory(scope: &str) {
    registry().lock().unwrap().remove(scope);
}

conformance::suite!(
    memory_store,
    make = |scope: String| async move { memory(&scope) as Arc<dyn CheckpointStore> },
    cleanup = |scope: String| async move { forget_memory(&scope) },
);

conformance::suite!(
    buffered_memory_store,
    make = |scope: String| async move {
        // A long interval: only explicit flushes write, which is what the suite checks.
        Arc::new(BufferedStore::new(memory(&scope)).flush_interval(Duration::from_secs(3600)))
            as Arc<dyn CheckpointStore>
    },
    cleanup = |scope: String| async move { forget_memory(&scope) },
);

fn sqlite_path(scope: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{scope}.sqlite"))
}

conformance::suite!(
    sqlite_store,
    make = |scope: String| async move {
        let store = kinesis_tower::store::SqliteStore::open(sqlite_path(&scope))
            .await
            .expect("open the SQLite file");
        Arc::new(store) as Arc<dyn CheckpointStore>
    },
    cleanup = |scope: String| async move {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path(&scope).display()));
        }
    },
);
