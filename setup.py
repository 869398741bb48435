"""Build hook for the one optional C extension (the frame-scanning loop); the rest: pyproject."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # optional: without a compiler the pure-Python loop in frames.py is used instead
        Extension("dualwrite.wire._speedups", ["dualwrite/wire/_speedups.c"], optional=True)
    ]
)
