"""Pipeline slice: ingested cases -> `preprocess` with SequentialRunner -> model inputs, plan and
split; incremental re-runs recompute nothing, or only the changed case."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from mvl_pipeline.core.case import Case
from mvl_pipeline.datasets.case_store import CaseStoreDataset
from mvl_pipeline.pipelines.preprocess import create_pipeline, nodes
from mvl_pipeline.preprocessing.apply import restore_to_original
from mvl_pipeline.preprocessing.config import PreprocessConfig
from mvl_pipeline.synthetic import phantom

PROJECT = Path(__file__).resolve().parents[3]
CATALOG_YML = PROJECT / "conf" / "base" / "catalog_preprocess.yml"
PARAMS_YML = PROJECT / "conf" / "base" / "parameters_preprocess.yml"
MODEL_PARAMS = {"patch_size": [8, 8, 8], "token_budget": 512}


def _case(
    patient: int,
    study: int,
    *,
    orientation: str = "axial",
    spacing=(7.0, 7.0, 10.0),
    shape=(46, 38, 12),
) -> Case:
    rng = np.random.default_rng(1000 * patient + study)
    anatomy = phantom.sample_anatomy(np.random.default_rng(patient))
    affine = phantom.acquisition_affine(
        shape=shape, spacing=spacing, orientation=orientation, centre=anatomy.scan_centre
    )
    image, label = phantom.simulate_ct(anatomy, affine, shape, rng)
    case_id = f"case{patient:02d}{study}"
    meta = {
        "modality": "CT",
        "label_names": {"1": "organ", "2": "lesion"},
        "source_hash": f"h-{case_id}-v1",
    }
    return Case(case_id, f"pat{patient:02d}", image, label, meta)


@pytest.fixture(scope="module")
def drop() -> dict[str, Case]:
    cases = [_case(p, 0) for p in range(6)]
    cases.append(_case(2, 1, orientation="coronal", shape=(46, 14, 38)))  # a second study, coronal
    cases.append(_case(4, 1, spacing=(7.0, 7.0, 5.0), shape=(46, 38, 22)))  # thinner slices
    return {c.case_id: c for c in cases}


def _params(**apply) -> dict:
    params = yaml.safe_load(PARAMS_YML.read_text())["preprocess"]
    params["apply"] |= {"workers": 2, "progress_every": 2, **apply}
    return params


def _catalog(root: Path, params: dict) -> DataCatalog:
    config = yaml.safe_load(CATALOG_YML.read_text().replace("${globals:data_root}", str(root)))
    catalog = DataCatalog.from_config(config)
    catalog["ingested_cases"] = CaseStoreDataset(
        path=str(root / "02_intermediate" / "cases"), format="nifti"
    )
    catalog["params:preprocess"] = MemoryDataset(params)
    catalog["params:model"] = MemoryDataset(MODEL_PARAMS)
    return catalog


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Records the case ids preprocess_case is called for (from the worker threads)."""
    calls: list[str] = []
    lock = threading.Lock()
    original = nodes.preprocess_case

    def counting(image, plan, *, label=None, modality=None, channels=None):
        with lock:
            calls.append(hashlib_of(image))
        return original(image, plan, label=label, modality=modality, channels=channels)

    monkeypatch.setattr(nodes, "preprocess_case", counting)
    return calls


def hashlib_of(volume) -> str:
    return f"{volume.shape}-{float(np.asarray(volume.array).sum()):.3f}"


def _run(root: Path, params: dict) -> None:
    SequentialRunner().run(create_pipeline(), _catalog(root, params))


def _case_json(root: Path) -> dict[str, str]:
    folder = root / "05_model_input" / "cases"
    return {p.parent.name: p.read_text() for p in sorted(folder.glob("*/case.json"))}


def _split(root: Path, name: str = "split") -> dict:
    return json.loads((root / "03_primary" / f"{name}.json").read_text())


def test_preprocess_pipeline_end_to_end_and_incremental(tmp_path, drop, counted):
    ingested = CaseStoreDataset(path=str(tmp_path / "02_intermediate" / "cases"), format="nifti")
    ingested.save(dict(drop))
    params = _params()

    # -- first run: the split first, then everything of the development patients is computed --
    _run(tmp_path, params)
    split = _split(tmp_path)
    development = sorted(c for role in ("train", "validation") for c in split[role])
    held_out = sorted(c for role in ("gate", "test") for c in split[role])
    assert sorted(development + held_out) == sorted(drop) and held_out
    assert len(counted) == len(development)
    plan = json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text())
    fingerprint = json.loads((tmp_path / "04_feature" / "dataset_fingerprint.json").read_text())
    # the plan learns from development cases only: no gate or test case in the fingerprint
    assert sorted(fingerprint["cases"]) == development and fingerprint["n_cases"] == len(development)
    assert (
        plan["patch_size"] and all(p % 8 == 0 for p in plan["patch_size"]) and plan["tokens"] <= 512
    )
    # an ordinary axial study of a patient with a second study (the layout depends on the seeded split)
    two_studies = [c for c in ("case020", "case040") if c in development]
    assert two_studies, split["patients"]
    if "case021" in development:  # RAS spacings: the coronal case's 10 mm slices lie along y
        assert fingerprint["cases"]["case021"]["spacing"] == [7.0, 10.0, 7.0]

    model_inputs = CaseStoreDataset(path=str(tmp_path / "05_model_input" / "cases"), format="npy")
    loaded = {cid: load() for cid, load in model_inputs.load().items()}
    assert sorted(loaded) == development  # held-out cases are scored from their ingested originals
    for case_id, case in loaded.items():
        assert case.image.array.dtype == np.float32 and case.label.array.dtype == np.uint8
        assert np.isfinite(case.image.array).all()
        assert set(np.unique(case.label.array)) <= {0, 1, 2}
        assert np.allclose(case.image.spacing, plan["target_spacing"])
        assert case.meta["plan_id"] == plan["plan_id"]
        assert case.meta["source_hash"] == drop[case_id].meta["source_hash"]
        assert case.patient_id == drop[case_id].patient_id
        # the stored record maps the model-space label back onto the ingested grid
        restored = restore_to_original(
            np.asarray(case.label.array), case.meta["preprocess"], is_label=True
        )
        original = drop[case_id].label.array
        organ = (restored == 1) & (original == 1)
        assert 2 * organ.sum() / ((restored == 1).sum() + (original == 1).sum()) > 0.85

    patients = {c.patient_id for c in drop.values()}
    roles = ("train", "validation", "gate", "test")
    by_split = {s: {drop[c].patient_id for c in split[s]} for s in roles}
    assert set().union(*by_split.values()) == patients
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not by_split[a] & by_split[b], (a, b)
    assert all(by_split.values())  # 6 patients: every role has one
    assert by_split == {s: set(split["patients"][s]) for s in by_split}
    # each stage's view holds its roles only
    views = {name: _split(tmp_path, f"split_{name}") for name in ("development", "gate", "test")}
    assert set(views["development"]["patients"]) == {"train", "validation"}
    assert views["gate"]["gate"] == split["gate"] and "test" not in views["gate"]
    assert views["test"]["test"] == split["test"] and "gate" not in views["test"]

    before = _case_json(tmp_path)
    split_before = (tmp_path / "03_primary" / "split.json").read_text()

    # -- second run, nothing changed: nothing is recomputed, nothing rewritten -------------
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    assert _case_json(tmp_path) == before
    assert json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text()) == plan
    assert (tmp_path / "03_primary" / "split.json").read_text() == split_before

    # -- a held-out study re-sent upstream (other pixels): the fingerprint and plan do not move --
    for case_id in held_out:
        case = drop[case_id]
        ingested.save({case_id: Case(case.case_id, case.patient_id, case.image.with_array(case.image.array * 3.0),
                                     case.label, {**case.meta, "source_hash": f"h-{case_id}-v2"})})  # fmt: skip
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    assert json.loads((tmp_path / "04_feature" / "dataset_fingerprint.json").read_text()) == fingerprint
    assert json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text()) == plan
    assert _case_json(tmp_path) == before

    # -- one development study re-sent upstream (new source_hash, slightly different pixels) ----
    changed_id = development[0]
    changed = drop[changed_id]
    noisy = changed.image.with_array(changed.image.array + np.float32(1.0))
    ingested.save(
        {
            changed_id: Case(
                changed.case_id,
                changed.patient_id,
                noisy,
                changed.label,
                {**changed.meta, "source_hash": f"h-{changed_id}-v2"},
            )
        }
    )
    counted.clear()
    _run(tmp_path, params)
    assert counted == [hashlib_of(noisy)]  # only that case
    after = _case_json(tmp_path)
    assert {cid for cid in after if after[cid] != before[cid]} == {changed_id}
    assert json.loads(after[changed_id])["meta"]["source_hash"] == f"h-{changed_id}-v2"
    assert (
        json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text())["plan_id"]
        == plan["plan_id"]
    )

    # -- a development study withdrawn upstream disappears from the model input; the split keeps
    # every patient (the other study of that patient is still there), the plan barely drifts
    withdrawn = two_studies[0]
    ingested.save({withdrawn: None})
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    assert withdrawn not in _case_json(tmp_path) and len(_case_json(tmp_path)) == len(development) - 1
    new_split = _split(tmp_path)
    assert new_split["patients"] == split["patients"]

    # -- a plan change (another crop margin) recomputes every development case -----------------
    params["plan"]["crop_margin_mm"] = 25.0
    counted.clear()
    _run(tmp_path, params)
    assert len(counted) == len(development) - 1


def test_an_earlier_three_way_split_file_is_migrated_keeping_its_test_patients_held_out(tmp_path, drop):
    """A project from before the gate role: 05_model_input/split.json (train/validation/test) is
    read once; its test patients stay held out, the new split lives in 03_primary."""
    ingested = CaseStoreDataset(path=str(tmp_path / "02_intermediate" / "cases"), format="nifti")
    ingested.save(dict(drop))
    patients = sorted({c.patient_id for c in drop.values()})
    old_roles = {"train": patients[:3], "validation": patients[3:4], "test": patients[4:]}
    legacy = {
        **{role: sorted(c for c, case in drop.items() if case.patient_id in members) for role, members in old_roles.items()},
        "patients": old_roles, "withdrawn_holdout_patients": [], "folds": [], "seed": 1,
        "ratios": {"train": 0.6, "validation": 0.2, "test": 0.2}, "thresholds": {"test": 0.2, "validation": 0.25},
    }  # fmt: skip
    (tmp_path / "05_model_input").mkdir(parents=True)
    (tmp_path / "05_model_input" / "split.json").write_text(json.dumps(legacy))
    _run(tmp_path, _params(workers=1))
    split = _split(tmp_path)
    held = set(split["patients"]["gate"]) | set(split["patients"]["test"])
    assert set(old_roles["test"]) <= held
    assert not held & (set(old_roles["train"]) | set(old_roles["validation"]))
    fingerprint = json.loads((tmp_path / "04_feature" / "dataset_fingerprint.json").read_text())
    assert not set(fingerprint["cases"]) & (set(split["gate"]) | set(split["test"]))


def test_catalog_entries_and_parameters_are_consistent():
    catalog = yaml.safe_load(CATALOG_YML.read_text())
    pipeline = create_pipeline()
    datasets = {d for d in pipeline.datasets() if not d.startswith("params:")}
    assert datasets - {"ingested_cases"} == set(catalog)
    for name, entry in catalog.items():
        assert entry["metadata"]["kedro-viz"]["layer"] in ("intermediate", "primary", "feature", "model_input"), name
    # the split is decided before anything is learnt from the data: the primary layer
    for name in ("data_split", "development_split", "gate_split", "test_split"):
        assert catalog[name]["metadata"]["kedro-viz"]["layer"] == "primary", name
    # the "previous" entries read the very files the nodes write, tolerating their absence
    assert catalog["previous_data_split"]["filepath"] == catalog["data_split"]["filepath"]
    assert catalog["data_split"]["filepath"].endswith("03_primary/split.json")
    assert catalog["legacy_data_split"]["filepath"].endswith("05_model_input/split.json")
    assert (
        catalog["previous_preprocessing_plan"]["filepath"]
        == catalog["preprocessing_plan"]["filepath"]
    )
    assert catalog["previous_dataset_fingerprint"]["filepath"] == catalog["dataset_fingerprint"]["filepath"]
    assert catalog["previous_dataset_fingerprint"]["missing"] == {}
    assert (
        catalog["previous_data_split"]["missing"]
        == {}
        == catalog["previous_preprocessing_plan"]["missing"]
        == catalog["legacy_data_split"]["missing"]
    )
    assert catalog["model_input_records"]["path"] == catalog["model_input_cases"]["path"]
    assert catalog["ingested_case_index"]["index_only"] is True  # the split reads no voxel
    for node in pipeline.nodes:
        assert node.name.endswith("_node")
        assert not set(node.inputs) & set(node.outputs)
    # split first: the fingerprint reads the development view, never the whole split
    fingerprint = next(n for n in pipeline.nodes if n.name == "fingerprint_node")
    assert "development_split" in fingerprint.inputs
    assert not {"data_split", "gate_split", "test_split"} & set(fingerprint.inputs)
    params = PreprocessConfig.from_params(yaml.safe_load(PARAMS_YML.read_text())["preprocess"])
    assert params.plan.orientation == "RAS"
    # gate and test must each be a real fraction of the patients, never "one volume"
    ratios = params.split.ratios
    total = ratios.train + ratios.validation + ratios.gate + ratios.test
    assert 0.1 <= ratios.gate / total <= 0.3 and 0.1 <= ratios.test / total <= 0.3
    with pytest.raises(ValueError, match="unknown"):
        PreprocessConfig.from_params({"plan": {"token_budgt": 3}})


def test_cases_without_a_source_hash_are_tracked_by_content(tmp_path, drop, counted):
    bare = {
        cid: Case(
            c.case_id,
            c.patient_id,
            c.image,
            c.label,
            {k: v for k, v in c.meta.items() if k != "source_hash"},
        )
        for cid, c in list(drop.items())[:4]
    }
    ingested = CaseStoreDataset(path=str(tmp_path / "02_intermediate" / "cases"), format="nifti")
    ingested.save(bare)
    params = _params(workers=1)
    _run(tmp_path, params)
    split = _split(tmp_path)
    development = sorted(split["train"] + split["validation"])
    assert len(counted) == len(development) == 2  # 4 patients: one per role
    hashes = {
        cid: json.loads(text)["meta"]["source_hash"] for cid, text in _case_json(tmp_path).items()
    }
    assert sorted(hashes) == development
    assert all(h.startswith("content:") for h in hashes.values()) and len(set(hashes.values())) == 2
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    # new pixels under the same case id: recomputed, by content
    case_id = development[0]
    case = bare[case_id]
    ingested.save(
        {
            case_id: Case(
                case.case_id,
                case.patient_id,
                case.image.with_array(case.image.array * 1.01),
                case.label,
                case.meta,
            )
        }
    )
    counted.clear()
    _run(tmp_path, params)
    assert len(counted) == 1
    assert json.loads(_case_json(tmp_path)[case_id])["meta"]["source_hash"] != hashes[case_id]
