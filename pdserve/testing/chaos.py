"""What the chaos suite (tests/cluster/test_chaos.py) and the soak (benchmarks/soak.py) drive a real cluster with:
concurrent gRPC streams that keep the arrival time of every response, the moment a worker process dies, and
the pools' state until they are whole again. Times are time.monotonic(), comparable across these threads."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Optional

import psutil

from pdserve.client import request_proto, stream_one
from pdserve.engine.sequence import SamplingParams


def wait_for(pred: Callable, timeout: float, what: str, period: float = 0.1):
    """pred()'s first truthy value, polled every `period` s; AssertionError naming `what` past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(period)


def cluster_info(stub):
    from pdserve.proto import pb

    return stub.GetClusterInfo(pb.ClusterInfoRequest(), timeout=30)


def all_blocks_free(stub, timeout: float = 30.0):
    """The cluster view once every worker reports no KV block in use and the router counts nothing in flight on
    it (worker stats are probed every 0.5 s, so this waits for a fresh round)."""
    def free():
        info = cluster_info(stub)
        return info if not any(w.kv_cache_usage > 0 or w.inflight for w in info.workers) else None
    return wait_for(free, timeout, "every KV block free on every worker")


def counter(metrics_text: str, series: str) -> float:
    """The value of one Prometheus sample, e.g. 'pdserve_request_migrations_total{cause="transfer"}'; 0 if absent."""
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Stream:
    """One streaming Generate and what arrived of it."""
    rid: str
    prompt: list[int]
    params: SamplingParams
    result: Optional[dict] = None  # stream_one's result
    error: Optional[BaseException] = None
    times: list[float] = field(default_factory=list)  # arrival of each response that carried tokens
    counts: list[int] = field(default_factory=list)  # ... and how many tokens it carried
    started: float = 0.0  # when its Generate was sent
    prefill_worker: str = ""  # of the attempt that streamed the first token
    decode_worker: str = ""

    def tokens_before(self, t: float) -> int:
        return sum(n for at, n in zip(self.times, self.counts) if at < t)

    def first_after(self, t: float) -> Optional[float]:
        return next((at for at in self.times if at >= t), None)

    def median_gap(self, until: float) -> Optional[float]:
        """The median time between two responses, of those before `until`."""
        ts = [at for at in self.times if at < until]
        return statistics.median(b - a for a, b in zip(ts, ts[1:])) if len(ts) > 2 else None

    def run(self, stub, timeout: float) -> None:
        def on_delta(resp):
            if resp.decode_worker and not self.decode_worker:
                self.prefill_worker, self.decode_worker = resp.prefill_worker, resp.decode_worker
            if resp.token_ids:
                self.times.append(time.monotonic())
                self.counts.append(len(resp.token_ids))
        self.started = time.monotonic()
        try:
            self.result = stream_one(stub, request_proto({"prompt_token_ids": self.prompt}, self.params,
                                                         request_id=self.rid), on_delta=on_delta, timeout=timeout)
        except Exception as e:  # noqa: BLE001 (the caller reports every failed stream)
            self.error = e


def run_streams(stub, streams: list[Stream], timeout: float = 180.0, stagger: float = 0.0) -> None:
    """Run the streams concurrently, in list order `stagger` s apart, until all have ended."""
    threads = [threading.Thread(target=s.run, args=(stub, timeout), daemon=True) for s in streams]
    for t in threads:
        t.start()
        time.sleep(stagger)
    for t in threads:
        t.join(timeout + 30)


def logged_at(log_text: str, needle: str) -> Optional[float]:
    """time.time() of the first line of a `pdserve serve` log that holds `needle` (its lines start with the local
    time to the millisecond, '2026-12-05 00:52:45,530 ...'); None if no such line."""
    for line in log_text.splitlines():
        if needle in line:
            try:
                return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class DeathWatch:
    """Notes when each of `pids` stops running (polled every 5 ms on a thread): a fault's kill time, whether the
    process killed itself (worker/faults.py) or was killed from outside."""

    def __init__(self, pids: list[int], period: float = 0.005):
        self.died: dict[int, float] = {}
        self.died_wall: dict[int, float] = {}  # the same moments as time.time(), to set against a log's timestamps
        self._pids, self._period = list(pids), period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and len(self.died) < len(self._pids):
            for pid in self._pids:
                if pid not in self.died and not alive(pid):
                    self.died[pid], self.died_wall[pid] = time.monotonic(), time.time()
            time.sleep(self._period)

    def first(self) -> Optional[tuple[int, float]]:
        return min(self.died.items(), key=lambda kv: kv[1]) if self.died else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class PoolWatch:
    """Polls the cluster view every 0.1 s on a thread: when a worker not in `known` first shows up (a replacement,
    starting) and when it is ready, and when both pools are back to `size` ready workers without `gone`."""

    def __init__(self, stub, known: set[str], size: tuple[int, int]):
        self.stub, self.known, self.size = stub, set(known), size
        self.gone: set[str] = set()
        self.appeared: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.whole_at: Optional[float] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                info = cluster_info(self.stub)
            except Exception:  # noqa: BLE001 (the router is busy: look again)
                time.sleep(0.1)
                continue
            now = time.monotonic()
            names = {w.name for w in info.workers}
            for w in info.workers:
                if w.name not in self.known:
                    self.appeared.setdefault(w.name, now)
                    if w.state == "ready":
                        self.ready.setdefault(w.name, now)
            if (self.gone and not self.gone & names and self.whole_at is None
                    and (info.prefill_ready, info.decode_ready) == self.size):
                self.whole_at = now
            time.sleep(0.1)

    def wait_whole(self, timeout: float) -> float:
        return wait_for(lambda: self.whole_at, timeout, f"the pools back to {self.size[0]} + {self.size[1]} ready "
                                                        f"workers without {sorted(self.gone)}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
