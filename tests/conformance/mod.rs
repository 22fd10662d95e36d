//! The conformance suite every checkpoint store passes.
//!
//! A test file declares `mod conformance;` and invokes
//! `conformance::suite!(name, make = |scope| async move { .. }, cleanup = |scope| async move { .. });`
//! `make(scope)` returns a new handle (`Arc<dyn CheckpointStore>`) on the same backing table or
//! key space for the same `scope` (each check has its own scope, a unique lowercase name usable
//! in table names); `cleanup(scope)` removes what the check made.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use kinesis_tower::checkpoint::SetOutcome;
use kinesis_tower::{Checkpoint, CheckpointStore, SequenceNumber};

/// Generates one `#[tokio::test]` per check, in a module named `$name`.
macro_rules! suite {
    ($name:ident, make = $make:expr, cleanup = $cleanup:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::conformance::suite!(@check $make, $cleanup;
                unknown_shard_has_no_checkpoint,
                set_then_get,
                older_checkpoint_is_refused,
                refusal_is_enforced_by_the_backing_store,
                sequence_numbers_compare_numerically_up_to_128_digits,
                sub_sequence_numbers_order_within_a_record,
                a_recorded_start_is_before_any_progress_in_its_record,
                shard_end_is_final,
                namespaces_are_isolated,
                list_returns_the_namespace_sorted,
                flush_makes_checkpoints_visible_to_a_new_handle,
                concurrent_writers_keep_the_greatest,
            );
        }
    };
    (@check $make:expr, $cleanup:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let scope = $crate::conformance::scope(stringify!($check));
                let make = $make;
                let cleanup = $cleanup;
                $crate::conformance::$check(|| make(scope.clone())).await;
                cleanup(scope.clone()).await;
            }
        )*
    };
}
pub(crate) use suite;

/// A unique, lowercase name for one check's table / key prefix.
pub fn scope(check: &str) -> String {
    let short: String = check.split('_').filter_map(|w| w.chars().next()).collect();
    format!("ktc_{short}_{:08x}", fastrand::u32(..))
}

fn ns(tag: &str) -> String {
    format!("app-{}/stream-{tag}", fastrand::u64(..))
}

fn seq(digits: &str) -> SequenceNumber {
    digits.parse().expect("valid sequence number")
}

fn at(digits: &str) -> Checkpoint {
    Checkpoint::at(seq(digits))
}

fn at_sub(digits: &str, sub: u64) -> Checkpoint {
    Checkpoint::Sequence {
        sequence_number: seq(digits),
        sub_sequence_number: Some(sub),
    }
}

/// A fresh handle on the same backing store, as another process would see it after a flush.
async fn reopened<F, Fut>(make: &F) -> Arc<dyn CheckpointStore>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    make().await
}

const SHARD: &str = "shardId-000000000000";

pub async fn unknown_shard_has_no_checkpoint<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("unknown");
    assert_eq!(store.get(&ns, SHARD).await.unwrap(), None);
    assert!(store.list(&ns).await.unwrap().is_empty());
}

pub async fn set_then_get<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("set");
    let cp = at("49590338271490256608559692538361571095921575989136588898");
    assert_eq!(
        store.set(&ns, SHARD, cp).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(store.get(&ns, SHARD).await.unwrap(), Some(cp));
    assert_eq!(store.get(&ns, "shardId-000000000001").await.unwrap(), None);
    store.flush().await.unwrap();
    assert_eq!(store.get(&ns, SHARD).await.unwrap(), Some(cp));
}

pub async fn older_checkpoint_is_refused<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("older");
    assert_eq!(
        store.set(&ns, SHARD, at("2000")).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.set(&ns, SHARD, at("1999")).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(
        store.set(&ns, SHARD, at("2000")).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at("1")).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(store.get(&ns, SHARD).await.unwrap(), Some(at("2000")));
    assert_eq!(
        store.set(&ns, SHARD, at("2001")).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at("2001"))
    );
}

/// Two handles (two processes): the one holding an older checkpoint cannot overwrite the newer
/// one the other wrote, whatever each holds in memory.
pub async fn refusal_is_enforced_by_the_backing_store<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let ahead = make().await;
    let behind = make().await;
    let ns = ns("guard");
    ahead.set(&ns, SHARD, at("500")).await.unwrap();
    ahead.flush().await.unwrap();
    // `behind` has never seen 500: it may accept 400 into its buffer, but the backing store
    // must refuse it when written.
    let _ = behind.set(&ns, SHARD, at("400")).await.unwrap();
    behind.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at("500"))
    );
    assert_eq!(behind.get(&ns, SHARD).await.unwrap(), Some(at("500")));
    // The same with sub-sequence numbers and shard end.
    ahead.set(&ns, SHARD, Checkpoint::ShardEnd).await.unwrap();
    ahead.flush().await.unwrap();
    let _ = behind.set(&ns, SHARD, at_sub("600", 3)).await.unwrap();
    behind.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
}

pub async fn sequence_numbers_compare_numerically_up_to_128_digits<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("digits");
    // Shorter strings are smaller numbers even where they sort after as text.
    store.set(&ns, SHARD, at("99")).await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at("100")).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at("99")).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    let long = "9".repeat(127);
    let longest = format!("1{}", "0".repeat(127));
    let max = "9".repeat(128);
    assert_eq!(
        store.set(&ns, SHARD, at(&long)).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.set(&ns, SHARD, at(&longest)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at(&long)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    let fresh = reopened(&make).await;
    assert_eq!(fresh.get(&ns, SHARD).await.unwrap(), Some(at(&longest)));
    assert_eq!(
        fresh.set(&ns, SHARD, at(&max)).await.unwrap(),
        SetOutcome::Advanced
    );
    fresh.flush().await.unwrap();
    // Stored losslessly: every digit comes back.
    let back = reopened(&make)
        .await
        .get(&ns, SHARD)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, at(&max));
    assert_eq!(back.sequence_number().unwrap().to_string(), max);
}

pub async fn sub_sequence_numbers_order_within_a_record<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("sub");
    let s = "49590338271490256608559692538361571095921575989136588898";
    assert_eq!(
        store.set(&ns, SHARD, at_sub(s, 3)).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.set(&ns, SHARD, at_sub(s, 37)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at_sub(s, 36)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at_sub(s, 37))
    );
    // The whole record is past any of its user records.
    assert_eq!(
        store.set(&ns, SHARD, at(s)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, at_sub(s, 99)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at(s))
    );
    // The next record's first user record is past it, and sub-sequence numbers up to u64::MAX
    // survive.
    let next = "49590338271490256608559692538361571095921575989136588899";
    assert_eq!(
        store.set(&ns, SHARD, at_sub(next, 0)).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.set(&ns, SHARD, at_sub(next, u64::MAX)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at_sub(next, u64::MAX))
    );
}

/// `Checkpoint::StartedAt` and `StartedAtTime` (where a shard started, nothing processed)
/// survive a reopen, are passed by any progress, and never move a checkpoint back.
pub async fn a_recorded_start_is_before_any_progress_in_its_record<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let fresh = ns("started-in-time");
    let ns = ns("started");
    let s = "49590338271490256608559692538361571095921575989136588898";
    let started = Checkpoint::StartedAt {
        sequence_number: seq(s),
    };
    assert_eq!(
        store.set(&ns, SHARD, started).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(started)
    );
    // The first user record of the started record is progress past it.
    assert_eq!(
        store.set(&ns, SHARD, at_sub(s, 0)).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, started).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(at_sub(s, 0))
    );
    // A start in time is before any start at a record: it does not move a checkpoint back.
    let in_time = Checkpoint::StartedAtTime {
        timestamp_millis: 1_700_000_000_000,
    };
    assert_eq!(
        store.set(&ns, SHARD, in_time).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(
        store.set(&fresh, SHARD, in_time).await.unwrap(),
        SetOutcome::Advanced
    );
    assert_eq!(
        store.set(&fresh, SHARD, started).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&fresh, SHARD).await.unwrap(),
        Some(started)
    );
    // A start at a later record is after the whole of an earlier one.
    let next = "49590338271490256608559692538361571095921575989136588899";
    let later = Checkpoint::StartedAt {
        sequence_number: seq(next),
    };
    assert_eq!(
        store.set(&ns, SHARD, later).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(later)
    );
}

pub async fn shard_end_is_final<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("end");
    store.set(&ns, SHARD, at("7")).await.unwrap();
    assert_eq!(
        store.set(&ns, SHARD, Checkpoint::ShardEnd).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    let max = "9".repeat(128);
    assert_eq!(
        store.set(&ns, SHARD, at(&max)).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    assert_eq!(
        store.set(&ns, SHARD, Checkpoint::ShardEnd).await.unwrap(),
        SetOutcome::NotAdvanced
    );
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.get(&ns, SHARD).await.unwrap(),
        Some(Checkpoint::ShardEnd)
    );
    // A shard that ends before any checkpoint.
    store
        .set(&ns, "shardId-000000000009", Checkpoint::ShardEnd)
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make)
            .await
            .get(&ns, "shardId-000000000009")
            .await
            .unwrap(),
        Some(Checkpoint::ShardEnd)
    );
}

pub async fn namespaces_are_isolated<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let (a, b) = (ns("iso-a"), ns("iso-b"));
    store.set(&a, SHARD, at("300")).await.unwrap();
    store.set(&b, SHARD, at("100")).await.unwrap();
    // A lower value in b is not refused because of a.
    assert_eq!(
        store.set(&b, SHARD, at("200")).await.unwrap(),
        SetOutcome::Advanced
    );
    store.flush().await.unwrap();
    let fresh = reopened(&make).await;
    assert_eq!(fresh.get(&a, SHARD).await.unwrap(), Some(at("300")));
    assert_eq!(fresh.get(&b, SHARD).await.unwrap(), Some(at("200")));
    assert_eq!(
        fresh.list(&a).await.unwrap(),
        vec![(SHARD.to_owned(), at("300"))]
    );
}

pub async fn list_returns_the_namespace_sorted<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("list");
    let mut expected = Vec::new();
    for i in (0..12).rev() {
        let shard = format!("shardId-{i:012}");
        let cp = if i == 5 {
            Checkpoint::ShardEnd
        } else {
            at_sub(&format!("{}", 1000 + i), i)
        };
        store.set(&ns, &shard, cp).await.unwrap();
        expected.push((shard, cp));
    }
    expected.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(store.list(&ns).await.unwrap(), expected, "before flush");
    store.flush().await.unwrap();
    assert_eq!(
        reopened(&make).await.list(&ns).await.unwrap(),
        expected,
        "after flush"
    );
    assert!(store.list(&format!("{ns}-other")).await.unwrap().is_empty());
}

pub async fn flush_makes_checkpoints_visible_to_a_new_handle<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let store = make().await;
    let ns = ns("flush");
    store.flush().await.unwrap(); // nothing pending: fine
    for i in 1..=50u32 {
        store.set(&ns, SHARD, at(&i.to_string())).await.unwrap();
        store
            .set(&ns, "shardId-000000000001", at(&(i * 10).to_string()))
            .await
            .unwrap();
    }
    // The handle that wrote sees its writes, flushed or not.
    assert_eq!(store.get(&ns, SHARD).await.unwrap(), Some(at("50")));
    store.flush().await.unwrap();
    let fresh = reopened(&make).await;
    assert_eq!(fresh.get(&ns, SHARD).await.unwrap(), Some(at("50")));
    assert_eq!(
        fresh.get(&ns, "shardId-000000000001").await.unwrap(),
        Some(at("500"))
    );
    store.flush().await.unwrap(); // again, nothing pending
}

pub async fn concurrent_writers_keep_the_greatest<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn CheckpointStore>>,
{
    let ns = ns("concurrent");
    let shared = make().await;
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        // Half the writers share one handle, the others have their own (other processes).
        let store = if writer % 2 == 0 {
            shared.clone()
        } else {
            make().await
        };
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut values: Vec<u64> = (0..40).map(|i| i * 8 + writer + 1).collect();
            fastrand::shuffle(&mut values);
            for v in values {
                store.set(&ns, SHARD, at(&v.to_string())).await.unwrap();
                let own = format!("own-{writer}");
                store
                    .set(&ns, &own, at_sub(&(v / 8).to_string(), v))
                    .await
                    .unwrap();
                if v % 7 == 0 {
                    store.flush().await.unwrap();
                }
            }
            store.flush().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let fresh = reopened(&make).await;
    assert_eq!(fresh.get(&ns, SHARD).await.unwrap(), Some(at("320")));
    for writer in 0..8u64 {
        let top = 39 * 8 + writer + 1;
        assert_eq!(
            fresh.get(&ns, &format!("own-{writer}")).await.unwrap(),
            Some(at_sub(&(top / 8).to_string(), top)),
            "writer {writer}"
        );
    }
}
