"""core: what every layer shares: config, the compiled mapping, catalog checks, the control
schema, SQL text, errors, metrics and logs. It imports nothing of proxy, compare or mirror."""

__version__ = "0.1.0"
