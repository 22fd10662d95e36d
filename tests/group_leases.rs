//! The lease back-ends against the real servers: DynamoDB (dynalite on 127.0.0.1:4568,
//! `AWS_ENDPOINT_URL_DYNAMODB`) and PostgreSQL (127.0.0.1:5432, `KT_POSTGRES_URL`), plus the
//! in-memory table; one suite for all three (every write fenced by owner and counter). Then
//! the DynamoDB table read as the Java KCL writes it: a consumer group resumes from the KCL's
//! checkpoints, re-reading nothing before them and skipping nothing after.
//!
//! Every test uses its own table (DynamoDB) or group (Postgres) and removes it.
#![cfg(all(feature = "dynamodb", feature = "postgres"))]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use kinesis_tower::group::{
    ConsumerGroup, DynamoDbLeases, Lease, LeaseBackend, MemoryLeases, PostgresLeases,
};
use kinesis_tower::{service_fn, Batch, BoxError, Checkpoint, Consumer, StartPosition};
use kinesis_tower_layers::testing::{at, at_sub};

/// A fresh DynamoDB lease table; deleted by [`drop_dynamodb`].
async fn dynamodb_leases(test: &str) -> DynamoDbLeases {
    let table = common::unique_stream_name(&format!("kt-leases-{test}"));
    let leases = DynamoDbLeases::new(common::dynamodb_client().await, &table).unwrap();
    leases.create_table().await.unwrap();
    leases
}

async fn drop_dynamodb(leases: &DynamoDbLeases) {
    let _ = common::dynamodb_client()
        .await
        .delete_table()
        .table_name(leases.table())
        .send()
        .await;
}

/// A fresh Postgres group in the default lease table; its rows deleted by [`drop_postgres`].
async fn postgres_leases(test: &str) -> PostgresLeases {
    let group = common::unique_stream_name(&format!("kt-{test}"));
    let leases = PostgresLeases::connect(&common::postgres_url(), &group)
        .await
        .unwrap();
    leases.create_table().await.unwrap();
    leases
}

async fn drop_postgres(leases: &PostgresLeases, group_prefix: &str) {
    let _ = sqlx::query("DELETE FROM kinesis_leases WHERE group_name LIKE $1")
        .bind(format!("{group_prefix}%"))
        .execute(leases.pool())
        .await;
}

fn find(leases: &[Lease], key: &str) -> Lease {
    leases
        .iter()
        .find(|l| l.key == key)
        .unwrap_or_else(|| panic!("no lease {key} in {leases:?}"))
        .clone()
}

/// What every back-end must do: conditional writes on owner and counter.
async fn conformance(backend: &dyn LeaseBackend) {
    let shard = "shardId-000000000001";
    backend
        .create(&Lease::new(shard, vec!["shardId-000000000000".into()]))
        .await
        .unwrap();
    // Creating again changes nothing.
    backend
        .create(&Lease::new(shard, Vec::new()))
        .await
        .unwrap();
    let listed = backend.list().await.unwrap();
    let fresh = find(&listed, shard);
    assert_eq!(fresh.owner, None);
    assert_eq!(fresh.checkpoint, None);
    assert_eq!(fresh.parents, vec!["shardId-000000000000".to_owned()]);

    // Claim: only at the counter seen.
    let mut stale = fresh.clone();
    stale.counter += 7;
    assert_eq!(backend.claim(&stale, "a").await.unwrap(), None);
    let claimed = backend.claim(&fresh, "a").await.unwrap().expect("claimed");
    assert_eq!(claimed.owner.as_deref(), Some("a"));
    assert_eq!(claimed.counter, fresh.counter + 1);
    assert_eq!(claimed.owner_switches, fresh.owner_switches + 1);
    // A second claim from the same listing loses.
    assert_eq!(backend.claim(&fresh, "b").await.unwrap(), None);

    // Renew and checkpoint: owner and counter must match.
    let c = claimed.counter;
    assert!(!backend.renew(shard, "b", c).await.unwrap());
    assert!(!backend.renew(shard, "a", c + 1).await.unwrap());
    assert!(backend.renew(shard, "a", c).await.unwrap());
    let c = c + 1;
    assert!(
        !backend.checkpoint(shard, "a", c - 1, at(5)).await.unwrap(),
        "stale counter"
    );
    assert!(backend
        .checkpoint(shard, "a", c, at_sub(5, 2))
        .await
        .unwrap());
    let c = c + 1;
    assert!(backend.checkpoint(shard, "a", c, at(5)).await.unwrap());
    let c = c + 1;
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!((lease.counter, lease.checkpoint), (c, Some(at(5))));
    assert_eq!(
        lease.owner_switches, 0,
        "a checkpoint resets the owner switches"
    );

    // A handoff request does not move the counter (the owner keeps renewing), only once.
    assert!(
        !backend.request_handoff(shard, "x", "b").await.unwrap(),
        "x is not the owner"
    );
    assert!(backend.request_handoff(shard, "a", "b").await.unwrap());
    assert!(
        !backend.request_handoff(shard, "a", "c").await.unwrap(),
        "already asked"
    );
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!((lease.counter, lease.handoff_to.as_deref()), (c, Some("b")));

    // Only the requester withdraws its request; the counter does not move. A withdrawn
    // request is not answered: the handoff to b is refused, a release to nobody is not.
    assert!(!backend.withdraw_handoff(shard, "c").await.unwrap());
    assert!(!backend
        .withdraw_handoff("no-such-lease", "b")
        .await
        .unwrap());
    assert!(
        !backend
            .list()
            .await
            .unwrap()
            .iter()
            .any(|l| l.key == "no-such-lease"),
        "withdrawing on a missing lease must not create it"
    );
    assert!(backend.withdraw_handoff(shard, "b").await.unwrap());
    assert!(
        !backend.withdraw_handoff(shard, "b").await.unwrap(),
        "withdrawn already"
    );
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!((lease.counter, lease.handoff_to.as_deref()), (c, None));
    assert!(
        !backend.release(shard, "a", c, Some("b")).await.unwrap(),
        "b withdrew its request"
    );
    assert!(backend.request_handoff(shard, "a", "c").await.unwrap());
    assert!(
        !backend.release(shard, "a", c, Some("b")).await.unwrap(),
        "the request is c's, not b's"
    );
    // A release to nobody does not answer a request: it needs none, whoever's stands.
    assert!(backend.release(shard, "a", c, None).await.unwrap());
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!(
        (lease.owner.as_deref(), lease.handoff_to.as_deref()),
        (None, None)
    );
    assert_eq!(lease.counter, c + 1);
    // a takes it back and writes its checkpoint again (the owner switches back to 0).
    let claimed = backend.claim(&lease, "a").await.unwrap().expect("claimed");
    let c = claimed.counter;
    assert!(backend.checkpoint(shard, "a", c, at(5)).await.unwrap());
    let c = c + 1;
    assert!(backend.request_handoff(shard, "a", "b").await.unwrap());
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!((lease.counter, lease.owner.as_deref()), (c, Some("a")));
    assert!(backend.renew(shard, "a", c).await.unwrap());
    let c = c + 1;

    // Handing over: straight to b; a's later writes are refused.
    assert!(backend.release(shard, "a", c, Some("b")).await.unwrap());
    let c = c + 1;
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!(lease.owner.as_deref(), Some("b"));
    assert_eq!(lease.handoff_to, None);
    assert_eq!(lease.counter, c);
    assert_eq!(lease.owner_switches, 1);
    assert!(
        !backend.checkpoint(shard, "a", c, at(9)).await.unwrap(),
        "a zombie write"
    );
    assert!(!backend.checkpoint(shard, "a", c - 1, at(9)).await.unwrap());
    assert!(backend
        .checkpoint(shard, "b", c, Checkpoint::ShardEnd)
        .await
        .unwrap());
    let c = c + 1;

    // Releasing to nobody.
    assert!(backend.release(shard, "b", c, None).await.unwrap());
    let lease = find(&backend.list().await.unwrap(), shard);
    assert_eq!(lease.owner, None);
    assert_eq!(lease.checkpoint, Some(Checkpoint::ShardEnd));
    assert!(lease.is_finished());

    // Every checkpoint kind survives the round trip.
    backend
        .create(&Lease::new("kinds", Vec::new()))
        .await
        .unwrap();
    let mut lease = backend
        .claim(&find(&backend.list().await.unwrap(), "kinds"), "a")
        .await
        .unwrap()
        .unwrap();
    let big: kinesis_tower::SequenceNumber = "4".repeat(56).parse().unwrap();
    for checkpoint in [
        Checkpoint::StartedAtTime {
            timestamp_millis: 1_700_000_000_000,
        },
        Checkpoint::StartedAt {
            sequence_number: big,
        },
        Checkpoint::Sequence {
            sequence_number: big,
            sub_sequence_number: Some(4),
        },
        Checkpoint::at(big),
        Checkpoint::ShardEnd,
    ] {
        assert!(backend
            .checkpoint("kinds", "a", lease.counter, checkpoint)
            .await
            .unwrap());
        lease = find(&backend.list().await.unwrap(), "kinds");
        assert_eq!(lease.checkpoint, Some(checkpoint), "{}", backend.name());
    }
}

#[tokio::test]
async fn the_memory_table_fences_every_write() {
    conformance(&MemoryLeases::new()).await;
}

#[tokio::test]
async fn dynamodb_fences_every_write() {
    let leases = dynamodb_leases("conformance").await;
    conformance(&leases).await;
    drop_dynamodb(&leases).await;
}

#[tokio::test]
async fn postgres_fences_every_write() {
    let leases = postgres_leases("conformance").await;
    conformance(&leases).await;
    drop_postgres(&leases, "kt-conformance").await;
}

#[tokio::test]
async fn invalid_names_are_refused() {
    let client = common::dynamodb_client().await;
    for bad in ["", "ab", "a b", "tab/le"] {
        assert!(DynamoDbLeases::new(client.clone(), bad).is_err(), "{bad:?}");
    }
    let pool = sqlx::PgPool::connect_lazy(&common::postgres_url()).unwrap();
    assert!(PostgresLeases::with_table(pool.clone(), "g", "drop table;").is_err());
    assert!(PostgresLeases::with_table(pool.clone(), "", "kinesis_leases").is_err());
    assert!(PostgresLeases::with_table(pool, "g", "public.kinesis_leases").is_ok());
}

/// One lease row exactly as the KCL 2.x `DynamoDBLeaseSerializer` writes it (every attribute
/// with the KCL's type).
#[allow(clippy::too_many_arguments)]
fn kcl_item(
    shard: &str,
    owner: Option<&str>,
    counter: u64,
    checkpoint: &str,
    sub: u64,
    parents: &[&str],
    hash_range: (&str, &str),
) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("leaseKey".to_owned(), AttributeValue::S(shard.to_owned())),
        (
            "leaseCounter".to_owned(),
            AttributeValue::N(counter.to_string()),
        ),
        (
            "checkpoint".to_owned(),
            AttributeValue::S(checkpoint.to_owned()),
        ),
        (
            "checkpointSubSequenceNumber".to_owned(),
            AttributeValue::N(sub.to_string()),
        ),
        (
            "ownerSwitchesSinceCheckpoint".to_owned(),
            AttributeValue::N("0".to_owned()),
        ),
        (
            "startingHashKey".to_owned(),
            AttributeValue::S(hash_range.0.to_owned()),
        ),
        (
            "endingHashKey".to_owned(),
            AttributeValue::S(hash_range.1.to_owned()),
        ),
    ]);
    if let Some(owner) = owner {
        item.insert("leaseOwner".to_owned(), AttributeValue::S(owner.to_owned()));
    }
    if !parents.is_empty() {
        item.insert(
            "parentShardId".to_owned(),
            AttributeValue::Ss(parents.iter().map(|p| (*p).to_owned()).collect()),
        );
    }
    item
}

/// A team stops its KCL workers and points a group at the KCL's table: each shard resumes
/// right after the KCL's checkpoint (a plain record with sub-sequence 0 counts as processed,
/// as the KCL means it), a `SHARD_END` shard is not read, a `TRIM_HORIZON` lease is read from
/// the start; the KCL's owner is taken over once its lease expires.
#[tokio::test]
async fn a_group_resumes_from_the_kcls_checkpoints() {
    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("kcl-import");
    common::create_stream(&kinesis.client, &stream, 3).await;
    common::wait_for_stream_active(&kinesis.client, &stream, Duration::from_secs(10)).await;
    let shards = common::list_all_shards(&kinesis.client, &stream).await;
    let ids: Vec<String> = shards.iter().map(|s| s.shard_id().to_owned()).collect();
    let hash = |i: usize| {
        let r = shards[i].hash_key_range().unwrap();
        (
            r.starting_hash_key().to_owned(),
            r.ending_hash_key().to_owned(),
        )
    };
    // Ten records on each shard, explicit hash keys so each goes where it should.
    let mut put: HashMap<String, Vec<String>> = HashMap::new();
    for (i, shard) in ids.iter().enumerate() {
        for n in 0..10 {
            let out = kinesis
                .client
                .put_record()
                .stream_name(&stream)
                .partition_key(format!("k{n}"))
                .explicit_hash_key(hash(i).0)
                .data(aws_sdk_kinesis::primitives::Blob::new(format!(
                    "{shard}/{n}"
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(out.shard_id(), shard);
            put.entry(shard.clone())
                .or_default()
                .push(out.sequence_number().to_owned());
        }
    }

    let leases = dynamodb_leases("kcl").await;
    let client = common::dynamodb_client().await;
    // Shard 0: the KCL processed records 0..=3 (a plain record: sub-sequence 0).
    // Shard 1: fully processed and closed? No: SHARD_END on an open shard would be wrong;
    //          the KCL's worker still owns it, holding a checkpoint at record 6.
    // Shard 2: a lease the KCL created and never checkpointed (TRIM_HORIZON).
    let items = [
        kcl_item(
            &ids[0],
            None,
            41,
            &put[&ids[0]][3],
            0,
            &[],
            (&hash(0).0, &hash(0).1),
        ),
        kcl_item(
            &ids[1],
            Some("kcl-worker-7"),
            4182,
            &put[&ids[1]][6],
            0,
            &[],
            (&hash(1).0, &hash(1).1),
        ),
        kcl_item(
            &ids[2],
            None,
            1,
            "TRIM_HORIZON",
            0,
            &[],
            (&hash(2).0, &hash(2).1),
        ),
    ];
    for item in items {
        client
            .put_item()
            .table_name(leases.table())
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }

    let group = ConsumerGroup::builder(leases.clone(), "rust-worker")
        .lease_duration(Duration::from_millis(1500))
        .poll_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let consumer = Consumer::builder()
        .client(kinesis.client.clone())
        .stream_name(&stream)
        // The KCL's checkpoints decide; this is only for shards without one.
        .start_position(StartPosition::Latest)
        .group(group)
        .build()
        .unwrap();
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let handler = {
        let seen = seen.clone();
        service_fn(move |batch: Batch| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                for record in &batch.records {
                    seen.entry(batch.shard_id.to_string())
                        .or_default()
                        .push(record.sequence_number.to_string());
                }
                Ok::<_, BoxError>(())
            }
        })
    };
    let expected: HashMap<String, Vec<String>> = HashMap::from([
        (ids[0].clone(), put[&ids[0]][4..].to_vec()),
        (ids[1].clone(), put[&ids[1]][7..].to_vec()),
        (ids[2].clone(), put[&ids[2]].clone()),
    ]);
    let mut run = common::Running::start(&consumer, handler);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let done = {
            let seen = seen.lock().unwrap();
            expected
                .iter()
                .all(|(shard, want)| seen.get(shard).map_or(0, Vec::len) >= want.len())
        };
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every record after the KCL's checkpoints was read: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let a stray re-read show up if there is one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.stop().await.unwrap().unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        expected,
        "exactly the records after each checkpoint"
    );

    // The rows keep the KCL's layout and types, now owned by nobody (released on stop).
    let rows = client
        .scan()
        .table_name(leases.table())
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    for row in rows.items() {
        assert!(
            matches!(row.get("leaseCounter"), Some(AttributeValue::N(_))),
            "{row:?}"
        );
        assert!(
            matches!(row.get("checkpoint"), Some(AttributeValue::S(_))),
            "{row:?}"
        );
        assert!(
            matches!(
                row.get("checkpointSubSequenceNumber"),
                Some(AttributeValue::N(_))
            ),
            "{row:?}"
        );
        assert!(
            row.get("leaseOwner").is_none(),
            "released on shutdown: {row:?}"
        );
        assert!(
            matches!(row.get("startingHashKey"), Some(AttributeValue::S(_))),
            "KCL attributes kept: {row:?}"
        );
    }
    let last = |i: usize| put[&ids[i]][9].clone();
    let listed = leases.list().await.unwrap();
    for (i, shard) in ids.iter().enumerate() {
        assert_eq!(
            find(&listed, shard).checkpoint,
            Some(Checkpoint::at(last(i).parse().unwrap())),
            "shard {i} checkpointed at its last record"
        );
    }
    drop_dynamodb(&leases).await;
    common::delete_stream(&kinesis.client, &stream).await;
}
