//! What the consumer-group scenario tests share: the two lease back-ends that run here
//! (dynalite on 127.0.0.1:4568, PostgreSQL on 127.0.0.1:5432), a fresh lease table for each
//! scenario and its removal, and `both_backends!`, which runs each scenario on both.
#![allow(dead_code, unused_macros)]

use std::sync::Arc;

use kinesis_tower::group::{DynamoDbLeases, LeaseBackend, PostgresLeases};

use crate::common;

/// Where a scenario keeps its leases.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    DynamoDb,
    Postgres,
}

impl Backend {
    /// The lease table of `group` (a DynamoDB table of that name, or that group's rows in the
    /// Postgres lease table), created if missing.
    pub async fn leases(self, group: &str) -> Arc<dyn LeaseBackend> {
        match self {
            Backend::DynamoDb => {
                let leases = DynamoDbLeases::new(common::dynamodb_client().await, group).unwrap();
                leases.create_table().await.unwrap();
                Arc::new(leases)
            }
            Backend::Postgres => {
                let leases = PostgresLeases::connect(&common::postgres_url(), group)
                    .await
                    .unwrap();
                leases.create_table().await.unwrap();
                Arc::new(leases)
            }
        }
    }

    /// Removes what [`Backend::leases`] made for `group`.
    pub async fn drop_leases(self, group: &str) {
        match self {
            Backend::DynamoDb => {
                let _ = common::dynamodb_client()
                    .await
                    .delete_table()
                    .table_name(group)
                    .send()
                    .await;
            }
            Backend::Postgres => {
                if let Ok(pool) = sqlx::PgPool::connect(&common::postgres_url()).await {
                    let _ = sqlx::query("DELETE FROM kinesis_leases WHERE group_name = $1")
                        .bind(group)
                        .execute(&pool)
                        .await;
                }
            }
        }
    }
}

/// One `#[tokio::test]` per scenario and back-end (`#[macro_use] mod group_common;`): `dynamodb::<scenario>` and
/// `postgres::<scenario>`, each calling `<scenario>(Backend)`.
macro_rules! both_backends {
    ($($scenario:ident),*) => {
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::group_common::Backend::DynamoDb).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario($crate::group_common::Backend::Postgres).await;
                }
            )*
        }
    };
}
