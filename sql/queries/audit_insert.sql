-- An action taken on a batch or run: $1 actor, $2 action, $3 batch, $4 run, $5 detail, $6 rows.
insert into tally.audit (actor, action, batch, run, detail, rows)
values ($1, $2, $3, $4, $5, $6)
