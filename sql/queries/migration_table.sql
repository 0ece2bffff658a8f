create schema if not exists tally;
create table if not exists tally.migration (
    version    int primary key,
    name       text not null,
    applied_at timestamptz not null default now()
);
