select pg_advisory_unlock(7236551)
