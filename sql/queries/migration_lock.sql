-- Serialises `migrate` runs. Transaction-scoped: it ends with the migration's transaction,
-- whatever happens to the session, so there is no unlock that could fail.
select pg_advisory_xact_lock(7236551)
