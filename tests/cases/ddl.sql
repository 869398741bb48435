-- DDL: tables, constraints, indexes, views, sequences, types; psql's describe commands
CREATE SCHEMA shop;
CREATE TYPE shop.status AS ENUM ('new', 'paid', 'shipped');
CREATE SEQUENCE shop.order_no START 1000 INCREMENT 10;
CREATE TABLE shop.customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    created date DEFAULT '2024-01-01'
);
CREATE TABLE shop.orders (
    id bigint PRIMARY KEY DEFAULT nextval('shop.order_no'),
    customer_id bigint REFERENCES shop.customers (id) ON DELETE CASCADE,
    status shop.status NOT NULL DEFAULT 'new',
    total numeric(12, 2) CHECK (total >= 0),
    note text COLLATE "C"
);
CREATE INDEX orders_customer ON shop.orders (customer_id) WHERE status <> 'shipped';
CREATE VIEW shop.open_orders AS SELECT id, customer_id, total FROM shop.orders WHERE status <> 'shipped';
COMMENT ON TABLE shop.orders IS 'orders placed by customers';
ALTER TABLE shop.customers ADD COLUMN tier smallint DEFAULT 1;
ALTER TABLE shop.customers RENAME COLUMN name TO full_name;
\d shop.customers
\d+ shop.orders
\dv shop.*
\dT shop.*
\ds shop.*
-- errors in DDL
CREATE TABLE shop.customers (id int);
CREATE TABLE shop.bad (id int REFERENCES shop.nowhere (id));
ALTER TABLE shop.orders ADD CONSTRAINT positive CHECK (total > 0) NOT VALID;
ALTER TABLE shop.orders ADD COLUMN id int;
DROP VIEW shop.nothing_here;
DROP TABLE shop.customers;
CREATE TABLE shop.temp_like (LIKE shop.orders INCLUDING ALL);
TRUNCATE shop.temp_like;
DROP TABLE shop.temp_like;
CREATE TABLE IF NOT EXISTS shop.orders (id int);
DROP SCHEMA shop CASCADE;
