-- The prepare lock (see prepare_lock), without waiting: for purge. $1 batch name
select pg_try_advisory_xact_lock(7236552, hashtext($1))
