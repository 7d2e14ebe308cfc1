"""The scheduler's step composition (engine/scheduler.py, engine/prompt_chunks.py), pure Python: decodes before
prompt chunks, a short prompt not queued behind a long one's chunks, the oldest never starved, the whole budget
used, preemption taking a scheduled decode back out of the step. The engine's own tests (test_engine_core.py, test_overlap.py) run it with the model."""
from __future__ import annotations

import pytest

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.prompt_chunks import allot
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import SamplingParams, Sequence, Status


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, list(range(prompt_len)), prompt_len, SamplingParams(max_tokens=8))


def step_done(batch) -> None:
    """What LLMEngine.step does after the model step: the chunks are computed; a sequence that reached the end of
    its tokens gets a sampled one."""
    for s, n in zip(batch.seqs, batch.num_new):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(0)


def composition(batch) -> list[tuple[str, int]]:
    return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new)]


def test_decodes_are_never_stalled_by_a_prompt_chunked_before_them():
    # L (40 tokens) is admitted first and takes 15 of the 16-token budget; D (1 token) fits in what is left, so it
    # decodes from the next step on, while L still has 25 tokens to compute: D goes first, L gets the rest
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(seq("L", 40))
    sched.add(seq("D", 1))
    b = sched.schedule()
    # D fits in the cap (16 // 4): it goes first with L's 4, then L takes the rest (first come, first served:
    # [("L", 16)], and D would wait for all of L's chunks)
    assert composition(b) == [("L", 15), ("D", 1)]
    step_done(b)
    b = sched.schedule()
    assert composition(b) == [("D", 1), ("L", 15)]  # running in admission order, L would take all 16
    step_done(b)
    assert composition(sched.schedule()) == [("D", 1), ("L", 10)]


def test_a_short_prompt_behind_a_long_one_is_done_in_its_first_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16, prompt_chunk_tokens=4)
    sched.add(seq("L", 100))
    sched.add(seq("S", 3))
    b = sched.schedule()
    # S fits in the cap: it goes first with L's 4, then the 9 left go to L: S's first token comes with this step
    assert composition(b) == [("L", 13), ("S", 3)] and b.num_tokens == 16
    step_done(b)
    sched.add(seq("T", 3))  # arrive while L is partly computed: L is a running prompt, T and U waiting ones
    sched.add(seq("U", 6))
    b = sched.schedule()
    # S decodes; T (3) goes ahead; U (6) does not fit in the cap: it waits its turn behind L, as a long prompt
    assert composition(b) == [("S", 1), ("L", 12), ("T", 3)]
    assert list(sched.waiting) == [sched.waiting[0]] and sched.waiting[0].request_id == "U"


def test_a_stream_of_short_prompts_never_starves_the_oldest():
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=64, max_num_batched_tokens=16, prompt_chunk_tokens=4)
    sched.add(seq("L", 40))
    done = 0
    for i in range(10):
        for j in range(5):  # more short prompts a step than the budget holds (prefill only: they never decode)
            short = seq(f"s{i}.{j}", 4)
            short.prefill_only = True
            sched.add(short)
        b = sched.schedule()
        got = dict(composition(b)).get("L", 0)
        assert got == min(4, 40 - done), composition(b)
        done += got
        step_done(b)
    assert done == 40


def test_a_prompt_alone_takes_the_whole_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16, prompt_chunk_tokens=4)
    sched.add(seq("L", 40))
    for want in (16, 16, 8):
        b = sched.schedule()
        assert composition(b) == [("L", want)]
        step_done(b)


def test_prompts_that_fit_together_are_not_split():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16)  # cap: 16 // 4
    for name in "ABC":
        sched.add(seq(name, 5))
    assert composition(sched.schedule()) == [("A", 5), ("B", 5), ("C", 5)]


def test_long_prompts_are_served_oldest_first_and_short_ones_go_ahead():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=16, prompt_chunk_tokens=4)
    for name, n in (("A", 30), ("B", 30), ("C", 2), ("D", 30)):
        sched.add(seq(name, n))
    # A (oldest) 4 and C 2 first, then the 10 left to A: B and D wait, as first come, first served would have them
    assert composition(sched.schedule()) == [("A", 14), ("C", 2)]
    assert [s.request_id for s in sched.waiting] == ["B", "D"]


@pytest.mark.parametrize("demands, budget, cap, want", [
    ([40, 1], 16, 4, [15, 1]),
    ([40, 1], 16, None, [16, 0]),       # first come, first served
    ([3, 40], 16, 4, [3, 13]),
    ([30, 30, 2, 30], 16, 4, [14, 0, 2, 0]),
    ([5, 5, 5], 16, 4, [5, 5, 5]),
    ([2048] * 8, 4096, 1024, [2048, 2048, 0, 0, 0, 0, 0, 0]),  # equal long prompts: as first come, first served
    ([100, 3, 3, 3, 3, 3, 3], 16, 4, [4, 3, 3, 3, 3, 0, 0]),   # the oldest keeps its share
    ([0, 5], 16, 4, [0, 5]),
    ([7], 0, 4, [0]),
])
def test_allot(demands, budget, cap, want):
    got = allot(demands, budget, cap)
    assert got == want
    assert sum(got) <= budget and all(0 <= g <= d for g, d in zip(got, demands))


def test_a_prompt_short_of_kv_preempts_a_decode_already_in_the_step():
    # 3 blocks of 4 tokens. P (a 12-token prompt) was admitted first and computed 4 tokens; D (2-token prompt)
    # after it, now decoding. The decode pass schedules D; P's next 8 tokens need 2 more blocks, 1 is free, so D,
    # the most recently admitted, is preempted and taken back out of the step.
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=16, prompt_chunk_tokens=4)
    p, d = seq("P", 12), seq("D", 2)
    for s, computed in ((p, 4), (d, 2)):
        assert bm.ensure(s.block_table, computed)
        s.num_computed_tokens = computed
        s.status = Status.RUNNING
        sched.running.append(s)
    d.token_ids.append(0)  # D decodes: 1 pending token; P: 8 pending, in blocks 2 and 3
    assert bm.ensure(d.block_table, 3)
    b = sched.schedule()
    assert b.preempted == [d] and d.status is Status.WAITING and list(sched.waiting) == [d]
    assert composition(b) == [("P", 8)]  # D's block went to P; D left the step it was already in
    assert b.num_tokens == 8


def test_a_step_admits_as_many_prompts_as_its_budget_holds():
    # the lookahead for short prompts is beyond what fills the budget first come, first served, never instead of it
    sched = Scheduler(BlockManager(256, 4), max_num_seqs=64, max_num_batched_tokens=256)
    for i in range(40):
        sched.add(seq(f"p{i}", 6))
    b = sched.schedule()
    assert len(b.seqs) == 40 and b.num_tokens == 240 and not sched.waiting
