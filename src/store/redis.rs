//! `RedisStore`: checkpoints in Redis, one hash per namespace (feature `redis`).

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use kinesis_tower_layers::checkpoint::SetOutcome;
use kinesis_tower_layers::{Checkpoint, CheckpointStore, StoreError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisError, Script};

use super::retry::with_retries;

const BACKEND: &str = "redis";
const MAX_PREFIX_LEN: usize = 128;

/// Moves a shard's checkpoint forward, atomically on the server.
///
/// `KEYS[1]`: the namespace's hash; `ARGV[1]`: the shard id; `ARGV[2]`: the new checkpoint's
/// [`Checkpoint::sort_key`]. Returns 1 when it was written, 0 when the stored one is at or past
/// it. The comparison is byte by byte: Lua's `<` on strings follows the server's collation
/// locale, which need not be byte order.
const SET_SCRIPT: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local new = ARGV[2]
  local n = math.min(#current, #new)
  local i = 1
  while i <= n and string.byte(current, i) == string.byte(new, i) do
    i = i + 1
  end
  if i > n then
    if #new <= #current then return 0 end
  elseif string.byte(new, i) < string.byte(current, i) then
    return 0
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
";

static SET: LazyLock<Script> = LazyLock::new(|| Script::new(SET_SCRIPT));

/// Checkpoints in Redis. Writes go through: each [`set`](CheckpointStore::set) is one round
/// trip that returns once the server has applied it (how durable that is depends on the
/// server's persistence settings: with `appendonly yes` and `appendfsync everysec`, at most
/// the last second is lost in a server crash, which means re-delivery, never a skipped record).
///
/// Layout: one hash per namespace, `<prefix>:<namespace>`, with one field per shard id whose
/// value is the checkpoint's [`Checkpoint::sort_key`] (`s` + the sequence number zero-padded to
/// 128 digits + `b` for a whole record or `a` + a 20-digit sub-sequence number; `z` at shard
/// end). `list` is one `HGETALL`; no `KEYS`/`SCAN` over the key space.
/// Give applications that share a server prefixes that are not `:`-extensions of each other
/// (`app` and `app:v2` could meet at `app:v2:<namespace>`).
///
/// Monotonic on the server: `set` runs a Lua script that compares the stored value with the new
/// one byte by byte (the sort key's byte order is the checkpoint order, so sequence numbers
/// compare numerically) and only then writes, atomically. Several handles or processes writing
/// the same shard can never move its checkpoint backwards.
///
/// Errors are never hidden: a `get` that cannot reach the server is an error, not "no
/// checkpoint". Connection failures, timeouts and `BUSY`/`LOADING`/`TRYAGAIN`/`CLUSTERDOWN`/
/// `MASTERDOWN`/`READONLY` answers are retried a few times with backoff, then returned with
/// [`StoreError::is_retryable`] set.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use kinesis_tower::store::RedisStore;
///
/// let store = RedisStore::connect("redis://127.0.0.1:6379/").await?;
/// // or, sharing your own connection manager:
/// let client = redis::Client::open("redis://127.0.0.1:6379/")?;
/// let manager = redis::aio::ConnectionManager::new(client).await?;
/// let store = RedisStore::new(manager, "my-app-checkpoints")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The key prefix used unless another is given.
    pub const DEFAULT_KEY_PREFIX: &'static str = "kinesis-checkpoints";

    /// Connects to the server at `url` (`redis://[user:password@]host:port/[db]`) with a
    /// [`ConnectionManager`] and the key prefix [`DEFAULT_KEY_PREFIX`](RedisStore::DEFAULT_KEY_PREFIX).
    ///
    /// The manager reconnects on its own after a lost connection (3 attempts 100 ms to 500 ms
    /// apart, each within a 1 s connect timeout; replies time out after 500 ms), and each store
    /// operation is tried up to 4 times: an outage of a second or two is bridged, a longer one
    /// surfaces as a retryable error after about five seconds. For other settings, build the
    /// manager yourself and use [`new`](RedisStore::new).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_prefix(url, Self::DEFAULT_KEY_PREFIX).await
    }

    /// Like [`connect`](RedisStore::connect) with checkpoints under `prefix` (see
    /// [`new`](RedisStore::new) for what a prefix may contain).
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self, StoreError> {
        validate_prefix(prefix)?;
        // The URL may carry a password: errors name the operation, not the URL.
        let client = redis::Client::open(url).map_err(|e| backend("open url", None, None, e))?;
        let conn = with_retries(BACKEND, "connect", || {
            let client = client.clone();
            async move {
                ConnectionManager::new_with_config(client, manager_config())
                    .await
                    .map_err(|e| backend("connect", None, None, e))
            }
        })
        .await?;
        Self::new(conn, prefix)
    }

    /// Uses an existing connection manager, with checkpoints under `prefix`: 1 to 128
    /// letters, digits and `_ . - :`, starting with a letter or digit.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Result<Self, StoreError> {
        validate_prefix(prefix)?;
        Ok(Self {
            conn,
            prefix: prefix.into(),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The connection manager.
    pub fn connection(&self) -> &ConnectionManager {
        &self.conn
    }

    /// The hash holding `namespace`'s checkpoints: `<prefix>:<namespace>`.
    pub fn key(&self, namespace: &str) -> String {
        format!("{}:{namespace}", self.prefix)
    }

    /// Deletes every checkpoint of `namespace` (the consumer then starts each shard at its
    /// configured position).
    pub async fn delete_namespace(&self, namespace: &str) -> Result<(), StoreError> {
        let key = self.key(namespace);
        with_retries(BACKEND, "delete namespace", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move {
                conn.del::<_, i64>(&key)
                    .await
                    .map(drop)
                    .map_err(|e| backend("delete namespace", Some(namespace), None, e))
            }
        })
        .await
    }
}

#[async_trait]
impl CheckpointStore for RedisStore {
    async fn get(&self, namespace: &str, shard_id: &str) -> Result<Option<Checkpoint>, StoreError> {
        let key = self.key(namespace);
        let value: Option<String> = with_retries(BACKEND, "get", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move {
                conn.hget(&key, shard_id)
                    .await
                    .map_err(|e| backend("get", Some(namespace), Some(shard_id), e))
            }
        })
        .await?;
        value
            .map(|value| parse(namespace, shard_id, &value))
            .transpose()
    }

    async fn set(
        &self,
        namespace: &str,
        shard_id: &str,
        checkpoint: Checkpoint,
    ) -> Result<SetOutcome, StoreError> {
        let key = self.key(namespace);
        let sort_key = checkpoint.sort_key();
        let written: i64 = with_retries(BACKEND, "set", || {
            let mut conn = self.conn.clone();
            let mut invocation = SET.key(&key);
            invocation.arg(shard_id).arg(&sort_key);
            async move {
                invocation
                    .invoke_async(&mut conn)
                    .await
                    .map_err(|e| backend("set", Some(namespace), Some(shard_id), e))
            }
        })
        .await?;
        Ok(if written == 1 {
            SetOutcome::Advanced
        } else {
            SetOutcome::NotAdvanced
        })
    }

    /// Every shard's checkpoint in `namespace`, sorted by shard id (one `HGETALL`).
    async fn list(&self, namespace: &str) -> Result<Vec<(String, Checkpoint)>, StoreError> {
        let key = self.key(namespace);
        let fields: Vec<(String, String)> = with_retries(BACKEND, "list", || {
            let mut conn = self.conn.clone();
            let key = key.clone();
            async move {
                conn.hgetall(&key)
                    .await
                    .map_err(|e| backend("list", Some(namespace), None, e))
            }
        })
        .await?;
        let mut out = fields
            .into_iter()
            .map(|(shard, value)| {
                let checkpoint = parse(namespace, &shard, &value)?;
                Ok((shard, checkpoint))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_millis(500))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_millis(500)))
}

fn parse(namespace: &str, shard_id: &str, value: &str) -> Result<Checkpoint, StoreError> {
    Checkpoint::from_sort_key(value).map_err(|e| StoreError::Corrupt {
        namespace: namespace.to_owned(),
        shard_id: shard_id.to_owned(),
        reason: e.to_string(),
    })
}

/// Key prefixes become part of every key: plain characters only, so that keys stay readable in
/// `redis-cli` and ACL key patterns (`~prefix:*`) can match them.
fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    let mut bytes = prefix.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_alphanumeric());
    let rest_ok =
        bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'));
    if first_ok && rest_ok && prefix.len() <= MAX_PREFIX_LEN {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "key prefix",
            name: prefix.to_owned(),
            reason: "use 1 to 128 letters, digits and '_', '.', '-', ':', starting with a letter or digit",
        })
    }
}

/// Whether the same command may succeed later: the connection failed or timed out, or the
/// server is temporarily unable to serve (a long script, loading its data, a cluster or
/// replica change-over).
fn is_retryable(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return true;
    }
    matches!(
        e.kind(),
        redis::ErrorKind::ClusterConnectionNotFound
            | redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::ClusterDown
                    | redis::ServerErrorKind::MasterDown
                    | redis::ServerErrorKind::ReadOnly
            )
    ) || matches!(e.code(), Some("BUSY"))
}

fn backend(
    operation: &'static str,
    namespace: Option<&str>,
    shard_id: Option<&str>,
    e: RedisError,
) -> StoreError {
    StoreError::Backend {
        backend: BACKEND,
        operation,
        namespace: namespace.map(str::to_owned),
        shard_id: shard_id.map(str::to_owned),
        retryable: is_retryable(&e),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_validated() {
        for ok in [
            "kinesis-checkpoints",
            "app:v2",
            "a",
            "A_b.c-d:e",
            &"x".repeat(128),
        ] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["", ":a", "-a", "a b", "a*", "a{b}", "ä", &"x".repeat(129)] {
            assert!(
                matches!(validate_prefix(bad), Err(StoreError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn transient_errors_are_retryable_and_others_are_not() {
        use std::io::{Error, ErrorKind};
        for kind in [
            ErrorKind::ConnectionRefused,
            ErrorKind::ConnectionReset,
            ErrorKind::BrokenPipe,
            ErrorKind::TimedOut,
            ErrorKind::UnexpectedEof,
        ] {
            assert!(
                is_retryable(&RedisError::from(Error::new(kind, "x"))),
                "{kind:?}"
            );
        }
        for reply in [
            "-BUSY Redis is busy running a script\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
        ] {
            let err = redis::parse_redis_value(reply.as_bytes())
                .and_then(|v| v.extract_error())
                .unwrap_err();
            assert!(is_retryable(&err), "{reply}: {err:?}");
        }
        for reply in [
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            "-NOPERM this user has no permissions\r\n",
            "-ERR Error running script\r\n",
        ] {
            let err = redis::parse_redis_value(reply.as_bytes())
                .and_then(|v| v.extract_error())
                .unwrap_err();
            assert!(!is_retryable(&err), "{reply}: {err:?}");
        }
    }

    #[test]
    fn the_script_compares_like_the_sort_key() {
        // The script's byte loop is checked against the server in tests/store_redis.rs; here
        // the premise it rests on: byte order of sort keys is checkpoint order, also across the
        // two lengths a sequence checkpoint's key can have.
        let whole = Checkpoint::at("5".parse().unwrap()).sort_key();
        let sub = Checkpoint::Sequence {
            sequence_number: "5".parse().unwrap(),
            sub_sequence_number: Some(u64::MAX),
        }
        .sort_key();
        assert_ne!(whole.len(), sub.len());
        assert!(sub.as_bytes() < whole.as_bytes());
        assert!(whole.as_bytes() < Checkpoint::ShardEnd.sort_key().as_bytes());
    }
}
