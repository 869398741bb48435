-- The new schema the migrations expand into (created beside the old one, in schema v2).
CREATE SCHEMA IF NOT EXISTS v2;

-- users split by role
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

-- products with tier pricing computed from the list price
CREATE TABLE IF NOT EXISTS v2.products (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(12, 2) NOT NULL,
    price_silver numeric(12, 2) NOT NULL,
    price_gold numeric(12, 2) NOT NULL,
    margin_pct numeric(7, 2),
    UNIQUE (tenant_id, sku)
);

-- transactions with a new required field derived from existing columns
CREATE TABLE IF NOT EXISTS v2.transactions (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    user_id bigint,
    product_id bigint,
    quantity integer NOT NULL,
    unit_price numeric(12, 2) NOT NULL,
    discount numeric(12, 2) NOT NULL,
    tax numeric(12, 2) NOT NULL DEFAULT 0,
    total_amount numeric(14, 2) NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL
);

-- inventory normalised: available stock as its own column, store codes upper-cased
CREATE TABLE IF NOT EXISTS v2.stock_levels (
    product_id bigint NOT NULL,
    store text NOT NULL,
    tenant_id bigint NOT NULL,
    on_hand integer NOT NULL,
    available integer NOT NULL,
    PRIMARY KEY (product_id, store)
);

-- till and web orders merged into one sales table; the channel keeps their key spaces apart
CREATE TABLE IF NOT EXISTS v2.sales (
    channel text NOT NULL CHECK (channel IN ('pos', 'web')),
    order_id bigint NOT NULL,
    tenant_id bigint NOT NULL,
    total numeric(12, 2) NOT NULL,
    sold_at timestamptz NOT NULL,
    store_code text,
    customer_email text,
    PRIMARY KEY (channel, order_id)
);

-- the compliance audit log, multi-tenant, with row-level security for the application role
CREATE TABLE IF NOT EXISTS v2.audit_events (
    id bigint PRIMARY KEY,
    tenant_id bigint NOT NULL,
    actor_id bigint,
    action text NOT NULL,
    entity text NOT NULL,
    entity_id bigint,
    details jsonb,
    occurred_at timestamptz NOT NULL
);
ALTER TABLE v2.audit_events ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON v2.audit_events;
CREATE POLICY tenant_isolation ON v2.audit_events
    USING (tenant_id = nullif(current_setting('app.tenant_id', true), '')::bigint)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant_id', true), '')::bigint);
