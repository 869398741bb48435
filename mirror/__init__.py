"""mirror: moves captured keys to the target: the outbox applier and ``sync_keys``."""
