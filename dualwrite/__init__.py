"""dualwrite: the application layer: the command line, the service wiring, the admin HTTP server,
the demo and the embedded-cluster helper. It may import every other package."""

from core import __version__

__all__ = ["__version__"]
