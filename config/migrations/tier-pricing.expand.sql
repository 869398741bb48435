-- description: v2.products with tier prices computed from the list price
--   (config/tier-pricing.yaml mirrors into it in sync mode)
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.products;
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS v2;

CREATE TABLE IF NOT EXISTS v2.products (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(12, 2) NOT NULL,
    price_silver numeric(12, 2) NOT NULL,
    price_gold numeric(12, 2) NOT NULL,
    margin_pct numeric(7, 2),
    UNIQUE (tenant_id, sku)
);

-- validation: the unique key the application relies on exists
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM pg_index
        WHERE indrelid = 'v2.products'::regclass AND indisunique AND indnatts = 2
    ) THEN
        RAISE EXCEPTION 'expand failed: v2.products lacks its (tenant_id, sku) key';
    END IF;
END $$;
