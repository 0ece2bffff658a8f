-- Gives each of this replica's webhooks ($1, sha256 of each URL) a delivery of every alert
-- with an id above $2 (the newest alert when the replica started), in the transaction that
-- raises new alerts: a replica never replays alerts raised before it ran.
insert into tally.alert_delivery (alert_id, webhook)
select a.id, w.webhook
  from tally.alert a
 cross join unnest($1::text[]) as w(webhook)
 where a.id > $2
on conflict (alert_id, webhook) do nothing
