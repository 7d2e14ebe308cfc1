"""The planner's simulator on cases whose answers are worked out by hand: a single request's latencies, queueing
at one server (M/M/1 and M/D/1), a transfer-bound pool, a decode stalled by a colocated prompt, cores shared by
engines, the goodput search at a known capacity, the best P:D split of two known capacities; and the CLI."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pdserve.config import load_config
from pdserve.planner import plan, profile, stats, workload
from pdserve.tools.bench import percentile
from pdserve.planner.sim import ClusterSpec, simulate
from pdserve.planner.workload import SimRequest
from pdserve.router.autoscaler import follow_ratio
from pdserve.testing.profiles import lines

ROOT = Path(__file__).resolve().parents[2]


prof = lines  # a profile of straight lines (pdserve/testing/profiles.py)


def run(p, reqs, **kw):
    spec = ClusterSpec.from_profile(p, **{"prefill_max_num_batched_tokens": 10 ** 6, **kw})
    return simulate(p, spec, reqs)


def test_one_request_adds_up_its_stages():
    # request 50 ms + prefill of all prompt tokens but the last (99 ms) + transfer of their KV, 99 x 1000 B at
    # 1 ms/10 KB (9.9 ms) + the decode worker's first step, which recomputes the last token, at batch 1 (10 ms + 2 ms
    # overhead); then 9 more steps of 12 ms
    p = prof(transfer=((0, 0), (10_000, 1)), overheads={"request_ms": 50, "decode_step_ms": 2})
    outs, engines = run(p, [SimRequest(0.0, 100, 10)])
    o = outs[0]
    assert o.ttft == pytest.approx(0.050 + 0.099 + 0.0099 + 0.012)
    assert o.e2e - o.ttft == pytest.approx(9 * 0.012)
    assert stats.itl_gaps(outs, engines) == pytest.approx([0.012] * 9)


@pytest.mark.parametrize("lengths, expect_mean, expect_p90", [
    # M/M/1, service mean 0.1 s (exponential prompt lengths, 1 ms a token), arrivals 5/s: sojourn ~ Exp(mu - lambda)
    ({"dist": "exponential", "mean": 100}, 1 / (10 - 5), math.log(10) / (10 - 5)),
    # M/D/1: Pollaczek-Khinchine, W = 1/mu + rho / (2 mu (1 - rho)) = 0.1 + 0.05
    ({"dist": "fixed", "value": 100}, 0.15, None),
])
def test_queueing_at_one_server(lengths, expect_mean, expect_p90):
    wl = workload.parse({"arrival": {"process": "poisson"}, "input_len": lengths,
                         "output_len": {"dist": "fixed", "value": 1}})
    # one colocated engine, one prompt a step (FIFO, no batching), whose step samples the only output token:
    # TTFT is the server's sojourn time
    outs, _ = run(prof(decode=((1, 0), (2, 0))), wl.generate(5.0, 20000, seed=3), colocated=True, prefill=0,
                  decode=1, max_num_seqs=1)
    ttft = [o.ttft for o in outs]
    assert statistics.fmean(ttft) == pytest.approx(expect_mean, rel=0.06)
    if expect_p90:
        assert percentile(ttft, 90) == pytest.approx(expect_p90, rel=0.06)


def test_transfer_bound_pool_queues_at_the_decode_link():
    # 10 prompts of 1001 tokens at t=0 share the prefill engine's first step (a step starts once everything of its
    # instant has arrived; done at 10 ms); each KV (1000 tokens x 1000 B) takes 100 ms on the decode worker's link,
    # one after another; the first decode step costs 1 ms
    p = prof(prefill=((0, 10), (10 ** 6, 10)), decode=((1, 1), (2, 1)), transfer=((0, 0), (10 ** 6, 100)))
    reqs = [SimRequest(0.0, 1001, 1) for _ in range(10)]
    outs, _ = run(p, reqs)
    assert sorted(o.ttft for o in outs) == pytest.approx([0.010 + 0.100 * (i + 1) + 0.001 for i in range(10)])
    # two decode workers: two links, half the queue each
    outs, _ = run(p, reqs, decode=2)
    assert max(o.ttft for o in outs) == pytest.approx(0.010 + 0.500 + 0.001)
    # the fp8 wire halves the bytes (this profile's fp8 KV is half the raw), so each transfer is 50 ms
    outs, _ = run(p, reqs, wire="fp8", refresh_sink_tokens=0)
    assert max(o.ttft for o in outs) == pytest.approx(0.010 + 0.500 + 0.001)


def test_colocated_prompt_stalls_the_running_decode():
    # a sequence decodes at 10 ms a step; at t=0.05 a 1000-token prompt arrives at the same engine, whose step
    # budget takes it whole: that step costs prefill(1000 + 1 tokens) = 100.1 ms, the decode's longest gap
    p = prof(prefill=((0, 0), (2000, 200)))
    reqs = [SimRequest(0.0, 10, 40), SimRequest(0.05, 1000, 2)]
    outs, engines = run(p, reqs, colocated=True, decode=1, prefill=0)
    gaps = stats.itl_gaps(outs[:1], engines)
    assert max(gaps) == pytest.approx(0.1001)
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(0.010)
    # disaggregated, the same prompt's prefill runs elsewhere: the decode's gaps stay at one step
    outs, engines = run(p, reqs, decode=1, prefill=1)
    assert max(stats.itl_gaps(outs[:1], engines)) <= 0.020 + 1e-9  # its step grows to batch 2 (20 ms) at most


def test_engines_sharing_cores_split_them():
    # two prefill engines, each 99 ms of work at t=0: alone on a core each they finish at 0.099 s; on one shared
    # core they run at half speed and both finish at 0.198 s
    p = prof(decode=((1, 0), (2, 0)))
    reqs = [SimRequest(0.0, 100, 1, group=g, prefix_len=96) for g in (0, 1)]
    outs, _ = run(p, reqs, prefill=2, policy="round_robin")
    assert [o.ttft for o in outs] == pytest.approx([0.099, 0.099])
    outs, _ = run(p, reqs, prefill=2, policy="round_robin", host_cores=1)
    assert [o.ttft for o in outs] == pytest.approx([0.198, 0.198])
    # measured contention (contention.py): two engines stepping at once on a 2-core box each took 1.25x their
    # time alone, three 1.8x (processor sharing alone: 1.5x): on 2 cores both finish at 0.099 x 1.25; on one core
    # at 0.198 x 1.25 (the excess over a fair split carries over); three engines on 2 cores at 0.099 x 1.8
    p.raw["host"] = {"contention": {"cores": 2, "engines": [1, 2, 3], "slowdown": [1.0, 1.25, 1.8]}}
    outs, _ = run(p, reqs, prefill=2, policy="round_robin", host_cores=2)
    assert [o.ttft for o in outs] == pytest.approx([0.12375, 0.12375])
    outs, _ = run(p, reqs, prefill=2, policy="round_robin", host_cores=1)
    assert [o.ttft for o in outs] == pytest.approx([0.2475, 0.2475])
    reqs3 = [SimRequest(0.0, 100, 1, group=g, prefix_len=96) for g in (0, 1, 2)]
    outs, _ = run(p, reqs3, prefill=3, policy="round_robin", host_cores=2)
    assert [o.ttft for o in outs] == pytest.approx([0.1782] * 3)
    # a shared box: the profile was measured at 0.8 of a core, the engines now get 0.4: every step takes twice
    p.raw["host"] = {"cores": None, "cpu_share": 0.8}
    outs, _ = run(p, reqs, prefill=2, policy="round_robin", cpu_share=0.4)
    assert [o.ttft for o in outs] == pytest.approx([0.198, 0.198])


def test_prefix_cache_hits_skip_their_tokens():
    # 527 of the first prompt's tokens are prefilled (the last is the decode's); the second prompt with the same
    # 512-token prefix computes only 15 (then 10 ms of decode step each)
    p = prof()
    reqs = [SimRequest(0.0, 528, 1, group=0, prefix_len=512), SimRequest(1.0, 528, 1, group=0, prefix_len=512)]
    outs, _ = run(p, reqs)
    assert [o.cached_tokens for o in outs] == [0, 512]
    assert [o.ttft for o in outs] == pytest.approx([0.537, 0.025])


def test_goodput_search_finds_a_known_capacity():
    # nearly periodic arrivals (gamma, cv 0.01) into one 99 ms prefill server: nobody waits below 10.1 req/s and
    # the queue grows without bound above it, so the highest rate meeting TTFT <= 0.5 s for 90% is about 10.1/s
    wl = workload.parse({"arrival": {"process": "gamma", "cv": 0.01}, "input_len": {"dist": "fixed", "value": 100},
                         "output_len": {"dist": "fixed", "value": 1}})
    p = prof(decode=((1, 0), (2, 0)))
    spec = ClusterSpec.from_profile(p, prefill_max_num_seqs=1)
    rate, rep = plan.max_goodput(p, spec, wl, plan.SLO(0.5, 1.0), n=2000, seed=1, iters=8)
    assert 9.6 <= rate <= 10.25
    assert rep["attainment"] >= 0.9


def test_best_split_matches_the_capacities():
    # prefill 40 ms a prompt (25/s per engine), decode 10 ms per sequence in a step (100/s per engine): of 5 GPUs,
    # 4P1D balances at 100/s. One output token is sampled by the prompt's own step, so colocated engines pay only
    # the 40 ms (25/s each, 125/s for 5): with nothing to decode, disaggregation only adds a step
    p = prof(prefill=((0, 40), (10 ** 6, 40)), decode=((1, 10), (2, 20)))
    wl = workload.parse({"arrival": {"process": "gamma", "cv": 0.01}, "input_len": {"dist": "fixed", "value": 8},
                         "output_len": {"dist": "fixed", "value": 1}})
    base = ClusterSpec.from_profile(p, prefill_max_num_seqs=1, max_num_seqs=1)
    # a tight TTFT target (4 requests of queue beyond the 50 ms of work), so that a rate over capacity fails it
    res = plan.plan(p, wl, 5, plan.SLO(0.2, 1.0), n=1500, seed=2, base=base)
    assert (res["best"]["prefill"], res["best"]["decode"]) == (4, 1)
    assert 90 <= res["best"]["max_goodput"] <= 102
    by = {r["label"]: r["max_goodput"] for r in res["rows"]}
    assert 70 <= by["3P2D"] <= 76  # 3 x 25
    assert 115 <= by["colocated x5"] <= 128  # 1% over capacity queues less than the TTFT slack in 1500 requests
    assert plan.autoscaling_config(res["best"]) == {"prefill_per_decode": 4.0}


def test_workload_presets_and_errors():
    for name in workload.PRESETS:
        wl = workload.resolve(name)
        assert wl.source
        reqs = wl.generate(10.0, 3000, seed=0)
        mean_in = statistics.fmean(r.prompt_len for r in reqs)
        # clipping at min/max moves the mean a little from the spec's
        assert mean_in == pytest.approx(wl.input_len.mean + wl.share * wl.prefix_len, rel=0.15)
    rag = workload.resolve("rag").generate(10.0, 4000, seed=0)
    assert statistics.fmean(r.prompt_len for r in rag) == pytest.approx(7590, rel=0.1)  # the Mooncake trace's mean
    bursty = workload.parse({"arrival": {"process": "gamma", "cv": 4}, "input_len": {"dist": "fixed", "value": 1},
                             "output_len": {"dist": "fixed", "value": 1}}).generate(10.0, 20000, seed=0)
    gaps = [b.arrival - a.arrival for a, b in zip(bursty, bursty[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.1)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(4, rel=0.15)
    with pytest.raises(workload.WorkloadError, match="input_len.dist"):
        workload.parse({"input_len": {"dist": "zipf"}, "output_len": {"dist": "fixed", "value": 1}})
    with pytest.raises(workload.WorkloadError, match="median cannot exceed"):
        workload.parse_dist({"dist": "lognormal", "mean": 10, "median": 20}, "x")


def test_profile_errors_name_the_key(tmp_path):
    with pytest.raises(profile.ProfileError, match="schema"):
        profile.from_dict({"schema": "other"})
    bad = json.loads((profile.BUILTIN / "cpu-smollm2.json").read_text())
    bad["decode"]["bf16"]["batch"] = bad["decode"]["bf16"]["batch"][::-1]
    with pytest.raises(profile.ProfileError, match="decode.bf16: x values must increase"):
        profile.from_dict(bad)
    with pytest.raises(profile.ProfileError, match="cannot read profile"):
        profile.load(tmp_path / "missing.json")


@pytest.mark.parametrize("name", ["cpu-smollm2", "h200-llama3-8b", "h200-llama3-8b-derived", "h100-llama3-8b"])
def test_shipped_profiles_load_and_say_where_they_come_from(name):
    p = profile.resolve(name)
    assert name in profile.SHIPPED
    assert p.source.startswith("derived from BENCHMARKS.md" if name.endswith("-derived")
                               else "measured by pdserve profile")
    assert {"raw", "fp8"} <= set(p.transfer)
    assert p.decode_ms("bf16", 32, 32 * 1024) > p.decode_ms("bf16", 1, 1024)


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(profile.ProfileError, match="cpu-smollm2, h100-llama3-8b, h200-llama3-8b, h200-llama3-8b-derived"):
        profile.resolve("a100-llama3-8b")
    assert set(profile.SHIPPED) == {f.stem for f in profile.BUILTIN.glob("*.json")}


def test_measured_h200_profile_is_its_sources_numbers():
    p = profile.resolve("h200-llama3-8b")
    # engine curves as `pdserve profile` measured them (2026-12-05)
    assert p.prefill_ms("bf16", 2048) == pytest.approx(47.168)
    assert p.prefill_ms("fp8", 2048) == pytest.approx(31.6487)
    assert p.decode_ms("bf16", 64, 64 * 1030) == pytest.approx(6.7182)
    # the two-process pull (bench_kv_transfer_ipc.py, adjacent): 2048 tokens = 128 blocks of 16 x 67584 B on the
    # fp8 wire, 0.738 ms; 8192 raw tokens = 1 GiB, 0.757 ms
    assert p.transfer_ms("fp8", 128 * 16 * 67584) == pytest.approx(0.738)
    assert p.transfer_ms("raw", 2 ** 30) == pytest.approx(0.757)
    assert {c["placement"] for c in p.raw["transfer"].values()} == {"adjacent"}
    # overheads from the colocated c=1 row: 52.58 - 47.168 ms; 4.52 - 4.6185 ms floored at 0
    assert p.overhead_ms("request_ms") == pytest.approx(5.412)
    assert p.overhead_ms("decode_step_ms") == 0.0
    text = json.dumps(p.raw["derivation"])
    for source in ("2026-12-05", "bench_kv_transfer_ipc.py", "bench_cluster_gpu.py", "one process"):
        assert source in text


def test_measured_h200_profile_reproduces_its_colocated_single_stream():
    # one client, one colocated bf16 engine, 2048-token prompts, 64 output tokens (bench_cluster_gpu.py at c=1):
    # TTFT = request_ms + the 2048-token prefill step = 5.412 + 47.168 = 52.58 ms, the measured p50 the overheads
    # came from; each later token one decode step at batch 1, 4.6185 ms at context 1030 plus 2.3193e-5 ms per
    # context token beyond it (2049..2111 tokens: +0.0236..0.0251 ms)
    p = profile.resolve("h200-llama3-8b")
    spec = ClusterSpec.from_profile(p, prefill=0, decode=1, colocated=True, max_num_batched_tokens=4096)
    outs, engines = simulate(p, spec, [SimRequest(0.0, 2048, 64) for _ in range(3)], clients=1)
    assert [o.ttft for o in outs] == pytest.approx([0.05258] * 3)
    gaps = stats.itl_gaps(outs, engines)
    assert len(gaps) == 3 * 63
    slope = p.raw["decode"]["bf16"]["ms_per_context_token"]
    assert gaps[0] == pytest.approx((4.6185 + slope * (2049 - 1030)) / 1e3)
    assert gaps[62] == pytest.approx((4.6185 + slope * (2111 - 1030)) / 1e3)


def test_measured_h100_profile_is_its_sources_numbers():
    p = profile.resolve("h100-llama3-8b")
    src = json.loads((ROOT / "docs/bench/planner/h100-sources/h100-llama3-8b.measured-run2.json").read_text())
    # engine curves and transfer as `pdserve profile` measured them in the 2K bench's call, unchanged
    for key in ("decode", "transfer", "kv_bytes_per_token", "command", "device"):
        assert p.raw[key] == src[key]
    for prec in ("bf16", "fp8"):
        assert p.raw["prefill"][prec]["ms"] == src["prefill"][prec]["ms"]
        # but the context term: (first + second chunk - 2 x a fresh 2048-token prompt) / 2048^2 from the run's check
        c = src["prefill"][prec]["context_check"]
        term = (c["first_chunk_ms"] + c["second_chunk_ms"] - 2 * c["fresh_prompt_ms"]) / 2048 ** 2
        assert p.raw["prefill"][prec]["ms_per_token_context"] == pytest.approx(term, rel=1e-3)
    # overheads from that bench's step logs: the colocated one-stream TTFT p50 (55.61 ms) less the 2048-token prefill
    assert p.overhead_ms("request_ms") == pytest.approx(55.61 - 49.1256, abs=0.01)
    assert p.overhead_ms("handoff_ms") == 5.5
    # per stream: the colocated first-token delivery's growth from 16 to 48 streams over the token channel
    # (benchmarks/step_timeline.py's output for docs/bench/token-delivery/h100-channel.tgz)
    rows = json.loads((ROOT / "docs/bench/token-delivery/timeline.json").read_text())["rows"]
    deliver = {r["concurrency"]: r["path_ms"]["deliver"]["p50"] for r in rows if r["deployment"] == "colocated"}
    assert p.overhead_ms("per_stream_ms") == round((deliver[48] - deliver[16]) / 32, 2) == 0.14
    assert ClusterSpec.from_profile(p).overlap  # its engines overlap steps, as served on CUDA


def test_closed_loop_sends_the_next_request_when_one_finishes():
    # one colocated engine, 1 ms a prompt token, 10 ms a decode step of one sequence (20 of two); 50 ms a request
    # through the router. One client, 100-token prompts of one output token: each request is one 100 ms step, the
    # next is sent when it ends, so arrivals are 0, 0.15, 0.30 and every TTFT is 0.15 s
    p = prof(overheads={"request_ms": 50})
    reqs = [SimRequest(0.0, 100, 1) for _ in range(3)]
    outs, _ = run(p, reqs, colocated=True, prefill=0, decode=1, max_num_batched_tokens=10 ** 6)
    # open loop, all at t=0: all three reach the engine at 0.05 s and share one step (300 ms)
    assert [o.ttft for o in outs] == pytest.approx([0.35, 0.35, 0.35])
    assert [o.arrival for o in outs] == [0.0] * 3
    spec = ClusterSpec.from_profile(p, colocated=True, prefill=0, decode=1, max_num_batched_tokens=10 ** 6)
    outs, _ = simulate(p, spec, reqs, clients=1)
    assert [o.arrival for o in outs] == pytest.approx([0.0, 0.15, 0.30])
    assert [o.ttft for o in outs] == pytest.approx([0.15] * 3)
    assert [r.arrival for r in reqs] == [0.0] * 3  # the caller's list is not rewritten
    # two clients, no overhead, 3, 2, 3 and 3 output tokens. r0 and r1 are sent at 0 and share a step of both
    # prompts (200 ms: TTFT 0.200 each); a decode step of two (20 ms, 0.220) ends r1, so r2 is sent at 0.220 and
    # joins the next step, which the engine starts at that same instant: r0's decode + r2's prompt, 101 tokens
    # (0.321: r0 ends, r2's TTFT 0.101), so r3 is sent at 0.321; r2's decode + r3's prompt (0.422, r3's TTFT
    # 0.101), a decode of two (0.442, r2 done), r3 alone (10 ms, 0.452)
    p = prof()
    spec = ClusterSpec.from_profile(p, colocated=True, prefill=0, decode=1, max_num_batched_tokens=10 ** 6)
    outs, _ = simulate(p, spec, [SimRequest(0.0, 100, n) for n in (3, 2, 3, 3)], clients=2)
    assert [o.arrival for o in outs] == pytest.approx([0.0, 0.0, 0.220, 0.321])
    assert [o.ttft for o in outs] == pytest.approx([0.200, 0.200, 0.101, 0.101])
    assert [o.e2e for o in outs] == pytest.approx([0.321, 0.220, 0.222, 0.131])
    with pytest.raises(ValueError, match="clients"):
        simulate(p, spec, [SimRequest(0.0, 100, 3)], clients=0)


def test_autoscaler_follows_the_planned_ratio():
    cfg = load_config(None, {"autoscaling.enabled": True, "autoscaling.prefill_per_decode": 0.5,
                             "autoscaling.prefill.max_replicas": 3}).autoscaling
    assert [follow_ratio(cfg, d) for d in (1, 2, 3, 4, 8)] == [1, 1, 2, 2, 3]
    with pytest.raises(Exception, match="prefill_per_decode"):
        load_config(None, {"autoscaling.prefill_per_decode": 0})


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_plan_cli_writes_the_recommendation(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    r = _cli("plan", "--profile", "h200-llama3-8b-derived", "--workload", "chat", "--slo", "ttft=1,tpot=50ms",
             "--gpus", "4", "--num-requests", "300", "--prefill-precision", "fp8", "--wire", "fp8",
             "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "best split" in r.stdout and "colocated" in r.stdout
    res = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert len(res["rows"]) == 4 and res["profile_source"].startswith("derived")
    values = yaml.safe_load((tmp_path / "out" / "helm-values.yaml").read_text())
    schema = json.loads((ROOT / "helm" / "pdserve" / "values.schema.json").read_text())
    defaults = yaml.safe_load((ROOT / "helm" / "pdserve" / "values.yaml").read_text())
    jsonschema.validate(_merge(defaults, values), schema)  # `helm install -f helm-values.yaml`: the chart accepts it
    assert values["prefill"]["replicas"] + values["decode"]["replicas"] == 4
    if importlib_available("matplotlib"):
        assert (tmp_path / "out" / "plan.png").stat().st_size > 10_000


def _merge(base: dict, over: dict) -> dict:
    """Helm's merge of a -f values file over the chart's defaults."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("args, msg", [
    (["--slo", "ttft=1"], "needs both"),
    (["--slo", "ttft=1,tpot=0.05", "--gpus", "0"], "--gpus must be >= 1"),
    (["--slo", "ttft=1,tpot=0.05", "--gpus", "2", "--prefill", "1"], "give --gpus N"),
    (["--slo", "ttft=1,tpot=0.05", "--gpus", "2", "--prefill-precision", "nvfp4"], "no prefill curve"),
])
def test_plan_cli_bad_input_is_one_line(tmp_path, args, msg):
    r = _cli("plan", "--profile", "cpu-smollm2", "--workload", "chat", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_simulates_64_gpus_at_1000_requests_per_second_quickly():
    import time

    p = profile.resolve("h200-llama3-8b-derived")
    reqs = workload.resolve("chat").generate(1000.0, 30000, seed=0)
    spec = ClusterSpec.from_profile(p, prefill=16, decode=48, prefill_precision="fp8", wire="fp8")
    t = time.perf_counter()
    outs, engines = simulate(p, spec, reqs)
    rep = stats.report(outs, engines, 1.0, 0.05)
    took = time.perf_counter() - t
    assert rep["completed"] == 30000
    assert took < 60, f"{took:.1f} s"  # the bound (30 s of traffic; a minute of it takes about twice this)


@pytest.mark.parametrize("args, code, msg", [
    (["--contexts", "64"], 2, "--contexts takes two values"),
    (["--batches", "4,2"], 2, "--batches must be increasing"),
    (["--model", "/nonexistent/model"], 3, "/nonexistent/model"),
])
def test_profile_cli_bad_input_is_one_line(tmp_path, args, code, msg):
    r = _cli("profile", "--out", str(tmp_path / "p.json"), *args, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    last = r.stderr.strip().splitlines()[-1]  # progress lines may come first
    assert last.startswith("pdserve profile: error:") and msg in last and "Traceback" not in r.stderr


def test_cpu_share_trace_slows_the_steps_it_covers():
    # the engines got a full core (as the profile) until t=1 s, then half of one: a step that starts later takes
    # twice its profile time
    p = prof(decode=((1, 0), (2, 0)))
    reqs = [SimRequest(0.0, 100, 1), SimRequest(2.0, 100, 1)]
    outs, _ = run(p, reqs, cpu_share=[(0.0, 1.0), (1.0, 0.5)])
    assert [o.ttft for o in outs] == pytest.approx([0.099, 0.198])
    # a step across the change: 50 ms of its work at full speed, the other 49 at half (98 ms)
    outs, _ = run(p, [SimRequest(0.95, 100, 1)], cpu_share=[(0.0, 1.0), (1.0, 0.5)])
    assert outs[0].ttft == pytest.approx(0.050 + 0.098)


def test_cpu_share_is_read_from_the_kernel():
    import hashlib
    import os
    import time

    from pdserve.planner.hostload import CPUShare, box_busy_ns, process_cpu_ns

    share = CPUShare([os.getpid()], period=0.05).start()
    busy0, mine0 = box_busy_ns(), process_cpu_ns([os.getpid()])
    t = time.monotonic()
    while time.monotonic() - t < 0.3:  # keep this thread on a core
        hashlib.sha256(b"x" * 4096).digest()
    s = share.stop()
    busy, mine = box_busy_ns() - busy0, process_cpu_ns([os.getpid()]) - mine0
    if s is None:
        pytest.skip("no /proc schedstat here")
    assert 0 < s <= 1
    trace = share.trace(since=t)
    assert trace and all(0 < x <= 1 for _, x in trace)
    # this process's time on a core, and the box's busy time that includes it (clock ticks: 10 ms grains)
    assert 0.2e9 < mine < 0.8e9
    assert busy >= mine - 0.05e9


def test_a_short_prompt_is_not_queued_behind_a_long_ones_chunks():
    # one colocated engine, 100-token steps at 1 ms a token. L (1000 tokens) starts alone and takes all 100; S (10)
    # arrives during that step. Step 2: S finishes within the cap (100 // 4 = 25), so it goes first with the oldest
    # prompt's 25, then the 65 left go to L: S's first token comes with step 2 (0.2 s), and L loses only the 10
    # tokens S took. First come, first served, S would wait for all ten of L's steps (1.1 s).
    p = prof(decode=((1, 0), (2, 0)))
    outs, _ = run(p, [SimRequest(0.0, 1000, 1), SimRequest(0.05, 10, 1)], colocated=True, prefill=0, decode=1,
                  max_num_batched_tokens=100)
    assert outs[1].ttft == pytest.approx(0.2 - 0.05)
    assert outs[0].ttft == pytest.approx(1.0 + 0.01)  # the 10 tokens S took are one more step's worth
