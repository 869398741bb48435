-- large results: 100k rows, 1 MB values, a 1 MB statement from the client
\pset format unaligned
SELECT g, md5(g::text), g * 1.5 AS half, CASE WHEN g % 7 = 0 THEN NULL ELSE repeat('r', g % 50) END AS pad
FROM generate_series(1, 100000) g;
SELECT repeat('x', 1048576) AS one_mb;
SELECT g, repeat(chr(64 + g), 1048576 + g) FROM generate_series(1, 5) g;
CREATE TABLE big (id int, payload text, blob bytea);
INSERT INTO big SELECT g, repeat(md5(g::text), 32768), decode(repeat('00ff', 262144), 'hex') FROM generate_series(1, 4) g;
SELECT id, length(payload), md5(payload), length(blob), md5(blob) FROM big ORDER BY id;
SELECT blob FROM big WHERE id = 1;
COPY big TO STDOUT;
SELECT repeat('z', 1048576) || 'end' AS bigvar \gset
SELECT length(:'bigvar'), md5(:'bigvar');
INSERT INTO big (id, payload) VALUES (5, :'bigvar');
SELECT id, length(payload) FROM big WHERE id = 5;
SELECT count(*), sum(length(x)) FROM (SELECT repeat('y', g) AS x FROM generate_series(1, 3000) g) s;
\pset format aligned
SELECT g AS id FROM generate_series(1, 20000) g;
