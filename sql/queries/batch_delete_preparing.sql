-- $1 id
delete from tally.batch where id = $1 and state = 'preparing'
