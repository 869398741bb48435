\set a random(1, 200000 - 499)
BEGIN;
INSERT INTO items (sku, qty, price) SELECT 'new-' || g, g % 100, (g % 1000) * 0.25 FROM generate_series(1, 500) AS g;
UPDATE items SET qty = qty + 1, price = price + 0.01, updated_at = now() WHERE id BETWEEN :a AND :a + 499;
END;
