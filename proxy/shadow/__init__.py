"""Shadow reads: sampled application reads replayed against the new schema and compared."""
