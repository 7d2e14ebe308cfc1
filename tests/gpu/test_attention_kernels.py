"""Triton paged attention (kernels/attention.py) against its torch reference (kernels/reference.py).

Every case draws fresh random inputs: ragged sequence lengths on and off block boundaries, prefix
blocks already in the cache (chunked prefill), scattered physical blocks, block tables padded with an
index that would fault if read, GQA ratios 1, 4 and 8, and a layer view strided inside a multi-layer
cache. The same cases run two ways:
- on CPU under TRITON_INTERPRET=1, in float32, in ONE subprocess (the variable must be set before triton
  is imported, and must not leak into other tests); the interpreter's bf16 arithmetic is not faithful
  (its tl.dot multiplies bf16 bit patterns as integers), so it checks the kernels' logic;
- on a CUDA GPU (gpu-marked), in bf16 at relative error <= 1e-2, and in float32.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from pdserve.testing import kernel_cases
from pdserve.testing.kernel_cases import attention_shapes, paged_batch, poison_allocator, rel_err_or_inf

BF16_TOL = 1e-2
FP32_TOL = 1e-5



def _run_attention(args, scales, num_splits=None):
    from pdserve.kernels import attention, reference

    extra = {} if num_splits is None else {"num_splits": num_splits}
    poison_allocator(args["q"].numel() * args["q"].element_size(), args["q"].device.type)
    if scales is None:
        out = attention.paged_attention(**args, **extra)
        ref = reference.paged_attention(**args)
    else:
        fp8_args = dict(args, kv_scales=scales)
        fp8_args = {k: fp8_args[k] for k in ("q", "kv_layer", "kv_scales", "query_start_loc", "seq_lens",
                                              "block_tables", "scale", "max_query_len", "max_seq_len")}
        out = attention.paged_attention_fp8(**fp8_args, **extra)
        ref = reference.paged_attention_fp8(**fp8_args)
    return rel_err_or_inf(out, ref)



def case_decode_empty_rows(group):
    """A decode batch where some sequences have no query token this step: their neighbours' outputs must
    not be touched (their rows of the output do not exist)."""
    def run(device, dtype, gen):
        shape, _ = attention_shapes(device)
        bs = shape["block_size"]
        args, _ = paged_batch(gen, [bs + 3, 2 * bs, 5, 3 * bs], [1, 0, 1, 0], group=group, dtype=dtype,
                              device=device, **shape)
        return max(_run_attention(args, None, num_splits=3), _run_attention(args, None, num_splits=1))
    return run


def case_decode(group, fp8=False, num_splits=None, merge_in_kernel=None):
    def run(device, dtype, gen):
        from pdserve.kernels import attention

        if merge_in_kernel is not None:  # both ways of merging split partials
            before = attention.MERGE_IN_KERNEL
            attention.MERGE_IN_KERNEL = merge_in_kernel
            try:
                return case_decode(group, fp8, num_splits)(device, dtype, gen)
            finally:
                attention.MERGE_IN_KERNEL = before
        shape, scale_up = attention_shapes(device)
        bs = shape["block_size"]
        seq_lens = [1, bs, bs + 1, 2 * bs, 5 * bs - 3, 9 * bs * scale_up + 5]
        args, scales = paged_batch(gen, seq_lens, [1] * len(seq_lens), group=group, dtype=dtype, device=device,
                                   fp8=fp8, **shape)
        return _run_attention(args, scales, num_splits)
    return run


def case_prefill(group, fp8=False):
    def run(device, dtype, gen):
        shape, scale_up = attention_shapes(device)
        bs = shape["block_size"]
        # fresh prompts, chunks after cached prefixes (on and off block boundaries), a decode row mixed in
        seq_lens = [3 * bs + 5, 4 * bs, 2 * bs + 7 + 40 * scale_up, 6 * bs, 17]
        q_lens = [3 * bs + 5, 2 * bs, 9 + 40 * scale_up, 1, 17]
        args, scales = paged_batch(gen, seq_lens, q_lens, group=group, dtype=dtype, device=device, fp8=fp8,
                                   **shape)
        return _run_attention(args, scales)
    return run


CASES = {}
for _g in (1, 4, 8):
    CASES[f"decode_g{_g}"] = case_decode(_g)
    CASES[f"decode_g{_g}_nosplit"] = case_decode(_g, num_splits=1)
    CASES[f"decode_g{_g}_split3"] = case_decode(_g, num_splits=3)
    CASES[f"decode_g{_g}_split3_merge_kernel"] = case_decode(_g, num_splits=3, merge_in_kernel=False)
    CASES[f"decode_g{_g}_split3_merge_in_kernel"] = case_decode(_g, num_splits=3, merge_in_kernel=True)
    CASES[f"prefill_g{_g}"] = case_prefill(_g)
    CASES[f"decode_empty_rows_g{_g}"] = case_decode_empty_rows(_g)
    CASES[f"decode_fp8_g{_g}"] = case_decode(_g, fp8=True)
    CASES[f"prefill_fp8_g{_g}"] = case_prefill(_g, fp8=True)


def run_cases(device: str, dtype: torch.dtype, names, seed: int) -> dict:
    return kernel_cases.run_cases(CASES, device, dtype, names, seed)


@pytest.fixture(scope="module")
def interpreted():
    """All cases in one TRITON_INTERPRET=1 subprocess."""
    return kernel_cases.run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_interpreted_float32(interpreted, name):
    seed, results = interpreted
    err = results[name]
    assert isinstance(err, float) and err <= FP32_TOL, f"{name}: {err} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, BF16_TOL), (torch.float32, 1e-4)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu(name, dtype, tol):
    seed = kernel_cases.test_seed()
    err = run_cases("cuda", dtype, [name], seed)[name]
    assert isinstance(err, float) and err <= tol, f"{name} {dtype}: {err} (seed {seed})"



if __name__ == "__main__":  # the interpreter subprocess: print {case: relative error} as JSON
    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernel_cases.patch_interpreter_for_numpy2()
    print(json.dumps(run_cases("cpu", torch.float32, sorted(CASES), int(sys.argv[1]))))
