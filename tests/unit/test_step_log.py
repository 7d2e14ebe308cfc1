"""The engine's step log (engine/step_log.py): one line per request added and per model step, with the step's
composition as the planner costs it, whether steps are finished in the call that launched them or the next
(overlap scheduling, forced on here on the CPU)."""
from __future__ import annotations

import json

import pytest

from pdserve.config import ConfigError, EngineConfig, load_config
from pdserve.engine.engine import LLMEngine
from pdserve.engine.sequence import SamplingParams


@pytest.mark.parametrize("overlap", [False, True])
def test_every_step_logged_with_its_composition(tmp_path, overlap):
    engine = LLMEngine(dtype="float32", progress=False, role="colocated",
                       config=EngineConfig(max_num_batched_tokens=64, step_log=str(tmp_path), overlap_schedule=overlap))
    prompts = {"long": list(range(1000, 1100)), "short": list(range(2000, 2030))}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    launched, execute = [], engine.runner.execute
    engine.runner.execute = lambda batch, *a, **k: launched.append(batch) or execute(batch, *a, **k)
    while engine.has_unfinished():
        engine.step()
    engine.step_log.close()
    (path,) = tmp_path.glob("colocated-*.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    adds = [x for x in lines if x["ev"] == "add"]
    assert [(a["id"], a["prompt"]) for a in adds] == [("long", 100), ("short", 30)]
    logged = [x for x in lines if x["ev"] == "step"]
    assert [(s["seqs"], s["tokens"]) for s in logged] == [(len(b.seqs), b.num_tokens) for b in launched]
    # prompts once, then 4 decode tokens each (the 5th token is sampled by the step that ends the 4th's input)
    assert sum(s["tokens"] for s in logged) == 130 + 2 * 4
    for rid, ids in prompts.items():
        chunks = [c for s in logged for c in s["chunks"] if c[0] == rid]
        assert sum(c[1] for c in chunks) == len(ids)
        assert [c[2] for c in chunks] == [sum(c[1] for c in chunks[:i]) for i in range(len(chunks))]
        (first,) = [s for s in logged if rid in s["first"]]  # the step of its prompt's last chunk
        assert [c for c in first["chunks"] if c[0] == rid] == chunks[-1:]
    first_long = next(s for s in logged if any(c[0] == "long" and c[2] > 0 for c in s["chunks"]))
    assert first_long["tok_ctx"] >= 64 * [c for c in first_long["chunks"] if c[0] == "long"][0][1]
    for s in logged:
        assert s["done"] >= s["t"] and s["host_ms"] >= 0 and s["dev_ms"] is None  # CPU: no device events
        assert s["ctx"] >= 0 and s["seqs"] >= len(s["chunks"])
    assert [s["t"] for s in logged] == sorted(s["t"] for s in logged)


def test_step_log_config_is_checked():
    with pytest.raises(ConfigError, match="engine.step_log"):
        load_config(overrides={"engine.step_log": 3})
    assert load_config(overrides={"engine.step_log": "/tmp/x"}).engine.step_log == "/tmp/x"
