"""The package's layers import one way: each module imports only modules below it, and modeling/ imports nothing of mlpmem.

Every import counts, also those inside functions (most of ours are, to keep start-up light), except
under ``if __name__ == "__main__":`` (a script's entry, not a dependency). A new module must be placed
in LAYERS: where it goes says what it may use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "mlpmem"

# bottom to top; within a layer, too, a module imports only those listed before it
LAYERS: dict[str, list[str]] = {
    # what save_pretrained copies and remote code runs without mlpmem
    "modeling": [
        "modeling.errors",
        "modeling.read_site",
        "modeling.mixing",
        "modeling.mlp_memory",
        "modeling.gating",
        "modeling.configuration_mlpmem",
        "modeling.integration",
        "modeling.saving",
        "modeling.modeling_mlpmem",
        "modeling",
    ],
    # the toolkit every stage uses: the LM loader and device, configs, the stage registry (what each stage and folder is),
    # folders and manifests, mixture fitting
    "core": [
        "_version",
        "errors",
        "models",
        "dist",
        "losses",
        "typed_config",
        "stages",
        "files",
        "folders",
        "manifest",
        "interpolate",
        "wordnet",
    ],
    # the pipeline's stages and the pipeline that runs them
    "stages": [
        "corpus",
        "datastore",
        "index",
        "targets",
        "memory",
        "train.config",
        "train.schedule",
        "train.metrics",
        "train.model",
        "train.checkpoint",
        "train.data",
        "train.loop",
        "train",
        "evaluate",
        "retrieval",
        "gate",
        "finetune",
        "probe",
        "knowledge_tasks",
        "pipeline",
        "plan",
    ],
    # other libraries' doors: transformers constructors, generation, lm-eval backends
    "integrations": ["transformers_integration", "generation", "lm_eval_backend", "rag", "lm_eval_cli", "tasks.knowledge.utils"],
    # (tasks/knowledge/utils.py: the metrics lm-eval loads from a built task folder, a copy of this file)
    # what users run; the package root registers the integration hooks
    # old module names kept for one release (each re-exports its new home with a deprecation warning)
    "entry": ["cli", "__main__", "hf", "config", "store", ""],
}
ORDER = [m for mods in LAYERS.values() for m in mods]
RANK = {m: i for i, m in enumerate(ORDER)}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_block(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def imports_of(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The mlpmem modules ``path`` imports (as names relative to the package), wherever the import sits."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "mlpmem" or (node.module or "").startswith("mlpmem."):
                target = node.module.removeprefix("mlpmem").removeprefix(".")
            else:
                target = None
            if target is not None:
                subs = {f"{target}.{a.name}".lstrip(".") for a in node.names} & modules
                found.update(subs or {target})
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "mlpmem" or a.name.startswith("mlpmem."):
                    found.add(a.name.removeprefix("mlpmem").removeprefix("."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f, modules) for f in files}


def test_every_module_has_a_layer():
    unplaced = sorted(set(graph()) - set(RANK))
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS: {unplaced}"


def test_imports_run_only_downwards():
    up = sorted((m, t) for m, targets in graph().items() for t in targets if m in RANK and t in RANK and RANK[t] >= RANK[m])
    assert not up, "imports that run back up (module -> target): " + ", ".join(f"{m or 'mlpmem'} -> {t or 'mlpmem'}" for m, t in up)


def test_modeling_imports_nothing_of_mlpmem():
    outside = sorted((m, t) for m, targets in graph().items() if m.startswith("modeling") for t in targets if not t.startswith("modeling"))
    assert not outside, f"modeling/ must load without mlpmem (remote code): {outside}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from mlpmem.cli import main\n", {"cli"}),
        ("def f():\n    from mlpmem import transformers_integration\n", {"transformers_integration"}),
        ("from .read_site import capture\n", {"modeling.read_site"}),
        ("if __name__ == '__main__':\n    from mlpmem.cli import main\n", set()),
    ],
)
def test_the_checker_sees_imports(tmp_path, source, expected):
    """The checker itself: top-level, in-function and relative imports count, a script's __main__ block does not."""
    fake = tmp_path / "mlpmem"
    (fake / "modeling").mkdir(parents=True)
    for name in ("cli.py", "transformers_integration.py", "modeling/read_site.py", "modeling/__init__.py"):
        (fake / name).write_text("")
    (fake / "modeling" / "x.py").write_text(source)
    modules = {module_name(f, fake) for f in fake.rglob("*.py")}
    assert imports_of(fake / "modeling" / "x.py", modules, fake) == expected


@pytest.mark.parametrize(
    "old, new, name",
    [("hf", "transformers_integration", "from_memory"), ("config", "typed_config", "build"), ("store", "datastore", "Datastore")],
)
def test_renamed_modules_still_import_for_one_release(old, new, name):
    """A script written against the old module names keeps working, and is told the new name."""
    import importlib
    import sys
    import warnings

    sys.modules.pop(f"mlpmem.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"mlpmem.{old}")
    assert getattr(module, name) is getattr(importlib.import_module(f"mlpmem.{new}"), name)
    assert any(issubclass(w.category, DeprecationWarning) and f"mlpmem.{new}" in str(w.message) for w in caught)
