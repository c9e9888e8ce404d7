"""Per-volume preprocessing time: ``preprocess_case`` vs the MONAI transform chain doing the same.

Work per volume (image + label): reorient to RAS, crop to the CT body box (HU > -500) with a
10 mm margin, resample to the target spacing (image: our ``linear`` vs MONAI ``bilinear``,
label: ``nearest`` both, border padding both), then clip + z-score with fixed dataset
statistics (MONAI: ``ScaleIntensityRanged`` with ``clip=True``, the same affine map).

MONAI chain (from the same in-memory float32 array + affine, no LoadImage):
``EnsureChannelFirstd -> Orientationd -> CropForegroundd -> Spacingd -> ScaleIntensityRanged``,
run eagerly and with ``Compose(lazy=True)``; the speed-up is against the faster of the two.

Volumes: two CT phantoms like the sample drop (128x128x48 at 3x3x5 mm, one axial, one coronal;
``mvl_pipeline.synthetic.phantom``) resampled to 2.5x2.5x3 mm, and the real pyradiomics lung1 CT
(512x512x48 at 0.57x0.57x5 mm, LPS) resampled to 1x1x2.5 mm. One thread each
(``torch.set_num_threads(1)``; our code is single-threaded numpy): the per-worker cost.

Peak memory per worker: each method runs once in a forked child; reported is the child's peak
resident set above its resident set at the start (``ru_maxrss`` minus ``/proc/self/statm``). The
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that large arrays are always
mmapped and returned to the OS when freed (glibc's dynamic threshold would otherwise let a child
reuse heap pages the parent left resident, hiding allocations). For our code the tracemalloc
peak (numpy reports its allocations to tracemalloc; torch does not) is given as a cross-check.

Run: ``python benchmarks/bench_preprocess.py`` (about a minute). The last line is a JSON object.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mvl_pipeline.core.orientation import orientation_transform  # noqa: E402
from mvl_pipeline.core.volume import Volume  # noqa: E402
from mvl_pipeline.preprocessing.apply import preprocess_case  # noqa: E402
from mvl_pipeline.preprocessing.crop import margin_voxels  # noqa: E402
from mvl_pipeline.synthetic import phantom  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import machine  # noqa: E402

torch.set_num_threads(1)
MARGIN_MM = 10.0
THRESHOLD_HU = -500.0


def _plan(target, clip, mean, std) -> dict:
    return {
        "plan_id": "bench",
        "orientation": "RAS",
        "target_spacing": list(target),
        "interpolation": {"image": "linear", "label": "nearest"},
        "normalization": {"CT": {"scheme": "ct", "clip": list(clip), "mean": mean, "std": std}},
        "default_normalization": {"scheme": "zscore_body"},
        # min_voxels_per_slice 1: the plain bounding box, as MONAI's CropForeground computes it
        "body_mask": {
            "ct_threshold_hu": THRESHOLD_HU,
            "relative_threshold": 0.05,
            "min_voxels_per_slice": 1,
        },
        "crop_margin_mm": MARGIN_MM,
    }


def _volumes() -> dict[str, tuple[Volume, Volume, dict]]:
    volumes = {}
    rng = np.random.default_rng(7)
    anatomy = phantom.sample_anatomy(rng)
    for name, plane, shape in (
        ("phantom_axial_128x128x48", "axial", (128, 128, 48)),
        ("phantom_coronal_128x48x128", "coronal", (128, 48, 128)),
    ):
        affine = phantom.acquisition_affine(
            shape=shape, spacing=(3.0, 3.0, 5.0), orientation=plane, centre=anatomy.scan_centre
        )
        image, label = phantom.simulate_ct(anatomy, affine, shape, rng)
        volumes[name] = (image, label, _plan((2.5, 2.5, 3.0), (-100.0, 250.0), 90.0, 45.0))
    folder = ROOT.parent / "shared" / "data" / "pyradiomics"
    if (folder / "lung1_image.nrrd").exists():
        from mvl_pipeline.datasets.volume import VolumeDataset

        image = VolumeDataset(filepath=str(folder / "lung1_image.nrrd")).load()
        label = VolumeDataset(filepath=str(folder / "lung1_label.nrrd")).load()
        image = image.with_array(image.array.astype(np.float32))
        label = label.with_array(label.array.astype(np.uint8))
        volumes["lung1_512x512x48"] = (
            image,
            label,
            _plan((1.0, 1.0, 2.5), (-1000.0, 400.0), -300.0, 350.0),
        )
    return volumes


def _monai_chain(plan: dict, spacing_ras, *, lazy: bool):
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    ct = plan["normalization"]["CT"]
    lo, hi = ct["clip"]
    return Compose(
        [
            EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"),
            Orientationd(keys=["image", "label"], axcodes="RAS"),
            CropForegroundd(
                keys=["image", "label"],
                source_key="image",
                select_fn=lambda x: x > THRESHOLD_HU,
                margin=list(margin_voxels(MARGIN_MM, spacing_ras)),
                allow_smaller=True,
            ),
            Spacingd(
                keys=["image", "label"],
                pixdim=plan["target_spacing"],
                mode=("bilinear", "nearest"),
                padding_mode=("border", "border"),
            ),
            ScaleIntensityRanged(
                keys="image",
                a_min=lo,
                a_max=hi,
                b_min=(lo - ct["mean"]) / ct["std"],
                b_max=(hi - ct["mean"]) / ct["std"],
                clip=True,
            ),
        ],
        lazy=lazy,
    )


def _run_ours(image: Volume, label: Volume, plan: dict):
    out_image, out_label, _ = preprocess_case(image, plan, label=label, modality="CT")
    return out_image, out_label


def _run_monai(image: Volume, label: Volume, chain):
    from monai.data import MetaTensor

    data = {
        "image": MetaTensor(torch.from_numpy(image.array), affine=torch.from_numpy(image.affine)),
        "label": MetaTensor(torch.from_numpy(label.array), affine=torch.from_numpy(label.affine)),
    }
    out = chain(data)
    return out["image"][0].numpy(), out["label"][0].numpy()


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_child(fn, queue) -> None:
    import tracemalloc

    start = _rss_mb()
    tracemalloc.start()
    fn()
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB -> MiB on Linux
    queue.put((round(peak - start, 1), round(traced, 1)))


def _peak_mb(fn) -> tuple[float, float]:
    context = mp.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_peak_child, args=(fn, queue))
    child.start()
    child.join()
    return queue.get(timeout=5)


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    volumes = _volumes()
    results = {}
    for name, (image, label, plan) in volumes.items():
        spacing_ras = orientation_transform(image.affine).permute(image.spacing)
        eager = _monai_chain(plan, spacing_ras, lazy=False)
        lazy = _monai_chain(plan, spacing_ras, lazy=True)
        # memory first, in fresh forks, before this process has run either method
        peak_ours, traced_ours = _peak_mb(
            lambda image=image, label=label, plan=plan: _run_ours(image, label, plan)
        )
        peak_monai, _ = _peak_mb(
            lambda image=image, label=label, c=eager: _run_monai(image, label, c)
        )
        ours_image, ours_label = _run_ours(image, label, plan)
        monai_image, monai_label = _run_monai(image, label, eager)
        lazy_image, lazy_label = _run_monai(image, label, lazy)
        if ours_image.shape != monai_image.shape:
            raise SystemExit(
                f"{name}: shapes differ: ours {ours_image.shape}, MONAI {monai_image.shape}"
            )
        repeats = 3 if image.array.size > 4_000_000 else 7
        ms_ours = _time(
            lambda image=image, label=label, plan=plan: _run_ours(image, label, plan), repeats
        )
        ms_eager = _time(
            lambda image=image, label=label, c=eager: _run_monai(image, label, c), repeats
        )
        lazy_same = lazy_image.shape == ours_image.shape
        ms_lazy = (
            _time(lambda image=image, label=label, c=lazy: _run_monai(image, label, c), repeats)
            if lazy_same
            else None
        )
        best_monai = min(ms_eager, ms_lazy) if ms_lazy is not None else ms_eager
        results[name] = {
            "input_shape": list(image.shape),
            "output_shape": list(ours_image.shape),
            "ms_ours": round(ms_ours, 1),
            "ms_monai_eager": round(ms_eager, 1),
            "ms_monai_lazy": None if ms_lazy is None else round(ms_lazy, 1),
            "vs_monai": round(best_monai / ms_ours, 2),
            "max_abs_diff": float(np.abs(ours_image - monai_image).max()),
            "max_abs_diff_lazy": float(np.abs(ours_image - lazy_image).max())
            if lazy_same
            else None,
            "label_agreement": float(np.mean(ours_label == monai_label)),
            "peak_mb_ours": peak_ours,
            "peak_mb_ours_tracemalloc": traced_ours,
            "peak_mb_monai_eager": peak_monai,
        }
        r = results[name]
        print(
            f"{name:28s} out {tuple(r['output_shape'])}: ours {r['ms_ours']:7.1f} ms | MONAI eager "
            f"{r['ms_monai_eager']:7.1f} ms, lazy {r['ms_monai_lazy']} ms | x{r['vs_monai']:.2f} | "
            f"max|diff| {r['max_abs_diff']:.2e} | labels agree {r['label_agreement']:.5f} | "
            f"peak MB ours {r['peak_mb_ours']} (traced {r['peak_mb_ours_tracemalloc']}) "
            f"MONAI {r['peak_mb_monai_eager']}"
        )
    total_ours = sum(r["ms_ours"] for r in results.values())
    total_monai = sum(
        min(r["ms_monai_eager"], r["ms_monai_lazy"] or np.inf) for r in results.values()
    )
    summary = {
        "vs_monai": round(total_monai / total_ours, 2),
        "vs_monai_min": min(r["vs_monai"] for r in results.values()),
        "max_abs_diff": max(r["max_abs_diff"] for r in results.values()),
        "comparison": "image: ours linear vs MONAI bilinear (border padding); label: nearest vs nearest",
        "threads": 1,
        "machine": machine(),  # CPU flags (AMX / AVX-512-BF16) beside the figures
        "volumes": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
