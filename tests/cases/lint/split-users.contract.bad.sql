-- description: drop the old users table
-- strategy: contract
-- rollback: restore from backup
DROP TABLE public.users;
