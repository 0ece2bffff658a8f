-- A changed definition under the same name (--new-version). $1 name, $2 digest, $3 definition
update tally.pipeline
   set version = version + 1, digest = $2, definition = $3, updated_at = now()
 where name = $1
returning version
