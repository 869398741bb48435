-- description: tier prices as columns of the live products table
-- strategy: expand
-- rollback: ALTER TABLE products DROP COLUMN IF EXISTS price_silver;
SET lock_timeout = '2s';
SET statement_timeout = '60s';
ALTER TABLE public.products ADD COLUMN IF NOT EXISTS price_silver numeric(12, 2) NOT NULL;
ALTER TABLE public.products ADD CONSTRAINT products_price_silver_lte CHECK (price_silver <= price);
DO $$
BEGIN
    IF EXISTS (SELECT FROM public.products WHERE price_silver > price) THEN
        RAISE NOTICE 'some silver prices are above the list price';
    END IF;
END $$;
