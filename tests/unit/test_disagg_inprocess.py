"""Prefill -> NIXL -> decode with real engines and real NIXL agents in one process: the FP8 wire
format's accuracy (teacher-forced), the decode side's attention-sink refresh, and the lease that
frees blocks nobody pulls."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from dataclasses import replace

from pdserve.engine.kv_connector import RemoteKV
from pdserve.engine.sequence import SamplingParams
from pdserve.kv_transfer.local import PromptKV, through_wire
from pdserve.testing.exactness import PROMPTS
from pdserve.testing.kv import local_connector


@pytest.fixture(scope="module")
def prefill_engine():
    from pdserve.engine.engine import LLMEngine

    return LLMEngine(dtype="float32", progress=False)


def _transfer_and_score(pre, dec, wire, ids_full, n_prompt, tag, refresh=0):
    """Prefill on `pre`, KV over NIXL into `dec` through both engines' KV connectors (as the workers run
    it), teacher-forced logits of `dec`; returns them, the bytes that crossed, and how the send ended."""
    from pdserve.kv_transfer.connector import NixlConnector

    c_p = NixlConnector(f"p-{tag}", pre.runner.kv_cache, wire, lease_seconds=30, staging_blocks=16)
    c_d = NixlConnector(f"d-{tag}", dec.runner.kv_cache, wire, lease_seconds=30, staging_blocks=16)
    pre.connector, dec.connector = c_p, c_d
    try:
        kv = pre.prefill(ids_full[:n_prompt], "r")
        assert kv.num_tokens == n_prompt - 1
        logits = dec.score(ids_full, remote_kv=replace(kv, refresh_tokens=refresh))
        deadline = time.time() + 10
        while pre.has_transfers():  # the exporter frees its blocks once it sees the READ done
            pre.step()
            assert time.time() < deadline
        return logits, c_d.stats()["bytes_received"], c_p.stats()["released"]
    finally:
        pre.connector = dec.connector = None
        c_p.close()
        c_d.close()


def test_fp8_wire_teacher_forced_agreement(engine_f32, prefill_engine):
    from pdserve.decode_worker.worker import sink_refresh_tokens
    from pdserve.config import KVTransferConfig

    dec, pre = engine_f32, prefill_engine
    sinks = KVTransferConfig().refresh_sink_tokens
    # what a decode worker does: equal precisions, so only the fp8 wire gets the refresh
    runs = {(w, r): sink_refresh_tokens(r, w, pre.precision, dec.precision)
            for w, r in (("bf16", sinks), ("fp8", 0), ("fp8", sinks))}
    assert runs == {("bf16", sinks): 0, ("fp8", 0): 0, ("fp8", sinks): sinks}
    prompts = [dec.tokenize(p, chat=c) for p, c in PROMPTS]
    conts = dec.generate([(p, SamplingParams(max_tokens=32, ignore_eos=True)) for p in prompts])
    stats = {}
    for (wire, _), refresh in runs.items():
        agree = total = 0
        kl_sum = 0.0
        gaps = []
        moved_total = 0
        for i, (p, c) in enumerate(zip(prompts, conts)):
            full = p + c["token_ids"]
            ref = dec.score(full)[len(p) - 1:-1]  # rows predicting the continuation
            got, moved, released = _transfer_and_score(pre, dec, wire, full, len(p), f"{wire}{refresh}-{i}", refresh)
            got = got[:-1]
            assert released["done"] == 1 and sum(released.values()) == 1
            lp_ref, lp_got = ref.log_softmax(-1), got.log_softmax(-1)
            kl_sum += (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).sum().item()
            same = got.argmax(-1) == ref.argmax(-1)
            agree += same.sum().item()
            top2 = ref.topk(2, dim=-1).values
            gaps += (top2[~same, 0] - top2[~same, 1]).tolist()
            total += ref.shape[0]
            moved_total += moved
        stats[wire, refresh] = (kl_sum / total, agree / total, moved_total, gaps)
    raw, fp8, fp8_sinks = stats["bf16", 0], stats["fp8", 0], stats["fp8", sinks]
    print(f"\nteacher-forced vs unquantized KV, {total} tokens: "
          f"raw wire KL {raw[0]:.2e} top-1 {raw[1]:.4f} ({raw[2]} bytes); "
          f"fp8 wire KL {fp8[0]:.2e} top-1 {fp8[1]:.4f} ({fp8[2]} bytes); "
          f"fp8 wire + {sinks} sink tokens refreshed KL {fp8_sinks[0]:.2e} top-1 {fp8_sinks[1]:.4f}")
    # the raw wire is lossless: what remains is float32 rounding from computing the prompt on one engine and the
    # continuation on the other (against one pass), ~1e-9 and dependent on the CPU's kernels (1.2e-9 on an AMD
    # EPYC box); the fp8 wire's is ~1e-3
    assert raw[1] == 1.0 and raw[0] < 1e-7
    for name, st in (("fp8", fp8), ("fp8 + sink refresh", fp8_sinks)):
        print(f"{name} disagreements: {len(st[3])} of {total}, reference top-2 logit gaps there: "
              f"{sorted(round(g, 3) for g in st[3])}")
    # Measured 2026-11-22 (issue 3 asks for >= 99%): without the refresh 97.9% (8/384, KL 7.9e-4),
    # with it 99.2% (3/384, KL 3.9e-4); every flip at a near-tie of the unquantized path (top-2
    # logit gap <= 0.19 without, <= 0.031 with).
    assert fp8_sinks[1] >= 0.99 and fp8_sinks[0] < fp8[0]
    assert fp8[1] >= 0.97
    assert all(g < 0.25 for g in fp8[3] + fp8_sinks[3]), "an fp8 flip where the reference was not a near-tie"
    assert fp8[2] < raw[2] / 3 and fp8_sinks[2] == fp8[2]  # e4m3 + fp32 scales vs float32 codes; same bytes
    dec.block_manager.check_no_leaks()
    pre.block_manager.check_no_leaks()


@pytest.mark.parametrize("value, why", [(-1, "expected an integer >= 0"), (1.5, "expected an integer"),
                                        (True, "expected an integer"), ("4", "expected an integer")])
def test_refresh_sink_tokens_config_is_validated(value, why):
    from pdserve.config import ConfigError, load_config

    assert load_config(None, {"kv_transfer.refresh_sink_tokens": 0}).kv_transfer.refresh_sink_tokens == 0
    with pytest.raises(ConfigError, match=f"kv_transfer.refresh_sink_tokens: {why}"):
        load_config(None, {"kv_transfer.refresh_sink_tokens": value})


def test_sink_refresh_only_where_the_kv_is_not_decodes_own():
    from pdserve.decode_worker.worker import sink_refresh_tokens

    assert sink_refresh_tokens(4, "bf16", "bf16", "bf16") == 0  # raw wire, same precision: its own bits
    assert sink_refresh_tokens(4, "fp8", "bf16", "bf16") == 4
    assert sink_refresh_tokens(4, "bf16", "nvfp4", "bf16") == 4  # phase-aware: sinks at decode precision
    assert sink_refresh_tokens(0, "fp8", "fp8", "bf16") == 0


def _token_kv(engine, table: list[int], n: int) -> torch.Tensor:
    """KV of a sequence's first n tokens in `engine`'s cache: [n, layers, 2, kv_heads, head_dim]."""
    bs = engine.config.block_size
    return torch.stack([engine.runner.kv_cache[table[t // bs], :, :, t % bs] for t in range(n)])


def test_sink_refresh_rewrites_exactly_the_first_tokens(engine_f32):
    """The refresh leaves in slots 0..W-1 what a plain local prefill computes, keeps every other
    slot as it arrived, runs once (in the request's first step), clamps W to the tokens that
    arrived, and leaks no block."""
    with local_connector(engine_f32, "fp8") as conn:
        _sink_refresh_rewrites_exactly_the_first_tokens(engine_f32, conn)


def _sink_refresh_rewrites_exactly_the_first_tokens(eng, conn):
    W = 4
    ids = eng.tokenize("The three primary colors are red, yellow and blue; the secondary ones are")
    n = len(ids) - 1
    local = eng.prefill(ids)  # this engine's own KV of the prompt, one pass
    kv = conn.wire.get(local.handle)
    exact = kv.blocks.permute(0, 3, 1, 2, 4, 5).flatten(0, 1)[:n]  # [n, L, 2, H, D]
    arrived = through_wire(kv, "fp8", eng.runner.kv_cache.dtype).permute(0, 3, 1, 2, 4, 5).flatten(0, 1)
    assert (arrived[:W] - exact[:W]).abs().max() > 1e-3  # the wire's error is there to undo

    seq = eng.add_request("sinks", ids, SamplingParams(max_tokens=3, ignore_eos=True),
                          remote_kv=replace(local, refresh_tokens=W))
    assert seq.num_refresh_tokens == W
    eng.step()  # lands the KV through the fp8 wire, then the request's first step
    got = _token_kv(eng, seq.block_table, len(arrived))
    assert seq.num_refresh_tokens == 0 and seq.num_computed_tokens == n + 1
    # the local prefill's numbers up to float32 rounding (~1e-6 of the largest value: other matmul
    # shapes), where the wire was off by ~3% of it
    assert (got[:W] - exact[:W]).abs().max() < 1e-5 * exact[:W].abs().max()
    assert torch.equal(got[W:n], arrived[W:n])  # the rest is what arrived
    assert torch.equal(got[n + 1:], arrived[n + 1:])  # past the recomputed last prompt token: untouched
    # once: sinks put back to the wire's values stay so through the next step
    bs = eng.config.block_size
    for t in range(W):
        eng.runner.kv_cache[seq.block_table[t // bs], :, :, t % bs] = arrived[t]
    eng.step()
    assert torch.equal(_token_kv(eng, seq.block_table, W), arrived[:W])
    assert eng.abort("sinks")

    # W past the prompt: clamped to the n tokens that arrived. With every arrived slot NaN, only a
    # refresh of all of them (written in each layer before attention reads) gives finite logits.
    short = eng.tokenize("Paris is")
    m = len(short) - 1
    kv = conn.wire.get(eng.prefill(short).handle)
    ref = eng.score(short)[-1:]
    poisoned = RemoteKV(conn.wire.put(PromptKV(torch.full_like(kv.blocks, float("nan")), m)), m, m + 8)
    logits = eng.score(short, remote_kv=poisoned)
    assert torch.isfinite(logits).all() and (logits - ref).abs().max() < 1e-4
    seq = eng.add_request("short", short, SamplingParams(max_tokens=1), remote_kv=poisoned)
    assert seq.num_refresh_tokens == m
    (out,) = eng.step()
    assert out.finished and out.new_token_ids == [int(ref.argmax())]
    eng.block_manager.check_no_leaks()


def test_sink_refresh_survives_preemption():
    """Requests admitted with transferred KV and a pending refresh, in a pool too small for all of
    them: preempted ones recompute everything locally (no refresh left over), all finish with the
    local engine's tokens (or a near-tie away), and every block is free afterwards."""
    from pdserve.config import EngineConfig
    from pdserve.engine.engine import LLMEngine
    from pdserve.kv_transfer.local import LocalConnector, LocalWire
    from pdserve.testing.exactness import assert_same_or_near_tie

    # 4 blocks of 16 = 64 tokens for three sequences that each grow to ~24: someone must yield
    e = LLMEngine(dtype="float32", config=EngineConfig(num_blocks=4, max_num_batched_tokens=64), progress=False)
    prompts = [e.tokenize(p) for p in ["Alpha beta gamma delta", "Red green blue", "North south east west"]]
    sp = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=2)
    alone = [e.generate([(p, sp)])[0] for p in prompts]
    e.connector = LocalConnector(e.runner.kv_cache, LocalWire())
    kvs = [e.prefill(p) for p in prompts]
    seqs = [e.add_request(f"r{i}", p, sp, remote_kv=replace(kv, refresh_tokens=4)) for i, (p, kv) in
            enumerate(zip(prompts, kvs))]
    out = {s.request_id: [] for s in seqs}
    while e.has_unfinished():
        for o in e.step():
            out[o.request_id] += o.new_token_ids
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.num_refresh_tokens == 0 for s in seqs)
    assert_same_or_near_tie(alone, [{"token_ids": out[f"r{i}"]} for i in range(3)], "refreshed and preempted")
    e.block_manager.check_no_leaks()


def test_decode_worker_refreshes_the_sinks_of_fp8_wire_kv(engine_f32):
    """A prefill and a decode worker (real engines, real NIXL agents) with the fp8 wire: the decode
    worker recomputes 1 + 4 tokens in the request's first step, and its greedy tokens are the ones
    `pdserve eval`'s handoff produces for the same configuration (same bytes, same refresh)."""
    from pdserve.config import Config
    from pdserve.decode_worker.worker import DecodeWorker
    from pdserve.prefill_worker.worker import PrefillWorker

    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.engine.num_blocks = 64
    cfg.kv_transfer.dtype = "fp8"
    ids = engine_f32.tokenize("Explain in one sentence what a CPU does.", chat=True)
    max_tokens = 12

    async def run():
        p, d = PrefillWorker(cfg.to_dict(), "refresh-p"), DecodeWorker(cfg.to_dict(), "refresh-d")
        await p.start()
        await d.start()
        try:
            res = await p.prefill("r", ids)
            assert res.precision == d.engine.precision == "bf16"
            before = d.engine.num_computed_tokens_total
            out, channel = [], d.outputs()  # the router's end of the decode worker's token channel
            call = asyncio.ensure_future(d.generate("r", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                                    res))
            while not out or not last.finished:
                for rid, last in await channel.__anext__():
                    assert rid == "r"
                    out += last.token_ids
            assert await call is True
            await channel.aclose()
            for _ in range(200):  # the prefill side releases once its engine loop polls the READ done
                if p.engine.block_manager.num_free == p.engine.block_manager.num_blocks:
                    break
                await asyncio.sleep(0.01)
            p.engine.block_manager.check_no_leaks()
            d.engine.block_manager.check_no_leaks()
            # the last prompt token + the 4 sinks in the first step, then one token per step
            return out, d.engine.num_computed_tokens_total - before
        finally:
            p.connector.close()
            d.connector.close()

    out, computed = asyncio.run(run())
    assert computed == 1 + 4 + (max_tokens - 1)
    with local_connector(engine_f32, "fp8"):  # the same handoff in one process, as `pdserve eval` runs it
        kv = engine_f32.prefill(ids)
        engine_f32.add_request("expected", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                               remote_kv=replace(kv, refresh_tokens=4))
        expected = []
        while engine_f32.has_unfinished():
            expected += [t for o in engine_f32.step() for t in o.new_token_ids]
    assert out == expected and len(out) == max_tokens


def test_lease_expires_when_nobody_pulls(tmp_path):
    from pdserve.config import Config
    from pdserve.prefill_worker.worker import PrefillWorker

    cfg = Config()
    cfg.model.dtype = "float32"
    cfg.engine.num_blocks = 64
    cfg.kv_transfer.lease_seconds = 1.0

    async def run():
        w = PrefillWorker(cfg.to_dict(), "lease-test")
        await w.start()
        ids = w.engine.tokenize("A prompt whose KV nobody will ever pull, long enough to fill two blocks of KV.")
        res = await w.prefill("never-pulled", ids)
        assert res.ticket is not None and res.num_tokens == len(ids) - 1
        bm = w.engine.block_manager
        assert bm.num_free < bm.num_blocks  # leased
        await asyncio.sleep(1.8)  # the engine loop polls the connector while a send is in flight
        assert bm.num_free == bm.num_blocks
        st = w.connector.stats()
        assert st["released"]["expired"] == 1 and st["active_leases"] == 0
        # abort after export cancels the lease; the engine frees the blocks at its next poll
        res = await w.prefill("aborted", ids)
        assert await w.abort("aborted")
        for _ in range(100):
            if bm.num_free == bm.num_blocks:
                break
            await asyncio.sleep(0.01)
        assert bm.num_free == bm.num_blocks
        assert w.connector.stats()["released"]["cancelled"] == 1
        assert "never-pulled" not in w.engine.requests and "aborted" not in w.engine.requests
        assert not w.engine.has_transfers()
        w.connector.close()

    asyncio.run(run())
