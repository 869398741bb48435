-- Compatibility views: the old relations as the new schema answers them, for shadow reads
-- (`shadow.views` in the demo's config). A view has every column of the old relation with its
-- type (`dualwrite check` verifies that); columns v2 does not carry are read from the old table
-- until the contract step drops it.
CREATE SCHEMA IF NOT EXISTS v2compat;

-- products: v2.products is written in the application's own statement (sync mode), so the
-- view and the old table agree in every snapshot
CREATE OR REPLACE VIEW v2compat.products AS
SELECT n.id, n.tenant_id, n.sku, n.name, n.price, o.cost, o.category, o.active
FROM v2.products AS n
JOIN public.products AS o ON o.id = n.id;
