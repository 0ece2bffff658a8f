-- Leftovers of an interrupted prepare (normally none: the load is one transaction). $1 batch id
delete from tally.record where batch_id = $1
