"""KV transfer between two processes on one GPU: our KVTransferAgent (NIXL/UCX READ of VRAM blocks) against
the cross-process CUDA IPC copy of the same bytes, measured in the same run.

    python benchmarks/bench_kv_transfer_ipc.py [--tokens 16,256,2048,8192] [--wire bf16,fp8] [--repeat 5]
        [--placement scattered,adjacent] [--nixl-params num_threads=4,split_batch_size=16]

An exporter process holds a KV cache of Llama-3-8B geometry by default (32 layers, 8 KV heads, head_dim
128, bf16, blocks of 16 tokens: 2 MiB a block) and exports one request per size; this process pulls it into
its own cache. Block placement: `scattered` (every other block on both sides, the worst case: one NIXL
descriptor per block) or `adjacent` (consecutive ids on both sides, as a block manager that hands out freed
blocks in order mostly gives: one descriptor for the whole request). Per size and wire: median ms from pull() to
the blocks landed, GB/s of wire bytes, and the ratio to a device-to-device copy of the same bytes from the
exporter's cache through a CUDA IPC handle (torch.multiprocessing). Raw-wire bytes are checked equal.
UCX reads its settings at start: run once per setting (UCX_* variables override kv_transfer/transport.py's).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.multiprocessing as mp


def _shape(args):
    return (args.layers, 2, args.block_size, args.kv_heads, args.head_dim)


def exporter(args, conn, queue) -> None:
    from pdserve.kv_transfer import KVTransferAgent

    torch.manual_seed(0)
    max_blocks = -(-max(args.tokens) // args.block_size)
    cache = torch.randn(2 * max_blocks, *_shape(args), device=args.device).to(torch.bfloat16)
    queue.put(cache)  # the CUDA IPC ceiling reads this same memory
    agents = {w: KVTransferAgent(f"exp-{w}-{os.getpid()}", cache, wire_dtype=w, lease_seconds=60,
                                 staging_blocks=max_blocks, backend_params=args.nixl_params) for w in args.wire}
    try:
        while (msg := conn.recv()) is not None:
            wire, rid, blocks, tokens = msg
            conn.send(agents[wire].export(rid, blocks, tokens))
            deadline = time.monotonic() + 60
            while not agents[wire].poll():  # the reader's done notification releases the lease
                if time.monotonic() > deadline:
                    raise RuntimeError("no done notification")
                time.sleep(0.0002)
            conn.send("released")
    finally:
        for a in agents.values():
            a.close()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ipc_copy_ms(src: torch.Tensor, blocks: list[int], dst: torch.Tensor, repeat: int) -> float:
    """Median ms of gathering these blocks of the exporter's cache into ours: one kernel that reads and writes
    each byte once, so launch overhead does not hide the copy rate."""
    index = torch.tensor(blocks, device=src.device)
    times = []
    for _ in range(repeat + 1):
        _sync(src.device.type)
        t0 = time.perf_counter()
        torch.index_select(src, 0, index, out=dst)
        _sync(src.device.type)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,256,2048,8192")
    p.add_argument("--wire", default="bf16,fp8")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--placement", default="scattered,adjacent", help="scattered, adjacent or both")
    p.add_argument("--nixl-params", default="", help="extra NIXL UCX backend params, k=v,k=v")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to try the script without a GPU")
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.wire = args.wire.split(",")
    args.placement = args.placement.split(",")
    args.nixl_params = dict(kv.split("=", 1) for kv in args.nixl_params.split(",") if kv)
    from pdserve.kv_transfer import KVTransferAgent

    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    queue = ctx.Queue()
    proc = ctx.Process(target=exporter, args=(args, there, queue), daemon=True)
    proc.start()
    src = queue.get(timeout=300)
    max_blocks = -(-max(args.tokens) // args.block_size)
    cache = torch.zeros(2 * max_blocks, *_shape(args), dtype=torch.bfloat16, device=args.device)
    agent = KVTransferAgent(f"reader-{os.getpid()}", cache, staging_blocks=max_blocks,
                            backend_params=args.nixl_params)
    setting = {k: v for k, v in os.environ.items() if k.startswith("UCX_")}
    try:
        for tokens, placement in [(t, pl) for t in args.tokens for pl in args.placement]:
            n = -(-tokens // args.block_size)
            if placement == "scattered":
                src_blocks, dst_blocks = list(range(0, 2 * n, 2)), list(range(2 * n - 1, 0, -2))
            else:
                src_blocks, dst_blocks = list(range(n)), list(range(n, 2 * n))
            ceiling_ms = ipc_copy_ms(src, src_blocks, torch.empty(n, *_shape(args), dtype=src.dtype,
                                                                  device=args.device), args.repeat)
            for wire in args.wire:
                times, first = [], None
                for i in range(args.repeat + 1):
                    here.send((wire, f"r{tokens}-{wire}-{i}", src_blocks, tokens))
                    ticket = here.recv()
                    t0 = time.perf_counter()
                    handle = agent.pull(ticket, dst_blocks)
                    while (state := agent.check(handle)) == "PENDING":
                        pass
                    ms = (time.perf_counter() - t0) * 1e3
                    if state != "DONE":
                        raise RuntimeError(handle.error)
                    assert here.recv() == "released"
                    first = ms if first is None else first
                    times.append(ms)
                ms = statistics.median(times[1:])
                equal = None
                if wire == "bf16":
                    equal = bool(torch.equal(cache[dst_blocks], src[src_blocks]))
                print(json.dumps({
                    "tokens": tokens, "blocks": n, "placement": placement, "descriptors": handle.descriptors,
                    "wire": wire, "wire_bytes": handle.bytes,
                    "pull_ms": round(ms, 3), "first_pull_ms": round(first, 3),
                    "pull_GBps": round(handle.bytes / ms / 1e6, 2),
                    "ipc_copy_ms": round(ceiling_ms, 3),
                    "ipc_copy_GBps": round(n * src[0].numel() * src.element_size() / ceiling_ms / 1e6, 2),
                    "vs_ipc_copy": round(ceiling_ms / ms, 3), "bytes_equal": equal, "ucx": setting,
                    "nixl_params": args.nixl_params}), flush=True)
    finally:
        here.send(None)
        proc.join(timeout=60)
        agent.close()


if __name__ == "__main__":
    main()
