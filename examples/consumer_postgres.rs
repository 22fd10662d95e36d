//! Prints every record of a Kinesis stream, with checkpoints in PostgreSQL, until Ctrl-C.
//!
//! ```text
//! cargo run --example consumer_postgres --features postgres -- STREAM [DATABASE_URL]
//! ```
//!
//! The checkpoints go to the `kinesis_checkpoints` table (created if missing), buffered in
//! memory and written once a second and when the run ends. Run it again: it resumes after the
//! last checkpoint. The URL defaults to `DATABASE_URL`, else the local test server; AWS
//! settings come from the environment (`source scripts/env.sh` for the local emulator).

#[path = "support/printing.rs"]
mod printing;

use kinesis_tower::store::PostgresStore;
use kinesis_tower::BoxError;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (stream, url) = printing::args(
        "consumer_postgres STREAM [DATABASE_URL]",
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/test",
    )?;
    let store = PostgresStore::connect(&url).await?.buffered();
    printing::print_records(&stream, "consumer-postgres", store).await
}
