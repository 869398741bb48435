-- DML with and without RETURNING: psql prints every command tag
CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int DEFAULT 0, price numeric(8, 2));
INSERT INTO items VALUES (1, 'apple', 10, 0.50);
INSERT INTO items (id, name) VALUES (2, 'pear'), (3, 'plum') RETURNING *;
INSERT INTO items SELECT g, 'item ' || g, g * 2, g / 4.0 FROM generate_series(4, 20) g;
INSERT INTO items VALUES (1, 'dup') ON CONFLICT (id) DO NOTHING;
INSERT INTO items VALUES (1, 'apple', 5) ON CONFLICT (id) DO UPDATE SET qty = items.qty + EXCLUDED.qty RETURNING id, qty;
UPDATE items SET price = price * 2 WHERE id > 15 RETURNING id, price;
UPDATE items SET qty = qty + 1 WHERE id < 5;
UPDATE items SET qty = 0 WHERE false;
DELETE FROM items WHERE id BETWEEN 10 AND 12 RETURNING name;
DELETE FROM items WHERE id = 999;
WITH moved AS (DELETE FROM items WHERE id > 18 RETURNING *) INSERT INTO items SELECT id + 100, name, qty, price FROM moved RETURNING id;
MERGE INTO items t USING (VALUES (2, 7), (50, 1)) AS s (id, qty) ON t.id = s.id
  WHEN MATCHED THEN UPDATE SET qty = s.qty
  WHEN NOT MATCHED THEN INSERT (id, name, qty) VALUES (s.id, 'merged', s.qty);
SELECT * FROM items ORDER BY id;
SELECT count(*), sum(qty), sum(price) FROM items;
UPDATE items SET name = NULL WHERE id = 1;
INSERT INTO items VALUES (1, 'again');
SELECT * FROM items WHERE id = 1;
TABLE items LIMIT 3;
VALUES (1, 'a'), (2, NULL);
SELECT 1 WHERE false;
