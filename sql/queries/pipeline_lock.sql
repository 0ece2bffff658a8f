-- The pipeline's current definition, locked until the caller commits. $1 name
select version, digest from tally.pipeline where name = $1 for update
