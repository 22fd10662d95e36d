//! `DynamoDbLeases`: a group's leases in DynamoDB, in the Java KCL 2.x lease table layout
//! (feature `dynamodb`).

use std::collections::HashMap;
use std::error::Error as StdError;

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;
use kinesis_tower_layers::{Checkpoint, SequenceNumber, StoreError};

use super::lease::{Lease, LeaseBackend, LeaseError};
use crate::store::dynamodb::{sdk_error, validate_table, wait_until_active};

const BACKEND: &str = "dynamodb";

/// The KCL's checkpoint sentinels, stored as the `checkpoint` string.
const TRIM_HORIZON: &str = "TRIM_HORIZON";
const LATEST: &str = "LATEST";
const AT_TIMESTAMP: &str = "AT_TIMESTAMP";
const SHARD_END: &str = "SHARD_END";

/// `checkpointSubSequenceNumber` of a whole-record checkpoint: above every user record index,
/// so the KCL reads it as "every user record of this record".
const WHOLE_RECORD: i64 = i64::MAX;

/// A consumer group's leases in a DynamoDB table laid out as the Java KCL 2.x lease table, so
/// a team moving from a KCL application can stop its Java workers, point a group at the same
/// table and resume from the KCL's checkpoints.
///
/// One item per shard:
///
/// | attribute | type | |
/// |---|---|---|
/// | `leaseKey` | S | hash key: the shard id |
/// | `leaseOwner` | S | the worker holding the lease; absent when unowned |
/// | `leaseCounter` | N | the fencing token: +1 on every renewal, claim, checkpoint and release |
/// | `checkpoint` | S | a sequence number, or the KCL's sentinels `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`, `SHARD_END`; absent on a new lease |
/// | `checkpointSubSequenceNumber` | N | the KPL user record index within `checkpoint`; `9223372036854775807` (2^63 − 1) for a whole record, 0 with a sentinel |
/// | `ownerSwitchesSinceCheckpoint` | N | owner changes since the last checkpoint |
/// | `parentShardId` | SS | the shard's parents; absent for an original shard |
/// | `handoffTo` | S | a worker that asked the owner to hand the lease over (this library's) |
/// | `startingPosition` | S | with a sentinel `checkpoint`: where reading started, `AT_SEQUENCE_NUMBER:<n>` or `AT_TIMESTAMP:<ms>` (this library's) |
///
/// Reading a KCL table: a sequence-number checkpoint resumes after the record (inside a KPL
/// aggregate: after the user record `checkpointSubSequenceNumber`; the KCL writes 0 for a plain
/// record, which then counts as processed); `SHARD_END` is a finished shard; `TRIM_HORIZON`
/// reads the shard from its oldest record; `LATEST` and `AT_TIMESTAMP` (whose timestamp the
/// KCL keeps in its configuration) start at the consumer's start position. The KCL's other
/// attributes (`childShardIds`, hash key range, 3.x `checkpointOwner`, `throughputKBps`,
/// `pendingCheckpoint*`) are left as they are.
///
/// **Do not run KCL workers and a group on one table at the same time.** They do not share a
/// planner: each side sees the other's renewals as live leases and may claim expired ones, and
/// the KCL 3.x leader assigns leases by its own rules; each write is still fenced by the
/// counter, so neither moves the other's checkpoint, but shards move back and forth and are
/// read twice around each move. Stop one side, then start the other.
///
/// Every write is a conditional `UpdateItem` (owner and counter); the listing is one
/// strongly consistent `Scan` (paginated). [`create_table`](DynamoDbLeases::create_table)
/// creates the table (hash key `leaseKey` (S), on-demand billing), as the KCL does.
#[derive(Clone, Debug)]
pub struct DynamoDbLeases {
    client: Client,
    table: String,
}

impl DynamoDbLeases {
    /// Uses `client` and `table` (3 to 255 letters, digits and `_ . -`; a KCL application's
    /// table is named after the application).
    pub fn new(client: Client, table: &str) -> Result<Self, LeaseError> {
        validate_table(table).map_err(|_| LeaseError::InvalidName {
            what: "table name",
            name: table.to_owned(),
            reason: "use 3 to 255 letters, digits and '_', '.', '-'",
        })?;
        Ok(Self {
            client,
            table: table.to_owned(),
        })
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table (hash key `leaseKey` (S), on-demand billing) unless it exists, and
    /// waits until it is ACTIVE.
    pub async fn create_table(&self) -> Result<(), LeaseError> {
        let attribute = AttributeDefinition::builder()
            .attribute_name("leaseKey")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| self.build_error("create table", e))?;
        let key = KeySchemaElement::builder()
            .attribute_name("leaseKey")
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| self.build_error("create table", e))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attribute)
            .key_schema(key)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => return Err(self.error("create table", None, e)),
        }
        wait_until_active(&self.client, &self.table)
            .await
            .map_err(|e| self.store_error("create table", e))
    }

    fn build_error(
        &self,
        operation: &'static str,
        e: impl StdError + Send + Sync + 'static,
    ) -> LeaseError {
        LeaseError::Backend {
            backend: BACKEND,
            table: self.table.clone(),
            operation,
            key: None,
            retryable: false,
            source: Box::new(e),
        }
    }

    fn store_error(&self, operation: &'static str, e: StoreError) -> LeaseError {
        LeaseError::Backend {
            backend: BACKEND,
            table: self.table.clone(),
            operation,
            key: None,
            retryable: e.is_retryable(),
            source: Box::new(e),
        }
    }

    fn error<E>(
        &self,
        operation: &'static str,
        key: Option<&str>,
        e: SdkError<E, HttpResponse>,
    ) -> LeaseError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        let error = sdk_error(&self.table, operation, None, key, e);
        LeaseError::Backend {
            backend: BACKEND,
            table: self.table.clone(),
            operation,
            key: key.map(str::to_owned),
            retryable: error.is_retryable(),
            source: match error {
                StoreError::Backend { source, .. } => source,
                other => Box::new(other),
            },
        }
    }

    /// An update of `key` held by `worker` at `counter`: the counter moves on.
    fn held_update(&self, key: &str, worker: &str, counter: u64) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(key))
            .condition_expression("leaseOwner = :me AND leaseCounter = :c")
            .expression_attribute_values(":me", s(worker))
            .expression_attribute_values(":c", n(counter))
            .expression_attribute_values(":next", n(counter + 1))
    }

    /// Sends a conditional update: whether its condition held.
    async fn conditional(
        &self,
        operation: &'static str,
        key: &str,
        update: UpdateItemFluentBuilder,
    ) -> Result<bool, LeaseError> {
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(self.error(operation, Some(key), e)),
        }
    }
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A checkpoint as the KCL stores it: (`checkpoint`, `checkpointSubSequenceNumber`,
/// `startingPosition`).
fn encode(checkpoint: Checkpoint) -> (String, i64, Option<String>) {
    match checkpoint {
        Checkpoint::ShardEnd => (SHARD_END.to_owned(), 0, None),
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number,
        } => (
            sequence_number.to_string(),
            sub_sequence_number.map_or(WHOLE_RECORD, |sub| {
                i64::try_from(sub).unwrap_or(WHOLE_RECORD - 1)
            }),
            None,
        ),
        // The KCL has no "started here" checkpoint: it would read the shard from its oldest
        // record (duplicates, nothing lost); this library reads `startingPosition`.
        Checkpoint::StartedAt { sequence_number } => (
            TRIM_HORIZON.to_owned(),
            0,
            Some(format!("AT_SEQUENCE_NUMBER:{sequence_number}")),
        ),
        Checkpoint::StartedAtTime { timestamp_millis } => (
            TRIM_HORIZON.to_owned(),
            0,
            Some(format!("AT_TIMESTAMP:{timestamp_millis}")),
        ),
        // A kind this version does not know: read from the oldest record rather than skip.
        _ => (TRIM_HORIZON.to_owned(), 0, None),
    }
}

/// Reads the checkpoint attributes of an item (the KCL's or this library's).
fn decode(item: &HashMap<String, AttributeValue>) -> Result<Option<Checkpoint>, String> {
    let Some(value) = item.get("checkpoint") else {
        return Ok(None);
    };
    let AttributeValue::S(checkpoint) = value else {
        return Err("checkpoint is not a string".to_owned());
    };
    let sub = match item.get("checkpointSubSequenceNumber") {
        None => 0,
        Some(AttributeValue::N(sub)) => sub
            .parse::<i64>()
            .map_err(|e| format!("checkpointSubSequenceNumber {sub:?}: {e}"))?,
        Some(_) => return Err("checkpointSubSequenceNumber is not a number".to_owned()),
    };
    let started = match item.get("startingPosition") {
        Some(AttributeValue::S(position)) => Some(position.as_str()),
        _ => None,
    };
    match checkpoint.as_str() {
        SHARD_END => Ok(Some(Checkpoint::ShardEnd)),
        TRIM_HORIZON | LATEST | AT_TIMESTAMP if started.is_some() => {
            let position = started.unwrap_or_default();
            if let Some(seq) = position.strip_prefix("AT_SEQUENCE_NUMBER:") {
                let sequence_number = SequenceNumber::parse(seq).map_err(|e| e.to_string())?;
                Ok(Some(Checkpoint::StartedAt { sequence_number }))
            } else if let Some(ms) = position.strip_prefix("AT_TIMESTAMP:") {
                let timestamp_millis = ms
                    .parse()
                    .map_err(|e| format!("startingPosition {position:?}: {e}"))?;
                Ok(Some(Checkpoint::StartedAtTime { timestamp_millis }))
            } else {
                Err(format!("startingPosition {position:?} is not AT_SEQUENCE_NUMBER:<n> or AT_TIMESTAMP:<ms>"))
            }
        }
        // From the oldest record: a time before any record.
        TRIM_HORIZON => Ok(Some(Checkpoint::StartedAtTime {
            timestamp_millis: 0,
        })),
        LATEST | AT_TIMESTAMP => Ok(None),
        digits => {
            let sequence_number =
                SequenceNumber::parse(digits).map_err(|e| format!("checkpoint {digits:?}: {e}"))?;
            let sub_sequence_number = match sub {
                WHOLE_RECORD => None,
                sub => Some(
                    u64::try_from(sub)
                        .map_err(|_| format!("negative checkpointSubSequenceNumber {sub}"))?,
                ),
            };
            Ok(Some(Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            }))
        }
    }
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Result<u64, String> {
    match item.get(name) {
        None => Ok(0),
        Some(AttributeValue::N(value)) => value
            .parse::<u64>()
            .map_err(|e| format!("{name} {value:?}: {e}")),
        Some(_) => Err(format!("{name} is not a number")),
    }
}

fn string(item: &HashMap<String, AttributeValue>, name: &str) -> Result<Option<String>, String> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(value)) => Ok(Some(value.clone())),
        Some(_) => Err(format!("{name} is not a string")),
    }
}

impl DynamoDbLeases {
    fn parse(&self, item: &HashMap<String, AttributeValue>) -> Result<Lease, LeaseError> {
        let key = match item.get("leaseKey") {
            Some(AttributeValue::S(key)) => key.clone(),
            _ => {
                return Err(LeaseError::Corrupt {
                    table: self.table.clone(),
                    key: String::new(),
                    reason: "an item without a string leaseKey".to_owned(),
                })
            }
        };
        let corrupt = |reason: String| LeaseError::Corrupt {
            table: self.table.clone(),
            key: key.clone(),
            reason,
        };
        let parents = match item.get("parentShardId") {
            None => Vec::new(),
            Some(AttributeValue::Ss(parents)) => parents.clone(),
            // Written by hand as a plain string: take it.
            Some(AttributeValue::S(parent)) => vec![parent.clone()],
            Some(_) => return Err(corrupt("parentShardId is not a string set".to_owned())),
        };
        let mut lease = Lease::new(key.clone(), parents);
        lease.owner = string(item, "leaseOwner").map_err(corrupt)?;
        lease.counter = number(item, "leaseCounter").map_err(corrupt)?;
        lease.owner_switches = number(item, "ownerSwitchesSinceCheckpoint").map_err(corrupt)?;
        lease.checkpoint = decode(item).map_err(corrupt)?;
        lease.handoff_to = string(item, "handoffTo").map_err(corrupt)?;
        Ok(lease)
    }
}

#[async_trait]
impl LeaseBackend for DynamoDbLeases {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn list(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.error("list", None, e))?;
            for item in page.items() {
                leases.push(self.parse(item)?);
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        leases.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(leases)
    }

    async fn create(&self, lease: &Lease) -> Result<(), LeaseError> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("leaseKey", s(&lease.key))
            .item("leaseCounter", n(lease.counter))
            .item("ownerSwitchesSinceCheckpoint", n(lease.owner_switches))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !lease.parents.is_empty() {
            put = put.item("parentShardId", AttributeValue::Ss(lease.parents.clone()));
        }
        if let Some(owner) = &lease.owner {
            put = put.item("leaseOwner", s(owner));
        }
        if let Some(checkpoint) = lease.checkpoint {
            let (checkpoint, sub, started) = encode(checkpoint);
            put = put
                .item("checkpoint", s(checkpoint))
                .item("checkpointSubSequenceNumber", n(sub));
            if let Some(started) = started {
                put = put.item("startingPosition", s(started));
            }
        }
        match put.send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(()),
            Err(e) => Err(self.error("create", Some(&lease.key), e)),
        }
    }

    async fn claim(&self, seen: &Lease, worker: &str) -> Result<Option<Lease>, LeaseError> {
        let switch = u64::from(!seen.is_owned_by(worker));
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(&seen.key))
            .update_expression(
                "SET leaseOwner = :me, leaseCounter = :next, \
                 ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :switch \
                 REMOVE handoffTo",
            )
            .expression_attribute_values(":me", s(worker))
            .expression_attribute_values(":next", n(seen.counter + 1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":switch", n(switch))
            .expression_attribute_values(":c", n(seen.counter))
            .return_values(ReturnValue::AllNew);
        update = match &seen.owner {
            Some(owner) => update
                .condition_expression("leaseOwner = :old AND leaseCounter = :c")
                .expression_attribute_values(":old", s(owner)),
            None => update
                .condition_expression(
                    "attribute_exists(leaseKey) \
                     AND (attribute_not_exists(leaseOwner) OR attribute_type(leaseOwner, :null)) \
                     AND (leaseCounter = :c OR (attribute_not_exists(leaseCounter) AND :c = :zero))",
                )
                .expression_attribute_values(":null", s("NULL")),
        };
        match update.send().await {
            Ok(out) => match out.attributes() {
                Some(item) => Ok(Some(self.parse(item)?)),
                None => Ok(None),
            },
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(None),
            Err(e) => Err(self.error("claim", Some(&seen.key), e)),
        }
    }

    async fn renew(&self, key: &str, worker: &str, counter: u64) -> Result<bool, LeaseError> {
        let update = self
            .held_update(key, worker, counter)
            .update_expression("SET leaseCounter = :next");
        self.conditional("renew", key, update).await
    }

    async fn checkpoint(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        checkpoint: Checkpoint,
    ) -> Result<bool, LeaseError> {
        let (value, sub, started) = encode(checkpoint);
        let mut update = self
            .held_update(key, worker, counter)
            .expression_attribute_values(":cp", s(value))
            .expression_attribute_values(":sub", n(sub))
            .expression_attribute_values(":zero", n(0));
        let set =
            "SET leaseCounter = :next, checkpoint = :cp, checkpointSubSequenceNumber = :sub, \
                   ownerSwitchesSinceCheckpoint = :zero";
        update = match started {
            Some(started) => update
                .update_expression(format!("{set}, startingPosition = :sp"))
                .expression_attribute_values(":sp", s(started)),
            None => update.update_expression(format!("{set} REMOVE startingPosition")),
        };
        self.conditional("checkpoint", key, update).await
    }

    async fn release(
        &self,
        key: &str,
        worker: &str,
        counter: u64,
        to: Option<&str>,
    ) -> Result<bool, LeaseError> {
        let update = self.held_update(key, worker, counter);
        let update = match to {
            None => update.update_expression("SET leaseCounter = :next REMOVE leaseOwner, handoffTo"),
            Some(to) => update
                .condition_expression("leaseOwner = :me AND leaseCounter = :c AND handoffTo = :to")
                .update_expression(
                    "SET leaseCounter = :next, leaseOwner = :to, \
                     ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one \
                     REMOVE handoffTo",
                )
                .expression_attribute_values(":to", s(to))
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":one", n(1)),
        };
        self.conditional("release", key, update).await
    }

    async fn request_handoff(
        &self,
        key: &str,
        owner: &str,
        worker: &str,
    ) -> Result<bool, LeaseError> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(key))
            .update_expression("SET handoffTo = :me")
            .condition_expression("leaseOwner = :owner AND attribute_not_exists(handoffTo)")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":me", s(worker));
        self.conditional("request handoff", key, update).await
    }

    async fn withdraw_handoff(&self, key: &str, worker: &str) -> Result<bool, LeaseError> {
        let update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(key))
            .update_expression("REMOVE handoffTo")
            .condition_expression("handoffTo = :me")
            .expression_attribute_values(":me", s(worker));
        self.conditional("withdraw handoff", key, update).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn checkpoints_round_trip_through_the_kcl_attributes() {
        let seq: SequenceNumber = "49590338271490256608559692538361571095921575989136588898"
            .parse()
            .unwrap();
        for checkpoint in [
            Checkpoint::ShardEnd,
            Checkpoint::at(seq),
            Checkpoint::Sequence {
                sequence_number: seq,
                sub_sequence_number: Some(3),
            },
            Checkpoint::StartedAt {
                sequence_number: seq,
            },
            Checkpoint::StartedAtTime {
                timestamp_millis: 1_700_000_000_123,
            },
        ] {
            let (value, sub, started) = encode(checkpoint);
            let mut pairs = vec![
                ("checkpoint", s(value)),
                ("checkpointSubSequenceNumber", n(sub)),
            ];
            if let Some(started) = started {
                pairs.push(("startingPosition", s(started)));
            }
            assert_eq!(
                decode(&item(&pairs)),
                Ok(Some(checkpoint)),
                "{checkpoint:?}"
            );
        }
    }

    #[test]
    fn the_kcls_sentinels_and_sub_sequence_numbers_are_read_as_the_kcl_means_them() {
        let read = |checkpoint: &str, sub: i64| {
            decode(&item(&[
                ("checkpoint", s(checkpoint)),
                ("checkpointSubSequenceNumber", n(sub)),
            ]))
        };
        assert_eq!(read("SHARD_END", 0), Ok(Some(Checkpoint::ShardEnd)));
        assert_eq!(read("LATEST", 0), Ok(None));
        assert_eq!(read("AT_TIMESTAMP", 0), Ok(None));
        assert_eq!(
            read("TRIM_HORIZON", 0),
            Ok(Some(Checkpoint::StartedAtTime {
                timestamp_millis: 0
            }))
        );
        // The KCL writes sub-sequence 0 for a plain record: user record 0 of it is done.
        assert_eq!(
            read("12345", 0),
            Ok(Some(Checkpoint::Sequence {
                sequence_number: SequenceNumber::from(12345u64),
                sub_sequence_number: Some(0),
            }))
        );
        assert!(read("not-a-number", 0).is_err());
        assert!(read("12345", -1).is_err());
        assert_eq!(decode(&item(&[])), Ok(None));
    }
}
