//! Errors at the store boundary.

use crate::input::InputError;

/// Everything that can go wrong between Tally and PostgreSQL or its inputs.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL: {0} (expected postgres://user[:password]@host:port/database)")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL at {target}: {reason}; {hint}")]
    Connect {
        target: String,
        reason: String,
        hint: &'static str,
        /// The server may well answer later (down, restarting, out of slots), as opposed to
        /// refusing these credentials or this database.
        transient: bool,
    },
    #[error("database {target} has no Tally schema: run `coordinator migrate` first")]
    SchemaMissing { target: String },
    #[error(
        "database {target} has Tally schema version {found}, this build needs {needed}: \
         run `coordinator migrate`"
    )]
    SchemaOutdated {
        target: String,
        found: i32,
        needed: i32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Input(#[from] InputError),
    #[error("batch \"{0}\" does not exist")]
    BatchNotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// Another session holds what this one needs (a batch being prepared).
    #[error("{0}")]
    Locked(String),
    /// An input (a query) that yields no record: a batch needs at least one.
    #[error("{0}")]
    NoRecords(String),
    #[error("{context}: {message}")]
    Db {
        context: &'static str,
        message: String,
        /// SQLSTATE, when the server sent one.
        code: Option<String>,
    },
}

impl StoreError {
    /// Wraps a driver error with what the store was doing.
    pub fn db(context: &'static str, err: tokio_postgres::Error) -> Self {
        Self::db_ref(context, &err)
    }

    /// Like [`StoreError::db`], for an error the caller keeps.
    pub fn db_ref(context: &'static str, err: &tokio_postgres::Error) -> Self {
        StoreError::Db {
            context,
            message: describe_pg_error(err),
            code: err.code().map(|c| c.code().to_string()),
        }
    }

    /// Worth retrying later: the server could not be reached or had no room.
    pub fn is_transient_connect(&self) -> bool {
        matches!(
            self,
            StoreError::Connect {
                transient: true,
                ..
            }
        )
    }

    /// Worth trying again from the start: the server could not be reached, the session was
    /// lost (no SQLSTATE: the connection broke) or ended by the server, or the transaction
    /// lost a serialization or deadlock race. Bad input, conflicts and SQL errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { transient, .. } => *transient,
            StoreError::Db { code: None, .. } => true,
            StoreError::Db {
                code: Some(code), ..
            } => is_transient_sqlstate(code),
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if any.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            StoreError::Db { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        match err {
            deadpool_postgres::PoolError::Backend(e) => StoreError::db("connection", e),
            other => StoreError::Db {
                context: "connection pool",
                message: other.to_string(),
                code: None,
            },
        }
    }
}

/// SQLSTATEs of a session or transaction that may well succeed when run again: connection
/// exceptions (08), insufficient resources (53), a terminated backend or a server shutting
/// down or starting (57P01-57P03), serialization failures and deadlocks (40001, 40P01).
pub fn is_transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01")
}

/// The server's own message (with detail) rather than the driver's terse "db error".
pub fn describe_pg_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut msg = db.message().to_string();
            if let Some(detail) = db.detail() {
                msg.push_str(" (");
                msg.push_str(detail);
                msg.push(')');
            }
            msg
        }
        None => {
            let mut msg = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            msg
        }
    }
}
