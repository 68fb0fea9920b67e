-- verify: when the outbox began (migration 0005 applied): no notification before it has deliveries.
-- Index: herald_schema_migrations primary key.
SELECT applied_at FROM herald_schema_migrations WHERE version = '0005_channels'
