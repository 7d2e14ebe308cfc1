"""KV transfer between two processes, on one GPU or across two: our KVTransferAgent (NIXL/UCX READ of VRAM
blocks) against a copy of the same bytes by the hardware, measured in the same run.

    python benchmarks/bench_kv_transfer_ipc.py [--tokens 16,256,2048,8192] [--wire bf16,fp8] [--repeat 5]
        [--placement scattered,adjacent] [--nixl-params num_threads=4,split_batch_size=16]
        [--devices 0 | --devices 0,1 [--visible all|isolated]]

An exporter process holds a KV cache of Llama-3-8B geometry by default (32 layers, 8 KV heads, head_dim
128, bf16, blocks of 16 tokens: 2 MiB a block) and exports one request per size; this process pulls it into
its own cache. Block placement: `scattered` (every other block on both sides, the worst case: one NIXL
descriptor per block) or `adjacent` (consecutive ids on both sides, as a block manager that hands out freed
blocks in order mostly gives: one descriptor for the whole request). Per size and wire: median ms from pull() to
the blocks landed, GB/s of wire bytes, and the ratio to a device-to-device copy of the same bytes from the
exporter's cache through a CUDA IPC handle (torch.multiprocessing). Raw-wire bytes are checked equal.
UCX reads its settings at start: run once per setting (UCX_* variables override kv_transfer/transport.py's).

Two devices (`--devices 0,1`): the exporter holds its cache on the first, this process pulls into the second,
as a prefill worker on GPU 0 and a decode worker on GPU 1 do. The ceiling is then the peer-to-peer copy
(NVLink) of the same number of bytes, one contiguous cudaMemcpyPeer measured by a third process that sees both
devices. `--visible isolated` gives each of the two processes only its own GPU in CUDA_VISIBLE_DEVICES, as Ray
does for its GPU actors: UCX's cuda_ipc must then open a handle of a device the process cannot see.
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
    cache = torch.randn(2 * max_blocks, *_shape(args), device=args.src_device).to(torch.bfloat16)
    queue.put(cache if not args.cross else None)  # one GPU: the CUDA IPC ceiling reads this same memory
    agents = {w: KVTransferAgent(f"exp-{w}-{os.getpid()}", cache, wire_dtype=w, lease_seconds=60,
                                 staging_blocks=max_blocks, backend_params=args.nixl_params) for w in args.wire}
    try:
        while (msg := conn.recv()) is not None:
            if msg[0] == "checksum":
                conn.send(_checksum(cache[msg[1]]))
                continue
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


def _checksum(blocks: torch.Tensor) -> tuple:
    """Sum and a position-weighted sum of the blocks' raw bits: equal bytes on both sides, in order."""
    bits = blocks.contiguous().view(torch.int16).to(torch.int64).flatten()
    weights = torch.arange(1, bits.numel() + 1, device=bits.device, dtype=torch.int64) % 65521
    return int(bits.sum()), int((bits * weights).sum())


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


def p2p_copy(args, sizes: list[int], queue) -> None:
    """{bytes: median ms} of one contiguous device-to-device copy between the two GPUs (peer access on)."""
    a, b = (torch.device("cuda", d) for d in args.devices)
    out = {}
    for nbytes in sizes:
        src = torch.empty(nbytes, dtype=torch.uint8, device=a)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=b)
        times = []
        for _ in range(args.repeat + 1):
            torch.cuda.synchronize(a)
            torch.cuda.synchronize(b)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(a)
            torch.cuda.synchronize(b)
            times.append((time.perf_counter() - t0) * 1e3)
        out[nbytes] = statistics.median(times[1:])
    queue.put(out)


def _spawn(ctx, target, args, visible: str | None):
    """Start a process with CUDA_VISIBLE_DEVICES as given (None: this process's own)."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
    finally:
        if visible is not None:
            if before is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before
    return proc


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
    p.add_argument("--devices", default="0", help="the exporter's GPU and ours: 0 (one GPU) or 0,1")
    p.add_argument("--visible", default="all", choices=("all", "isolated"),
                   help="two GPUs: both visible to both processes, or each only its own (as under Ray)")
    args = p.parse_args()
    args.devices = [int(d) for d in args.devices.split(",")]
    args.cross = len(set(args.devices)) == 2 and args.device == "cuda"
    args.src_device = args.dst_device = args.device
    if args.device == "cuda":
        args.src_device, args.dst_device = (f"cuda:{d}" for d in (args.devices + args.devices)[:2])
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.wire = args.wire.split(",")
    args.placement = args.placement.split(",")
    args.nixl_params = dict(kv.split("=", 1) for kv in args.nixl_params.split(",") if kv)
    from pdserve.kv_transfer import KVTransferAgent

    ctx = mp.get_context("spawn")
    block_bytes = 2 * args.layers * args.block_size * args.kv_heads * args.head_dim * 2
    p2p = None
    if args.cross:  # the ceiling first, in a process that sees both GPUs, before either side allocates
        queue = ctx.Queue()
        _spawn(ctx, p2p_copy, (args, [-(-t // args.block_size) * block_bytes for t in args.tokens], queue),
               ",".join(map(str, args.devices)) if args.visible == "isolated" else None).join(timeout=300)
        p2p = queue.get(timeout=10)
    if args.cross and args.visible == "isolated":  # each side sees only its GPU, as cuda:0
        args.src_device = args.dst_device = "cuda:0"
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.devices[1])  # ours; CUDA is not initialised here yet
    here, there = ctx.Pipe()
    queue = ctx.Queue()
    proc = _spawn(ctx, exporter, (args, there, queue),
                  str(args.devices[0]) if args.cross and args.visible == "isolated" else None)
    src = queue.get(timeout=300)
    max_blocks = -(-max(args.tokens) // args.block_size)
    cache = torch.zeros(2 * max_blocks, *_shape(args), dtype=torch.bfloat16, device=args.dst_device)
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
            if p2p is not None:
                ceiling_ms = p2p[n * block_bytes]
            else:
                ceiling_ms = ipc_copy_ms(src, src_blocks, torch.empty(n, *_shape(args), dtype=src.dtype,
                                                                      device=args.dst_device), args.repeat)
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
                if wire == "bf16" and src is not None:
                    equal = bool(torch.equal(cache[dst_blocks], src[src_blocks]))
                elif wire == "bf16":  # two GPUs: the exporter's cache is torch.randn(seed 0) on its device
                    here.send(("checksum", src_blocks))
                    equal = here.recv() == _checksum(cache[dst_blocks])
                print(json.dumps({
                    "tokens": tokens, "blocks": n, "placement": placement, "descriptors": handle.descriptors,
                    "wire": wire, "wire_bytes": handle.bytes,
                    "pull_ms": round(ms, 3), "first_pull_ms": round(first, 3),
                    "pull_GBps": round(handle.bytes / ms / 1e6, 2),
                    "ceiling": "p2p_copy" if p2p is not None else "ipc_copy",
                    "devices": args.devices if args.cross else args.devices[:1],
                    "visible": args.visible if args.cross else None,
                    "ipc_copy_ms": round(ceiling_ms, 3),
                    "ipc_copy_GBps": round(n * block_bytes / ceiling_ms / 1e6, 2),
                    "vs_ipc_copy": round(ceiling_ms / ms, 3), "bytes_equal": equal, "ucx": setting,
                    "nixl_params": args.nixl_params}), flush=True)
    finally:
        here.send(None)
        proc.join(timeout=60)
        agent.close()


if __name__ == "__main__":
    main()
