"""On-demand benchmarks of dualwrite (``python -m bench NAME``); never part of the test suite."""
