"""Imports go one way, down: every import in raygpt/, inside functions too, is checked against the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import raygpt

ROOT = Path(raygpt.__file__).parent

# Bottom to top. A unit (a flat module or a package) may import units of lower layers only;
# units that share a layer do not import each other. Within a unit anything goes.
LAYERS = [
    ["raygpt", "raygpt.errors", "raygpt.logs"],  # raygpt: the package's own __init__ (its version)
    # The storage seam knows what a URI is, and config checks every URI of a spec with it.
    ["raygpt.storage"],
    ["raygpt.config"],
    ["raygpt.tokenizer", "raygpt.stats", "raygpt.prompts", "raygpt.localstore", "raygpt.cluster", "raygpt.cost"],
    ["raygpt.stages"],
    ["raygpt.model"],
    ["raygpt.data", "raygpt.weights", "raygpt.hellaswag", "raygpt.sample"],
    ["raygpt.evaluate"],
    ["raygpt.train"],
    ["raygpt.ift"],
    ["raygpt.judge", "raygpt.report"],
    ["raygpt.sweep"],
    ["raygpt.cli"],
]
LAYER_OF = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}

FORBIDDEN = {
    # The model is pure torch: importable where Ray, boto3 or rich are not (the GPU check).
    "raygpt.model": ("ray", "boto3", "rich", "raygpt.storage", "raygpt.tokenizer"),
    # The judge talks HTTP and does statistics; a judge run needs no torch.
    "raygpt.judge": ("torch",),
    # Statistics are numbers in, numbers out (numpy, scipy): no torch, no cluster, no terminal.
    "raygpt.stats": ("torch", "ray", "rich", "openai"),
    "raygpt.report": ("torch", "raygpt.judge"),
    # What the Ray-free GPU check (benchmarks/gpu_check.py) runs, on a machine without Ray.
    "raygpt.train.step": ("ray",), "raygpt.train.metrics": ("ray",), "raygpt.train.components": ("ray",),
    "raygpt.train.plan": ("ray",), "raygpt.train.parallel": ("ray",), "raygpt.train.schedule": ("ray",),
    "raygpt.train.sinks": ("ray",), "raygpt.train.saving": ("ray",), "raygpt.train.attempts": ("ray", "torch"),
    "raygpt.train.samples": ("ray",), "raygpt.train.resume": ("ray",),
    "raygpt.train.lease": ("ray", "torch"), "raygpt.data": ("ray", "boto3"), "raygpt.weights": ("ray", "boto3"),
    "raygpt.sample": ("ray", "boto3"), "raygpt.cost": ("torch", "ray"),
    "raygpt.evaluate": ("boto3",),
    # A sweep's comparison is numbers and words: its report reads files, never a model.
    "raygpt.sweep.compare": ("torch", "ray"), "raygpt.sweep.spec": ("torch", "ray"),
}


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, those inside functions and TYPE_CHECKING blocks included."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
            if module == "raygpt":  # ``from raygpt import storage`` imports raygpt.storage
                found += [(node.lineno, f"raygpt.{a.name}") for a in node.names if f"raygpt.{a.name}" in LAYER_OF]
    return found


def layer_violations(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        own = unit_of(importer)
        if own not in LAYER_OF:
            problems.append(f"{importer}: has no layer in LAYERS")
            continue
        for line, imported in imports_of(path, root):
            if not (imported == "raygpt" or imported.startswith("raygpt.")):
                continue
            target = unit_of(imported)
            if target == own or target == "raygpt":
                continue
            if LAYER_OF[target] >= LAYER_OF[own]:
                way = "up" if LAYER_OF[target] > LAYER_OF[own] else "sideways"
                problems.append(f"{path.relative_to(root.parent)}:{line}: {importer} imports {imported} ({way})")
    return problems


def forbidden_imports(root: Path) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        for prefix, banned in FORBIDDEN.items():
            if importer == prefix or importer.startswith(prefix + "."):
                problems += [f"{path.relative_to(root.parent)}:{line}: {importer} imports {imported}"
                             for line, imported in imports_of(path, root)
                             if any(imported == b or imported.startswith(b + ".") for b in banned)]
    return problems


def test_imports_go_down_never_up_or_sideways():
    assert layer_violations(ROOT) == []


def test_no_forbidden_imports():
    assert forbidden_imports(ROOT) == []


def test_the_checks_catch_function_level_relative_and_sideways_imports(tmp_path):
    root = tmp_path / "raygpt"
    (root / "judge").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "model.py").write_text("import torch\n\ndef f():\n    import raygpt.cli\n    import ray\n")
    (root / "stats.py").write_text("from raygpt.tokenizer import encode\n")
    (root / "judge" / "__init__.py").write_text("")
    (root / "judge" / "run.py").write_text("from ..report import x\nfrom . import summary\nimport torch\n")
    (root / "extra.py").write_text("")
    assert layer_violations(root) == [
        "raygpt.extra: has no layer in LAYERS",
        "raygpt/judge/run.py:1: raygpt.judge.run imports raygpt.report (sideways)",
        "raygpt/model.py:4: raygpt.model imports raygpt.cli (up)",
        "raygpt/stats.py:1: raygpt.stats imports raygpt.tokenizer (sideways)",
    ]
    assert forbidden_imports(root) == ["raygpt/judge/run.py:3: raygpt.judge.run imports torch",
                                       "raygpt/model.py:5: raygpt.model imports ray"]
