"""The registered model as an MLflow pyfunc: weights (trainable tensors only), config with the
LLM reference and its hash, and the preprocessing plan the model was trained under.

``predict`` takes a batch of preprocessed patches or volumes ``(B, C_in, X, Y, Z)`` float32 and
returns class probabilities ``(B, C, X, Y, Z)``; whole studies go through
``python -m mvl_pipeline.commands.predict``, which preprocesses with the bundled plan and writes NIfTI and
DICOM SEG.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from mvl_pipeline.formats.model_bundle import read_bundle

# What the registry logs as the model (MLflow "models from code"): a file that builds this class,
# so that loading the model unpickles nothing.
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


class MedVisionLlamaPyfunc(mlflow.pyfunc.PythonModel):
    """Loads the bundle; the frozen LLM layer is rebuilt from its source and hash-checked."""

    def load_context(self, context: Any) -> None:
        from mvl_pipeline.model import model_from_weights

        weights, plan = read_bundle(context.artifacts["model_dir"])
        cache = context.model_config.get("llm_cache_dir") if context.model_config else None
        if cache and not Path(cache).is_absolute():
            # the training project's relative folder: here it would be made in whatever folder
            # the serving process runs in (an audit, 2026-12-05)
            cache = None
        # one cache per machine, not a new folder per load (the converted layer is reused)
        cache = cache or str(Path(tempfile.gettempdir()) / "mvl-llm-cache")
        self.model = model_from_weights(*weights, llm_cache_dir=cache)
        self.model.eval()
        self.plan = plan

    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        import torch

        from mvl_pipeline.evaluation.inference import predict_many

        if isinstance(model_input, dict):  # a named tensor signature hands over {"image": array}
            model_input = model_input["image"]
        batch = np.asarray(model_input, dtype=np.float32)
        if batch.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) float32, got shape {batch.shape}")
        if not np.isfinite(batch).all():
            # one NaN voxel made every probability NaN, with no error (predict refuses such images)
            raise ValueError(f"the input holds {int((~np.isfinite(batch)).sum())} non-finite value(s) (NaN or inf)")
        with torch.no_grad():
            outputs = [
                probs
                for _, probs in predict_many(
                    self.model, batch, lambda volume: volume, roi_size=self.plan["patch_size"],
                    num_classes=self.model.cfg.num_classes,
                )
            ]  # fmt: skip
        return np.stack(outputs).astype(np.float32)
