-- description: drop transactions
-- strategy: contract
-- rollback: restore from backup
SET statement_timeout = '60s';
DO $$ BEGIN ASSERT (SELECT count(*) FROM v2.transactions) > 0; END $$;
DROP TABLE IF EXISTS public.transactions;
