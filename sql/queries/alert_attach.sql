-- Gives each of this replica's webhooks ($1, sha256 of each URL) a delivery of every alert
-- with an id above $2 (the newest alert when the replica started) raised in the last hour:
-- run by every observation pass, so that alerts raised elsewhere (pipeline runs ending in
-- another process) are delivered too, while a replica never replays alerts raised before it
-- ran. The hour bounds the work of a pass.
insert into tally.alert_delivery (alert_id, webhook)
select a.id, w.webhook
  from tally.alert a
 cross join unnest($1::text[]) as w(webhook)
 where a.id > $2 and a.created_at > now() - interval '1 hour'
on conflict (alert_id, webhook) do nothing
