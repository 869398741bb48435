-- the server ends the session: psql must see exactly the server's FATAL, then the lost connection
SELECT 'before';
SELECT pg_terminate_backend(pg_backend_pid());
SELECT 'never runs';
