-- values of many types, NULLs, unicode, arrays, json, bytea, numeric, timestamps
SELECT NULL AS n, NULL::int AS ni, ''::text AS empty, ' ' AS space;
SELECT 'ünïcødé' AS latin, '日本語テキスト' AS cjk, '😀🚀👩‍👩‍👧' AS emoji, 'e' || chr(769) AS combining, 'ﬁ' AS ligature;
SELECT length('😀🚀'), octet_length('😀🚀'), upper('straße'), 'Ω' < 'ω' AS cmp;
SELECT E'line1\nline2\ttab' AS control, E'back\\slash' AS bs, 'quote''s' AS q, '"dq"' AS dq;
SELECT true, false, NULL::boolean;
SELECT 32767::int2, (-2147483648)::int4, 9223372036854775807::int8;
SELECT 1.5::float4, 1e308::float8, '-Infinity'::float8, 'NaN'::float8, 1.0e-30::float8, 0.1::float4;
SELECT 123456789012345678901234567890.123456789::numeric, -0.00000000001::numeric, 'NaN'::numeric,
       'Infinity'::numeric, 1.10::numeric(5, 2), round(2.5), 10::numeric / 3;
SELECT 12.34::money;
SELECT date '2024-02-29', date 'infinity', date '0044-03-15 BC', time '23:59:59.999999',
       timetz '12:00+05:30';
SELECT timestamp '2024-01-01 00:00:00.123456', timestamptz '2024-06-15 12:30:00+02',
       timestamptz '1970-01-01 00:00:00+00', timestamp '-infinity', timestamptz 'infinity';
SELECT interval '1 year 2 mons 3 days 04:05:06.789', interval '-1 day', interval '1000000 hours';
SELECT ARRAY[1, 2, NULL, 4] AS ints, ARRAY['a', 'b c', NULL, '"q"', ''] AS texts,
       ARRAY[[1, 2], [3, 4]] AS matrix, '{}'::int[] AS empty, '[0:1]={7,8}'::int[] AS bounds;
SELECT ARRAY[date '2024-01-01', NULL], ARRAY[1.5, NULL]::numeric[], ARRAY[true, false];
SELECT '{"a": 1, "b": [true, null, 2.50], "c": {"d": "ü"}}'::json AS j,
       '{"b": [true, null, 2.50], "a": 1, "a": 2}'::jsonb AS jb, 'null'::jsonb, '"str"'::json;
SELECT jsonb_build_object('k', 1, 'arr', jsonb_build_array(1, 'two', NULL)),
       '{"x": {"y": [10, 20]}}'::jsonb #> '{x,y,1}', '[1, 2]'::jsonb @> '[1]';
SELECT json_agg(t) FROM (VALUES (1, 'a'), (2, NULL)) t (id, v);
SELECT '\xdeadbeef00ff'::bytea, ''::bytea, decode('00010203', 'hex'), convert_to('ü', 'UTF8');
SET bytea_output = 'escape';
SELECT '\xdeadbeef00ff'::bytea, 'a\\b'::bytea;
RESET bytea_output;
SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '192.168.0.1/24'::inet, '10.0.0.0/8'::cidr,
       '08:00:2b:01:02:03'::macaddr;
SELECT int4range(1, 10), '[2024-01-01, 2024-02-01)'::daterange, numrange(NULL, 5.5, '(]'),
       'empty'::int4range, '{[1,3), [5,7)}'::int4multirange;
SELECT point(1, 2), '((0,0),(1,1))'::box, circle '<(0,0),2>', '[(0,0),(1,1)]'::lseg;
SELECT 'fat & rat'::tsquery, to_tsvector('english', 'The quick brown foxes');
SELECT B'1010'::bit(4), B'11'::varbit, 'abc'::char(6) || '|', 'abc'::varchar(2);
SELECT ROW(1, 'two', NULL, ARRAY[3]) AS rec, (1, 2) = (1, 2) AS eq;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (l int, r text);
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
SELECT 'happy'::mood, ROW(1, 'x')::pair, (ROW(2, 'y')::pair).r, 5::posint;
SELECT 0::posint;
SELECT '<a>xml</a>'::xml;
SELECT 'x'::"char", 'name'::name, 42::oid, 'int4'::regtype, 'pg_class'::regclass;
SELECT to_char(1234567.891, 'FM9,999,999.00'), to_char(timestamp '2024-03-05 07:08:09', 'Day DD Mon YYYY HH24:MI:SS');
SELECT g, g::text, g::numeric / 7 FROM generate_series(-3, 3) g;
