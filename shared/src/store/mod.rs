//! The one type that talks to PostgreSQL. Every statement lives in `sql/`.

mod batch;
mod migrate;
mod record;
mod transactional;

pub use batch::Progress;
pub use transactional::{is_retryable_sqlstate, StatementFailure, TransactionalResult};

use crate::error::{describe_pg_error, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::str::FromStr;
use std::time::Duration;

/// A named statement from `sql/queries/`.
macro_rules! sql {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../sql/queries/",
            $name,
            ".sql"
        ))
    };
}
pub(crate) use sql;

/// How long a connection attempt may take before it counts as unreachable.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Subscribes a session to the channel on which `prepare`, `retry-failed` and the rescuer
/// announce work (the notification's payload is the queue).
pub const LISTEN_WORK: &str = sql!("listen_work");

/// A pool of connections to one Tally database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: tokio_postgres::Config,
    target: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish()
    }
}

impl Store {
    /// Connects and checks that the server answers. `max_connections` bounds the pool.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Store, StoreError> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| StoreError::BadUrl(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tally");
        }
        // Fail a dead peer's connection in seconds rather than hanging for the OS default.
        config.keepalives_idle(Duration::from_secs(10));
        let target = describe_target(&config);
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections.max(1))
            .build()
            .map_err(|e| StoreError::BadUrl(e.to_string()))?;
        let store = Store {
            pool,
            config,
            target,
        };
        drop(store.client().await?);
        Ok(store)
    }

    /// `user@host:port/database`, never the password: for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The parsed connection settings (for a dedicated LISTEN connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.connect_error(e))
    }

    fn connect_error(&self, err: deadpool_postgres::PoolError) -> StoreError {
        let (reason, hint, transient) = match &err {
            deadpool_postgres::PoolError::Backend(e) => classify_connect_error(e),
            deadpool_postgres::PoolError::Timeout(_) => (
                "timed out waiting for a connection".to_string(),
                "check that the server is up and reachable",
                true,
            ),
            other => (other.to_string(), "check DATABASE_URL", false),
        };
        StoreError::Connect {
            target: self.target.clone(),
            reason,
            hint,
            transient,
        }
    }

    /// Fails unless `coordinator migrate` has brought the schema up to this build's version.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let exists: bool = client
            .query_one(sql!("schema_exists"), &[])
            .await
            .map_err(|e| StoreError::db("checking the schema", e))?
            .get(0);
        if !exists {
            return Err(StoreError::SchemaMissing {
                target: self.target.clone(),
            });
        }
        let found: i32 = client
            .query_one(sql!("schema_version"), &[])
            .await
            .map_err(|e| StoreError::db("checking the schema", e))?
            .get(0);
        let needed = migrate::latest_version();
        if found < needed {
            return Err(StoreError::SchemaOutdated {
                target: self.target.clone(),
                found,
                needed,
            });
        }
        Ok(())
    }
}

fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("?");
    let db = config.get_dbname().unwrap_or(user);
    format!("{user}@{host}:{port}/{db}")
}

fn classify_connect_error(err: &tokio_postgres::Error) -> (String, &'static str, bool) {
    let reason = describe_pg_error(err);
    match err.code().map(|c| c.code()) {
        Some("28P01") | Some("28000") => {
            (reason, "check the user and password in DATABASE_URL", false)
        }
        Some("3D000") => (
            reason,
            "create the database or fix its name in DATABASE_URL",
            false,
        ),
        Some("53300") => (
            reason,
            "the server has no free connection slots; retry or raise max_connections",
            true,
        ),
        Some(code) if code.starts_with("57P") => {
            (reason, "the server is starting up or shutting down", true)
        }
        _ if reason.contains("refused") || reason.contains("timed out") => (
            reason,
            "is the server running and reachable? Set --database-url or DATABASE_URL",
            true,
        ),
        _ => (reason, "check --database-url / DATABASE_URL", true),
    }
}
