"""FP8-matmul prefill attention (kernels/attention_fp8.py) against its torch reference
(kernels.reference.prefill_attention_fp8), on the batches of tests/test_attention_kernels.py: fresh
prompts, chunks behind cached prefixes on and off block boundaries, a decode row mixed in, scattered
blocks, padded block tables, GQA 1/4/8, a strided layer view.

Per case:
- the context quantizer's codes, scales and per-head V maximum are byte-equal to the reference's;
- the attention output is within FP32_TOL (float32 output: the kernel's integer running maximum makes its
  e4m3 P the reference's, so only summation order differs) or BF16_TOL (bf16) of the reference;
- the reference itself stays near exact attention (QUANT_TOL on these random inputs, whose K has an
  outlier channel), so a kernel and reference that agree on wrong scales would still fail.
CPU: in float32 under TRITON_INTERPRET=1 (one subprocess, as in test_attention_kernels.py). GPU: bf16 and
float32, gpu-marked.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import kernel_cases
from test_attention_kernels import (BAD_BLOCK, _patch_interpreter_for_numpy2, _shapes, paged_batch, poison_allocator,
                                    rel_err)

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-3
BF16_TOL = 1e-2
QUANT_TOL = 0.08


def _context_offsets(seq_lens: torch.Tensor) -> torch.Tensor:
    csl = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
    csl[1:] = torch.cumsum(seq_lens, 0)
    return csl


def _quantizer_exact(args) -> bool:
    from kernels import attention_fp8, reference
    from kernels.fp8 import positive_zero

    kv, sl, bt = args["kv_layer"], args["seq_lens"], args["block_tables"]
    csl = _context_offsets(sl)
    k8, ks, vt, vs, vmax = attention_fp8.quantize_context(kv, sl, bt, csl, int(csl[-1]), args["max_seq_len"])
    block_size = kv.shape[2]
    for b, seq_len in enumerate(sl.tolist()):
        blocks = bt[b, :-(-seq_len // block_size)].long()
        start = int(csl[b])
        for index, codes, scales in ((0, k8[start:start + seq_len], ks[start:start + seq_len]),
                                     (1, vt[:, :, start:start + seq_len].permute(2, 0, 1), vs[start:start + seq_len])):
            ref_codes, ref_scales = reference.quantize_fp8_per_head(reference._gather(kv, None, blocks, index, seq_len))
            if not (torch.equal(positive_zero(codes.contiguous()).view(torch.uint8),
                                positive_zero(ref_codes).view(torch.uint8)) and torch.equal(scales, ref_scales)):
                return False
            if index == 1 and not torch.equal(vmax[b], ref_scales.amax(dim=0)):
                return False
    return True


def case_prefill(group):
    def run(device, dtype, gen):
        from kernels import attention_fp8, reference

        shape, scale_up = _shapes(device)
        bs = shape["block_size"]
        seq_lens = [3 * bs + 5, 4 * bs, 2 * bs + 7 + 40 * scale_up, 6 * bs, 17]
        q_lens = [3 * bs + 5, 2 * bs, 9 + 40 * scale_up, 1, 17]
        args, _ = paged_batch(gen, seq_lens, q_lens, group=group, dtype=dtype, device=device, **shape)
        kv = args["kv_layer"]
        kv[:, 0, :, :, 3] *= 20  # an outlier channel in K, as real models have
        assert int(args["block_tables"].max()) == BAD_BLOCK  # padding that would fault if read
        poison_allocator(args["q"].numel() * args["q"].element_size(), device)
        ref_args = {k: args[k] for k in ("q", "kv_layer", "query_start_loc", "seq_lens", "block_tables", "scale")}
        csl = _context_offsets(args["seq_lens"])
        out = attention_fp8.prefill_attention_fp8(**args, context_start_loc=csl, total_context=int(csl[-1]))
        ref = reference.prefill_attention_fp8(**ref_args)
        exact = reference.paged_attention(**args)
        return {"vs_reference": rel_err(out, ref), "reference_vs_exact": rel_err(ref, exact),
                "quantizer_exact": _quantizer_exact(args)}
    return run


CASES = {f"prefill_fp8mma_g{g}": case_prefill(g) for g in (1, 4, 8)}


def _check(result, tol, where):
    assert isinstance(result, dict), f"{where}: {result}"
    assert result["quantizer_exact"], f"{where}: context quantizer differs from the reference"
    assert result["vs_reference"] <= tol, f"{where}: {result}"
    assert result["reference_vs_exact"] <= QUANT_TOL, f"{where}: {result}"


@pytest.fixture(scope="module")
def interpreted():
    return kernel_cases.run_interpreted(__file__, ROOT)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_float32(interpreted, name):
    seed, results = interpreted
    _check(results[name], FP32_TOL, f"{name} (seed {seed})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, BF16_TOL), (torch.float32, FP32_TOL)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu(name, dtype, tol):
    seed = kernel_cases.test_seed()
    result = kernel_cases.run_cases(CASES, "cuda", dtype, [name], seed)[name]
    _check(result, tol, f"{name} {dtype} (seed {seed})")


if __name__ == "__main__":  # the interpreter subprocess: print {case: result} as JSON
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_for_numpy2()
    print(json.dumps(kernel_cases.run_cases(CASES, "cpu", torch.float32, sorted(CASES), int(sys.argv[1]))))
