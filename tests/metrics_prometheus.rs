//! Every documented metric reaches Prometheus with its `stream` and `shard` labels: a consumer
//! with a `MetricsLayer` reads an embedded ferrokinesis stream while the Prometheus exporter
//! (installed in this process, listening on 127.0.0.1) serves `/metrics`, which is scraped with
//! a plain HTTP GET.
//!
//! A process has one global recorder: this file holds this one test only.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kinesis_tower::checkpoint::CheckpointLayer;
use kinesis_tower::metrics::MetricsLayer;
use kinesis_tower::{metric_names, Consumer, StartPosition};
use kinesis_tower::{Batch, BoxError};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tower::{service_fn, ServiceBuilder};

const RECORDS: usize = 300;
const SHARDS: i32 = 2;

/// Installs the exporter on a free port of 127.0.0.1; returns the port.
fn install_exporter() -> u16 {
    for _ in 0..5 {
        // Ask the system for a free port, then let the exporter bind it; another process may
        // take it in between, so try again on a bind failure.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        let installed = PrometheusBuilder::new()
            .with_http_listener(([127, 0, 0, 1], port))
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &[0.001, 0.01, 0.1, 1.0])
            .expect("buckets")
            .install();
        match installed {
            Ok(()) => return port,
            Err(BuildError::FailedToCreateHTTPListener(e)) => {
                eprintln!("port {port} taken ({e}); trying another");
            }
            Err(e) => panic!("installing the Prometheus exporter: {e}"),
        }
    }
    panic!("no free port for the Prometheus exporter after 5 tries");
}

/// `GET /metrics` over a plain TCP connection (HTTP/1.0: the answer is not chunked).
async fn scrape(port: u16) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the exporter");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send the request");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("read the answer");
    let answer = String::from_utf8(answer).expect("a UTF-8 answer");
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

/// One sample line: `name{k="v",...} value`.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn samples(body: &str) -> Vec<Sample> {
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("k=\"v\"");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_scraped_with_stream_and_shard_labels() {
    let port = install_exporter();
    metric_names::describe();

    let kinesis = common::start_ferrokinesis().await;
    let stream = common::unique_stream_name("metrics");
    common::create_stream(&kinesis.client, &stream, SHARDS).await;
    let records: Vec<(String, Vec<u8>)> = (0..RECORDS)
        .map(|i| (format!("pk-{i}"), format!("record {i}").into_bytes()))
        .collect();
    let put = common::put_records(&kinesis.client, &stream, &records).await;
    let bytes: usize = records.iter().map(|(k, d)| k.len() + d.len()).sum();
    let shards: Vec<String> = {
        let mut s: Vec<String> = put.iter().map(|(shard, _)| shard.clone()).collect();
        s.sort();
        s.dedup();
        s
    };

    let consumer = Consumer::builder()
        .client(kinesis.client.clone())
        .stream_name(&stream)
        .app_name("metrics-test")
        .start_position(StartPosition::TrimHorizon)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let handler = service_fn({
        let handled = handled.clone();
        move |batch: Batch| {
            handled.fetch_add(batch.len() as u64, Ordering::SeqCst);
            async { Ok::<_, BoxError>(()) }
        }
    });
    let service = ServiceBuilder::new()
        .layer(MetricsLayer::new(consumer.stream_name()))
        .layer(CheckpointLayer::new(consumer.checkpointer()))
        .service(handler);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run_until(service, stop.cancelled_owned()).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while handled.load(Ordering::SeqCst) < RECORDS as u64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handled {} of {RECORDS} records in 60 s",
            handled.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();

    let body = scrape(port).await;
    let samples = samples(&body);
    let of_stream = |name: &str| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.name == name && s.labels.get("stream") == Some(&stream))
            .collect()
    };
    for name in metric_names::ALL {
        // Histograms are exported as `<name>_bucket`, `<name>_sum` and `<name>_count`.
        let series = if name.ends_with("_seconds") {
            format!("{name}_count")
        } else {
            name.to_owned()
        };
        let found = of_stream(&series);
        for shard in &shards {
            assert!(
                found
                    .iter()
                    .any(|s| s.labels.get("shard").map(String::as_str) == Some(shard)),
                "no {series} with stream={stream} shard={shard} in:\n{body}"
            );
        }
        assert!(
            found.iter().all(|s| s.value.is_finite()),
            "{series}: {body}"
        );
    }
    let total = |name: &str| -> f64 { of_stream(name).iter().map(|s| s.value).sum() };
    assert_eq!(total(metric_names::RECORDS_READ_TOTAL), RECORDS as f64);
    assert_eq!(total(metric_names::BYTES_READ_TOTAL), bytes as f64);
    assert_eq!(total(metric_names::HANDLER_RECORDS_TOTAL), RECORDS as f64);
    assert_eq!(total(metric_names::HANDLER_BYTES_TOTAL), bytes as f64);
    assert_eq!(total(metric_names::HANDLER_ERRORS_TOTAL), 0.0);
    assert_eq!(
        total(&format!("{}_count", metric_names::HANDLER_DURATION_SECONDS)),
        total(metric_names::HANDLER_CALLS_TOTAL)
    );
    assert_eq!(
        total(metric_names::CHECKPOINTS_WRITTEN_TOTAL),
        total(metric_names::HANDLER_CALLS_TOTAL)
    );
    assert!(
        total(metric_names::GET_RECORDS_CALLS_TOTAL) >= SHARDS as f64,
        "{body}"
    );
    assert!(
        body.contains(&format!("# HELP {}", metric_names::RECORDS_READ_TOTAL)),
        "descriptions are exported: {body}"
    );

    common::delete_stream(&kinesis.client, &stream).await;
}
