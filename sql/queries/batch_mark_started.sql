-- $1 id
update tally.batch set started_at = now() where id = $1 and started_at is null
