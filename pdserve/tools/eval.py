"""`pdserve eval`: what a prefill/decode precision split costs in accuracy.

A configuration P/D/W: an engine at precision P computes the prompt's KV (all tokens but the
last), the KV crosses wire W (bf16: the cache's own bytes; fp8: e4m3 + per token-head scales),
and an engine at precision D recomputes the last prompt token and produces everything after it
(the engines' own remote-KV path, through kv_transfer.local's in-process connector), recomputing the first --refresh-sink-tokens prompt tokens (attention
sinks) in that step wherever a decode worker would (decode_worker/worker.py: fp8 wire or P != D).
The baseline is one unquantized engine at --dtype (float32 on CPU: the exact path) with no transfer.

Per configuration, against the baseline:
  continuation  the baseline's greedy continuation of each fixed prompt (natural EOS stops),
                teacher-forced through the configuration: mean KL(baseline || config) per token,
                top-1 agreement, and the share of disagreements at baseline near-ties;
  text          windows of a public-domain book (pdserve/tools/eval_text.py): a prefix prefilled at P,
                the next tokens scored teacher-forced at D: perplexity exp(mean NLL), and KL;
  greedy        flip rate: the share of prompts whose greedy generation differs from the
                baseline's in any token.
Engines are built once per precision and shared by every configuration that uses them.
"""
from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import torch

from pdserve.config import KV_WIRE_DTYPES, PRECISIONS, EngineConfig, KVTransferConfig
from pdserve.decode_worker.worker import sink_refresh_tokens
from pdserve.kv_transfer.local import LocalConnector, LocalWire
from pdserve.tools.eval_metrics import NEAR_TIE, Agreement, Perplexity, first_divergence
from pdserve.tools.eval_prompts import PROMPTS

MAX_PROMPT_TOKENS = 96  # bound used to size the KV pools; the fixed prompts are far below it


class EvalInputError(ValueError):
    """A setting or input the measurement cannot run with (exit code 2 in the CLI)."""


@dataclass(frozen=True)
class EvalConfig:
    prefill: str
    decode: str
    wire: str

    @property
    def name(self) -> str:
        return f"{self.prefill}/{self.decode}/{self.wire}"

    @classmethod
    def parse(cls, text: str) -> "EvalConfig":
        parts = text.strip().split("/")
        if len(parts) != 3:
            raise ValueError(f"configuration {text!r}: expected PREFILL/DECODE/WIRE, e.g. nvfp4/bf16/fp8")
        p, d, w = parts
        for what, v, ok in (("prefill", p, PRECISIONS), ("decode", d, PRECISIONS), ("KV wire", w, KV_WIRE_DTYPES)):
            if v not in ok:
                raise ValueError(f"configuration {text!r}: {what} must be one of {', '.join(ok)}, got {v!r}")
        return cls(p, d, w)


def parse_configs(text: str) -> list[EvalConfig]:
    configs = [EvalConfig.parse(t) for t in text.split(",") if t.strip()]
    if not configs:
        raise ValueError("no configuration given")
    if len({c.name for c in configs}) != len(configs):
        raise ValueError("a configuration is listed twice")
    return configs


@dataclass
class Settings:
    num_prompts: int = 24
    max_tokens: int = 32
    ppl_windows: int = 16
    ppl_prefix: int = 256
    ppl_tokens: int = 256
    refresh_sink_tokens: int = KVTransferConfig.refresh_sink_tokens  # 0: off
    fp8_attention_min_tokens: int = EngineConfig.fp8_attention_min_tokens  # 0: every prompt step

    def validate(self) -> None:
        if not 0 <= self.num_prompts <= len(PROMPTS):
            raise EvalInputError(f"--num-prompts must be in [0, {len(PROMPTS)}] (the fixed prompt set)")
        if self.max_tokens < 1:
            raise EvalInputError("--max-tokens must be >= 1")
        if self.ppl_windows < 0 or self.ppl_prefix < 2 or self.ppl_tokens < 1:
            raise EvalInputError("--ppl-windows must be >= 0, --ppl-prefix >= 2 and --ppl-tokens >= 1")
        if self.refresh_sink_tokens < 0:
            raise EvalInputError("--refresh-sink-tokens must be >= 0")
        if self.fp8_attention_min_tokens < 0:
            raise EvalInputError("--fp8-attention-min-tokens must be >= 0")
        if self.num_prompts == 0 and self.ppl_windows == 0:
            raise EvalInputError("nothing to measure: --num-prompts and --ppl-windows are both 0")


class EnginePool:
    """One engine per precision, built on first use (`engines` pre-seeds it, e.g. in tests)."""

    def __init__(self, model: str | None, dtype: str, num_blocks: int, engines: dict | None = None,
                 fp8_attention_min_tokens: int = EngineConfig.fp8_attention_min_tokens):
        self.model, self.dtype, self.num_blocks = model, dtype, num_blocks
        self.fp8_attention_min_tokens = fp8_attention_min_tokens
        self.engines = dict(engines or {})

    def get(self, precision: str):
        if precision not in self.engines:
            from pdserve.engine.engine import LLMEngine

            config = EngineConfig(num_blocks=self.num_blocks, fp8_attention_min_tokens=self.fp8_attention_min_tokens)
            self.engines[precision] = LLMEngine(self.model, self.dtype, config, precision=precision, progress=False)
        return self.engines[precision]


def pool_blocks(settings: Settings, block_size: int = 16) -> int:
    """KV blocks one engine needs: every prompt's generation at once, or a text window scored
    over transferred KV (its own blocks plus the scored tail)."""
    per_gen = -(-(MAX_PROMPT_TOKENS + settings.max_tokens + 1) // block_size)
    per_window = -(-(settings.ppl_prefix + settings.ppl_tokens + 1) // block_size)
    return max(settings.num_prompts * per_gen, 2 * per_window) + 4


@dataclass
class ConfigResult:
    config: EvalConfig
    refresh_sink_tokens: int = 0
    continuation: Agreement = field(default_factory=Agreement)
    text: Agreement = field(default_factory=Agreement)
    perplexity: Perplexity = field(default_factory=Perplexity)
    flips: int = 0
    generations: int = 0
    divergence_at: list = field(default_factory=list)

    def to_dict(self, baseline_ppl: float) -> dict:
        c, t = self.continuation, self.text
        ppl = self.perplexity.value
        return {
            "config": self.config.name, "prefill": self.config.prefill, "decode": self.config.decode,
            "kv_wire": self.config.wire, "refresh_sink_tokens": self.refresh_sink_tokens,
            "continuation": {"tokens": c.tokens, "kl": _num(c.kl), "top1": _num(c.top1),
                             "disagreements": c.disagreements, "near_tie_fraction": c.near_tie_fraction,
                             "median_gap_at_disagreement": _median(c.gaps)},
            "text": {"tokens": t.tokens, "kl": _num(t.kl), "top1": _num(t.top1), "ppl": _num(ppl),
                     "ppl_delta_pct": _num(100 * (ppl / baseline_ppl - 1)) if t.tokens else None},
            "greedy": {"prompts": self.generations, "flips": self.flips,
                       "flip_rate": self.flips / self.generations if self.generations else None,
                       "first_divergence": self.divergence_at},
        }


def _num(x: float):
    return None if x is None or math.isnan(x) else x


def _median(xs: list) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None


def text_windows(token_ids: list[int], n: int, length: int) -> list[list[int]]:
    """n windows of `length` tokens spread evenly over the text (overlapping only if it is short)."""
    if n == 0:
        return []
    if len(token_ids) < length:
        raise EvalInputError(f"the text has {len(token_ids)} tokens, fewer than one window of {length}")
    span = len(token_ids) - length
    starts = [round(i * span / (n - 1)) if n > 1 else 0 for i in range(n)]
    return [token_ids[s:s + length] for s in starts]


class Harness:
    def __init__(self, pool: EnginePool, configs: list[EvalConfig], settings: Settings, log=None):
        self.pool, self.configs, self.settings = pool, configs, settings
        self.log = log or (lambda msg: None)
        self.base = pool.get("bf16")
        for p in sorted({c.prefill for c in configs} | {c.decode for c in configs}):
            pool.get(p)
        self.results = {c.name: ConfigResult(c, sink_refresh_tokens(settings.refresh_sink_tokens, c.wire, c.prefill,
                                                                    c.decode)) for c in configs}
        self.baseline_ppl = Perplexity()
        self.baseline_gen: list[list[int]] = []
        # every engine gets an in-process KV connector for the run (close() takes them off again)
        self.wire = LocalWire()
        self.connected = [e for e in pool.engines.values() if e.connector is None]
        for e in self.connected:
            e.connector = LocalConnector(e.runner.kv_cache, self.wire)

    def close(self) -> None:
        for e in self.connected:
            e.connector = None

    def _prefill_all(self, token_ids: list[int], tag: str) -> dict:
        """The prompt's KV from each prefill precision, saved once and loaded by every configuration."""
        return {p: self.pool.get(p).prefill(token_ids, f"eval-{tag}-{p}")
                for p in sorted({c.prefill for c in self.configs})}

    def _decoder(self, c: EvalConfig):
        """The decode engine of `c`, its connector set to c's wire."""
        engine = self.pool.get(c.decode)
        engine.connector.wire_dtype = c.wire
        return engine

    def _remote(self, kv, c: EvalConfig):
        return replace(kv, refresh_tokens=self.results[c.name].refresh_sink_tokens)

    def _discard(self, kvs: dict) -> None:
        for kv in kvs.values():
            self.wire.discard(kv.handle)

    def run_prompts(self, prompts: list[list[int]]) -> None:
        s = self.settings
        t0 = time.monotonic()
        gens = self.base.generate([(p, _greedy(s.max_tokens)) for p in prompts])
        self.baseline_gen = [g["token_ids"] for g in gens]
        self.log(f"baseline: {len(prompts)} greedy continuations in {time.monotonic() - t0:.1f} s")
        kvs = []  # prompt KV per prefill precision, reused by the flip-rate generations
        for i, (p, cont) in enumerate(zip(prompts, self.baseline_gen)):
            full = p + cont
            ref = self.base.score(full)[len(p) - 1:-1]  # rows predicting the continuation
            kv_p = self._prefill_all(p, f"p{i}")
            kvs.append(kv_p)
            for c in self.configs:
                got = self._decoder(c).score(full, remote_kv=self._remote(kv_p[c.prefill], c))[:-1]
                self.results[c.name].continuation.add(ref, got)
            if (i + 1) % 8 == 0 or i + 1 == len(prompts):
                self.log(f"prompt {i + 1}/{len(prompts)} teacher-forced ({time.monotonic() - t0:.1f} s)")
        for c in self.configs:
            t1 = time.monotonic()
            got = self._generate(c, prompts, [self._remote(kv[c.prefill], c) for kv in kvs], s.max_tokens)
            r = self.results[c.name]
            for ref_ids, ids in zip(self.baseline_gen, got):
                d = first_divergence(ref_ids, ids)
                r.generations += 1
                if d is not None:
                    r.flips += 1
                    r.divergence_at.append(d)
            self.log(f"{c.name}: greedy flips {r.flips}/{r.generations} ({time.monotonic() - t1:.1f} s)")
        for kv_p in kvs:
            self._discard(kv_p)

    def _generate(self, c: EvalConfig, prompts: list[list[int]], remotes: list, max_tokens: int) -> list[list[int]]:
        """Greedy continuations (natural EOS stops) of every prompt on c's decode engine from transferred KV,
        batched as a decode worker runs them."""
        engine = self._decoder(c)
        ids = [f"eval-gen-{i}" for i in range(len(prompts))]
        out = {rid: [] for rid in ids}
        try:
            for rid, prompt, remote in zip(ids, prompts, remotes):
                engine.add_request(rid, prompt, _greedy(max_tokens), remote_kv=remote)
            while engine.has_unfinished() or engine.has_transfers():
                for o in engine.step():
                    if o.error is not None:
                        raise o.error
                    if o.request_id in out:
                        out[o.request_id].extend(o.new_token_ids)
            return [out[rid] for rid in ids]
        finally:
            for rid in ids:
                engine.abort(rid)  # no-op for finished requests; frees the blocks of any left behind

    def run_text(self, windows: list[list[int]]) -> None:
        prefix = self.settings.ppl_prefix
        t0 = time.monotonic()
        for i, w in enumerate(windows):
            targets = torch.tensor(w[prefix:], dtype=torch.long)
            ref = self.base.score(w)[prefix - 1:-1]
            self.baseline_ppl.add(ref, targets)
            kv_p = self._prefill_all(w[:prefix], f"w{i}")
            for c in self.configs:
                got = self._decoder(c).score(w, remote_kv=self._remote(kv_p[c.prefill], c))[:-1]
                r = self.results[c.name]
                r.text.add(ref, got)
                r.perplexity.add(got, targets)
            self._discard(kv_p)
            self.log(f"text window {i + 1}/{len(windows)} ({time.monotonic() - t0:.1f} s)")

    def report(self) -> dict:
        base_ppl = self.baseline_ppl.value
        return {
            "baseline": {"ppl": _num(base_ppl), "text_tokens": self.baseline_ppl.tokens,
                         "continuation_tokens": sum(len(g) for g in self.baseline_gen),
                         "prompts": len(self.baseline_gen)},
            "configs": [self.results[c.name].to_dict(base_ppl) for c in self.configs],
        }


def _greedy(max_tokens: int):
    from pdserve.engine.sequence import SamplingParams

    return SamplingParams(max_tokens=max_tokens)


def run_eval(pool: EnginePool, configs: list[EvalConfig], settings: Settings, text=None, log=None) -> dict:
    """The whole measurement; `text` (an eval_text.EvalText) is needed when ppl_windows > 0."""
    settings.validate()
    h = Harness(pool, configs, settings, log)
    try:
        return _run(h, settings, text)
    finally:
        h.close()


def _run(h: Harness, settings: Settings, text) -> dict:
    base = h.base
    if settings.num_prompts:
        prompts = [base.tokenize(p, chat=chat) for p, chat in PROMPTS[:settings.num_prompts]]
        too_long = [len(p) for p in prompts if len(p) > MAX_PROMPT_TOKENS]
        if too_long:
            raise EvalInputError(f"a prompt has {max(too_long)} tokens, above the {MAX_PROMPT_TOKENS} the pools are sized for")
        h.run_prompts(prompts)
    text_info = None
    if settings.ppl_windows:
        if settings.ppl_prefix + settings.ppl_tokens >= base.max_model_len:
            raise EvalInputError(f"a text window of {settings.ppl_prefix + settings.ppl_tokens} tokens does not fit "
                                 f"the model's context of {base.max_model_len}")
        ids = base.tokenizer.encode(text.text)
        h.run_text(text_windows(ids, settings.ppl_windows, settings.ppl_prefix + settings.ppl_tokens))
        text_info = {"title": text.title, "source": text.source, "tokens": len(ids)}
    out = h.report()
    out["settings"] = {"num_prompts": settings.num_prompts, "max_tokens": settings.max_tokens,
                       "ppl_windows": settings.ppl_windows, "ppl_prefix": settings.ppl_prefix,
                       "ppl_tokens": settings.ppl_tokens, "near_tie_logits": NEAR_TIE, "text": text_info,
                       "refresh_sink_tokens": settings.refresh_sink_tokens,
                       "fp8_attention_min_tokens": settings.fp8_attention_min_tokens}
    out["model"] = base.model_path
    out["dtype"] = str(base.dtype).removeprefix("torch.")
    out["device"] = describe_device(base.device)
    out["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU {platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}"


def command_line(args) -> str:
    parts = ["pdserve eval", f"--configs {args.configs}", f"--num-prompts {args.num_prompts}",
             f"--max-tokens {args.max_tokens}", f"--ppl-windows {args.ppl_windows}",
             f"--ppl-prefix {args.ppl_prefix}", f"--ppl-tokens {args.ppl_tokens}",
             f"--refresh-sink-tokens {args.refresh_sink_tokens}",
             f"--fp8-attention-min-tokens {args.fp8_attention_min_tokens}", f"--dtype {args.dtype}"]
    parts += [f"--{k} {v}" for k, v in (("model", args.model), ("text", args.text), ("out-dir", args.out_dir)) if v]
    return " ".join(parts)


def cmd_eval(args) -> int:
    """`pdserve eval` (its arguments: pdserve/commands.py)."""
    from pdserve.errors import EXIT_BAD_INPUT, EXIT_MODEL, CLIError, ModelLoadError
    from pdserve.tools import eval_report
    from pdserve.tools.eval_text import TextMissing, load_text

    settings = Settings(args.num_prompts, args.max_tokens, args.ppl_windows, args.ppl_prefix, args.ppl_tokens,
                        args.refresh_sink_tokens, args.fp8_attention_min_tokens)
    try:
        configs = parse_configs(args.configs)
        settings.validate()
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        text = load_text(args.text) if settings.ppl_windows else None
    except TextMissing as e:
        raise CLIError(str(e), EXIT_BAD_INPUT) from None
    log = (lambda msg: print(f"eval: {msg}", file=sys.stderr, flush=True))
    try:
        pool = EnginePool(args.model, args.dtype, pool_blocks(settings),
                          fp8_attention_min_tokens=settings.fp8_attention_min_tokens)
        result = run_eval(pool, configs, settings, text, log)
    except ModelLoadError as e:
        raise CLIError(str(e), EXIT_MODEL) from None
    except EvalInputError as e:
        raise CLIError(str(e)) from None
    result["command"] = command_line(args)
    if args.out_dir:
        for path in eval_report.write(result, args.out_dir):
            log(f"wrote {path}")
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(eval_report.markdown(result))
    return 0
