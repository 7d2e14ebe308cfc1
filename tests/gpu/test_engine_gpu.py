"""The engine on CUDA (Triton kernels, CUDA-graph decode) against the engine's torch path on CPU.

The model is a small random-weight Llama written as an HF directory (config.json, safetensors, the
embedded model's tokenizer). The GPU machine cannot build the tokenizer (the GGUF is not there), so the
directory is made on a CPU box and carried over:

    python tests/gpu/test_engine_gpu.py .gpu_fixture          # on the CPU box (git-ignored folder)
    PDSERVE_GPU_FIXTURE=.gpu_fixture python -m pytest -m gpu tests/gpu/test_engine_gpu.py   # on the GPU

A slow CPU test runs the same engine wiring (Triton ops and attention, the graph runner's padded static
buffers, replayed eagerly) under TRITON_INTERPRET=1 against the torch path.

In float32 the two devices agree to rounding, and the weights make the logits peaked (std about 8), so
greedy tokens must be identical. The schedule has requests joining and leaving between steps (different
arrival steps and max_tokens), chunked prefills mixed with decodes, and decode batches of sizes that pad
to their graph bucket.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

FIXTURE = os.environ.get("PDSERVE_GPU_FIXTURE")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
       pytest.mark.skipif(not FIXTURE or not Path(FIXTURE, "config.json").exists(),
                          reason="PDSERVE_GPU_FIXTURE names no model directory (python tests/gpu/test_engine_gpu.py DIR)")]


def gpu(fn):
    for mark in GPU:
        fn = mark(fn)
    return fn

# (arrival step, prompt length, max_tokens): joins at steps 0-9, leaves after 1-25 tokens
SCHEDULE = [(0, 5, 12), (0, 17, 3), (0, 40, 20), (2, 3, 7), (3, 64, 15), (5, 33, 1), (8, 100, 10), (8, 9, 25),
            (9, 1, 6), (14, 70, 9)]


def build_fixture(path: str) -> None:
    """A 4-layer random Llama (hidden 256, head_dim 64, GQA 4/2, llama3 RoPE scaling) with the embedded
    model's tokenizer. Projections have unit-variance outputs and the LM head gives logits of std about 8,
    so top-2 gaps sit far above float32 rounding. The LM head is untied: a tied one at these scales
    mostly predicts the input token again, which would hide a broken attention."""
    import transformers

    from pdserve.engine.tokenizer import Tokenizer

    cfg = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "model.embed_tokens.weight":
                p.normal_(0, 0.5)
            elif name == "lm_head.weight":
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    Tokenizer(None).hf.save_pretrained(path)


def run_schedule(engine, seed: int = 0) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Greedy tokens of SCHEDULE's requests, and (sequences, new tokens) of every step."""
    from pdserve.engine.sequence import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, engine.arch.vocab_size, (n,), generator=gen).tolist() for _, n, _ in SCHEDULE]
    steps: list[tuple[int, int]] = []
    execute = engine.runner.execute

    def recording(batch, *args, **kwargs):
        steps.append((len(batch.seqs), batch.num_tokens))
        return execute(batch, *args, **kwargs)

    engine.runner.execute = recording
    tokens: dict[str, list[int]] = {}
    step = 0
    try:
        while step == 0 or engine.has_unfinished() or any(at >= step for at, _, _ in SCHEDULE):
            for i, (at, _, max_tokens) in enumerate(SCHEDULE):
                if at == step:
                    engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                    tokens[f"r{i}"] = []
            for out in engine.step():
                tokens[out.request_id].extend(out.new_token_ids)
            step += 1
    finally:
        engine.runner.execute = execute
    return [tokens[f"r{i}"] for i in range(len(SCHEDULE))], steps


def _engine(device: str, dtype: str = "float32", path: str | None = None):
    from pdserve.engine.engine import LLMEngine
    from pdserve.config import EngineConfig

    config = EngineConfig(block_size=16, num_blocks=256, max_num_batched_tokens=64, max_num_seqs=16, device=device)
    return LLMEngine(path or FIXTURE, dtype=dtype, config=config, progress=False)


@pytest.fixture(scope="module")
def cpu_tokens():
    tokens, _ = run_schedule(_engine("cpu"))
    return tokens


@gpu
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_cuda_engine_matches_cpu_engine(cpu_tokens, graphs, monkeypatch):
    monkeypatch.setenv("PDSERVE_CUDA_GRAPHS", graphs)
    engine = _engine("cuda")
    assert engine.runner.backend.name == "triton" and engine.runner.model.ops.name == "triton"
    tokens, steps = run_schedule(engine)
    assert [len(t) for t in tokens] == [m for _, _, m in SCHEDULE]
    assert any(n < t and n > 1 for n, t in steps), "no step mixed prefill chunks with decodes"
    decode_sizes = {n for n, t in steps if n == t}
    assert decode_sizes - {1, 2, 4, 8, 16}, "no decode batch needed padding to its bucket"
    if graphs == "1":
        captured = set(engine.runner.graphs.graphs)
        assert len(captured) >= 3, captured
    else:
        assert engine.runner.graphs is None
    mismatched = [i for i, (a, b) in enumerate(zip(tokens, cpu_tokens)) if a != b]
    assert not mismatched, {i: (tokens[i], cpu_tokens[i]) for i in mismatched}


@gpu
@pytest.mark.parametrize("graphs", ["1", "0"])
def test_overlap_schedule_gives_the_synchronous_tokens(graphs, monkeypatch):
    """Overlap scheduling (on by default on CUDA: the next step launched before the host reads the sampled
    tokens, its inputs filled on the device) against the synchronous engine: the same greedy tokens."""
    monkeypatch.setenv("PDSERVE_CUDA_GRAPHS", graphs)
    engine = _engine("cuda")
    assert engine.overlap_schedule
    from_device = []
    execute = engine.runner.execute

    def recording(batch, *args, **kwargs):
        from_device.append(len(batch.token_rows))
        return execute(batch, *args, **kwargs)

    engine.runner.execute = recording
    runs = {}
    for on in (False, True):
        engine.overlap_schedule = on
        from_device.clear()
        runs[on], _ = run_schedule(engine)
        assert engine.block_manager.check_no_leaks() is None and not engine.has_unfinished()
        assert any(from_device) == on, from_device
    assert [len(t) for t in runs[True]] == [m for _, _, m in SCHEDULE]
    mismatched = [i for i, (a, b) in enumerate(zip(runs[True], runs[False])) if a != b]
    assert not mismatched, {i: (runs[True][i], runs[False][i]) for i in mismatched}


@gpu
def test_graph_replay_equals_eager_step(monkeypatch):
    """Every decode step's logits from the graph replay equal the eager Triton forward of the same step,
    while the batch shrinks and grows across buckets (stale rows of the static buffers must not leak)."""
    monkeypatch.setenv("PDSERVE_CUDA_GRAPHS", "1")
    engine = _engine("cuda")
    runner, graphs = engine.runner, engine.runner.graphs
    execute = runner.execute
    diffs: list[tuple[int, float]] = []

    def eager_then_graph(batch, sample_rows, all_logits=False):
        if all_logits or not sample_rows or any(n != 1 for n in batch.num_new):
            return execute(batch, sample_rows, all_logits)
        runner.graphs = None
        try:
            eager = execute(batch, sample_rows)  # writes the step's KV; the replay rewrites the same slots
        finally:
            runner.graphs = graphs
        replayed = execute(batch, sample_rows)
        diffs.append((len(batch.seqs), (replayed - eager).abs().max().item()))
        return replayed

    runner.execute = eager_then_graph
    run_schedule(engine, seed=1)
    sizes = {n for n, _ in diffs}
    assert len(sizes) >= 4 and sizes - {1, 2, 4, 8, 16}, sizes
    assert max(d for _, d in diffs) < 1e-3, diffs



@gpu
def test_sink_refresh_on_cuda(monkeypatch):
    """The decode side's sink refresh (decode_worker/worker.py) on the Triton path with CUDA graphs on: the
    refresh step runs eagerly (its varlen batch is not a decode batch), slots 0..W-1 get this engine's
    own KV (float32: up to matmul-shape rounding), every other slot keeps what arrived through the fp8
    wire, and the next steps replay graphs again."""
    from dataclasses import replace

    from pdserve.engine.sequence import SamplingParams
    from pdserve.kv_transfer.local import LocalConnector, LocalWire, through_wire

    monkeypatch.setenv("PDSERVE_CUDA_GRAPHS", "1")
    eng, W = _engine("cuda"), 4
    ids = list(range(3, 40))
    n = len(ids) - 1
    conn = eng.connector = LocalConnector(eng.runner.kv_cache, LocalWire(), "fp8")  # a fresh engine of its own
    local = eng.prefill(ids)
    kv = conn.wire.get(local.handle)
    exact = kv.blocks.permute(0, 3, 1, 2, 4, 5).flatten(0, 1)[:n]  # [n, layers, 2, heads, dim]
    arrived = through_wire(kv, "fp8", eng.runner.kv_cache.dtype).permute(0, 3, 1, 2, 4, 5).flatten(0, 1)
    assert (arrived[:W] - exact[:W]).abs().max() > 1e-3  # the wire's error, for the refresh to undo

    replays = []
    graphs = eng.runner.graphs
    run = graphs.run
    graphs.run = lambda *a, **k: (replays.append(len(a[0])), run(*a, **k))[1]
    seq = eng.add_request("sinks", ids, SamplingParams(max_tokens=4, ignore_eos=True),
                          remote_kv=replace(local, refresh_tokens=W))
    eng.step()  # lands the KV through the fp8 wire, then the refresh step
    assert not replays, "the refresh step replayed a decode graph"
    bs = eng.config.block_size
    got = torch.stack([eng.runner.kv_cache[seq.block_table[t // bs], :, :, t % bs] for t in range(len(arrived))])
    assert (got[:W] - exact[:W]).abs().max() <= 1e-5 * exact[:W].abs().max()
    assert torch.equal(got[W:n], arrived[W:n])
    while eng.has_unfinished():
        eng.step()
    assert replays, "the decode steps after the refresh did not replay graphs"
    eng.block_manager.check_no_leaks()

@pytest.mark.slow
def test_interpreted_triton_wiring_matches_torch_path(tmp_path):
    build_fixture(str(tmp_path / "model"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--interpreted", str(tmp_path / "model")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["triton"] == result["torch"]
    assert set(result["decode_sizes"]) - {1, 2, 4, 8, 16} and len(result["buckets"]) >= 3, result


def _interpreted(path: str) -> dict:
    """The CPU engine twice: torch path, then Triton ops + Triton attention + the graph runner with its
    replay done eagerly over the same padded static buffers (no CUDA here)."""
    from pdserve.testing import kernel_cases

    from pdserve.engine.gpu_attention import TritonAttention
    from pdserve.engine.gpu_graphs import DecodeGraphs
    from pdserve.engine.gpu_ops import TritonOps

    kernel_cases.patch_interpreter_for_numpy2()

    class EagerReplay:
        def __init__(self, graphs, bucket):
            self.graphs, self.bucket = graphs, bucket

        def replay(self):
            self.graphs.logits[self.bucket] = self.graphs._forward(self.bucket)

    class EagerGraphs(DecodeGraphs):
        def _capture(self, bucket):
            self.graphs[bucket] = EagerReplay(self, bucket)

    reference, _ = run_schedule(_engine("cpu", path=path))
    engine = _engine("cpu", path=path)
    runner = engine.runner
    runner.model.ops = TritonOps(runner.model.inv_freq, engine.arch.max_position_embeddings)
    # the LM head stays a torch GEMM: an interpreted GEMV over a 49K vocabulary takes minutes
    runner.model.ops.linear = torch.nn.functional.linear
    runner.backend = TritonAttention()
    runner.graphs = EagerGraphs(runner.model, runner.kv_cache, runner.backend, runner.block_size, 2048, 16)
    tokens, steps = run_schedule(engine)
    return dict(torch=reference, triton=tokens, decode_sizes=sorted({n for n, t in steps if n == t}),
                buckets=sorted(runner.graphs.graphs))


if __name__ == "__main__":
    if sys.argv[1] == "--interpreted":
        print(json.dumps(_interpreted(sys.argv[2])))
    else:
        build_fixture(sys.argv[1])
        print(f"wrote {sys.argv[1]}")
