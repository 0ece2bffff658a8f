//! Helpers for tests of pipelines: the example file and the sql workers of its stages.

use crate::{ChildGuard, WorkerCmd};

pub const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../examples/nightly-orders.yaml"
);
pub const EXAMPLE_SQL: &str = include_str!("../../examples/nightly-orders.sql");

/// The sql workers of the example's four queues (statements as in nightly-orders.sql).
pub fn example_workers(url: &str) -> Vec<ChildGuard> {
    [
        (
            "extract",
            "insert into staged_orders (order_id, day, customer_id, amount) \
             values ($1, (select day from src_orders where id = $1), \
                     ($2->>'customer_id')::int, ($2->>'amount')::numeric)",
        ),
        (
            "load",
            "insert into orders (order_id, amount) values ($1, ($2->>'amount')::numeric)",
        ),
        (
            "report",
            "insert into daily_report (day, orders, total) \
             select $1::date, count(*), sum(o.amount) from orders o \
               join staged_orders s on s.order_id = o.order_id where s.day = $1::date",
        ),
        (
            "compensate",
            "insert into rejected_orders (order_id, amount) values ($1, ($2->>'amount')::numeric)",
        ),
    ]
    .into_iter()
    .map(|(queue, sql)| WorkerCmd::sql(url, queue, sql).poll("100ms").start())
    .collect()
}
