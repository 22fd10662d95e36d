//! Prints every record of a Kinesis stream, with checkpoints in MySQL or MariaDB, until
//! Ctrl-C.
//!
//! ```text
//! cargo run --example consumer_mysql --features mysql -- STREAM [DATABASE_URL]
//! ```
//!
//! The checkpoints go to the `kinesis_checkpoints` table (created if missing), buffered in
//! memory and written once a second and when the run ends. Run it again: it resumes after the
//! last checkpoint. The URL defaults to `DATABASE_URL`, else the local test server; AWS
//! settings come from the environment (`source scripts/env.sh` for the local emulator).

#[path = "support/printing.rs"]
mod printing;

use clap::Parser;
use kinesis_tower::store::MySqlStore;

/// Prints every record of a Kinesis stream (shard, sequence number, data), with checkpoints in
/// MySQL or MariaDB, until Ctrl-C; a second run resumes after them.
#[derive(Parser)]
struct Args {
    /// The stream
    stream: String,

    /// MySQL or MariaDB URL
    #[arg(
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let store = MySqlStore::connect(&args.database_url).await?.buffered();
    printing::print_records(&args.stream, "consumer-mysql", store).await
}
