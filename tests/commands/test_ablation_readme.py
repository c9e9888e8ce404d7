"""`python -m mvl_pipeline.commands.ablation_readme SUMMARY README` rewrites only the text between
the ablation markers, on a temporary copy of the project's README (the README itself is never
touched here), and refuses a README without its markers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from mvl_pipeline.commands.ablation_readme import BEGIN, END, main
from mvl_pipeline.pipelines.ablation.nodes import summarise_ablation
from tests.support.ablation_results import histories, results

ROOT = Path(__file__).resolve().parents[2]


def write_summary(path: Path) -> dict:
    params = {"arms": ["pretrained", "none"], "seeds": [0, 1, 2], "reference": "pretrained", "statistics": {"n_resamples": 1000}}
    summary = summarise_ablation(results({"pretrained": 0.0, "none": -0.05}), histories(["pretrained", "none"], [0, 1, 2]), params)
    path.write_text(json.dumps(summary, allow_nan=False))
    return summary


def test_the_section_between_the_markers_is_generated_and_the_rest_kept(tmp_path):
    readme_before = hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest()
    copy = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    assert original.count(BEGIN) == 1 and original.count(END) == 1  # the project's README holds them
    head, tail = original[: original.index(BEGIN)], original[original.index(END) + len(END) :]
    copy.write_text(f"{head}{BEGIN}\nhand-typed table\n{END}{tail}", encoding="utf-8")
    summary = tmp_path / "summary.json"
    write_summary(summary)

    done = subprocess.run([sys.executable, "-m", "mvl_pipeline.commands.ablation_readme", str(summary), str(copy)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = copy.read_text(encoding="utf-8")
    assert text.startswith(head + BEGIN) and text.endswith(END + tail)
    section = text[len(head) + len(BEGIN) : -len(END + tail)]
    assert "hand-typed table" not in section
    assert "**`pretrained` scored better Dice than `none`.**" in section
    assert f"ablation_readme {summary.as_posix()} README.md" in section
    assert main([str(summary), str(copy)]) == 0 and copy.read_text(encoding="utf-8") == text  # idempotent
    assert hashlib.sha256((ROOT / "README.md").read_bytes()).hexdigest() == readme_before


def test_a_readme_without_its_markers_is_left_alone(tmp_path):
    summary = tmp_path / "summary.json"
    write_summary(summary)
    for body in ("# no markers\n", f"# reversed\n{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n"):
        readme = tmp_path / "README.md"
        readme.write_text(body, encoding="utf-8")
        assert main([str(summary), str(readme)]) == 2
        assert readme.read_text(encoding="utf-8") == body
    assert main([str(tmp_path / "missing.json"), str(readme)]) == 2


def test_another_json_file_is_refused_as_not_an_ablation_summary(tmp_path, caplog):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{BEGIN}\nkept\n{END}\n", encoding="utf-8")
    other = tmp_path / "quarantine.json"
    other.write_text(json.dumps({"entries": []}))
    caplog.set_level("ERROR")
    assert main([str(other), str(readme)]) == 2
    assert f"{other} is not an ablation's summary.json (it has no 'design')" in caplog.text
    assert readme.read_text(encoding="utf-8") == f"# x\n{BEGIN}\nkept\n{END}\n"
