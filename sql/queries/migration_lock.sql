select pg_advisory_lock(7236551)
