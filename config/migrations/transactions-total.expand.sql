-- description: v2.transactions with the required total_amount, and an index the new reports
--   need on the old table while both are live (config/transactions-total.yaml)
-- strategy: expand
-- rollback: DROP INDEX CONCURRENTLY IF EXISTS public.transactions_tenant_created;
--   DROP TABLE IF EXISTS v2.transactions;
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS v2;

CREATE TABLE IF NOT EXISTS v2.transactions (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    user_id bigint,
    product_id bigint,
    quantity bigint NOT NULL,
    unit_price numeric(12, 2) NOT NULL,
    discount numeric(12, 2) NOT NULL,
    tax numeric(12, 2) NOT NULL DEFAULT 0,
    total_amount numeric(14, 2) NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL
);

-- an index on a live table: built concurrently, outside any transaction block, no time bound
SET statement_timeout = 0;
CREATE INDEX CONCURRENTLY IF NOT EXISTS transactions_tenant_created
    ON public.transactions (tenant_id, created_at);
SET statement_timeout = '60s';

-- validation: a failed concurrent build leaves an INVALID index behind
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_index
        WHERE indexrelid = to_regclass('public.transactions_tenant_created') AND indisvalid
    ) THEN
        RAISE EXCEPTION 'expand failed: transactions_tenant_created is missing or INVALID '
            '(drop it and run this script again)';
    END IF;
END $$;
