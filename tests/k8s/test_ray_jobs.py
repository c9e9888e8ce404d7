"""``RayJobRuns``: the trigger's Ray Job Submission backend, on a stand-in for Ray's SDK client
(the real API is exercised end to end by the retraining scenario, tests/test_scenario.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mvl_pipeline.k8s import naming, ray_jobs
from mvl_pipeline.k8s.client import Outcome

BODY = {
    "metadata": {"name": "mvl-train-20261206t0300-abcdef01", "labels": {naming.LABEL_DATA_VERSION: "abcdef01"}},
    "spec": {"entrypoint": "kedro run --pipelines train --env scenario", "runtimeEnvYAML": "working_dir: .\n"},
}


class Jobs:
    """What the SDK's JobSubmissionClient answers, as its errors read (RuntimeError with text)."""

    def __init__(self, not_ready: int = 0) -> None:
        self.jobs: dict[str, SimpleNamespace] = {}
        self.not_ready = not_ready
        self.submits: list[dict] = []

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return self.jobs[job_id]

    def list_jobs(self):
        return list(self.jobs.values())

    def submit_job(self, **kwargs):
        self.submits.append(kwargs)
        if self.not_ready:
            self.not_ready -= 1
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, please try again later..")
        job_id = kwargs["submission_id"]
        if job_id in self.jobs:
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {job_id} already exists.")
        self.jobs[job_id] = SimpleNamespace(submission_id=job_id, status="PENDING", metadata=kwargs["metadata"],
                                            start_time=len(self.jobs), end_time=None, message="")  # fmt: skip
        return job_id


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(ray_jobs.time, "sleep", lambda _s: None)


def test_submit_uses_the_rayjob_name_entrypoint_runtime_env_and_labels_then_reattaches():
    client = Jobs()
    runs = ray_jobs.RayJobRuns("http://head:8265", client=client)
    assert runs.create_or_attach(BODY).created
    (call,) = client.submits
    assert call["submission_id"] == BODY["metadata"]["name"] and call["entrypoint"] == BODY["spec"]["entrypoint"]
    assert call["runtime_env"] == {"working_dir": "."} and call["metadata"] == {naming.LABEL_DATA_VERSION: "abcdef01"}
    assert not runs.create_or_attach(BODY).created and len(client.submits) == 1  # re-attached
    assert runs.run_for_data_version("abcdef01").name == BODY["metadata"]["name"]
    assert runs.run_for_data_version("00000000") is None


def test_a_head_whose_job_agent_is_not_up_yet_is_retried_a_bounded_number_of_times():
    client = Jobs(not_ready=2)
    assert ray_jobs.RayJobRuns("http://head:8265", client=client).create_or_attach(BODY).created
    assert len(client.submits) == 3
    never = Jobs(not_ready=99)
    with pytest.raises(RuntimeError, match="try again later"):
        ray_jobs.RayJobRuns("http://head:8265", client=never).create_or_attach(BODY)
    assert len(never.submits) == ray_jobs.SUBMIT_ATTEMPTS


@pytest.mark.parametrize("status,outcome", [("SUCCEEDED", Outcome.COMPLETE), ("FAILED", Outcome.FAILED),
                                            ("STOPPED", Outcome.FAILED), ("RUNNING", Outcome.NOT_FINISHED)])  # fmt: skip
def test_ray_job_states_map_to_the_rayjob_outcomes(status, outcome):
    client = Jobs()
    runs = ray_jobs.RayJobRuns("http://head:8265", client=client)
    runs.create_or_attach(BODY)
    client.jobs[BODY["metadata"]["name"]].status = status
    assert runs.wait(BODY["metadata"]["name"], timeout_s=0.01, poll_s=0.001).outcome is outcome
    # a failed or stopped run does not count as this data being trained: the next night retries
    assert (runs.run_for_data_version("abcdef01") is None) == (outcome is Outcome.FAILED)


def test_a_job_still_going_is_the_unfinished_run_whatever_its_data_version():
    client = Jobs()
    runs = ray_jobs.RayJobRuns("http://head:8265", client=client)
    assert runs.unfinished_run() is None
    runs.create_or_attach(BODY)
    client.jobs["not-a-training"] = SimpleNamespace(submission_id="not-a-training", status="RUNNING", metadata={},
                                                    start_time=99, end_time=None, message="")  # fmt: skip
    assert runs.unfinished_run().name == BODY["metadata"]["name"]  # only jobs with a data version
    client.jobs[BODY["metadata"]["name"]].status = "SUCCEEDED"
    assert runs.unfinished_run() is None
