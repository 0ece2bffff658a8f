-- One replica of `serve` observes at a time (per transaction); the others skip their turn.
select pg_try_advisory_xact_lock(7236552)
