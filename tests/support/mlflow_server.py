"""A real ``mlflow server`` process for fault tests: started, stopped (SIGSTOP: it keeps its socket
and never answers, a hung server), continued and killed with signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from scenarios.retrain import NO_SERVER_JOBS
from tests.support.net import free_port

BIN = Path(sys.executable).parent


class Server:
    """``mlflow server`` on a sqlite backend and a local artifact store, as a real process."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **NO_SERVER_JOBS},
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.kill()  # not left running after the failed test
        raise AssertionError("mlflow server did not answer /health within 120 s")

    def _signal(self, sig: int) -> None:
        assert self.process is not None and self.process.poll() is None, "the mlflow server is not running"
        os.killpg(self.process.pid, sig)  # the server and its workers

    def stop(self) -> None:
        """SIGSTOP: connections are still accepted (the kernel's backlog), nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)  # a stopped process dies on SIGKILL too; be explicit
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
