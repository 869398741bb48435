"""Build hook for the optional C extensions (the frame scanner and the native relay loop);
the rest: pyproject."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a compiler the pure-Python loop in frames.py is used instead
        Extension("proxy.wire._speedups", ["proxy/wire/_speedups.c"], optional=True),
        # optional: without it every session is relayed by the Python path (proxy/native.py)
        Extension("proxy.wire._relayloop", ["proxy/wire/_relayloop.c"], optional=True),
    ]
)
