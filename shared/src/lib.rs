//! Tally's library: the one [`Store`] that owns every SQL statement, the record and batch model,
//! name validation, input readers and the [`Handler`] trait that custom Rust workers implement.

pub mod backoff;
pub mod error;
pub mod handler;
pub mod heartbeat;
pub mod input;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod names;
pub mod pipeline;
pub mod shutdown;
pub mod store;

pub use error::StoreError;
pub use handler::{Handler, HandlerError, RecordContext};
pub use model::*;
pub use store::Store;
