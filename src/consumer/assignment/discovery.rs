//! Discovery: listing the stream's shards (every page, with retries) and checking the first
//! listing against the start position.

use crate::backoff::Backoff;
use crate::consumer::handle::Shared;
use crate::consumer::settings::StartPosition;
use crate::kinesis::{timed, KinesisError, ShardDescription};
use crate::retrying::retry;
use crate::Error;

/// Retries of one listing before it waits for the next refresh tick.
const LISTING_RETRIES: u32 = 5;

/// One complete ListShards (every page), retried as a whole. `Err` with the last error after
/// repeated transient failures (the next refresh tries again; running shards are not
/// affected); `Ok(Err)` for errors that retrying will not fix.
pub(crate) async fn list_shards(
    shared: &Shared,
) -> Result<Result<Vec<ShardDescription>, Error>, KinesisError> {
    let settings = &shared.settings;
    let listing = retry(
        &mut Backoff::new(settings.backoff_base, settings.backoff_max),
        LISTING_RETRIES,
        KinesisError::is_retryable,
        |error, delay, _| tracing::warn!(%error, ?delay, "ListShards failed; backing off"),
        || every_page(shared),
    )
    .await;
    match listing {
        Ok(shards) => {
            tracing::debug!(shards = shards.len(), "listed shards");
            Ok(Ok(shards))
        }
        Err(error) if error.is_retryable() => {
            tracing::warn!(%error, "ListShards keeps failing; trying again at the next refresh");
            Err(error)
        }
        Err(error) => Ok(Err(Error::from_kinesis(
            settings.stream.stream_name(),
            None,
            error,
        ))),
    }
}

/// Every page of one ListShards; the first error ends it.
async fn every_page(shared: &Shared) -> Result<Vec<ShardDescription>, KinesisError> {
    let settings = &shared.settings;
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
        .await?;
        shards.extend(page.shards);
        match page.next_token {
            Some(next) => token = Some(next),
            None => return Ok(shards),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kinesis_tower_layers::{Batch, BoxError};
    use tower::service_fn;

    use super::LISTING_RETRIES;
    use crate::kinesis::memory::{MemoryKinesis, Operation};
    use crate::kinesis::KinesisErrorKind;
    use crate::{Consumer, Error, StartPosition};

    /// The first listing is tried `LISTING_RETRIES` more times after it failed, and no more:
    /// one failure more and the consumer does not start.
    #[tokio::test(start_paused = true)]
    async fn a_failing_listing_is_retried_listing_retries_times() {
        for (failures, starts) in [(LISTING_RETRIES, true), (LISTING_RETRIES + 1, false)] {
            let kinesis = MemoryKinesis::with_shards(1);
            let failures = failures as usize;
            kinesis.inject(
                None,
                Operation::ListShards,
                KinesisErrorKind::Transient,
                failures,
            );
            let consumer = Consumer::builder()
                .kinesis_api(Arc::new(kinesis))
                .stream_name("test-stream")
                .app_name("tests")
                .start_position(StartPosition::TrimHorizon)
                .build()
                .unwrap();
            let handler = service_fn(|_: Batch| async { Ok::<_, BoxError>(()) });
            let stop = tokio::time::sleep(Duration::from_secs(60));
            let result = consumer.run_until(handler, stop).await;
            if starts {
                result.unwrap();
            } else {
                let err = result.unwrap_err();
                assert!(matches!(&err, Error::Kinesis { .. }), "{err:?}");
                assert!(err.is_retryable(), "{err:?}");
            }
        }
    }
}
