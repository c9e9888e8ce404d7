"""dvc.yaml against the code: every stage declares what its Kedro pipeline really reads and writes.

Static checks (seconds): the stages are the pipelines; each stage's code deps cover the modules
its pipeline imports (the real import graph, read with ``ast``); its ``params:`` cover every
``params:`` input of its nodes; its data deps/outs cover every catalog file it reads/writes, and
the files it reads back from a previous run are ``persist: true`` outs; the lineage catalog entry
names an out of dvc.yaml; the remotes hold no credentials. ``tests/test_dvc_repro.py`` runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml
from configobj import ConfigObj

from tests.support.import_graph import imports_of
from tests.support.import_graph import module_file as _module_file

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TRAIN_STAGES = ("ingest", "preprocess", "fit", "evaluate", "register")  # `train`, in order
STAGES = ("sample_data", *TRAIN_STAGES)
# Persistent although no node loads them: the manifest that ingest reads back lists these cases
# as done, so deleting them before a re-run would lose them for good.
PERSIST_BESIDES_READ_BACK = {"data/02_intermediate/cases"}
# Read by a stage but deliberately not a DVC dependency: the pseudonymisation key (its file's hash
# would land in dvc.lock; changing the key means re-ingesting from scratch, see dvc.yaml).
NOT_DATA = {"pseudonymisation_key", "legacy_data_split"}  # the latter: a one-time migration read


@pytest.fixture(scope="module")
def dvc_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pipelines():
    from kedro.framework.project import configure_project

    configure_project("mvl_pipeline")
    from mvl_pipeline.pipeline_registry import register_pipelines

    return register_pipelines()


@pytest.fixture(scope="module")
def catalog() -> dict[str, Any]:
    """conf/base catalog with ${globals:...} resolved (what a `kedro run` in env base sees)."""
    from kedro.config import OmegaConfigLoader

    from mvl_pipeline.settings import CONFIG_LOADER_ARGS

    args = {**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    return OmegaConfigLoader(conf_source=str(ROOT / "conf"), env="base", **args)["catalog"]


def _vars(dvc_yaml: dict) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for entry in dvc_yaml.get("vars", []):
        path, _, keys = str(entry).partition(":")
        data = yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))
        values.update({k: data[k] for k in keys.split(",")} if keys else data)
    return values


def _paths(items: list, vars_: dict[str, Any]) -> dict[str, dict]:
    """{path: options} of a deps/outs/metrics/plots list, ${var} interpolated."""
    out = {}
    for item in items or []:
        path, options = (item, {}) if isinstance(item, str) else next(iter(item.items()))
        for name, value in vars_.items():
            path = path.replace("${" + name + "}", str(value))
        out[path.rstrip("/")] = options or {}
    return out


def _stage_outs(stage: dict, vars_: dict) -> dict[str, dict]:
    outs = {}
    for kind in ("outs", "metrics", "plots"):
        outs.update(_paths(stage.get(kind), vars_))
    return outs


def _stage_params(stage: dict) -> dict[str, list[str] | None]:
    params: dict[str, list[str] | None] = {}
    for entry in stage.get("params", []):
        if isinstance(entry, str):  # a key of params.yaml
            params.setdefault("params.yaml", []).append(entry)
        else:
            for file, keys in entry.items():
                params[file] = None if keys is None else list(keys)
    return params


# Stages whose node takes a whole parameter block but reads only a few keys of it, checked in the
# node's source: (stage, block) -> (module, argument name).
NARROWED_PARAMS = {("preprocess", "model"): ("mvl_pipeline.pipelines.preprocess.nodes", "model_params")}


def _keys_read(module: str, argument: str) -> set[str]:
    """Keys read from ``argument`` in ``module`` as ``argument.get("k")`` or ``argument["k"]``."""
    keys, other_uses = set(), 0
    for node in ast.walk(ast.parse(_module_file(module).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            target, key = node.func.value, node.args[0] if node.args else None
        elif isinstance(node, ast.Subscript):
            target, key = node.value, node.slice
        else:
            continue
        if isinstance(target, ast.Name) and target.id == argument:
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.add(key.value)
            else:
                other_uses += 1
    assert keys and not other_uses, f"{module}: cannot tell which keys of {argument} are read"
    return keys


def _imports(module: str) -> set[str]:
    """What ``module`` imports, plus its parent packages (importing a module runs them)."""
    parents = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    return imports_of(module) | {m for m in parents if _module_file(m)}


def _closure(modules: set[str]) -> set[Path]:
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen and _module_file(module):
            seen.add(module)
            todo.extend(_imports(module))
    return {_module_file(m).relative_to(ROOT) for m in seen}


def _dataset_modules(names: set[str], catalog: dict[str, Any]) -> set[str]:
    """Project modules that implement the catalog entries ``names`` (dataset types)."""
    modules = set()
    for name in names:
        entry = catalog.get(name) or {}
        for type_name in (entry.get("type", ""), (entry.get("dataset") or {}).get("type", "")):
            if type_name.startswith("mvl_pipeline."):
                modules.add(type_name.rpartition(".")[0])
    return modules


def _file_of(entry: dict[str, Any]) -> str | None:
    inner = entry.get("dataset") if isinstance(entry.get("dataset"), dict) else {}
    path = entry.get("filepath") or entry.get("path") or inner.get("filepath")
    return str(path).rstrip("/") if path else None


def test_one_stage_per_pipeline_running_it(dvc_yaml, tmp_path):
    """Each stage runs its pipeline with the project's .venv, found with nothing activated.

    DVC runs a stage's ``cmd`` as ``$SHELL -c CMD`` (``/bin/sh`` when SHELL is unset; bash with
    --noprofile --norc) in the stage's wdir, by default the folder of dvc.yaml: the project root.
    So ``$PWD/.venv/bin`` is the project's environment, and without a .venv the kedro on PATH runs.
    """
    import subprocess

    prefix = 'PATH="$PWD/.venv/bin:$PATH"'
    assert tuple(dvc_yaml["stages"]) == STAGES
    for name, stage in dvc_yaml["stages"].items():
        # --pipelines: Kedro 1.7 warns that --pipeline is deprecated
        assert stage["cmd"] == f"{prefix} kedro run --pipelines {name}"
        assert "wdir" not in stage  # $PWD is the project root

    elsewhere = tmp_path / "bin"
    elsewhere.mkdir()
    (elsewhere / "kedro").write_text("#!/bin/sh\n", encoding="utf-8")
    (elsewhere / "kedro").chmod(0o755)
    bare = {"PATH": f"{elsewhere}:/usr/bin:/bin"}  # a fresh shell: no .venv/bin on PATH
    for shell in ("/bin/sh", "/bin/bash"):
        for cwd, expected in ((ROOT, ROOT / ".venv/bin/kedro"), (tmp_path, elsewhere / "kedro")):
            found = subprocess.run(
                [shell, "-c", f"{prefix} command -v kedro"], cwd=cwd, env=bare, capture_output=True, text=True,
                check=False,
            )  # fmt: skip
            assert found.stdout.strip() == str(expected), (shell, cwd, found.stderr)


@pytest.mark.parametrize("stage_name", STAGES)
def test_code_deps_cover_the_import_graph(stage_name, dvc_yaml, pipelines, catalog):
    deps = set(_paths(dvc_yaml["stages"][stage_name].get("deps"), _vars(dvc_yaml)))
    pipeline = pipelines[stage_name]
    datasets = {d for d in pipeline.datasets() if not d.startswith("params:")}
    modules = {f"mvl_pipeline.pipelines.{stage_name}.pipeline"} | _dataset_modules(datasets, catalog)
    needed = _closure(modules)
    # the package root holds only __version__; pipelines/__init__ only a docstring
    needed -= {Path("src/mvl_pipeline/__init__.py"), Path("src/mvl_pipeline/pipelines/__init__.py")}
    assert needed, "the import graph must not be empty"
    uncovered = sorted(
        str(path) for path in needed if not any(path == Path(d) or Path(d) in path.parents for d in deps)
    )
    assert not uncovered, f"{stage_name}: code it imports but does not depend on: {uncovered}"
    # code and config deps exist in a clone; data deps are produced by an earlier stage
    # (a fresh clone has no data/ yet: dvc repro makes it)
    earlier = STAGES[: STAGES.index(stage_name)]
    produced = {
        Path(out)
        for name in earlier
        for out in _stage_outs(dvc_yaml["stages"][name], _vars(dvc_yaml))
    }
    for dep in deps:
        if dep.startswith("data/"):
            assert any(Path(dep) == out or out in Path(dep).parents for out in produced), (
                f"{stage_name}: data dep {dep} is no earlier stage's output"
            )
        else:
            assert (ROOT / dep).exists() or "://" in dep, f"{stage_name}: dep {dep} does not exist"


@pytest.mark.parametrize("stage_name", STAGES)
def test_params_cover_every_parameter_the_nodes_read(stage_name, dvc_yaml, pipelines):
    declared = _stage_params(dvc_yaml["stages"][stage_name])
    top_level_file = {}
    for path in sorted((ROOT / "conf/base").glob("parameters*.yml")):
        for key in yaml.safe_load(path.read_text(encoding="utf-8")) or {}:
            top_level_file[key] = f"conf/base/{path.name}"
    read = {name[len("params:") :] for name in pipelines[stage_name].inputs() if name.startswith("params:")}
    assert read, f"{stage_name} reads no parameters?"
    for (stage, block), (module, argument) in NARROWED_PARAMS.items():
        if stage == stage_name:  # the node reads only some keys of the block: track those
            read = (read - {block}) | {f"{block}.{key}" for key in _keys_read(module, argument)}
    for key in sorted(read):
        file = top_level_file[key.split(".")[0]]
        keys = declared.get(file, [])
        covered = keys is None or any(key == k or key.startswith(k + ".") for k in keys)
        assert covered, f"{stage_name} reads params:{key} but dvc.yaml does not track it in {file}"
    for file, keys in declared.items():
        data = yaml.safe_load((ROOT / file).read_text(encoding="utf-8"))
        for key in keys or []:
            value = data
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{file} has no key {key}"
                value = value[part]


@pytest.mark.parametrize("stage_name", STAGES)
def test_data_deps_and_outs_match_the_catalog(stage_name, dvc_yaml, pipelines, catalog):
    vars_ = _vars(dvc_yaml)
    stage = dvc_yaml["stages"][stage_name]
    deps, outs = _paths(stage.get("deps"), vars_), _stage_outs(stage, vars_)
    pipeline = pipelines[stage_name]
    written = {_file_of(catalog[d]) for d in pipeline.all_outputs() if d in catalog} - {None}
    read = {_file_of(catalog[d]) for d in pipeline.inputs() if d in catalog and d not in NOT_DATA} - {None}
    assert written, f"{stage_name} writes no file?"
    for path in sorted(written):
        assert path in outs, f"{stage_name} writes {path}, not an out in dvc.yaml"
    for path in sorted(read):
        if path in written:  # read back from its previous run: DVC must not delete it first
            assert outs[path].get("persist") is True, f"{stage_name}: {path} is read back, needs persist: true"
        else:
            assert path in deps, f"{stage_name} reads {path}, not a dep in dvc.yaml"
    for path, options in outs.items():
        if options.get("persist"):
            assert path in read or path in PERSIST_BESIDES_READ_BACK, f"{stage_name}: {path} is persist, never read"


def test_outs_do_not_overlap_and_every_data_dep_is_produced(dvc_yaml):
    vars_ = _vars(dvc_yaml)
    owner: dict[str, str] = {}
    for name, stage in dvc_yaml["stages"].items():
        for path in _stage_outs(stage, vars_):
            assert path.startswith("data/"), path
            for other, other_stage in owner.items():
                overlap = path == other or other.startswith(path + "/") or path.startswith(other + "/")
                assert not overlap, f"{name}: {path} overlaps {other_stage}'s {other}"
            owner[path] = name
    order = {name: index for index, name in enumerate(STAGES)}
    for name, stage in dvc_yaml["stages"].items():
        for path in _paths(stage.get("deps"), vars_):
            if path.startswith("data/"):
                assert path in owner, f"{name}: data dep {path} is produced by no stage"
                assert order[owner[path]] < order[name], f"{name} depends on a later stage's {path}"


def test_evaluation_summary_is_a_metric_and_the_plots_are_plots(dvc_yaml, catalog):
    evaluate = dvc_yaml["stages"]["evaluate"]
    metrics = set(_paths(evaluate["metrics"], {}))
    plots = set(_paths(evaluate["plots"], {}))
    assert metrics == {_file_of(catalog["evaluation_summary"])}
    assert plots == {
        _file_of(catalog[name]) for name in ("learning_curves_plot", "per_case_plot", "overlay_plot")
    }
    assert dvc_yaml["stages"]["register"].get("always_changed") is False


def test_lineage_reads_the_ingest_stage_out(dvc_yaml, catalog):
    from mvl_pipeline.datasets.lineage import LineageDataset

    entry = catalog["lineage"]
    defaults = LineageDataset()
    stage = entry.get("data_stage", defaults._stage)
    out = entry.get("data_out", defaults._out)
    assert (stage, out) == (defaults._stage, defaults._out) == ("ingest", "data/02_intermediate/cases")
    assert out in _stage_outs(dvc_yaml["stages"][stage], _vars(dvc_yaml))
    assert _file_of(catalog["ingested_cases"]) == out


def test_remotes_default_local_and_s3_without_credentials():
    config = ConfigObj(str(ROOT / ".dvc/config"))  # DVC's own config format
    assert config["core"]["remote"] == "local"
    assert config['remote "local"']["url"] == "../../mvl-dvc-store"  # relative to .dvc/: ../mvl-dvc-store
    s3 = config['remote "s3"']
    assert s3["url"].startswith("s3://")
    assert not {"access_key_id", "secret_access_key", "session_token", "credentialpath", "profile"} & set(s3)
    ignored = (ROOT / ".dvc/.gitignore").read_text(encoding="utf-8").split()
    assert {"/config.local", "/cache", "/tmp"} <= set(ignored)


@pytest.mark.parametrize("env", ["base", "local", "msd", "cluster", "scenario"])
def test_lineage_checks_the_cases_the_env_ingests(env, monkeypatch):
    """In every env the lineage describes the ingested cases that env's runs train on: under
    `--env msd` (data_root data/msd) not the sample drop's data/02_intermediate/cases."""
    from kedro.config import OmegaConfigLoader

    from mvl_pipeline.settings import CONFIG_LOADER_ARGS

    monkeypatch.setenv("MVL_DATA_ROOT", "s3://bucket/data")
    monkeypatch.setenv("MVL_DROP_URL", "s3://bucket/drop")
    args = {**CONFIG_LOADER_ARGS, "default_run_env": "base"}
    catalog = OmegaConfigLoader(conf_source=str(ROOT / "conf"), env=env, **args)["catalog"]
    assert catalog["lineage"].get("data_out") == _file_of(catalog["ingested_cases"])
