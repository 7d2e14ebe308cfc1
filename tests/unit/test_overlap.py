"""Overlap scheduling (engine/engine.py): the same outputs as the synchronous engine, no block leaks, no
placeholder ever fed to the model, frees held back while a step is in flight, and step N+1 really launched
before step N's host half.

Every workload runs twice on one engine, overlap off then on (the switch may change between steps), on the
CPU, where the path runs as on CUDA but with nothing asynchronous underneath.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from pdserve.config import ConfigError, EngineConfig, load_config
from pdserve.engine.detokenizer import IncrementalDetokenizer
from pdserve.engine.engine import resolve_overlap
from pdserve.engine.sequence import PLACEHOLDER, SamplingParams


@contextlib.contextmanager
def checked(engine, overlap: bool):
    """The engine with overlap on or off, every model step's inputs checked: a placeholder only where the
    runner takes the token from the device (the last new token of its sequence), nowhere else; no sequence
    scheduled once the host knows its last token is sampled (max_tokens, context)."""
    execute, old = engine.runner.execute, engine.overlap_schedule
    launches = []

    def checking(batch, *args, **kwargs):
        from_device = {i for i, _ in batch.token_rows}
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed_tokens
            new = seq.token_ids[start:start + n]
            assert PLACEHOLDER not in seq.token_ids[:start] + new[:-1], (seq.request_id, seq.token_ids)
            assert (new[-1] == PLACEHOLDER) == (i in from_device), (seq.request_id, i, new, batch.token_rows)
            assert seq.prefill_only or (seq.num_output_tokens < seq.params.max_tokens
                                        and seq.num_tokens < engine.max_model_len), seq.request_id
        launches.append(batch)
        return execute(batch, *args, **kwargs)

    engine.runner.execute = checking
    engine.overlap_schedule = overlap
    try:
        yield launches
        assert engine._in_flight is None and not engine.scheduler.deferred
        engine.block_manager.check_no_leaks()
    finally:
        engine.runner.execute = execute
        engine.overlap_schedule = old
        # after a failure: nothing left behind for the next test on the shared engine (nor a loop that never ends)
        for rid in list(engine.requests):
            engine.abort(rid)
        for _ in range(3):
            if engine.has_unfinished():
                engine.step()


def both(engine, workload):
    """workload(engine) with overlap off, then on: equal results; returns them and how many steps took input
    tokens from the device."""
    results = {}
    for on in (False, True):
        with checked(engine, on) as launches:
            results[on] = workload(engine)
        if on:
            deferred = sum(1 for b in launches if b.token_rows)
    assert results[True] == results[False]
    assert deferred, "no step took its input tokens from the device: nothing overlapped"
    return results[True], deferred


def drive(engine, requests, join_at=None, abort_after=None, seqs=None):
    """Step `requests` [(rid, ids, params)] to completion: request i joins once `join_at[i]` outputs have come
    out (0: at once), and request rid is aborted right after `abort_after[rid]` of its tokens came out.
    Returns {rid: (token ids, text, finish reason, usage, logprobs)}; `seqs` gets the engine's Sequences."""
    join_at = join_at or {}
    abort_after = abort_after or {}
    out = {rid: [[], "", None, None, []] for rid, _, _ in requests}
    pending = list(requests)
    seen = 0

    def admit():
        for r in [r for r in pending if join_at.get(r[0], 0) <= seen]:
            seq = engine.add_request(*r)
            pending.remove(r)
            if seqs is not None:
                seqs.append(seq)

    admit()
    while engine.has_unfinished() or pending:
        for o in engine.step():
            seen += 1
            rec = out[o.request_id]
            assert rec[2] is None, f"{o.request_id} emitted after it finished"
            rec[0] += o.new_token_ids
            rec[1] += o.new_text
            rec[4] += o.new_logprobs
            if o.finished:
                rec[2] = o.finish_reason
                rec[3] = (o.num_prompt_tokens, o.num_output_tokens, o.num_cached_tokens)
            elif len(rec[0]) == abort_after.get(o.request_id):
                assert engine.abort(o.request_id)
                rec[2] = "abort"
        admit()
    return {rid: tuple(tuple(x) if isinstance(x, list) else x for x in v) for rid, v in out.items()}


@pytest.fixture(scope="module")
def prompts(engine_f32):
    e = engine_f32
    return {"rome": e.tokenize("Tell me about the history of Rome.", chat=True),
            "hi": e.tokenize("Say hi.", chat=True),
            "once": e.tokenize("Once upon a time"),
            "rice": e.tokenize("The best way to cook rice is"),
            "paris": e.tokenize("The capital of France is"),
            "diary": e.tokenize("Dear diary,")}


def test_greedy_and_seeded_batches_match(engine_f32, prompts):
    p = prompts
    reqs = [("g-rome", p["rome"], SamplingParams(max_tokens=12)),
            ("g-once", p["once"], SamplingParams(max_tokens=5)),
            ("one", p["diary"], SamplingParams(max_tokens=1)),
            ("s-rice", p["rice"], SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=3)),
            ("s-paris", p["paris"], SamplingParams(max_tokens=11, temperature=1.2, top_k=40, min_p=0.02, seed=7)),
            ("s-diary", p["diary"], SamplingParams(max_tokens=7, temperature=0.7, seed=11, ignore_eos=True))]
    out, _ = both(engine_f32, lambda e: drive(e, reqs))
    assert {r[2] for r in out.values()} == {"length"} and len(out["g-rome"][0]) == 12 and len(out["one"][0]) == 1


def test_stops_eos_and_context_limit_match(engine_f32, prompts, monkeypatch):
    p, e = prompts, engine_f32
    free = e.generate([(p["paris"], SamplingParams(max_tokens=16))])[0]["token_ids"]
    reqs = [("str", p["paris"], SamplingParams(max_tokens=16, stop=["."])),  # " Paris." ends at the stop string
            ("str2", p["paris"], SamplingParams(max_tokens=16, stop=["\n\nThe"])),
            ("tok", p["paris"], SamplingParams(max_tokens=16, stop_token_ids=[free[3]])),
            ("eos", p["hi"], SamplingParams(max_tokens=40)),  # the chat turn ends with <|im_end|>
            ("seeded-stop", p["rice"], SamplingParams(max_tokens=16, temperature=0.9, seed=5, stop=[" "]))]
    out, _ = both(e, lambda e: drive(e, reqs))
    assert out["str"][2] == out["str2"][2] == out["tok"][2] == out["eos"][2] == "stop"
    assert out["tok"][0] == tuple(free[:free.index(free[3]) + 1])
    # a context limit the host sees coming: the last token is not scheduled for another step
    monkeypatch.setattr(e, "max_model_len", len(p["rome"]) + 6)
    out, _ = both(e, lambda e: drive(e, [("ctx", p["rome"], SamplingParams(max_tokens=50)),
                                         ("ctx2", p["once"], SamplingParams(max_tokens=50))]))
    assert out["ctx"][2] == "length" and len(out["ctx"][0]) == 6


def test_logprob_steps_fall_back_and_match(engine_f32, prompts):
    p = prompts
    reqs = [("lp", p["rice"], SamplingParams(max_tokens=6, logprobs=3)),
            ("lp0", p["paris"], SamplingParams(max_tokens=4, logprobs=0, temperature=0.5, seed=2)),
            ("plain", p["once"], SamplingParams(max_tokens=12))]
    out, _ = both(engine_f32, lambda e: drive(e, reqs, join_at={"plain": 0, "lp": 0, "lp0": 8}))
    assert len(out["lp"][4]) == 6 and len(out["lp"][4][0][1]) == 3 and len(out["lp0"][4]) == 4
    assert out["plain"][4] == ()


def test_joining_leaving_and_aborts_mid_stream_match(engine_f32, prompts):
    p = prompts
    reqs = [("a", p["rome"], SamplingParams(max_tokens=14)),
            ("b", p["once"], SamplingParams(max_tokens=10, temperature=0.8, seed=1)),
            ("c", p["rice"], SamplingParams(max_tokens=9)),
            ("d", p["diary"], SamplingParams(max_tokens=6, stop=["."])),
            ("e", p["paris"], SamplingParams(max_tokens=3)),
            ("f", p["hi"], SamplingParams(max_tokens=8, ignore_eos=True))]
    out, _ = both(engine_f32, lambda e: drive(e, reqs, join_at={"c": 3, "d": 7, "e": 12, "f": 20},
                                              abort_after={"a": 4, "c": 1, "f": 2}))
    assert (len(out["a"][0]), len(out["c"][0]), len(out["f"][0])) == (4, 1, 2)
    assert out["a"][2] == "abort" and out["b"][2] == "length"


def test_abort_frees_blocks_only_after_the_step_in_flight(engine_f32, prompts):
    """Blocks that the step in flight still writes stay taken until a step() sees it complete; a reservation
    for a KV load meanwhile cannot get them."""
    e = engine_f32
    with checked(e, True):
        e.add_request("x", prompts["rome"], SamplingParams(max_tokens=30))
        e.add_request("y", prompts["once"], SamplingParams(max_tokens=30))
        for _ in range(3):
            if e._in_flight is not None and e.requests["x"].in_flight_row is not None:
                break
            e.step()
        else:
            raise AssertionError("x's token is never in flight")
        x = e.requests["x"]
        blocks = list(x.block_table)
        free = e.block_manager.num_free
        assert e.abort("x") and x.block_table == []
        assert e.block_manager.num_free == free  # held back
        taken = e.reserve_blocks(free * e.config.block_size)
        assert taken is not None and not set(taken) & set(blocks)
        e.free_blocks(taken)
        assert e.has_unfinished()
        outs = e.step()
        assert all(o.request_id != "x" for o in outs)  # its token in flight is dropped
        assert all(e.block_manager.refcount[b] == 0 for b in blocks)  # freed now
        assert e.abort("y")
        while e.has_unfinished():
            assert not e.step()


def test_switched_between_steps_and_a_failed_step(engine_f32, prompts):
    """The switch may flip while a step is in flight (its outputs still come, once); a step() that raises
    leaves no placeholder and no held-back frees behind once its requests are aborted (async_engine.py)."""
    e = engine_f32
    reqs = [("a", prompts["rice"], SamplingParams(max_tokens=8)), ("b", prompts["once"], SamplingParams(max_tokens=6))]
    with checked(e, False):
        want = drive(e, reqs)
    with checked(e, True):
        for rid, ids, sp in reqs:
            e.add_request(rid, ids, sp)
        got = {rid: [] for rid, _, _ in reqs}
        flips = 0
        while e.has_unfinished():
            for o in e.step():
                got[o.request_id] += o.new_token_ids
            flips += e._in_flight is not None  # switched off with a step in flight
            e.overlap_schedule = not e.overlap_schedule
        assert flips >= 2 and {rid: tuple(t) for rid, t in got.items()} == {rid: v[0] for rid, v in want.items()}
        e.overlap_schedule = True
        for rid, ids, sp in reqs:
            e.add_request(rid, ids, sp)
        while e._in_flight is None or not e._in_flight.seqs:
            e.step()
        execute = e.runner.execute
        e.runner.execute = lambda *a, **k: 1 / 0
        with pytest.raises(ZeroDivisionError):
            e.step()
        e.runner.execute = execute
        seqs = [e.requests[rid] for rid, _, _ in reqs]
        assert e._in_flight is None and not any(PLACEHOLDER in s.token_ids or s.num_steps_in_flight for s in seqs)
        for rid, _, _ in reqs:
            assert e.abort(rid)
        assert not e.has_unfinished()


def test_preemption_and_prefix_caching_match():
    """Shared prompt prefixes (prefix caching), then a pool too small for the batch (preemption by recompute
    while steps are in flight), with and without prefix caching, overlap off and on."""
    from pdserve.engine.engine import LLMEngine

    e = LLMEngine(dtype="float32", config=EngineConfig(num_blocks=8, max_num_batched_tokens=64), progress=False,
                  enable_prefix_caching=True)
    shared = e.tokenize("You are a helpful assistant. Answer briefly and precisely. " * 2)
    questions = [(" Alpha beta gamma", {}), (" Red green blue", {"temperature": 0.9, "seed": 4}),
                 (" North south east", {})]

    def run(max_tokens, **kw):
        seqs = []
        reqs = [(f"r{i}", shared + e.tokenize(q), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp))
                for i, (q, sp) in enumerate(questions)]

        def workload(e):
            seqs.clear()
            bm, every = e.block_manager, []
            assert bm.ensure(every, bm.num_blocks * bm.block_size)  # evicts the cache of the run before
            bm.release(every)
            return drive(e, reqs, seqs=seqs, **kw)

        out, _ = both(e, workload)
        return out, seqs  # the overlap run's

    # r1 and r2 join once r0's prompt is cached; 3 x 3 blocks, one of them shared, fit the pool of 8
    out, seqs = run(10, join_at={"r1": 1, "r2": 2})
    assert [v[3][2] for v in out.values()] == [0, 16, 16] and not any(s.num_preemptions for s in seqs)
    # 3 x 4 blocks do not: the last admitted is preempted, recomputed, and the outputs do not change
    e.block_manager.enable_prefix_caching = False
    out, seqs = run(24)
    assert sum(s.num_preemptions for s in seqs) > 0 and all(len(v[0]) == 24 for v in out.values())


def test_remote_kv_requests_and_chunked_prefills_match(engine_f32, prompts, monkeypatch):
    """A prefill-only request computed in chunks (mid-prompt chunks may overlap, the last one is sent at once),
    then requests whose prompt KV is loaded through the connector (here from the same engine), beside a local
    one whose prompt is chunked too."""
    from pdserve.testing.kv import local_connector

    e = engine_f32
    monkeypatch.setattr(e.scheduler, "max_num_batched_tokens", 16)
    deferred_prefill_only = []
    defer = e._defer
    monkeypatch.setattr(e, "_defer", lambda step: (deferred_prefill_only.append(
        any(s.prefill_only for s in step.batch.seqs)), defer(step))[1])

    def workload(e):
        with local_connector(e):
            kvs = [e.prefill(prompts[k], f"pre-{k}") for k in ("rome", "rice")]
            for k, kv in zip(("rome", "rice"), kvs):
                e.add_request(f"dec-{k}", prompts[k], SamplingParams(max_tokens=8), remote_kv=kv)
            e.add_request("local", prompts["once"], SamplingParams(max_tokens=8))
            out = {}
            while e.has_unfinished() or e.has_transfers():
                for o in e.step():
                    out.setdefault(o.request_id, []).extend(o.new_token_ids)
            return out

    out, _ = both(e, workload)
    assert all(len(v) == 8 for v in out.values()) and len(out) == 3
    assert any(deferred_prefill_only), "no prefill-only chunk overlapped the next step"


def test_step_n_plus_1_launches_before_step_n_is_read(engine_f32, prompts, monkeypatch):
    """With overlap on, the forward of step N+1 is issued before the host detokenizes step N's token (and
    before it is even read); with overlap off, strictly one after the other."""
    e = engine_f32
    events = []
    add = IncrementalDetokenizer.add
    monkeypatch.setattr(IncrementalDetokenizer, "add", lambda self, ids: (events.append("read"), add(self, ids))[1])
    logs = {}
    def logged(execute):
        return lambda *a, **k: (events.append("launch"), execute(*a, **k))[1]

    for on in (False, True):
        events.clear()
        with checked(e, on) as launches:
            execute = e.runner.execute
            e.runner.execute = logged(execute)
            try:
                e.generate([(prompts["once"], SamplingParams(max_tokens=5))])
            finally:
                e.runner.execute = execute
        logs[on] = "".join("L" if x == "launch" else "r" for x in events)
        assert len(launches) == 5  # a prompt step and four decode steps either way
    assert logs[False] == "Lr" * 5
    # the last step is known to be the last (max_tokens): it is read in the call that launched it
    assert logs[True] == "L" + "Lr" * 3 + "Lrr"


def test_config_switch():
    assert EngineConfig().overlap_schedule is None
    assert load_config(overrides={"engine.overlap_schedule": True}).engine.overlap_schedule is True
    with pytest.raises(ConfigError, match="overlap_schedule"):
        load_config(overrides={"engine.overlap_schedule": "yes"})
    with pytest.raises(ConfigError, match="overlap_schedule"):
        EngineConfig(overlap_schedule=1).validate("engine")
    assert resolve_overlap(None, torch.device("cuda")) and not resolve_overlap(None, torch.device("cpu"))
    assert resolve_overlap(True, torch.device("cpu")) and not resolve_overlap(False, torch.device("cuda"))
