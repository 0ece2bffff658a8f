-- Claims up to $2 due deliveries to this replica's webhooks ($1) for $3 seconds: the lease
-- is next_at pushed ahead, so a replica killed mid-delivery leaves the row due again. The
-- attempt count is bumped in the same statement; it fences the outcome written afterwards.
with picked as (
    select alert_id, webhook
      from tally.alert_delivery
     where state = 'pending' and next_at <= now() and webhook = any($1::text[])
     order by next_at
     limit $2
       for update skip locked
)
update tally.alert_delivery d
   set attempts = d.attempts + 1,
       next_at = now() + make_interval(secs => $3::float8)
  from picked
 where d.alert_id = picked.alert_id and d.webhook = picked.webhook
returning d.alert_id, d.webhook, d.attempts,
          (select a.key from tally.alert a where a.id = d.alert_id),
          (select a.body::text from tally.alert a where a.id = d.alert_id)
