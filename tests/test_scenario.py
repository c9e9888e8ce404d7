"""The retraining scenario's smoke form (``make scenario SCENARIO_ARGS=--smoke``), as CI runs it:
three nights on real processes (a moto S3 drop, a two-node Ray cluster fed through its Job
Submission API, an ``mlflow server``), with the scenario's own checks and a byte scan for the
identifiers planted in the drop. The scenario exits 1 when any of its checks fails; this test
reads its report and asserts the facts one by one, so a failure names what broke."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("scenario") / "work"
    command = ["make", "--no-print-directory", "scenario", f"SCENARIO_ARGS=--smoke --workdir {work}"]  # the README's
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
    assert (work / "report.json").exists(), f"no report (rc {done.returncode}):\n{done.stderr[-6000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["returncode"], result["stderr"], result["work"] = done.returncode, done.stderr, work
    return result


def test_every_check_of_the_scenario_held(report):
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed and report["returncode"] == 0, f"{failed}\n{report['stderr'][-4000:]}"
    assert len(report["checks"]) >= 12


def test_day_0_trains_from_scratch_and_deploys_a_first_champion(report):
    day0 = report["days"][0]
    assert day0["jobs_submitted"] == 1 and day0["job_status"] == "SUCCEEDED" and day0["trigger_exit"] == 0
    assert day0["fit"]["init"]["from"] == "scratch"
    assert day0["registration"]["promoted"] and day0["champion_version"] == "1"
    assert day0["counts"]["quarantined"] == 0


def test_day_1_one_job_for_two_triggers_starts_from_the_champion_and_is_gated_against_it(report):
    day0, day1 = report["days"][:2]
    assert day1["jobs_submitted"] == 1 and day1["duplicate_trigger"] == {"exit": 0, "job": day1["job"]}
    assert day1["fit"]["init"] == {**day1["fit"]["init"], "from": "champion", "version": "1"}
    assert day1["fit"]["epochs"] < day0["fit"]["epochs"]
    assert day1["registration"]["champion_version"] == "1"  # a paired comparison, not a first model
    assert "CI" in day1["registration"]["reason"]
    assert day1["counts"]["quarantined"] >= 2 and day1["counts"]["cases"] > day0["counts"]["cases"]


def test_day_2_without_new_data_spends_no_cluster_time(report):
    day1, day2 = report["days"][1:]
    assert day2["jobs_submitted"] == 0 and day2["trigger_exit"] == 0 and day2["cluster_s"] == 0.0
    assert day2["job"] == day1["job"]  # the trigger names the run that trained this data
    assert day2["champion_version"] == day1["champion_version"]


def test_nothing_the_training_side_wrote_holds_a_planted_identifier(report):
    assert report["identifiers_scanned"] > 50
    assert report["phi_hits"] == []
    # the scan reads what it claims to: the cluster volume, MLflow's store and the checkpoints on S3
    work: Path = report["work"]
    assert any((work / "s3-ray-results").rglob("model.safetensors"))
    assert (work / "mlflow" / "mlflow.db").stat().st_size > 0
    assert (work / "report.md").read_text(encoding="utf-8").count("| ") > 10
