-- Taken by the prepare transaction, which already holds the batch's prepare lock; none when
-- the batch is no longer `preparing` (purged, or prepared meanwhile). $1 id
select id from tally.batch where id = $1 and state = 'preparing' for update
