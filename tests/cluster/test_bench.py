"""`pdserve bench`: workloads, statistics and the oracle hit rate by hand, then one real run
against a real cluster (Ray + prefill and decode workers + gRPC router)."""
from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest

from pdserve.cli import build_parser
from pdserve.tools import bench
from pdserve.tools.bench import (BenchRequest, RequestResult, arrival_times, build_report, meets_slo, oracle_hit_rate,
                                 parse_range, percentile, random_workload, shared_prefix_workload)
from pdserve.errors import CLIError, EXIT_BAD_INPUT, EXIT_SERVER


def parse(argv: list[str]):
    return build_parser().parse_args(["bench", *argv])


# -- workloads ------------------------------------------------------------------------------------
def test_parse_range():
    assert parse_range("7", "x") == (7, 7)
    assert parse_range("3:9", "x") == (3, 9)
    for bad in ("0", "5:4", "a", "1:2:3", "-1:4"):
        with pytest.raises(ValueError):
            parse_range(bad, "x")


def test_random_workload_is_seeded_with_exact_lengths_in_range():
    a = random_workload(50, (5, 40), (2, 9), (100, 200), seed=3)
    assert a == random_workload(50, (5, 40), (2, 9), (100, 200), seed=3)
    assert a != random_workload(50, (5, 40), (2, 9), (100, 200), seed=4)
    lens = {len(q.prompt_token_ids) for q in a}
    assert min(lens) >= 5 and max(lens) <= 40 and len(lens) > 10
    assert all(2 <= q.max_tokens <= 9 and q.prompt is None for q in a)
    assert all(100 <= t < 200 for q in a for t in q.prompt_token_ids)
    fixed = random_workload(4, (17, 17), (3, 3), (100, 200), seed=0)
    assert [len(q.prompt_token_ids) for q in fixed] == [17] * 4 and [q.max_tokens for q in fixed] == [3] * 4


def test_random_text_workload_has_the_requested_number_of_words():
    a = random_workload(5, (12, 12), (4, 4), (100, 200), seed=1, text=True)
    assert all(q.prompt_token_ids is None and len(q.prompt.split()) == 12 for q in a)
    assert a == random_workload(5, (12, 12), (4, 4), (100, 200), seed=1, text=True)


def test_shared_prefix_workload_shares_exact_prefixes_across_users():
    n_pre, users, plen = 3, 4, 40
    reqs = shared_prefix_workload(n_pre, users, plen, (5, 9), (6, 6), (100, 30000), seed=7)
    assert reqs == shared_prefix_workload(n_pre, users, plen, (5, 9), (6, 6), (100, 30000), seed=7)
    assert len(reqs) == n_pre * users
    by_group: dict[int, list[BenchRequest]] = {}
    for q in reqs:
        by_group.setdefault(q.group, []).append(q)
        assert plen + 5 <= len(q.prompt_token_ids) <= plen + 9 and q.max_tokens == 6
    assert sorted(by_group) == [0, 1, 2] and all(len(v) == users for v in by_group.values())
    prefixes = {g: {q.prompt_token_ids[:plen] for q in v} for g, v in by_group.items()}
    assert all(len(p) == 1 for p in prefixes.values())  # identical within a system prompt
    assert len({next(iter(p)) for p in prefixes.values()}) == n_pre  # distinct across them
    suffixes = [q.prompt_token_ids[plen:] for q in reqs]
    assert len(set(suffixes)) == len(suffixes)  # every user's part is its own
    groups = [q.group for q in reqs]
    assert groups != sorted(groups) and groups != [i % n_pre for i in range(len(reqs))]  # shuffled
    more = shared_prefix_workload(n_pre, users, plen, (5, 9), (6, 6), (100, 30000), seed=7, n=30)
    assert len(more) == 30 and sorted({q.group for q in more}) == [0, 1, 2]


def test_arrival_times():
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    t = arrival_times(20000, 50.0, seed=1)
    assert t == arrival_times(20000, 50.0, seed=1) and t[0] == 0.0
    gaps = np.diff(t)
    assert (gaps > 0).all()
    assert abs(gaps.mean() - 1 / 50) < 0.02 / 50 * 3  # exponential gaps: mean 1/rate (3 sigma)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05  # ... and coefficient of variation 1


# -- statistics -----------------------------------------------------------------------------------
def test_percentile_by_hand_and_against_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([5.0], 99) == 5.0
    xs = [random.Random(0).random() for _ in range(101)]
    for q in (50, 90, 99):
        assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    with pytest.raises(ValueError):
        percentile([], 50)


def _ok(ttft, e2e, n_out, prompt=100, cached=0, itl=None, p="P0", d="D0"):
    return RequestResult(ok=True, ttft=ttft, e2e=e2e, completion_tokens=n_out, prompt_tokens=prompt,
                         cached_tokens=cached, itl=itl or [], finish_reason="length", prefill_worker=p,
                         decode_worker=d)


def test_tpot_and_goodput_by_hand():
    a = _ok(0.5, 1.5, 11)        # TPOT 0.1
    b = _ok(2.0, 2.9, 10)        # TTFT too slow, TPOT 0.1
    c = _ok(0.2, 2.2, 5)         # TPOT 0.5: too slow
    d = _ok(0.3, 0.3, 1)         # one token: no TPOT, meets any TPOT target
    e = RequestResult(ok=False, status="UNAVAILABLE", error="the decode pool has no ready worker")
    assert a.tpot == pytest.approx(0.1) and c.tpot == pytest.approx(0.5) and d.tpot is None and e.tpot is None
    assert [meets_slo(r, 1.0, 0.2) for r in (a, b, c, d, e)] == [True, False, False, True, False]
    assert [meets_slo(r, None, 0.2) for r in (a, b, c, d, e)] == [True, True, False, True, False]
    assert [meets_slo(r, 1.0, None) for r in (a, b, c, d, e)] == [True, False, True, True, False]
    rep = build_report([a, b, c, d, e], duration=4.0, goodput_ttft=1.0, goodput_tpot=0.2)
    assert rep["goodput"]["requests"] == 2
    assert rep["goodput"]["request_throughput"] == pytest.approx(0.5)
    assert rep["goodput"]["fraction"] == pytest.approx(2 / 5)
    assert build_report([a], 1.0)["goodput"] is None


def test_report_by_hand():
    rs = [_ok(0.1, 1.1, 11, prompt=100, cached=0, itl=[0.1] * 10, p="P0", d="D1"),
          _ok(0.3, 1.3, 6, prompt=200, cached=160, itl=[0.2] * 5, p="P1", d="D1"),
          _ok(0.2, 0.4, 3, prompt=60, cached=48, itl=[0.05, 0.15], p="P0", d="D0"),
          RequestResult(ok=False, status="RESOURCE_EXHAUSTED", error="full"),
          RequestResult(ok=False, status="RESOURCE_EXHAUSTED", error="full"),
          RequestResult(ok=False, status="INCOMPLETE", error="no finish")]
    rep = build_report(rs, duration=2.0, oracle=0.9)
    assert (rep["num_requests"], rep["completed"], rep["failed"]) == (6, 3, 3)
    assert rep["failures"] == {"RESOURCE_EXHAUSTED": 2, "INCOMPLETE": 1}
    assert rep["request_throughput"] == pytest.approx(1.5)
    assert rep["total_input_tokens"] == 360 and rep["input_token_throughput"] == pytest.approx(180)
    assert rep["total_output_tokens"] == 20 and rep["output_token_throughput"] == pytest.approx(10)
    assert rep["prefix_hit_rate"] == pytest.approx(208 / 360) and rep["oracle_hit_rate"] == 0.9
    assert rep["hit_rate_vs_oracle"] == pytest.approx(208 / 360 / 0.9)
    assert rep["ttft_s"]["mean"] == pytest.approx(0.2) and rep["ttft_s"]["p50"] == pytest.approx(0.2)
    assert rep["tpot_s"]["mean"] == pytest.approx((0.1 + 0.2 + 0.1) / 3)
    assert rep["itl_s"]["n"] == 17 and rep["itl_s"]["max"] == pytest.approx(0.2)
    assert rep["e2e_s"]["p90"] == pytest.approx(1.26)
    assert rep["per_worker"] == {"prefill": {"P0": 2, "P1": 1}, "decode": {"D0": 1, "D1": 2}}
    rep.update(client={"loop_lag_s": None, "cpu_frac": 0.01},
               config={"server": "h:1", "workload": "random", "request_rate": math.inf, "concurrency": 4})
    text = bench.format_report(rep)
    assert "RESOURCE_EXHAUSTED x2" in text and "57.8%  (oracle 90.0%, 64% of it)" in text
    assert json.loads(json.dumps(bench.jsonable(rep), allow_nan=False))["config"]["request_rate"] == "inf"


def test_oracle_hit_rate_by_hand():
    bs = 4
    a = tuple(range(1, 11))                    # 10 tokens, blocks [1-4][5-8] + 2: nothing seen yet
    b = tuple(range(1, 9)) + (20, 21, 22)      # both of a's blocks: 8 hit
    c = tuple(range(1, 9))                     # 8 tokens = 2 full blocks, but the last token is computed: 4 hit
    d = (1, 2, 3, 4, 9, 9, 9, 9, 9)            # first block only: 4 hit
    e = (0, 0, 0, 0, 5, 6, 7, 8, 1)            # a's second block after another first block: chained, 0 hit
    f = (9, 9, 9)                              # no full block: 0
    g = (0, 0, 0, 0, 5, 6, 7, 8, 2)            # e's two blocks: 8
    prompts = [a, b, c, d, e, f, g]
    total = sum(map(len, prompts))
    assert total == 10 + 11 + 8 + 9 + 9 + 3 + 9
    assert oracle_hit_rate(prompts, bs) == pytest.approx((0 + 8 + 4 + 4 + 0 + 0 + 8) / total)
    assert oracle_hit_rate([a, a], bs) == pytest.approx(8 / 20)
    assert oracle_hit_rate([c, c], bs) == pytest.approx(4 / 16)
    assert oracle_hit_rate([], bs) == 0.0


def test_oracle_of_the_shared_prefix_workload():
    # 2 prompts of 64 (4 blocks of 16) x 3 users: all but the first request of each prompt hit 64
    reqs = shared_prefix_workload(2, 3, 64, (10, 10), (1, 1), (100, 30000), seed=0)
    assert oracle_hit_rate([q.prompt_token_ids for q in reqs], 16) == pytest.approx(4 * 64 / (6 * 74))


# -- the command ----------------------------------------------------------------------------------
def test_bad_arguments_and_unreachable_server():
    from pdserve.testing.cluster import free_port

    for argv in (["--num-requests", "0"], ["--request-rate", "0"], ["--concurrency", "0"],
                 ["--goodput-ttft", "-1"], ["--warmup", "-2"]):
        with pytest.raises(CLIError) as e:
            bench.cmd_bench(parse(argv))
        assert e.value.code == EXIT_BAD_INPUT, argv
    with pytest.raises(CLIError) as e:
        bench.cmd_bench(parse(["--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "1"]))
    assert e.value.code == EXIT_SERVER and "cannot reach" in str(e.value)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pdserve.testing.cluster import Server

    s = Server({"model": {"dtype": "float32"}, "engine": {"kv_cache_memory_gb": 0.2},
                "prefill": {"replicas": 1, "num_cpus": 0.5}, "decode": {"replicas": 1, "num_cpus": 0.5}},
               tmp_path_factory.mktemp("bench"))
    yield s
    s.stop()


def _strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_bench_against_a_real_cluster(server, capsys, tmp_path):
    """Sequential shared-prefix requests on a fresh cluster: the measured hit rate must equal the
    oracle's (every earlier prefix is still cached), and every count must add up."""
    argv = ["--server", server.address, "--workload", "shared-prefix", "--num-prefixes", "2",
            "--users-per-prefix", "4", "--prefix-len", "48", "--suffix-len", "5:12", "--max-tokens", "4",
            "--concurrency", "1", "--warmup", "2", "--goodput-ttft", "60", "--goodput-tpot", "60", "--json",
            "--seed", "5", "--save-outputs", str(tmp_path / "out.jsonl"), "--cluster-poll", "0.2"]
    assert bench.cmd_bench(parse(argv)) == 0
    out = capsys.readouterr()
    rep = _strict_json(out.out)
    reqs = shared_prefix_workload(2, 4, 48, (5, 12), (4, 4), tuple(rep["config"]["vocab_range"]), seed=5)
    assert (rep["num_requests"], rep["completed"], rep["failed"], rep["failures"]) == (8, 8, 0, {})
    assert rep["total_input_tokens"] == sum(len(q.prompt_token_ids) for q in reqs)
    assert rep["total_output_tokens"] == 8 * 4 and rep["finish_reasons"] == {"length": 8}
    assert rep["model"]["block_size"] == 16 and rep["model"]["vocab_size"] == 49152
    assert rep["oracle_hit_rate"] == pytest.approx(6 * 48 / rep["total_input_tokens"])
    assert rep["prefix_hit_rate"] == pytest.approx(rep["oracle_hit_rate"])
    assert rep["hit_rate_vs_oracle"] == pytest.approx(1)
    assert rep["cached_tokens"] == 6 * 48
    for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        s = rep[key]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"] < 120, (key, s)
    assert rep["ttft_s"]["n"] == 8 and rep["itl_s"]["n"] == 8 * 3
    assert rep["ttft_s"]["max"] < rep["e2e_s"]["max"]
    assert rep["duration_s"] >= rep["e2e_s"]["mean"] * 8 * 0.99  # one at a time
    assert rep["request_throughput"] == pytest.approx(8 / rep["duration_s"])
    assert rep["goodput"]["requests"] == 8
    # the saved timeline: one at a time, each sent after the one before ended, its gaps the ITL's
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == list(range(8)) and lines[0]["sent"] == 0
    for a, b in zip(lines, lines[1:]):
        assert b["sent"] >= a["sent"] + a["e2e"] - 1e-3
    assert all(len(x["itl"]) == 3 and x["ttft"] + sum(x["itl"]) <= x["e2e"] + 1e-3 for x in lines)
    [p], [d] = rep["per_worker"]["prefill"].items(), rep["per_worker"]["decode"].items()
    assert p[1] == d[1] == 8 and p[0].startswith("prefill") and d[0].startswith("decode")
    assert rep["cluster"]["after"]["prefill_replicas"] == rep["cluster"]["after"]["decode_replicas"] == 1
    assert rep["client"]["loop_lag_s"]["n"] > 0 and 0 <= rep["client"]["cpu_frac"] < 1
    assert rep["config"]["request_rate"] == "inf" and rep["config"]["concurrency"] == 1
    assert rep["config"]["num_requests"] == 8
    timeline = rep["cluster"]["timeline"]
    assert timeline and timeline[0]["t"] < 1
    assert (timeline[0]["prefill_replicas"], timeline[0]["decode_replicas"]) == (1, 1)
    assert sorted(timeline[0]["workers"].values()) == ["ready", "ready"]
    saved = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [o["index"] for o in saved] == list(range(8)) and [o["group"] for o in saved] == [q.group for q in reqs]
    assert all(len(o["token_ids"]) == 4 and o["status"] == "OK" for o in saved)
    assert sum(o["cached_tokens"] for o in saved) == rep["cached_tokens"]


def test_outputs_compared_with_a_saved_run(server, capsys, tmp_path):
    """Two greedy runs of one seed, one request at a time, produce the same tokens (the second
    from cached prefixes); a reference with other tokens is reported, not hidden."""
    saved = tmp_path / "ref.jsonl"
    argv = ["--server", server.address, "--num-requests", "4", "--input-len", "20:40", "--max-tokens", "5",
            "--concurrency", "1", "--seed", "11", "--json", "--no-progress"]
    assert bench.cmd_bench(parse(argv + ["--save-outputs", str(saved)])) == 0
    assert _strict_json(capsys.readouterr().out)["outputs_vs_reference"] is None
    assert bench.cmd_bench(parse(argv + ["--compare-outputs", str(saved)])) == 0
    rep = _strict_json(capsys.readouterr().out)
    assert rep["outputs_vs_reference"]["compared"] == 4 and rep["outputs_vs_reference"]["mismatched"] == 0
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    lines[2]["token_ids"][0] += 1
    saved.write_text("".join(json.dumps(o) + "\n" for o in lines))
    assert bench.cmd_bench(parse(argv[:-2] + ["--compare-outputs", str(saved), "--no-progress"])) == 0
    assert re.search(r"outputs equal to the reference +3 of 4; differ: \[2\]", capsys.readouterr().out)
    with pytest.raises(CLIError):
        bench.cmd_bench(parse(argv + ["--num-requests", "3", "--compare-outputs", str(saved)]))


def test_bench_over_http_counts_the_same(server, capsys):
    """The same workload through the router's OpenAI-compatible HTTP door (streamed /v1/completions)."""
    argv = ["--http", server.http_url + "/v1", "--workload", "shared-prefix", "--num-prefixes", "2",
            "--users-per-prefix", "3", "--prefix-len", "48", "--suffix-len", "5:12", "--max-tokens", "4",
            "--concurrency", "1", "--json", "--seed", "11", "--no-progress"]
    assert bench.cmd_bench(parse(argv)) == 0
    rep = _strict_json(capsys.readouterr().out)
    reqs = shared_prefix_workload(2, 3, 48, (5, 12), (4, 4), tuple(rep["config"]["vocab_range"]), seed=11)
    assert (rep["num_requests"], rep["completed"], rep["failed"], rep["failures"]) == (6, 6, 0, {})
    assert rep["total_input_tokens"] == sum(len(q.prompt_token_ids) for q in reqs)
    assert rep["total_output_tokens"] == 6 * 4 and rep["finish_reasons"] == {"length": 6}
    assert rep["cached_tokens"] == 4 * 48 and rep["prefix_hit_rate"] == pytest.approx(rep["oracle_hit_rate"])
    assert rep["ttft_s"]["n"] == 6 and rep["itl_s"]["n"] == 6 * 3
    assert rep["model"]["vocab_size"] == 49152 and rep["cluster"]["after"] is None
    assert "successful requests" in bench.format_report(rep)
    with pytest.raises(CLIError):
        bench._check_args(parse(["--http", "127.0.0.1:8000"]))


def test_human_table_against_a_real_cluster(server, capsys):
    argv = ["--server", server.address, "--num-requests", "4", "--input-len", "8:24", "--max-tokens", "3",
            "--prompt-format", "text", "--request-rate", "20", "--no-progress"]
    assert bench.cmd_bench(parse(argv)) == 0
    text = capsys.readouterr().out
    assert "successful requests                          4" in text
    assert "total output tokens                         12" in text
    assert "prefix hit rate" in text and "oracle" not in text  # text prompts: no exact token ids


# -- the client's own timing error ------------------------------------------------------------------
class _ClockServer:
    """A gRPC server with known timing (first token after `ttft` s, then one every `itl` s) that
    logs, per request, the perf_counter at which it handed each message to gRPC. perf_counter is
    CLOCK_MONOTONIC, one clock for every process on the machine, so the bench's arrival stamps
    minus these are the client's (and the transport's) whole timing error."""

    def __init__(self, port: int, log_path: str, ttft: float, itl: float):
        self.port, self.log_path, self.ttft, self.itl = port, log_path, ttft, itl

    def __call__(self):
        import asyncio

        asyncio.run(self._serve())

    async def _serve(self):
        import asyncio
        import time

        import grpc

        from pdserve.proto import pb, rpc

        outer = self

        class Clock(rpc.PDServeServicer):
            async def Generate(self, request, context):
                ids = list(request.prompt_token_ids.ids)
                n = request.sampling.max_tokens
                await asyncio.sleep(outer.ttft)
                sends = []
                for i in range(n):
                    if i:
                        await asyncio.sleep(outer.itl)
                    resp = pb.GenerateResponse(token_ids=[i + 1])
                    if i == 0:
                        resp.prefill_worker, resp.decode_worker = "P", "D"
                    if i == n - 1:
                        resp.finish_reason = "length"
                        resp.usage.CopyFrom(pb.Usage(prompt_tokens=len(ids), completion_tokens=n))
                    sends.append(time.perf_counter())
                    yield resp
                with open(outer.log_path, "a") as f:
                    f.write(json.dumps({"key": ids[:6], "sends": sends}) + "\n")

        server = grpc.aio.server()
        rpc.add_PDServeServicer_to_server(Clock(), server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        await server.wait_for_termination()


@pytest.mark.slow
@pytest.mark.parametrize("streams", [64, 256])
def test_client_timing_error_under_many_streams(streams, tmp_path):
    """With `streams` concurrent streams, the bench stamps each delta within a few ms of the moment
    the server sent it (median), so client overhead does not distort TTFT/ITL. Prints the numbers."""
    import asyncio
    import multiprocessing
    import time

    from pdserve.testing.cluster import free_port

    port, log = free_port(), tmp_path / "sends.jsonl"
    proc = multiprocessing.get_context("spawn").Process(target=_ClockServer(port, str(log), 0.3, 0.05), daemon=True)
    proc.start()
    try:
        time.sleep(3)
        reqs = random_workload(streams, (16, 16), (16, 16), (100, 30000), seed=streams)
        res, dur, client = asyncio.run(bench.run_load(f"127.0.0.1:{port}", reqs, [0.0] * streams, None,
                                                      progress=False))
    finally:
        proc.terminate()
        proc.join()
    sends = {tuple(j["key"]): j["sends"] for j in map(json.loads, log.read_text().splitlines())}
    assert all(r.ok for r in res) and len(sends) == streams
    sent_by = [sends[tuple(q.prompt_token_ids[:6])] for q in reqs]
    first = [r.sent + r.ttft - s[0] for s, r in zip(sent_by, res)]
    last = [r.sent + r.e2e - s[-1] for s, r in zip(sent_by, res)]
    itl_err = [m - (b - a) for s, r in zip(sent_by, res) for m, a, b in zip(r.itl, s, s[1:])]

    def ms(xs):
        return " ".join(f"{k} {percentile(xs, q) * 1e3:.2f}" for k, q in (("p50", 50), ("p90", 90), ("p99", 99)))
    print(f"\n{streams} streams, {dur:.2f} s: first-token stamp delay ms {ms(first)}; last {ms(last)}; "
          f"ITL error ms {ms(itl_err)}; loop lag p99 {client['loop_lag_s']['p99'] * 1e3:.2f} ms; "
          f"client cpu {client['cpu_frac']:.0%} of a core")
    assert min(first) > 0 and percentile(first, 50) < 0.010


def test_failed_requests_are_counted_not_raised(server):
    """Requests the router refuses (a token id outside the vocabulary) fail alone, with their status
    code; the others in the same run complete."""
    import asyncio

    good = random_workload(3, (8, 8), (2, 2), (100, 30000), seed=1)
    bad = BenchRequest((5, 6, 49152 + 7), None, 2)
    res, _, _ = asyncio.run(bench.run_load(server.address, [good[0], bad, good[1], bad, good[2]], [0.0] * 5, None,
                                           progress=False))
    rep = build_report(res, 1.0)
    assert (rep["completed"], rep["failed"], rep["failures"]) == (3, 2, {"INVALID_ARGUMENT": 2})
    [err] = rep["errors"]  # the same message twice is listed once
    assert err.startswith("INVALID_ARGUMENT: ") and len(err) > len("INVALID_ARGUMENT: ")
    assert [r.ok for r in res] == [True, False, True, False, True] and all(len(r.token_ids) == 2 for r in res if r.ok)
