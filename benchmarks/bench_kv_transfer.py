"""Time and bytes of one request's KV transfer between two agents in this process (UCX; DRAM, or VRAM
with --device cuda).

    python benchmarks/bench_kv_transfer.py [--tokens 128,512,2048] [--repeat 7] [--device cpu|cuda]

Defaults are the embedded model's geometry (SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64)
with block_size 16. Per case it prints median milliseconds of export (ticket + fp8 staging),
pull-to-landed (READ + dequantize/cast) and release (exporter sees the done notification),
and the wire bytes of the request.
"""
import argparse
import json
import statistics
import time
import uuid

import torch

from pdserve.kv_transfer import KVTransferAgent

CASES = (  # (wire, prefill cache dtype, decode cache dtype)
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("fp8", torch.bfloat16, torch.bfloat16),
    ("bf16", torch.float32, torch.bfloat16),
    ("fp8", torch.float32, torch.bfloat16),
)


def _one_request(prefill, decode, request_id, src_ids, dst_ids, num_tokens):
    t0 = time.perf_counter()
    ticket = prefill.export(request_id, src_ids, num_tokens)
    t1 = time.perf_counter()
    handle = decode.pull(ticket, dst_ids)
    while decode.check(handle) == "PENDING":
        pass
    t2 = time.perf_counter()
    if handle.state != "DONE":
        raise RuntimeError(handle.error)
    while not prefill.poll():
        pass
    t3 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, handle.bytes


def run_case(wire, src_dtype, dst_dtype, args, tokens):
    blocks = -(-tokens // args.block_size)
    shape = (args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    src = torch.randn(blocks * 2, *shape, device=args.device).to(src_dtype)
    dst = torch.zeros(blocks * 2, *shape, dtype=dst_dtype, device=args.device)
    tag = uuid.uuid4().hex[:6]
    with KVTransferAgent(f"bench-p-{tag}", src, wire_dtype=wire, staging_blocks=blocks) as prefill, \
            KVTransferAgent(f"bench-d-{tag}", dst, staging_blocks=blocks) as decode:
        src_ids = list(range(0, 2 * blocks, 2))  # non-contiguous, as a real block table is
        dst_ids = list(range(2 * blocks - 1, 0, -2))
        samples = [_one_request(prefill, decode, f"r{i}", src_ids, dst_ids, tokens) for i in range(args.repeat + 1)]
    export, pull, release, nbytes = (statistics.median(col) for col in zip(*samples[1:]))  # first: warm-up
    return {
        "wire": wire, "prefill_cache": str(src_dtype).removeprefix("torch."),
        "decode_cache": str(dst_dtype).removeprefix("torch."), "tokens": tokens, "blocks": blocks,
        "wire_bytes": int(nbytes), "export_ms": round(export, 3), "pull_ms": round(pull, 3),
        "release_ms": round(release, 3), "pull_GBps": round(nbytes / pull / 1e6, 3),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="128,512,2048")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where both KV caches live: cpu (DRAM) or cuda (VRAM)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for wire, src_dtype, dst_dtype in CASES:
            print(json.dumps(run_case(wire, src_dtype, dst_dtype, args, tokens)), flush=True)


if __name__ == "__main__":
    main()
