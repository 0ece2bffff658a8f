-- A prepare holds its batch's lock for the whole load, so its server session must end soon
-- after its client vanishes: keepalives find a silent peer in about 25 s, and the connection
-- check ends a running statement whose client hung up. Only settings this server has.
select set_config(s.name, v.setting, true)
  from (values ('tcp_keepalives_idle', '10'),
               ('tcp_keepalives_interval', '5'),
               ('tcp_keepalives_count', '3'),
               ('client_connection_check_interval', '5s')) as v(name, setting)
  join pg_settings s on s.name = v.name
