//! `DynamoDbStore`: checkpoints in a DynamoDB table (feature `dynamodb`).

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_types::date_time::Format;
use aws_smithy_types::error::display::DisplayErrorContext;
use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{BoxError, Checkpoint, CheckpointStore, StoreError};

use super::retry::with_retries;
use super::BufferedStore;
use crate::backoff::Backoff;

const BACKEND: &str = "dynamodb";
/// How long [`DynamoDbStore::create_table`] waits for the table to become ACTIVE.
const ACTIVE_DEADLINE: Duration = Duration::from_secs(300);

/// Checkpoints in a DynamoDB table.
///
/// The store itself writes through: each [`set`](CheckpointStore::set) is one conditional
/// `PutItem`. For a consumer, wrap it with [`buffered`](DynamoDbStore::buffered): checkpoints
/// are then kept in memory, coalesced per shard, and written once a second and when the run
/// ends (a crash re-delivers at most that second's records), which keeps the write cost
/// independent of the batch rate.
///
/// Monotonic in DynamoDB: the write carries the condition
/// `attribute_not_exists(namespace) OR sort_key < :new` on the checkpoint's
/// [`Checkpoint::sort_key`] (a string whose byte order is the checkpoint order; DynamoDB
/// compares strings by their UTF-8 bytes), so a write that would move a shard backwards fails
/// its condition and is reported as [`SetOutcome::NotAdvanced`], whichever process sent it.
///
/// The table ([`create_table`](DynamoDbStore::create_table) creates it, on-demand billing):
///
/// | attribute | type | |
/// |---|---|---|
/// | `namespace` | S | partition key: `<app name>/<stream name>` |
/// | `shard_id` | S | sort key |
/// | `sort_key` | S | [`Checkpoint::sort_key`]; compared by the write condition |
/// | `sequence_number` | S | decimal; absent at shard end |
/// | `sub_sequence_number` | N | KPL user record index; absent for a whole record |
/// | `shard_end` | BOOL | the shard is closed and fully processed |
/// | `updated_at` | S | RFC 3339 time of the write |
///
/// `list` is a `Query` on the namespace (paginated); reads are strongly consistent.
///
/// Errors: throttling, 5xx answers, timeouts and connection failures are retried a few times
/// with backoff (on top of the SDK's own retries), then returned with
/// [`StoreError::is_retryable`] set; a missing table is an error that says to create it.
#[derive(Clone, Debug)]
pub struct DynamoDbStore {
    client: Client,
    table: String,
    list_page_size: Option<i32>,
}

impl DynamoDbStore {
    /// The table name used unless another is given: [`DEFAULT_TABLE`](super::DEFAULT_TABLE).
    pub const DEFAULT_TABLE: &'static str = super::DEFAULT_TABLE;

    /// Uses `client` and `table` (3 to 255 letters, digits and `_ . -`). Call
    /// [`create_table`](DynamoDbStore::create_table) if it may not exist yet.
    pub fn new(client: Client, table: &str) -> Result<Self, StoreError> {
        validate_table(table)?;
        Ok(Self {
            client,
            table: table.to_owned(),
            list_page_size: None,
        })
    }

    /// Items per `Query` page in [`list`](DynamoDbStore::list) (default: DynamoDB's own
    /// limit of 1 MB per page). Values below 1 count as 1.
    pub fn list_page_size(mut self, items: i32) -> Self {
        self.list_page_size = Some(items.max(1));
        self
    }

    /// A client from `config` (region, credentials, endpoint: `AWS_ENDPOINT_URL_DYNAMODB` is
    /// honoured by `aws_config`), on `table`.
    pub fn from_sdk_config(
        config: &aws_config::SdkConfig,
        table: &str,
    ) -> Result<Self, StoreError> {
        Self::new(Client::new(config), table)
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Buffers checkpoints in memory and writes them on an interval (1 s unless
    /// [`BufferedStore::flush_interval`] says otherwise) and on `flush`: the way to use this
    /// store under a consumer.
    pub fn buffered(self) -> BufferedStore<Self> {
        BufferedStore::new(self)
    }

    /// Creates the table (on-demand billing) unless it exists, and waits until it is ACTIVE.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let created = with_retries(BACKEND, "create table", || async {
            let request = self
                .client
                .create_table()
                .table_name(&self.table)
                .billing_mode(BillingMode::PayPerRequest)
                .attribute_definitions(attribute("namespace")?)
                .attribute_definitions(attribute("shard_id")?)
                .key_schema(key("namespace", KeyType::Hash)?)
                .key_schema(key("shard_id", KeyType::Range)?);
            match request.send().await {
                Ok(_) => Ok(true),
                Err(e) if e.code() == Some("ResourceInUseException") => Ok(false),
                Err(e) => Err(self.error("create table", None, None, e)),
            }
        })
        .await?;
        tracing::debug!(table = %self.table, created, "checkpoint table ready to wait for");
        self.wait_until_active().await
    }

    async fn wait_until_active(&self) -> Result<(), StoreError> {
        wait_until_active(&self.client, &self.table).await
    }

    fn error<E>(
        &self,
        operation: &'static str,
        namespace: Option<&str>,
        shard_id: Option<&str>,
        e: SdkError<E, HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
    {
        sdk_error(&self.table, operation, namespace, shard_id, e)
    }
}

/// A DynamoDB error for an operation on the whole table.
fn table_error<E>(table: &str, operation: &'static str, e: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    sdk_error(table, operation, None, None, e)
}

/// A DynamoDB error in words, classified (retryable, missing table), with its context.
pub(crate) fn sdk_error<E>(
    table: &str,
    operation: &'static str,
    namespace: Option<&str>,
    shard_id: Option<&str>,
    e: SdkError<E, HttpResponse>,
) -> StoreError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let class = classify(&e);
    let detail = DisplayErrorContext(&e).to_string();
    let message = if class == Class::TableMissing {
        format!(
            "table {table} does not exist: create it with create_table or fix the table name, region and endpoint ({detail})"
        )
    } else {
        detail
    };
    StoreError::Backend {
        backend: BACKEND,
        operation,
        namespace: namespace.map(str::to_owned),
        shard_id: shard_id.map(str::to_owned),
        retryable: class == Class::Retryable,
        source: Box::new(DynamoError {
            message,
            source: Box::new(e),
        }),
    }
}

#[async_trait]
impl CheckpointStore for DynamoDbStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let out = with_retries(BACKEND, "get", || async {
            self.client
                .get_item()
                .table_name(&self.table)
                .consistent_read(true)
                .key("namespace", AttributeValue::S(namespace.to_owned()))
                .key("shard_id", AttributeValue::S(shard_id.to_owned()))
                .projection_expression("#sk")
                .expression_attribute_names("#sk", "sort_key")
                .send()
                .await
                .map_err(|e| self.error("get", Some(namespace), Some(shard_id), e))
        })
        .await?;
        out.item()
            .map(|item| parse(namespace, shard_id, item))
            .transpose()
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let sort_key = checkpoint.sort_key();
        let updated_at = aws_smithy_types::DateTime::from(SystemTime::now())
            .fmt(Format::DateTime)
            .unwrap_or_default();
        with_retries(BACKEND, "set", || async {
            let mut request = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("namespace", AttributeValue::S(namespace.to_owned()))
                .item("shard_id", AttributeValue::S(shard_id.to_owned()))
                .item("sort_key", AttributeValue::S(sort_key.clone()))
                .item(
                    "shard_end",
                    AttributeValue::Bool(checkpoint == Checkpoint::ShardEnd),
                )
                .item("updated_at", AttributeValue::S(updated_at.clone()))
                .condition_expression("attribute_not_exists(#ns) OR #sk < :sk")
                .expression_attribute_names("#ns", "namespace")
                .expression_attribute_names("#sk", "sort_key")
                .expression_attribute_values(":sk", AttributeValue::S(sort_key.clone()));
            if let Some(sequence_number) = checkpoint.sequence_number() {
                request = request.item(
                    "sequence_number",
                    AttributeValue::S(sequence_number.to_string()),
                );
            }
            if let Checkpoint::Sequence {
                sub_sequence_number: Some(sub),
                ..
            } = checkpoint
            {
                request = request.item("sub_sequence_number", AttributeValue::N(sub.to_string()));
            }
            match request.send().await {
                Ok(_) => Ok(SetOutcome::Advanced),
                Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                    Ok(SetOutcome::NotAdvanced)
                }
                Err(e) => Err(self.error("set", Some(namespace), Some(shard_id), e)),
            }
        })
        .await
    }

    /// Every shard's checkpoint in `namespace`, sorted by shard id (a `Query`, following its
    /// pages).
    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = with_retries(BACKEND, "list", || async {
                self.client
                    .query()
                    .table_name(&self.table)
                    .consistent_read(true)
                    .key_condition_expression("#ns = :ns")
                    .projection_expression("#sid, #sk")
                    .expression_attribute_names("#ns", "namespace")
                    .expression_attribute_names("#sid", "shard_id")
                    .expression_attribute_names("#sk", "sort_key")
                    .expression_attribute_values(":ns", AttributeValue::S(namespace.to_owned()))
                    .set_exclusive_start_key(start.clone())
                    .set_limit(self.list_page_size)
                    .send()
                    .await
                    .map_err(|e| self.error("list", Some(namespace), None, e))
            })
            .await?;
            for item in page.items() {
                let shard = match item.get("shard_id") {
                    Some(AttributeValue::S(s)) => s.clone(),
                    _ => {
                        return Err(StoreError::Corrupt {
                            namespace: namespace.to_owned(),
                            shard_id: String::new(),
                            reason: "an item without a string shard_id".to_owned(),
                        })
                    }
                };
                let checkpoint = parse(namespace, &shard, item)?;
                out.push((shard, checkpoint));
            }
            match page.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A DynamoDB error in words (the SDK's own `Display` says only "service error"), with the
/// SDK error as its source.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct DynamoError {
    message: String,
    source: BoxError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Retryable,
    TableMissing,
    Permanent,
}

/// Error codes that mean "not now": throttling, capacity, conflicts, server-side failures.
const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "LimitExceededException",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "TransactionConflictException",
    "ReplicatedWriteConflictException",
    "TransactionInProgressException",
];

fn classify<E>(e: &SdkError<E, HttpResponse>) -> Class
where
    E: ProvideErrorMetadata,
{
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Class::Retryable,
        SdkError::DispatchFailure(failure) => {
            if failure.is_user() {
                Class::Permanent
            } else {
                Class::Retryable
            }
        }
        SdkError::ServiceError(service) => match service.err().code() {
            Some("ResourceNotFoundException") => Class::TableMissing,
            Some(code) if RETRYABLE_CODES.contains(&code) => Class::Retryable,
            _ if service.raw().status().is_server_error() => Class::Retryable,
            _ => Class::Permanent,
        },
        _ => Class::Permanent,
    }
}

/// Waits until `table` is ACTIVE (for up to five minutes).
pub(crate) async fn wait_until_active(client: &Client, table: &str) -> Result<(), StoreError> {
    let deadline = Instant::now() + ACTIVE_DEADLINE;
    // Polls for a state, not a retry of a failure (describe table retries its own).
    let mut polls = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let status = with_retries(BACKEND, "describe table", || async {
            client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map(|out| out.table().and_then(|t| t.table_status().cloned()))
                .map_err(|e| table_error(table, "describe table", e))
        })
        .await?;
        if status == Some(TableStatus::Active) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StoreError::Backend {
                backend: BACKEND,
                operation: "create table",
                namespace: None,
                shard_id: None,
                retryable: true,
                source: format!(
                    "table {} is still {status:?} after {ACTIVE_DEADLINE:?}; try again later",
                    table
                )
                .into(),
            });
        }
        tokio::time::sleep(polls.next_delay()).await;
    }
}

fn parse(
    namespace: &str,
    shard_id: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<Checkpoint, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        namespace: namespace.to_owned(),
        shard_id: shard_id.to_owned(),
        reason,
    };
    match item.get("sort_key") {
        Some(AttributeValue::S(key)) => {
            Checkpoint::from_sort_key(key).map_err(|e| corrupt(e.to_string()))
        }
        _ => Err(corrupt(
            "the item has no string attribute sort_key".to_owned(),
        )),
    }
}

fn attribute(name: &str) -> Result<AttributeDefinition, StoreError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| build_error("create table", e))
}

fn key(name: &str, kind: KeyType) -> Result<KeySchemaElement, StoreError> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| build_error("create table", e))
}

fn build_error(operation: &'static str, e: impl StdError + Send + Sync + 'static) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        operation,
        namespace: None,
        shard_id: None,
        retryable: false,
        source: Box::new(e),
    }
}

/// DynamoDB's own rule for table names.
pub(crate) fn validate_table(table: &str) -> Result<(), StoreError> {
    let ok = (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "table name",
            name: table.to_owned(),
            reason: "use 3 to 255 letters, digits and '_', '.', '-'",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_dynamodb::operation::put_item::PutItemError;
    use aws_smithy_types::body::SdkBody;

    fn service(code: &str, status: u16) -> SdkError<PutItemError, HttpResponse> {
        SdkError::service_error(
            PutItemError::generic(ErrorMetadata::builder().code(code).message("m").build()),
            HttpResponse::new(status.try_into().unwrap(), SdkBody::empty()),
        )
    }

    #[test]
    fn errors_are_classified() {
        for code in [
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
            "RequestLimitExceeded",
            "InternalServerError",
        ] {
            assert_eq!(classify(&service(code, 400)), Class::Retryable, "{code}");
        }
        assert_eq!(classify(&service("Whatever", 503)), Class::Retryable);
        assert_eq!(
            classify(&service("ResourceNotFoundException", 400)),
            Class::TableMissing
        );
        for code in ["ValidationException", "AccessDeniedException"] {
            assert_eq!(classify(&service(code, 400)), Class::Permanent, "{code}");
        }
        let timeout: SdkError<PutItemError, HttpResponse> =
            SdkError::timeout_error("operation timed out");
        assert_eq!(classify(&timeout), Class::Retryable);
        let io: SdkError<PutItemError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::io(Box::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused,
            ))));
        assert_eq!(classify(&io), Class::Retryable);
        let user: SdkError<PutItemError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::user("bad endpoint".into()));
        assert_eq!(classify(&user), Class::Permanent);
    }

    #[test]
    fn table_names_follow_dynamodb_rules() {
        for ok in ["abc", "kinesis_checkpoints", "A.b-c_9", &"x".repeat(255)] {
            validate_table(ok).unwrap();
        }
        for bad in ["", "ab", "a b", "tab/le", "ä-table", &"x".repeat(256)] {
            assert!(
                matches!(validate_table(bad), Err(StoreError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }
}
