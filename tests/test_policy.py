"""Routing policies on hand-made pools (no cluster needed)."""
from pdserve.router.kv_index import KVIndex
from pdserve.router.policy import CacheAware, LeastLoaded, RoundRobin
from pdserve.router.pool import Worker
import msgpack


def _workers(*loads):
    return [Worker(f"w{i}", "prefill", None, state="ready", queued_tokens=q) for i, q in enumerate(loads)]


def test_cache_aware_prefers_the_holder_unless_overloaded():
    idx = KVIndex()
    ws = _workers(0, 600)
    idx.expect("w1", [1, 2, 3, 4])
    p = CacheAware(idx, slack=2.0, headroom=1000)
    assert p.pick(ws, 70, [1, 2, 3, 4], 16) is ws[1]  # 64 of 70 tokens cached there; busier but fine
    assert p.pick(ws, 70, [9, 9, 9, 9], 16) is ws[0]  # a new prefix: least loaded
    ws[1].queued_tokens = 5000
    assert p.pick(ws, 70, [1, 2, 3, 4], 16) is ws[0]  # the guard: the holder is swamped
    assert p.pick(ws, 400, [1, 2], 16) is ws[0]  # 32 of 400 tokens is no real hit


def test_index_events_snapshots_and_forget():
    idx = KVIndex()
    idx.apply(msgpack.packb({"worker": "w0", "last_id": 2, "events": [[1, "stored", 5], [2, "stored", 6]]}))
    assert idx.overlap("w0", [5, 6, 7]) == 2 and idx.after("w0") == 2
    idx.apply(msgpack.packb({"worker": "w0", "last_id": 3, "events": [[3, "removed", 6]]}))
    assert idx.overlap("w0", [5, 6]) == 1
    idx.apply(msgpack.packb({"worker": "w0", "last_id": 9, "snapshot": [6]}))
    assert idx.overlap("w0", [5, 6]) == 0 and idx.overlap("w0", [6]) == 1
    idx.forget("w0")
    assert idx.after("w0") == -1


def test_round_robin_and_least_loaded():
    ws = _workers(10, 0, 5)
    rr = RoundRobin()
    assert [rr.pick(ws, 1, [], 16).name for _ in range(4)] == ["w0", "w1", "w2", "w0"]
    assert LeastLoaded().pick(ws, 1, [], 16) is ws[1]
