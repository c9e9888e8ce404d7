"""Series assembly throughput (slices/s): our reader vs a bare pydicom loop vs SimpleITK.

Usage::

    PYTHONPATH=src python benchmarks/bench_ingest.py [--repeats 5] [--keep DIR]

Two generated drops (written with ``write_image_series``; synthetic phantom pixels, generated
headers, explicit VR little endian):

- ``sample``: 16 series of 96x96x48 (like the sample drop),
- ``large``: 8 series of 512x512x48 CT.

For each drop, with the page cache warm and best-of-N timing over the whole drop:

- ``pydicom_loop``: ``pydicom.dcmread(f).pixel_array`` for every file (no sorting, no stacking),
- ``simpleitk``: ``ImageSeriesReader`` per series (``GetGDCMSeriesFileNames`` + ``Execute``),
- ``simpleitk_presorted``: the same with the file names found and sorted before the clock starts
  (``vs_simpleitk_presorted``: a bound that favours SimpleITK, which ours, sorting inside its one
  pass over the headers, does not get),
- ``ours``: ``assemble_series`` per series, one process (the headline ratios use this),
- ``ours_2_processes_volumes``: ``assemble_many(..., executor=pool)``, a warm 2-process pool,
  volumes handed back through ``/dev/shm`` (pool start-up is paid once per run, not timed),
- ``ours_2_threads_volumes``: the same with a 2-thread pool (no transfer),
- ``ours_summary`` / ``ours_2_processes_summary``: ``assemble_many(..., then=summary)`` in one
  process / in the 2-process pool: each series is assembled and consumed where it was read and
  only a small result comes back (``two_worker_speedup`` is their ratio).

CPU seconds (this process plus the pool's workers, from /proc) are recorded too:
``two_worker_speedup_cpu_estimate`` = 2 x single-process CPU / 2-process CPU is what two idle
cores would give; on a shared machine the wall-clock ratio can be far below it.

Headline ratios are for the large drop; ``sample_*`` keys repeat them for the small one.

``multichannel_overhead_ratio``: the ingest pipeline on a drop of multi-series MR studies (T1 +
T2 of one phantom, the T2 on thicker slices; ``sample_data.mr_contrasts``) with
``ingest.channels`` declared (one two-channel case per study), divided by the same pipeline on
the same drop without channels (every series its own single-series case) plus the resampling of
the T2 series onto the T1 grids (``stack_channels`` on the assembled series). Best of N, the
two ingests interleaved in the same run, in CPU seconds of the benchmark's process (one worker:
all the work is in it), so that other tenants of a shared machine do not decide it;
``multichannel_overhead_ratio_wall`` is the same in wall-clock seconds. Target <= 1.2.
``--only multichannel`` runs just this.

The last line printed is one JSON object. Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A body-like CT phantom in HU: air, an elliptic body of soft tissue, a bright spine, noise."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    values = np.where(body, 40.0, -1000.0)
    values[((x / 0.1) ** 2 + ((y + 0.35) / 0.1) ** 2) < 1] = 700.0
    values += 0.1 * z + rng.normal(0.0, 15.0, shape)
    return values.astype(np.float32)


def _machine() -> dict:
    """The CPU flags (AMX / AVX-512-BF16) beside the figures; imported after the timings (torch)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import machine

    return machine()


def generate_drop(root: str, n_series: int, shape: tuple[int, int, int], seed: int) -> list[str]:
    from mvl_pipeline.core.volume import Volume, affine_from_geometry
    from mvl_pipeline.dicom.write import series_uids, write_image_series

    rng = np.random.default_rng(seed)
    folders = []
    for index in range(n_series):
        spacing = (350.0 / shape[0], 350.0 / shape[1], 2.5)
        volume = Volume(_phantom(shape, rng), affine_from_geometry(spacing, (-175.0, -175.0, 0.0)))
        uids = series_uids("bench", f"case-{seed}-{index}", n_slices=shape[2])
        header = {
            "PatientName": f"BENCH^{index}",
            "PatientID": f"B{index:04d}",
            "StudyDate": "20240101",
        }
        folder = os.path.join(root, f"series-{index:03d}")
        os.makedirs(folder)
        for ds in write_image_series(volume, header=header, uids=uids):
            ds.save_as(os.path.join(folder, f"{ds.SOPInstanceUID}.dcm"), enforce_file_format=True)
        folders.append(folder)
    return folders


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) used so far by this process and the given child processes."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def best_of(repeats: int, run: Callable[[], object], pids: list[int]) -> tuple[float, float]:
    """(best wall-clock seconds, mean CPU seconds over all processes) of ``repeats`` runs."""
    times = []
    cpu_start = cpu_seconds(pids)
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times), (cpu_seconds(pids) - cpu_start) / repeats


def summary(volume) -> tuple[tuple[int, int, int], float]:
    """What a worker hands back instead of the volume (cheap: shape and a sparse mean)."""
    return volume.shape, float(volume.array[::8, ::8, :].mean())


def bench_drop(folders: list[str], repeats: int, pool, threads) -> dict[str, float]:
    import pydicom
    import SimpleITK as sitk
    from _assemble_many import assemble_many

    from mvl_pipeline.dicom.assemble import assemble_series

    series = [sorted(glob.glob(os.path.join(folder, "*.dcm"))) for folder in folders]
    files = [f for s in series for f in s]
    for path in files:  # warm the page cache for everyone
        with open(path, "rb") as handle:
            handle.read()

    def pydicom_loop() -> None:
        for path in files:
            pydicom.dcmread(path).pixel_array  # noqa: B018

    def simpleitk() -> None:
        for folder in folders:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
            sitk.GetArrayViewFromImage(reader.Execute())

    sitk_names = [sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder) for folder in folders]

    def simpleitk_presorted() -> None:
        # the series' files found and sorted before the clock starts (GDCM reads every header for
        # that: a pass ours makes inside assemble_series, so this side does less work than ours)
        for names in sitk_names:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            sitk.GetArrayViewFromImage(reader.Execute())

    def ours() -> None:
        for paths in series:
            assemble_series(paths)

    def checked(results: list) -> None:
        assert not any(isinstance(r, Exception) for r in results), results

    runs = {
        "pydicom_loop": pydicom_loop,
        "simpleitk": simpleitk,
        "simpleitk_presorted": simpleitk_presorted,
        "ours": ours,
        # volumes handed to the caller: through /dev/shm from processes, in place from threads
        "ours_2_processes_volumes": lambda: checked(assemble_many(series, executor=pool)),
        "ours_2_threads_volumes": lambda: checked(assemble_many(series, executor=threads)),
        # per-series work stays where the series was assembled (as an ingest node would do)
        "ours_summary": lambda: checked(assemble_many(series, then=summary)),
        "ours_2_processes_summary": lambda: checked(
            assemble_many(series, executor=pool, then=summary)
        ),
    }
    rates: dict[str, float] = {}
    for name, run in runs.items():
        run()  # warm-up (imports, pool workers, caches)
        pids = list(pool._processes) if "processes" in name else []
        wall, cpu = best_of(repeats, run, pids)
        rates[name] = len(files) / wall
        rates[f"cpu_s_per_1000_slices_{name}"] = 1000 * cpu / len(files)
    return rates


MR_DROP = {
    "seed": 11, "n_patients": 6, "followup_fraction": 0.0, "image_size": 128, "pixel_spacing_mm": [2.9, 3.1],
    "n_slices": [40, 40], "slice_spacing_mm": 5.0, "thin_slice_studies": 0, "non_axial_studies": 1,
    "mr_contrasts": ["t1", "t2"], "contrast_slice_ratio": 1.5,
}  # fmt: skip
CHANNELS = {"t1": {"SeriesDescription": "(?i)^t1 "}, "t2": {"SeriesDescription": "(?i)^t2 "}}


def bench_multichannel(root: str, repeats: int) -> dict[str, float]:
    """Seconds of the multi-channel ingest, the single-series ingests and the resampling."""
    import shutil

    import yaml

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/support
    from kedro.runner import SequentialRunner

    from mvl_pipeline.datasets.drop import DropFolderDataset
    from mvl_pipeline.dicom.assemble import assemble_series
    from mvl_pipeline.pipelines.ingest import create_pipeline
    from mvl_pipeline.preprocessing.channels import stack_channels
    from mvl_pipeline.synthetic.sample_drop import (
        SampleDataConfig,
        iter_sample_studies,
        study_files,
    )
    from tests.support.workspace import local_catalog

    drop = os.path.join(root, "mr_drop")
    studies = list(iter_sample_studies(SampleDataConfig.from_params(MR_DROP)))
    files = {path: ds for study in studies for path, ds in study_files(study).items()}
    DropFolderDataset(filepath=drop).save(files)
    series = [[[ds for ds in study_files(study).values() if ds.SeriesInstanceUID == uid]
               for uid in (study.uids.series, study.contrasts[0][2].series)] for study in studies]  # fmt: skip
    volumes = [[assemble_series(s) for s in pair] for pair in series]

    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(project, "conf", "base", "parameters_ingest.yml")) as handle:
        base = yaml.safe_load(handle)["ingest"] | {"workers": 1, "progress": False}
    settings = {
        "multi_series": base | {"channels": CHANNELS},
        "single_series": base | {"keep_unlabelled": True},  # every series its own case
    }

    def ingest(name: str) -> None:
        out = os.path.join(root, f"ingest-{name}")
        shutil.rmtree(out, ignore_errors=True)
        catalog = local_catalog(Path(out), {"ingest": settings[name]})
        catalog["hospital_drop"] = DropFolderDataset(filepath=drop)
        SequentialRunner().run(create_pipeline(), catalog)

    def resample() -> None:
        for pair in volumes:
            stack_channels(pair, ["t1", "t2"])

    ingest("multi_series"), ingest("single_series"), resample()  # warm-up
    wall: dict[str, list[float]] = {"multi_series": [], "single_series": [], "resample": []}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    for _ in range(repeats):  # interleaved: the same machine state for all three
        for name, run in (("multi_series", lambda: ingest("multi_series")),
                          ("single_series", lambda: ingest("single_series")), ("resample", resample)):  # fmt: skip
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    best = {name: min(values) for name, values in wall.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    return {
        # CPU seconds of this process (everything runs in it: workers=1): what the ingest costs,
        # whatever else the shared machine runs at the time; wall-clock beside it
        "multichannel_overhead_ratio": round(
            best_cpu["multi_series"] / (best_cpu["single_series"] + best_cpu["resample"]), 3
        ),
        "multichannel_overhead_ratio_wall": round(best["multi_series"] / (best["single_series"] + best["resample"]), 3),
        "multichannel_cpu_seconds": {k: round(v, 3) for k, v in best_cpu.items()},
        "multichannel_seconds": {k: round(v, 3) for k, v in best.items()},
        "multichannel_drop": f"{len(studies)} studies x 2 series (t1 128x128x40, t2 thicker slices)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", help="write the drops here instead of a temporary folder")
    parser.add_argument("--only", choices=["multichannel"], help="run one part only")
    args = parser.parse_args()
    import logging

    logging.disable(logging.INFO)  # the ingest pipeline's progress lines; the results are printed
    if args.only == "multichannel":
        root = args.keep or tempfile.mkdtemp(prefix="bench-ingest-")
        try:
            result = bench_multichannel(root, args.repeats)
        finally:
            if not args.keep:
                import shutil

                shutil.rmtree(root, ignore_errors=True)
        print(json.dumps({**result, "cpus": os.cpu_count(), "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
                          "machine": _machine()}))  # fmt: skip
        return

    from _assemble_many import process_pool

    root = args.keep or tempfile.mkdtemp(prefix="bench-ingest-")
    drops = {
        "sample_16x96x96x48": generate_drop(os.path.join(root, "sample"), 16, (96, 96, 48), seed=1),
        "large_8x512x512x48": generate_drop(os.path.join(root, "large"), 8, (512, 512, 48), seed=2),
    }
    pool = process_pool(2)
    threads = ThreadPoolExecutor(2)
    results = {}
    try:
        multichannel = bench_multichannel(root, args.repeats)
        print(f"multichannel: {multichannel}")
        for name, folders in drops.items():
            rates = bench_drop(folders, args.repeats, pool, threads)
            results[name] = {
                k: round(v, 3 if k.startswith("cpu_") else 1) for k, v in rates.items()
            }
            shown = {k: v for k, v in rates.items() if not k.startswith("cpu_")}
            print(f"{name}: " + ", ".join(f"{k} {v:,.0f}" for k, v in shown.items()) + " slices/s")
    finally:
        pool.shutdown()
        threads.shutdown()
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)

    def ratios(rates: dict[str, float]) -> dict[str, float]:
        cpu = "cpu_s_per_1000_slices_"
        return {
            "vs_pydicom_loop": round(rates["ours"] / rates["pydicom_loop"], 2),
            "vs_simpleitk": round(rates["ours"] / rates["simpleitk"], 2),
            "vs_simpleitk_presorted": round(rates["ours"] / rates["simpleitk_presorted"], 2),
            "two_worker_speedup": round(
                rates["ours_2_processes_summary"] / rates["ours_summary"], 2
            ),
            # what 2 idle cores would give: 2 x single-process CPU / 2-process CPU (all processes)
            "two_worker_speedup_cpu_estimate": round(
                2 * rates[cpu + "ours_summary"] / rates[cpu + "ours_2_processes_summary"], 2
            ),
            "two_process_volumes_speedup": round(
                rates["ours_2_processes_volumes"] / rates["ours"], 2
            ),
            "two_thread_volumes_speedup": round(rates["ours_2_threads_volumes"] / rates["ours"], 2),
        }

    large = ratios(results["large_8x512x512x48"])
    sample = ratios(results["sample_16x96x96x48"])
    summary = {
        **large,
        **{f"sample_{key}": value for key, value in sample.items()},
        **multichannel,
        "slices_per_s": results,
        "cpus": os.cpu_count(),
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "machine": _machine(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
