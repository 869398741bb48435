-- description: drop inventory
-- strategy: expand
-- rollback: restore from backup
SET lock_timeout = '2s';
SET statement_timeout = '60s';
DO $$ BEGIN ASSERT true; END $$;
DROP TABLE IF EXISTS public.inventory;
