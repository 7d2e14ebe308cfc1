"""How a step's token budget is split between the prompts that compete for it (engine/scheduler.py, mirrored by
the planner's simulator, pdserve/planner/sim.py). Pure Python: the simulator imports it without torch."""
from __future__ import annotations

# waiting prompts looked at per step, beyond those that fill the budget first come, first served, for ones short
# enough to go ahead of a long one (only when there is one: each look matches the prompt against the prefix cache)
LOOKAHEAD = 16


def allot(demands: list[int], budget: int, cap: int | None) -> list[int]:
    """Tokens each prompt computes this step: `demands` are the tokens each still needs, oldest first.

    cap None: first come, first served. Otherwise, first the prompts that can finish within `cap` tokens, oldest
    first, and the oldest prompt at least `cap` of its tokens (so a stream of short prompts never starves it); then
    what is left of the budget goes to the prompts oldest first. A short prompt behind a long one is done in one step
    instead of after every chunk of the long one, long prompts alone are served as before, and no budget is left
    unused while a prompt needs it."""
    out = [0] * len(demands)
    if cap is not None:
        for i, d in enumerate(demands):
            if budget <= 0:
                break
            if d <= cap or i == 0:
                out[i] = min(d, cap, budget)
                budget -= out[i]
    for i, d in enumerate(demands):
        if budget <= 0:
            break
        extra = min(d - out[i], budget)
        out[i] += extra
        budget -= extra
    return out
