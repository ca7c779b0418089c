"""The package's shape: layers import downward only, no import cycle at any nesting level, the core is pure
torch, and only the plugin entry point changes anything outside the package when imported."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "verl_eopd"
# layer -> the layers it may import (besides itself); main and plugin sit on top
ALLOWED = {
    "core": set(),
    "integration": {"core"},
    "cpu": {"core", "integration"},
    "math": {"core", "integration", "cpu"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """module -> verl_eopd modules it imports anywhere in its body (top level or inside functions)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "top"


def test_no_import_cycle_at_any_nesting_level():
    graph = _imports()
    # a package's own __init__ importing its children is how re-exports work; children never import it back
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_layers_import_downward_only():
    bad = []
    for module, deps in _imports().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue  # verl_eopd, verl_eopd.main, verl_eopd.plugin: the top
        for d in deps:
            dl = _layer(d)
            if dl != layer and dl not in ALLOWED[layer]:
                bad.append(f"{module} -> {d}")
    assert not bad, bad


def test_core_never_mentions_verl_ray_or_transformers():
    for path in (PKG / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                assert n.split(".")[0] not in ("verl", "ray", "transformers", "hydra"), f"{path.name} imports {n}"


def _python(code: str, **env) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_verl_eopd_loads_neither_verl_nor_ray():
    facts = _python("import json, sys, verl_eopd, verl_eopd.core\n"
                    "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'verl', 'ray', 'transformers'})))")
    assert facts == []


def test_only_the_plugin_changes_anything_when_imported():
    """Import every other module (verl's own entry-point discovery off): verl's registries, torch and the
    patch registry are untouched; then importing the plugin registers what it should."""
    modules = sorted(m for m in _imports() if m != "verl_eopd.plugin")
    code = f"""
import importlib, json, torch, torch.distributed as dist
init_pg, cpu_attrs = dist.init_process_group, set(dir(torch.cpu))
for m in {modules!r}:
    importlib.import_module(m)
import verl.trainer.distillation.losses as L
from verl.workers.rollout.replica import RolloutReplicaRegistry as R
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY as T
from verl_eopd.integration import patches
before = {{'loss': 'eopd' in L.DISTILLATION_LOSS_REGISTRY, 'hf': 'hf' in R._registry, 'trainer': 'eopd' in T,
          'patches': patches.applied(), 'torch': dist.init_process_group is init_pg and set(dir(torch.cpu)) == cpu_attrs}}
import verl_eopd.plugin
after = {{'loss': 'eopd' in L.DISTILLATION_LOSS_REGISTRY, 'hf': 'hf' in R._registry, 'patches': patches.applied()}}
print(json.dumps({{'before': before, 'after': after}}))
"""
    facts = _python(code, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="", VERL_PLATFORM="",
                    EOPD_TASK_RUNNER="")
    assert facts["before"] == {"loss": False, "hf": False, "trainer": False, "patches": [], "torch": True}
    assert facts["after"] == {"loss": True, "hf": True, "patches": ["verl-trainer-main-alias", "rollout-registry-hf"]}


def test_docs_and_docstrings_cite_only_files_in_the_repository():
    import re

    root = PKG.parent
    pattern = re.compile(r"(?<![\w/.-])((?:verl_eopd|scripts|docs|tests|\.ci)/[\w./-]+\.(?:py|md|yaml|sh|png|json|jsonl))")
    sources = [root / "README.md", *root.glob("docs/*.md"), *PKG.rglob("*.py"), *PKG.rglob("*.yaml"),
               *root.glob("scripts/*"), *root.glob("tests/*.py")]
    missing = [f"{src.relative_to(root)}: {m.group(1)}" for src in sources for m in pattern.finditer(src.read_text())
               if not (root / m.group(1).rstrip(".")).exists()]
    assert not missing, missing
