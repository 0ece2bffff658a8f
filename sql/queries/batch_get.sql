-- $1 name
select id, name, queue, state, source, id_field, input_digest, total, max_attempts
  from tally.batch
 where name = $1
