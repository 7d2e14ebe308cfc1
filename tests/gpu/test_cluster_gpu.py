"""The whole cluster on one GPU: `pdserve serve` with a prefill and a decode actor sharing the GPU (fractional
Ray GPUs), Llama-3-8B shapes with random weights (`model.load_format: dummy`) and a real tokenizer, the router on
gRPC, KV through NIXL between the two actors' VRAM caches.

- bf16 prefill, raw wire: greedy outputs are token-identical to the in-process GPU engine running the same
  split (its prefill saves the KV through an in-process connector, the same engine loads it and decodes), since
  every kernel sees the same shapes in both.
- fp8 prefill, bf16 decode, fp8 wire: first tokens after teacher-forced prefixes (prompt + k tokens of the bf16
  baseline's greedy continuation) equal the in-process fp8 -> bf16 pipeline's, and their top-1 agreement with
  the baseline is reported.

Needs the model directory of benchmarks/dummy_model.py (PDSERVE_GPU_MODEL; the GPU bundle carries one to
.gpu/models/llama-3-8b), Ray and NIXL (the bundle); docs/gpu.md says how to run it.
"""
from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import grpc
import pytest
import torch

MODEL = os.environ.get("PDSERVE_GPU_MODEL")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not MODEL, reason="PDSERVE_GPU_MODEL (a dummy-format model directory) is not set"),
]
MAX_TOKENS = 32
POSITIONS = range(0, MAX_TOKENS, 4)  # teacher-forced prefixes: prompt + this many baseline tokens
ENGINE = {"kv_cache_memory_gb": 8, "max_num_batched_tokens": 2048, "max_num_seqs": 32}


def _cluster_config(prefill_precision: str, wire: str) -> dict:
    return {"model": {"path": MODEL, "load_format": "dummy", "dtype": "bfloat16"}, "engine": ENGINE,
            "prefill": {"replicas": 1, "precision": prefill_precision, "num_gpus": 0.4},
            "decode": {"replicas": 1, "precision": "bf16", "num_gpus": 0.4},
            "kv_transfer": {"dtype": wire, "lease_seconds": 30}, "ray": {"num_cpus": 8}}


@pytest.fixture(scope="module")
def refs():
    """What the cluster must reproduce, computed in process before any cluster starts: bf16 and fp8 engines on the
    same random weights, with connectors on one in-process wire. They are freed before the tests start their
    clusters, whose two workers (weights and KV pools each) must fit beside whatever this process still holds:
    with them alive, an 80 GB GPU runs out of memory while the decode worker loads."""
    from pdserve.config import EngineConfig, KVTransferConfig
    from pdserve.decode_worker.worker import sink_refresh_tokens
    from pdserve.engine.engine import LLMEngine
    from pdserve.kv_transfer.local import LocalConnector, LocalWire
    from pdserve.testing.exactness import PROMPTS

    config = EngineConfig(kv_cache_memory_gb=4, max_num_batched_tokens=2048, max_num_seqs=32, device="cuda")
    wire = LocalWire()
    engines = {}
    for precision in ("bf16", "fp8"):
        e = LLMEngine(MODEL, dtype="bfloat16", config=config, precision=precision, load_format="dummy",
                      progress=False)
        e.connector = LocalConnector(e.runner.kv_cache, wire, "bf16")
        engines[precision] = e
    bf16, fp8 = engines["bf16"], engines["fp8"]
    prompts = [bf16.tokenize(p, chat=c) for p, c in PROMPTS[:8]]
    # the bf16 split's greedy outputs: the identity test's reference and the fp8 test's teacher-forced baseline
    baseline = [_split_greedy(bf16, bf16, p, f"ref{i}", MAX_TOKENS, "bf16", 0) for i, p in enumerate(prompts)]
    refresh = sink_refresh_tokens(KVTransferConfig().refresh_sink_tokens, "fp8", "fp8", "bf16")
    cases = [(p + c[:k], c[k]) for p, c in zip(prompts, baseline) for k in POSITIONS]
    local = [_split_greedy(fp8, bf16, ids, f"f{i}", 1, "fp8", refresh)[0] for i, (ids, _) in enumerate(cases)]
    del bf16, fp8, e, wire
    engines.clear()
    gc.collect()
    torch.cuda.empty_cache()
    return {"prompts": prompts, "baseline": baseline, "cases": cases, "local": local, "refresh": refresh}


def _split_greedy(pre, dec, ids: list[int], tag: str, max_tokens: int, wire: str, refresh: int) -> list[int]:
    """What the cluster computes, in process: `pre` prefills all but the last token and saves the KV through its
    connector, `dec` loads it (through `wire`), recomputes the last token (and `refresh` sinks) and decodes."""
    from dataclasses import replace

    from pdserve.engine.sequence import SamplingParams

    pre.connector.wire_dtype = dec.connector.wire_dtype = wire
    kv = replace(pre.prefill(ids, f"p-{tag}"), refresh_tokens=refresh)
    dec.add_request(f"d-{tag}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True), remote_kv=kv)
    tokens = []
    while dec.has_unfinished() or dec.has_transfers():
        for o in dec.step():
            assert o.error is None, o.error
            tokens += o.new_token_ids
    return tokens


def _cluster_greedy(stub, ids: list[int], max_tokens: int) -> list[int]:
    from pdserve.client import request_proto, stream_one
    from pdserve.engine.sequence import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return stream_one(stub, request_proto({"prompt_token_ids": ids}, params), timeout=120)["token_ids"]


def _serve(config: dict, tmp: Path):
    from pdserve.proto import rpc
    from pdserve.testing.cluster import Server

    server = Server(config, tmp, timeout=600)
    channel = grpc.insecure_channel(server.address)
    return server, channel, rpc.PDServeStub(channel)


def _report(name: str, data: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=1))
    print(name, json.dumps(data))


def test_bf16_cluster_is_token_identical_to_the_in_process_engine(refs, tmp_path):
    prompts, ref = refs["prompts"], refs["baseline"]
    server, channel, stub = _serve(_cluster_config("bf16", "bf16"), tmp_path)
    try:
        got = [_cluster_greedy(stub, p, MAX_TOKENS) for p in prompts]  # one at a time: the same batch shapes
    finally:
        channel.close()
        server.stop()
    same = [r == g for r, g in zip(ref, got)]
    _report("cluster_bf16_identity", {"prompts": len(prompts), "identical": sum(same), "ref": ref, "got": got})
    assert all(same), [i for i, s in enumerate(same) if not s]


def test_fp8_prefill_bf16_decode_fp8_wire_matches_the_in_process_pipeline(refs, tmp_path):
    cases, local, refresh = refs["cases"], refs["local"], refs["refresh"]
    server, channel, stub = _serve(_cluster_config("fp8", "fp8"), tmp_path)
    try:
        got = [_cluster_greedy(stub, ids, 1)[0] for ids, _ in cases]
    finally:
        channel.close()
        server.stop()
    agree_cluster = sum(g == want for g, (_, want) in zip(got, cases)) / len(cases)
    agree_local = sum(t == want for t, (_, want) in zip(local, cases)) / len(cases)
    same = sum(g == t for g, t in zip(got, local))
    _report("cluster_fp8_agreement", {"cases": len(cases), "top1_vs_bf16_cluster": agree_cluster,
                                      "top1_vs_bf16_in_process": agree_local, "cluster_equals_in_process": same,
                                      "refresh_sink_tokens": refresh})
    assert same == len(cases)
