-- description: normalise inventory in place
-- strategy: expand
-- rollback: rename it back
SET lock_timeout = '2s';
SET statement_timeout = '60s';
ALTER TABLE public.inventory ALTER COLUMN store_code TYPE varchar(8);
ALTER TABLE public.inventory RENAME COLUMN store_code TO store;
ALTER TABLE public.inventory ADD COLUMN IF NOT EXISTS stock_id bigserial;
DO $$ BEGIN ASSERT true; END $$;
