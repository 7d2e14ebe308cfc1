"""Host time of streaming detokenization per output token: the byte-level table against the windowed decoding
it replaced (two tokenizer.decode calls per token), on the embedded tokenizer, over the same token stream.

    python benchmarks/bench_detokenizer.py [--tokens 20000] [--batch 32]

The stream is English prose with multi-byte text mixed in (eval_text's Alice, or a built-in sample), fed one
token at a time to `--batch` detokenizers in turn, as an engine step does for its batch.
"""
from __future__ import annotations

import argparse
import json
import time

SAMPLE = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
          "do — once or twice she had peeped into the book her sister was reading. Grüße aus Köln 🌍, "
          "日本語のテキスト, naïve café 👩‍👩‍👧. ")


def run(tok, ids: list[int], batch: int) -> float:
    from pdserve.engine.detokenizer import IncrementalDetokenizer

    dets = [IncrementalDetokenizer(tok, []) for _ in range(batch)]
    per = len(ids) // batch
    t0 = time.perf_counter()
    for step in range(per):
        for b, d in enumerate(dets):
            d.add([ids[b * per + step]])
    for d in dets:
        d.flush()
    return (time.perf_counter() - t0) / (per * batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=20000)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    from pdserve.engine.tokenizer import Tokenizer

    tok = Tokenizer(None)
    ids = []
    while len(ids) < args.tokens:
        ids += tok.hf.encode(SAMPLE, add_special_tokens=False)
    ids = ids[:args.tokens]
    t0 = time.perf_counter()
    assert tok.token_bytes is not None
    table_s = time.perf_counter() - t0

    class Windowed:
        hf, token_bytes = tok.hf, None
        decode = staticmethod(tok.decode)

    windowed = run(Windowed(), ids, args.batch)
    byte = run(tok, ids, args.batch)
    print(json.dumps({"tokens": len(ids), "batch": args.batch, "windowed_us_per_token": round(windowed * 1e6, 2),
                      "byte_table_us_per_token": round(byte * 1e6, 2), "speedup": round(windowed / byte, 1),
                      "table_build_ms": round(table_s * 1e3, 1), "vocab": len(tok.hf)}))


if __name__ == "__main__":
    main()
