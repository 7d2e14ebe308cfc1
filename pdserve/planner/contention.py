"""How much slower an engine's step gets on a shared CPU box when k engines step at once (`pdserve profile
--host-contention K`), beyond what a fair split of the cores predicts.

The simulator shares a box's cores among the busy engines by processor sharing (sim.py, `host_cores`): at most
one core each, k / cores slower once there are more engines than cores. Measured on the 2-core box of
2026-12-05, engines lose more than that to each other (memory bandwidth and caches shared, the kernel
switching between them): two engines on two cores each stepped 1.13-1.23x slower than one alone, in three
measurements. This module
measures it: K spawned processes, each an engine of the profiled model (same dtype, same intra-op threads),
and for k = 1..K, k of them step decode batches at once for a few seconds; the median step of each, over
the k, against the median alone. The profile records the slowdowns (`host.contention`); the simulator divides
a busy engine's speed by slowdown(k) / max(1, k / cores) (its own processor sharing already accounts for
the rest).

Decode steps, because they are most of the busy time of the clusters this box runs; a prefill step's
slowdown was not measured separately.
"""
from __future__ import annotations

import os
import random
import statistics
import time
import traceback

from pdserve.planner.procs import reply

BATCH, CONTEXT, NEW_TOKENS = 4, 256, 40


def _engine_process(conn, model, dtype: str, load_format: str, threads: int, seed: int) -> None:
    """One engine; on ("run", seconds): steps decode batches for that long, answers the median step in ms."""
    try:
        import torch

        from pdserve.config import EngineConfig
        from pdserve.engine.engine import LLMEngine
        from pdserve.engine.sequence import SamplingParams

        torch.set_num_threads(threads)
        engine = LLMEngine(model, dtype, EngineConfig(device="cpu", kv_cache_memory_gb=0.25, max_num_seqs=BATCH,
                                                      max_num_batched_tokens=2048),
                           precision="bf16", enable_prefix_caching=True, progress=False, load_format=load_format)
        rng = random.Random(seed)
        vocab = engine.arch.vocab_size
        n = 0

        def round_of_steps(times: list[float] | None) -> None:
            nonlocal n
            prompt = [rng.randrange(100, vocab - 1) for _ in range(CONTEXT)]
            for _ in range(BATCH):
                n += 1
                engine.add_request(f"c{n}", prompt, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
            while engine.has_unfinished():
                t = time.perf_counter()
                engine.step()
                if times is not None:
                    times.append((time.perf_counter() - t) * 1e3)

        round_of_steps(None)  # warm
        conn.send(("ready", os.getpid()))
        while (msg := conn.recv()) is not None:
            times: list[float] = []
            end = time.monotonic() + msg[1]
            while time.monotonic() < end:
                round_of_steps(times)
            conn.send(("median", statistics.median(times)))  # the median leaves out each round's prompt step
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        traceback.print_exc()
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except Exception:
            pass


def measure_host_contention(max_engines: int, model, dtype: str, load_format: str, threads: int,
                            seconds: float = 6.0, passes: int = 2, log=print) -> dict:
    """{engines: [1..K], step_ms: [...], slowdown: [...]}: the median decode step (batch 4, 256-token context)
    when k engine processes step at once, each k measured `passes` times (in turn with the others, so a burst of
    other load spoils one sample, not one k) and the median taken; slowdown = step_ms[k] / step_ms[1]."""
    import torch.multiprocessing as mp

    def answer(i: int, kind: str, timeout: float):
        return reply(conns[i], procs[i], kind, timeout, who=f"contention engine process {i}")[0]

    ctx = mp.get_context("spawn")
    procs, conns = [], []
    try:
        for i in range(max_engines):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_engine_process, args=(child, model, dtype, load_format, threads, 1000 + i),
                            daemon=True)
            p.start()
            procs.append(p)
            conns.append(parent)
        for i in range(max_engines):
            answer(i, "ready", 300)
        samples: dict[int, list[float]] = {k: [] for k in range(1, max_engines + 1)}
        order = list(range(1, max_engines + 1))
        for n in range(passes):
            for k in (order if n % 2 == 0 else order[::-1]):
                for c in conns[:k]:
                    c.send(("run", seconds))
                meds = [answer(i, "median", seconds + 120) for i in range(k)]
                samples[k].append(statistics.median(meds))
                log(f"host contention: {k} engine(s) at once: median step {samples[k][-1]:.1f} ms")
        step = [round(statistics.median(samples[k]), 3) for k in order]
        return {"engines": order, "step_ms": step, "slowdown": [round(s / step[0], 4) for s in step],
                "workload": f"decode batch {BATCH}, context {CONTEXT}, {threads} thread(s) per engine, "
                            f"{seconds:g} s x {passes} passes"}
    finally:
        for c in conns:
            try:
                c.send(None)
            except Exception:
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def excess(contention: dict | None, busy: int, cores: float) -> float:
    """How much slower than processor sharing on `cores` cores an engine steps while `busy` engines step: the
    measured slowdown over max(1, busy / measured-at cores); past the measured k, the last one's. 1 without a
    measurement."""
    if not contention or busy <= 1:
        return 1.0
    ks, slow = contention["engines"], contention["slowdown"]
    k = min(busy, ks[-1])
    s = slow[ks.index(k)] if k in ks else 1.0
    return s / max(1.0, k / contention.get("cores", cores))
