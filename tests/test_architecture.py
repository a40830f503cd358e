"""The layers hold: no import cycle anywhere in the package (function-local imports included), the
import-linter contract in pyproject.toml is kept, and nothing in the package, tests or CPU experiments
reads outside the repository."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

from conftest import REPO


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each one import cycle or more."""
    modules = sorted(graph.modules)
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in modules:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = grimp.build_graph("instruct_jax")
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    class Graph:  # a -> b -> c -> a, d alone
        modules = {"a", "b", "c", "d"}
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

        def find_modules_directly_imported_by(self, m):
            return self.edges.get(m, set())

    assert _cycles(Graph()) == [["a", "b", "c"]]


def test_layer_contract_is_kept():
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([lint_imports], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_nothing_reads_outside_the_repository():
    """The tests, the package and the CPU experiments use the repository's own data/ folder."""
    offenders = []
    for folder in ("instruct_jax", "tests", "experiments", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"""["']\.\.["'][^\n]*["']shared["']|\.\./shared""", text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_every_benchmark_script_starts_from_a_fresh_directory(tmp_path):
    """`python benchmarks/X.py` works as documented without installing the package (each puts the repository
    on sys.path itself): --help from another directory, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    failed = {}
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        if script.name == "common.py":
            continue
        result = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            failed[script.name] = result.stderr[-500:]
    assert failed == {}
