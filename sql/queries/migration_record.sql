insert into tally.migration (version, name) values ($1, $2)
