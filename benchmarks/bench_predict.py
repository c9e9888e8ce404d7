"""Batch prediction throughput on Hippocampus-sized volumes: ours against a MONAI inference script.

60 real MR volumes of the MSD Hippocampus task (../shared/data) are segmented, end to end from
NIfTI file to NIfTI file, by

- ours: ``python -m mvl_pipeline.predict``'s own code path (``commands.predict.predict_studies``
  with a ``serving.Segmenter``): model loaded once, the plan's preprocessing, sliding window
  (studies that fit in one window ``evaluate.case_batch`` to a forward pass), back to the
  image's grid, post-processing, NIfTI written;
- ours per study: the same, one study a pass (``predict_study``; the command before batching);
- MONAI: the script a MONAI user writes: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS)
  -> Spacingd(plan spacing) -> NormalizeIntensityd(nonzero) -> sliding_window_inference -> argmax
  -> Invertd back to the image's grid -> SaveImage,

with the same network weights (the default model under the Hippocampus plan; throughput does not
depend on what the weights learnt), the same roi and overlap, in one process, each side timed
round-robin over several rounds (best round kept). Last line: one JSON object with
``predict_cases_per_s``, ``monai_cases_per_s`` and their ratio, ``per_study_cases_per_s`` and
``batching_speedup``, beside the CPU flags.

    python benchmarks/bench_predict.py [--cases 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _hippocampus import ROOT, TASK, base_params, hippocampus_workspace
from bench_quality import cpu_flags

from mvl_pipeline.commands.predict import Study, predict_studies, predict_study  # noqa: E402
from mvl_pipeline.model import MedVisionLlamaConfig, build_model, model_weights  # noqa: E402
from mvl_pipeline.serving.segmenter import Segmenter  # noqa: E402


def monai_predictor(model: torch.nn.Module, plan: dict, overlap: float):
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        SaveImage,
        Spacingd,
    )

    pre = Compose([
        LoadImaged(keys="image", image_only=False), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"), Spacingd(keys="image", pixdim=plan["target_spacing"], mode="bilinear"),
        NormalizeIntensityd(keys="image", nonzero=True),
    ])  # fmt: skip
    post = Compose([  # as MONAI's tutorials: invert the probabilities, then argmax, then save
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
    ])  # fmt: skip
    saver = None

    def run(path: Path, out: Path) -> None:
        nonlocal saver
        if saver is None or saver.folder_layout.output_dir != str(out):
            saver = SaveImage(output_dir=str(out), output_postfix="monai", separate_folder=False, print_log=False)
        data = pre({"image": str(path)})
        with torch.no_grad():
            data["pred"] = sliding_window_inference(
                data["image"][None].float(), roi_size=plan["patch_size"], sw_batch_size=2, predictor=model,
                overlap=overlap, mode="gaussian",
            )[0]  # fmt: skip
        result = post(data)
        saver(result["pred"].to(torch.uint8))

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    cache = str(ROOT / "data" / "06_models" / "llm_cache")
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        root = Path(tmp)
        plan = hippocampus_workspace(root / "plan", 20)["preprocessing_plan"]  # the real planner's plan
        cfg = MedVisionLlamaConfig.from_params(base_params("model")).for_plan(plan)
        weights = model_weights(build_model(cfg, llm_cache_dir=cache))
        weights = (weights[0], {**weights[1], "postprocessing": {"largest_component": [1, 2]}})
        segmenter = Segmenter(weights, plan, llm_cache_dir=cache)
        model = segmenter.model
        images = sorted((TASK / "imagesTr").glob("*.nii.gz"))[: args.cases]
        studies = [Study(p.name[: -len(".nii.gz")], "volume", [p], p.name) for p in images]
        options = SimpleNamespace(modality="MR", series_index=None)
        monai_run = monai_predictor(model, plan, overlap=segmenter.config.overlap)
        best = {"ours": float("inf"), "per_study": float("inf"), "monai": float("inf")}
        for round_index in range(args.rounds):
            for side in best:
                out = root / f"{side}-{round_index}"
                out.mkdir()
                started = time.perf_counter()
                if side == "ours":
                    results = list(predict_studies(segmenter, studies, out, batch=True, uri="bench", args=options))
                    assert all(exc is None for _, _, exc in results), results
                for study in studies if side != "ours" else ():
                    if side == "per_study":
                        predict_study(segmenter, study, out, batch=True, uri="bench", args=options)
                    else:
                        monai_run(study.paths[0], out)
                best[side] = min(best[side], time.perf_counter() - started)
            print(f"round {round_index + 1}: ours {len(studies) / best['ours']:.2f} cases/s, per study "
                  f"{len(studies) / best['per_study']:.2f}, MONAI {len(studies) / best['monai']:.2f} cases/s",
                  flush=True)  # fmt: skip
        written = sorted((root / "ours-0").glob("*.nii.gz"))
        import nibabel as nib

        shapes = [int(v) for v in np.median([nib.load(p).shape for p in images], axis=0)]
        shapes_ok = len(written) == len(studies)
    ours, monai = len(studies) / best["ours"], len(studies) / best["monai"]
    per_study = len(studies) / best["per_study"]
    print(json.dumps({
        "cases": len(studies), "volume_shape_median": shapes,
        "predict_cases_per_s": round(ours, 2), "monai_cases_per_s": round(monai, 2),
        "ratio_vs_monai": round(ours / monai, 2), "per_study_cases_per_s": round(per_study, 2),
        "batching_speedup": round(ours / per_study, 2), "case_batch": segmenter.config.case_batch,
        "all_written": shapes_ok,
        "model": {"preset": cfg.preset, "llm_mode": cfg.llm.mode, "precision": cfg.precision},
        "roi": plan["patch_size"], "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
