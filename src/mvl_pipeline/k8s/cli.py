"""``python -m mvl_pipeline.k8s``: submit, follow and trigger training runs on Kubernetes.

    submit           create the training RayJob (or re-attach to it), print its name
    status NAME      print the RayJob's state once
    watch NAME       follow the RayJob until it ends
    trigger-retrain  create a Job from the retrain CronJob now

Exit codes: 0 the RayJob is Complete (or: done, for submit / trigger-retrain), 1 it Failed,
2 anything else (timeout, still running, not found, bad arguments, API or storage errors).
Only results go to stdout (a RayJob or Job name, a state line); logs go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from mvl_pipeline.k8s import naming
from mvl_pipeline.k8s.client import SLOT_ENV, Outcome, RayJobState, TrainingRuns
from mvl_pipeline.k8s.manifests import (
    RAYJOB_KIND,
    TEMPLATE_NAME,
    ManifestError,
    load_manifests,
    rayjob_from_template,
    render_kustomization,
    select_object,
)

logger = logging.getLogger("mvl_pipeline.k8s")

PROG_NAME = "python -m mvl_pipeline.k8s"
JOB_NAME_ENV = "MVL_JOB_NAME"
DEFAULT_CRONJOB = "mvl-retrain"
DEFAULT_TIMEOUT_S = 48 * 3600


class CommandError(click.ClickException):
    """An error that ends the command with exit code 2 ("other"), never 1 ("Failed")."""

    exit_code = 2


@dataclass
class Connection:
    """Where to talk to: kubeconfig + context (or in-cluster), and the namespace."""

    kubeconfig: str | None
    context: str | None
    namespace: str | None
    ray_address: str | None = None
    _runs: Any = field(default=None, init=False, repr=False)

    def runs(self) -> Any:
        """Where training runs live: KubeRay RayJobs, or Ray jobs behind ``--ray-address``."""
        if self._runs is None and self.ray_address:
            from mvl_pipeline.k8s.ray_jobs import RayJobRuns

            self._runs = RayJobRuns(self.ray_address)
        if self._runs is None:
            from mvl_pipeline.k8s.client import default_namespace, load_api_client

            api_client = load_api_client(self.kubeconfig, self.context)
            namespace = self.namespace or default_namespace(self.kubeconfig, self.context)
            self._runs = TrainingRuns(api_client, namespace)
        return self._runs


@contextmanager
def _errors_exit_2() -> Iterator[None]:
    """Turn API, kubeconfig, manifest and storage errors into a clear message and exit code 2."""
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError as Urllib3HTTPError

    try:
        yield
    except ApiException as exc:
        raise CommandError(f"Kubernetes API error {exc.status} {exc.reason}") from exc
    except Urllib3HTTPError as exc:
        raise CommandError(f"cannot reach the Kubernetes API: {exc}") from exc
    except ConfigException as exc:
        raise CommandError(f"kubeconfig: {exc}") from exc
    except (ManifestError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from exc


def _finish(state: RayJobState | None, name: str) -> int:
    if state is None:
        click.echo(f"{name}: not found")
        return int(Outcome.NOT_FINISHED)
    click.echo(state.describe())
    if state.message and state.outcome is Outcome.FAILED:
        logger.error("%s failed: %s", name, state.message)
    return int(state.outcome)


def _log_change(state: RayJobState) -> None:
    logger.info("%s", state.describe())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    default=None,
    help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; in a pod: its service account).",
)
@click.option("--context", default=None, help="kubeconfig context (default: the current one).")
@click.option(
    "-n",
    "--namespace",
    envvar="MVL_K8S_NAMESPACE",
    default=None,
    help="Namespace (default: $MVL_K8S_NAMESPACE, else the context's namespace).",
)
@click.option(
    "--ray-address",
    envvar="MVL_RAY_JOBS_ADDRESS",
    default=None,
    help="Submit to this Ray cluster's Job Submission API (http://HEAD:8265) instead of KubeRay, "
    "as KubeRay would (default: $MVL_RAY_JOBS_ADDRESS).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def cli(
    ctx: click.Context,
    kubeconfig: str | None,
    context: str | None,
    namespace: str | None,
    ray_address: str | None,
    verbose: bool,
) -> None:
    """Run mvl_pipeline training on Kubernetes (KubeRay RayJobs) or on a Ray cluster's job API."""
    _configure_logging(verbose)
    ctx.obj = Connection(kubeconfig=kubeconfig, context=context, namespace=namespace, ray_address=ray_address)


def _configure_logging(verbose: bool) -> None:
    """Log this package to the current stderr (replacing the handler of an earlier call)."""
    for handler in list(logger.handlers):
        if getattr(handler, "_mvl_k8s_cli", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._mvl_k8s_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _resolve_slot(value: str) -> datetime:
    if value.strip().lower() != "auto":
        return naming.parse_slot(value)
    if os.environ.get(SLOT_ENV):
        return naming.parse_slot(os.environ[SLOT_ENV])
    if os.environ.get(JOB_NAME_ENV):
        return naming.slot_from_cron_job_name(os.environ[JOB_NAME_ENV])
    raise CommandError(
        f"--slot auto needs ${SLOT_ENV} or ${JOB_NAME_ENV} (set in the CronJob's pod); "
        "elsewhere pass --slot now or a time"
    )


def _resolve_data_version(
    value: str, drop_url: str | None, endpoint_url: str | None
) -> tuple[str, str]:
    """``(data version, what it is)``: the drop fingerprint for ``auto``, else ``value`` itself."""
    if value.strip().lower() != "auto":
        return value.strip(), "given"
    if not drop_url:
        raise CommandError("--data-version auto needs --drop-url (or $MVL_DROP_URL)")
    from mvl_pipeline.k8s.drop_listing import drop_fingerprint

    storage_options = {}
    if endpoint_url and drop_url.startswith(("s3://", "s3a://")):
        storage_options = {"client_kwargs": {"endpoint_url": endpoint_url}}
    fingerprint = drop_fingerprint(drop_url, storage_options=storage_options)
    return fingerprint.sha256, f"drop listing of {fingerprint.n_files} files"


@cli.command()
@click.option(
    "--overlay",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Render the RayJob with `kubectl kustomize OVERLAY` (e.g. k8s/overlays/gpu).",
)
@click.option(
    "--manifest",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Take the RayJob from this pre-rendered YAML file.",
)
@click.option(
    "--template",
    "template_name",
    default=None,
    help=f"Copy the suspended template RayJob from the cluster (default: {TEMPLATE_NAME}).",
)
@click.option(
    "--slot",
    default="now",
    show_default=True,
    help="Schedule slot: now | auto (CronJob pod) | YYYYMMDDtHHMM | ISO 8601 | epoch minutes.",
)
@click.option(
    "--data-version",
    default="auto",
    show_default=True,
    help="auto = fingerprint of the drop listing; or any version string (e.g. a DVC rev).",
)
@click.option(
    "--drop-url",
    envvar="MVL_DROP_URL",
    default=None,
    help="The hospital drop to fingerprint (default: $MVL_DROP_URL).",
)
@click.option(
    "--endpoint-url",
    envvar="AWS_ENDPOINT_URL",
    default=None,
    help="S3-compatible endpoint for the drop (default: $AWS_ENDPOINT_URL).",
)
@click.option("--image", default=None, help="Override the image of every container.")
@click.option(
    "--skip-trained/--always",
    default=True,
    show_default=True,
    help="Submit nothing when a run of this data version succeeded or is still going (any slot): "
    "a night with no new data costs no cluster time. --always trains regardless.",
)
@click.option(
    "--wait/--no-wait",
    default=False,
    show_default=True,
    help="Then follow the RayJob to the end; the exit code is its outcome.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds to --wait before giving up (exit 2).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    overlay: Path | None,
    manifest: Path | None,
    template_name: str | None,
    slot: str,
    data_version: str,
    drop_url: str | None,
    endpoint_url: str | None,
    image: str | None,
    skip_trained: bool,
    wait: bool,
    timeout: float,
) -> None:
    """Create the training RayJob for a slot and data version, or re-attach to it; print its name.
    While another training run is still going, attach to that one: never two at once."""
    sources = [s for s in (overlay, manifest, template_name) if s is not None]
    if len(sources) > 1:
        raise click.UsageError("give at most one of --overlay, --manifest, --template")
    connection: Connection = ctx.obj
    with _errors_exit_2():
        slot_time = _resolve_slot(slot)
        version, origin = _resolve_data_version(data_version, drop_url, endpoint_url)
        name = naming.rayjob_name(slot_time, version)
        token = naming.data_version_token(version)
        logger.info("slot %s, data version %s (%s)", naming.slot_token(slot_time), token, origin)

        runs = connection.runs()
        earlier = runs.run_for_data_version(token) if skip_trained else None
        if earlier is not None and earlier.outcome is Outcome.COMPLETE:
            logger.info("nothing new: data version %s was trained by %s; submitting nothing", token, earlier.name)
            click.echo(earlier.name)
            ctx.exit(0)
        if earlier is not None:  # still going (an earlier slot's run): follow it, start no other
            logger.info("data version %s is being trained by %s: attaching to it", token, earlier.name)
            name = earlier.name
        going = runs.unfinished_run()
        if going is not None and going.name != name:
            # never two trainings at once: both would write the same data layers and register in
            # the same registry (a slow run and the next tick, a retried pod after new data arrived,
            # a hand-made submit); the CronJob's concurrencyPolicy sees none of these
            logger.warning("a training run is still going (%s): attaching to it instead of starting a second one "
                           "beside it; submit again once it has finished", going.describe())  # fmt: skip
            name = going.name
        if overlay is not None:
            template = select_object(render_kustomization(overlay), RAYJOB_KIND)
        elif manifest is not None:
            template = select_object(load_manifests(manifest), RAYJOB_KIND)
        elif connection.ray_address:
            raise CommandError("--ray-address needs the RayJob from --overlay or --manifest")
        else:
            template = connection.runs().get_rayjob(template_name or TEMPLATE_NAME)
            if template is None:
                raise CommandError(
                    f"no RayJob {template_name or TEMPLATE_NAME!r} in namespace "
                    f"{connection.runs().namespace!r}: `kubectl apply -k k8s/overlays/<overlay>` "
                    "first, or pass --overlay / --manifest"
                )
        body = rayjob_from_template(
            template,
            name=name,
            namespace=runs.namespace,
            labels=naming.run_labels(slot_time, version),
            annotations={naming.ANNOTATION_DATA_FINGERPRINT: naming.data_version_digest(version)},
            image=image,
        )
        result = runs.create_or_attach(body)
        click.echo(result.name)
        if not wait:
            return
        state = runs.wait(result.name, timeout_s=timeout, on_change=_log_change)
    ctx.exit(_finish(state, result.name))


@cli.command()
@click.argument("name")
@click.pass_context
def status(ctx: click.Context, name: str) -> None:
    """Print the RayJob's state once; exit 0 Complete, 1 Failed, 2 not finished / not found."""
    with _errors_exit_2():
        state = ctx.obj.runs().rayjob_state(name)
    ctx.exit(_finish(state, name))


@cli.command(name="watch")
@click.argument("name")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds to follow before giving up (exit 2).",
)
@click.pass_context
def watch_command(ctx: click.Context, name: str, timeout: float) -> None:
    """Follow the RayJob to Complete (exit 0) or Failed (exit 1); timeout or other: exit 2."""
    with _errors_exit_2():
        state = ctx.obj.runs().wait(name, timeout_s=timeout, on_change=_log_change)
    if state is not None and not state.finished:
        logger.error("%s did not finish within %.0f s", name, timeout)
    ctx.exit(_finish(state, name))


@cli.command(name="trigger-retrain")
@click.option(
    "--cronjob",
    default=DEFAULT_CRONJOB,
    show_default=True,
    help="The retrain CronJob to instantiate.",
)
@click.option(
    "--slot",
    default="now",
    show_default=True,
    help="Schedule slot of this run (now | YYYYMMDDtHHMM | ISO 8601 | epoch minutes).",
)
@click.pass_context
def trigger_retrain(ctx: click.Context, cronjob: str, slot: str) -> None:
    """Create a Job from the CronJob now (like `kubectl create job --from=cronjob/...`)."""
    with _errors_exit_2():
        slot_time = naming.parse_slot(slot)
        job_name = naming.manual_job_name(cronjob, slot_time)
        result = ctx.obj.runs().create_job_from_cronjob(
            cronjob, job_name, env={SLOT_ENV: naming.slot_token(slot_time)}
        )
    click.echo(result.name)
    if not result.created:
        logger.info("slot %s was already triggered: Job %s", naming.slot_token(slot_time), job_name)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: run the CLI; exit 2 (never 1, which means Failed) on unexpected errors."""
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name=PROG_NAME,
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code if exc.exit_code != 1 else 2)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(2)
    except Exception:  # an unexpected error must not look like "the training failed" (1)
        logger.exception("unexpected error")
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
