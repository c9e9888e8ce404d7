"""The house rules of src/ (docs/architecture.md), held by the real import graph read with ``ast``:

- imports flow one way: pipelines -> domain packages -> core; nothing imports a package of a
  higher layer, and packages of one layer do not import each other (no sideways imports);
- no pipeline imports another pipeline (``train`` composes the stages' ``create_pipeline`` only);
- no import cycle between modules; no module over 400 lines;
- docs/architecture.md names every package of src/mvl_pipeline (the document matches the tree).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.import_graph import imports_of, module_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mvl_pipeline"
MAX_LINES = 400

#: Layers, bottom first. A module may import its own package and any package of a LOWER layer.
LAYERS: list[set[str]] = [
    {"core"},
    {"formats"},
    {"dicom", "model", "preprocessing", "k8s"},
    {"synthetic", "ingestion", "evaluation"},
    {"training"},
    {"serving"},
    {"datasets"},
    {"pipelines"},
    {"run_checks"},  # the run's parameters, checked by the hooks before the first node
    {"hooks"},  # Kedro hooks: settings.py registers them
    {"commands", "settings", "pipeline_registry", "__main__"},
    {"predict"},  # the documented `python -m mvl_pipeline.predict`: a name for commands/predict.py
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_package_and_module_has_a_layer():
    names = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir() if p.name not in ("__init__.py", "__pycache__")}
    assert names - set(RANK) == set(), "add the new package to LAYERS (and docs/architecture.md)"


def test_imports_flow_down_never_up_or_sideways(graph):
    wrong = []
    for module, imported in graph.items():
        if module == "mvl_pipeline":
            continue
        for target in imported:
            source_top, target_top = _top(module), _top(target)
            if source_top == target_top:
                continue
            if RANK[target_top] >= RANK[source_top]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_pipeline_imports_another_pipeline(graph):
    wrong = []
    for module, imported in graph.items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != "pipelines":
            continue
        for target in imported:
            target_parts = target.split(".")
            if len(target_parts) >= 3 and target_parts[1] == "pipelines" and target_parts[2] != parts[2]:
                # `train` is the chain of the stages: it may take their create_pipeline, nothing else
                if parts[2] == "train" and len(target_parts) == 3:
                    continue
                wrong.append(f"{module} -> {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_modules(graph):
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def edges(module: str) -> set[str]:
        # importing a package runs its __init__: an edge to it, not to every module inside
        return {t for t in graph.get(module, set()) if t in graph and t != module}

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


def test_the_architecture_document_names_every_package():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    packages = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    missing = [name for name in packages if f"{name}/" not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"
    pipelines = sorted(p.name for p in (PACKAGE / "pipelines").iterdir() if (p / "pipeline.py").is_file())
    assert [name for name in pipelines if f"`{name}`" not in text] == []


def test_the_rules_catch_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a core module importing a pipeline is reported."""
    fake = {"mvl_pipeline.core.volume": {"mvl_pipeline.pipelines.fit.nodes"}, "mvl_pipeline.pipelines.fit.nodes": set()}
    with pytest.raises(AssertionError, match="core.volume -> mvl_pipeline.pipelines.fit.nodes"):
        test_imports_flow_down_never_up_or_sideways(fake)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_between_modules({"mvl_pipeline.a": {"mvl_pipeline.b"}, "mvl_pipeline.b": {"mvl_pipeline.a"}})
