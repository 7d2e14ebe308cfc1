"""`pdserve demo`, the README's first command, as a newcomer sees it: our lines and the streamed answers, none of
Ray's or gRPC's chatter, no crash report; and a failure in one line with its exit code."""
from __future__ import annotations

import subprocess
import sys

from pdserve.testing.cluster import NEUTRAL_CWD

# what the demo once printed beside its own lines: gRPC's fork handlers, Ray's notices (ray.init off the main thread,
# token authentication turned on), and the crash reports of a Ray process aborted between fork and exec
NOISE = ("fork_posix", "skipping fork() handlers", "SIGTERM handler is not set", "Token authentication",
         "Failed to start the dashboard", "return code -6", "Check failed", "SIGABRT", "*** ", "Traceback")


def _demo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", "demo", *args], capture_output=True, text=True,
                          cwd=NEUTRAL_CWD, timeout=timeout)


def test_the_demo_shows_our_output_only():
    r = _demo("--max-tokens", "4")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    assert "pdserve demo: cluster ready in" in out and out.count(">>> ") == 3 and out.count("tokens, finish=") == 3
    assert out.rstrip().endswith("pdserve demo: shutting the cluster down"), out[-500:]
    noise = [line for line in (out + r.stderr).splitlines() if any(n in line for n in NOISE)]
    assert not noise, "\n".join(noise[:20])


def test_a_failure_to_start_is_one_line_and_its_exit_code(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model: {path: /nonexistent/model}\n")
    r = _demo("--config", str(config), timeout=120)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pdserve demo: error: the cluster failed to start: "), r.stderr
    assert "/nonexistent/model" in lines[0]
