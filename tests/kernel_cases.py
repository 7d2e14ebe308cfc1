"""Shared driver of the kernel-vs-reference case tables (attention, fused ops).

Seeds: fixed by default so CI is deterministic; `PDSERVE_TEST_SEED=random` draws fresh inputs (as
the GPU runs do), and any failure message names the seed to reproduce it with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def test_seed() -> int:
    s = os.environ.get("PDSERVE_TEST_SEED", "20261122")
    return int.from_bytes(os.urandom(3), "little") if s == "random" else int(s)


def run_cases(cases: dict, device: str, dtype: torch.dtype, names, seed: int) -> dict:
    results = {}
    for i, name in enumerate(names):
        gen = torch.Generator().manual_seed(seed + i)
        try:
            results[name] = cases[name](device, dtype, gen)
        except Exception as exc:  # reported per case, so one failure does not hide the rest
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def interpreted_json(test_file: str, root, *args: str):
    """Run test_file as a script under TRITON_INTERPRET=1 in a subprocess (the variable must not leak into
    the other tests of this session) and return the JSON its last output line holds."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, test_file, *args], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_interpreted(test_file: str, root) -> tuple[int, dict]:
    """All of a file's cases in one interpreted subprocess, with this session's seed."""
    seed = test_seed()
    return seed, interpreted_json(test_file, root, str(seed))


def run_checks(checks: dict, other_errors: str) -> dict:
    """{name: "ok" | "fail: ..." | "<other_errors>: ..."} for zero-argument checks that assert; an
    exception other than AssertionError is labelled `other_errors` (a file decides whether that means
    an interpreter limitation to skip or an error)."""
    results = {}
    for name, fn in checks.items():
        try:
            fn()
            results[name] = "ok"
        except AssertionError as e:
            results[name] = f"fail: {e}"
        except Exception as e:
            last = str(e).splitlines()[-1][:300] if str(e) else ""
            results[name] = f"{other_errors}: {type(e).__name__}: {last}"
    return results


def patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns a loop bound into an int with int(array), which NumPy >= 2.3 refuses
    for its 1-element arrays (program ids are shape (1,)); take the element explicitly."""
    import triton.runtime.interpreter as interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
