"""Build hook for the one optional C extension (the frame-scanning loop); the rest: pyproject."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a compiler the pure-Python loop in frames.py is used instead
        Extension("proxy.wire._speedups", ["proxy/wire/_speedups.c"], optional=True)
    ]
)
