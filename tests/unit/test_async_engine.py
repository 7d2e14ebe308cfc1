"""AsyncEngine's request queues: outputs a consumer has not taken yet leave as one (engine/async_engine.py), on
the real model; and the router's merge of a decode worker's deltas (worker/messages.py)."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pdserve.engine.async_engine import AsyncEngine, OutputQueue
from pdserve.engine.engine import RequestOutput
from pdserve.engine.sequence import SamplingParams
from pdserve.worker.messages import DecodeDelta, FinishReason


def _out(tokens, text, finished=False, n=0, logprobs=()):
    return RequestOutput("r", list(tokens), text, finished, "length" if finished else None, 5, n, 2, list(logprobs))


def test_a_queue_merges_what_was_not_taken_and_stops_at_the_end():
    async def run():
        q = OutputQueue()
        q.put_nowait(_out([1], "a", n=1, logprobs=[(-0.1, [])]))
        first = await q.get()  # taken at once: alone
        q.put_nowait(_out([2], "b", n=2, logprobs=[(-0.2, [])]))
        q.put_nowait(_out([3], "c", n=3, logprobs=[(-0.3, [])]))
        q.put_nowait(_out([4], "d", finished=True, n=4, logprobs=[(-0.4, [])]))
        q.put_nowait(_out([9], "z", n=9))  # nothing merges past a finished output
        return first, await q.get(), q.qsize()

    first, rest, left = asyncio.run(run())
    assert first.new_token_ids == [1] and first.new_text == "a"
    assert rest.new_token_ids == [2, 3, 4] and rest.new_text == "bcd"
    assert rest.new_logprobs == [(-0.2, []), (-0.3, []), (-0.4, [])]
    assert rest.finished and rest.finish_reason == "length" and rest.num_output_tokens == 4
    assert (rest.num_prompt_tokens, rest.num_cached_tokens) == (5, 2)
    assert left == 1


def test_an_abort_or_an_error_is_taken_after_the_tokens_before_it():
    async def run():
        q, e = OutputQueue(), RuntimeError("engine step failed")
        q.put_nowait(_out([1], "a", n=1))
        q.put_nowait(_out([2], "b", n=2))
        q.put_nowait(None)
        q2 = OutputQueue()
        q2.put_nowait(_out([1], "a", n=1))
        q2.put_nowait(e)
        return [await q.get(), await q.get()], [await q2.get(), await q2.get()], e

    aborted, failed, e = asyncio.run(run())
    assert aborted[0].new_token_ids == [1, 2] and aborted[1] is None
    assert failed[0].new_token_ids == [1] and failed[1] is e


def test_without_coalescing_each_output_is_taken_alone():
    async def run():
        q = OutputQueue(coalesce=False)
        for i in range(3):
            q.put_nowait(_out([i], str(i), n=i + 1))
        return [await q.get() for _ in range(3)]

    assert [o.new_token_ids for o in asyncio.run(run())] == [[0], [1], [2]]


def test_a_consumer_that_falls_behind_gets_the_same_tokens_in_fewer_outputs(engine_f32):
    """On the real model: a request read only once it has finished arrives in one output, with the tokens and text
    of the same request read step by step."""
    prompt = engine_f32.tokenize("The capital of France is")
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    async def run():
        ae = AsyncEngine(engine_f32)
        steady = await ae.add("steady", prompt, params, coalesce=False)
        each = []
        while not each or not each[-1].finished:
            each.append(await steady.get())
        late = await ae.add("late", prompt, params)
        while "late" in ae.queues:  # the engine finishes it while nobody reads
            await asyncio.sleep(0.01)
        merged = [await late.get()]
        ae._task.cancel()
        return each, merged

    each, merged = asyncio.run(run())
    assert len(each) == 12 and all(len(o.new_token_ids) == 1 for o in each)
    assert len(merged) == 1 and merged[0].finished and merged[0].num_output_tokens == 12
    assert merged[0].new_token_ids == [t for o in each for t in o.new_token_ids]
    assert merged[0].new_text == "".join(o.new_text for o in each)
    assert not engine_f32.has_unfinished()


def test_the_routers_merge_of_two_deltas():
    a = DecodeDelta([1, 2], "ab", [(-0.1, []), (-0.2, [])], None, 5, 2, 3)
    b = DecodeDelta([3], "c", [(-0.3, [])], FinishReason.STOP, 5, 3, 3)
    m = a.then(b)
    assert (m.token_ids, m.text, m.logprobs) == ([1, 2, 3], "abc", [(-0.1, []), (-0.2, []), (-0.3, [])])
    assert m.finished and m.finish_reason is FinishReason.STOP and (m.prompt_tokens, m.completion_tokens) == (5, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):  # frozen: a merge makes a new delta, the old ones stay as they were
        a.token_ids = []
