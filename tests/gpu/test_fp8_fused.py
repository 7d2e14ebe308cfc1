"""FP8 prefill with the activation quantizer fused into its producers (kernels/triton_fp8.py
rms_norm_quant_fp8 with the residual add, silu_mul_quant_fp8) and their use by the engine's model
(engine/model.py rms_norm_linear / silu_mul_linear -> kernels/quant_linear.py Fp8Linear).

The fused kernels must be byte-equal to the unfused pair (kernels/fused.py producer, then
triton_fp8.quantize_fp8_rows): codes, scales and the new residual. And a model with fp8 projections
must give the same output with the fused entry points on (quant_linear.FUSE_PRODUCERS) and off.
Run two ways, as tests/gpu/test_quant_kernels_gpu.py:
  - on CPU under TRITON_INTERPRET=1 at small shapes, in a child process (bf16 and fp16 inputs; the
    model with the Triton ops interpreted and the torch attention);
  - on a CUDA GPU (marked gpu): serving shapes, and the engine (LLMEngine, fp8 precision) on the
    random-weight fixture of tests/gpu/test_engine_gpu.py (PDSERVE_GPU_FIXTURE; skipped without it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch


from pdserve.testing import kernel_cases
from pdserve.testing.kernel_cases import poison_bytes, random_activations, rel_err, same_bytes

CUDA = torch.cuda.is_available()
FIXTURE = os.environ.get("PDSERVE_GPU_FIXTURE")
EPS = 1e-5


# ------------------------------------------------------------------ checks shared by both modes

def check_rms_norm_quant(device, m, k, seed, dtype=torch.bfloat16):
    """rms_norm_quant_fp8 with and without a residual == fused.rms_norm then quantize_fp8_rows, bytewise."""
    from pdserve.kernels import fused, triton_fp8
    x = random_activations(m, k, device, dtype, seed=seed)
    residual = random_activations(m, k, device, dtype, seed=seed + 1)
    w = (1 + 0.1 * random_activations(1, k, device, dtype, seed=seed + 2)).reshape(-1)

    def outputs():
        return (poison_bytes(torch.empty(m, k, dtype=torch.float8_e4m3fn, device=device)),
                poison_bytes(torch.empty(m, 1, dtype=torch.float32, device=device)))

    codes, scale = outputs()
    new_res = poison_bytes(torch.empty(m, k, dtype=dtype, device=device))
    got = triton_fp8.rms_norm_quant_fp8(x, w, EPS, residual, codes=codes, scale=scale, new_residual=new_res)
    assert got[0] is codes and got[1] is scale and got[2] is new_res
    h, ref_res = fused.rms_norm(x, w, EPS, residual)
    ref_codes, ref_scale = triton_fp8.quantize_fp8_rows(h)
    assert same_bytes(new_res, ref_res), "new residual != fused.rms_norm's"
    assert same_bytes(scale, ref_scale), "scales != rms_norm(+residual) + quantize"
    assert same_bytes(codes, ref_codes), "codes != rms_norm(+residual) + quantize"
    assert same_bytes(residual, random_activations(m, k, device, dtype, seed=seed + 1)), "residual input written"

    codes, scale = outputs()
    got = triton_fp8.rms_norm_quant_fp8(x, w, EPS, codes=codes, scale=scale)
    assert len(got) == 2
    ref_codes, ref_scale = triton_fp8.quantize_fp8_rows(fused.rms_norm(x, w, EPS))
    assert same_bytes(scale, ref_scale) and same_bytes(codes, ref_codes), "rms_norm_quant != rms_norm + quantize"


def check_silu_mul_quant(device, m, inter, seed, dtype=torch.bfloat16):
    from pdserve.kernels import fused, triton_fp8
    gate_up = random_activations(m, 2 * inter, device, dtype, seed=seed)
    codes = poison_bytes(torch.empty(m, inter, dtype=torch.float8_e4m3fn, device=device))
    scale = poison_bytes(torch.empty(m, 1, dtype=torch.float32, device=device))
    triton_fp8.silu_mul_quant_fp8(gate_up, codes, scale)
    ref_codes, ref_scale = triton_fp8.quantize_fp8_rows(fused.silu_and_mul(gate_up))
    assert same_bytes(scale, ref_scale) and same_bytes(codes, ref_codes), "silu_mul_quant != silu_mul + quantize"


def check_empty_batch(device):
    from pdserve.kernels import triton_fp8
    x = torch.empty(0, 96, dtype=torch.bfloat16, device=device)
    w = torch.ones(96, dtype=torch.bfloat16, device=device)
    codes, scale, new_res = triton_fp8.rms_norm_quant_fp8(x, w, EPS, x)
    assert codes.shape == (0, 96) and scale.shape == (0, 1) and new_res.shape == (0, 96)
    codes, scale = triton_fp8.silu_mul_quant_fp8(torch.empty(0, 192, dtype=torch.bfloat16, device=device))
    assert codes.shape == (0, 96) and scale.shape == (0, 1)


def tiny_arch(hidden=96, inter=200, heads=2, kv_heads=1, head_dim=64, layers=2, vocab=64, qkv_bias=True):
    from pdserve.engine.model_config import ModelArch
    return ModelArch(model_type="qwen2" if qkv_bias else "llama", vocab_size=vocab, hidden_size=hidden,
                     intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=head_dim, rms_norm_eps=EPS, rope_theta=10000.0, max_position_embeddings=256,
                     tie_word_embeddings=False, qkv_bias=qkv_bias)


def tiny_weights(arch, seed=0, dtype=torch.bfloat16) -> dict:
    """Random Llama weights: unit-variance projection outputs, norms near 1, peaked logits."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    h, q, kv = arch.hidden_size, arch.q_size, arch.kv_size
    w = {"model.embed_tokens.weight": rnd(arch.vocab_size, h), "model.norm.weight": 1 + rnd(h, std=0.1),
         "lm_head.weight": rnd(arch.vocab_size, h, std=0.5)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rnd(h, std=0.1),
              p + "post_attention_layernorm.weight": 1 + rnd(h, std=0.1),
              p + "self_attn.q_proj.weight": rnd(q, h, std=h ** -0.5),
              p + "self_attn.k_proj.weight": rnd(kv, h, std=h ** -0.5),
              p + "self_attn.v_proj.weight": rnd(kv, h, std=h ** -0.5),
              p + "self_attn.o_proj.weight": rnd(h, q, std=q ** -0.5),
              p + "mlp.gate_proj.weight": rnd(arch.intermediate_size, h, std=h ** -0.5),
              p + "mlp.up_proj.weight": rnd(arch.intermediate_size, h, std=h ** -0.5),
              p + "mlp.down_proj.weight": rnd(h, arch.intermediate_size, std=arch.intermediate_size ** -0.5)}
        if arch.qkv_bias:
            w |= {p + "self_attn.q_proj.bias": rnd(q, std=0.1), p + "self_attn.k_proj.bias": rnd(kv, std=0.1),
                  p + "self_attn.v_proj.bias": rnd(kv, std=0.1)}
    return w


class FusedCalls:
    """Counts the fused producers' calls (and the plain quantizer's) while active."""
    NAMES = ("rms_norm_quant_fp8", "silu_mul_quant_fp8", "quantize_fp8_rows")

    def __enter__(self):
        from pdserve.kernels import triton_fp8
        self.module, self.saved, self.counts = triton_fp8, {}, dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            fn = self.saved[name] = getattr(triton_fp8, name)
            setattr(triton_fp8, name, self._counting(name, fn))
        return self

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)


def model_prefill(device, fuse: bool, prompt_lens=(5, 11), block_size=16):
    """Hidden states and logits of one varlen prefill of a tiny fp8 model, fused producers on or off,
    and the fused kernels' call counts. On CPU: the Triton ops (interpreted) and the torch attention."""
    from pdserve.engine.attention import TorchAttention
    from pdserve.engine.model_runner import get_backend
    from pdserve.engine.attention import build_metadata
    from pdserve.engine.gpu_ops import TritonOps
    from pdserve.engine.model import LlamaModel, rope_inv_freq
    from pdserve.kernels import quant_linear

    arch = tiny_arch()
    dev = torch.device(device)
    weights = {k: v.to(dev) for k, v in tiny_weights(arch).items()}
    ops = TritonOps(rope_inv_freq(arch).to(dev), arch.max_position_embeddings)
    model = LlamaModel(arch, weights, lambda w, b: quant_linear.make_linear(w, b, "fp8", torch.bfloat16), ops=ops)
    backend = get_backend(dev) if dev.type == "cuda" else TorchAttention()
    blocks = [-(-n // block_size) for n in prompt_lens]
    tables = [list(range(sum(blocks[:i]), sum(blocks[:i + 1]))) for i in range(len(blocks))]
    meta = build_metadata(list(prompt_lens), list(prompt_lens), tables, block_size, dev)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, arch.vocab_size, (sum(prompt_lens),), generator=g).to(dev)
    positions = torch.cat([torch.arange(n) for n in prompt_lens]).to(dev)
    kv_cache = torch.zeros(sum(blocks), arch.num_layers, 2, block_size, arch.num_kv_heads, arch.head_dim,
                           dtype=torch.bfloat16, device=dev)
    saved = quant_linear.FUSE_PRODUCERS
    quant_linear.FUSE_PRODUCERS = fuse
    try:
        with torch.inference_mode(), FusedCalls() as calls:
            hidden = model(ids, positions, kv_cache, meta, backend)
            logits = model.logits(hidden)
    finally:
        quant_linear.FUSE_PRODUCERS = saved
    return hidden, logits, calls.counts


def check_model_fused_matches_unfused(device, exact: bool):
    h_on, logits_on, on = model_prefill(device, fuse=True)
    h_off, logits_off, off = model_prefill(device, fuse=False)
    layers = tiny_arch().num_layers
    assert on["rms_norm_quant_fp8"] == 2 * layers and on["silu_mul_quant_fp8"] == layers, on
    assert off["rms_norm_quant_fp8"] == 0 and off["silu_mul_quant_fp8"] == 0, off
    if exact:
        assert same_bytes(h_on, h_off), f"hidden differs: rel err {rel_err(h_on, h_off):.2e}"
        assert same_bytes(logits_on, logits_off)
    else:
        assert rel_err(logits_on, logits_off) <= 1e-2, rel_err(logits_on, logits_off)
    return rel_err(logits_on, logits_off)


# ------------------------------------------------------------------ interpreter (CPU CI)

WIDTHS = (64, 96, 200, 1000)  # non-powers of two: masked lanes in the sum and the amax
INTERP_CHECKS = {
    **{f"rms_norm_quant_residual_{k}_{d}": (lambda k=k, dt=dt: check_rms_norm_quant("cpu", 7, k, seed=k, dtype=dt))
       for k in WIDTHS for d, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))},
    **{f"silu_mul_quant_{i}": (lambda i=i: check_silu_mul_quant("cpu", 7, i, seed=i)) for i in (80, 200, 1000, 16400)},
    "empty_batch": lambda: check_empty_batch("cpu"),
    "model_fused_equals_unfused": lambda: check_model_fused_matches_unfused("cpu", exact=True),
}


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton")
    return kernel_cases.interpreted_json(__file__)


@pytest.mark.parametrize("name", list(INTERP_CHECKS))
def test_under_interpreter(interpreter_results, name):
    assert interpreter_results[name] == "ok", interpreter_results[name]


def test_fused_entry_points_decline_off_the_triton_ops():
    """The CPU path (TorchOps) keeps its numerics: the fused entry points return None there, and
    for float32 activations or with FUSE_PRODUCERS off whatever the ops."""
    from pdserve.engine.model import TorchOps
    from pdserve.kernels import quant_linear

    lin = quant_linear.make_linear(torch.randn(32, 64), None, "fp8", torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    torch_ops = TorchOps(torch.ones(4), 16)
    triton_ops = type("FakeTritonOps", (), {"name": "triton"})()
    assert lin.rms_norm_forward(x, w, EPS, x, torch_ops) is None
    assert lin.silu_mul_forward(torch.randn(4, 128, dtype=torch.bfloat16), torch_ops) is None
    assert lin.rms_norm_forward(x.float(), w, EPS, x.float(), triton_ops) is None
    assert lin.rms_norm_forward(x.t().contiguous().t(), w, EPS, None, triton_ops) is None  # column-major rows
    saved = quant_linear.FUSE_PRODUCERS
    quant_linear.FUSE_PRODUCERS = False
    try:
        assert lin.rms_norm_forward(x, w, EPS, x, triton_ops) is None
        assert lin.silu_mul_forward(torch.randn(4, 128, dtype=torch.bfloat16), triton_ops) is None
    finally:
        quant_linear.FUSE_PRODUCERS = saved


def test_model_helpers_fall_back_to_ops_and_linear():
    """Projections without the fused entry points (bf16, nvfp4): ops.rms_norm then the linear, as before."""
    from pdserve.engine.model import DenseLinear, TorchOps, rms_norm_linear, silu_mul_linear

    g = torch.Generator().manual_seed(0)
    lin = DenseLinear(torch.randn(24, 16, generator=g))
    x, res = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    w = torch.rand(16, generator=g) + 0.5
    ops = TorchOps(torch.ones(4), 16)
    y, new_res = rms_norm_linear(lin, ops, x, w, EPS, res)
    h, ref_res = ops.rms_norm(x, w, EPS, res)
    assert torch.equal(new_res, ref_res) and torch.equal(y, lin(h))
    y, new_res = rms_norm_linear(lin, ops, x, w, EPS, None)
    assert new_res is x and torch.equal(y, lin(ops.rms_norm(x, w, EPS)))
    gate_up = torch.randn(5, 32, generator=g)
    assert torch.equal(silu_mul_linear(lin, ops, gate_up), lin(ops.silu_and_mul(gate_up)))


# ------------------------------------------------------------------ sm_90 machine code, compiled without the device

def sum_layouts(fn, signature: dict, constexprs: dict, k: int, num_warps: int) -> list[str]:
    """Register layouts of the kernel's fp32 sums (tt.reduce with an add) as compiled for sm_90,
    specialized as a launch on contiguous rows of width k is (16-byte aligned pointers; the width
    and row strides divisible by 16 when k is)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sixteen = [["tt.divisibility", 16]]
    attrs = {(i,): sixteen for i, ty in enumerate(signature.values())
             if ty.startswith("*") or (ty == "i32" and k % 16 == 0)}
    src = ASTSource(fn=fn, signature=signature | dict.fromkeys(constexprs, "constexpr"), constexprs=constexprs,
                    attrs=attrs)
    ir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm["ttgir"]
    aliases = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ir, re.M))
    reduces = re.findall(r'"tt\.reduce"\(%[\w.]+\) <\{axis = 0 : i32\}> \(\{(.*?)\}\) : \(tensor<\d+xf32, (#\w+)>\)',
                         ir, re.S)
    return [aliases.get(layout, layout) for body, layout in reduces if "arith.addf" in body]


@pytest.mark.parametrize("k,residual", [(200, True), (4096, True), (5120, True), (16384, True), (8192, False)])
def test_rms_norm_quant_sums_in_fused_rms_norm_order(k, residual):
    """On the GPU the sum of squares is reduced in the order its register layout sets: the fused
    kernel must hold the row as fused.rms_norm does, or rstd (and so codes) may differ by an ulp."""
    pytest.importorskip("triton")
    import triton

    from pdserve.kernels import fused, triton_fp8

    block = triton.next_power_of_2(k)
    warps = min(max(block // 256, 1), 16)  # both launchers' choice
    ptrs = dict(x_ptr="*bf16", res_ptr="*bf16", w_ptr="*bf16")
    try:
        theirs = sum_layouts(fused._rms_norm_kernel,
                             ptrs | dict(out_ptr="*bf16", new_res_ptr="*bf16", s_x="i32", s_res="i32", s_out="i32",
                                         s_new_res="i32", n_cols="i32", eps="fp32"),
                             dict(BLOCK=block, RESIDUAL=residual, PDL=fused.gdc_wait is not None), k, warps)
        ours = sum_layouts(triton_fp8.rms_norm_quant_kernel,
                           ptrs | dict(new_res_ptr="*bf16", codes_ptr="*fp8e4nv", scale_ptr="*fp32", K="i32",
                                       stride_x="i32", stride_res="i32", stride_new_res="i32", stride_c="i32",
                                       eps="fp32"),
                           dict(BLOCK_K=block, RESIDUAL=residual, PDL=fused.gdc_wait is not None), k, warps)
    except Exception as e:  # e.g. a Triton that cannot target sm_90 here
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {e}")
    assert len(theirs) == 1 and ours == theirs, (ours, theirs)


# ------------------------------------------------------------------ on the GPU

gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,k", [(1, 4096), (77, 4096), (300, 8192), (129, 5120), (3, 2000), (2, 16384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_quant_residual_exact(m, k, dtype):
    check_rms_norm_quant("cuda", m, k, seed=m + k, dtype=dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m,inter", [(1, 14336), (77, 5000), (300, 8192), (1000, 14336), (5, 16400), (200, 28672)])
def test_silu_mul_quant_exact(m, inter):
    """Row counts above the programs' (an SM count) run the one-pass loop with its prefetch several times;
    rows wider than SILU_ONE_PASS_MAX take the two passes."""
    check_silu_mul_quant("cuda", m, inter, seed=m + inter)


@pytest.mark.gpu
@gpu
def test_empty_batch_on_gpu():
    check_empty_batch("cuda")


@pytest.mark.gpu
@gpu
def test_model_fused_matches_unfused_on_gpu():
    check_model_fused_matches_unfused("cuda", exact=False)


@pytest.mark.gpu
@gpu
@pytest.mark.skipif(not FIXTURE or not Path(FIXTURE or ".", "config.json").exists(),
                    reason="PDSERVE_GPU_FIXTURE names no model directory (python tests/gpu/test_engine_gpu.py DIR)")
def test_engine_fp8_prefill_fused_matches_unfused():
    """LLMEngine at fp8 on the random-weight fixture: teacher-forced prefill logits with the fused
    producers equal (bf16: within 1e-2 relative) those with them off, and the fused kernels ran."""
    from pdserve.engine.engine import LLMEngine
    from pdserve.kernels import quant_linear
    from pdserve.config import EngineConfig

    config = EngineConfig(block_size=16, num_blocks=64, max_num_batched_tokens=512, max_num_seqs=4, device="cuda")
    engine = LLMEngine(FIXTURE, dtype="bfloat16", config=config, precision="fp8", progress=False)
    assert engine.runner.model.ops.name == "triton"
    tokens = torch.randint(3, engine.arch.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    saved, runs = quant_linear.FUSE_PRODUCERS, {}
    try:
        for fuse in (True, False):
            quant_linear.FUSE_PRODUCERS = fuse
            with FusedCalls() as calls:
                runs[fuse] = (engine.score(tokens), dict(calls.counts))
    finally:
        quant_linear.FUSE_PRODUCERS = saved
    (on, on_calls), (off, off_calls) = runs[True], runs[False]
    layers = engine.arch.num_layers
    assert on_calls == {"rms_norm_quant_fp8": 2 * layers, "silu_mul_quant_fp8": layers,
                        "quantize_fp8_rows": layers}, on_calls
    assert off_calls == {"rms_norm_quant_fp8": 0, "silu_mul_quant_fp8": 0, "quantize_fp8_rows": 4 * layers}, off_calls
    assert on.shape == (len(tokens), engine.arch.vocab_size)
    err = rel_err(on, off)
    assert err <= 1e-2, err
    assert (on.argmax(-1) == off.argmax(-1)).float().mean().item() >= 0.99


if __name__ == "__main__":  # child process of interpreter_results, TRITON_INTERPRET=1
    kernel_cases.patch_interpreter_for_numpy2()
    print(json.dumps(kernel_cases.run_checks(INTERP_CHECKS, "error")))
