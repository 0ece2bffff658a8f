-- Leases whose rows are all written back. $1 lease ids, $2 owner
delete from tally.lease where id = any($1) and owner = $2
