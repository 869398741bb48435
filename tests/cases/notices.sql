-- notices and warnings from DO blocks and functions, with their fields
DO $$ BEGIN RAISE NOTICE 'a plain notice'; END $$;
DO $$ BEGIN
  RAISE NOTICE 'notice % of %', 1, 3;
  RAISE WARNING 'a warning' USING DETAIL = 'some detail', HINT = 'a hint';
  RAISE INFO 'info is always sent';
  RAISE DEBUG 'debug is not sent at the default client_min_messages';
  RAISE NOTICE 'unicode in a notice: ünïcødé ✓';
END $$;
SET client_min_messages = debug1;
DO $$ BEGIN RAISE DEBUG 'now debug is sent'; END $$;
SET client_min_messages = warning;
DO $$ BEGIN RAISE NOTICE 'suppressed'; RAISE WARNING 'not suppressed'; END $$;
RESET client_min_messages;
CREATE FUNCTION noisy(n int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
  FOR i IN 1..n LOOP
    RAISE NOTICE 'row %', i;
  END LOOP;
  RETURN n;
END $$;
SELECT noisy(3);
SELECT noisy(g) FROM generate_series(1, 3) g;
DO $$ BEGIN RAISE EXCEPTION 'custom failure' USING ERRCODE = 'P0042', DETAIL = 'd', HINT = 'h'; END $$;
DO $$ BEGIN RAISE SQLSTATE '22012'; END $$;
DO $$ BEGIN RAISE NOTICE 'before the error'; PERFORM 1 / 0; END $$;
DO $$ BEGIN RAISE NOTICE 'long %', repeat('n', 20000); END $$;
CREATE TABLE IF NOT EXISTS noisy_t (id int);
CREATE TABLE IF NOT EXISTS noisy_t (id int);
DROP TABLE IF EXISTS no_such_table;
DROP FUNCTION noisy(int);
