"""What the simulator models of how a served cluster runs its engines, on cases worked out by hand: overlap
scheduling (a step composed when the one before it starts), engines that share one GPU (time-sliced), the
router's prefill -> decode hop and the worker loop's wait per streamed sequence; and benchmarks/step_timeline.py,
which measures those on a real run, on a run small enough to add up by hand."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import SimRequest
from pdserve.testing.profiles import lines as prof

ROOT = Path(__file__).resolve().parents[2]

# prefill: 1 ms a token; decode: 10 ms a step at any batch
LINES = {"prefill": ((0, 0), (1000, 1000)), "decode": ((1, 10), (2, 10))}


def colocated(p, reqs, **kw):
    spec = ClusterSpec.from_profile(p, colocated=True, prefill=0, decode=1, **kw)
    return simulate(p, spec, reqs)


@pytest.mark.parametrize("overlap, b_ttft", [
    # B arrives at 50 ms, while A's prompt (100 ms) runs. Without overlap the next step (at 100 ms) takes B's prompt
    # with A's decode: 101 tokens, 101 ms, so B's first token is at 201 ms. With overlap that step was composed when
    # A's prompt started, before B came: it is A's decode alone (10 ms), and B's prompt goes into the one after,
    # 110 -> 211 ms
    (False, 0.201 - 0.050),
    (True, 0.211 - 0.050),
])
def test_overlap_scheduling_takes_an_arrival_a_step_later(overlap, b_ttft):
    p = prof(**LINES)
    outs, _ = colocated(p, [SimRequest(0.0, 100, 5), SimRequest(0.050, 100, 2)], overlap=overlap)
    assert outs[0].ttft == pytest.approx(0.100)  # an idle engine takes a prompt at once either way
    assert outs[1].ttft == pytest.approx(b_ttft)


def test_an_arrival_at_an_engine_that_launched_nothing_is_taken_at_once():
    # A is a 1-token request: its prompt step (100 ms) has no step after it. B, arriving during it, is scheduled
    # when it ends, as the engine's loop does with nothing in flight (no step was composed behind A's)
    p = prof(**LINES)
    outs, _ = colocated(p, [SimRequest(0.0, 100, 1), SimRequest(0.050, 100, 1)], overlap=True)
    assert outs[1].ttft == pytest.approx(0.200 - 0.050)


def test_engines_sharing_one_gpu_split_it():
    # 1P1D on one GPU (shared_devices=1). A: prefill of 100 tokens (the last one is the decode side's) alone, 0 ->
    # 100 ms; the decode worker's first step 10 ms (TTFT 110 ms), then two more. B arrives at 111 ms: its prefill
    # (100 ms of work) and A's decode steps share the GPU at half speed each. A's second step ran 110 -> 111 alone
    # (1 ms of work), its other 9 ms take 18 ms (-> 129); its third takes 20 ms (-> 149). B's prefill did 19 ms of
    # work by 149 ms and the last 81 alone (-> 230); its decode worker's first step then takes 10 ms: B's TTFT is
    # 240 - 111 ms
    p = prof(**LINES)
    spec = ClusterSpec.from_profile(p, prefill=1, decode=1, shared_devices=1, prefill_max_num_batched_tokens=10 ** 6)
    outs, _ = simulate(p, spec, [SimRequest(0.0, 101, 3), SimRequest(0.111, 101, 1)])
    assert outs[0].ttft == pytest.approx(0.110)
    assert outs[0].e2e == pytest.approx(0.149)
    assert outs[1].ttft == pytest.approx(0.240 - 0.111)
    # each on a GPU of its own, nothing slows: A ends at 130 ms, B's TTFT is its own 110 ms
    spec = ClusterSpec.from_profile(p, prefill=1, decode=1, prefill_max_num_batched_tokens=10 ** 6)
    outs, _ = simulate(p, spec, [SimRequest(0.0, 101, 3), SimRequest(0.111, 101, 1)])
    assert outs[0].e2e == pytest.approx(0.130)
    assert outs[1].ttft == pytest.approx(0.110)


def test_the_routers_hop_between_prefill_and_decode():
    # prefill 100 ms, then handoff_ms 20 before the decode worker has the request, then its first step 10 ms
    p = prof(**LINES, overheads={"handoff_ms": 20})
    spec = ClusterSpec.from_profile(p, prefill=1, decode=1, prefill_max_num_batched_tokens=10 ** 6)
    outs, _ = simulate(p, spec, [SimRequest(0.0, 101, 2)])
    assert outs[0].ttft == pytest.approx(0.130)
    assert outs[0].e2e == pytest.approx(0.140)


def test_a_worker_loop_waits_per_streamed_sequence():
    # per_stream_ms 5. A (prompt 100, 3 tokens) has the engine to itself: first token at 100 ms (nothing streams
    # yet), then 110. B comes at 102 ms while A streams: its request waits 5 ms in the worker's loop (-> 107), joins
    # the step at 110 (B's 100 prompt tokens + A's decode: 101 ms -> 211), which samples B's first token and A's
    # last. In that step's end B starts streaming before A ends: B's first token leaves behind one stream (A's),
    # +5 ms; A's last behind two (A's and B's), +10 ms
    p = prof(**LINES, overheads={"per_stream_ms": 5})
    outs, _ = colocated(p, [SimRequest(0.0, 100, 3), SimRequest(0.102, 100, 2)])
    assert outs[0].ttft == pytest.approx(0.100)
    assert outs[0].e2e == pytest.approx(0.211 + 0.010)
    assert outs[1].ttft == pytest.approx(0.211 + 0.005 - 0.102)


def test_closed_loop_client_waits_for_the_last_token_to_reach_it():
    # one client, per_stream_ms 5: its first request (prompt 100, 2 tokens) ends at 110 ms on the engine, and its
    # last token leaves behind its own stream (+5 ms), so the second request is sent at 115 ms
    p = prof(**LINES, overheads={"per_stream_ms": 5})
    spec = ClusterSpec.from_profile(p, colocated=True, prefill=0, decode=1)
    outs, _ = simulate(p, spec, [SimRequest(0.0, 100, 2), SimRequest(0.0, 100, 2)], clients=1)
    assert outs[0].e2e == pytest.approx(0.115)
    assert outs[1].arrival == pytest.approx(0.115)


def test_step_timeline_adds_up_a_requests_path(tmp_path):
    # one colocated request: sent at 10.000, at the engine at 10.004, its prompt step launched at 10.005 and done at
    # 10.045 (its first token), two decode steps, the client had the first token at 10.050
    (tmp_path / "requests").mkdir()
    (tmp_path / "steps" / "colocated").mkdir(parents=True)
    (tmp_path / "cluster_bench.json").write_text(json.dumps([{"deployment": "colocated", "concurrency": 1,
                                                              "input_len": 100, "overlap_schedule": True}]))
    (tmp_path / "requests" / "colocated-c1-100.jsonl").write_text(json.dumps(
        {"status": "OK", "request_id": "r1", "sent_clock": 10.0, "ttft": 0.050, "e2e": 0.070}) + "\n")
    steps = [{"ev": "add", "t": 10.004, "id": "r1", "prompt": 100},
             {"ev": "step", "t": 10.005, "done": 10.045, "host_ms": 2.0, "dev_ms": 39.0, "seqs": 1, "tokens": 100,
              "ctx": 0, "tok_ctx": 0, "chunks": [["r1", 100, 0]], "first": ["r1"]},
             {"ev": "step", "t": 10.046, "done": 10.056, "host_ms": 0.5, "dev_ms": 10.0, "seqs": 1, "tokens": 1,
              "ctx": 100, "tok_ctx": 0, "chunks": [], "first": []},
             {"ev": "step", "t": 10.056, "done": 10.066, "host_ms": 0.5, "dev_ms": 10.0, "seqs": 1, "tokens": 1,
              "ctx": 101, "tok_ctx": 0, "chunks": [], "first": []}]
    (tmp_path / "steps" / "colocated" / "colocated-1.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    out = tmp_path / "timeline.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "step_timeline.py"), str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(out.read_text())["rows"][0]
    path = {k: v["p50"] for k, v in row["path_ms"].items()}
    assert path == pytest.approx({"route": 4.0, "queue": 1.0, "prefill": 40.0, "deliver": 5.0, "ttft": 50.0,
                                  "admit_steps": 1}, abs=1e-6)
    steps = row["steps"]["colocated"]
    assert (steps["decode"]["n"], steps["mixed"]["n"]) == (2, 1)
    assert steps["device_busy"] == pytest.approx(59.0 / 61.0, abs=1e-3)


def test_serving_overheads_reproduce_the_h100_profiles_hand_derivation(tmp_path):
    # the sixth session derived the H100 profile's overheads by hand from this run's step logs (its `derivation`
    # key): request_ms 55.61 - 49.13 = 6.48, handoff 5.5 ms, delivery 3.9 / 6.0 / 12.9 / 16.7 ms at 1 / 8 / 16 / 32
    # streams (0.43 a stream)
    src = ROOT / "docs" / "bench" / "planner" / "h100-sources"
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "benchmarks" / "serving_overheads.py"),
                           str(src / "h100-llama3-8b.measured-run2.json"), str(src / "run2-2k.tgz"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    prof = json.loads(out.read_text())
    assert prof["overheads"]["request_ms"] == pytest.approx(6.48, abs=0.01)
    assert prof["overheads"]["handoff_ms"] == pytest.approx(5.5, abs=0.1)
    assert prof["overheads"]["per_stream_ms"] == pytest.approx(0.43, abs=0.01)
    assert prof["engine"]["max_num_seqs"] == 256 and prof["engine"]["kv_cache_tokens"] == 393216
    from pdserve.planner import profile as profile_mod
    assert profile_mod.load(out).overhead_ms("handoff_ms") == pytest.approx(5.46)
