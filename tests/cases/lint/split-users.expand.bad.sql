-- The expand step written carelessly: no header, no timeouts, not re-runnable, an index on
-- the live users table built without CONCURRENTLY, and no validation.
CREATE SCHEMA v2;
CREATE TABLE v2.customers (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    email text NOT NULL,
    full_name text NOT NULL,
    phone text,
    created_at timestamptz NOT NULL
);
CREATE INDEX users_role ON public.users (role);
