"""kedro-viz shows the lineage of ``train``: its API, plot previews, and the graph in a real browser.

``kedro viz run`` is started on a copy of the project (its own process group, stopped as a
group), with one real PNG where the catalog's learning curves live. Headless Chromium (Debian's
``chromium``; ``make test`` installs it through ``make browser``) loads the page with every
modular pipeline expanded and parameters shown. Minutes with a cold start: marked slow.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TRAIN_STAGES = ("ingest", "preprocess", "fit", "evaluate", "register")
LAYERS = ["raw", "intermediate", "primary", "feature", "model_input", "models", "reporting", "registry"]
PLOTS = ("learning_curves_plot", "per_case_plot", "overlay_plot")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars", "--window-size=1600,1000",
]  # fmt: skip


def _free_port() -> int:
    """A free port below 49152: kedro-viz refuses ports in the ephemeral range (49152+), which
    is where an OS-assigned port (bind to 0) often lands: the test was flaky until this."""
    import random

    candidates = random.Random(os.getpid()).sample(range(20000, 40000), 200)
    for port in candidates:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port between 20000 and 40000")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group started with the process, SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def chromium() -> str:
    """The browser binary; missing means a broken test machine: fail loudly, never skip."""
    candidates = [os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(
        "Chromium not found (looked at $CHROMIUM, chromium on PATH, /usr/bin/chromium). The kedro-viz "
        "lineage test needs a real browser: `make browser` installs Debian's chromium "
        "(apt-get install -y chromium, as root), and `make test` runs it first."
    )


def run_chromium(args: list[str], profile: Path, timeout: int = 120) -> str:
    process = subprocess.Popen(
        [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        _stop_group(process)
    assert process.returncode == 0, f"chromium failed ({process.returncode}): {stderr[-3000:]}"
    return stdout


@pytest.fixture(scope="module")
def train_pipeline():
    from kedro.framework.project import configure_project

    configure_project("mvl_pipeline")
    from mvl_pipeline.pipeline_registry import register_pipelines

    return register_pipelines()["train"]


@pytest.fixture(scope="module")
def viz(project_copy):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = project_copy("kedro-viz")
    figure, axes = plt.subplots(figsize=(4, 3))
    axes.plot([0, 1, 2, 3], [1.0, 0.6, 0.45, 0.4], marker="o")
    axes.set_title("training loss")
    png = root / "data/08_reporting/learning_curves.png"  # where the catalog entry points
    figure.savefig(png, dpi=60)
    plt.close(figure)

    port = _free_port()
    log = (root.parent / "kedro-viz.log").open("w")
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    process = subprocess.Popen(
        [str(BIN / "kedro"), "viz", "run", "--host", "127.0.0.1", "--port", str(port), "--no-browser"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                _get(f"{url}/api/main")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    tail = (root.parent / "kedro-viz.log").read_text(errors="replace")[-4000:]
                    pytest.fail(f"kedro viz did not come up on {url} (exit {process.poll()}):\n{tail}")
                time.sleep(1)
        yield SimpleNamespace(url=url, root=root, png=png.read_bytes())
    finally:
        _stop_group(process)
        log.close()
    assert process.poll() is not None, "kedro viz still running after its process group was stopped"


@pytest.fixture(scope="module")
def graph(viz) -> dict:
    return _get(f"{viz.url}/api/pipelines/train")


def _by_type(graph: dict, kind: str) -> list[dict]:
    return [node for node in graph["nodes"] if node["type"] == kind]


def test_api_serves_every_node_dataset_and_parameter_of_train(graph, train_pipeline):
    assert graph["selected_pipeline"] == "train"
    assert {n["full_name"] for n in _by_type(graph, "task")} == {n.name for n in train_pipeline.nodes}
    datasets = {d for d in train_pipeline.datasets() if not d.startswith("params:")}
    parameters = {d for d in train_pipeline.datasets() if d.startswith("params:")}
    assert {n["name"] for n in _by_type(graph, "data")} == datasets
    assert {n["name"] for n in _by_type(graph, "parameters")} == parameters
    assert graph["layers"] == LAYERS  # kedro-viz drops them all when the layers form a cycle
    unlayered = [n["name"] for n in _by_type(graph, "data") if not n.get("layer")]
    assert not unlayered, f"datasets without a kedro-viz layer: {unlayered}"
    assert {"ingest", "fit", "evaluate", "register"} <= set(graph["modular_pipelines"])
    assert set(TRAIN_STAGES) <= {tag["id"] for tag in graph["tags"]}
    node_ids = {n["id"] for n in graph["nodes"]}
    assert graph["edges"] and all({e["source"], e["target"]} <= node_ids for e in graph["edges"])


def test_evaluation_plots_are_previewed_from_their_files(viz, graph):
    ids = {n["name"]: n["id"] for n in _by_type(graph, "data")}
    shown = _get(f"{viz.url}/api/nodes/{ids['learning_curves_plot']}")
    assert shown["preview_type"] == "ImagePreview"
    assert base64.b64decode(shown["preview"]) == viz.png
    # the other plots are not generated in this copy: nothing to preview (not an error)
    for name in set(PLOTS) - {"learning_curves_plot"}:
        assert not _get(f"{viz.url}/api/nodes/{ids[name]}").get("preview")


def test_browser_renders_the_lineage_graph(viz, graph, train_pipeline, tmp_path):
    plot_id = next(n["id"] for n in _by_type(graph, "data") if n["name"] == "learning_curves_plot")
    page = f"{viz.url}/?pid=train&expandAllPipelines=true&types=nodes,datasets,parameters&sid={plot_id}"
    dom = run_chromium(["--virtual-time-budget=30000", "--dump-dom", page], tmp_path / "profile-dom")
    (tmp_path / "lineage.html").write_text(dom, encoding="utf-8")

    labels = set(re.findall(r'class="pipeline-node__text"[^>]*>([^<]+)<', dom))
    short_names = {node.name.rpartition(".")[2] for node in train_pipeline.nodes}
    assert short_names <= labels, f"nodes missing from the rendered graph: {sorted(short_names - labels)}"
    datasets = {d for d in train_pipeline.datasets() if not d.startswith("params:")}
    assert datasets <= labels, f"datasets missing from the rendered graph: {sorted(datasets - labels)}"
    parameters = {d for d in train_pipeline.datasets() if d.startswith("params:")}
    assert parameters <= labels, f"parameters missing from the rendered graph: {sorted(parameters - labels)}"
    assert labels == short_names | datasets | parameters  # every modular pipeline expanded, nothing else
    assert re.findall(r'data-id="layer-label--([^"]+)"', dom) == LAYERS
    # the selected plot's metadata panel shows the preview image itself
    assert "data:image/png;base64," + base64.b64encode(viz.png).decode()[:200] in dom

    shot = tmp_path / "lineage.png"
    run_chromium(["--virtual-time-budget=30000", f"--screenshot={shot}", page], tmp_path / "profile-shot")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1600 and int.from_bytes(data[20:24], "big") == 1000
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"
