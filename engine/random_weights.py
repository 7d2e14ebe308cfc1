"""Random weights for the engine's own model (engine/model.py), for benchmarks and tests that need a Llama of a
given shape but not its answers: the tensors an HF checkpoint of `arch` holds, by the same names, made on the
device instead of read from disk. `model.load_format: dummy` serves them (vLLM's `--load-format dummy`): a
model directory then needs only config.json and the tokenizer, and every worker that loads it on the same
kind of device gets the same tensors, so a prefill and a decode pool agree as they would on real weights.

Projections have unit-variance outputs for unit-variance inputs (entries of std 1/sqrt(fan-in)), norm weights
are near 1 and the embeddings have std 1, so activations keep their scale through every layer and the logits
have a std of about 1.
"""
from __future__ import annotations

import torch

from pdserve.engine.model_config import ModelArch


def random_weights(arch: ModelArch, dtype: torch.dtype, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    """{HF tensor name: tensor} of a Llama with an untied LM head and no biases; the same seed gives the same
    tensors on the same device."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter = arch.hidden_size, arch.intermediate_size

    def dense(rows, cols):
        return (torch.randn(rows, cols, generator=gen, device=device) * cols ** -0.5).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(h, generator=gen, device=device)).to(dtype)

    w = {"model.embed_tokens.weight": torch.randn(arch.vocab_size, h, generator=gen, device=device).to(dtype),
         "model.norm.weight": norm(), "lm_head.weight": dense(arch.vocab_size, h)}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        w |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
              a + "q_proj.weight": dense(arch.q_size, h), a + "k_proj.weight": dense(arch.kv_size, h),
              a + "v_proj.weight": dense(arch.kv_size, h), a + "o_proj.weight": dense(h, arch.q_size),
              m + "gate_proj.weight": dense(inter, h), m + "up_proj.weight": dense(inter, h),
              m + "down_proj.weight": dense(h, inter)}
    return w
