-- description: v2.audit_events, multi-tenant, with row-level security for the application
--   role (config/audit-log-rls.yaml mirrors into it in sync mode)
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.audit_events;
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS v2;

CREATE TABLE IF NOT EXISTS v2.audit_events (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    actor_id bigint,
    action text NOT NULL,
    entity text NOT NULL,
    entity_id bigint,
    details jsonb,
    occurred_at timestamptz NOT NULL
);
ALTER TABLE v2.audit_events ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON v2.audit_events;
CREATE POLICY tenant_isolation ON v2.audit_events
    USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::bigint)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::bigint);

-- validation: the policy is in force
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_class WHERE oid = 'v2.audit_events'::regclass AND relrowsecurity
    ) OR NOT EXISTS (
        SELECT FROM pg_policies
        WHERE schemaname = 'v2' AND tablename = 'audit_events' AND policyname = 'tenant_isolation'
    ) THEN
        RAISE EXCEPTION 'expand failed: row-level security is not in force on v2.audit_events';
    END IF;
END $$;
