-- description: v2.stock_levels: inventory keyed by (product_id, upper-cased store), with
--   available stock as a column (config/inventory-normalization.yaml)
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.stock_levels;
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS v2;

CREATE TABLE IF NOT EXISTS v2.stock_levels (
    product_id bigint NOT NULL,
    store text NOT NULL,
    tenant_id bigint NOT NULL,
    on_hand bigint NOT NULL,
    available bigint NOT NULL,
    PRIMARY KEY (product_id, store)
);

-- the old data must fit the new key: no two store codes that differ only in case
DO $$
BEGIN
    IF EXISTS (
        SELECT FROM public.inventory
        GROUP BY product_id, upper(store_code) HAVING count(*) > 1
    ) THEN
        RAISE EXCEPTION 'expand refused: store codes differing only in case would collide';
    END IF;
END $$;
