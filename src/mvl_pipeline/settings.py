"""Kedro project settings."""

from kedro.config import OmegaConfigLoader
from omegaconf.resolvers import oc

from mvl_pipeline.hooks import KilledRunHook, LineageTagsHook, RunLockHook

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/cluster reads site settings (bucket, MLflow URI ...) from the pod's environment,
    # which the ConfigMap and Secret of k8s/ provide. Values, never secrets, live in git.
    "custom_resolvers": {"oc.env": oc.env},
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
HOOKS = (_RUN_LOCK, KilledRunHook(_RUN_LOCK), LineageTagsHook())
