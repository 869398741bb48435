"""dualwrite: the shared core (config, errors, metrics, logs, wire codec, mapping) and the CLI."""

__version__ = "0.1.0"
