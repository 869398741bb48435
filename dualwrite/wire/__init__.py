"""The sans-IO PostgreSQL protocol v3 codec: frame boundaries and the messages the proxy reads or builds."""
