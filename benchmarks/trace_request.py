"""Which of pdserve's source files one gRPC request runs code in, from the router's Generate to its last
streamed token: the count docs/architecture.md quotes.

    python benchmarks/trace_request.py [--max-tokens 4]

The cluster is real but for Ray: a prefill and a decode worker (real engines on the embedded model, real
NIXL agents) in this process, called through stand-ins of Ray's actor handles, behind the real Router.
A first request warms every path up; the second one is traced (sys.setprofile in every thread), and the
files whose functions ran are printed in the order the request first reached them.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

import pdserve

REPO = Path(pdserve.__file__).resolve().parent.parent


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kw):
        return self.fn(*args, **kw)

    def options(self, **_):  # num_returns="streaming": an async iterator of awaitable refs
        return _Streaming(self.fn)


class _Streaming(_Method):
    def remote(self, *args, **kw):
        async def refs():
            async for item in self.fn(*args, **kw):
                ref = asyncio.get_running_loop().create_future()
                ref.set_result(item)
                yield ref
        return refs()


class _Actor:
    """Ray's actor handle as the router uses it, over a worker object in this process."""

    def __init__(self, worker):
        self._worker = worker

    def __getattr__(self, name):
        return _Method(getattr(self._worker, name))


class _Context:
    async def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


async def main(max_tokens: int) -> None:
    from pdserve.config import Config
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.prefill_worker.worker import PrefillWorker
    from pdserve.proto import pb
    from pdserve.router.cluster import Cluster
    from pdserve.router.pool import Worker, WorkerState
    from pdserve.router.server import Router

    config = Config()
    config.model.dtype = "float32"
    config.engine.num_blocks = 64
    workers = [PrefillWorker(config.to_dict(), "prefill-0"), DecodeWorker(config.to_dict(), "decode-0")]
    cluster = Cluster(config)
    for w in workers:
        info = await w.start()
        cluster.pools[w.role].workers[w.name] = Worker(w.name, w.role, _Actor(w), WorkerState.READY, info=info)
    router = Router(config, cluster)

    async def one(prompt: str) -> str:
        req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
        return "".join([r.text async for r in router.Generate(req, _Context())])

    await one("Warm-up: the capital of Italy is")
    seen: dict[str, None] = {}

    def profile(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            if f not in seen and f.startswith(str(REPO)) and not any(
                    part in f for part in ("/tests/", "/benchmarks/", "/.venv/", "/site-packages/")):
                seen[f] = None

    async def in_engine_threads(fn):  # each engine steps in a thread that exists since the warm-up
        for w in workers:
            await asyncio.get_running_loop().run_in_executor(w.aengine._executor, sys.setprofile, fn)

    threading.setprofile(profile)
    sys.setprofile(profile)
    await in_engine_threads(profile)
    try:
        text = await one("The capital of France is")
    finally:
        await in_engine_threads(None)
        sys.setprofile(None)
        threading.setprofile(None)
    for w in workers:
        w.connector.close()
    files = [str(Path(f).relative_to(REPO)) for f in seen]
    print(f"streamed {text!r}")
    print(f"{len(files)} files: " + ", ".join(files))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=4)
    asyncio.run(main(p.parse_args().max_tokens))
