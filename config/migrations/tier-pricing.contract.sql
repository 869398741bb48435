-- description: drop public.products once the application reads v2.products
-- strategy: contract
-- rollback: none in place: restore public.products (and inventory's foreign key to it) from
--   the backup taken before this step
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

-- validation: every product is in v2.products with the same price
DO $$
BEGIN
    IF to_regclass('public.products') IS NULL THEN
        RETURN;  -- already dropped: this is a re-run
    END IF;
    IF EXISTS (
        SELECT FROM public.products p
        LEFT JOIN v2.products n ON n.id = p.id
        WHERE n.id IS NULL OR n.price IS DISTINCT FROM p.price
    ) THEN
        RAISE EXCEPTION 'contract refused: v2.products differs from public.products';
    END IF;
END $$;

-- dualwrite-lint: disable=ban-drop-constraint (it points at the table this step drops)
ALTER TABLE IF EXISTS public.inventory DROP CONSTRAINT IF EXISTS inventory_product_id_fkey;
DROP TABLE IF EXISTS public.products;
