"""Kedro project settings."""

import sys
import warnings

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

from mvl_pipeline.hooks import KilledRunHook, LineageTagsHook, MissingInputsHook, RunLockHook


def _show_warning_unless_about_kedro_mlflow_pyfunc(message, category, filename, lineno, file=None, line=None):
    """kedro-mlflow's own pyfunc class (``KedroPipelineModel``, which this project never logs) has
    no type hints on ``predict``. MLflow says so in a UserWarning when kedro-mlflow defines that
    class, at the start of every ``kedro run``, about code the user cannot change, and under a
    ``once`` filter of its own that no warning filter set here could override. So that one
    message is dropped where warnings are shown, and only while a kedro-mlflow module is on the
    stack (the class being defined); every other warning is shown as before. This project's
    pyfunc has its type hints (tests/serving)."""
    if "Add type hints to the `predict` method" in str(message):
        frame = sys._getframe(1)
        while frame is not None:
            if str(frame.f_globals.get("__name__", "")).startswith("kedro_mlflow."):
                return
            frame = frame.f_back
    _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning
warnings.showwarning = _show_warning_unless_about_kedro_mlflow_pyfunc

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/cluster reads site settings (bucket, MLflow URI ...) from the pod's environment,
    # which the ConfigMap and Secret of k8s/ provide. Values, never secrets, live in git.
    "custom_resolvers": {"oc.env": oc.env, "mvl.folder": lambda url: str(url).rstrip("/") or "/"},
    # An environment (conf/cluster) overrides single keys of a parameter block, not whole blocks.
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
    "config_patterns": {
        "parameters": ["parameters*", "parameters*/**", "**/parameters*"],
        "mlflow": ["mlflow*", "mlflow*/**"],
        "globals": ["globals*", "globals*/**"],
    },
}

# kedro-mlflow registers its own hook through its entry point; ours take the run lock of the data
# root before it starts its run, note that run in the lock (and close the run of a killed holder),
# and tag the run it starts.
_RUN_LOCK = RunLockHook()
HOOKS = (_RUN_LOCK, KilledRunHook(_RUN_LOCK), LineageTagsHook(), MissingInputsHook())
