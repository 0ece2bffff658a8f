-- The session holding a batch's prepare lock (see prepare_lock), for the error of a prepare
-- that waited in vain. $1 batch name
select l.pid, coalesce(a.application_name, ''), coalesce(host(a.client_addr), 'local'),
       coalesce(to_char(a.xact_start at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'), '')
  from pg_locks l
  left join pg_stat_activity a on a.pid = l.pid
 where l.locktype = 'advisory' and l.granted
   and l.database = (select oid from pg_database where datname = current_database())
   and l.classid = 7236552 and l.objid = hashtext($1)::oid and l.objsubid = 2
 limit 1
