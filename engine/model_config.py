"""The architecture of a Llama-family checkpoint, read from an HF config.json or GGUF metadata.

Covers Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2/2.5 (QKV bias) and SmolLM2: all are
RMSNorm + RoPE + GQA + SwiGLU decoders that differ only in these fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in (None, "default", "llama3"):
            raise ValueError(f"unsupported rope scaling {self.rope_scaling.get('rope_type')!r} "
                             "(supported: default, llama3)")


def arch_from_hf_config(cfg: dict, generation_cfg: dict | None = None) -> ModelArch:
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = cfg["num_attention_heads"]
    # transformers v5 moved rope settings into rope_parameters; older configs keep rope_theta/rope_scaling
    rope = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type"))
    eos = (generation_cfg or {}).get("eos_token_id", cfg.get("eos_token_id"))
    arch = ModelArch(
        model_type=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_list(eos),
    )
    arch.check()
    return arch


def arch_from_gguf(fields: dict) -> ModelArch:
    """`fields`: GGUF metadata as plain Python values (key -> value)."""
    a = fields["general.architecture"]
    if a not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported GGUF architecture {a!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    heads = fields[f"{a}.attention.head_count"]
    hidden = fields[f"{a}.embedding_length"]
    scaling = None
    if fields.get(f"{a}.rope.scaling.type") == "llama3" or f"{a}.rope.scaling.low_freq_factor" in fields:
        scaling = {
            "rope_type": "llama3",
            "factor": fields[f"{a}.rope.scaling.factor"],
            "low_freq_factor": fields.get(f"{a}.rope.scaling.low_freq_factor", 1.0),
            "high_freq_factor": fields.get(f"{a}.rope.scaling.high_freq_factor", 4.0),
            "original_max_position_embeddings": fields[f"{a}.rope.scaling.original_context_length"],
        }
    vocab = fields.get(f"{a}.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    arch = ModelArch(
        model_type=a,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=fields[f"{a}.feed_forward_length"],
        num_layers=fields[f"{a}.block_count"],
        num_heads=heads,
        num_kv_heads=fields.get(f"{a}.attention.head_count_kv", heads),
        head_dim=fields.get(f"{a}.attention.key_length", hidden // heads),
        rms_norm_eps=float(fields[f"{a}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(fields.get(f"{a}.rope.freq_base", 10000.0)),
        max_position_embeddings=fields.get(f"{a}.context_length", 4096),
        tie_word_embeddings=True,  # corrected by the loader when output.weight exists
        qkv_bias=a == "qwen2",
        rope_scaling=scaling,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_as_list(fields.get("tokenizer.ggml.eos_token_id")),
    )
    arch.check()
    return arch


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [int(v)]
