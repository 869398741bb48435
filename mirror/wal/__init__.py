"""mirror.wal: capture from the WAL: the pgoutput decoder, key derivation, the reader, the slot."""
