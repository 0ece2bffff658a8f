-- Records a pipeline's definition the first time it is run. $1 name, $2 digest, $3 definition
insert into tally.pipeline (name, digest, definition)
values ($1, $2, $3)
on conflict (name) do nothing
