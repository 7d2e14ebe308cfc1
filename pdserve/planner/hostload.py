"""The CPU share our engines got on a shared box: how the simulator accounts for other work on the same cores.

On a box shared with other jobs (and, for a cluster, with its own router and Ray), an engine's step takes longer
when its thread waits for a core. Linux records both per thread (/proc/PID/task/TID/schedstat: nanoseconds on a
core, nanoseconds runnable but waiting), so the share an engine got while it had work is run / (run + wait),
whatever the cause (other sessions' jobs, nice levels: Ray runs its workers at nice 15). A profile records the
share its measurements ran at; a run (the validation's) the share its engines got; the simulation scales the
profile's step times by the ratio (`ClusterSpec.cpu_share`). On a dedicated machine both are 1.

Linux only; elsewhere the share is None and nothing is scaled.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def sched_ns(pids: list[int]) -> dict[tuple[int, int], tuple[int, int]]:
    """{(pid, tid): (ns on a core, ns runnable but waiting)} for every thread of these processes."""
    out = {}
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            try:
                r, w = (t / "schedstat").read_text().split()[:2]
            except (OSError, ValueError):
                continue
            out[(pid, int(t.name))] = (int(r), int(w))
    return out


def box_busy_ns() -> int | None:
    """Nanoseconds the box's cores have spent busy since boot, all processes of every user together (/proc/stat's
    first line: everything but idle and iowait). Over an interval, minus what our engines ran, it is the background
    the engines shared the cores with: the router, Ray, the bench client, other jobs."""
    try:
        j = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(j) - j[3] - j[4]) * 10 ** 9 // os.sysconf("SC_CLK_TCK")


def process_cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on a core of these processes since they started, every thread together, ended threads included
    (/proc/PID/stat utime + stime; a thread-by-thread sum misses threads that come and go, as thread pools' do)."""
    total = 0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += int(f[11]) + int(f[12])  # fields 14 and 15 of the line, utime and stime, in clock ticks
    return total * 10 ** 9 // os.sysconf("SC_CLK_TCK")


def pids_whose_cmdline_has(text: str, session: int | None = None) -> list[int]:
    """Processes whose command line holds `text` (Ray names an actor's process ray::ClassName), in `session` only
    when given (another user's cluster on the same box has processes of the same names)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text not in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    continue
                if session is not None and int((d / "stat").read_text().rsplit(")", 1)[1].split()[3]) != session:
                    continue
                out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


class CPUShare:
    """run / (run + wait) summed over the threads of `pids` between start() and stop(); 1.0 when they never
    waited for a core. The sums weigh each thread by its time: an engine's steps (which run on an executor's
    threads, not one) dominate, pollers that wake briefly count little. Also per `period` seconds: other work
    comes and goes, and the trace keeps when. An interval in which they were runnable for less than a fifth of it
    holds the share before it."""

    def __init__(self, pids: list[int], period: float = 0.5):
        self.pids, self.period = pids, period
        self.points: list[tuple[float, dict]] = []  # (monotonic seconds, sched_ns())
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.tids: list[tuple[int, int]] = []  # the threads alive from start() to stop()

    def _sample(self) -> None:
        self.points.append((time.monotonic(), sched_ns(self.pids)))

    def _run(self) -> None:
        while not self.done.wait(self.period):
            self._sample()

    def start(self) -> "CPUShare":
        self._sample()
        self.thread.start()
        return self

    def _sums(self, a: dict, b: dict) -> tuple[int, int]:
        keys = [k for k in self.tids if k in a and k in b] if self.tids else [k for k in b if k in a]
        return sum(b[k][0] - a[k][0] for k in keys), sum(b[k][1] - a[k][1] for k in keys)

    def stop(self) -> float | None:
        self.done.set()
        self.thread.join()
        self._sample()
        first, last = self.points[0][1], self.points[-1][1]
        self.tids = sorted(set(first) & set(last))
        return _share(*self._sums(first, last)) if self.tids else None

    def trace(self, since: float) -> list[tuple[float, float]]:
        """[(seconds after `since` (monotonic) at which an interval starts, the share in it)], from `since` on
        (after stop())."""
        out: list[tuple[float, float]] = []
        last = None
        for (t0, a), (t1, b) in zip(self.points, self.points[1:]):
            run, wait = self._sums(a, b)
            # an interval in which they barely had work says little about the share they would have got
            share = _share(run, wait) if run + wait > 0.2 * (t1 - t0) * 1e9 else last
            last = share
            if share is not None and t1 > since:
                out.append((max(0.0, t0 - since), share))
        return out


def _share(run: int, wait: int) -> float | None:
    # threads are read one after another, not at one instant: clamp what that skews past the bounds
    return min(1.0, run / max(run + max(wait, 0), 1)) if run > 0 else None


def this_process() -> list[int]:
    return [os.getpid()]
