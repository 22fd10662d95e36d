//! Building and running the crate's examples as child processes against an emulator.

use std::path::PathBuf;
use std::process::Command;

/// Builds example `name` with this test's features and profile into this test's target dir
/// and returns its path (the target dir may be shared by several checkouts: build, don't
/// guess).
pub fn build(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test binary>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in <target>/<profile>/deps");
    let target_dir = profile_dir.parent().expect("<target>/<profile>");
    let features: Vec<&str> = [
        ("postgres", cfg!(feature = "postgres")),
        ("sqlite", cfg!(feature = "sqlite")),
        ("mysql", cfg!(feature = "mysql")),
        ("redis", cfg!(feature = "redis")),
        ("dynamodb", cfg!(feature = "dynamodb")),
        ("test-util", cfg!(feature = "test-util")),
        ("lambda", cfg!(feature = "lambda")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--example", name, "--features"])
        .arg(features.join(","))
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("run cargo build --example");
    assert!(status.success(), "cargo build --example {name} failed");
    let example = profile_dir.join("examples").join(name);
    assert!(example.exists(), "{} was built", example.display());
    example
}

/// A command for `example` that reaches only the emulator at `endpoint` (127.0.0.1), with
/// test credentials and region, as a user's environment would give them.
pub fn command(example: &PathBuf, endpoint: &str) -> Command {
    let mut command = Command::new(example);
    command
        .env("AWS_ENDPOINT_URL_KINESIS", endpoint)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    command
}
