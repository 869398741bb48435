-- COPY FROM STDIN (data inline in the script) and COPY TO STDOUT, text and csv, errors
CREATE TABLE c (id int PRIMARY KEY, name text, amount numeric, tags text[], seen timestamptz);
COPY c FROM STDIN;
1	alpha	1.5	{a,b}	2024-01-01 00:00:00+00
2	beta	\N	{}	\N
3	tab\there	-0.25	{"x y"}	2024-06-30 23:59:59.999999+00
4	ünïcode ✓	1e3	{NULL}	infinity
\.
COPY c (id, name) FROM STDIN WITH (FORMAT csv, HEADER true);
id,name
5,"quoted, with comma"
6,"multi
line"
7,
\.
COPY c TO STDOUT;
COPY c TO STDOUT WITH (FORMAT csv, HEADER true, FORCE_QUOTE (name));
COPY (SELECT id, name FROM c WHERE id > 4 ORDER BY id DESC) TO STDOUT WITH (FORMAT csv, DELIMITER '|', NULL 'NIL');
COPY (SELECT g, md5(g::text) FROM generate_series(1, 2000) g) TO STDOUT;
-- an error in the data: the whole COPY is rolled back
COPY c (id, amount) FROM STDIN;
8	1
9	not a number
10	2
\.
-- a duplicate key detected at the row
COPY c (id) FROM STDIN;
11
1
\.
SELECT count(*) FROM c;
COPY no_such_table FROM STDIN;
COPY c (no_such_column) TO STDOUT;
-- COPY inside a transaction, then rolled back
BEGIN;
COPY c (id, name) FROM STDIN;
20	in a transaction
\.
SELECT count(*) FROM c;
ROLLBACK;
SELECT count(*) FROM c;
-- an empty COPY
COPY c FROM STDIN;
\.
COPY (SELECT 1 WHERE false) TO STDOUT;
SELECT * FROM c ORDER BY id;
