-- Taken by the prepare transaction; NOWAIT turns a concurrent prepare of the same batch into
-- an immediate error instead of a silent wait. $1 id
select id from tally.batch where id = $1 and state = 'preparing' for update nowait
