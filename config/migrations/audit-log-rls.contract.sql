-- description: drop public.audit_log once compliance reads v2.audit_events
-- strategy: contract
-- rollback: none in place: restore public.audit_log from the backup taken before this step
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

DO $$
BEGIN
    IF to_regclass('public.audit_log') IS NULL THEN
        RETURN;  -- already dropped: this is a re-run
    END IF;
    IF EXISTS (
        SELECT FROM public.audit_log a
        WHERE NOT EXISTS (SELECT FROM v2.audit_events e WHERE e.id = a.id)
    ) THEN
        RAISE EXCEPTION 'contract refused: audit events are missing from v2.audit_events';
    END IF;
END $$;

DROP TABLE IF EXISTS public.audit_log;
