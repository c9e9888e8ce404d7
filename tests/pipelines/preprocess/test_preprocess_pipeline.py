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

    def counting(image, plan, *, label=None, modality=None):
        with lock:
            calls.append(hashlib_of(image))
        return original(image, plan, label=label, modality=modality)

    monkeypatch.setattr(nodes, "preprocess_case", counting)
    return calls


def hashlib_of(volume) -> str:
    return f"{volume.shape}-{float(np.asarray(volume.array).sum()):.3f}"


def _run(root: Path, params: dict) -> None:
    SequentialRunner().run(create_pipeline(), _catalog(root, params))


def _case_json(root: Path) -> dict[str, str]:
    folder = root / "05_model_input" / "cases"
    return {p.parent.name: p.read_text() for p in sorted(folder.glob("*/case.json"))}


def test_preprocess_pipeline_end_to_end_and_incremental(tmp_path, drop, counted):
    ingested = CaseStoreDataset(path=str(tmp_path / "02_intermediate" / "cases"), format="nifti")
    ingested.save(dict(drop))
    params = _params()

    # -- first run: everything is computed -------------------------------------------------
    _run(tmp_path, params)
    assert len(counted) == len(drop) == 8
    plan = json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text())
    fingerprint = json.loads((tmp_path / "04_feature" / "dataset_fingerprint.json").read_text())
    split = json.loads((tmp_path / "05_model_input" / "split.json").read_text())
    assert set(fingerprint["cases"]) == set(drop)
    assert (
        plan["patch_size"] and all(p % 8 == 0 for p in plan["patch_size"]) and plan["tokens"] <= 512
    )
    # RAS spacings: the coronal case's 10 mm slices lie along y
    assert fingerprint["cases"]["case021"]["spacing"] == [7.0, 10.0, 7.0]

    model_inputs = CaseStoreDataset(path=str(tmp_path / "05_model_input" / "cases"), format="npy")
    loaded = {cid: load() for cid, load in model_inputs.load().items()}
    assert set(loaded) == set(drop)
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
    by_split = {s: {drop[c].patient_id for c in split[s]} for s in ("train", "validation", "test")}
    assert set().union(*by_split.values()) == patients
    assert not (by_split["train"] & by_split["validation"] or by_split["train"] & by_split["test"])
    assert not by_split["validation"] & by_split["test"]
    assert all(by_split.values())  # 6 patients: every split has one
    assert by_split == {s: set(split["patients"][s]) for s in by_split}

    before = _case_json(tmp_path)
    split_before = (tmp_path / "05_model_input" / "split.json").read_text()

    # -- second run, nothing changed: nothing is recomputed, nothing rewritten -------------
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    assert _case_json(tmp_path) == before
    assert json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text()) == plan
    assert (tmp_path / "05_model_input" / "split.json").read_text() == split_before

    # -- one study re-sent upstream (new source_hash, slightly different pixels) -----------
    changed = drop["case030"]
    noisy = changed.image.with_array(changed.image.array + np.float32(1.0))
    ingested.save(
        {
            "case030": Case(
                changed.case_id,
                changed.patient_id,
                noisy,
                changed.label,
                {**changed.meta, "source_hash": "h-case030-v2"},
            )
        }
    )
    counted.clear()
    _run(tmp_path, params)
    assert counted == [hashlib_of(noisy)]  # only that case
    after = _case_json(tmp_path)
    assert {cid for cid in after if after[cid] != before[cid]} == {"case030"}
    assert json.loads(after["case030"])["meta"]["source_hash"] == "h-case030-v2"
    assert (
        json.loads((tmp_path / "04_feature" / "preprocessing_plan.json").read_text())["plan_id"]
        == plan["plan_id"]
    )

    # -- a study withdrawn upstream disappears from the model input, the split keeps the rest
    ingested.save({"case041": None})
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    assert "case041" not in _case_json(tmp_path) and len(_case_json(tmp_path)) == 7
    new_split = json.loads((tmp_path / "05_model_input" / "split.json").read_text())
    assert new_split["patients"] == split["patients"]

    # -- a plan change (another crop margin) recomputes every case ---------------------------
    params["plan"]["crop_margin_mm"] = 25.0
    counted.clear()
    _run(tmp_path, params)
    assert len(counted) == 7


def test_catalog_entries_and_parameters_are_consistent():
    catalog = yaml.safe_load(CATALOG_YML.read_text())
    pipeline = create_pipeline()
    datasets = {d for d in pipeline.datasets() if not d.startswith("params:")}
    assert datasets - {"ingested_cases"} == set(catalog)
    for name, entry in catalog.items():
        assert entry["metadata"]["kedro-viz"]["layer"] in ("feature", "model_input"), name
    # the "previous" entries read the very files the nodes write, tolerating their absence
    assert catalog["previous_data_split"]["filepath"] == catalog["data_split"]["filepath"]
    assert (
        catalog["previous_preprocessing_plan"]["filepath"]
        == catalog["preprocessing_plan"]["filepath"]
    )
    assert (
        catalog["previous_data_split"]["missing"]
        == {}
        == catalog["previous_preprocessing_plan"]["missing"]
    )
    assert catalog["model_input_records"]["path"] == catalog["model_input_cases"]["path"]
    for node in pipeline.nodes:
        assert node.name.endswith("_node")
        assert not set(node.inputs) & set(node.outputs)
    params = PreprocessConfig.from_params(yaml.safe_load(PARAMS_YML.read_text())["preprocess"])
    assert params.plan.orientation == "RAS"
    # the holdout must be a real fraction of the patients, never "one volume"
    assert 0.1 <= params.split.test_fraction <= 0.3
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
    assert len(counted) == 4
    hashes = {
        cid: json.loads(text)["meta"]["source_hash"] for cid, text in _case_json(tmp_path).items()
    }
    assert all(h.startswith("content:") for h in hashes.values()) and len(set(hashes.values())) == 4
    counted.clear()
    _run(tmp_path, params)
    assert counted == []
    # new pixels under the same case id: recomputed, by content
    case = bare["case000"]
    ingested.save(
        {
            "case000": Case(
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
    assert json.loads(_case_json(tmp_path)["case000"])["meta"]["source_hash"] != hashes["case000"]
