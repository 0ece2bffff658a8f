-- The fencing token of a running row becomes its lease's id. Lease ids only grow, so a token
-- never comes back, whatever happens to `attempt` (given back unstarted, reset by
-- `retry-failed --reset-attempts`) or to worker ids (an operator may reuse one).
-- Not indexed: setting it at claim and clearing it at finish stays a HOT update.
alter table tally.record add column lease_id bigint;

-- How many of the lease's rows, in `record_ids` order, were handed to a handler. The rescue
-- counts an attempt only for those; the others go back to pending as if never claimed.
-- Null for leases taken by a worker that does not announce starts: all their rows count.
alter table tally.lease add column started int;
