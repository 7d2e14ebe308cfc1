"""What the exactness tests compare: the 12-prompt set and the near-tie rule."""
from __future__ import annotations

# 12 prompts, raw and chat, of different lengths and kinds (the token-exactness set)
PROMPTS = [
    ("The capital of France is", False),
    ("Once upon a time, in a small village by the sea,", False),
    ("def fibonacci(n):\n    ", False),
    ("The three primary colors are", False),
    ("Water boils at a temperature of", False),
    ("In 1969, the first humans landed on", False),
    ("What is the tallest mountain in the world?", True),
    ("Write a haiku about autumn leaves.", True),
    ("Explain in one sentence what a CPU does.", True),
    ("List three fruits that are red.", True),
    ("How do I reverse a list in Python?", True),
    ("Translate 'good morning' into French.", True),
]


def assert_same_or_near_tie(ref_results, other_results, label):
    """Token-identical, or the first divergence is a near-tie in the reference (top-2 gap < 1e-4)."""
    for i, (r, o) in enumerate(zip(ref_results, other_results)):
        a, b = r["token_ids"], o["token_ids"]
        if a == b:
            continue
        j = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), None)
        assert j is not None, f"{label}: prompt {i} has {len(b)} tokens where the reference has {len(a)}"
        _, top = r["logprobs"][j]
        gap = top[0][1] - top[1][1]
        assert gap < 1e-4, f"{label}: prompt {i} diverges at step {j} with top-2 gap {gap:.3g}"
