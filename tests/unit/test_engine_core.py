"""Engine behaviour: block accounting, preemption, sampling, stops, detokenization, bad input, loading."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest
import torch

from pdserve.testing.cluster import NEUTRAL_CWD
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import SamplingParams
from pdserve.errors import InvalidRequest


# -- block manager (pure Python) --------------------------------------------------------------------
def test_block_manager_refcounts_and_prefix_cache():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    t1: list[int] = []
    assert bm.ensure(t1, 9) and len(t1) == 3 and bm.num_free == 5
    bm.cache(t1[0], 111)
    bm.cache(t1[1], 222)
    assert bm.lookup([111, 222, 333]) == t1[:2]
    bm.acquire(t1[:2])  # a second sequence shares the prefix
    bm.release(t1)
    assert bm.num_free == 6  # the shared blocks are still referenced
    bm.release(t1[:2])
    bm.check_no_leaks()
    assert bm.lookup([111, 222]) == t1[:2]  # freed but still cached
    t2: list[int] = []
    assert bm.ensure(t2, 32)  # takes every block: cached ones are evicted, LRU last
    assert bm.lookup([111]) == []
    assert ("removed", 111) in bm.drain_events()
    assert not bm.ensure([], 1)
    with pytest.raises(AssertionError):
        bm.release([t2[0], t2[0]])


def test_scheduler_runs_a_sink_refresh_once_within_the_token_budget():
    """A request admitted with transferred KV and a pending refresh: the refresh rides with its first
    step, counts against the step's token budget (waiting for a step with room), then is gone."""
    from pdserve.engine.scheduler import Scheduler
    from pdserve.engine.sequence import Sequence

    bm = BlockManager(16, 4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    seqs = []
    for i in range(2):  # 9-token prompts, 8 tokens' KV arrived, the first 4 to refresh
        s = Sequence(f"s{i}", list(range(9)), 9, SamplingParams(max_tokens=4))
        bm.ensure(s.block_table, 8)
        s.num_computed_tokens = s.num_cached_tokens = 8
        s.num_refresh_tokens = 4
        sched.add(s)
        seqs.append(s)
    batch = sched.schedule()  # 1 + 4 for s0; s1's 1 + 4 would exceed 8
    assert (batch.seqs, batch.num_new, batch.num_refresh, batch.num_tokens) == ([seqs[0]], [1], [4], 5)
    seqs[0].num_computed_tokens += 1  # what LLMEngine.step does after the model step
    seqs[0].num_refresh_tokens -= 4
    seqs[0].token_ids.append(0)
    batch = sched.schedule()
    assert (batch.seqs, batch.num_new, batch.num_refresh, batch.num_tokens) == (seqs, [1, 1], [0, 4], 6)


def test_no_leaks_after_finished_stopped_aborted_and_preempted(engine_f32):

    e = engine_f32
    ids = e.tokenize("Tell me about the history of Rome.", chat=True)
    e.generate([(ids, SamplingParams(max_tokens=8))])  # finished by length
    e.generate([(ids, SamplingParams(max_tokens=64, stop=[" the"]))])  # stopped by a stop string
    e.add_request("abort-me", ids, SamplingParams(max_tokens=50))
    e.step()
    e.step()
    assert e.abort("abort-me")
    e.block_manager.check_no_leaks()
    e.block_manager.check_no_leaks()


def test_preemption_happens_and_recomputes(engine_f32):
    from pdserve.engine.engine import LLMEngine
    from pdserve.config import EngineConfig

    from pdserve.testing.exactness import assert_same_or_near_tie

    # 10 blocks of 16 = 160 tokens for three sequences that each grow to ~55: someone must yield
    e = LLMEngine(dtype="float32", config=EngineConfig(num_blocks=10, max_num_batched_tokens=64), progress=False)
    prompts = [e.tokenize(p) for p in ["Alpha beta gamma delta", "Red green blue", "North south east west"]]
    sp = SamplingParams(max_tokens=50, ignore_eos=True, logprobs=2)
    alone = [e.generate([(p, sp)])[0] for p in prompts]
    seqs = [e.add_request(f"r{i}", p, sp) for i, p in enumerate(prompts)]
    out = {s.request_id: [] for s in seqs}
    while e.has_unfinished():
        for o in e.step():
            out[o.request_id] += o.new_token_ids
    assert sum(s.num_preemptions for s in seqs) > 0
    together = [{"token_ids": out[f"r{i}"]} for i in range(3)]
    assert_same_or_near_tie(alone, together, "preempted")
    e.block_manager.check_no_leaks()


# -- sampling ---------------------------------------------------------------------------------------
def test_seeded_sampling_is_independent_of_the_batch(engine_f32):
    e = engine_f32
    p = e.tokenize("Write a short poem about rain.", chat=True)
    others = [e.tokenize(x) for x in ["Once upon a time", "The best way to cook rice is", "Dear diary,"]]
    sp = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, min_p=0.02, seed=1234)
    alone = e.generate([(p, sp)])[0]["token_ids"]
    mixed = e.generate([(o, SamplingParams(max_tokens=30, temperature=1.0, seed=7)) for o in others[:2]]
                       + [(p, sp)] + [(others[2], SamplingParams(max_tokens=10))])
    assert mixed[2]["token_ids"] == alone
    other_seed = e.generate([(p, SamplingParams(max_tokens=24, temperature=0.9, seed=99))])[0]["token_ids"]
    assert other_seed != alone


def test_top_k_1_is_greedy_and_filters_hold():
    from pdserve.engine.sampler import _filtered_probs

    logits = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_k=1))
    assert p.argmax() == 1 and p[1] == 1.0
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert set(p.nonzero().flatten().tolist()) == {1, 4}
    full = torch.softmax(logits, -1)
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))  # smallest set reaching 0.5
    kept = set(p.nonzero().flatten().tolist())
    order = full.argsort(descending=True).tolist()
    need = next(i for i in range(5) if full[order[:i + 1]].sum() >= 0.5) + 1
    assert kept == set(order[:need])
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.5))
    assert set(p.nonzero().flatten().tolist()) == {i for i in range(5) if full[i] >= 0.5 * full.max()}
    assert torch.isclose(p.sum(), torch.tensor(1.0))


def test_stop_strings_token_ids_eos_and_max_tokens(engine_f32):
    e = engine_f32
    p = e.tokenize("The capital of France is")
    free = e.generate([(p, SamplingParams(max_tokens=20))])[0]  # " Paris.\n\nThe answer is: ..."
    assert free["finish_reason"] == "length" and len(free["token_ids"]) == 20
    r = e.generate([(p, SamplingParams(max_tokens=20, stop=["."]))])[0]
    assert r["finish_reason"] == "stop" and r["text"] == free["text"].split(".")[0]
    r = e.generate([(p, SamplingParams(max_tokens=20, stop=["\n\nThe"]))])[0]
    assert "\n\nThe" not in r["text"] and r["text"] == free["text"].split("\n\nThe")[0]
    tok = free["token_ids"][3]
    r = e.generate([(p, SamplingParams(max_tokens=20, stop_token_ids=[tok]))])[0]
    assert r["token_ids"] == free["token_ids"][:free["token_ids"].index(tok) + 1] and r["finish_reason"] == "stop"
    chat = e.tokenize("Say hi.", chat=True)
    r = e.generate([(chat, SamplingParams(max_tokens=60))])[0]
    assert r["finish_reason"] == "stop" and r["token_ids"][-1] == 2  # <|im_end|>
    r2 = e.generate([(chat, SamplingParams(max_tokens=len(r["token_ids"]) + 5, ignore_eos=True))])[0]
    assert r2["finish_reason"] == "length" and r2["token_ids"][:len(r["token_ids"])] == r["token_ids"]


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(max_tokens=0), dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01),
                                dict(top_k=-2), dict(min_p=1.5), dict(temperature=float("nan")), dict(stop=[""])])
def test_invalid_sampling_params(kw):
    with pytest.raises(InvalidRequest):
        SamplingParams(**kw)


def test_invalid_prompts(engine_f32):
    e = engine_f32
    with pytest.raises(InvalidRequest, match="empty"):
        e.tokenize("")
    with pytest.raises(InvalidRequest, match="context"):
        e.tokenize(prompt_token_ids=[504] * 8192)
    with pytest.raises(InvalidRequest):
        e.tokenize(prompt_token_ids=[-1])
    with pytest.raises(InvalidRequest):
        e.tokenize(prompt_token_ids=[])


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True, cwd=NEUTRAL_CWD,
                          timeout=300, input=stdin)


def test_cli_errors_are_clear(tmp_path):
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                                                "intermediate_size": 32, "num_hidden_layers": 1,
                                                "num_attention_heads": 2}))
    (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    long_in = tmp_path / "long.jsonl"
    long_in.write_text(json.dumps({"prompt_token_ids": [504] * 9000}) + "\n")
    cases = [
        (["generate", ""], 2, "prompt is empty"),
        (["generate", "hi", "--max-tokens", "0"], 2, "max_tokens"),
        (["generate", "hi", "--temperature", "-1"], 2, "temperature"),
        (["generate", "hi", "--top-p", "2"], 2, "top_p"),
        (["generate", "--input", str(long_in)], 2, "context"),
        (["generate", "hi", "--model", str(tmp_path / "nope")], 3, "does not exist"),
        (["generate", "hi", "--model", str(bad_gguf)], 3, "corrupt"),
        (["generate", "hi", "--model", str(hf)], 3, "corrupt"),
    ]
    # independent processes, most of whose time is importing torch: side by side
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda case: _cli(*case[0]), cases))
    for (args, code, msg), r in zip(cases, results):
        assert r.returncode == code, (args, r.returncode, r.stderr[-2000:])
        assert msg in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr, (args, r.stderr[-2000:])


def test_cli_json_lines_in_input_order(tmp_path):
    inp = tmp_path / "in.jsonl"
    rows = [{"prompt": "The capital of France is"}, {"prompt": "Say hi.", "chat": True},
            {"prompt_token_ids": [504, 3575, 282, 4649, 314]}]
    inp.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = _cli("generate", "--input", str(inp), "--json", "--max-tokens", "6", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(out) == 3
    assert out[2]["prompt_token_ids"] == rows[2]["prompt_token_ids"]
    assert out[0]["token_ids"] == out[2]["token_ids"]  # the same prompt, given as text and as ids
    for o in out:
        assert {"prompt_token_ids", "token_ids", "text", "finish_reason"} <= set(o)
    r = _cli("generate", "The capital of France is", "--max-tokens", "6", "--dtype", "float32")
    assert r.returncode == 0 and r.stdout.strip() == out[0]["text"].strip()


# -- loading HF directories (sharded safetensors, Llama 3 rope scaling, Qwen2 biases) --------------
@pytest.mark.parametrize("kind", ["llama3", "qwen2", "mistral"])
def test_hf_directory_matches_transformers(tmp_path, kind, engine_f32):
    import transformers

    from pdserve.engine.engine import LLMEngine

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=2,
                  bos_token_id=1)
    if kind == "llama3":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})
        cls = transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    else:
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
        cls = transformers.MistralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
                layer.self_attn.k_proj.bias.normal_()
    d = tmp_path / kind
    model.save_pretrained(d, safe_serialization=True, max_shard_size="2MB")
    engine_f32.tokenizer.hf.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > 1  # sharded
    e = LLMEngine(str(d), dtype="float32", progress=False)
    ids = e.tokenize("The quick brown fox jumps over the lazy dog. " * 10)  # past 64 tokens: rope scaling acts
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    ours = e.score(ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    hf_greedy = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=2,
                               eos_token_id=None)[0, len(ids):].tolist()
    ours_greedy = e.generate([(ids, SamplingParams(max_tokens=8, ignore_eos=True))])[0]["token_ids"]
    assert ours_greedy == hf_greedy


def test_cpu_decode_groups_ragged_contexts_and_matches_one_sequence_at_a_time():
    """TorchAttention's batched decode pads each group of similar context lengths to its longest, not the whole
    batch to the batch's longest (benchmarks/replay_steps.py --ragged); every row equals that sequence's own SDPA."""
    import torch.nn.functional as F

    from pdserve.engine.attention import TorchAttention, _gather, build_metadata, length_groups

    assert length_groups([400] * 8) == [list(range(8))]
    assert length_groups([50, 750] * 4) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert length_groups([100, 700, 120, 690, 400], max_groups=2) == [[0, 2], [4, 3, 1]]
    gen = torch.Generator().manual_seed(0)
    bs, hkv, h, d = 4, 2, 6, 16
    lens = [3, 41, 5, 38, 17, 1]
    kv_layer = torch.randn(64, 2, bs, hkv, d, generator=gen)
    perm = torch.randperm(64, generator=gen).tolist()
    tables, at = [], 0
    for n in lens:
        k = -(-n // bs)
        tables.append(perm[at:at + k])
        at += k
    meta = build_metadata([1] * len(lens), lens, tables, bs, torch.device("cpu"))
    q = torch.randn(len(lens), h, d, generator=gen)
    assert len(length_groups(lens)) > 1
    got = TorchAttention().attend(q, kv_layer, meta, 0.25)
    for i, (n, table) in enumerate(zip(lens, tables)):
        k, v = _gather(kv_layer, table, n, bs)
        want = F.scaled_dot_product_attention(q[i][:, None, :], k, v, scale=0.25, enable_gqa=True)[:, 0]
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)
