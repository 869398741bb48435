-- functions, procedures, prepared statements, the fast-path function call (large objects)
CREATE FUNCTION add(a int, b int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT a + b';
CREATE FUNCTION squares(n int) RETURNS TABLE (i int, sq bigint) LANGUAGE sql AS
  'SELECT g, g::bigint * g FROM generate_series(1, n) g';
CREATE FUNCTION greet(name text DEFAULT 'world', VARIADIC extra text[] DEFAULT '{}') RETURNS text
  LANGUAGE plpgsql AS $$ BEGIN RETURN 'hello ' || name || array_to_string(extra, '+'); END $$;
CREATE PROCEDURE bump(INOUT counter int, step int DEFAULT 1) LANGUAGE plpgsql AS
  $$ BEGIN counter := counter + step; END $$;
CREATE TABLE log (msg text);
CREATE PROCEDURE log_twice(m text) LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO log VALUES (m);
  COMMIT;
  INSERT INTO log VALUES (m || ' again');
  ROLLBACK;
END $$;
SELECT add(2, 3), add(NULL, 1);
SELECT * FROM squares(5);
SELECT squares(3);
SELECT greet(), greet('you'), greet('x', 'a', 'b'), greet(name => 'named');
CALL bump(41);
CALL bump(1, step => 9);
CALL log_twice('procedure with transaction control');
SELECT * FROM log;
BEGIN;
CALL log_twice('not allowed in an explicit transaction block');
ROLLBACK;
CALL no_such_procedure();
SELECT add('a', 1);
-- prepared statements at the SQL level
PREPARE get_sq(int) AS SELECT * FROM squares($1) WHERE i > 1;
EXECUTE get_sq(4);
EXECUTE get_sq('four');
PREPARE get_sq(int) AS SELECT 1;
DEALLOCATE get_sq;
EXECUTE get_sq(2);
DEALLOCATE ALL;
-- empty queries and comments
;
SELECT 1 \; ;
/* only a comment */ SELECT 'after a comment';
-- psql's variables and \gset, \gexec
SELECT 7 AS seven, 'str' AS word \gset
\echo :seven :word
SELECT format('SELECT %s AS generated', g) FROM generate_series(1, 3) g \gexec
-- large objects go through libpq's fast-path FunctionCall messages
\set QUIET on
\lo_import :casedir/lo_data.txt
\set QUIET off
SELECT convert_from(lo_get(:LASTOID), 'UTF8') AS lo_text;
SELECT lo_unlink(:LASTOID);
\lo_unlink 4294967000
SELECT 'end of functions';
