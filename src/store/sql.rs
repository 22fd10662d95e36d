//! What the Postgres and MySQL stores share: table-name validation and quoting, the columns a
//! checkpoint is written as, reading one back, and turning sqlx errors into [`StoreError`]s.

use kinesis_tower_layers::{Checkpoint, StoreError};

/// The table name used unless another is given.
pub const DEFAULT_TABLE: &str = "kinesis_checkpoints";

/// Validates `name` (`table` or `schema.table`; each part 1 to 63 letters, digits and `_`,
/// starting with a letter or `_`) and returns it quoted with `quote` (`"` or `` ` ``), so the
/// exact name is used (case included) and no keyword can clash.
///
/// Table names are spliced into SQL (they cannot be bound), so nothing else passes.
pub(crate) fn quote_table(name: &str, quote: char) -> Result<String, StoreError> {
    let part_ok = |part: &str| {
        let mut bytes = part.bytes();
        bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && part.len() <= 63
            && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err(StoreError::InvalidName {
            what: "table name",
            name: name.to_owned(),
            reason: "use `table` or `schema.table`, each part 1 to 63 letters, digits and '_', \
                     starting with a letter or '_'",
        });
    }
    Ok(parts
        .iter()
        .map(|p| format!("{quote}{p}{quote}"))
        .collect::<Vec<_>>()
        .join("."))
}

/// A checkpoint as the columns beside its sort key: the decimal sequence number (`None` at shard
/// end), the sub-sequence number and the shard-end flag.
pub(crate) struct Columns {
    /// `Checkpoint::sort_key`: the column the server compares.
    pub(crate) sort_key: String,
    /// Decimal sequence number; `None` at shard end.
    pub(crate) sequence_number: Option<String>,
    /// KPL sub-sequence number.
    pub(crate) sub_sequence_number: Option<u64>,
    /// Whether this is `Checkpoint::ShardEnd`.
    pub(crate) shard_end: bool,
}

impl Columns {
    pub(crate) fn of(checkpoint: &Checkpoint) -> Self {
        let (sequence_number, sub_sequence_number, shard_end) = match checkpoint {
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            } => (
                Some(sequence_number.to_string()),
                *sub_sequence_number,
                false,
            ),
            Checkpoint::ShardEnd => (None, None, true),
        };
        Self {
            sort_key: checkpoint.sort_key(),
            sequence_number,
            sub_sequence_number,
            shard_end,
        }
    }
}

/// Reads a stored sort key back; anything else than a key this library wrote is
/// [`StoreError::Corrupt`], never "no checkpoint".
pub(crate) fn parse_sort_key(
    namespace: &str,
    shard_id: &str,
    key: &str,
) -> Result<Checkpoint, StoreError> {
    Checkpoint::from_sort_key(key).map_err(|e| StoreError::Corrupt {
        namespace: namespace.to_owned(),
        shard_id: shard_id.to_owned(),
        reason: e.to_string(),
    })
}

/// Classifies sqlx errors for one back-end: `database` decides for errors the server sent.
#[derive(Clone, Copy)]
pub(crate) struct ErrorKind {
    /// `postgres` or `mysql`.
    pub(crate) backend: &'static str,
    /// Whether an error the server reported may succeed when tried again.
    pub(crate) database: fn(&dyn sqlx::error::DatabaseError) -> bool,
}

impl ErrorKind {
    /// Whether trying again may succeed: connection failures (refused, reset, closed by the
    /// server), pool timeouts, and what `database` says of server errors.
    pub(crate) fn is_retryable(&self, e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => (self.database)(db.as_ref()),
            _ => false,
        }
    }

    /// A `StoreError::Backend` for an operation without a shard.
    pub(crate) fn error(&self, operation: &'static str, e: sqlx::Error) -> StoreError {
        StoreError::Backend {
            backend: self.backend,
            operation,
            namespace: None,
            shard_id: None,
            retryable: self.is_retryable(&e),
            source: Box::new(e),
        }
    }

    /// A `StoreError::Backend` naming the namespace and, when there is one, the shard.
    pub(crate) fn error_for(
        &self,
        operation: &'static str,
        namespace: &str,
        shard_id: Option<&str>,
        e: sqlx::Error,
    ) -> StoreError {
        StoreError::Backend {
            backend: self.backend,
            operation,
            namespace: Some(namespace.to_owned()),
            shard_id: shard_id.map(str::to_owned),
            retryable: self.is_retryable(&e),
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(
            quote_table("kinesis_checkpoints", '"').unwrap(),
            "\"kinesis_checkpoints\""
        );
        assert_eq!(
            quote_table("ops.Checkpoints_2", '`').unwrap(),
            "`ops`.`Checkpoints_2`"
        );
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "x; DROP TABLE y",
            "1abc",
            "a-b",
            "a\"b",
            "a`b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            let err = quote_table(bad, '"').unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidName { .. }),
                "{bad}: {err}"
            );
        }
        assert!(quote_table(&"a".repeat(63), '`').is_ok());
    }

    #[test]
    fn columns_of_each_kind_of_checkpoint() {
        let c = Columns::of(&Checkpoint::Sequence {
            sequence_number: "0042".parse().unwrap(),
            sub_sequence_number: Some(7),
        });
        assert_eq!(c.sequence_number.as_deref(), Some("42"));
        assert_eq!(c.sub_sequence_number, Some(7));
        assert!(!c.shard_end);
        let end = Columns::of(&Checkpoint::ShardEnd);
        assert_eq!((end.sequence_number, end.shard_end), (None, true));
        assert_eq!(end.sort_key, "z");
    }

    #[test]
    fn garbage_sort_keys_are_corrupt_not_missing() {
        let err = parse_sort_key("ns", "s", "garbage").unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}
