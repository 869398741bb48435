"""dualwrite: the shared core (config, errors, metrics, logging, wire codec, mapping) and the CLI."""

__version__ = "0.1.0"
