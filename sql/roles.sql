-- Least-privilege roles for Tally. Run as the owner of the tally schema (the role that runs
-- `coordinator migrate`), after every migrate: it is idempotent, and it grants on the tables a
-- migration may have added.
--
--   psql "$OWNER_DATABASE_URL" -v ON_ERROR_STOP=1 -f sql/roles.sql
--
-- Three group roles (NOLOGIN) hold the privileges; log-in roles are made members:
--
--   create role orders_worker login password '...' in role tally_worker;
--   create role ops_coordinator login password '...' in role tally_coordinator;
--   create role keda_scaler login password '...' in role tally_scaler;
--
-- tally_coordinator: prepare batches (COPY into tally.record), status, wait, failed,
--   pause/resume/cancel, retry-failed, purge, serve. Not migrate: schema changes stay with the
--   owner. `prepare --from-query` also needs SELECT on the tables its query reads.
-- tally_worker: claim, renew, release, complete and fail rows of batches that exist; rescue
--   expired leases; the circuit breaker. It cannot create batches, insert or delete records,
--   or change any table's definition. The statement of `--handler sql` needs its own grants,
--   given by the operator to the worker's log-in role (e.g. INSERT on the target table).
-- tally_scaler: the autoscaler's backlog query (sql/queries/queue_backlog.sql) and nothing
--   else: it reads batches and their maintained counts, never a record or its payload.

do $$
begin
    if not exists (select from pg_roles where rolname = 'tally_coordinator') then
        create role tally_coordinator nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'tally_worker') then
        create role tally_worker nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'tally_scaler') then
        create role tally_scaler nologin;
    end if;
end
$$;

grant usage on schema tally to tally_coordinator, tally_worker, tally_scaler;

-- Coordinator: every row of every Tally table, no DDL.
grant select, insert, update, delete on all tables in schema tally to tally_coordinator;
grant usage, select on all sequences in schema tally to tally_coordinator;
grant execute on all functions in schema tally to tally_coordinator;

-- Worker.
-- The schema version check at start.
grant select on tally.migration to tally_worker;
-- Finding ready batches; noting the first claim; pausing a batch past its failure limit.
grant select on tally.batch to tally_worker;
grant update (started_at, state, paused_reason, updated_at) on tally.batch to tally_worker;
-- Claim, outcome, release and rescue are updates of existing rows only.
grant select, update on tally.record to tally_worker;
-- One lease row per claim: created by the claim, extended, dropped or rescued.
grant select, insert, update, delete on tally.lease to tally_worker;
-- The claim takes the lease's id first: it is stamped on the claimed rows as their fence.
grant usage on sequence tally.lease_id_seq to tally_worker;
-- The per-state counts are kept by statement triggers on tally.record, which run with the
-- privileges of the role whose UPDATE fired them.
grant select, insert, update on tally.batch_count to tally_worker;
-- The circuit breaker's functions read and write its table as their caller.
grant select, insert, update on tally.breaker to tally_worker;
-- Its own row on the dashboard's workers page, written every rescue interval.
grant select, insert, update on tally.worker to tally_worker;
grant execute on all functions in schema tally to tally_worker;

-- Scaler: the backlog query's two tables, read only; no payloads (tally.record).
grant select on tally.batch, tally.batch_count to tally_scaler;
