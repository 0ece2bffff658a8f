-- Tables of examples/nightly-orders.yaml, and the statements of its stages' sql workers.
create table if not exists src_orders (
    id          text primary key,
    day         date not null,
    customer_id int not null,
    amount      numeric not null
);
-- extract: worker --queue extract --handler sql --sql
--   "insert into staged_orders (order_id, day, customer_id, amount)
--    values ($1, (select day from src_orders where id = $1), ($2->>'customer_id')::int,
--            ($2->>'amount')::numeric)"
create table if not exists staged_orders (
    order_id    text primary key,
    day         date not null,
    customer_id int not null,
    amount      numeric not null
);
-- load: worker --queue load --handler sql --sql
--   "insert into orders (order_id, amount) values ($1, ($2->>'amount')::numeric)"
-- A negative amount violates the check: that record fails, and compensate gets it.
create table if not exists orders (
    order_id text primary key,
    amount   numeric not null check (amount >= 0)
);
-- report: worker --queue report --handler sql --sql
--   "insert into daily_report (day, orders, total)
--    select $1::date, count(*), sum(o.amount) from orders o
--      join staged_orders s on s.order_id = o.order_id where s.day = $1::date"
create table if not exists daily_report (
    day    date primary key,
    orders bigint not null,
    total  numeric
);
-- compensate: worker --queue compensate --handler sql --sql
--   "insert into rejected_orders (order_id, amount) values ($1, ($2->>'amount')::numeric)"
create table if not exists rejected_orders (
    order_id text primary key,
    amount   numeric not null
);
