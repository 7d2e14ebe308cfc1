"""Shared driver of the kernel-vs-reference case tables (attention, fused ops).

Seeds: fixed by default so CI is deterministic; `PDSERVE_TEST_SEED=random` draws fresh inputs (as
the GPU runs do), and any failure message names the seed to reproduce it with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def test_seed() -> int:
    s = os.environ.get("PDSERVE_TEST_SEED", "20261122")
    return int.from_bytes(os.urandom(3), "little") if s == "random" else int(s)


def run_cases(cases: dict, device: str, dtype: torch.dtype, names, seed: int) -> dict:
    results = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        try:
            results[name] = cases[name](device, dtype, gen)
        except Exception as exc:  # reported per case, so one failure does not hide the rest
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def interpreted_json(test_file: str, *args: str):
    """Run test_file as a script under TRITON_INTERPRET=1 in a subprocess (the variable must not leak into
    the other tests of this session) and return the JSON its last output line holds."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, test_file, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interpreted(test_file: str) -> tuple[int, dict]:
    """All of a file's cases in one interpreted subprocess, with this session's seed."""
    seed = test_seed()
    return seed, interpreted_json(test_file, str(seed))


def run_checks(checks: dict, other_errors: str) -> dict:
    """{name: "ok" | "fail: ..." | "<other_errors>: ..."} for zero-argument checks that assert; an
    exception other than AssertionError is labelled `other_errors` (a file decides whether that means
    an interpreter limitation to skip or an error)."""
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = "ok"
        except AssertionError as e:
            results[name] = f"fail: {e}"
        except Exception as e:
            last = str(e).splitlines()[-1][:300] if str(e) else ""
            results[name] = f"{other_errors}: {type(e).__name__}: {last}"
    return results


def patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with int(array), which NumPy >= 2.3 refuses
    for its 1-element arrays (program ids are shape (1,)); take the element explicitly."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


# ------------------------------------------------------------------ inputs and checks shared by kernel tests
BAD_BLOCK = 1 << 30  # block-table padding: reading it would fault or raise


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite output (an unwritten poisoned element?)"
    return ((out - ref).norm() / ref.norm()).item()


def random_activations(m: int, k: int, device, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Rows with very different magnitudes and a few outliers, like real activations."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(m, 1, generator=g) * 2)
    x[:, torch.randint(0, k, (max(1, k // 256),), generator=g)] *= 20
    x[0, :16] = 0  # an all-zero NVFP4 block
    return x.to(dtype).to(device)


def poison_bytes(t: torch.Tensor) -> torch.Tensor:
    t.reshape(-1).view(torch.uint8).fill_(0xFF)  # e4m3 NaN, uint8 codes (-6, -6), bf16/fp32 NaN
    return t


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    def raw(t):
        return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.equal(raw(a), raw(b))


def poison_allocator(nbytes: int, device: str) -> None:
    """Leave NaNs where the next allocation of about this size will likely land, so an output element
    that a kernel forgets to write shows up as a non-finite value."""
    buf = torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device=device)
    buf.fill_(float("nan"))
    del buf


def paged_batch(gen, seq_lens, q_lens, num_kv_heads, group, head_dim, block_size, dtype, device, fp8=False):
    """A random batch over a paged, two-layer cache; returns the kwargs of paged_attention and the layer."""
    from pdserve.kernels import reference

    blocks_needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    width = max(blocks_needed) + 2
    shape = (num_blocks, 2, 2, block_size, num_kv_heads, head_dim)
    values = torch.randn(shape, generator=gen).to(device)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seq_lens), width), BAD_BLOCK, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = perm[used:used + n].int()
        used += n
    scales = None
    if fp8:
        codes, cache_scales = reference.quantize_fp8_per_head(values)
        kv_layer, scales = codes[:, 1], cache_scales[:, 1]
    else:
        kv_layer = values.to(dtype)[:, 1]  # strided: one layer of the block-major cache
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn((int(qsl[-1]), num_kv_heads * group, head_dim), generator=gen).to(device, dtype)
    args = dict(q=q, kv_layer=kv_layer, query_start_loc=qsl.to(device),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
                block_tables=tables.to(device), scale=head_dim ** -0.5,
                max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    return args, scales


def attention_shapes(device):
    """Small shapes for the interpreter, realistic ones (head_dim 128, block 16) on a GPU."""
    if device == "cpu":
        return dict(num_kv_heads=2, head_dim=32, block_size=8), 1
    return dict(num_kv_heads=4, head_dim=128, block_size=16), 8


def rel_err_or_inf(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out.float()).all():
        return float("inf")
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
