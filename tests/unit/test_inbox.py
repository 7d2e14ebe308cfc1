"""The router's per-attempt inbox (router/channels.py): merging, waking, the silence timeout."""
import asyncio

from pdserve.router.channels import Inbox
from pdserve.worker.messages import DecodeDelta, FinishReason


def delta(ids, text, finish=None):
    return DecodeDelta(list(ids), text, [], finish, 3, 0, 0)


def test_take_merges_what_came_up_to_the_last_delta():
    box = Inbox()
    box.put(delta([1], "a"))
    box.put(delta([2, 3], "bc"))
    box.put(delta([4], "d", FinishReason.LENGTH))
    box.put(delta([9], "late"))  # nothing of the request comes after its last delta; if it did, it stays
    d = box.take()
    assert (d.token_ids, d.text, d.finish_reason) == ([1, 2, 3, 4], "abcd", FinishReason.LENGTH)
    assert len(box) == 1 and box.take().token_ids == [9] and not box


def test_wait_returns_at_once_with_deltas_waiting_and_on_a_put_or_wake():
    async def main():
        box = Inbox()
        box.put(delta([1], "a"))
        assert await asyncio.wait_for(box.wait(5), 1) is True
        box.take()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, box.put, delta([2], "b"))
        t0 = loop.time()
        assert await box.wait(5) is True and loop.time() - t0 < 1 and box.take().token_ids == [2]
        loop.call_later(0.05, box.wake)  # an interrupt or the generate call's end: woken with nothing in it
        assert await box.wait(5) is True and not box

    asyncio.run(main())


def test_wait_times_out_when_nothing_comes():
    async def main():
        box = Inbox()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await box.wait(0.1) is False
        assert 0.09 < loop.time() - t0 < 1
        box.wake()  # a late wake after the wait ended is harmless
        box.put(delta([1], "a"))
        assert await box.wait(0.1) is True

    asyncio.run(main())
