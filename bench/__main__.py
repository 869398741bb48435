"""``python -m bench NAME [options]``: dispatches to one benchmark module's ``main(argv)``.

To add a benchmark, write ``bench/NAME.py`` with a one-line module docstring and a
``main(argv: list[str]) -> int``, then add it to ``BENCHMARKS`` below.
"""

from __future__ import annotations

import importlib
import sys

#: benchmark name -> module holding its ``main(argv)``; imported only when chosen
BENCHMARKS: dict[str, str] = {
    "relay": "bench.relay",
    "mirror": "bench.mirror",
    "compare": "bench.compare",
    "drain": "bench.drain",
    "replay": "bench.replay",
    "lint": "bench.lint",
    "wal": "bench.wal",
    "shadow": "bench.shadow",
    "upsert": "bench.upsert",
}


def _summary(module_name: str) -> str:
    """The first line of a benchmark module's docstring."""
    doc = importlib.import_module(module_name).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    lines = ["usage: python -m bench NAME [options]   (python -m bench NAME --help)", ""]
    lines += [f"  {name:<10} {_summary(module)}" for name, module in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    return int(module.main(rest))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
