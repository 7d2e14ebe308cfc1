"""A decode worker's outbox (decode_worker/outbox.py): what its token channel carries in one message."""
from __future__ import annotations

import asyncio

from pdserve.decode_worker.outbox import Outbox
from pdserve.worker.messages import DecodeDelta, FinishReason


def _d(tokens, text, end=None):
    return DecodeDelta(list(tokens), text, [], end, 3, 0, 0)


def test_one_take_carries_every_request_and_merges_each_ones_deltas():
    async def run():
        box = Outbox()
        epoch = box.open()
        box.post("a", _d([1], "x"))
        box.post("b", _d([7], "p"))
        box.post("a", _d([2], "y", FinishReason.LENGTH))
        first = await box.take(epoch)
        box.post("b", _d([8], "q"))
        return first, await box.take(epoch)

    first, second = asyncio.run(run())
    assert [(rid, d.token_ids, d.text) for rid, d in first] == [("a", [1, 2], "xy"), ("b", [7], "p")]
    assert dict(first)["a"].finish_reason is FinishReason.LENGTH
    assert [(rid, d.token_ids) for rid, d in second] == [("b", [8])]


def test_a_newer_channel_retires_the_older_one_waiting():
    async def run():
        box = Outbox()
        old = box.open()
        waiting = asyncio.ensure_future(box.take(old))
        await asyncio.sleep(0.01)
        new = box.open()
        box.post("a", _d([1], "x"))
        return await asyncio.wait_for(waiting, 1), await box.take(new)

    retired, batch = asyncio.run(run())
    assert retired is None and [rid for rid, _ in batch] == ["a"]


def test_flushed_returns_once_what_was_posted_is_taken():
    async def run():
        box = Outbox()
        epoch = box.open()
        box.post("a", _d([1], "x"))
        flushed = asyncio.ensure_future(box.flushed())
        await asyncio.sleep(0.01)
        before = flushed.done()
        await box.take(epoch)
        await asyncio.wait_for(flushed, 1)
        return before

    assert asyncio.run(run()) is False
