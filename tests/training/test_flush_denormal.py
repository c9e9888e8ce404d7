"""``fit.loop.flush_denormal``: denormal floats read and written as zero while the loop runs.

x86 keeps the flush-to-zero setting per thread; torch's intra-op threads copy the caller's when
they start. So the tests that need every thread run in a fresh process (as a Ray Train worker is).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PRELUDE = """
import json, logging, torch
from mvl_pipeline.training.loop import denormals_flushed, flush_denormal
torch.set_num_threads(2)

def caller_flushes():  # one denormal (5.9e-39 < 1.18e-38, fp32's smallest normal) x 1.5, on this thread
    return bool(torch.tensor([0x00400000], dtype=torch.int32).view(torch.float32) * 1.5 == 0)
"""


def fresh_process(body: str) -> dict[str, Any]:
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_in_a_fresh_process_every_thread_flushes_inside_the_block_and_the_caller_not_after():
    result = fresh_process("""
        with flush_denormal(True):
            inside = denormals_flushed()
        print(json.dumps({"inside": inside, "caller_after": caller_flushes()}))
    """)
    assert result["inside"] == 1.0
    assert result["caller_after"] is False


def test_a_thread_pool_started_before_the_block_is_reached_only_in_part_and_that_is_logged():
    result = fresh_process("""
        logging.basicConfig(level=logging.WARNING)
        before = denormals_flushed()  # starts torch's thread pool with flush-to-zero off
        with flush_denormal(True):
            inside = denormals_flushed()
        print(json.dumps({"before": before, "inside": inside, "after": denormals_flushed()}))
    """)
    assert result["before"] == 0.0
    assert result["inside"] == 0.5  # the calling thread's half of the work only
    assert result["after"] == 0.0
    assert "flush-to-zero reaches 50% of torch's threads" in result["stderr"]


def test_switched_off_the_block_changes_nothing():
    result = fresh_process("""
        with flush_denormal(False):
            inside = denormals_flushed()
        print(json.dumps({"inside": inside}))
    """)
    assert result["inside"] == 0.0


def test_the_loop_flushes_on_every_thread_while_it_trains_only_when_asked(tmp_path):
    result = fresh_process(f"""
        from pathlib import Path
        from mvl_pipeline.training.loop import run_training
        from tests.training.test_loop import RecordingSession, training_config

        class Recording(RecordingSession):
            def report(self, metrics, checkpoint_dir):
                self.flushing.append((caller_flushes(), denormals_flushed()))
                super().report(metrics, checkpoint_dir)

        flushing = {{}}
        for enabled in (True, False):
            keep = Path({str(tmp_path)!r}) / f"run-{{enabled}}"
            keep.mkdir()
            session = Recording(keep)
            session.flushing = []
            config = training_config(Path({str(tmp_path)!r}), epochs=2, flush_denormal=enabled)
            config["loop"]["torch_threads"] = 2
            run_training(config, session)
            flushing[str(enabled)] = session.flushing
        print(json.dumps({{"flushing": flushing, "caller_after": caller_flushes()}}))
    """)
    assert result["flushing"]["True"] == [[True, 1.0], [True, 1.0]]  # the loop ran first: a fresh pool
    # the pool's threads started flushing, and keep it after the block (documented); the caller not
    assert result["flushing"]["False"] == [[False, 0.5], [False, 0.5]]
    assert result["caller_after"] is False
