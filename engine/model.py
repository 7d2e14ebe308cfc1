"""The Llama-family decoder over flattened (varlen) batches and a paged KV cache.

Numerics follow HF transformers' Llama step for step (fp32 RMSNorm statistics, rotate-half RoPE
with fp32 angles, SDPA attention), so float32 greedy decoding is token-identical to it.
Projections are built by a `linear_factory(weight, bias)`, which is where a pool's precision
(bf16 / fp8 / nvfp4) enters without touching this file.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata
from engine.model_config import ModelArch


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

    def forward(self, x, cos, sin, kv_layer, meta, backend, scale):
        arch = self.arch
        h = rms_norm(x, self.input_norm, arch.rms_norm_eps)
        qkv = self.qkv(h)
        q, k, v = qkv.split([arch.q_size, arch.kv_size, arch.kv_size], dim=-1)
        q = q.view(-1, arch.num_heads, arch.head_dim)
        k = k.view(-1, arch.num_kv_heads, arch.head_dim)
        v = v.view(-1, arch.num_kv_heads, arch.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        backend.write_kv(kv_layer, k, v, meta)
        attn = backend.attend(q, kv_layer, meta, scale)
        x = x + self.o(attn.reshape(-1, arch.q_size))
        h = rms_norm(x, self.post_norm, arch.rms_norm_eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, weights: dict, linear: LinearFactory = DenseLinear):
        super().__init__()
        self.arch = arch
        self.embed = nn.Parameter(weights["model.embed_tokens.weight"], requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, weights, f"model.layers.{i}.", linear) for i in range(arch.num_layers))
        self.norm = nn.Parameter(weights["model.norm.weight"], requires_grad=False)
        head = weights.get("lm_head.weight")
        self.lm_head = self.embed if head is None else nn.Parameter(head, requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)
        self.scale = arch.head_dim ** -0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, backend) -> torch.Tensor:
        x = F.embedding(input_ids, self.embed)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # fp32 angles, as transformers
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(x.dtype)[:, None, :]
        sin = emb.sin().to(x.dtype)[:, None, :]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_cache[:, i], meta, backend, self.scale)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()
