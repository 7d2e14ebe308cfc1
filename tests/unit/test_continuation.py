"""A request moved to another engine mid-stream (router/dispatch.py's migration) goes on as if it never moved.

The client of an undisturbed run gets the reference deltas. A move after k tokens means: the client has the
first k deltas (their text may lack a held-back tail: part of a UTF-8 character, or text that may begin a stop
string), and a second engine continues from prompt + those k tokens with a `Continuation`. Token ids and text
stitched together must equal the reference, for every k, for greedy and seeded sampling, with a character
split across tokens and a stop string that spans the move. All k run in one batch of the real model.
"""
from __future__ import annotations

import dataclasses

import pytest

from pdserve.engine.sampler import token_seed
from pdserve.engine.sequence import Continuation, SamplingParams
from pdserve.errors import InvalidRequest
from pdserve.testing.exactness import assert_same_or_near_tie

# the embedded model answers this in katakana, most characters split across two tokens
JAPANESE = "Translate 'I like coffee and cake' into Japanese."
POEM = "Write a short poem about rain."


def _reference(engine, ids, params):
    deltas = []
    ref = engine.generate([(ids, dataclasses.replace(params, logprobs=2))],
                          on_output=lambda i, out: deltas.append((out.new_token_ids, out.new_text)))[0]
    assert [t for toks, _ in deltas for t in toks] == ref["token_ids"]
    return ref, deltas


def _moved_at_every_token(engine, ids, params, deltas):
    """For each k: the first k deltas as the client got them, then a second run from prompt + k tokens."""
    conts, heads = [], []
    for k in range(1, len(deltas)):
        toks = [t for d in deltas[:k] for t in d[0]]
        text = "".join(d[1] for d in deltas[:k])
        heads.append((toks, text))
        conts.append((ids + toks, dataclasses.replace(params, max_tokens=params.max_tokens - k),
                      Continuation(len(toks), len(text))))
    rids = [f"moved-{k}" for k in range(1, len(deltas))]
    for rid, (prompt, p, c) in zip(rids, conts):
        engine.add_request(rid, prompt, p, continuation=c)
    tails = {rid: {"token_ids": [], "text": "", "finish_reason": None} for rid in rids}
    while engine.has_unfinished():
        for out in engine.step():
            t = tails[out.request_id]
            t["token_ids"] += out.new_token_ids
            t["text"] += out.new_text
            t["finish_reason"] = out.finish_reason if out.finished else None
    return [{"token_ids": h[0] + tails[r]["token_ids"], "text": h[1] + tails[r]["text"],
             "finish_reason": tails[r]["finish_reason"]} for h, r in zip(heads, rids)]


def _check(ref, stitched, label):
    for k, s in enumerate(stitched, 1):
        assert_same_or_near_tie([ref], [s], f"{label}, moved after {k}")
        if s["token_ids"] == ref["token_ids"]:
            assert (s["text"], s["finish_reason"]) == (ref["text"], ref["finish_reason"]), f"{label}, moved after {k}"


@pytest.mark.parametrize("stop", [[], ["はライ"]], ids=["multibyte", "multibyte+stop"])
def test_greedy_stream_moved_after_any_token_is_the_undisturbed_one(engine_f32, stop):
    ids = engine_f32.tokenize(JAPANESE, chat=True)
    params = SamplingParams(max_tokens=22, stop=stop)
    ref, deltas = _reference(engine_f32, ids, params)
    # the case this guards: characters split across tokens, so some moves fall inside one
    assert any(engine_f32.tokenizer.hf.decode(ref["token_ids"][:k]).endswith("\ufffd") for k in range(1, 10))
    if stop:  # the stop string ends the reference, and text held back for it was streamed before that
        assert ref["finish_reason"] == "stop" and stop[0] not in ref["text"] and len(ref["token_ids"]) < 22
    _check(ref, _moved_at_every_token(engine_f32, ids, params, deltas), f"greedy, stop={stop}")
    engine_f32.block_manager.check_no_leaks()


def test_seeded_stream_moved_after_any_token_draws_what_it_would_have(engine_f32):
    ids = engine_f32.tokenize(POEM, chat=True)
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=1234, stop=["asunder"])
    ref, deltas = _reference(engine_f32, ids, params)
    assert ref["finish_reason"] == "stop" and len(deltas) > 10
    stitched = _moved_at_every_token(engine_f32, ids, params, deltas)
    for k, s in enumerate(stitched, 1):
        assert s["token_ids"] == ref["token_ids"], f"seeded, moved after {k}"
        assert (s["text"], s["finish_reason"]) == (ref["text"], ref["finish_reason"]), f"seeded, moved after {k}"


def test_a_tokens_draw_depends_on_its_seed_and_position_only():
    seeds = {token_seed(s, p) for s in range(64) for p in range(64)}
    assert len(seeds) == 64 * 64  # no (seed, position) shares a stream with another, neighbours included
    assert token_seed(7, 3) == token_seed(7, 3) and 0 <= token_seed(2**63 - 1, 10**6) < 2**64


def test_a_continuation_that_does_not_fit_its_prompt_is_refused(engine_f32):
    ids = engine_f32.tokenize("The capital of France is")
    with pytest.raises(InvalidRequest):
        engine_f32.add_request("bad-cont-1", ids, SamplingParams(), continuation=Continuation(len(ids), 0))
    with pytest.raises(InvalidRequest):  # more characters than the output tokens decode to
        engine_f32.add_request("bad-cont-2", ids, SamplingParams(), continuation=Continuation(1, 100))
    assert not engine_f32.requests
