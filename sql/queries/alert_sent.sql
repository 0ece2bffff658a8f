-- Marks delivery ($1 alert, $2 webhook) sent, if attempt $3 still holds it.
update tally.alert_delivery
   set state = 'sent', sent_at = now(), last_error = null
 where alert_id = $1 and webhook = $2 and attempts = $3 and state = 'pending'
