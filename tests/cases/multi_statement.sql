-- several statements in one simple Query message (psql sends "a \; b" as one query)
CREATE TABLE m (x int) \; INSERT INTO m VALUES (1), (2) \; SELECT count(*) FROM m;
SELECT 1 AS one \; SELECT 'two' AS two, 2.0 AS n \; SELECT NULL AS three;
INSERT INTO m VALUES (3) \; UPDATE m SET x = x * 10 RETURNING x \; DELETE FROM m WHERE x = 10;
-- an error in the middle: statements before it in the same implicit transaction roll back
INSERT INTO m VALUES (4) \; SELECT 1 / 0 \; INSERT INTO m VALUES (5);
SELECT * FROM m ORDER BY x;
-- an explicit transaction inside one query
BEGIN \; INSERT INTO m VALUES (6) \; COMMIT \; SELECT count(*) FROM m;
BEGIN \; INSERT INTO m VALUES (7) \; SELECT no_such_column \; COMMIT;
ROLLBACK;
SELECT * FROM m ORDER BY x;
SET search_path = public \; SHOW search_path \; RESET search_path;
SELECT 'a' \; \gset
\echo :'?column?'
SELECT 1 \; SELECT 2 \; SELECT 3 \; SELECT 4 \; SELECT 5 \; SELECT 6 \; SELECT 7 \; SELECT 8;
