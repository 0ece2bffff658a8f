//! The one type that talks to PostgreSQL. Every statement lives in `sql/`.

pub mod alerts;
mod batch;
mod connect;
pub mod dashboard;
mod load;
mod migrate;
mod observe;
pub mod pipeline;
mod prepare;
pub mod progress;
mod record;
mod transactional;

pub use connect::{
    ConnectOptions, SslMode, DEFAULT_SSLMODE, ENV_DATABASE_URL, ENV_DATABASE_URL_FILE,
    ENV_DB_CA_FILE, ENV_DB_SSLMODE, ENV_PGBOUNCER, ENV_PGPASSWORD,
};
pub use load::Progress;
pub use prepare::{PrepareInput, PreparePolicy, DEFAULT_LOCK_WAIT, DEFAULT_RETRY_FOR};
pub use transactional::{is_retryable_sqlstate, ChunkError, StatementFailure, TransactionalResult};

use crate::error::{describe_pg_error, StoreError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
/// First wait of [`Store::connect_waiting`] while the server is unreachable; it doubles.
pub const CONNECT_RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait of [`Store::connect_waiting`] between connection attempts.
pub const CONNECT_RETRY_MAX: Duration = Duration::from_secs(10);

/// First wait before retrying a statement whose session or server failed; it doubles.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two such retries.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Subscribes a session to the channel on which `prepare`, `retry-failed` and the rescuer
/// announce work (the notification's payload is the queue).
pub const LISTEN_WORK: &str = sql!("listen_work");

/// A pool of connections to one Tally database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    pgbouncer: bool,
    target: String,
}

/// The stream of a dedicated connection (TLS or plain, as the store's settings say).
pub type DedicatedStream =
    <tokio_postgres_rustls::MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
        tokio_postgres::Socket,
    >>::Stream;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("target", &self.target)
            .finish()
    }
}

impl Store {
    /// Connects and checks that the server answers. `max_connections` (at least 2) bounds the
    /// pool. The URL may carry `sslmode` and `sslrootcert`; `PGPASSWORD` is used when it has no password.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Store, StoreError> {
        Self::connect_with(&ConnectOptions::new(url), max_connections).await
    }

    /// Like [`Store::connect`], with TLS, password and PgBouncer settings.
    pub async fn connect_with(
        options: &ConnectOptions,
        max_connections: usize,
    ) -> Result<Store, StoreError> {
        let connect::Prepared { mut config, tls } = connect::prepare(options)?;
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
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            // A prepare holds one connection for its load and creates the batch on another.
            .max_size(max_connections.max(2))
            .build()
            .map_err(|e| StoreError::BadUrl(e.to_string()))?;
        let store = Store {
            pool,
            config,
            tls,
            pgbouncer: options.pgbouncer,
            target,
        };
        drop(store.client().await?);
        Ok(store)
    }

    /// Like [`Store::connect_with`], but waits with capped backoff while the server is
    /// unreachable (a program may start before its database, or during a restart), calling
    /// `waiting` before each wait. `None` when `stop` fires while waiting; errors that waiting
    /// will not cure (a bad URL, a wrong password) are returned at once.
    pub async fn connect_waiting(
        options: &ConnectOptions,
        max_connections: usize,
        stop: &CancellationToken,
        mut waiting: impl FnMut(),
    ) -> Result<Option<Store>, StoreError> {
        let mut delay = CONNECT_RETRY_MIN;
        loop {
            match Self::connect_with(options, max_connections).await {
                Ok(store) => return Ok(Some(store)),
                Err(e) if e.is_transient_connect() => tracing::warn!("{e}; retrying in {delay:?}"),
                Err(e) => return Err(e),
            }
            waiting();
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(CONNECT_RETRY_MAX);
        }
    }

    /// `user@host:port/database`, never the password: for messages.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The parsed connection settings (for a dedicated LISTEN connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// Opens a connection outside the pool (e.g. for LISTEN), with the pool's TLS settings.
    /// The caller drives the returned connection.
    pub async fn connect_dedicated(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, DedicatedStream>,
        ),
        tokio_postgres::Error,
    > {
        self.config.connect(self.tls.clone()).await
    }

    /// True behind PgBouncer in transaction pooling mode (`--pgbouncer`): no LISTEN, no
    /// statement outlives its transaction.
    pub fn pgbouncer(&self) -> bool {
        self.pgbouncer
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.connect_error(e))
    }

    /// A connection for statements outside an explicit transaction; finish with
    /// [`Conn::done`]. Behind PgBouncer in transaction pooling mode it opens a transaction, so
    /// that each statement's parse, execution and close reach the same server connection.
    pub(crate) async fn conn(&self) -> Result<Conn, StoreError> {
        let client = self.client().await?;
        if self.pgbouncer {
            client
                .batch_execute("begin")
                .await
                .map_err(|e| StoreError::db("starting a transaction", e))?;
        }
        Ok(Conn {
            client: Some(client),
            open: self.pgbouncer,
        })
    }

    fn connect_error(&self, err: deadpool_postgres::PoolError) -> StoreError {
        let (reason, hint, transient) = match &err {
            deadpool_postgres::PoolError::Backend(e) => classify_connect_error(e, &self.config),
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
        let client = self.conn().await?;
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
        client.done().await?;
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

/// A pooled connection from [`Store::conn`].
pub(crate) struct Conn {
    client: Option<deadpool_postgres::Object>,
    /// A transaction begun for PgBouncer is still open.
    open: bool,
}

impl Conn {
    /// Commits the transaction begun for PgBouncer, if any.
    pub(crate) async fn done(mut self) -> Result<(), StoreError> {
        if let (true, Some(client)) = (self.open, &self.client) {
            client
                .batch_execute("commit")
                .await
                .map_err(|e| StoreError::db("committing", e))?;
        }
        self.open = false;
        Ok(())
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Object;

    fn deref(&self) -> &Self::Target {
        match &self.client {
            Some(client) => client,
            // Only Drop takes the client out.
            None => unreachable!("connection used after drop"),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.open {
            // Left mid-transaction by an error: close the connection rather than hand it on
            // with the transaction open. The server (or PgBouncer) rolls it back.
            if let Some(client) = self.client.take() {
                drop(deadpool_postgres::Object::take(client));
            }
        }
    }
}

/// Parameters with their types, as `query_typed` takes them.
type TypedParams<'a> = [(
    &'a (dyn tokio_postgres::types::ToSql + Sync),
    tokio_postgres::types::Type,
)];
/// What a query returns.
type Rows = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>;

/// A connection or transaction that can run a statement with parameter types given.
pub(crate) trait TypedQuery: deadpool_postgres::GenericClient {
    fn query_with_types<'a>(
        &'a self,
        query: &'a str,
        params: &'a TypedParams<'a>,
    ) -> impl std::future::Future<Output = Rows> + Send + 'a;
}

/// Both clients have an inherent `query_typed`; the trait lets [`query_cached`] take either.
macro_rules! impl_typed_query {
    ($($client:ty),*) => {$(
        impl TypedQuery for $client {
            fn query_with_types<'a>(
                &'a self,
                query: &'a str,
                params: &'a TypedParams<'a>,
            ) -> impl std::future::Future<Output = Rows> + Send + 'a {
                self.query_typed(query, params)
            }
        }
    )*};
}

impl_typed_query!(
    deadpool_postgres::Object,
    deadpool_postgres::Transaction<'_>
);

/// Runs `query` on `client`: prepared once per connection and cached. Behind PgBouncer, where
/// a prepared statement must not outlive the transaction (the server connection goes to
/// other clients next), it is prepared only to learn its parameter types and closed at once,
/// and then run as an unnamed statement, which the returned rows may outlive.
pub(crate) async fn query_cached<C: TypedQuery>(
    client: &C,
    pgbouncer: bool,
    query: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if pgbouncer {
        let types = client.prepare(query).await?.params().to_vec();
        let typed: Vec<_> = params.iter().copied().zip(types).collect();
        client.query_with_types(query, &typed).await
    } else {
        let stmt = client.prepare_cached(query).await?;
        client.query(&stmt, params).await
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

fn classify_connect_error(
    err: &tokio_postgres::Error,
    config: &tokio_postgres::Config,
) -> (String, &'static str, bool) {
    let reason = describe_pg_error(err);
    if err.code().is_none() {
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.as_str(),
            _ => "localhost",
        };
        // A certificate the client rejects will be rejected again: not worth waiting for.
        if let Some((reason, hint)) = connect::describe_tls_failure(&reason, host) {
            return (reason, hint, false);
        }
    }
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
