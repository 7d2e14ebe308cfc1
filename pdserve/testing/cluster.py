"""Start a real `pdserve serve` (Ray + workers + gRPC router) as a subprocess on 127.0.0.1 and stop
it by its own process id (its process group holds the Ray processes it started)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# `python -m` puts its working directory first on sys.path: commands run from a folder that holds no
# package, so nothing there can shadow an installed one (a repository root holds kernels/, router/, ...)
NEUTRAL_CWD = tempfile.gettempdir()
# Ray 2.60's local node sometimes does not come up within its own 30 s waits on the 2-core CI box (the
# raylet's wait cannot be configured; once its log was never even written). The server then exits with
# that error; the harness starts it once more, as a pod's restart policy would.
RAY_START_FAILURES = ("The current node timed out during startup", "Timed out waiting for file")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: dict, tmp: Path, timeout: float = 240, args: tuple = ()):
        """`args`: more `pdserve serve` arguments (a MODEL, flags), after --config."""
        config = dict(config)
        self.args = list(args)
        self.port = free_port()
        self.metrics_port = free_port()
        self.http_port = free_port()
        config.setdefault("router", {})
        config["router"] = {**config["router"], "host": "127.0.0.1", "port": self.port,
                            "metrics_port": self.metrics_port, "http_port": self.http_port}
        self.config_path = tmp / f"pdserve-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        for attempt in (1, 2):
            self.log_path = tmp / f"pdserve-{self.port}-{attempt}.log"
            self._launch()
            deadline = time.time() + timeout
            while "pdserve: ready" not in self.log_path.read_text():
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    log = self.log_path.read_text()
                    if attempt == 1 and any(m in log for m in RAY_START_FAILURES):
                        break  # the server exited as it should; a supervisor would start it again
                    raise RuntimeError(f"server did not start:\n{log[-4000:]}")
                time.sleep(0.5)
            else:
                return

    def _launch(self) -> None:
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--config", str(self.config_path),
                                      *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=NEUTRAL_CWD, env=env,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever Ray left in the server's process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()
