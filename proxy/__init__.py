"""proxy: the PostgreSQL wire-protocol sidecar (relay, statement rewrite, admin HTTP server)."""
