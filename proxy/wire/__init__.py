"""The sans-IO PostgreSQL protocol v3 codec: frame boundaries and the messages we read or build."""
