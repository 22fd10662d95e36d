//! The handler stack of `examples/support/orders.rs` as an AWS Lambda function of a Kinesis
//! event source mapping (with `FunctionResponseTypes: ["ReportBatchItemFailures"]`). A record
//! that fails makes the function answer with that record, so Lambda retries from there.
//!
//! Build it for Lambda with `cargo lambda build --release --example lambda --features lambda`;
//! `tests/lambda.rs` runs it against a local Runtime API, and the same stack under
//! `Consumer::run`.
use kinesis_tower::lambda::LambdaLayer;
use tower::Layer;

#[path = "support/orders.rs"]
mod orders;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // Where a consumer puts CheckpointLayer: Lambda keeps the position, the answer moves it.
    let function = LambdaLayer::new().layer(orders::stack("orders", orders::print));
    lambda_runtime::run(function).await
}
