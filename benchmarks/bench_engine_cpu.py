"""Engine throughput on the CPU against transformers' batched `generate`, in one run.

Output tokens/s for 1 and 16 concurrent sequences, 128-token prompts, 128 new tokens (greedy,
EOS ignored so every sequence makes exactly 128), float32, the embedded model.

    .venv/bin/python benchmarks/bench_engine_cpu.py --out docs/bench/engine_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
        "knowledge travelled across Europe. Scholars, merchants and clergy argued about what should be printed, "
        "who could afford books, and how quickly ideas would spread from one city to the next. ")


def prompts(tok, n: int, length: int) -> list[list[int]]:
    ids = tok.encode(TEXT * 40)
    return [ids[i * 7:i * 7 + length] for i in range(n)]


def ours(engine, batch, new):
    from pdserve.engine.sequence import SamplingParams

    t = time.perf_counter()
    out = engine.generate([(p, SamplingParams(max_tokens=new, ignore_eos=True)) for p in batch])
    dt = time.perf_counter() - t
    assert all(len(o["token_ids"]) == new for o in out)
    return len(batch) * new / dt


def theirs(model, batch, new):
    x = torch.tensor(batch)
    t = time.perf_counter()
    with torch.inference_mode():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=2)
    dt = time.perf_counter() - t
    assert y.shape[1] == x.shape[1] + new
    return len(batch) * new / dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.loader import default_model_path

    engine = LLMEngine(dtype="float32", progress=False)
    d, f = os.path.split(default_model_path())
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    ps = prompts(engine.tokenizer, 16, 128)
    ours(engine, ps[:2], 4), theirs(hf, ps[:2], 4)  # warm-up
    rows = []
    for n in (1, 16):
        a = [ours(engine, ps[:n], args.new_tokens) for _ in range(args.repeats)]
        b = [theirs(hf, ps[:n], args.new_tokens) for _ in range(args.repeats)]
        row = {"concurrency": n, "pdserve_tok_s": statistics.median(a), "transformers_tok_s": statistics.median(b),
               "pdserve_runs": a, "transformers_runs": b}
        row["ratio"] = row["pdserve_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(f"concurrency {n:2d}: pdserve {row['pdserve_tok_s']:7.1f} tok/s, transformers "
              f"{row['transformers_tok_s']:7.1f} tok/s, ratio {row['ratio']:.2f}x", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
