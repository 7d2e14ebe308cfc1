"""Workloads for the simulator: when requests arrive, how long their prompts and outputs are, which share a prefix.

A workload is a YAML mapping (or a preset name, see PRESETS):

    name: chat
    arrival: {process: poisson}          # or {process: gamma, cv: 4}: bursty, same mean rate
    input_len:  {dist: lognormal, mean: 161, median: 90, min: 4, max: 4096}
    output_len: {dist: lognormal, mean: 338, median: 250, min: 1, max: 2048}
    shared_prefix: {share: 0.5, num_prefixes: 16, prefix_len: 512}   # optional

The rate and the number of requests come from `pdserve plan` (--rate, --num-requests): one workload shape is
simulated at many rates. Distributions: fixed {value}, uniform {lo, hi} (inclusive), exponential {mean},
lognormal {mean, median} or {mean, sigma}; min/max clip any of them. With shared_prefix, that share of
requests starts with one of `num_prefixes` system prompts of `prefix_len` tokens (chosen uniformly) followed by
their own input_len tokens; the rest have no prefix another request shares.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

DISTS = ("fixed", "uniform", "exponential", "lognormal")
PROCESSES = ("poisson", "gamma")


class WorkloadError(ValueError):
    """A workload file or preset that cannot be used; the message names the key."""


@dataclass(frozen=True)
class SimRequest:
    arrival: float     # seconds
    prompt_len: int    # tokens, the shared prefix included
    output_len: int    # tokens to generate (>= 1)
    group: int = -1    # which shared prefix; -1: none
    prefix_len: int = 0


# Shapes from published workload statistics. Each says which numbers it takes and from where; the shape of the
# distribution (lognormal through the stated mean and median) is our assumption wherever a source gives only
# those two numbers.
PRESETS: dict[str, dict] = {
    "chat": {
        "name": "chat",
        "source": "ShareGPT conversations as used by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): mean input "
                  "161 tokens, mean output 338 tokens; lognormal with median 0.6x the mean (our assumption)",
        "arrival": {"process": "poisson"},
        "input_len": {"dist": "lognormal", "mean": 161, "median": 97, "min": 4, "max": 4096},
        "output_len": {"dist": "lognormal", "mean": 338, "median": 203, "min": 1, "max": 2048},
    },
    "short": {
        "name": "short",
        "source": "Alpaca instructions as used by the vLLM paper (Kwon et al., SOSP 2023, Fig. 11): mean input "
                  "19 tokens, mean output 58 tokens; lognormal with median 0.6x the mean (our assumption)",
        "arrival": {"process": "poisson"},
        "input_len": {"dist": "lognormal", "mean": 19, "median": 12, "min": 2, "max": 512},
        "output_len": {"dist": "lognormal", "mean": 58, "median": 35, "min": 1, "max": 1024},
    },
    "rag": {
        "name": "rag",
        "source": "long-prompt RAG/agentic: the Mooncake (Kimi) trace as described in its paper (Qin et al., FAST "
                  "2025, arXiv:2407.00079): average input 7,590 tokens, average output 182 tokens, about half of "
                  "prompt tokens reusable from a prefix cache; lognormal with median 0.7x the mean, and the reuse as "
                  "half the requests sharing one of 64 prefixes of 4096 tokens (our assumptions)",
        "arrival": {"process": "poisson"},
        "input_len": {"dist": "lognormal", "mean": 5542, "median": 3880, "min": 256, "max": 28000},
        "output_len": {"dist": "lognormal", "mean": 182, "median": 127, "min": 1, "max": 2048},
        "shared_prefix": {"share": 0.5, "num_prefixes": 64, "prefix_len": 4096},
    },
    "code": {
        "name": "code",
        "source": "Azure LLM inference trace 2023, coding, as characterised by Splitwise (Patel et al., ISCA 2024): "
                  "median prompt 1,500 tokens, median output 13 tokens; lognormal with mean 1.3x the median (our "
                  "assumption)",
        "arrival": {"process": "poisson"},
        "input_len": {"dist": "lognormal", "mean": 1950, "median": 1500, "min": 16, "max": 8192},
        "output_len": {"dist": "lognormal", "mean": 17, "median": 13, "min": 1, "max": 1024},
    },
    "conversation": {
        "name": "conversation",
        "source": "Azure LLM inference trace 2023, conversation, as characterised by Splitwise (Patel et al., ISCA "
                  "2024): median prompt 1,020 tokens, median output 129 tokens; lognormal with mean 1.3x the median "
                  "(our assumption)",
        "arrival": {"process": "poisson"},
        "input_len": {"dist": "lognormal", "mean": 1326, "median": 1020, "min": 16, "max": 8192},
        "output_len": {"dist": "lognormal", "mean": 168, "median": 129, "min": 1, "max": 2048},
    },
}


@dataclass(frozen=True)
class Dist:
    kind: str
    a: float = 0.0
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 30

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.a
        elif self.kind == "uniform":
            x = rng.randint(int(self.a), int(self.b))
        elif self.kind == "exponential":
            x = rng.expovariate(1.0 / self.a)
        else:  # lognormal: a = mu, b = sigma of the log
            x = rng.lognormvariate(self.a, self.b)
        return int(min(self.hi, max(self.lo, round(x))))

    @property
    def mean(self) -> float:
        """Before clipping (what the spec states)."""
        if self.kind in ("fixed", "exponential"):
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return math.exp(self.a + self.b ** 2 / 2)


def _num(d: dict, key: str, at: str, positive: bool = True) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (v <= 0 if positive else v < 0):
        raise WorkloadError(f"{at}.{key}: expected a {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def parse_dist(d, at: str) -> Dist:
    if not isinstance(d, dict):
        raise WorkloadError(f"{at}: expected a mapping like {{dist: fixed, value: 128}}")
    kind = d.get("dist")
    if kind not in DISTS:
        raise WorkloadError(f"{at}.dist: expected one of {', '.join(DISTS)}, got {kind!r}")
    known = {"dist", "min", "max"} | {"fixed": {"value"}, "uniform": {"lo", "hi"}, "exponential": {"mean"},
                                      "lognormal": {"mean", "median", "sigma"}}[kind]
    if set(d) - known:
        raise WorkloadError(f"{at}: unknown key(s) {', '.join(sorted(set(d) - known))} for dist {kind}")
    lo = int(_num(d, "min", at)) if "min" in d else 1
    hi = int(_num(d, "max", at)) if "max" in d else 1 << 30
    if hi < lo:
        raise WorkloadError(f"{at}: max < min")
    if kind == "fixed":
        return Dist(kind, _num(d, "value", at), lo=lo, hi=hi)
    if kind == "uniform":
        a, b = _num(d, "lo", at), _num(d, "hi", at)
        if b < a:
            raise WorkloadError(f"{at}: hi < lo")
        return Dist(kind, a, b, lo, hi)
    if kind == "exponential":
        return Dist(kind, _num(d, "mean", at), lo=lo, hi=hi)
    mean = _num(d, "mean", at)
    if "median" in d:
        median = _num(d, "median", at)
        if median > mean:
            raise WorkloadError(f"{at}: a lognormal's median cannot exceed its mean")
        sigma = math.sqrt(2 * math.log(mean / median))
    else:
        sigma = _num(d, "sigma", at, positive=False)
    return Dist(kind, math.log(mean) - sigma ** 2 / 2, sigma, lo, hi)


@dataclass(frozen=True)
class Workload:
    name: str
    process: str
    cv: float
    input_len: Dist
    output_len: Dist
    share: float = 0.0
    num_prefixes: int = 0
    prefix_len: int = 0
    source: str = ""

    def generate(self, rate: float, n: int, seed: int = 0) -> list[SimRequest]:
        """`n` requests at a mean `rate` per second (inf: all at t=0)."""
        rng = random.Random(seed)
        t, out = 0.0, []
        shape = 1.0 / (self.cv ** 2) if self.process == "gamma" else 1.0
        for _ in range(n):
            group, plen = -1, 0
            if self.share and rng.random() < self.share:
                group, plen = rng.randrange(self.num_prefixes), self.prefix_len
            out.append(SimRequest(t, plen + self.input_len.sample(rng), self.output_len.sample(rng), group, plen))
            if not math.isinf(rate):
                # gamma inter-arrivals of mean 1/rate; shape 1 is the exponential (Poisson), shape < 1 is burstier
                t += rng.gammavariate(shape, 1.0 / (rate * shape)) if shape != 1.0 else rng.expovariate(rate)
        return out


def parse(d, at: str = "workload") -> Workload:
    if not isinstance(d, dict):
        raise WorkloadError(f"{at}: the top level must be a mapping")
    known = {"name", "source", "arrival", "input_len", "output_len", "shared_prefix"}
    if set(d) - known:
        raise WorkloadError(f"{at}: unknown key(s) {', '.join(sorted(set(d) - known))}; known: "
                            f"{', '.join(sorted(known))}")
    arr = d.get("arrival", {"process": "poisson"})
    if not isinstance(arr, dict) or arr.get("process") not in PROCESSES:
        raise WorkloadError(f"{at}.arrival.process: expected one of {', '.join(PROCESSES)}")
    cv = _num(arr, "cv", at + ".arrival") if arr["process"] == "gamma" else 1.0
    for key in ("input_len", "output_len"):
        if key not in d:
            raise WorkloadError(f"{at}: missing {key}")
    sp = d.get("shared_prefix") or {}
    share = num = plen = 0
    if sp:
        share = _num(sp, "share", at + ".shared_prefix", positive=False)
        if share > 1:
            raise WorkloadError(f"{at}.shared_prefix.share: expected a fraction in [0, 1], got {share}")
        num, plen = int(_num(sp, "num_prefixes", at + ".shared_prefix")), int(_num(sp, "prefix_len",
                                                                                    at + ".shared_prefix"))
    return Workload(str(d.get("name", "workload")), arr["process"], cv, parse_dist(d["input_len"], at + ".input_len"),
                    parse_dist(d["output_len"], at + ".output_len"), share, num, plen, str(d.get("source", "")))


def resolve(name_or_path: str) -> Workload:
    """A preset name (PRESETS) or a YAML file."""
    if name_or_path in PRESETS:
        return parse(PRESETS[name_or_path], name_or_path)
    p = Path(name_or_path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise WorkloadError(f"cannot read workload {name_or_path} (presets: {', '.join(PRESETS)}): "
                            f"{e.strerror}") from None
    except yaml.YAMLError as e:
        raise WorkloadError(f"workload {name_or_path} is not valid YAML: {e}") from None
    return parse(data, str(p))
