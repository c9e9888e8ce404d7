"""`make setup` with a Python the project does not support stops at once, saying which it needs
and how to name another, instead of failing deep inside the install (requires-python)."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_make_setup_with_an_unsupported_python_stops_before_making_the_venv(tmp_path):
    # A stand-in for a Python 3.10: answers -V as one, and fails the version check (and pip) as one would.
    fake = tmp_path / "python3.10"
    fake.write_text('#!/bin/bash\nif [ "$1" = -V ]; then echo "Python 3.10.13"; exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "--no-print-directory", "setup", f"PYTHON={fake}", f"VENV={venv}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "needs Python 3.11 or 3.12" in result.stderr and "Python 3.10.13" in result.stderr, result.stderr
    assert "PYTHON=python3.11" in result.stderr
    assert not venv.exists()


def test_the_versions_the_makefile_accepts_are_the_ones_pyproject_declares():
    requires = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.13"  # the check in the Makefile's $(STAMP) rule says (3, 11) <= v < (3, 13)
    assert "(3, 11) <= sys.version_info[:2] < (3, 13)" in (PROJECT_ROOT / "Makefile").read_text()
