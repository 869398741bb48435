-- description: split public.users by role into v2.customers and v2.employees
--   (the mappings of config/split-users.yaml mirror into them)
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.customers, v2.employees;
--   (nothing reads them before cutover; stop the sidecar's mappings first)
\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';

CREATE SCHEMA IF NOT EXISTS v2;

CREATE TABLE IF NOT EXISTS v2.customers (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    email text NOT NULL,
    full_name text NOT NULL,
    phone text,
    created_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS v2.employees (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    email text NOT NULL,
    full_name text NOT NULL,
    is_manager boolean NOT NULL,
    created_at timestamptz NOT NULL
);

-- validation: both targets exist with the key the mappings need
DO $$
BEGIN
    IF to_regclass('v2.customers') IS NULL OR to_regclass('v2.employees') IS NULL THEN
        RAISE EXCEPTION 'expand failed: v2.customers or v2.employees is missing';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index WHERE indrelid = 'v2.customers'::regclass AND indisprimary)
    THEN
        RAISE EXCEPTION 'expand failed: v2.customers has no primary key';
    END IF;
END $$;
