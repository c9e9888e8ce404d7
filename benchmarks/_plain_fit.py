"""The plain side of bench_fit.py: the training loop as a user's own script would run it.

    python benchmarks/_plain_fit.py CONFIG_JSON OUT_JSON

Started by bench_fit.py as a fresh process, so its time to the first step includes what any
script pays (interpreter, torch, MONAI, model import, data load, model build) and nothing Ray
adds. Imports only what such a script needs.
"""

from __future__ import annotations

import json
import sys

from mvl_pipeline.datasets.case_store import CaseStoreDataset
from mvl_pipeline.training.loop import run_training
from mvl_pipeline.training.session import Session


def main() -> None:
    config_path, out_path = sys.argv[1], sys.argv[2]
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    cases = CaseStoreDataset(path=config.pop("model_input_path"), format="npy").load()
    config["loaders"] = {c: cases[c] for c in config["train_ids"] + config["val_ids"]}
    state = run_training(config, Session())
    with open(out_path, "w", encoding="utf-8") as handle:
        json.dump({"loop_started_unix": state["loop_started_unix"], "history": state["history"]}, handle)


if __name__ == "__main__":
    main()
