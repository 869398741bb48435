-- description: drop public.users once reads and writes use v2.customers and v2.employees
-- strategy: contract
-- rollback: none in place: restore public.users from the backup taken before this step
--   (run only after the cutover report was GO and the mappings were removed)
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

-- validation: every user is in its new table, or nothing is dropped
DO $$
BEGIN
    IF to_regclass('public.users') IS NULL THEN
        RETURN;  -- already dropped: this is a re-run
    END IF;
    IF EXISTS (
        SELECT FROM public.users u
        WHERE (u.role = 'customer' AND NOT EXISTS (SELECT FROM v2.customers c WHERE c.id = u.id))
           OR (u.role IN ('employee', 'manager')
               AND NOT EXISTS (SELECT FROM v2.employees e WHERE e.id = u.id))
    ) THEN
        RAISE EXCEPTION 'contract refused: some users are missing from v2';
    END IF;
END $$;

DROP TABLE IF EXISTS public.users;
