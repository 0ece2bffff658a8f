//! Ordered migrations from `sql/migrations`, each applied under a transaction's advisory lock.

use super::{sql, Store};
use crate::error::StoreError;

/// Every migration, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "0001_outbox",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0001_outbox.sql"
        )),
    ),
    (
        2,
        "0002_alerts",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0002_alerts.sql"
        )),
    ),
    (
        3,
        "0003_progress_failed",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0003_progress_failed.sql"
        )),
    ),
    (
        4,
        "0004_lease_fence",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0004_lease_fence.sql"
        )),
    ),
    (
        5,
        "0005_pipelines",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0005_pipelines.sql"
        )),
    ),
    (
        6,
        "0006_pipeline_backfills",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0006_pipeline_backfills.sql"
        )),
    ),
    (
        7,
        "0007_error_groups",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0007_error_groups.sql"
        )),
    ),
    (
        8,
        "0008_dashboard",
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/migrations/0008_dashboard.sql"
        )),
    ),
];

pub(super) fn latest_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

impl Store {
    /// Applies the migrations not yet recorded, each in its own transaction. Safe to run from
    /// several replicas at once: each transaction first takes an advisory lock, and the later
    /// replicas find nothing left to do. Returns the names applied now.
    pub async fn migrate(&self) -> Result<Vec<&'static str>, StoreError> {
        let mut client = self.client().await?;
        let ctx = "applying migrations";
        let mut done = Vec::new();
        loop {
            let tx = client
                .transaction()
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            tx.query_one(sql!("migration_lock"), &[])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            tx.batch_execute(sql!("migration_table"))
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            let applied: Vec<i32> = tx
                .query(sql!("migration_applied"), &[])
                .await
                .map_err(|e| StoreError::db(ctx, e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            let Some((version, name, text)) =
                MIGRATIONS.iter().find(|(v, _, _)| !applied.contains(v))
            else {
                tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
                return Ok(done);
            };
            tx.batch_execute(text).await.map_err(|e| StoreError::Db {
                context: "applying migration",
                message: format!("{name}: {}", crate::error::describe_pg_error(&e)),
                code: e.code().map(|c| c.code().to_string()),
            })?;
            tx.execute(sql!("migration_record"), &[version, name])
                .await
                .map_err(|e| StoreError::db(ctx, e))?;
            tx.commit().await.map_err(|e| StoreError::db(ctx, e))?;
            done.push(*name);
        }
    }
}
