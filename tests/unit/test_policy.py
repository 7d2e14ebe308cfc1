"""Routing policies on hand-made pools (no cluster needed)."""
from pdserve.router.policy import KVIndex
from pdserve.router.policy import CacheAware, LeastLoaded, LeastLoadedDecode, RoundRobin, make_policies
from pdserve.router.pool import Pool, Worker, WorkerState
import msgpack
import pytest


def _workers(*loads):
    return [Worker(f"w{i}", "prefill", None, state=WorkerState.READY, queued_tokens=q) for i, q in enumerate(loads)]


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


def test_decode_least_loaded_then_most_free_blocks():
    ws = [Worker(f"d{i}", "decode", None, state=WorkerState.READY, inflight=n,
                 stats={"num_waiting": q, "num_free_blocks": free}) for i, (n, q, free) in
          enumerate([(2, 0, 900), (1, 0, 100), (0, 1, 500), (3, 0, 9000)])]
    p = LeastLoadedDecode()
    assert p.pick(ws, 70, [1, 2, 3, 4], 16) is ws[2]  # held 1 (waiting counts), tied with d1: more free blocks
    ws[2].stats["num_free_blocks"] = 50
    assert p.pick(ws, 70, [1, 2, 3, 4], 16) is ws[1]
    assert p.pick([], 70, [], 16) is None


def test_policies_per_config_name():
    idx = KVIndex()
    assert [type(p) for p in make_policies("cache_aware", idx, 2.0)] == [CacheAware, LeastLoadedDecode]
    assert [type(p) for p in make_policies("least_loaded", idx, 2.0)] == [LeastLoaded, LeastLoadedDecode]
    prefill, decode = make_policies("round_robin", idx, 2.0)
    assert type(prefill) is RoundRobin and type(decode) is RoundRobin and prefill is not decode
    with pytest.raises(ValueError):
        make_policies("random", idx, 2.0)


def test_pool_membership_by_state():
    pool = Pool("decode")
    for name, state in (("a", WorkerState.STARTING), ("b", WorkerState.READY), ("c", WorkerState.DRAINING)):
        pool.workers[name] = Worker(name, "decode", None, state=state)
    assert [w.name for w in pool.ready()] == ["b"]
    assert [w.name for w in pool.active()] == ["a", "b"]
    assert WorkerState.DRAINING.value == "draining"
