"""settings.py drops one MLflow warning, about kedro-mlflow's own pyfunc class, and no other. Each
case runs in a fresh interpreter: MLflow shows that message at most once per process."""

from __future__ import annotations

import subprocess
import sys

import pytest

HINTS = "Add type hints to the `predict` method"
A_CLASS_WITHOUT_HINTS = """
import mlflow.pyfunc

class Unhinted(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input
"""


def _stderr(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.mark.parametrize("settings", [True, False], ids=["with settings", "without settings"])
def test_mlflow_s_warning_about_kedro_mlflow_s_pyfunc_is_dropped_only_with_the_settings(settings):
    code = ("import mvl_pipeline.settings\n" if settings else "") + "import kedro_mlflow.mlflow\n"
    assert (HINTS in _stderr(code)) is not settings  # shown without them: the test sees the warning


def test_the_same_warning_about_any_other_class_and_other_warnings_are_still_shown():
    stderr = _stderr("import mvl_pipeline.settings\n" + A_CLASS_WITHOUT_HINTS + "import warnings\nwarnings.warn('another')\n")
    assert HINTS in stderr and "UserWarning: another" in stderr
