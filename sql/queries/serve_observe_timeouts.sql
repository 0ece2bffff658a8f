-- Bounds the observation transaction: a replica cut off mid-pass would otherwise hold the
-- observe lock until TCP keepalive notices (hours), and no replica would raise alerts.
set local idle_in_transaction_session_timeout = '60s';
set local statement_timeout = '30s';
