"""FP8 KV wire pack and unpack: the Triton kernels (kernels/kv_wire.py) vs the torch reference path
(kv_transfer/fp8_wire.py), in GB/s, beside a device-to-device copy of the same blocks as the ceiling.

    python benchmarks/bench_kv_wire.py [--json out.json] [--block-r 16,32,64] [--num-warps 4,8]

Default geometry: one 2K-token request of Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16 cache,
blocks of 16 tokens: 128 blocks, 256 MiB of KV, 132 MiB on the wire), its blocks every other block of a
cache twice that size (a block table is not contiguous), the last block partial (--tokens 2040).
  pack:   triton  kv_wire.pack_fp8(cache, ids, ...)       reads the blocks by id, writes staging rows
          torch   pack_fp8_blocks(cache[ids], ...)          gather, then quantize
  unpack: triton  kv_wire.unpack_fp8(wire, cache, ids)    writes the dequantized blocks by id
          torch   cache.index_copy_(0, ids, unpack_fp8_blocks(wire, ...))
  copy:   dst.copy_(src) over the request's cache bytes (the bandwidth ceiling, measured in this run)
GB/s counts the bytes a pass must move: cache bytes of the blocks + their wire bytes (copy: 2x the cache
bytes). Before timing, each Triton output is compared byte for byte with the torch path's.
Timing: CUDA events around each call, warm-up first, median of --repeat calls. On CPU (a logic check of
this script, not a measurement) run with TRITON_INTERPRET=1 and tiny shapes:

    TRITON_INTERPRET=1 python benchmarks/bench_kv_wire.py --device cpu --tokens 10 --layers 2 \\
        --kv-heads 2 --head-dim 16 --block-size 4 --repeat 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from pdserve.kv_transfer.fp8_wire import FP8_KV_EPS, fp8_block_bytes, pack_fp8_blocks, unpack_fp8_blocks

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def time_ms(fn, device, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def run(args) -> dict:
    from pdserve.kernels import kv_wire

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    n = -(-args.tokens // args.block_size)
    block_shape = (args.layers, 2, args.block_size, args.kv_heads, args.head_dim)
    block_bytes = torch.Size(block_shape).numel() * dtype.itemsize
    wire_bytes = fp8_block_bytes(block_shape)
    gen = torch.Generator(device=device).manual_seed(0)
    cache = torch.randn((2 * n, *block_shape), generator=gen, device=device, dtype=torch.float32).to(dtype)
    ids = torch.arange(0, 2 * n, 2, device=device)
    dst_ids = torch.arange(2 * n - 1, 0, -2, device=device)
    out, ref_out = (torch.empty(n, wire_bytes, dtype=torch.uint8, device=device) for _ in range(2))
    dst, ref_dst = (torch.full_like(cache, float("nan")) for _ in range(2))
    copy_src = cache[:n].clone()
    copy_dst = torch.empty_like(copy_src)

    def pack_torch():
        pack_fp8_blocks(cache[ids], args.tokens, ref_out)

    def unpack_torch():
        ref_dst.index_copy_(0, dst_ids, unpack_fp8_blocks(ref_out, block_shape, dtype))

    def pack_triton(block_r, num_warps):
        return lambda: kv_wire.pack_fp8(cache, ids, args.tokens, out, FP8_KV_EPS, block_r=block_r, num_warps=num_warps)

    def unpack_triton(block_r, num_warps):
        return lambda: kv_wire.unpack_fp8(ref_out, dst, dst_ids, block_r=block_r, num_warps=num_warps)

    moved = n * (block_bytes + wire_bytes)
    rows = []

    def record(op, path, fn, nbytes, **config):
        ms = time_ms(fn, device, args.repeat)
        rows.append({"op": op, "path": path, **config, "ms": round(ms, 4), "GBps": round(nbytes / ms / 1e6, 2)})

    record("copy", "torch", lambda: copy_dst.copy_(copy_src), 2 * n * block_bytes)
    record("pack", "torch", pack_torch, moved)
    record("unpack", "torch", unpack_torch, moved)
    exact = {}
    for block_r in args.block_r:
        for num_warps in args.num_warps:
            config = {"block_r": block_r, "num_warps": num_warps}
            out.fill_(0xFF)
            dst.fill_(float("nan"))
            pack_triton(block_r, num_warps)()
            unpack_triton(block_r, num_warps)()
            key = f"block_r={block_r},num_warps={num_warps}"
            exact[key] = {"pack": torch.equal(out, ref_out),
                          "unpack": torch.equal(dst.view(torch.uint8), ref_dst.view(torch.uint8))}
            record("pack", "triton", pack_triton(block_r, num_warps), moved, **config)
            record("unpack", "triton", unpack_triton(block_r, num_warps), moved, **config)
    ceiling = rows[0]["GBps"]
    for row in rows:
        row["of_copy"] = round(row["GBps"] / ceiling, 3)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
        "torch": torch.__version__, "triton": _triton_version(),
        "geometry": {"tokens": args.tokens, "blocks": n, "layers": args.layers, "kv_heads": args.kv_heads,
                     "head_dim": args.head_dim, "block_size": args.block_size, "dtype": args.dtype},
        "bytes": {"cache_per_block": block_bytes, "wire_per_block": wire_bytes, "moved_per_pass": moved},
        "repeat": args.repeat, "byte_exact_vs_torch": exact, "results": rows,
    }


def _triton_version():
    import triton
    return triton.__version__


def _ints(text: str) -> list:
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2040, help="request length (last block partial by default)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--block-r", type=_ints, default=[16, 32, 64], help="rows (of head_dim) per program")
    parser.add_argument("--num-warps", type=_ints, default=[4, 8])
    parser.add_argument("--json", help="write the results as JSON to this path ('-': stdout)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
    if os.environ.get("TRITON_INTERPRET") == "1":
        from pdserve.testing.kernel_cases import patch_interpreter_for_numpy2
        patch_interpreter_for_numpy2()
    result = run(args)
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        g = result["geometry"]
        sizes = result["bytes"]
        print(f"{result['device']}: {g['tokens']} tokens = {g['blocks']} blocks of {sizes['cache_per_block']} B "
              f"({g['dtype']}), {sizes['wire_per_block']} B on the wire")
        for row in result["results"]:
            config = "".join(f" {k}={row[k]}" for k in ("block_r", "num_warps") if k in row)
            print(f"  {row['op']:6s} {row['path']:6s}{config:24s} {row['ms']:9.4f} ms {row['GBps']:9.2f} GB/s "
                  f"({row['of_copy']:.2f} of copy)")
        bad = [k for k, v in result["byte_exact_vs_torch"].items() if not all(v.values())]
        print("byte-exact vs torch:", "all configs" if not bad else f"NOT for {bad}")
    if any(not all(v.values()) for v in result["byte_exact_vs_torch"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
