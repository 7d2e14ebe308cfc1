"""The Llama-family decoder over flattened (varlen) batches and a paged KV cache.

Numerics follow HF transformers' Llama step for step (fp32 RMSNorm statistics, rotate-half RoPE
with fp32 angles, SDPA attention), so float32 greedy decoding is token-identical to it.
Projections are built by a `linear_factory(weight, bias)`, which is where a pool's precision
(bf16 / fp8 / nvfp4) enters without touching this file. The elementwise ops (RMSNorm with the residual
add, RoPE, SiLU-and-mul, the LM head) come from one ops set picked per device: TorchOps below (the
CPU path, and the exactness contract) or engine.gpu_ops.TritonOps on CUDA. A projection may take over
the op that produces its input (rms_norm_linear, silu_mul_linear), e.g. to quantize inside it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.model_config import ModelArch


class DenseLinear(nn.Module):
    """Unquantized projection at the model's compute dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


LinearFactory = Callable[[torch.Tensor, Optional[torch.Tensor]], nn.Module]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = arch.rope_scaling
    if sc and sc.get("rope_type") == "llama3":
        factor = sc["factor"]
        low, high = sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class TorchOps:
    """HF transformers' Llama math, rounding where it rounds: the CPU path (float32 greedy tokens identical
    to transformers). Same signatures as engine.gpu_ops.TritonOps."""

    name = "torch"

    def __init__(self, inv_freq: torch.Tensor, max_positions: int):
        self.inv_freq = inv_freq

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """Per-token (cos, sin), computed once per forward and shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # fp32 angles, as transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def rotary(self, q: torch.Tensor, k: torch.Tensor, rope):
        cos, sin = rope
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None):
        """rms_norm(x); with a residual, first x = residual + x, and returns (normed, x) (the new residual)."""
        if residual is None:
            return rms_norm(x, weight, eps)
        x = residual + x
        return rms_norm(x, weight, eps), x

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


def model_ops(device: torch.device, inv_freq: torch.Tensor, max_positions: int):
    """Triton kernels on CUDA when available; the torch ops elsewhere."""
    if device.type == "cuda":
        try:
            from pdserve.engine.gpu_ops import TritonOps
            return TritonOps(inv_freq, max_positions)
        except ImportError:
            pass
    return TorchOps(inv_freq, max_positions)


def rms_norm_linear(linear: nn.Module, ops, x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: Optional[torch.Tensor]):
    """(linear(rms_norm(x + residual)), x + residual); residual None: (linear(rms_norm(x)), x).
    A projection may take the whole step (`rms_norm_forward`, same arguments plus ops, None where it
    does not apply), e.g. an fp8 one whose input quantizer is fused into the norm."""
    fused = getattr(linear, "rms_norm_forward", None)
    out = fused(x, weight, eps, residual, ops) if fused is not None else None
    if out is not None:
        return out
    if residual is None:
        return linear(ops.rms_norm(x, weight, eps)), x
    h, residual = ops.rms_norm(x, weight, eps, residual)
    return linear(h), residual


def rotary_write_kv(ops, backend, q, k, v, rope, kv_layer, meta):
    """RoPE on q and k, then k and v into the paged cache: one launch where ops has it and the backend writes
    the cache as its write_kv would (TritonOps with TritonAttention), else ops.rotary and backend.write_kv."""
    fused = getattr(ops, "rotary_write_kv", None)
    if fused is not None and getattr(backend, "writes_like_fused_kv", False):
        return fused(q, k, v, rope, kv_layer, meta.slot_mapping)
    q, k = ops.rotary(q, k, rope)
    backend.write_kv(kv_layer, k, v, meta)
    return q, k


def silu_mul_linear(linear: nn.Module, ops, gate_up: torch.Tensor) -> torch.Tensor:
    """linear(silu(gate) * up), or the projection's own `silu_mul_forward(gate_up, ops)` (as above)."""
    fused = getattr(linear, "silu_mul_forward", None)
    out = fused(gate_up, ops) if fused is not None else None
    return out if out is not None else linear(ops.silu_and_mul(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, w: dict, prefix: str, linear: LinearFactory):
        super().__init__()
        self.arch = arch
        self.input_norm = nn.Parameter(w[prefix + "input_layernorm.weight"], requires_grad=False)
        self.post_norm = nn.Parameter(w[prefix + "post_attention_layernorm.weight"], requires_grad=False)
        a = prefix + "self_attn."
        qkv_w = torch.cat([w[a + "q_proj.weight"], w[a + "k_proj.weight"], w[a + "v_proj.weight"]])
        qkv_b = (torch.cat([w[a + "q_proj.bias"], w[a + "k_proj.bias"], w[a + "v_proj.bias"]])
                 if a + "q_proj.bias" in w else None)
        self.qkv = linear(qkv_w, qkv_b)
        self.o = linear(w[a + "o_proj.weight"], w.get(a + "o_proj.bias"))
        m = prefix + "mlp."
        self.gate_up = linear(torch.cat([w[m + "gate_proj.weight"], w[m + "up_proj.weight"]]), None)
        self.down = linear(w[m + "down_proj.weight"], None)
        self.qkv_sizes = [arch.q_size, arch.kv_size, arch.kv_size]  # once here: forward runs on the host's hot path

    def forward(self, x, residual, rope, kv_layer, meta, backend, scale, ops):
        """x: the previous layer's output (the embeddings for the first layer, residual None then);
        returns this layer's output and the residual stream before it, which the next norm adds."""
        arch = self.arch
        qkv, residual = rms_norm_linear(self.qkv, ops, x, self.input_norm, arch.rms_norm_eps, residual)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        q, k = rotary_write_kv(ops, backend, q, k, v, rope, kv_layer, meta)
        attn = backend.attend(q, kv_layer, meta, scale)
        gate_up, residual = rms_norm_linear(self.gate_up, ops, self.o(attn.reshape(-1, self.qkv_sizes[0])), self.post_norm,
                                            arch.rms_norm_eps, residual)
        return silu_mul_linear(self.down, ops, gate_up), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, weights: dict, linear: LinearFactory = DenseLinear, ops=None):
        super().__init__()
        self.arch = arch
        self.embed = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, weights, f"model.layers.{i}.", linear) for i in range(arch.num_layers))
        self.norm = nn.Parameter(weights["model.norm.weight"], requires_grad=False)
        head = weights.get("lm_head.weight")
        self.lm_head = self.embed if head is None else nn.Parameter(head, requires_grad=False)
        # computed on the CPU on every device, so the angles' inputs are the same bits everywhere
        inv_freq = rope_inv_freq(arch).to(self.embed.device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.ops = ops or model_ops(self.embed.device, inv_freq, arch.max_position_embeddings)
        self.scale = arch.head_dim ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        rope = self.ops.rope(positions, x.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, rope, kv_cache[:, i], meta, backend, self.scale, self.ops)
        hidden, _ = self.ops.rms_norm(x, self.norm, self.arch.rms_norm_eps, residual)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(hidden, self.lm_head).float()
