"""The point-of-sale demo: its schemas (old and new), its migrations and its workload."""
