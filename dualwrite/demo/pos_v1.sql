-- The point-of-sale schema as the application uses it today (the "old" side of the migration).
CREATE TABLE IF NOT EXISTS tenants (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    email text NOT NULL,
    first_name text NOT NULL,
    last_name text NOT NULL,
    role text NOT NULL CHECK (role IN ('customer', 'employee', 'manager')),
    phone text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS products (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(12, 2) NOT NULL CHECK (price >= 0),
    cost numeric(12, 2),
    category text,
    active boolean NOT NULL DEFAULT true,
    UNIQUE (tenant_id, sku)
);

CREATE TABLE IF NOT EXISTS inventory (
    product_id bigint NOT NULL REFERENCES products (id),
    store_code text NOT NULL,
    tenant_id bigint NOT NULL,
    on_hand integer NOT NULL DEFAULT 0,
    reserved integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (product_id, store_code)
);

CREATE TABLE IF NOT EXISTS transactions (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    user_id bigint,
    product_id bigint,
    quantity integer NOT NULL CHECK (quantity > 0),
    unit_price numeric(12, 2) NOT NULL,
    discount numeric(12, 2) NOT NULL DEFAULT 0,
    tax numeric(12, 2) NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'completed',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS audit_log (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL,
    actor_id bigint,
    action text NOT NULL,
    entity text NOT NULL,
    entity_id bigint,
    details jsonb,
    at timestamptz NOT NULL DEFAULT now()
);

-- orders from the tills and from the web shop, kept apart today (merged into v2.sales)
CREATE TABLE IF NOT EXISTS pos_orders (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    store_code text NOT NULL,
    total numeric(12, 2) NOT NULL,
    sold_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS web_orders (
    id bigserial PRIMARY KEY,
    tenant_id bigint NOT NULL REFERENCES tenants (id),
    customer_email text NOT NULL,
    total numeric(12, 2) NOT NULL,
    placed_at timestamptz NOT NULL DEFAULT now()
);
