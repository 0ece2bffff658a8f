-- Held by the prepare transaction of a batch, from before its row is created until the
-- load commits or rolls back: two prepares of one name never interleave, and a `preparing`
-- batch whose lock nobody holds was interrupted (see batch_status). Keyed by the name, since
-- the row may not exist yet; a hash collision only makes two prepares wait for each other.
-- The caller bounds the wait with lock_timeout. $1 batch name
select pg_advisory_xact_lock(7236552, hashtext($1))
