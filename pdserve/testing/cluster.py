"""Start a real `pdserve serve` (Ray + workers + gRPC router) as a subprocess on 127.0.0.1 and stop
it by its own process id (its process group, of a session of its own, holds the Ray processes it started)."""
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
# Ray 2.60's local node sometimes did not come up within its own waits (once the raylet's log was never even
# written): most of those were Ray's GCS or raylet aborting between fork and exec under gRPC's fork handlers, which
# `pdserve` now turns off (GRPC_ENABLE_FORK_SUPPORT, pdserve/cli.py). Should the node still miss its waits on a
# loaded box, the server exits with that error; the harness starts it once more, as a pod's restart policy would.
# The same for a port free_port() picked that another process (a Ray worker's) took before the server claimed it:
# the server exits 2 with "cannot listen on", and the second start gets fresh ports.
RETRYABLE_START_FAILURES = ("The current node timed out during startup", "Timed out waiting for file",
                            "cannot listen on")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: dict, tmp: Path, timeout: float = 240, args: tuple = ()):
        """`args`: more `pdserve serve` arguments (a MODEL, flags), after --config."""
        self.args = list(args)
        for attempt in (1, 2):
            self._configure(dict(config), tmp)
            self.log_path = tmp / f"pdserve-{self.port}-{attempt}.log"
            self._launch()
            deadline = time.time() + timeout
            while "pdserve: ready" not in self.log_path.read_text():
                if exit_status(self.proc) is not None or time.time() > deadline:
                    self.stop()
                    log = self.log_path.read_text()
                    if attempt == 1 and any(m in log for m in RETRYABLE_START_FAILURES):
                        break  # the server exited as it should; a supervisor would start it again
                    raise RuntimeError(f"server did not start:\n{log[-4000:]}")
                time.sleep(0.5)
            else:
                return

    def _configure(self, config: dict, tmp: Path) -> None:
        """Free ports (new ones for a second attempt: one of the first's may have been taken meanwhile) and the
        config file that names them."""
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        config["router"] = {**config.get("router", {}), "host": "127.0.0.1", "port": self.port,
                            "metrics_port": self.metrics_port, "http_port": self.http_port}
        self.config_path = tmp / f"pdserve-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def _launch(self) -> None:
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
        self.proc = subprocess.Popen([sys.executable, "-m", "pdserve", "serve", "--config", str(self.config_path),
                                      *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=NEUTRAL_CWD, env=env,
                                     start_new_session=True)

    def wait(self, timeout: float | None = None) -> int:
        """The server's exit code once it has exited (subprocess.TimeoutExpired after `timeout` s). Unlike
        `proc.wait()` it leaves the server unreaped, so stop() can still clean up its process group."""
        return wait_unreaped(self.proc, timeout)

    def stop(self, timeout: float = 30) -> None:
        """Stop the server and what it left running, signalling no process that is not its own (stop_session)."""
        try:
            stop_session(self.proc, timeout)
        finally:
            self.log.close()


def exit_status(proc: subprocess.Popen) -> int | None:
    """`proc`'s exit code if it has exited, else None, without reaping it (a zombie keeps its pid, and so the id of
    the process group it leads, from going to another process). A caller that reaped it (proc.wait, poll) has its
    returncode."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped behind Popen's back
        return proc.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def wait_unreaped(proc: subprocess.Popen, timeout: float | None = None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while (code := exit_status(proc)) is None:
        if deadline is not None and time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)
    return code


def stop_session(proc: subprocess.Popen, timeout: float = 30) -> int:
    """Stop `proc`, started with start_new_session=True, and what it left in its process group; return its exit code.

    SIGTERM goes to `proc`'s pid alone (a `pdserve serve` drains, stops its workers and its Ray, exits 0; a signal to
    the whole group would hit Ray's processes mid-shutdown too); after `timeout` s, SIGKILL. Once it has exited, and
    while it is still unreaped, SIGKILL goes to its process group: the group its own session began, whose id is its
    pid and cannot belong to another process before it is reaped, and never the caller's group. A `proc` its
    caller already reaped is only closed: its group is no longer provably its own."""
    if proc.returncode is None:
        if exit_status(proc) is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                wait_unreaped(proc, timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                wait_unreaped(proc)
        if os.getpgid(proc.pid) == proc.pid != os.getpgrp():  # started with start_new_session: its own group
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left in it (its exited leader ignores the signal)
    return proc.wait()
