-- description: drop public.transactions once the application reads v2.transactions
-- strategy: contract
-- rollback: none in place: restore public.transactions from the backup taken before this step
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

-- validation: every transaction is in v2 with its total
DO $$
BEGIN
    IF to_regclass('public.transactions') IS NULL THEN
        RETURN;  -- already dropped: this is a re-run
    END IF;
    IF EXISTS (
        SELECT FROM public.transactions t
        LEFT JOIN v2.transactions n ON n.id = t.id
        WHERE n.id IS NULL OR n.total_amount <> t.quantity * t.unit_price - t.discount + t.tax
    ) THEN
        RAISE EXCEPTION 'contract refused: v2.transactions differs from public.transactions';
    END IF;
END $$;

DROP TABLE IF EXISTS public.transactions;
