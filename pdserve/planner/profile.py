"""A profile: what one engine of one model costs on one machine, as the simulator needs it.

JSON (`pdserve profile` writes it; `SCHEMA` names the version):

    source, date, device, model      where the numbers come from ("measured by pdserve profile" or "derived from ...")
    kv_bytes_per_token  {wire: bytes}            one prompt token's KV on the wire: "raw" (the cache dtype), "fp8"
    prefill  {precision: {tokens: [...], ms: [...], ms_per_token_context}}
             a prefill step of `tokens` new prompt tokens (one or several prompts' chunks), plus
             ms_per_token_context per (new token x cached context token): attention over a cached prefix
    decode   {precision: {batch: [...], ms: [...], context, ms_per_context_token}}
             a pure decode step of `batch` sequences each at `context` tokens; ms_per_context_token is the slope
             in the batch's total context (reading KV), so any mix of contexts costs base(batch) + slope * total
    transfer {wire: {bytes: [...], ms: [...], export_ms: [...], tokens, descriptors, placement, processes}}
             one request's KV pull (READ posted -> landed, dequantize included), and the prefill side's export
             (fp8: quantize into staging; it runs on the prefill engine's thread); `pdserve profile` also records
             the prompt tokens of each point, the NIXL descriptors of its READ, the block placement ("adjacent":
             consecutive ids on both sides, one descriptor; "scattered": one per block) and that exporter and
             reader were 2 processes (informational: the simulator reads bytes, ms and export_ms)
    overheads {request_ms, decode_step_ms, handoff_ms, per_stream_ms}
             what the engine steps do not include: a request's fixed cost through router and actors (added to
             TTFT), a decode worker's per-step cost of streaming deltas, the router's hop from the prefill worker to
             the decode worker (disaggregated), and what a message waits in a decode or colocated worker's event
             loop per sequence that worker streams (requests entering it, first and last tokens leaving it)
    engine   {block_size, kv_cache_tokens, max_num_seqs, max_num_batched_tokens, prefill_max_num_batched_tokens}
    host     {cores, cpu_share, contention}      engines share this many cores (a CPU box; null: one device each);
                                                 the share of a core the measurements got (hostload.py);
                                                 optional contention {cores, engines, step_ms, slowdown}: the
                                                 step's slowdown when k engines step at once (contention.py)

A step that mixes prompt chunks (or recomputed tokens) with decodes is costed as a prefill step of all its
tokens plus the decodes' KV reads, and at least as a decode step of as many sequences: the engine runs such
steps eagerly through the prefill path, while a pure decode step replays a CUDA graph where there is one
(engine/model_runner.py).
Curves are piecewise linear; below the first point they hold its value (a step has a floor cost), beyond the
last they extend the last segment.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = "pdserve-profile/1"
WIRES = ("raw", "fp8")


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Curve:
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    @classmethod
    def of(cls, xs, ys, at: str) -> "Curve":
        if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) or not xs:
            raise ProfileError(f"{at}: needs two lists of the same, non-zero length")
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in xs + ys):
            raise ProfileError(f"{at}: values must be numbers >= 0")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ProfileError(f"{at}: x values must increase")
        return cls(tuple(float(x) for x in xs), tuple(float(y) for y in ys))

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0] or len(xs) == 1:
            return ys[0]
        i = min(bisect.bisect_right(xs, x), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class DecodeCost:
    base: Curve  # ms of a decode step at batch b, its KV reads taken out
    per_context_token: float

    def __call__(self, batch: int, context_total: float) -> float:
        return self.base(batch) + self.per_context_token * context_total


@dataclass
class Profile:
    raw: dict
    prefill: dict[str, Curve] = field(default_factory=dict)
    prefill_context: dict[str, float] = field(default_factory=dict)
    decode: dict[str, DecodeCost] = field(default_factory=dict)
    transfer: dict[str, Curve] = field(default_factory=dict)
    export: dict[str, Curve] = field(default_factory=dict)
    kv_bytes_per_token: dict[str, float] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.raw.get("source", "")

    @property
    def engine(self) -> dict:
        return self.raw.get("engine", {})

    @property
    def host_cores(self) -> int | None:
        return (self.raw.get("host") or {}).get("cores")

    @property
    def host_contention(self) -> dict | None:
        return (self.raw.get("host") or {}).get("contention")

    @property
    def host_cpu_share(self) -> float:
        """The share of a core the measurements got while they had work (hostload.py); 1 when not recorded."""
        return float((self.raw.get("host") or {}).get("cpu_share") or 1.0)

    def overhead_ms(self, name: str) -> float:
        return float((self.raw.get("overheads") or {}).get(name, 0.0))

    def need(self, precision: str, role: str) -> None:
        table = self.prefill if role == "prefill" else self.decode
        if precision not in table:
            raise ProfileError(f"the profile has no {role} curve for precision {precision!r}; "
                               f"it has {', '.join(sorted(table)) or 'none'}")

    # -- costs, milliseconds ---------------------------------------------------------------------
    def prefill_ms(self, precision: str, tokens: float, token_context: float = 0.0) -> float:
        """A step of `tokens` prompt tokens; token_context: sum over its chunks of (chunk x cached context)."""
        return self.prefill[precision](tokens) + self.prefill_context.get(precision, 0.0) * token_context

    def decode_ms(self, precision: str, batch: int, context_total: float) -> float:
        return self.decode[precision](batch, context_total)

    def mixed_ms(self, precision: str, tokens: float, token_context: float, context_total: float, seqs: int) -> float:
        """A step of `seqs` sequences and `tokens` tokens in all, some of them prompt chunks (or recomputed tokens):
        a prefill step of all its tokens plus the decodes' KV reads, and never less than a decode step of as many
        sequences (which carries the engine's per-sequence host work that a forward-only prefill curve lacks)."""
        if precision not in self.decode:
            return self.prefill_ms(precision, tokens, token_context)
        d = self.decode[precision]
        return max(self.prefill_ms(precision, tokens, token_context) + d.per_context_token * context_total,
                   d(seqs, context_total))

    def kv_bytes(self, wire: str, tokens: int) -> float:
        return self.kv_bytes_per_token[wire] * tokens

    def transfer_ms(self, wire: str, nbytes: float) -> float:
        return self.transfer[wire](nbytes)

    def export_ms(self, wire: str, nbytes: float) -> float:
        return self.export[wire](nbytes) if wire in self.export else 0.0


def from_dict(d: dict, at: str = "profile") -> Profile:
    if not isinstance(d, dict):
        raise ProfileError(f"{at}: the top level must be an object")
    if d.get("schema") != SCHEMA:
        raise ProfileError(f"{at}: schema must be {SCHEMA!r}, got {d.get('schema')!r}")
    p = Profile(raw=d)
    try:
        for prec, c in d["prefill"].items():
            p.prefill[prec] = Curve.of(c["tokens"], c["ms"], f"{at}: prefill.{prec}")
            p.prefill_context[prec] = float(c.get("ms_per_token_context", 0.0))
        for prec, c in d["decode"].items():
            slope = float(c.get("ms_per_context_token", 0.0))
            ctx = float(c.get("context", 0))
            raw = Curve.of(c["batch"], c["ms"], f"{at}: decode.{prec}")
            base = Curve(raw.xs, tuple(max(0.0, y - slope * x * ctx) for x, y in zip(raw.xs, raw.ys)))
            p.decode[prec] = DecodeCost(base, slope)
        for wire, c in d.get("transfer", {}).items():
            if wire not in WIRES:
                raise ProfileError(f"{at}: transfer.{wire}: the wires are {', '.join(WIRES)}")
            p.transfer[wire] = Curve.of(c["bytes"], c["ms"], f"{at}: transfer.{wire}")
            if "export_ms" in c:
                p.export[wire] = Curve.of(c["bytes"], c["export_ms"], f"{at}: transfer.{wire}.export_ms")
        p.kv_bytes_per_token = {w: float(v) for w, v in d.get("kv_bytes_per_token", {}).items()}
    except KeyError as e:
        raise ProfileError(f"{at}: missing key {e.args[0]!r}") from None
    except (AttributeError, TypeError, ValueError) as e:
        if isinstance(e, ProfileError):
            raise
        raise ProfileError(f"{at}: malformed ({e})") from None
    for w in p.transfer:
        if w not in p.kv_bytes_per_token:
            raise ProfileError(f"{at}: kv_bytes_per_token has no entry for the {w} wire")
    return p


def load(path: str | Path) -> Profile:
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ProfileError(f"profile {path} is not JSON: {e}") from None
    return from_dict(d, str(path))


BUILTIN = Path(__file__).parent / "profiles"
# the shipped profiles (`--profile NAME`), each a JSON in BUILTIN; docs/planner.md's table says what each is
SHIPPED = {
    "cpu-smollm2": "measured by pdserve profile --server on the 2-core CPU box",
    "h200-llama3-8b": "measured on an NVIDIA H200 (2026-12-05): engine curves by pdserve profile, KV transfer and "
                      "overheads from that session's two-process and cluster benchmarks",
    "h100-llama3-8b": "measured on an NVIDIA H100 80GB (2026-12-05) by pdserve profile: engine curves and the "
                      "two-process KV transfer in one run, serving overheads from the same call's cluster bench",
    "h200-llama3-8b-derived": "derived from H100 runs and a 2026-12-04 H200 transfer run; superseded by "
                              "h200-llama3-8b",
}


def resolve(name_or_path: str) -> Profile:
    """A profile file, or the name of one shipped in pdserve/planner/profiles/ (SHIPPED, without .json)."""
    p = Path(name_or_path)
    if not p.exists() and (BUILTIN / f"{name_or_path}.json").exists():
        p = BUILTIN / f"{name_or_path}.json"
    elif not p.exists() and p.suffix != ".json" and len(p.parts) == 1:
        raise ProfileError(f"no profile file {name_or_path!r}, and no shipped profile of that name "
                           f"(shipped: {', '.join(sorted(SHIPPED))})")
    return load(p)
