"""The engine against transformers on the embedded model, and against itself across batching and chunking."""
from __future__ import annotations

import pytest
import torch

from pdserve.testing.exactness import PROMPTS, assert_same_or_near_tie
from pdserve.engine.sequence import SamplingParams

NEW = 32


def _prompt_ids(engine):
    return [engine.tokenize(p, chat=chat) for p, chat in PROMPTS]


def _hf_greedy(model, ids_list, n=NEW):
    outs = []
    for ids in ids_list:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           pad_token_id=2)
        outs.append(y[0, len(ids):].tolist())
    return outs


def _ours(engine, ids_list, n=NEW, logprobs=None):
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=logprobs)
    return engine.generate([(ids, params) for ids in ids_list])


@pytest.fixture(scope="module")
def greedy_f32(engine_f32, hf_f32):
    """The 12 prompts' float32 greedy continuations, transformers' and ours: both tests below compare against them."""
    ids_list = _prompt_ids(engine_f32)
    return ids_list, _hf_greedy(hf_f32, ids_list), [r["token_ids"] for r in _ours(engine_f32, ids_list)]


def test_float32_greedy_matches_transformers(engine_f32, greedy_f32):
    ids_list, ref, ours = greedy_f32
    mismatches = [(PROMPTS[i][0], ref[i], ours[i]) for i in range(len(ref)) if ref[i] != ours[i]]
    assert not mismatches, mismatches
    engine_f32.block_manager.check_no_leaks()



def test_batch_of_16_equals_each_alone(engine_f32):
    base = _prompt_ids(engine_f32)
    # 16 mixed lengths: the 12 prompts plus 4 longer ones built from them
    ids_list = base + [base[0] + base[6], base[1] * 3, base[2] + base[3] + base[4], base[7] + base[8] + base[9]]
    assert len(ids_list) == 16 and len({len(x) for x in ids_list}) > 8
    alone = [_ours(engine_f32, [ids], n=24, logprobs=2)[0] for ids in ids_list]
    batched = _ours(engine_f32, ids_list, n=24, logprobs=2)
    assert_same_or_near_tie(alone, batched, "batched")
    engine_f32.block_manager.check_no_leaks()


def test_chunked_prefill_equals_unchunked(engine_f32):
    ids_list = _prompt_ids(engine_f32)[6:10]  # chat prompts: 30-50 tokens
    whole = _ours(engine_f32, ids_list, n=16, logprobs=2)
    old = engine_f32.scheduler.max_num_batched_tokens
    engine_f32.scheduler.max_num_batched_tokens = 7  # chunks that cross block boundaries
    try:
        chunked = _ours(engine_f32, ids_list, n=16, logprobs=2)
    finally:
        engine_f32.scheduler.max_num_batched_tokens = old
    assert_same_or_near_tie(whole, chunked, "chunked")
    engine_f32.block_manager.check_no_leaks()


def test_bfloat16_agreement_like_transformers(greedy_f32, hf_model_factory):
    from pdserve.engine.engine import LLMEngine

    ids_list, ref32, ours32 = greedy_f32
    hf16 = _hf_greedy(hf_model_factory(torch.bfloat16), ids_list)
    eng16 = LLMEngine(dtype="bfloat16", progress=False)
    ours16 = [r["token_ids"] for r in _ours(eng16, ids_list)]
    agree_ours = sum(a == b for a, b in zip(ours16, ours32)) / len(ids_list)
    agree_hf = sum(a == b for a, b in zip(hf16, ref32)) / len(ids_list)
    print(f"\nbf16 vs fp32 identical 32-token continuations: pdserve {agree_ours:.2f}, transformers {agree_hf:.2f}")
    assert all(len(x) == NEW for x in ours16)
    assert agree_ours >= agree_hf - 0.25, (agree_ours, agree_hf)
