//! Discovery: listing the stream's shards (every page, with retries) and checking the first
//! listing against the start position.

use crate::backoff::Backoff;
use crate::consumer::handle::Shared;
use crate::consumer::settings::StartPosition;
use crate::kinesis::{timed, KinesisError, ShardDescription};
use crate::Error;

/// Attempts of one listing before it waits for the next refresh tick.
const LISTING_ATTEMPTS: u32 = 5;

/// One complete ListShards (every page). `Err` with the last error after repeated transient
/// failures (the next refresh tries again; running shards are not affected); `Ok(Err)` for
/// errors that retrying will not fix.
pub(crate) async fn list_shards(
    shared: &Shared,
) -> Result<Result<Vec<ShardDescription>, Error>, KinesisError> {
    let settings = &shared.settings;
    let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_max);
    'attempt: loop {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = timed(
                "ListShards",
                shared.api.list_shards(
                    &settings.stream,
                    token.as_deref(),
                    settings.list_shards_page_size,
                ),
            )
            .await;
            match page {
                Ok(page) => {
                    shards.extend(page.shards);
                    match page.next_token {
                        Some(next) => token = Some(next),
                        None => {
                            tracing::debug!(shards = shards.len(), "listed shards");
                            return Ok(Ok(shards));
                        }
                    }
                }
                Err(e) if e.is_retryable() => {
                    if backoff.attempts() >= LISTING_ATTEMPTS {
                        tracing::warn!(error = %e, "ListShards keeps failing; trying again at the next refresh");
                        return Err(e);
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "ListShards failed; backing off");
                    tokio::time::sleep(delay).await;
                    continue 'attempt;
                }
                Err(e) => {
                    return Ok(Err(Error::from_kinesis(
                        settings.stream.stream_name(),
                        None,
                        e,
                    )))
                }
            }
        }
    }
}

/// A sequence-number start position must name a shard of the stream, unless that shard has a
/// checkpoint already: the start position only applies where there is none, so a shard that
/// was read and has since expired is no reason to stop.
pub(crate) async fn check_start_shard(
    shared: &Shared,
    listing: &[ShardDescription],
) -> Result<(), Error> {
    let settings = &shared.settings;
    let shard = match &settings.start_position {
        StartPosition::AtSequenceNumber { shard_id, .. }
        | StartPosition::AfterSequenceNumber { shard_id, .. } => shard_id,
        _ => return Ok(()),
    };
    if listing.iter().any(|s| &s.shard_id == shard) {
        return Ok(());
    }
    let stored = shared
        .checkpointer
        .get(shard)
        .await
        .map_err(|source| Error::Store {
            stream: settings.stream.stream_name().to_owned(),
            shard: Some(shard.to_string()),
            source: Box::new(source),
        })?;
    if stored.is_some() {
        Ok(())
    } else {
        Err(Error::config(
            "start_position",
            format!(
                "shard {shard} of the sequence-number start position is not a shard of stream {}",
                settings.stream.stream_name()
            ),
        ))
    }
}
