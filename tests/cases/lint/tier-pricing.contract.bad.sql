-- description: drop products, rename the new table into its place
-- strategy: contract
-- rollback: restore from backup
SET lock_timeout = '2s';
SET statement_timeout = '60s';
DROP TABLE IF EXISTS public.products CASCADE;
ALTER TABLE v2.products RENAME TO products_v2;
CREATE TABLE IF NOT EXISTS public.products_archive (id bigint PRIMARY KEY);
DO $$ BEGIN ASSERT to_regclass('public.products') IS NULL; END $$;
