-- Failures grouped by cause (`coordinator failed --group-by error`): an error message with
-- what varies from record to record folded away (quoted values, uuids, hex and other
-- numbers, runs of white space), so that one cause is one group.
create function tally.error_group(message text) returns text
language sql immutable parallel safe as $$
    select left(
        regexp_replace(
        regexp_replace(
        regexp_replace(
        regexp_replace(
        regexp_replace(
        regexp_replace(coalesce(message, ''),
            '''[^'']*''', '''…''', 'g'),
            '"[^"]*"', '"…"', 'g'),
            '[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}', '<uuid>', 'g'),
            '0x[0-9a-fA-F]+', '<hex>', 'g'),
            '[0-9]+([.][0-9]+)?', 'N', 'g'),
            '\s+', ' ', 'g'),
        500)
$$;

-- A group's short, stable name: what `retry-failed --group` takes.
create function tally.error_group_key(message text) returns text
language sql immutable parallel safe as $$
    select left(md5(tally.error_group(message)), 12)
$$;
