"""The fp8 pool's prefill attention (kernels/attention_fp8.py) against its torch reference
(kernels.reference.prefill_attention_fp8), and the reference against exact attention.

Cases reuse test_attention_kernels.paged_batch: ragged prompts on and off block boundaries, chunks behind
cached prefixes, scattered blocks, padded block tables that would fault if read, GQA 1/4/8. They run:
- on CPU under TRITON_INTERPRET=1 (one subprocess), in float32, with the pointer loads (the interpreter
  checks TMA offsets strictly, and the GPU runs both): the kernel's P8 equals the reference's, so the
  only differences are summation orders;
- on a CUDA GPU (gpu-marked), in bf16 at relative error <= 1e-2 and in float32 at <= 1e-3, both variants.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pdserve.testing import kernel_cases
from pdserve.testing.kernel_cases import attention_shapes, paged_batch, poison_allocator
from pdserve.testing.kernel_cases import rel_err_or_inf as rel_err

INTERPRETED_TOL = 1e-5
GPU_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-3}


def context_starts(seq_lens: list[int], device) -> tuple[torch.Tensor, int]:
    from pdserve.engine.attention import context_offsets

    starts, total = context_offsets(seq_lens)
    return torch.tensor(starts, dtype=torch.int32, device=device), total


def case_prefill(group, lens, config=None):
    """lens(block_size, scale_up) -> (seq_lens, q_lens)."""
    def run(device, dtype, gen):
        from pdserve.kernels import attention_fp8, reference

        shape, scale_up = attention_shapes(device)
        seq_lens, q_lens = lens(shape["block_size"], scale_up)
        args, _ = paged_batch(gen, seq_lens, q_lens, group=group, dtype=dtype, device=device, **shape)
        starts, total = context_starts(seq_lens, device)
        poison_allocator(args["q"].numel() * args["q"].element_size(), device)
        out = attention_fp8.prefill_attention_fp8(**args, context_start_loc=starts, total_context=total,
                                                  config=config)
        ref = reference.prefill_attention_fp8(*(args[k] for k in ("q", "kv_layer", "query_start_loc", "seq_lens",
                                                                  "block_tables", "scale")))
        return rel_err(out, ref)
    return run


def _mixed(bs, up):  # fresh prompts, chunks behind cached prefixes (on and off block boundaries), one token
    return [3 * bs + 5, 4 * bs, 2 * bs + 7 + 40 * up, 6 * bs, 17], [3 * bs + 5, 2 * bs, 9 + 40 * up, 1, 17]


def _long(bs, up):
    return [300 * up + 11], [300 * up + 11]


CASES = {}
for _g in (1, 4, 8):
    CASES[f"mixed_g{_g}"] = case_prefill(_g, _mixed)
    CASES[f"mixed_g{_g}_pointers"] = case_prefill(_g, _mixed, dict(TMA=False))  # GPU only: the interpreter
CASES["long_prompt_g4"] = case_prefill(4, _long)                                # always runs the pointers
INTERPRETED_CASES = sorted(n for n in CASES if not n.endswith("_pointers"))


def run_cases(device: str, dtype: torch.dtype, names, seed: int) -> dict:
    return kernel_cases.run_cases(CASES, device, dtype, names, seed)


def quantized_context_matches(seed: int) -> str:
    """quantize_context's codes and scales equal the reference quantizers' bytes."""
    from pdserve.kernels import attention_fp8, reference
    from pdserve.kernels.fp8 import positive_zero

    gen = torch.Generator().manual_seed(seed)
    seq_lens, q_lens = _mixed(8, 1)
    args, _ = paged_batch(gen, seq_lens, q_lens, num_kv_heads=2, group=2, head_dim=32, block_size=8,
                          dtype=torch.float32, device="cpu")
    starts, total = context_starts(seq_lens, "cpu")
    k8, vt, scales = attention_fp8.quantize_context(args["kv_layer"], args["seq_lens"], args["block_tables"],
                                                        starts, total, max(seq_lens))
    for i, n in enumerate(seq_lens):
        blocks = args["block_tables"][i, : -(-n // 8)].long()
        k = args["kv_layer"][blocks, 0].reshape(-1, 2, 32)[:n]
        v = args["kv_layer"][blocks, 1].reshape(-1, 2, 32)[:n]
        ref_k8, ref_ck = reference.quantize_fp8_per_channel(k)
        ref_v8, ref_cv = reference.quantize_fp8_per_channel(v)
        ref_k8, ref_v8 = positive_zero(ref_k8), positive_zero(ref_v8)  # the kernels write -0 as +0
        s = int(starts[i])
        if not torch.equal(k8[s:s + n].view(torch.uint8), ref_k8.view(torch.uint8)):
            return f"K codes of sequence {i}"
        if not torch.equal(scales[0, i], ref_ck):
            return f"K scales of sequence {i}"
        if not torch.equal(vt[:, :, s:s + n].permute(2, 0, 1).contiguous().view(torch.uint8),
                           ref_v8.view(torch.uint8)):
            return f"V codes of sequence {i}"
        if not torch.equal(scales[1, i], ref_cv):
            return f"V scales of sequence {i}"
        end = s + -(-n // reference.CONTEXT_ALIGN) * reference.CONTEXT_ALIGN
        if vt[:, :, s + n:end].float().abs().sum() != 0 or k8[s + n:end].float().abs().sum() != 0:
            return f"gap after sequence {i} not zero"
    return "ok"


@pytest.fixture(scope="module")
def interpreted():
    return kernel_cases.run_interpreted(__file__)


@pytest.mark.parametrize("name", INTERPRETED_CASES)
def test_interpreted_float32(interpreted, name):
    seed, results = interpreted
    err = results[name]
    assert isinstance(err, float) and err <= INTERPRETED_TOL, f"{name}: {err} (seed {seed})"


def test_interpreted_quantized_context_is_byte_exact(interpreted):
    seed, results = interpreted
    assert results["quantized_context"] == "ok", f"{results['quantized_context']} (seed {seed})"


def test_reference_tracks_exact_attention():
    """The reference is attention: against float32 attention on the same inputs its error is the e4m3
    operands' (~2-4% on random data, whose flat softmax averages many rounded terms)."""
    from pdserve.kernels import reference

    gen = torch.Generator().manual_seed(kernel_cases.test_seed())
    seq_lens, q_lens = _mixed(8, 1)
    args, _ = paged_batch(gen, seq_lens, q_lens, num_kv_heads=2, group=4, head_dim=64, block_size=8,
                          dtype=torch.float32, device="cpu")
    fp8 = reference.prefill_attention_fp8(*(args[k] for k in ("q", "kv_layer", "query_start_loc", "seq_lens",
                                                              "block_tables", "scale")))
    exact = reference.paged_attention(**args)
    assert 1e-3 < rel_err(fp8, exact) < 0.06


def test_rejects_bad_shapes():
    from pdserve.kernels import attention_fp8

    q = torch.zeros(4, 6, 32)
    kv = torch.zeros(2, 2, 8, 4, 32)  # 6 query heads over 4 kv heads
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention_fp8.prefill_attention_fp8(q, kv, torch.tensor([0, 4], dtype=torch.int32),
                                            torch.tensor([4], dtype=torch.int32), one[None], one, 4, 1.0, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu(name, dtype):
    seed = kernel_cases.test_seed()
    err = run_cases("cuda", dtype, [name], seed)[name]
    assert isinstance(err, float) and err <= GPU_TOL[dtype], f"{name} {dtype}: {err} (seed {seed})"


if __name__ == "__main__":  # the interpreter subprocess: {case: relative error, "quantized_context": ...}
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernel_cases.patch_interpreter_for_numpy2()
    results = run_cases("cpu", torch.float32, INTERPRETED_CASES, int(sys.argv[1]))
    results["quantized_context"] = quantized_context_matches(int(sys.argv[1]))
    print(json.dumps(results))


@pytest.mark.parametrize("value, why", [(-1, "expected an integer >= 0"), (2.5, "expected an integer"),
                                        (True, "expected an integer")])
def test_min_tokens_config_is_validated(value, why):
    from pdserve.config import ConfigError, load_config

    assert load_config(None, {"engine.fp8_attention_min_tokens": 0}).engine.fp8_attention_min_tokens == 0
    with pytest.raises(ConfigError, match=f"engine.fp8_attention_min_tokens: {why}"):
        load_config(None, {"engine.fp8_attention_min_tokens": value})


def test_rule_picks_long_prompt_steps_of_fp8_pools_only():
    from pdserve.engine.attention import build_metadata, uses_fp8_attention

    def meta(q_lens, seq_lens):
        return build_metadata(q_lens, seq_lens, [[0] * 8 for _ in q_lens], 16, torch.device("cpu"))

    long_step, short_step, decode = meta([100, 1], [100, 50]), meta([99, 1], [120, 50]), meta([1, 1], [100, 50])
    assert uses_fp8_attention(100, long_step) and not uses_fp8_attention(100, short_step)
    assert uses_fp8_attention(0, short_step) and not uses_fp8_attention(0, decode)  # 0: every prompt step
    assert not any(uses_fp8_attention(None, m) for m in (long_step, short_step, decode))  # not an fp8 pool
    assert long_step.context_start_loc.tolist() == [0, 112] and long_step.total_context == 112 + 64


def test_fp8_engine_attention_on_cpu_is_the_reference(engine_f32):
    """An fp8 engine on the embedded model, its prompt logits against the float32 engine's: with the fp8
    attention on every prompt step they move, and stay as close to float32 as with the fp8 linears alone
    (measured: KL 0.137 with, 0.147 without, nats/token; the 135M model's fp8 logits move that much)."""
    from pdserve.engine.engine import LLMEngine
    from pdserve.config import EngineConfig

    ids = engine_f32.tokenize("The quick brown fox jumps over the lazy dog because it wants to reach the river.")
    ref = engine_f32.score(ids).float()
    kl = {}
    logits = {}
    for min_tokens in (0, 4096):
        eng = LLMEngine(dtype="float32", config=EngineConfig(num_blocks=64, fp8_attention_min_tokens=min_tokens),
                        precision="fp8", progress=False)
        assert eng.runner.backend.fp8_min_tokens == min_tokens
        logits[min_tokens] = eng.score(ids).float()
        kl[min_tokens] = torch.nn.functional.kl_div(logits[min_tokens].log_softmax(-1), ref.log_softmax(-1),
                                                    log_target=True, reduction="batchmean").item()
    assert not torch.equal(logits[0], logits[4096])
    assert kl[0] < 1.5 * kl[4096] + 0.02, kl
    assert engine_f32.runner.backend.fp8_min_tokens is None
