"""Fails when any of our packages' modules import each other in a circle, TYPE_CHECKING included.

import-linter's contracts say which way the layers point; this says there is no cycle at all,
inside a layer as well as across layers. A cycle is a strongly connected component of more than
one module in grimp's import graph (imports under ``if TYPE_CHECKING:`` count: they still tie
the modules' meaning together).

    python scripts/check_import_cycles.py [--allow proxy.a,proxy.b ...]

Exit status 0: no cycle but allowed ones; 1: a cycle was found (each is listed with one import
chain that closes it); 2: usage. ``--allow`` names a known cycle by its exact set of modules: it
is reported as a warning, not a failure, for as long as it is exactly that set.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence

import grimp

PACKAGES = ("dualwrite", "proxy", "compare", "lint", "mirror", "core")


def import_graph(packages: Sequence[str]) -> dict[str, set[str]]:
    """Each module of ``packages`` and the modules of ``packages`` it imports directly."""
    graph = grimp.build_graph(
        *packages,
        include_external_packages=False,
        exclude_type_checking_imports=False,
        cache_dir=None,  # a few dozen modules parse in a blink; no cache to go stale
    )
    return {module: graph.find_modules_directly_imported_by(module) for module in graph.modules}


def cycles(imports: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted, in name order
    (Tarjan's algorithm, iterative so that a deep chain cannot exhaust Python's stack)."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in sorted(imports):
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(imports[root]))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, pending = work[-1]
            if pending:
                target = pending.pop()
                if target not in index:
                    index[target] = lowlink[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, sorted(imports.get(target, ()))))
                elif target in on_stack:
                    lowlink[module] = min(lowlink[module], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                lowlink[parent] = min(lowlink[parent], lowlink[module])
            if lowlink[module] == index[module]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def closing_chain(imports: Mapping[str, Iterable[str]], component: Sequence[str]) -> list[str]:
    """One import chain inside ``component`` from its first module back to itself."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for module in frontier:
            for target in sorted(set(imports.get(module, ())) & members):
                if target == start:
                    return [*_path_to(previous, start, module), start]
                if target not in previous:
                    previous[target] = module
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not a cycle")


def _path_to(previous: Mapping[str, str], start: str, module: str) -> list[str]:
    """The breadth-first path from ``start`` to ``module`` that ``previous`` records."""
    path = [module]
    while path[-1] != start:
        path.append(previous[path[-1]])
    return path[::-1]


def parse_allowed(values: Sequence[str]) -> list[frozenset[str]]:
    """Each ``--allow`` value as the set of modules it names."""
    allowed = []
    for value in values:
        modules = frozenset(name.strip() for name in value.split(",") if name.strip())
        if len(modules) < 2:
            raise argparse.ArgumentTypeError(f"--allow {value!r}: a cycle has at least 2 modules")
        allowed.append(modules)
    return allowed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="MODULE,MODULE,...",
        help="tolerate (with a warning) the cycle made of exactly these modules",
    )
    parser.add_argument(
        "packages", nargs="*", default=list(PACKAGES), help="root packages (default: ours)"
    )
    args = parser.parse_args(argv)
    try:
        allowed = parse_allowed(args.allow)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    imports = import_graph(args.packages)
    failures = 0
    seen_allowed: set[frozenset[str]] = set()
    for component in cycles(imports):
        chain = " -> ".join(closing_chain(imports, component))
        if frozenset(component) in allowed:
            seen_allowed.add(frozenset(component))
            print(f"warning: allowed import cycle: {chain}", file=sys.stderr)
            continue
        failures += 1
        print(f"import cycle among {', '.join(component)}: {chain}")
    for modules in allowed:
        if modules not in seen_allowed:
            print(
                f"warning: --allow {','.join(sorted(modules))} matches no cycle now; drop it",
                file=sys.stderr,
            )
    if failures:
        print(f"{failures} import cycle(s) in {', '.join(args.packages)}")
        return 1
    tolerated = f", {len(seen_allowed)} allowed" if seen_allowed else ""
    print(f"no import cycles in {', '.join(args.packages)} ({len(imports)} modules{tolerated})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
