"""The layout shows the data flow: packages import one way, and the report never loads a model."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "notice"
PARTS = ("corrupt", "tasks", "models", "training", "evaluation", "report", "analysis", "patching")


def _part(module: str) -> str | None:
    """The top-level part of notice a module belongs to (notice.models.blip → models)."""
    names = module.split(".")
    return names[1] if len(names) > 1 and names[0] == "notice" and names[1] in PARTS else None


def import_graph() -> dict[str, set[str]]:
    """Part → parts it imports anywhere in its files (module level and inside functions)."""
    graph: dict[str, set[str]] = {part: set() for part in PARTS}
    for path in SRC.rglob("*.py"):
        module = ".".join(("notice",) + path.relative_to(SRC).with_suffix("").parts)
        source = _part(module)
        if source is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for target in targets:
                part = _part(target)
                if part is not None and part != source:
                    graph[source].add(part)
    return graph


def test_forbidden_imports_are_absent():
    graph = import_graph()
    assert not graph["corrupt"] & {"tasks", "models"}  # pure functions
    assert "corrupt" not in graph["models"]
    assert "training" not in graph["evaluation"]
    assert "models" not in graph["report"]
    assert not graph["models"] & {"patching", "tasks", "report", "analysis", "evaluation", "training"}


def test_no_cycles_between_the_parts_that_feed_each_other():
    graph = import_graph()
    core = {"corrupt", "tasks", "models", "training", "evaluation"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt}))
                   for nxt in graph[start] & core)

    assert [part for part in core if reaches(part, part, {part})] == []


def test_the_report_reads_tables_without_loading_any_model_code():
    code = ("import sys, notice.report.build, notice.analysis.head_functions; "
            "print(sorted(m for m in sys.modules if m.startswith('notice.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_nothing_outside_models_probes_adapters_for_members():
    offenders = [str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                 if "models" not in path.relative_to(SRC).parts
                 and any(f"{probe}(adapter" in path.read_text() for probe in ("hasattr", "getattr"))]
    assert offenders == []
